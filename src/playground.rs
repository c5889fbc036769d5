//! `redcloak dev`: redcloak in front of a throwaway TLS-only Redis, in one
//! command. Certificates, a random Redis password and a config file are
//! written to a temporary folder; a child redis-server serves TLS only with
//! client-certificate auth; redcloak listens on loopback. Ctrl-C stops both
//! and removes the folder. The password is never printed, only its file.
//! At start it writes one value through itself and prints what Redis
//! stores for it: the envelope, not the value.

use crate::config;
use crate::dev::{self, ChildRedis, DevError, RedisOptions};
use crate::resp;
use crate::server::{Server, StartError};
use crate::telemetry::Telemetry;
use crate::upstream::{Upstream, call};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum PlaygroundError {
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error("cannot make a temporary folder: {0}")]
    TempDir(std::io::Error),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
}

const REDIS_USER: &str = "redcloak";

pub async fn run(
    listen: SocketAddr,
    metrics: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), PlaygroundError> {
    let dir = tempfile::Builder::new()
        .prefix("redcloak-dev-")
        .tempdir()
        .map_err(PlaygroundError::TempDir)?;
    let path = dir.path();
    let certs = dev::write_dev_certs(path, &["localhost", "127.0.0.1"])?;
    let password = dev::random_password()?;
    let password_file = path.join("redis-password");
    dev::write_file(&password_file, password.as_bytes(), 0o600)?;
    let key = crate::crypto::keyring::generate_key();
    dev::write_file(&path.join("key-1"), key.as_bytes(), 0o600)?;
    let options = RedisOptions {
        username: REDIS_USER.into(),
        password,
        acl: "~* &* +@all -@admin -@dangerous".into(),
        default_user_off: true,
        tls_auth_clients: "yes",
        extra: Vec::new(),
    };
    let redis = ChildRedis::start(path, &certs, &options).await?;
    let config_file = path.join("redcloak.toml");
    let mut config_text = format!(
        "[listen]\naddress = \"{listen}\"\n\n[upstream]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         ca = \"ca.crt\"\ncert = \"redcloak-client.crt\"\nkey = \"redcloak-client.key\"\n\
         username = \"{REDIS_USER}\"\npassword_file = \"redis-password\"\n\n\
         [encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n",
        port = redis.port()
    );
    // Metrics are a bonus here: a busy port only means running without them.
    let telemetry = Telemetry::default();
    let admin = match tokio::net::TcpListener::bind(metrics).await {
        Ok(listener) => {
            // The address it got (port 0 picks one).
            let bound = listener.local_addr().unwrap_or(metrics);
            tokio::spawn(crate::admin::serve(listener, telemetry.clone(), None));
            config_text.push_str(&format!("\n[metrics]\naddress = \"{bound}\"\n"));
            format!("http://{bound}/metrics (and /healthz, /readyz)")
        }
        Err(err) => format!("none ({metrics}: {err}; pass --metrics IP:PORT)"),
    };
    dev::write_file(&config_file, config_text.as_bytes(), 0o644)?;
    let loaded = config::load(&config_file)?;
    let upstream = Upstream::from_config(&loaded.upstream).map_err(StartError::from)?;
    let server = Server::bind(loaded, telemetry).await?;
    let address = server.tcp_address().unwrap_or(listen);
    let serving = tokio::spawn(server.run(shutdown));
    let demo = match show_envelope(address, &upstream).await {
        Ok(stored) => format!(
            "  redcloak just wrote {DEMO_KEY} = \"{DEMO_VALUE}\" through itself. Redis holds:\n\
             \x20   {stored}\n"
        ),
        Err(err) => format!("  (the demonstration write failed: {err})\n"),
    };
    println!(
        "redcloak dev: serving on {address}, in front of a throwaway TLS-only redis-server on 127.0.0.1:{port}\n\
         \n{demo}\
         \n  try it:      redis-cli -h {ip} -p {client_port} set greeting hello\n\
         \x20              redis-cli -h {ip} -p {client_port} get greeting\n\
         \n  Redis itself (mutual TLS + AUTH):\n\
         \x20              REDISCLI_AUTH=\"$(cat {pw})\" redis-cli --tls --cacert {ca} --cert {cert} --key {key} \\\n\
         \x20                -h 127.0.0.1 -p {port} --user {REDIS_USER} get greeting\n\
         \n  Redis holds only the encrypted envelope; redcloak opens it for its clients.\n\
         \x20 Metrics: {admin}\n\
         \x20 Config: {config}\n  Ctrl-C stops both and removes {dir}",
        port = redis.port(),
        ip = address.ip(),
        client_port = address.port(),
        pw = password_file.display(),
        ca = certs.ca.display(),
        cert = certs.client_cert.display(),
        key = certs.client_key.display(),
        config = config_file.display(),
        dir = path.display(),
    );
    let _ = serving.await;
    drop(redis);
    Ok(())
}

const DEMO_KEY: &str = "redcloak:demo";
const DEMO_VALUE: &str = "hello from redcloak";

/// Writes the demonstration value through the proxy at `proxy`, then reads
/// what Redis itself stores for it (redis-cli's escaped form, shortened).
async fn show_envelope(proxy: SocketAddr, upstream: &Upstream) -> Result<String, String> {
    let timeout = upstream.settings().connect_timeout;
    let mut client = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| e.to_string())?;
    let set: [&[u8]; 3] = [b"SET", DEMO_KEY.as_bytes(), DEMO_VALUE.as_bytes()];
    let reply = call(&mut client, &set, timeout).await?;
    if &reply[..] != b"+OK\r\n" {
        return Err(String::from_utf8_lossy(&reply).trim().to_owned());
    }
    let mut direct = upstream.connect().await.map_err(|e| e.to_string())?;
    let reply = call(&mut direct, &[b"GET", DEMO_KEY.as_bytes()], timeout).await?;
    let stored = resp::bulk_body(&reply).ok_or("no value stored")?;
    let mut escaped = String::new();
    for byte in stored {
        if escaped.len() > 60 {
            escaped.push_str("...");
            break;
        }
        escaped.extend(std::ascii::escape_default(*byte).map(char::from));
    }
    Ok(format!(
        "\"{escaped}\" ({} bytes: an envelope, not the value)",
        stored.len()
    ))
}
