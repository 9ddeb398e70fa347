//! Crash safety of the usage ledger: load on the real binary, `kill -9` in the middle,
//! restart, and every request the clients saw succeed is in the ledger exactly once, with the
//! budget's spent amount equal to the ledger's sum (the settlement and the row commit
//! together).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const ADMIN: &str = "adm-crash-secret";
const KEY: &str = "sk-crash-key";

async fn start(file: &std::path::Path, port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["serve", "--config"])
        .arg(file)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if let Ok(r) = client()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return child;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_success_the_client_saw_survives_kill_9_exactly_once() {
    let png = tiny_png(8, 8);
    let fake = FakeUpstream::start(move |_| {
        Reply::json(
            200,
            json!({"created": 1, "data": [{"b64_json": b64(&png)}]}),
        )
        .delay(Duration::from_millis(5))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        format!(
            r#"
listen: 127.0.0.1:{port}
data_dir: {data}
log: {{level: error}}
admin: {{listen: "127.0.0.1:{admin_port}", tokens_sha256: [{admin}]}}
backends:
  up: {{kind: openai, base_url: "{up}/v1", api_key: sk-upstream}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: up}}]}}}}
tenants:
  crash: {{models: ["*"], limits: {{budget: {{micro_usd: 1000000000, period: total}}}}}}
keys:
  - {{id: crash-key, tenant: crash, secret: {KEY}}}
"#,
            data = dir.path().join("data").display(),
            admin = hex::encode(imagegate::auth::hash_secret(ADMIN)),
            up = fake.base_url(),
        ),
    )
    .unwrap();

    let mut gateway = start(&file, port).await;
    let seen_ok: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..16 {
        let (seen_ok, stop) = (seen_ok.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let http = client();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let id = format!("c{c}-{i}");
                let sent = http
                    .post(format!("http://127.0.0.1:{port}/v1/images/generations"))
                    .bearer_auth(KEY)
                    .header("x-request-id", &id)
                    .json(
                        &json!({"model": "dall-e-2", "prompt": "p", "size": "256x256",
                                  "response_format": "b64_json"}),
                    )
                    .send()
                    .await;
                let Ok(resp) = sent else { continue };
                if resp.status() != 200 {
                    continue;
                }
                // Success is a whole answer, read to its end.
                if let Ok(body) = resp.json::<Value>().await {
                    if body["data"][0]["b64_json"].is_string() {
                        seen_ok.lock().unwrap().push(id);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.start_kill().unwrap(); // SIGKILL
    gateway.wait().await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let seen: Vec<String> = seen_ok.lock().unwrap().clone();
    assert!(seen.len() > 50, "load ran: {} successes", seen.len());

    let _restarted = start(&file, port).await;
    let rows: Value = client()
        .get(format!(
            "http://127.0.0.1:{admin_port}/admin/v1/usage?tenant=crash&limit=100000"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = rows["data"].as_array().unwrap();
    let mut by_id: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in rows {
        by_id
            .entry(r["request_id"].as_str().unwrap())
            .or_default()
            .push(r);
    }
    let mut missing = Vec::new();
    for id in &seen {
        match by_id.get(id.as_str()) {
            Some(found) => {
                assert_eq!(found.len(), 1, "{id} is in the ledger once");
                assert_eq!(found[0]["status"], 200);
            }
            None => missing.push(id.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "successes missing from the ledger: {missing:?}"
    );
    let ids: HashSet<&str> = by_id.keys().copied().collect();
    assert_eq!(
        ids.len(),
        by_id.values().map(|v| v.len()).sum::<usize>(),
        "no duplicates"
    );

    // The budget was settled in the same transactions as the rows.
    let db = imagegate::store::Database::sqlite(&dir.path().join("data"))
        .await
        .unwrap();
    let (spent, held) = imagegate::metering::budget::sql_spent(&db, "tenant:crash", "total")
        .await
        .unwrap();
    let ledger_sum: u64 = rows
        .iter()
        .map(|r| r["cost_micro_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(spent, ledger_sum);
    assert_eq!(
        held, 0,
        "holds of requests killed in flight were given back at restart"
    );
    eprintln!(
        "{} successes seen, {} ledger rows, {} micro-dollars",
        seen.len(),
        rows.len(),
        spent
    );
}
