//! Batches survive their gateway: killed with SIGKILL mid-batch and restarted, the batch
//! completes with every line once in the output and charged once in the ledger.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_imagegate");
const KEY: &str = "sk-batch-crash";
const ADMIN: &str = "batch-admin-token";

fn config(port: u16, admin: u16, dir: &std::path::Path) -> String {
    format!(
        r#"
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}, tokens_sha256: [{token}]}}
data_dir: {data}
log: {{level: warn}}
backends:
  slow: {{kind: sandbox, delay: 400ms}}
models:
  dall-e-2: {{rules: dall-e-2, timeout: 2s, route: {{targets: [{{backend: slow}}]}}}}
tenants:
  t: {{models: ["*"], limits: {{budget: {{micro_usd: 10000000, period: total}}}}}}
keys:
  - {{id: k, tenant: t, secret: {KEY}}}
"#,
        data = dir.join("data").display(),
        token = hex::encode(imagegate::auth::hash_secret(ADMIN)),
    )
}

fn spawn(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn get(url: String) -> Option<Value> {
    let r = client().get(url).bearer_auth(KEY).send().await.ok()?;
    r.json().await.ok()
}

#[tokio::test]
async fn a_batch_killed_mid_way_completes_after_a_restart_each_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, config(port, admin, dir.path())).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut gw = spawn(&path);
    for _ in 0..200 {
        if client().get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines: Vec<String> = (0..40)
        .map(|i| {
            json!({"custom_id": format!("c-{i}"), "method": "POST", "url": "/v1/images/generations",
                   "body": {"model": "dall-e-2", "prompt": "p", "size": "256x256", "response_format": "b64_json"}})
            .to_string()
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(lines.join("\n").into_bytes()).file_name("in.jsonl"),
        );
    let file: Value = client()
        .post(format!("{base}/v1/files"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch: Value = client()
        .post(format!("{base}/v1/batches"))
        .bearer_auth(KEY)
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/images/generations", "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = batch["id"].as_str().unwrap().to_string();
    // Kill it with some lines done and some in flight.
    for _ in 0..200 {
        let b = get(format!("{base}/v1/batches/{id}")).await.unwrap();
        if b["request_counts"]["completed"].as_i64().unwrap() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.start_kill().unwrap();
    gw.wait().await.unwrap();

    let _gw = spawn(&path);
    let mut done = Value::Null;
    for _ in 0..1200 {
        if let Some(b) = get(format!("{base}/v1/batches/{id}")).await {
            if b["status"] == "completed" {
                done = b;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 40, "completed": 40, "failed": 0})
    );
    let out = client()
        .get(format!(
            "{base}/v1/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("c-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every line once in the output");
    // Every line charged exactly once: 40 ledger rows, 40 x $0.016.
    let usage: Value = client()
        .get(format!(
            "http://127.0.0.1:{admin}/admin/v1/usage?tenant=t&limit=1000"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = usage["data"].as_array().unwrap();
    let charged: Vec<&Value> = rows.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(charged.len(), 40, "{usage}");
    let total: u64 = charged
        .iter()
        .map(|r| r["cost_micro_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 40 * 16_000);
}
