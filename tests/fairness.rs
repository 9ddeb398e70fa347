//! Fair sharing of a scarce pool: tenants served by weight at one node, a flooding tenant not
//! holding back another, hopeless requests shed at once with `retry-after`, and route
//! overrides by tenant label moved by a hot reload.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn one_node(delay_ms: u64, timeout: &str, extra_tenants: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
backends:
  node: {{kind: sandbox, delay: {delay_ms}ms, max_concurrency: 1, max_queue: 200, queue_timeout: 60s}}
models:
  sd: {{rules: dall-e-2, price: free, timeout: {timeout}, route: {{targets: [{{backend: node}}]}}}}
tenants:
  flood: {{models: ["*"]}}
  calm: {{models: ["*"]}}
{extra_tenants}
keys:
  - {{id: flood, tenant: flood, secret: sk-flood-tenant}}
  - {{id: calm, tenant: calm, secret: sk-calm-tenant}}
"#
    )
}

async fn gen(gw: &Gateway, key: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = gw
        .generate_as(
            key,
            json!({"model": "sd", "prompt": "p", "size": "256x256", "response_format": "b64_json"}),
        )
        .await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

/// Tenant `flood` queues 20 jobs on a one-job node; `calm`'s single request is served after at
/// most the job running and one of flood's (round robin), not after all 20 (FIFO).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_tenant_does_not_hold_back_another() {
    let gw = std::sync::Arc::new(Gateway::start(&one_node(100, "60s", "")).await);
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (gw, done) = (gw.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let (status, _, _) = gen(&gw, "sk-flood-tenant").await;
            assert_eq!(status, 200);
            done.lock().unwrap().push("flood");
        }));
    }
    // Let the flood queue up behind the first job.
    for _ in 0..200 {
        let ready: Value = client()
            .get(gw.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["backends"]["node"]["queue_depth"]
            .as_u64()
            .unwrap_or(0)
            >= 15
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, _) = gen(&gw, "sk-calm-tenant").await;
    assert_eq!(status, 200);
    done.lock().unwrap().push("calm");
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    let before = order.iter().position(|t| *t == "calm").unwrap();
    assert!(
        before <= 3,
        "calm finished after {before} of flood's jobs: {order:?}"
    );
}

/// With a one-job node at 500 ms a job and a 2 s deadline, requests that cannot start in time
/// get 503 `backend_busy` with a `retry-after` at once, and none waits to a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hopeless_requests_are_shed_at_once_not_timed_out() {
    let gw = std::sync::Arc::new(Gateway::start(&one_node(500, "2s", "")).await);
    // One job teaches the node's job time.
    assert_eq!(gen(&gw, "sk-calm-tenant").await.0, 200);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * i)).await;
            gen(&gw, "sk-flood-tenant").await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        if status == 503 {
            assert_eq!(body["error"]["code"], "backend_busy", "{body}");
            let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(after >= 1, "{after}");
        }
        statuses.push(status);
    }
    assert!(!statuses.contains(&504), "{statuses:?}");
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let shed = statuses.iter().filter(|s| **s == 503).count();
    assert!((2..=4).contains(&ok), "{statuses:?}");
    assert_eq!(ok + shed, 10, "{statuses:?}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("imagegate_queue_shed_total{backend=\"node\""),
        "{metrics}"
    );
}

fn override_config(port: u16, admin: u16, dir: &std::path::Path, gold_plan: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}}}
data_dir: {data}
server: {{reload_poll: 100ms}}
backends:
  pool: {{kind: sandbox}}
  premium: {{kind: sandbox}}
models:
  sd:
    rules: dall-e-2
    route:
      targets: [{{backend: pool}}]
      overrides:
        - labels: {{plan: gold}}
          targets: [{{backend: premium}}]
tenants:
  acme: {{models: ["*"], labels: {{plan: {gold_plan}}}}}
  other: {{models: ["*"], labels: {{plan: free}}}}
keys:
  - {{id: acme, tenant: acme, secret: sk-acme-tenant}}
  - {{id: other, tenant: other, secret: sk-other-tenant}}
"#,
        data = dir.join("data").display()
    )
}

async fn attempts(admin: u16, backend: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("imagegate_upstream_attempts_total")
                && l.contains(&format!("backend=\"{backend}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn post(port: u16, key: &str) -> u16 {
    match client()
        .post(format!("http://127.0.0.1:{port}/v1/images/generations"))
        .bearer_auth(key)
        .json(&json!({"model": "sd", "prompt": "p", "size": "256x256"}))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// `plan: gold` goes to the premium target, others to the pool; relabelling the tenant in
/// gateway.yaml moves its traffic without a restart.
#[tokio::test]
async fn overrides_follow_tenant_labels_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("gw.yaml");
    std::fs::write(&config, override_config(port, admin, dir.path(), "gold")).unwrap();
    let mut child = serve_binary(&config);
    for _ in 0..200 {
        if post(port, "sk-acme-tenant").await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post(port, "sk-other-tenant").await, 200);
    assert_eq!(
        (
            attempts(admin, "premium").await,
            attempts(admin, "pool").await
        ),
        (1.0, 1.0)
    );

    std::fs::write(&config, override_config(port, admin, dir.path(), "free")).unwrap();
    let mut moved = false;
    for _ in 0..100 {
        let before = attempts(admin, "pool").await;
        assert_eq!(post(port, "sk-acme-tenant").await, 200);
        if attempts(admin, "pool").await > before {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        moved,
        "acme's traffic did not move to the pool after the reload"
    );
    child.kill().await.unwrap();
}
