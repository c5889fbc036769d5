//! The `redcloak` binary: parse the command line, set up logs, run, and map
//! the outcome to an exit code (0 ok, 1 runtime failure, 64 usage error,
//! 78 configuration error).

use anyhow::Context;
use clap::Parser;
use redcloak::admin;
use redcloak::checks;
use redcloak::cli::{AuditCommand, CertsCommand, Cli, Command, KeysCommand, ReportFormat};
use redcloak::dev::{self, Existing};
use redcloak::server::{Drained, Server};
use redcloak::telemetry::{Telemetry, probe};
use redcloak::{config, playground, shutdown};
use std::process::ExitCode;

// stdout and stderr may be closed or full: what the user is told must never
// panic the process (println! and eprintln! would).
macro_rules! outln {
    ($($text:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($text)*);
    }};
}
macro_rules! out {
    ($($text:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($text)*);
    }};
}
macro_rules! errln {
    ($($text:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($text)*);
    }};
}
macro_rules! err {
    ($($text:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($text)*);
    }};
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    // Before anything secret is read: no core dump may hold keys or passwords.
    redcloak::secret::forbid_core_dumps();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    redcloak::logs::init(cli.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // One worker per two cores (one to four) unless TOKIO_WORKER_THREADS
    // says otherwise: a sidecar shares its machine with the app and Redis,
    // and wakeups across threads cost more than they bring (docs/performance.md).
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(redcloak::config::default_workers());
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            errln!("redcloak: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    redcloak::telemetry::audit::finish();
    redcloak::logs::flush();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, err)) => {
            errln!("redcloak: {err:#}");
            ExitCode::from(code)
        }
    }
}

async fn run(command: Command) -> Result<(), (u8, anyhow::Error)> {
    // SIGHUP and `POST /-/reload` ask here; `serve` answers (other
    // commands drop the queue, and SIGHUP then says there is nothing to reload).
    let (reloads, reload_queue) = redcloak::reload::channel();
    let shutdown = shutdown::on_signal(reloads.clone()).map_err(|e| (EXIT_RUNTIME, e.into()))?;
    match command {
        Command::Serve { config } => {
            let loaded = config::load(&config)
                .with_context(|| format!("configuration error in {}", config.display()))
                .map_err(|e| (EXIT_CONFIG, e))?;
            // The audit log first: every security event from here on is in it.
            if let Some(audit) = &loaded.audit {
                redcloak::telemetry::audit::start(audit).map_err(|e| (EXIT_CONFIG, e.into()))?;
            }
            if let Some((before, after)) = redcloak::open_files::raise_to_hard_limit() {
                tracing::info!(
                    before,
                    after,
                    "raised the open-file limit to the hard limit"
                );
            }
            // The admin listener opens first, so probes see "starting"
            // (/readyz 503) while the startup checks run.
            let telemetry = Telemetry::default();
            if let Some(address) = loaded.metrics_address {
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on metrics.address {address}"))
                    .map_err(|e| (EXIT_RUNTIME, e))?;
                if let Ok(address) = listener.local_addr() {
                    tracing::info!(listener = "admin", %address, "listening");
                }
                tokio::spawn(admin::serve(
                    listener,
                    telemetry.clone(),
                    Some(reloads.clone()),
                ));
            }
            // The gate runs before any Redis listener opens: a failing
            // upstream is never put in front of a client.
            let report = checks::run(&loaded).await;
            if !report.passed {
                err!("{}", report.text());
                return Err((
                    EXIT_CONFIG,
                    anyhow::anyhow!("refusing to start: the startup security checks failed"),
                ));
            }
            for check in report
                .checks
                .iter()
                .filter(|c| c.status != redcloak::checks::report::Status::Ok)
            {
                tracing::warn!(check = check.name, detail = %check.detail, fix = ?check.fix, "startup check warning");
            }
            let server = Server::bind(loaded, telemetry).await.map_err(|err| {
                let code = if err.is_config() {
                    EXIT_CONFIG
                } else {
                    EXIT_RUNTIME
                };
                (code, anyhow::Error::new(err))
            })?;
            let server = server.with_reloads(config.clone(), reload_queue);
            match server.run(shutdown).await {
                Drained::Clean => Ok(()),
                Drained::Cut(connections) => Err((
                    EXIT_RUNTIME,
                    anyhow::anyhow!(
                        "shutdown.grace_period ran out: {connections} connections were cut with requests in flight"
                    ),
                )),
            }
        }
        Command::Check { config, format } => {
            let loaded = config::load(&config)
                .with_context(|| format!("configuration error in {}", config.display()))
                .map_err(|e| (EXIT_CONFIG, e))?;
            // As `serve` would: the report shows the limit it would run with.
            redcloak::open_files::raise_to_hard_limit();
            let report = checks::run(&loaded).await;
            match format {
                ReportFormat::Text => out!("{}", report.text()),
                ReportFormat::Json => outln!("{}", report.json()),
            }
            if report.passed {
                Ok(())
            } else {
                Err((
                    EXIT_CONFIG,
                    anyhow::anyhow!("startup security checks failed"),
                ))
            }
        }
        Command::Rekey {
            config,
            to_key,
            seal_legacy,
            to_plaintext,
            i_understand: _,
            pattern,
            dry_run,
            verify,
            max_value_bytes,
            checkpoint,
            rate,
            rate_bytes,
            max_latency,
            stop_after,
        } => {
            let loaded = config::load(&config)
                .with_context(|| format!("configuration error in {}", config.display()))
                .map_err(|e| (EXIT_CONFIG, e))?;
            let target = to_key.or(loaded.encryption.keys.primary).unwrap_or(0);
            let options = redcloak::rekey::Options {
                to_key,
                to_plaintext,
                seal_legacy,
                pattern,
                mode: if dry_run || verify {
                    redcloak::rekey::Mode::Census
                } else {
                    redcloak::rekey::Mode::Rewrite
                },
                max_value_bytes,
                checkpoint,
                rate,
                rate_bytes,
                max_latency: max_latency.map(std::time::Duration::from_millis),
                stop_after_keys: stop_after,
            };
            let mut progress = redcloak::rekey::Progress::for_stderr();
            let census = redcloak::rekey::run(loaded, &options, &mut progress)
                .await
                .map_err(|e| (EXIT_RUNTIME, e.into()))?;
            outln!("{}", serde_json::to_string(&census).unwrap_or_default());
            if !census.complete {
                errln!(
                    "stopped part way (--stop-after): run again with the same --checkpoint to go on"
                );
                return Ok(());
            }
            let remaining = if to_plaintext {
                census.remaining_sealed()
            } else {
                census.remaining(target, seal_legacy)
            };
            if verify {
                return if remaining == 0 {
                    Ok(())
                } else {
                    Err((
                        1,
                        anyhow::anyhow!("{remaining} values are not where this run puts them"),
                    ))
                };
            }
            if !dry_run && to_plaintext {
                errln!(
                    "to reverse: redcloak rekey --config {} --seal-legacy",
                    config.display()
                );
            } else if !dry_run {
                let previous = census
                    .by_key_id
                    .iter()
                    .filter(|(id, _)| **id != target)
                    .max_by_key(|(_, n)| **n)
                    .map(|(id, _)| *id);
                if let Some(previous) = previous {
                    errln!(
                        "to reverse: {}",
                        redcloak::rekey::reverse_command(&config, previous, &options)
                    );
                }
            }
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Retire { config, id },
        } => {
            let loaded = config::load(&config)
                .with_context(|| format!("configuration error in {}", config.display()))
                .map_err(|e| (EXIT_CONFIG, e))?;
            if loaded.encryption.keys.primary == Some(id) {
                return Err((
                    1,
                    anyhow::anyhow!("key {id} is the primary: make another key primary first"),
                ));
            }
            let keys = load_keys(&config)?;
            let options = redcloak::rekey::Options {
                to_key: None,
                to_plaintext: false,
                seal_legacy: false,
                pattern: None,
                mode: redcloak::rekey::Mode::Census,
                max_value_bytes: usize::MAX,
                checkpoint: None,
                rate: None,
                rate_bytes: None,
                max_latency: None,
                stop_after_keys: None,
            };
            let mut progress = redcloak::rekey::Progress::for_stderr();
            let census = redcloak::rekey::run(loaded, &options, &mut progress)
                .await
                .map_err(|e| (EXIT_RUNTIME, e.into()))?;
            outln!("{}", serde_json::to_string(&census).unwrap_or_default());
            let in_streams = census
                .stream_values_by_key_id
                .get(&id)
                .copied()
                .unwrap_or(0);
            if in_streams > 0 {
                return Err((
                    1,
                    anyhow::anyhow!(
                        "{in_streams} stream entry values are sealed under key {id}: Redis never \
                         changes a stream entry, so rekey leaves them; trim them \
                         (XTRIM key MINID id) once consumers are done with them"
                    ),
                ));
            }
            let under = census.under(id);
            if under > 0 {
                return Err((
                    1,
                    anyhow::anyhow!(
                        "{under} values are sealed under key {id}: run `redcloak rekey` first"
                    ),
                ));
            }
            if keys
                .kms
                .as_ref()
                .is_some_and(|kms| kms.file.get(id).is_some())
            {
                redcloak::kms::manage::retire(&keys, id).map_err(|e| (1, e.into()))?;
                errln!(
                    "no value is sealed under key {id}: it is retired in the keyring file; reload every proxy"
                );
            } else {
                errln!(
                    "no value is sealed under key {id}: remove its [[encryption.keys]] entry and its file, then reload"
                );
            }
            Ok(())
        }
        Command::Keys { command } => keys_command(command).await,
        Command::Audit {
            command:
                AuditCommand::Verify {
                    key_file,
                    checkpoint,
                    files,
                },
        } => {
            use redcloak::telemetry::audit;
            let key = audit::read_key(&key_file).map_err(|e| (EXIT_CONFIG, e.into()))?;
            let checkpoints = checkpoint
                .iter()
                .map(|text| {
                    audit::parse_checkpoint(text).ok_or_else(|| {
                        (
                            EXIT_USAGE,
                            anyhow::anyhow!("--checkpoint {text}: expected SEGMENT:SEQ:MAC"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut texts = Vec::new();
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))
                    .map_err(|e| (1, e))?;
                texts.push((file.display().to_string(), text));
            }
            match audit::verify(&key[..], &texts, &checkpoints) {
                Ok(verified) => {
                    outln!(
                        "ok: {} entries in {} segments, every MAC and link checked",
                        verified.lines,
                        verified.segments
                    );
                    Ok(())
                }
                Err(first_bad) => Err((1, anyhow::anyhow!("{first_bad}"))),
            }
        }
        Command::Keygen => {
            let key = redcloak::crypto::keyring::generate_key();
            outln!("{}", key.as_str());
            errln!(
                "Store this key where only redcloak can read it, e.g. a file with mode 0600:\n\
                 \x20 redcloak keygen > /run/secrets/redcloak-key-2 && chmod 600 /run/secrets/redcloak-key-2\n\
                 then list it in the config of every proxy (it opens values at once):\n\
                 \x20 [[encryption.keys]]\n  id = 2\n  file = \"/run/secrets/redcloak-key-2\"\n\
                 and, once every proxy has it, make it the one that seals: [encryption] primary = 2.\n\
                 Instead of a file, `env = \"REDCLOAK_KEY_2\"` reads it from that variable."
            );
            Ok(())
        }
        Command::Dev { listen, metrics } => playground::run(listen, metrics, shutdown)
            .await
            .map_err(|e| (EXIT_RUNTIME, e.into())),
        Command::Certs {
            command:
                CertsCommand::Dev {
                    out,
                    hosts,
                    proxy_hosts,
                    force,
                    if_missing,
                },
        } => {
            let existing = match (force, if_missing) {
                (true, _) => Existing::Replace,
                (false, true) => Existing::KeepComplete,
                (false, false) => Existing::Refuse,
            };
            let redis_names: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let proxy_names: Vec<&str> = proxy_hosts.iter().map(String::as_str).collect();
            let written = dev::write_dev_set(&out, &redis_names, &proxy_names, existing)
                .map_err(|e| (EXIT_RUNTIME, e.into()))?;
            let Some(_) = written else {
                errln!(
                    "redcloak: {} already holds a complete set; kept it",
                    out.display()
                );
                return Ok(());
            };
            let absolute = std::path::absolute(&out).unwrap_or(out);
            let certs = dev::DevCerts::in_dir(&absolute);
            let redis_host = hosts.first().map_or("localhost", String::as_str);
            outln!(
                "Wrote a development CA and certificates to {}:",
                absolute.display()
            );
            outln!(
                "  ca.crt                                 the CA (trust it; its key is not kept)"
            );
            outln!(
                "  redis.crt, redis.key                   Redis's server certificate for {}",
                hosts.join(", ")
            );
            outln!(
                "  redcloak-client.crt, redcloak-client.key  redcloak's client certificate for Redis"
            );
            outln!(
                "  redcloak.crt, redcloak.key             redcloak's TLS listener, for {}",
                proxy_hosts.join(", ")
            );
            outln!();
            out!("{}", dev::usage_text(&certs, redis_host));
            Ok(())
        }
        Command::Password => {
            let password = dev::random_password().map_err(|e| (EXIT_RUNTIME, e.into()))?;
            outln!("{password}");
            Ok(())
        }
        Command::Health { url, timeout } => {
            match probe::probe(&url, std::time::Duration::from_secs(timeout)).await {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err((
                    EXIT_RUNTIME,
                    anyhow::anyhow!("{url} answered {status}: {}", body.trim()),
                )),
                Err(err) => Err((EXIT_RUNTIME, err.into())),
            }
        }
    }
}

/// The key sources of the configuration at `path` (exit 78 when it does
/// not load).
fn load_keys(path: &std::path::Path) -> Result<redcloak::kms::KeySources, (u8, anyhow::Error)> {
    config::load(path)
        .with_context(|| format!("configuration error in {}", path.display()))
        .map(|config| config.encryption.keys)
        .map_err(|e| (EXIT_CONFIG, e))
}

/// `redcloak keys new|promote|list|verify|import|rewrap`.
async fn keys_command(command: KeysCommand) -> Result<(), (u8, anyhow::Error)> {
    use redcloak::kms::manage;
    let failed = |e: manage::ManageError| (1u8, anyhow::Error::from(e));
    match command {
        KeysCommand::Retire { .. } => unreachable!("handled with the census"),
        KeysCommand::New { config, kms, id } => {
            let keys = load_keys(&config)?;
            let id = manage::new_key(&keys, &kms, id).await.map_err(failed)?;
            outln!("{id}");
            errln!(
                "key {id} added as pending (it opens values, never seals): reload every proxy, \
                 then `redcloak keys promote --config {} --id {id}` and reload again",
                config.display()
            );
            Ok(())
        }
        KeysCommand::Promote { config, id } => {
            let keys = load_keys(&config)?;
            manage::promote(&keys, id).await.map_err(failed)?;
            errln!(
                "key {id} is active: reload every proxy; then `redcloak rekey --config {}` reseals what Redis holds",
                config.display()
            );
            Ok(())
        }
        KeysCommand::List { config, format } => {
            let loaded = config::load(&config)
                .with_context(|| format!("configuration error in {}", config.display()))
                .map_err(|e| (EXIT_CONFIG, e))?;
            let statuses = manage::statuses(&loaded.encryption.keys).await;
            // Use counts from the running proxy, when it exports them.
            let scraped = match loaded.metrics_address {
                Some(address) => {
                    let url = format!("http://{address}/metrics");
                    probe::probe(&url, std::time::Duration::from_secs(2))
                        .await
                        .ok()
                        .map(|(_, body)| body)
                }
                None => None,
            };
            let count = |metric: &str, id: u32| -> Option<u64> {
                let wanted = format!("{metric}{{key_id=\"{id}\"}} ");
                scraped
                    .as_deref()?
                    .lines()
                    .find_map(|line| line.strip_prefix(&wanted)?.trim().parse::<f64>().ok())
                    .map(|v| v as u64)
            };
            match format {
                ReportFormat::Json => {
                    let rows: Vec<serde_json::Value> = statuses
                        .iter()
                        .map(|s| {
                            let mut row = serde_json::to_value(s).unwrap_or_default();
                            row["sealed"] = count("redcloak_values_sealed_total", s.id).into();
                            row["opened"] = count("redcloak_values_opened_total", s.id).into();
                            row
                        })
                        .collect();
                    outln!("{}", serde_json::Value::from(rows));
                }
                ReportFormat::Text => {
                    outln!(
                        "{:<6} {:<13} {:<12} {:<6} {:>10} {:>10}",
                        "id",
                        "state",
                        "kms",
                        "check",
                        "sealed",
                        "opened"
                    );
                    for s in &statuses {
                        let shown = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
                        outln!(
                            "{:<6} {:<13} {:<12} {:<6} {:>10} {:>10}",
                            s.id,
                            s.state,
                            s.kms,
                            if s.check_passed { "ok" } else { "FAILED" },
                            shown(count("redcloak_values_sealed_total", s.id)),
                            shown(count("redcloak_values_opened_total", s.id))
                        );
                        if let Some(error) = &s.error {
                            outln!("       {error}");
                        }
                    }
                }
            }
            Ok(())
        }
        KeysCommand::Verify { config } => {
            let keys = load_keys(&config)?;
            manage::kms(&keys).map_err(failed)?;
            let statuses = manage::statuses(&keys).await;
            let mut bad = 0;
            for s in statuses.iter().filter(|s| s.kms != "raw") {
                match &s.error {
                    None => outln!(
                        "key {} ({}, {}): unwrapped, check value matches",
                        s.id,
                        s.state,
                        s.kms
                    ),
                    Some(error) if s.state == "destroyed" => outln!("key {}: {error}", s.id),
                    Some(error) => {
                        bad += 1;
                        outln!("key {} ({}, {}): FAILED: {error}", s.id, s.state, s.kms);
                    }
                }
            }
            if bad > 0 {
                return Err((1, anyhow::anyhow!("{bad} keys failed to unwrap or check")));
            }
            Ok(())
        }
        KeysCommand::Import {
            config,
            id,
            from_file,
            kms,
        } => {
            let keys = load_keys(&config)?;
            let text = zeroize::Zeroizing::new(
                std::fs::read(&from_file)
                    .with_context(|| format!("cannot read {}", from_file.display()))
                    .map_err(|e| (1, e))?,
            );
            manage::import(&keys, id, &text, &kms)
                .await
                .map_err(failed)?;
            errln!(
                "key {id} is in the keyring file, wrapped by '{kms}' (decrypt-only): remove its \
                 [[encryption.keys]] entry from the configuration (and, if it was the primary, \
                 `primary`, then run `redcloak keys promote --id {id}`), reload, and delete {}",
                from_file.display()
            );
            Ok(())
        }
        KeysCommand::Rewrap { config, to_kms } => {
            let keys = load_keys(&config)?;
            let count = manage::rewrap(&keys, &to_kms).await.map_err(failed)?;
            errln!(
                "{count} keys wrapped by '{to_kms}' (each checked); reload every proxy. Raw keys now in \
                 the keyring file: remove their [[encryption.keys]] entries and files once every proxy \
                 has reloaded"
            );
            Ok(())
        }
    }
}
