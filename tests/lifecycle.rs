//! The binary as ops run it: `imagegate check`, `imagegate serve` and a graceful drain on
//! SIGTERM.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_imagegate");

use support::free_port;

fn write_config(dir: &std::path::Path, port: u16, extra: &str) -> std::path::PathBuf {
    let path = dir.join("gw.yaml");
    let yaml = format!(
        r#"
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {data}
server: {{shutdown_timeout: 20s}}
backends:
  slow: {{kind: sandbox, delay: 1500ms}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: slow}}]}}}}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: k, tenant: t, secret: sk-lifecycle-key}}
{extra}
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_config_and_names_errors_by_path() {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), 1, "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("targets: [{backend: slow}]", "targets: [{backend: x}]");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"models.dall-e-2.route.targets[0].backend: unknown backend "x""#),
        "{stderr}"
    );
}

#[test]
fn hash_key_prints_the_sha256_used_by_secret_sha256() {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"sk-imagegate-demo\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        hex::encode(imagegate::auth::hash_secret("sk-imagegate-demo"))
    );
}

async fn wait_healthy(base: &str) {
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway did not become healthy");
}

#[tokio::test]
async fn sigterm_drains_the_request_in_flight_then_exits_zero() {
    drains_on_sigterm("").await;
}

/// `server.worker_threads: 1` runs the single-threaded scheduler (what one CPU gets by
/// default): requests in flight at once all complete, and the drain works the same.
#[tokio::test]
async fn a_single_threaded_gateway_serves_concurrent_requests_and_drains() {
    drains_on_sigterm("worker_threads: 1").await;
}

/// The binary serving the test config with `server` settings added to its `server:` map;
/// returns once healthy, with its base URL and the folder that holds its config and data.
async fn serve_with(server: &str) -> (tokio::process::Child, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "server: {shutdown_timeout: 20s}",
        &format!("server: {{shutdown_timeout: 20s, {server}}}"),
    );
    std::fs::write(&config, text).unwrap();
    let child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    (child, base, dir)
}

async fn drains_on_sigterm(server: &str) {
    let (mut child, base, _dir) = serve_with(server).await;

    // Eight requests at once, each held 1.5 s by the backend. One client, made before: making
    // eight (each loads its TLS roots) can take longer than the wait below on a busy machine.
    let http = reqwest::Client::new();
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let url = format!("{base}/v1/images/generations");
            let http = http.clone();
            tokio::spawn(async move {
                http.post(url)
                    .bearer_auth("sk-lifecycle-key")
                    .json(&serde_json::json!({"prompt": "slow", "size": "256x256", "response_format": "b64_json"}))
                    .send()
                    .await
            })
        })
        .collect();
    // Let the requests reach the backend, then ask the gateway to stop.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    for slow in requests {
        let resp = slow
            .await
            .unwrap()
            .expect("every request in flight must complete");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["data"][0]["b64_json"].is_string());
    }

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("gateway exits after draining")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        reqwest::get(format!("{base}/healthz")).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn serve_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("sk-lifecycle-key", "\"${NO_SUCH_VAR}\"");
    std::fs::write(&config, text).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("NO_SUCH_VAR")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("keys[0].secret: environment variable NO_SUCH_VAR is not set"));
}

struct Running {
    child: tokio::process::Child,
    base: String,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn spawn_gateway(extra: &str, log_to: Stdio) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, extra);
    let child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(log_to)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    Running {
        child,
        base,
        config,
        _dir: dir,
    }
}

async fn generate_with(base: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/images/generations"))
        .bearer_auth(key)
        .json(&serde_json::json!({"prompt": "x", "size": "256x256", "response_format": "b64_json"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn hup(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

async fn eventually(base: &str, key: &str, status: u16) -> bool {
    for _ in 0..50 {
        if generate_with(base, key).await == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn sighup_reloads_keys_rejects_a_broken_file_and_finishes_requests_in_flight() {
    // The slow backend makes every request take 1.5 s: one is in flight during the reload.
    let gw = spawn_gateway("", Stdio::null()).await;
    let text = std::fs::read_to_string(&gw.config).unwrap().replace(
        "server: {shutdown_timeout: 20s}",
        "server: {shutdown_timeout: 20s, reload_poll: 0s}",
    );
    std::fs::write(&gw.config, &text).unwrap();
    hup(&gw.child);
    assert_eq!(generate_with(&gw.base, "sk-added-by-reload").await, 401);

    let base = gw.base.clone();
    let in_flight = tokio::spawn(async move { generate_with(&base, "sk-lifecycle-key").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let added = format!("{text}\n  - {{id: k2, tenant: t, secret: sk-added-by-reload}}\n");
    std::fs::write(&gw.config, &added).unwrap();
    hup(&gw.child);
    assert!(
        eventually(&gw.base, "sk-added-by-reload", 200).await,
        "the new key works after SIGHUP"
    );
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight during the reload completed"
    );

    std::fs::write(
        &gw.config,
        added.replace("backend: slow", "backend: nowhere"),
    )
    .unwrap();
    hup(&gw.child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        generate_with(&gw.base, "sk-added-by-reload").await,
        200,
        "the old config keeps serving"
    );
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    // The default server.reload_poll (2 s) notices the change; `eventually` waits up to 5 s.
    let gw = spawn_gateway("", Stdio::null()).await;
    let text = std::fs::read_to_string(&gw.config).unwrap();
    assert_eq!(generate_with(&gw.base, "sk-watched-file").await, 401);
    std::fs::write(
        &gw.config,
        format!("{text}\n  - {{id: k3, tenant: t, secret: sk-watched-file}}\n"),
    )
    .unwrap();
    assert!(
        eventually(&gw.base, "sk-watched-file", 200).await,
        "the edited file was not picked up"
    );
}

#[tokio::test]
async fn the_access_log_line_carries_the_request_id_and_no_secret() {
    let mut gw = spawn_gateway("log: {format: json}", Stdio::piped()).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.base))
        .bearer_auth("sk-lifecycle-key")
        .header("x-request-id", "trace-abc-123")
        .json(&serde_json::json!({"prompt": "x", "size": "256x256"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(generate_with(&gw.base, "sk-wrong-secret").await, 401);
    let pid = gw.child.id().unwrap().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = gw.child.wait_with_output_owned().await;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let access = lines
        .iter()
        .find(|l| l["request_id"] == "trace-abc-123")
        .expect("an access line with the request id");
    assert_eq!(access["status"], 200);
    assert_eq!(access["key_id"], "k");
    assert_eq!(access["tenant"], "t");
    assert_eq!(access["model"], "dall-e-2");
    assert_eq!(access["backend"], "slow");
    assert!(
        access["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "latency_ms is a number"
    );
    assert!(
        !out.contains("sk-lifecycle-key"),
        "a secret reached the log"
    );
    assert!(
        !out.contains("sk-wrong-secret"),
        "a presented secret reached the log"
    );
}

trait WaitOwned {
    async fn wait_with_output_owned(&mut self) -> String;
}

impl WaitOwned for tokio::process::Child {
    async fn wait_with_output_owned(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = String::new();
        if let Some(mut stdout) = self.stdout.take() {
            stdout.read_to_string(&mut out).await.unwrap();
        }
        self.wait().await.unwrap();
        out
    }
}

fn write_cert(dir: &std::path::Path) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.pem()
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_serves_https_and_picks_up_a_renewed_certificate_on_reload() {
    let certs = tempfile::tempdir().unwrap();
    let first = write_cert(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tls = format!(
        "tls: {{cert: {}, key: {}}}",
        certs.path().join("cert.pem").display(),
        certs.path().join("key.pem").display()
    );
    let config = write_config(dir.path(), port, &tls);
    let child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("https://localhost:{port}/v1/models");
    let client = https_client(&first);
    let mut up = false;
    for _ in 0..100 {
        if client
            .get(&url)
            .bearer_auth("sk-lifecycle-key")
            .send()
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "no HTTPS answer");
    let resp = client
        .get(&url)
        .bearer_auth("sk-lifecycle-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        reqwest::get(format!("http://localhost:{port}/healthz"))
            .await
            .is_err(),
        "plain HTTP is not served"
    );

    // Renew the certificate and reload: new connections get the new one.
    let second = write_cert(certs.path());
    hup(&child);
    let renewed = https_client(&second);
    let mut switched = false;
    for _ in 0..50 {
        if renewed
            .get(&url)
            .bearer_auth("sk-lifecycle-key")
            .send()
            .await
            .is_ok()
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the renewed certificate was not picked up");
    assert!(
        https_client(&first).get(&url).send().await.is_err(),
        "the old certificate is gone"
    );
}

mod support;

#[tokio::test]
async fn traceparent_reaches_the_upstream_and_spans_are_exported_over_otlp() {
    use support::{b64, tiny_png, FakeUpstream, Reply};
    let upstream = FakeUpstream::start(|_| {
        Reply::json(
            200,
            serde_json::json!({"created": 1, "data": [{"b64_json": b64(&tiny_png(2, 2))}]}),
        )
    })
    .await;
    let collector = FakeUpstream::start(|_| Reply::json(200, serde_json::json!({}))).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {data}
log: {{format: json, otlp_endpoint: "{collector}"}}
backends:
  up: {{kind: openai, base_url: "{up}/v1"}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: up}}]}}}}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: k, tenant: t, secret: sk-lifecycle-key}}
"#,
            data = dir.path().join("data").display(),
            collector = collector.base_url(),
            up = upstream.base_url()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/images/generations"))
        .bearer_auth("sk-lifecycle-key")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"prompt": "x", "response_format": "b64_json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = upstream.requests()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(parts[1], trace, "the client's trace continues upstream");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the upstream call is a span of its own"
    );

    // Stopping flushes the exporter.
    let pid = child.id().unwrap().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    child.wait().await.unwrap();
    let exports: Vec<_> = collector
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/v1/traces")
        .collect();
    assert!(!exports.is_empty(), "no spans exported");
    assert_eq!(exports[0].headers["content-type"], "application/x-protobuf");
    let trace_bytes = hex::decode(trace).unwrap();
    assert!(
        exports
            .iter()
            .any(|e| e.raw.windows(16).any(|w| w == trace_bytes.as_slice())),
        "the exported spans carry the client's trace id"
    );
}

#[tokio::test]
async fn cli_bootstraps_tenants_and_keys_before_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&[
        "tenants",
        "add",
        "acme",
        "--models",
        "dall-e-2",
        "--rpm",
        "30",
        "--label",
        "plan=gold",
    ]);
    let created: serde_json::Value =
        serde_json::from_str(cli(&["keys", "create", "--tenant", "acme", "--name", "ci"]).trim())
            .unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-ig-"));
    let listed = cli(&["keys", "list", "--tenant", "acme"]);
    assert!(
        listed.contains(&id) && !listed.contains(&secret[secret.len() - 40..]),
        "{listed}"
    );
    let tenants = cli(&["tenants", "list"]);
    assert!(tenants.contains("\"plan\":\"gold\""), "{tenants}");

    let child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    assert_eq!(generate_with(&base, &secret).await, 200);
    let rotated: serde_json::Value =
        serde_json::from_str(cli(&["keys", "rotate", &id]).trim()).unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert!(
        eventually(&base, &secret, 401).await,
        "the rotated-out secret stops working"
    );
    assert_eq!(generate_with(&base, &new_secret).await, 200);
    cli(&["keys", "revoke", &id]);
    assert!(
        eventually(&base, &new_secret, 401).await,
        "revocation reaches the running server"
    );
    drop(child);
}

/// Descriptors open in process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Ten thousand connections that never send a byte, against the binary as ops run it: it
/// raises its own open-file limit, accepts and holds all of them, serves a real request
/// meanwhile, and closes every one after `server.header_timeout`, giving the descriptors back.
/// (The test raises its own limit for its ends; the gateway's RSS while holding them is
/// printed, not asserted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_are_held_then_closed() {
    const N: usize = 10_000;
    let (limit, _) = imagegate::server::raise_open_file_limit().unwrap();
    assert!(
        limit as usize > N + 500,
        "this test needs an open-file hard limit over {} (ulimit -Hn is {limit})",
        N + 500
    );
    let (mut child, base, _dir) = serve_with("header_timeout: 10s").await;
    let pid = child.id().unwrap();
    let port = base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let before = open_fds(pid);

    let mut idle = Vec::with_capacity(N);
    while idle.len() < N {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect {}: {e}", idle.len()),
        }
    }
    // Every one accepted (not left in the listen queue): the gateway holds a descriptor each.
    let mut held = 0;
    for _ in 0..100 {
        held = open_fds(pid);
        if held >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held >= N, "gateway holds {held} descriptors");
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    eprintln!("gateway holding {N} idle connections: {held} descriptors, RSS {rss_kib} KiB");
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/models"))
        .bearer_auth("sk-lifecycle-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let closed = futures_util::future::join_all(idle.iter_mut().map(|s| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }))
    .await;
    assert_eq!(closed.iter().filter(|c| **c).count(), N);
    drop(idle);
    let mut after = usize::MAX;
    for _ in 0..50 {
        after = open_fds(pid);
        if after <= before + 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        after <= before + 10,
        "{after} descriptors left (had {before})"
    );
    let _ = child.kill().await;
}
