//! The admin listener (`[metrics] address`), apart from the Redis listeners:
//!
//! * `GET /metrics`: Prometheus text format;
//! * `GET /healthz`: 200 while the process runs;
//! * `GET /readyz`: 200 when [`Health`] says ready, else 503 with the reason.
//!
//! A deliberately small HTTP/1.1 server: one request per connection, GET and
//! HEAD only, the request head bounded in size and time (1 s to arrive),
//! connections admitted as the Redis listeners admit theirs
//! ([`crate::server::admission`]: a bound, a few per peer address, the
//! oldest silent one evicted for a newcomer), so connections held open by one
//! peer never keep probes from another (the kubelet, Prometheus) out. It serves nothing secret, and reads no request
//! body.

use crate::health::Health;
use crate::metrics::Metrics;
use crate::server::admission::{Admission, Ticket};
use crate::session::Peer;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a client has to send its request and read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// Admin connections one peer address may hold at once.
const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// How often recorded histogram samples move into their buckets: samples
/// wait in memory until then (at 300k requests/s, 1 s of them is ~5 MB).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// What the admin listener reports on.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Telemetry {
    /// Whether a new upstream connection works (`Err`: why not), for
    /// readiness and `redcloak_upstream_up`.
    pub fn set_upstream(&self, outcome: Result<(), String>) {
        let up = outcome.is_ok();
        self.health.set_upstream(outcome);
        self.metrics.upstream_up.set(if up { 1.0 } else { 0.0 });
    }
}

/// Serves `listener` for as long as the process lives.
pub async fn serve(listener: TcpListener, telemetry: Telemetry) {
    let admission = Admission::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    loop {
        let Ok((stream, address)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (admission, telemetry) = (admission.clone(), telemetry.clone());
        tokio::spawn(async move {
            let Ok(mut ticket) = admission.admit(&Peer::Tcp(address)).await else {
                return;
            };
            let evicted = ticket.evicted().clone();
            let answered =
                tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &telemetry, &mut ticket));
            tokio::select! {
                _ = answered => {}
                _ = evicted.cancelled() => {}
            }
        });
    }
}

/// Moves histogram samples into buckets periodically, so memory stays
/// bounded whether or not anyone scrapes.
pub async fn run_upkeep(metrics: Arc<Metrics>) {
    loop {
        tokio::time::sleep(UPKEEP_INTERVAL).await;
        metrics.run_upkeep();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0} is not an http://HOST:PORT/PATH URL")]
    Url(String),
    #[error("cannot reach {url}: {error}")]
    Connect { url: String, error: std::io::Error },
    #[error("no answer from {0} in time")]
    Timeout(String),
    #[error("{0} did not answer HTTP")]
    NotHttp(String),
}

/// `GET url` (plain http), for `redcloak health`: the status code and body.
pub async fn probe(url: &str, timeout: Duration) -> Result<(u16, String), ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::Url(url.to_owned()))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() {
        return Err(ProbeError::Url(url.to_owned()));
    }
    let path = if path.is_empty() { "/" } else { path };
    let exchange = async {
        let mut stream = TcpStream::connect(authority).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        (&mut stream)
            .take(MAX_REQUEST_HEAD as u64 * 8)
            .read_to_end(&mut response)
            .await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout(url.to_owned()))?
        .map_err(|error| ProbeError::Connect {
            url: url.to_owned(),
            error,
        })?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| ProbeError::NotHttp(url.to_owned()))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

async fn answer(
    mut stream: TcpStream,
    telemetry: &Telemetry,
    ticket: &mut Ticket,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) | Err(_) => return Ok(()),
        Ok(Err(err)) => return Err(err),
    };
    // It asked: no longer a silent connection a newcomer may take the slot of.
    ticket.spoke();
    let Head::Complete(head) = head else {
        return respond(
            &mut stream,
            431,
            "text/plain",
            "request head too large\n",
            true,
        )
        .await;
    };
    route(&mut stream, &head, telemetry).await
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
}

/// The request head; `None` when the client closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut head = Vec::with_capacity(1024);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return Ok(Some(Head::TooLarge));
        }
        let mut chunk = [0u8; 1024];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Ok(Some(Head::Complete(head)))
}

async fn route(stream: &mut TcpStream, head: &[u8], telemetry: &Telemetry) -> std::io::Result<()> {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let with_body = method != b"HEAD";
    if method != b"GET" && method != b"HEAD" {
        return respond(stream, 405, "text/plain", "only GET and HEAD\n", with_body).await;
    }
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => {
            let text = telemetry.metrics.render();
            let kind = "text/plain; version=0.0.4; charset=utf-8";
            respond(stream, 200, kind, &text, with_body).await
        }
        b"/healthz" => respond(stream, 200, "text/plain", "ok\n", with_body).await,
        b"/readyz" => {
            let health = &telemetry.health;
            let status = if health.is_ready() { 200 } else { 503 };
            let body = format!("{}\n", health.status());
            respond(stream, status, "text/plain", &body, with_body).await
        }
        _ => {
            respond(
                stream,
                404,
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n",
                with_body,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(address: std::net::SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_and_nothing_else() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let telemetry = Telemetry::default();
        tokio::spawn(serve(listener, telemetry.clone()));
        let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let healthz = get(address, &request("/healthz")).await;
        assert!(healthz.starts_with("HTTP/1.1 200 OK\r\n"), "{healthz}");
        let readyz = get(address, &request("/readyz")).await;
        assert!(readyz.starts_with("HTTP/1.1 503 "), "{readyz}");
        assert!(readyz.ends_with("starting: the startup checks have not passed yet\n"));
        telemetry.health.serving();
        telemetry.health.set_upstream(Ok(()));
        let readyz = get(address, &request("/readyz?verbose")).await;
        assert!(readyz.starts_with("HTTP/1.1 200 OK\r\n"), "{readyz}");
        let metrics = get(address, &request("/metrics")).await;
        assert!(metrics.contains("redcloak_build_info{"), "{metrics}");
        assert!(
            get(address, &request("/"))
                .await
                .starts_with("HTTP/1.1 404 ")
        );
        let post = get(address, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let head = get(address, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        // Exactly the limit, unterminated: the server reads it all, then refuses.
        let start = "GET /metrics HTTP/1.1\r\nX: ";
        let huge = format!("{start}{}", "a".repeat(MAX_REQUEST_HEAD - start.len()));
        assert!(get(address, &huge).await.starts_with("HTTP/1.1 431 "));
        // The client `redcloak health` uses.
        let url = format!("http://{address}/readyz");
        let answer = probe(&url, Duration::from_secs(5)).await.expect("probe");
        assert_eq!(answer, (200, "ready\n".to_owned()));
        telemetry.health.draining();
        let answer = probe(&url, Duration::from_secs(5)).await.expect("probe");
        assert_eq!(answer.0, 503);
        assert!(matches!(
            probe("https://x/readyz", Duration::from_secs(1)).await,
            Err(ProbeError::Url(_))
        ));
    }
}
