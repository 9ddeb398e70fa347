//! The binary as ops run it: `imagegate check`, `imagegate serve` and a graceful drain on
//! SIGTERM.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_imagegate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;

    let url = format!("{base}/v1/images/generations");
    let slow = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth("sk-lifecycle-key")
            .json(&serde_json::json!({"prompt": "slow", "size": "256x256", "response_format": "b64_json"}))
            .send()
            .await
    });
    // Let the request reach the backend, then ask the gateway to stop.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    let resp = slow
        .await
        .unwrap()
        .expect("the request in flight must complete");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["data"][0]["b64_json"].is_string());

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
