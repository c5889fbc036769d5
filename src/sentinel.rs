//! Redis Sentinel: which Redis is the primary now, and following it when
//! it changes.
//!
//! At start every Sentinel is asked (`SENTINEL GET-MASTER-ADDR-BY-NAME`)
//! and a majority of those configured must name the same address; that
//! Redis is then reached like any upstream (TLS verified against
//! `upstream.server_name`, never against the address Sentinel reported;
//! redcloak's client certificate; AUTH) and must answer `ROLE` as
//! `master`. Sentinels are reached over TLS too, verified against their
//! own name, and logged in as their own ACL user.
//!
//! While running, redcloak listens for `+switch-master` on every Sentinel
//! and asks them all again every [`POLL_EVERY`]. A `+switch-master` is the
//! outcome of a failover a majority of Sentinels authorized, so its new
//! address is taken once `ROLE` confirms it (so writes resume without
//! waiting for the other Sentinels to hear of it); a poll moves only on a
//! majority. Moving retargets the upstream: new connections go to the new
//! primary, the pool's ready connections are replaced, lanes are poisoned
//! (their in-flight requests fail), and sessions on a connection of their
//! own end with an error (see [`crate::upstream::Upstream::switches`]).

use crate::config::SentinelConfig;
use crate::resp::{self, Limits};
use crate::upstream::{Login, Material, ReplyReader, Upstream, UpstreamError, UpstreamSettings};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// How often every Sentinel is asked again, besides `+switch-master`.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// A Sentinel whose connection was lost is reconnected after this.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error(
        "no majority of the {asked} Sentinels named a primary for '{master}' ({needed} must agree): {answers}"
    )]
    NoMajority {
        master: String,
        asked: usize,
        needed: usize,
        answers: String,
    },
    #[error("the primary Sentinel named, {address}, {why}")]
    NotConfirmed { address: String, why: String },
    #[error("Sentinel TLS or login settings: {0}")]
    Settings(#[from] UpstreamError),
}

/// The primary a majority named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub address: String,
    pub agreeing: usize,
    pub asked: usize,
}

/// The configured Sentinels, each reachable over verified TLS.
pub struct Sentinels {
    sentinels: Vec<Upstream>,
    master_name: String,
    timeout: Duration,
}

impl Sentinels {
    pub fn from_config(
        config: &SentinelConfig,
        connect_timeout: Duration,
    ) -> Result<Sentinels, SentinelError> {
        let tls = crate::tls::client::config(&config.ca, &config.cert, &config.key)
            .map_err(UpstreamError::from)?;
        let login = Arc::new(Login {
            username: config.username.clone(),
            password: crate::secret::Secret::new(config.password.expose().to_vec()),
        });
        // One Sentinel's upstream, and the others sharing its material: a
        // reload publishes new material to all at once.
        let first = Upstream::new(
            UpstreamSettings {
                address: config.addresses.first().cloned().unwrap_or_default(),
                server_name: config.server_name.clone(),
                connect_timeout,
            },
            tls,
            login,
        )?;
        let mut sentinels = Vec::with_capacity(config.addresses.len());
        for address in config.addresses.iter().skip(1) {
            sentinels.push(first.node(address.clone(), &config.server_name)?);
        }
        sentinels.insert(0, first);
        Ok(Sentinels {
            sentinels,
            master_name: config.master_name.clone(),
            timeout: connect_timeout,
        })
    }

    /// The TLS configuration and login `config` names for Sentinels (a
    /// reload builds it again).
    pub fn material(config: &SentinelConfig) -> Result<Material, String> {
        let tls = crate::tls::client::config(&config.ca, &config.cert, &config.key)
            .map_err(|e| e.to_string())?;
        let login = Login {
            username: config.username.clone(),
            password: crate::secret::Secret::new(config.password.expose().to_vec()),
        };
        Ok(Material::new(tls, Arc::new(login)))
    }

    /// Proves `material` on a Sentinel (TLS, login, the primary asked for)
    /// before a reload publishes it.
    pub async fn prove(&self, material: &Material) -> Result<(), String> {
        let mut failures = Vec::new();
        for sentinel in &self.sentinels {
            let probe = sentinel.with_material(material.clone());
            match self.ask(&probe).await {
                Ok(_) => return Ok(()),
                Err(why) => failures.push(format!("{}: {why}", sentinel.settings().address)),
            }
        }
        Err(failures.join("; "))
    }

    /// New connections to every Sentinel use `material` from now on.
    pub fn publish(&self, material: Material) {
        if let Some(first) = self.sentinels.first() {
            first.publish(material);
        }
    }

    /// What one Sentinel says the primary is.
    async fn ask(&self, sentinel: &Upstream) -> Result<String, String> {
        let mut stream = sentinel.connect().await.map_err(|e| e.to_string())?;
        let reply = crate::upstream::call(
            &mut stream,
            &[
                b"SENTINEL",
                b"GET-MASTER-ADDR-BY-NAME",
                self.master_name.as_bytes(),
            ],
            self.timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        primary_address(&reply).ok_or_else(|| match reply.first() {
            Some(b'-') => crate::upstream::error_text(&reply),
            _ => format!("knows no primary named '{}'", self.master_name),
        })
    }

    /// The address a majority of the configured Sentinels name (asked all
    /// at once).
    pub async fn agreed(&self) -> Result<Agreement, SentinelError> {
        let answers =
            futures_util::future::join_all(self.sentinels.iter().map(|s| self.ask(s))).await;
        let asked = self.sentinels.len();
        let needed = asked / 2 + 1;
        let mut counts: Vec<(String, usize)> = Vec::new();
        for address in answers.iter().flatten() {
            match counts.iter_mut().find(|(a, _)| a == address) {
                Some((_, n)) => *n += 1,
                None => counts.push((address.clone(), 1)),
            }
        }
        if let Some((address, agreeing)) = counts.into_iter().find(|(_, n)| *n >= needed) {
            return Ok(Agreement {
                address,
                agreeing,
                asked,
            });
        }
        let answers = self
            .sentinels
            .iter()
            .zip(&answers)
            .map(|(sentinel, answer)| match answer {
                Ok(address) => format!("{} named {address}", sentinel.settings().address),
                Err(why) => format!("{}: {why}", sentinel.settings().address),
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(SentinelError::NoMajority {
            master: self.master_name.clone(),
            asked,
            needed,
            answers,
        })
    }

    /// The primary at start: a majority's answer, confirmed by `ROLE`.
    pub async fn primary(&self, upstream: &Upstream) -> Result<Agreement, SentinelError> {
        let agreement = self.agreed().await?;
        confirm(upstream, &agreement.address, self.timeout)
            .await
            .map_err(|why| SentinelError::NotConfirmed {
                address: agreement.address.clone(),
                why,
            })?;
        Ok(agreement)
    }

    /// Follows the primary until `shutdown`: `+switch-master` from any
    /// Sentinel (confirmed by `ROLE`) and a majority every [`POLL_EVERY`].
    /// `switched(old, new)` runs once the upstream is retargeted.
    pub async fn follow<F>(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        switched: F,
        shutdown: CancellationToken,
    ) where
        F: Fn(&str, &str) + Send + Sync,
    {
        let (hints, mut heard) = tokio::sync::mpsc::channel::<String>(16);
        for index in 0..self.sentinels.len() {
            let sentinels = self.clone();
            let hints = hints.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { sentinels.listen(index, hints, shutdown).await });
        }
        drop(hints);
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let candidate = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(address) = heard.recv() => address,
                _ = poll.tick() => match self.agreed().await {
                    Ok(agreement) => agreement.address,
                    Err(err) => {
                        tracing::warn!(error = %err, "Sentinel poll");
                        continue;
                    }
                },
            };
            let current = upstream.address();
            if candidate == current {
                continue;
            }
            match confirm(&upstream, &candidate, self.timeout).await {
                Ok(()) => {
                    upstream.retarget(candidate.clone());
                    tracing::warn!(old = %current, new = %candidate, "Sentinel switched the primary; connections to the old one end");
                    switched(&current, &candidate);
                }
                Err(why) => {
                    tracing::warn!(candidate = %candidate, why = %why, "Sentinel named a primary that is not confirmed; staying");
                }
            }
        }
    }

    /// Listens for `+switch-master` on Sentinel `index`, sending each new
    /// address for this primary to `hints`; reconnects when lost.
    async fn listen(
        &self,
        index: usize,
        hints: tokio::sync::mpsc::Sender<String>,
        shutdown: CancellationToken,
    ) {
        let sentinel = &self.sentinels[index];
        loop {
            let heard = async {
                let mut stream = sentinel.connect().await.map_err(|e| e.to_string())?;
                let mut out = bytes::BytesMut::new();
                resp::encode_command(&mut out, &[&b"SUBSCRIBE"[..], b"+switch-master"]);
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
                stream.flush().await.map_err(|e| e.to_string())?;
                let mut replies = ReplyReader::default();
                loop {
                    let frame = replies
                        .next(&mut stream, &Limits::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    if let Some(address) = switched_to(&frame, &self.master_name) {
                        let _ = hints.send(address).await;
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                lost = heard => {
                    let lost: Result<(), String> = lost;
                    if let Err(why) = lost {
                        tracing::debug!(sentinel = %sentinel.settings().address, why = %why, "Sentinel connection lost");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RECONNECT_AFTER) => {}
            }
        }
    }
}

/// Confirms the Redis at `address` is a primary: reached with `upstream`'s
/// TLS (verified against its `server_name`) and login, `ROLE` says master.
pub async fn confirm(upstream: &Upstream, address: &str, timeout: Duration) -> Result<(), String> {
    let candidate = upstream
        .node(address.to_owned(), &upstream.settings().server_name)
        .map_err(|e| e.to_string())?;
    let mut stream = candidate.connect().await.map_err(|e| e.to_string())?;
    let reply = crate::upstream::call(&mut stream, &[b"ROLE"], timeout)
        .await
        .map_err(|e| e.to_string())?;
    let role = resp::aggregate_elements(&reply, &Limits::default())
        .and_then(|(_, elements)| elements.first().and_then(|e| resp::bulk_body(e)))
        .map(|role| String::from_utf8_lossy(role).into_owned());
    match role.as_deref() {
        Some("master") => Ok(()),
        Some(other) => Err(format!("answers ROLE as {other}, not master")),
        None if reply.starts_with(b"-") => Err(format!(
            "refused ROLE ({}): redcloak's ACL user needs +role",
            crate::upstream::error_text(&reply)
        )),
        None => Err("sent no role".into()),
    }
}

/// `host:port` from `SENTINEL GET-MASTER-ADDR-BY-NAME`'s `[host, port]`.
fn primary_address(reply: &[u8]) -> Option<String> {
    let (_, elements) = resp::aggregate_elements(reply, &Limits::default())?;
    let host = std::str::from_utf8(resp::bulk_body(elements.first()?)?).ok()?;
    let port: u16 = std::str::from_utf8(resp::bulk_body(elements.get(1)?)?)
        .ok()?
        .parse()
        .ok()?;
    Some(crate::cluster::topology::address(host, port))
}

/// The new address in a `+switch-master` message for `master_name`:
/// `<name> <old ip> <old port> <new ip> <new port>`.
fn switched_to(frame: &[u8], master_name: &str) -> Option<String> {
    let (_, elements) = resp::aggregate_elements(frame, &Limits::default())?;
    let kind = resp::bulk_body(elements.first()?)?;
    if kind != b"message" {
        return None;
    }
    let payload = Bytes::copy_from_slice(resp::bulk_body(elements.get(2)?)?);
    let text = std::str::from_utf8(&payload).ok()?;
    let words: Vec<&str> = text.split(' ').collect();
    match words[..] {
        [name, _, _, host, port] if name == master_name => {
            Some(crate::cluster::topology::address(host, port.parse().ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_replies_are_read() {
        assert_eq!(
            primary_address(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n").as_deref(),
            Some("127.0.0.1:6379")
        );
        assert_eq!(primary_address(b"*-1\r\n"), None);
        let message = b"*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$38\r\nmymaster 127.0.0.1 6379 127.0.0.1 6380\r\n";
        assert_eq!(
            switched_to(message, "mymaster").as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(switched_to(message, "other"), None);
        let confirmation = b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n";
        assert_eq!(switched_to(confirmation, "mymaster"), None);
    }
}
