//! Batches survive their gateway: killed with SIGKILL mid-batch and restarted, the batch
//! completes with every line once in the output and charged once in the ledger.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const KEY: &str = "sk-batch-crash";
const ADMIN: &str = "batch-admin-token";

fn config(port: u16, admin: u16, dir: &std::path::Path) -> String {
    config_with(port, admin, dir, "{}", "t")
}

fn config_with(port: u16, admin: u16, dir: &std::path::Path, state: &str, tenant: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}, tokens_sha256: [{token}]}}
data_dir: {data}
state: {state}
log: {{level: warn}}
backends:
  slow: {{kind: sandbox, delay: 400ms}}
models:
  dall-e-2: {{rules: dall-e-2, timeout: 2s, route: {{targets: [{{backend: slow}}]}}}}
tenants:
  {tenant}: {{models: ["*"], limits: {{budget: {{micro_usd: 10000000, period: total}}}}}}
keys:
  - {{id: k-{tenant}, tenant: {tenant}, secret: {KEY}}}
"#,
        data = dir.join("data").display(),
        token = hex::encode(imagegate::auth::hash_secret(ADMIN)),
    )
}

async fn get(url: String) -> Option<Value> {
    let r = client().get(url).bearer_auth(KEY).send().await.ok()?;
    r.json().await.ok()
}

/// Uploads `n` lines and creates their batch; its id.
async fn submit(base: &str, n: usize) -> String {
    let lines: Vec<String> = (0..n)
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
    batch["id"].as_str().unwrap().to_string()
}

async fn wait_until(base: &str, id: &str, done: impl Fn(&Value) -> bool, tries: usize) -> Value {
    let mut last = Value::Null;
    for _ in 0..tries {
        if let Some(b) = get(format!("{base}/v1/batches/{id}")).await {
            if done(&b) {
                return b;
            }
            last = b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("batch {id} never got there: {last}");
}

/// Every line once in the output file, and charged once in the ledger.
async fn exactly_once(base: &str, admin: u16, tenant: &str, done: &Value, n: usize) {
    assert_eq!(
        done["request_counts"],
        json!({"total": n, "completed": n, "failed": 0})
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
    let mut want: Vec<String> = (0..n).map(|i| format!("c-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every line once in the output");
    let usage: Value = client()
        .get(format!(
            "http://127.0.0.1:{admin}/admin/v1/usage?tenant={tenant}&limit=1000"
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
    assert_eq!(charged.len(), n, "{usage}");
    let total: u64 = charged
        .iter()
        .map(|r| r["cost_micro_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total,
        n as u64 * 16_000,
        "dall-e-2 256x256 is $0.016 a line"
    );
}

#[tokio::test]
async fn a_batch_killed_mid_way_completes_after_a_restart_each_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, config(port, admin, dir.path())).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut gw = serve_binary(&path);
    wait_healthy(&base).await;
    let id = submit(&base, 40).await;
    // Killed with some lines done and some in flight.
    wait_until(
        &base,
        &id,
        |b| b["request_counts"]["completed"].as_i64().unwrap() >= 8,
        200,
    )
    .await;
    gw.start_kill().unwrap();
    gw.wait().await.unwrap();

    let _gw = serve_binary(&path);
    let done = wait_until(&base, &id, |b| b["status"] == "completed", 1200).await;
    exactly_once(&base, admin, "t", &done, 40).await;
}

/// Two replicas on one PostgreSQL share a batch's lines by lease; one is killed mid-batch and
/// the other finishes it, every line once.
#[tokio::test]
async fn two_replicas_on_postgres_share_a_batch_and_survive_one_dying() {
    let Some(pg) = pg_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tenant = unique("bt");
    let state = format!("{{store: postgres, postgres: \"{pg}\"}}");
    let (pa, aa, pb, ab) = (free_port(), free_port(), free_port(), free_port());
    let (ca, cb) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    // One data_dir: the replicas share the batch files (S3 does this across machines).
    std::fs::write(&ca, config_with(pa, aa, dir.path(), &state, &tenant)).unwrap();
    std::fs::write(&cb, config_with(pb, ab, dir.path(), &state, &tenant)).unwrap();
    let (base_a, base_b) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
    );
    let mut a = serve_binary(&ca);
    let _b = serve_binary(&cb);
    wait_healthy(&base_a).await;
    wait_healthy(&base_b).await;
    let id = submit(&base_a, 40).await;
    wait_until(
        &base_b,
        &id,
        |b| b["request_counts"]["completed"].as_i64().unwrap() >= 8,
        200,
    )
    .await;
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    let done = wait_until(&base_b, &id, |b| b["status"] == "completed", 1200).await;
    exactly_once(&base_b, ab, &tenant, &done, 40).await;
}

/// A tenant's batch lines are limited apart from its interactive requests: a batch larger
/// than the interactive allowance completes, and leaves that allowance untouched.
#[tokio::test]
async fn batch_lines_do_not_take_the_interactive_allowance() {
    let gw = Gateway::start(&format!(
        r#"
listen: 127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
backends:
  sandbox: {{kind: sandbox}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
tenants:
  t: {{models: ["*"], limits: {{requests_per_minute: 2, burst: 2, batch: {{requests_per_minute: 600}}}}}}
keys:
  - {{id: k, tenant: t, secret: {KEY}}}
"#
    ))
    .await;
    let base = gw.url("");
    let id = submit(&base, 6).await;
    let done = wait_until(&base, &id, |b| b["status"] == "completed", 300).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 6, "failed": 0})
    );
    for _ in 0..2 {
        let resp = gw
            .generate_as(KEY, json!({"prompt": "p", "size": "256x256"}))
            .await;
        assert_eq!(resp.status(), 200, "the interactive allowance is whole");
    }
    assert_eq!(
        gw.generate_as(KEY, json!({"prompt": "p"})).await.status(),
        429
    );
}

/// A webhook endpoint on a loopback or private address, or over plain HTTP, is refused when
/// registered unless the config allows it.
#[tokio::test]
async fn webhooks_to_private_addresses_are_refused_unless_allowed() {
    let token = hex::encode(imagegate::auth::hash_secret(ADMIN));
    let yaml = |webhooks: &str| {
        format!(
            r#"
listen: 127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
admin: {{tokens_sha256: [{token}]}}
{webhooks}
backends:
  sandbox: {{kind: sandbox}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: k, tenant: t, secret: {KEY}}}
"#
        )
    };
    let add = |gw: &Gateway, url: &str| {
        client()
            .post(format!("{}/admin/v1/tenants/t/webhooks", gw.admin_base))
            .bearer_auth(ADMIN)
            .json(&json!({"url": url}))
            .send()
    };
    let strict = Gateway::start(&yaml("")).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.7/hook",
        "https://[::1]/hook",
        "https://169.254.169.254/latest/meta-data",
        "http://hooks.example.com/hook",
    ] {
        let resp = add(&strict, url).await.unwrap();
        assert_eq!(resp.status(), 400, "{url}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["param"], "url", "{url}");
    }
    let ok = add(&strict, "https://hooks.example.com/imagegate")
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let dev = Gateway::start(&yaml(
        "webhooks: {allow_private_hosts: true, allow_http: true}",
    ))
    .await;
    assert_eq!(
        add(&dev, "http://127.0.0.1:9/hook").await.unwrap().status(),
        200
    );
}
