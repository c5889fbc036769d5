//! The admin listener (`[metrics] address`), apart from the Redis listeners:
//!
//! * `GET /metrics`: Prometheus text format;
//! * `GET /healthz`: 200 while the process runs;
//! * `GET /readyz`: 200 when [`crate::telemetry::health::Health`] says ready,
//!   else 503 with the reason;
//! * `POST /-/reload`: reloads certificates, keys and passwords (see
//!   [`crate::reload`]) and answers JSON saying what changed, what was
//!   rejected and why, and which changed settings need a restart: 200 when
//!   nothing was rejected, 422 otherwise, 503 before the server serves. It
//!   takes nothing from the request: it only makes redcloak read its own
//!   files again, one reload at a time.
//!
//! A deliberately small HTTP/1.1 server: one request per connection, GET and
//! HEAD only, the request head bounded in size and time (1 s to arrive),
//! connections admitted as the Redis listeners admit theirs
//! ([`crate::server::admission`]: a bound, a few per peer address, the
//! oldest silent one evicted for a newcomer), so connections held open by one
//! peer never keep probes from another (the kubelet, Prometheus) out. It serves nothing secret, and reads no request
//! body.

use crate::reload::{ReloadRequests, Trigger};
use crate::server::admission::{Admission, Ticket};
use crate::session::Peer;
use crate::telemetry::Telemetry;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a client has to read an answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a reload may take (its probe connection has upstream.connect_timeout).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// Admin connections one peer address may hold at once.
const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// Serves `listener` for as long as the process lives.
/// `reloads`: where `POST /-/reload` asks (`None`: POST answers 405).
pub async fn serve(listener: TcpListener, telemetry: Telemetry, reloads: Option<ReloadRequests>) {
    let admission = Admission::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    loop {
        let Ok((stream, address)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (admission, telemetry, reloads) =
            (admission.clone(), telemetry.clone(), reloads.clone());
        tokio::spawn(async move {
            let Ok(mut ticket) = admission.admit(&Peer::Tcp(address)).await else {
                return;
            };
            let evicted = ticket.evicted().clone();
            let answered = tokio::time::timeout(
                HEAD_TIMEOUT + RELOAD_TIMEOUT + REQUEST_TIMEOUT,
                answer(stream, &telemetry, reloads.as_ref(), &mut ticket),
            );
            tokio::select! {
                _ = answered => {}
                _ = evicted.cancelled() => {}
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    telemetry: &Telemetry,
    reloads: Option<&ReloadRequests>,
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
    route(&mut stream, &head, telemetry, reloads).await
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

async fn route(
    stream: &mut TcpStream,
    head: &[u8],
    telemetry: &Telemetry,
    reloads: Option<&ReloadRequests>,
) -> std::io::Result<()> {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    if let (b"POST", b"/-/reload", Some(reloads)) = (method, path, reloads) {
        return reload(stream, reloads).await;
    }
    let with_body = method != b"HEAD";
    if method != b"GET" && method != b"HEAD" {
        return respond(stream, 405, "text/plain", "only GET and HEAD\n", with_body).await;
    }
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

async fn reload(stream: &mut TcpStream, reloads: &ReloadRequests) -> std::io::Result<()> {
    let outcome = tokio::time::timeout(RELOAD_TIMEOUT, reloads.reload(Trigger::Endpoint)).await;
    let Ok(Some(outcome)) = outcome else {
        let body = "{\"ok\":false,\"error\":\"not serving yet\"}\n";
        return respond(stream, 503, "application/json", body, true).await;
    };
    let status = if outcome.ok { 200 } else { 422 };
    let body = serde_json::to_string(&outcome).unwrap_or_default() + "\n";
    respond(stream, status, "application/json", &body, true).await
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
        422 => "Unprocessable Content",
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
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, write)
        .await
        .unwrap_or(Ok(()))
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
        tokio::spawn(serve(listener, telemetry.clone(), None));
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
        use crate::telemetry::probe::{ProbeError, probe};
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
