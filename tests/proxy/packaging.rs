//! What ships beside the binary: `redcloak certs dev` output that a real
//! redis-server and redcloak accept, `redcloak password`, `redcloak health`.

use crate::support::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

/// The lines between `# --- NAME` and `# --- end NAME ---` in `text`.
fn block<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.starts_with(&format!("# --- {name}")))
        .skip(1)
        .take_while(|l| !l.starts_with("# --- end"))
        .collect()
}

/// A redis-server child started from a config file, killed when dropped.
struct RedisProcess(std::process::Child);

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_dev_writes_a_set_that_redis_server_and_redcloak_accept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let out_arg = out.to_str().expect("path");
    let (code, printed, _) = run_redcloak(&["certs", "dev", "--out", out_arg]);
    assert_eq!(code, 0, "{printed}");
    for (file, mode) in [
        ("ca.crt", 0o644),
        ("redis.crt", 0o644),
        ("redis.key", 0o600),
        ("redcloak-client.crt", 0o644),
        ("redcloak-client.key", 0o600),
        ("redcloak.crt", 0o644),
        ("redcloak.key", 0o600),
    ] {
        let meta = std::fs::metadata(out.join(file)).expect(file);
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    // Existing files are never replaced without --force.
    let ca = std::fs::read(out.join("ca.crt")).expect("ca");
    let (code, _, error) = run_redcloak(&["certs", "dev", "--out", out_arg]);
    assert_eq!(code, 1);
    assert!(error.contains("pass --force"), "{error}");
    assert_eq!(std::fs::read(out.join("ca.crt")).expect("ca"), ca);
    assert_eq!(
        run_redcloak(&["certs", "dev", "--out", out_arg, "--if-missing"]).0,
        0
    );
    assert_eq!(std::fs::read(out.join("ca.crt")).expect("ca"), ca);
    // A partial set is never completed silently.
    let kept_key = std::fs::read(out.join("redis.key")).expect("key");
    std::fs::remove_file(out.join("redcloak.key")).expect("remove");
    let (code, _, error) = run_redcloak(&["certs", "dev", "--out", out_arg, "--if-missing"]);
    assert_eq!(code, 1, "{error}");
    assert_eq!(std::fs::read(out.join("redis.key")).expect("key"), kept_key);
    let (code, printed, _) = run_redcloak(&["certs", "dev", "--out", out_arg, "--force"]);
    assert_eq!(code, 0);
    assert_ne!(std::fs::read(out.join("ca.crt")).expect("ca"), ca);

    // redis-server with the printed lines, on a free port, with a password.
    let (password_code, password, _) = run_redcloak(&["password"]);
    assert_eq!(password_code, 0);
    let password = password.trim().to_owned();
    let redis_port = free_port();
    let mut redis_conf: Vec<String> = block(&printed, "redis.conf")
        .iter()
        .map(|line| {
            line.replace("tls-port 6379", &format!("tls-port {redis_port}"))
                .replace("REDIS_PASSWORD", &password)
        })
        .collect();
    redis_conf.extend([
        "bind 127.0.0.1".into(),
        "save \"\"".into(),
        format!("dir {}", dir.path().display()),
    ]);
    let conf = dir.path().join("redis.conf");
    std::fs::write(&conf, redis_conf.join("\n")).expect("redis.conf");
    let _redis = RedisProcess(
        Command::new("redis-server")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_listening(redis_port).await;

    // redcloak with the printed lines.
    let password_file = dir.path().join("redis-password");
    redcloak::dev::write_file(&password_file, password.as_bytes(), 0o600).expect("password");
    let key = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&dir.path().join("key-1"), key.as_bytes(), 0o600).expect("key");
    let (port, tls_port) = (free_port(), free_port());
    let upstream_and_tls = block(&printed, "redcloak.toml")
        .join("\n")
        .replace("\"localhost:6379\"", &format!("\"localhost:{redis_port}\""))
        .replace(
            "/path/to/redis-password",
            password_file.to_str().expect("path"),
        )
        .replace("127.0.0.1:6390", &format!("127.0.0.1:{tls_port}"));
    let config = format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\n\n{upstream_and_tls}\n\n\
         [encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n"
    );
    std::fs::write(dir.path().join("redcloak.toml"), config).expect("config");
    let mut child = Command::new(redcloak_bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("redcloak.toml"))
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    wait_listening(port).await;
    let mut client = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    );
    assert_reply(
        &client.call(&[b"SET", b"greeting", b"hello"]).await,
        b"+OK\r\n",
    );
    // The TLS listener, verified with the printed CA.
    let ca_path = out.join("ca.crt");
    let output = Command::new("redis-cli")
        .args(["--tls", "--cacert", ca_path.to_str().expect("path")])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &tls_port.to_string(),
            "get",
            "greeting",
        ])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n");
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn password_prints_64_random_hex_characters() {
    let (code, first, _) = run_redcloak(&["password"]);
    assert_eq!(code, 0);
    let first = first.trim();
    assert_eq!(first.len(), 64);
    assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(run_redcloak(&["password"]).1.trim(), first);
}

#[tokio::test]
async fn health_exits_0_only_when_the_url_answers_200() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(
            &redis
                .config()
                .tail("[metrics]\naddress = \"127.0.0.1:0\"\n"),
        )
        .await;
    let admin = proxy.admin.expect("admin");
    // The proxy runs in this runtime: the blocking child runs off it.
    let health =
        |url: String| tokio::task::spawn_blocking(move || run_redcloak(&["health", "--url", &url]));
    assert_eq!(
        health(format!("http://{admin}/readyz"))
            .await
            .expect("run")
            .0,
        0
    );
    assert_eq!(
        health(format!("http://{admin}/healthz"))
            .await
            .expect("run")
            .0,
        0
    );
    let (code, _, error) = health(format!("http://{admin}/nothing"))
        .await
        .expect("run");
    assert_eq!(code, 1);
    assert!(error.contains("answered 404"), "{error}");
    let nowhere = format!("http://127.0.0.1:{}/readyz", free_port());
    let (code, _, error) = health(nowhere).await.expect("run");
    assert_eq!(code, 1);
    assert!(error.contains("cannot reach"), "{error}");
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_documents(path: &str) -> Vec<yaml_rust2::Yaml> {
    yaml_rust2::YamlLoader::load_from_str(&repo_file(path))
        .unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// Loads a shipped redcloak config with its absolute paths moved into `dir`,
/// where the secret files it names are made (passwords and data keys).
fn load_shipped_config(
    text: &str,
    dir: &std::path::Path,
) -> Result<redcloak::config::Config, redcloak::config::ConfigError> {
    let root = format!("{}/", dir.display());
    let moved = text.replace("\"/", &format!("\"{root}"));
    for line in moved.lines() {
        let line = line.trim();
        let Some(value) = ["password_file = ", "file = "]
            .iter()
            .find_map(|key| line.strip_prefix(key))
        else {
            continue;
        };
        let path = std::path::PathBuf::from(value.split('"').nth(1).expect("quoted path"));
        let path = if path.is_absolute() {
            path
        } else {
            dir.join(path)
        };
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let contents = if line.starts_with("file") {
            redcloak::crypto::keyring::generate_key().to_string()
        } else {
            redcloak::dev::random_password().expect("password")
        };
        redcloak::dev::write_file(&path, contents.as_bytes(), 0o600).expect("secret");
    }
    let file = dir.join("shipped.toml");
    std::fs::write(&file, moved).expect("write");
    redcloak::config::load(&file)
}

#[test]
fn the_example_configs_for_development_and_production_load() {
    for (path, profile) in [
        (
            "config/development.toml",
            redcloak::config::Profile::Development,
        ),
        (
            "config/production.toml",
            redcloak::config::Profile::Production,
        ),
        (
            "deploy/systemd/redcloak.toml",
            redcloak::config::Profile::Production,
        ),
        (
            "deploy/compose/redcloak.toml",
            redcloak::config::Profile::Development,
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = load_shipped_config(&repo_file(path), dir.path())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(config.profile, profile, "{path}");
        assert!(config.metrics_address.is_some(), "{path} serves /readyz");
    }
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_non_root_with_a_healthcheck() {
    let dockerfile = repo_file("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.starts_with(' '))
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let runtime = &instructions[stages[1]..];
    assert!(
        runtime[0].contains("distroless"),
        "no shell at runtime: {}",
        runtime[0]
    );
    assert!(
        !runtime.iter().any(|l| l.starts_with("RUN ")),
        "the runtime stage runs nothing"
    );
    assert!(runtime.contains(&"USER 65532:65532"));
    let expose = runtime
        .iter()
        .find(|l| l.starts_with("EXPOSE"))
        .expect("EXPOSE");
    for port in ["6380", "9187"] {
        assert!(expose.contains(port), "{expose}");
    }
    assert!(
        dockerfile.contains(
            r#"CMD ["/usr/local/bin/redcloak", "health", "--url", "http://127.0.0.1:9187/readyz"]"#
        ),
        "HEALTHCHECK through redcloak itself"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/redcloak\"]"))
    );
    assert!(repo_file(".dockerignore").contains("target/"));
}

#[test]
fn the_kubernetes_sidecar_has_probes_a_locked_down_context_and_secret_volumes() {
    let documents = yaml_documents("deploy/kubernetes/redcloak-sidecar.yaml");
    let of_kind = |kind: &str| {
        documents
            .iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind}"))
            .clone()
    };
    let deployment = of_kind("Deployment");
    let pod = &deployment["spec"]["template"];
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9187"));
    let spec = &pod["spec"];
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    let containers = spec["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 2, "the app and its sidecar");
    for container in containers {
        let context = &container["securityContext"];
        assert_eq!(context["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(context["allowPrivilegeEscalation"].as_bool(), Some(false));
        let dropped = context["capabilities"]["drop"].as_vec().expect("drop");
        assert_eq!(dropped[0].as_str(), Some("ALL"));
    }
    let redcloak = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("redcloak"))
        .expect("redcloak container");
    assert_eq!(
        redcloak["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        redcloak["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    let volumes = spec["volumes"].as_vec().expect("volumes");
    for secret in ["redcloak-certs", "redcloak-secrets"] {
        let volume = volumes
            .iter()
            .find(|v| v["secret"]["secretName"].as_str() == Some(secret))
            .unwrap_or_else(|| panic!("no Secret volume {secret}"));
        assert_eq!(volume["secret"]["defaultMode"].as_i64(), Some(0o400));
    }
    // The embedded config loads, and listens for the app on loopback only.
    let config_map = of_kind("ConfigMap");
    let toml = config_map["data"]["redcloak.toml"]
        .as_str()
        .expect("redcloak.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = load_shipped_config(toml, dir.path()).expect("the ConfigMap's config loads");
    assert!(config.listen.tcp.expect("tcp").ip().is_loopback());
    assert_eq!(config.metrics_address.map(|a| a.port()), Some(9187));
}

#[test]
fn the_systemd_unit_verifies_is_hardened_and_does_not_restart_on_exit_78() {
    let unit = repo_file("deploy/systemd/redcloak.service");
    for line in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    assert!(
        unit.lines()
            .any(|l| l.starts_with("LoadCredential=redis-password:"))
    );
    // systemd's own checks, with ExecStart pointing at this build.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("redcloak.service");
    std::fs::write(
        &file,
        unit.replace("/usr/local/bin/redcloak", redcloak_bin()),
    )
    .expect("write");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&file)
        .output()
        .expect("systemd-analyze runs: install it with `apt-get install -y systemd`");
    let said = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    // Exposure runs from 0 (locked down) to 10; the threshold counts tenths:
    // 20 is 2.0, the top of what systemd calls "OK" (this unit: 1.1).
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&file)
        .output()
        .expect("systemd-analyze security");
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "{report}");
}

/// A shell command from docker-compose.yml, run here: compose's `$$` is `$`,
/// and the container paths are folders of `dir`.
fn compose_shell(script: &str, dir: &std::path::Path, redis_port: u16) -> String {
    let root = dir.display().to_string();
    // The container's /tmp first: `root` itself may lie under /tmp.
    script
        .replace("$$", "$")
        .replace("/tmp", &format!("{root}/tmp"))
        .replace("/run/secrets/", &format!("{root}/secrets/"))
        .replace("/certs/", &format!("{root}/certs/"))
        .replace("-p 6379", &format!("-p {redis_port}"))
        .replace("--tls-port 6379", &format!("--tls-port {redis_port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_services_fit_together_and_run_without_docker() {
    let compose = &yaml_documents("docker-compose.yml")[0];
    let services = &compose["services"];
    for name in ["certs", "redis", "redcloak", "app", "prometheus"] {
        assert!(!services[name].is_badvalue(), "service {name}");
    }
    // Redis: TLS only, on an internal network, never published.
    assert_eq!(
        compose["networks"]["redis"]["internal"].as_bool(),
        Some(true)
    );
    assert!(
        services["redis"]["ports"].is_badvalue(),
        "Redis publishes no port"
    );
    let on = |service: &str| -> Vec<String> {
        services[service]["networks"]
            .as_vec()
            .map(|n| {
                n.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(on("redis"), ["redis"]);
    assert_eq!(on("redcloak"), ["redis", "app"]);
    assert_eq!(on("prometheus"), ["app"]);
    assert_eq!(
        services["app"]["network_mode"].as_str(),
        Some("service:redcloak")
    );
    for secret in ["redis_password", "redcloak_key_1"] {
        let file = compose["secrets"][secret]["file"]
            .as_str()
            .expect("secret file");
        assert!(file.starts_with("./secrets/"), "{file}");
    }
    let prometheus_config = "deploy/prometheus/prometheus-compose.yml";
    let (checked, output) = promtool(&["check", "config", prometheus_config], "");
    assert!(checked, "{output}");

    // The services' own commands, run here in dependency order.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    for folder in ["secrets", "tmp"] {
        std::fs::create_dir(root.join(folder)).expect("mkdir");
    }
    let password = redcloak::dev::random_password().expect("password");
    redcloak::dev::write_file(
        &root.join("secrets/redis_password"),
        password.as_bytes(),
        0o600,
    )
    .expect("password");
    let key = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&root.join("secrets/redcloak_key_1"), key.as_bytes(), 0o600)
        .expect("key");
    let args = |service: &str| -> Vec<String> {
        services[service]["command"]
            .as_vec()
            .expect("command list")
            .iter()
            .map(|a| a.as_str().expect("string").to_owned())
            .collect()
    };
    let certs_args: Vec<String> = args("certs")
        .iter()
        .map(|a| a.replace("/certs", &format!("{}/certs", root.display())))
        .collect();
    let certs = Command::new(redcloak_bin())
        .args(&certs_args)
        .output()
        .expect("certs");
    assert!(
        certs.status.success(),
        "{}",
        String::from_utf8_lossy(&certs.stderr)
    );

    let redis_port = free_port();
    let redis_script = compose_shell(&args("redis")[0], root, redis_port);
    let _redis = RedisProcess(
        Command::new("sh")
            .args(["-c", &redis_script])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis"),
    );
    wait_listening(redis_port).await;
    let healthcheck = services["redis"]["healthcheck"]["test"]
        .as_vec()
        .expect("test");
    assert_eq!(healthcheck[0].as_str(), Some("CMD-SHELL"));
    let probe = compose_shell(healthcheck[1].as_str().expect("script"), root, redis_port);
    let healthy = Command::new("sh")
        .args(["-c", &probe])
        .status()
        .expect("healthcheck");
    assert!(healthy.success(), "the Redis healthcheck passes: {probe}");

    let (port, metrics_port) = (free_port(), free_port());
    let config = repo_file("deploy/compose/redcloak.toml")
        .replace("\"redis:6379\"", &format!("\"127.0.0.1:{redis_port}\""))
        .replace("127.0.0.1:6380", &format!("127.0.0.1:{port}"))
        .replace("0.0.0.0:9187", &format!("127.0.0.1:{metrics_port}"))
        .replace("\"/run/secrets/", &format!("\"{}/secrets/", root.display()))
        .replace("\"/certs/", &format!("\"{}/certs/", root.display()));
    std::fs::write(root.join("redcloak.toml"), config).expect("config");
    let mut redcloak = Command::new(redcloak_bin())
        .args(["serve", "--config"])
        .arg(root.join("redcloak.toml"))
        .stderr(Stdio::null())
        .spawn()
        .expect("redcloak");
    wait_listening(port).await;
    // The image's HEALTHCHECK command.
    let health = Command::new(redcloak_bin())
        .args([
            "health",
            "--url",
            &format!("http://127.0.0.1:{metrics_port}/readyz"),
        ])
        .status()
        .expect("health");
    assert!(health.success());

    // One round of the example app's loop.
    let app = args("app")[0]
        .replace("$$", "$")
        .replace("-p 6380", &format!("-p {port}"))
        .replace("sleep 5", "exit 0");
    let output = Command::new("sh").args(["-c", &app]).output().expect("app");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "OK\ntoken-for-user-1\n"
    );
    // Redis holds the envelope, not the token.
    let stored = Command::new("sh")
        .args([
            "-c",
            &compose_shell(
                "REDISCLI_AUTH=\"$$(cat /run/secrets/redis_password)\" redis-cli --tls \
                 --cacert /certs/ca.crt --cert /certs/redcloak-client.crt --key /certs/redcloak-client.key \
                 -h localhost -p 6379 --user redcloak --no-raw get session:1",
                root,
                redis_port,
            ),
        ])
        .output()
        .expect("redis-cli");
    let stored = String::from_utf8_lossy(&stored.stdout);
    assert!(stored.starts_with("\"\\xc7\\n"), "an envelope: {stored}");
    assert!(!stored.contains("token-for-user-1"), "{stored}");
    signal(&redcloak, "-TERM");
    assert_eq!(wait_exit(&mut redcloak), 0);
}

/// What redcloak does with a command, for docs/commands.md.
fn support_of(row: &redcloak::policy::table::Row) -> String {
    use redcloak::policy::table::{Class, Handling, Kind, Scripting};
    let support: String = match row.class {
        Class::Connection(Handling::Auth) => {
            "answered by redcloak (`[listen.auth]`); never forwarded".into()
        }
        Class::Connection(Handling::Hello) => {
            "forwarded without its AUTH, which redcloak checks".into()
        }
        Class::Connection(Handling::Quit) => {
            "answered by redcloak after every earlier reply".into()
        }
        Class::Connection(Handling::Reset) => {
            "forwarded; redcloak logs the upstream connection in again".into()
        }
        Class::Connection(Handling::Client) => "forwarded; `CLIENT REPLY OFF/SKIP` refused".into(),
        Class::Connection(Handling::Exec) => "forwarded; values in its replies opened".into(),
        Class::Connection(Handling::Subscribe(_) | Handling::Unsubscribe(_)) => {
            "forwarded; messages on encrypted channels opened as they come (refused inside MULTI)".into()
        }
        Class::Connection(_) => "forwarded".into(),
        Class::Forward => "forwarded: no stored value crosses".into(),
        Class::Sealed(sealed) => {
            let what = match sealed.kind {
                Kind::String => "string values",
                Kind::HashField => "hash field values",
                Kind::ListElement => "list elements",
                Kind::StreamValue => "stream field values",
                Kind::Message => "messages",
                Kind::SetMember => "set members (deterministic envelope)",
                Kind::SortedSetMember => "sorted-set and geo members (deterministic envelope; scores and coordinates plaintext)",
                Kind::HyperLogLogElement => "HyperLogLog elements",
            };
            match sealed.equality {
                _ if sealed.kind == Kind::HyperLogLogElement => {
                    "**elements sent as keyed tokens (HMAC), never in clear**; counts work".into()
                }
                true => format!(
                    "**{what} sealed**; Redis compares them, so only on `members = \"deterministic\"` rules"
                ),
                false => format!("**{what} sealed on the way in, opened on the way out**"),
            }
        }
        Class::ServerReadsValue => "plaintext keys only: Redis must read the value".into(),
        Class::OrdersValues => {
            "plaintext keys only: Redis orders members by their bytes, which means nothing for envelopes".into()
        }
        Class::Sort => "plaintext keys only; BY and GET refused".into(),
        Class::Scripting(Scripting::Eval | Scripting::FCall) => {
            "plaintext keys only; the script must be proved to touch only its declared keys".into()
        }
        Class::Scripting(Scripting::EvalSha) => {
            "plaintext keys only; `NOSCRIPT` until redcloak has proved the body (EVAL, SCRIPT LOAD)".into()
        }
        Class::Scripting(Scripting::Script | Scripting::Function) => {
            "LOAD proves the body first; DEBUG refused; FLUSH and RESTORE only when no key is encrypted".into()
        }
        Class::Refuse(reason) => format!("refused: {}", reason.split(';').next().unwrap_or(reason)),
    };
    let mut notes = Vec::new();
    if row.moves_values {
        notes.push(
            "moves values: every key's rule must share the first key's binding (`bind = \"rule\"`)",
        );
    }
    if row.blocks.is_some() {
        notes.push("blocks");
    }
    match notes.is_empty() {
        true => support,
        false => format!("{support}; {}", notes.join("; ")),
    }
}

#[test]
fn the_command_support_table_in_docs_matches_the_command_table() {
    let mut text = String::from(
        "# Command support\n\n\
         Generated from `src/policy/table.rs` (the one table of commands) by the test\n\
         `the_command_support_table_in_docs_matches_the_command_table`; regenerate with\n\
         `UPDATE_DOCS=1 cargo test --test proxy the_command_support_table`.\n\n\
         Every command Redis 7.0 lists has a row. A command with no row is refused\n\
         (`encryption.unknown_commands = \"refuse\"`, the default). \"Plaintext keys\" are\n\
         keys an `[[encryption.rules]]` rule with `mode = \"plaintext\"` matches.\n\n\
         | command | what redcloak does |\n|---|---|\n",
    );
    for row in redcloak::policy::table::COMMANDS {
        text.push_str(&format!(
            "| `{}` | {} |\n",
            row.name.to_ascii_uppercase(),
            support_of(row)
        ));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/commands.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &text).expect("write docs/commands.md");
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == text,
        "docs/commands.md is out of date: UPDATE_DOCS=1 cargo test --test proxy the_command_support_table"
    );
}

#[test]
fn the_readme_config_table_names_every_key_of_the_example_config() {
    let readme = repo_file("README.md");
    let mut section = String::new();
    let mut checked = 0;
    for line in repo_file("config/redcloak.example.toml").lines() {
        let line = line.trim().trim_start_matches("# ").trim();
        if line.starts_with("[[") {
            section.clear(); // arrays of tables have no variables
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            section = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" = ")
            && !key.contains(' ')
            && !section.is_empty()
        {
            let variable = format!("REDCLOAK_{}__{}", section, key)
                .to_ascii_uppercase()
                .replace('.', "__");
            assert!(
                readme.contains(&format!("`{variable}`")),
                "README lacks {variable}"
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} keys found");
}
