//! Pools of targets: failover, never retrying the upstream's own 4xx, the deadline, passive
//! health (ejection, half-open, doubling cool-down), throttling, tiers, balancing, /readyz.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

fn ok_reply() -> Reply {
    Reply::json(
        200,
        json!({"created": 1, "data": [{"b64_json": b64(&tiny_png(2, 2))}]}),
    )
}

/// `backends`: (name, base_url, extra yaml for the backend). `route`: YAML of the route.
fn config(backends: &[(&str, String, &str)], route: &str, timeout: &str) -> String {
    let backends: String = backends
        .iter()
        .map(|(name, url, extra)| {
            let timeout = if extra.contains("timeout") {
                ""
            } else {
                ", timeout: 10s"
            };
            format!("  {name}: {{kind: openai, base_url: \"{url}/v1\"{timeout}{extra}}}\n")
        })
        .collect();
    let models = format!("  pool: {{rules: dall-e-2, timeout: {timeout}, route: {route}}}");
    sandbox_config(&backends, &models)
}

async fn generate(gw: &Gateway) -> reqwest::Response {
    gw.generate(
        json!({"model": "pool", "prompt": "p", "size": "256x256", "response_format": "b64_json"}),
    )
    .await
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn readyz(gw: &Gateway) -> (u16, serde_json::Value) {
    let resp = client().get(gw.url("/readyz")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn fails_over_from_refused_500_slow_and_429_targets() {
    let good = FakeUpstream::start(|_| ok_reply()).await;
    let failing = FakeUpstream::start(|_| {
        Reply::json(
            500,
            json!({"error": {"message": "The server had an error", "type": "server_error"}}),
        )
    })
    .await;
    let slow = FakeUpstream::start(|_| ok_reply().delay(Duration::from_secs(10))).await;
    let limited = FakeUpstream::start(|_| {
        Reply::json(429, json!({"error": {"message": "Rate limit exceeded", "type": "requests", "code": "rate_limit_exceeded"}}))
            .header("retry-after", "30")
    })
    .await;
    let refused = format!("http://{}", refused_addr().await);

    for (bad_url, extra) in [
        (refused, ""),
        (failing.base_url(), ""),
        (slow.base_url(), ", timeout: 300ms"),
        (limited.base_url(), ""),
    ] {
        let yaml = config(
            &[
                ("bad", bad_url.clone(), extra),
                ("good", good.base_url(), ""),
            ],
            "{targets: [{backend: bad}, {backend: good, priority: 1}]}",
            "20s",
        );
        let gw = Gateway::start(&yaml).await;
        let resp = generate(&gw).await;
        assert_eq!(resp.status(), 200, "failover from {bad_url}{extra}");
        assert_eq!(header(&resp, "x-imagegate-backend"), "good");
        assert_eq!(header(&resp, "x-imagegate-attempts"), "2");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body.get("attempts").is_none() && body["data"][0]["b64_json"].is_string());
    }

    // The 429 parked its backend: the next request goes straight to the good one.
    let yaml = config(
        &[
            ("bad", limited.base_url(), ""),
            ("good", good.base_url(), ""),
        ],
        "{targets: [{backend: bad}, {backend: good, priority: 1}]}",
        "20s",
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(header(&generate(&gw).await, "x-imagegate-attempts"), "2");
    let before = limited.requests().len();
    let resp = generate(&gw).await;
    assert_eq!(header(&resp, "x-imagegate-attempts"), "1");
    assert_eq!(limited.requests().len(), before);
    let (_, ready) = readyz(&gw).await;
    assert_eq!(ready["backends"]["bad"]["state"], "throttled");
    assert!(ready["backends"]["bad"]["until"].as_u64().unwrap() > 1_700_000_000);
}

#[tokio::test]
async fn the_upstreams_own_400_is_never_retried() {
    let good = FakeUpstream::start(|_| ok_reply()).await;
    let policy = FakeUpstream::start(|_| {
        Reply::json(400, json!({"error": {"message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error", "code": "content_policy_violation"}}))
    })
    .await;
    let yaml = config(
        &[
            ("strict", policy.base_url(), ""),
            ("good", good.base_url(), ""),
        ],
        "{targets: [{backend: strict}, {backend: good, priority: 1}]}",
        "20s",
    );
    let gw = Gateway::start(&yaml).await;
    let resp = generate(&gw).await;
    assert_eq!(header(&resp, "x-imagegate-attempts"), "1");
    let err = expect_error(resp, 400).await;
    assert_eq!(err["code"], "content_policy_violation");
    assert!(good.requests().is_empty());
}

#[tokio::test]
async fn the_deadline_holds_across_many_slow_targets() {
    let slow = FakeUpstream::start(|_| ok_reply().delay(Duration::from_secs(30))).await;
    let names = ["s1", "s2", "s3", "s4", "s5", "s6"];
    let backends: Vec<_> = names.iter().map(|n| (*n, slow.base_url(), "")).collect();
    let targets: Vec<String> = names.iter().map(|n| format!("{{backend: {n}}}")).collect();
    let route = format!("{{max_attempts: 6, targets: [{}]}}", targets.join(", "));
    let gw = Gateway::start(&config(&backends, &route, "1s")).await;
    let started = Instant::now();
    let resp = generate(&gw).await;
    let elapsed = started.elapsed();
    let err = expect_error(resp, 504).await;
    assert_eq!(err["code"], "upstream_timeout");
    // One overall deadline, not one per target (6 x 10 s).
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

#[tokio::test]
async fn ejection_half_open_and_doubling_cool_down() {
    let broken = Arc::new(AtomicBool::new(true));
    let flag = broken.clone();
    let flaky = FakeUpstream::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::json(
                503,
                json!({"error": {"message": "The engine is currently overloaded"}}),
            )
        } else {
            ok_reply()
        }
    })
    .await;
    let good = FakeUpstream::start(|_| ok_reply()).await;
    let yaml = config(
        &[
            (
                "flaky",
                flaky.base_url(),
                ", health: {eject_after: 2, ejection: 1s, max_ejection: 10s}",
            ),
            ("good", good.base_url(), ""),
        ],
        "{targets: [{backend: flaky}, {backend: good, priority: 1}]}",
        "20s",
    );
    let gw = Gateway::start(&yaml).await;
    let hits = || flaky.requests().len();

    assert_eq!(header(&generate(&gw).await, "x-imagegate-attempts"), "2");
    assert_eq!(header(&generate(&gw).await, "x-imagegate-attempts"), "2");
    assert_eq!(hits(), 2);
    let (status, ready) = readyz(&gw).await;
    assert_eq!(ready["backends"]["flaky"]["state"], "ejected");
    assert_eq!(ready["backends"]["flaky"]["cooldown_ms"], 1000);
    assert_eq!(status, 200, "the model still has an available target");

    // Ejected: no traffic reaches it.
    for _ in 0..5 {
        let resp = generate(&gw).await;
        assert_eq!(header(&resp, "x-imagegate-backend"), "good");
        assert_eq!(header(&resp, "x-imagegate-attempts"), "1");
    }
    assert_eq!(hits(), 2);

    // After the cool-down one trial request goes through; it fails: ejected for twice as long.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(header(&generate(&gw).await, "x-imagegate-attempts"), "2");
    assert_eq!(hits(), 3);
    let (_, ready) = readyz(&gw).await;
    assert_eq!(ready["backends"]["flaky"]["state"], "ejected");
    assert_eq!(ready["backends"]["flaky"]["cooldown_ms"], 2000);

    // It recovers; the next trial succeeds and it takes traffic again.
    broken.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = generate(&gw).await;
    assert_eq!(header(&resp, "x-imagegate-backend"), "flaky");
    let (_, ready) = readyz(&gw).await;
    assert_eq!(ready["backends"]["flaky"]["state"], "healthy");
    assert_eq!(header(&generate(&gw).await, "x-imagegate-backend"), "flaky");
}

#[tokio::test]
async fn readyz_is_503_while_a_model_has_no_available_target() {
    let down =
        FakeUpstream::start(|_| Reply::json(500, json!({"error": {"message": "down"}}))).await;
    let yaml = config(
        &[(
            "only",
            down.base_url(),
            ", health: {eject_after: 1, ejection: 60s}",
        )],
        "{targets: [{backend: only}]}",
        "20s",
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(readyz(&gw).await.0, 200);
    expect_error(generate(&gw).await, 502).await;
    let (status, ready) = readyz(&gw).await;
    assert_eq!(status, 503);
    assert_eq!(ready["unavailable_models"], json!(["pool"]));
    let resp = generate(&gw).await;
    let retry: u64 = header(&resp, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry));
    let err = expect_error(resp, 503).await;
    assert_eq!(err["code"], "no_backend_available");
    assert_eq!(
        down.requests().len(),
        1,
        "no request reaches an ejected backend"
    );
}

#[tokio::test]
async fn tier_one_gets_traffic_only_while_tier_zero_is_unavailable() {
    let main = FakeUpstream::start(|_| ok_reply()).await;
    let backup = FakeUpstream::start(|_| ok_reply()).await;
    let yaml = config(
        &[
            ("main", main.base_url(), ""),
            ("backup", backup.base_url(), ""),
        ],
        "{targets: [{backend: backup, priority: 1}, {backend: main, priority: 0}]}",
        "20s",
    );
    let gw = Gateway::start(&yaml).await;
    for _ in 0..20 {
        assert_eq!(header(&generate(&gw).await, "x-imagegate-backend"), "main");
    }
    assert!(backup.requests().is_empty());
}

#[tokio::test]
async fn least_outstanding_sends_fewer_requests_to_a_slow_target() {
    let fast = FakeUpstream::start(|_| ok_reply()).await;
    let slow = FakeUpstream::start(|_| ok_reply().delay(Duration::from_millis(1000))).await;
    let yaml = config(
        &[("fast", fast.base_url(), ""), ("slow", slow.base_url(), "")],
        "{strategy: least_outstanding, targets: [{backend: fast}, {backend: slow}]}",
        "20s",
    );
    let gw = Arc::new(Gateway::start(&yaml).await);
    let mut workers = Vec::new();
    for _ in 0..16 {
        let gw = gw.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..8 {
                assert_eq!(generate(&gw).await.status(), 200);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let (f, s) = (fast.requests().len(), slow.requests().len());
    assert_eq!(f + s, 128);
    eprintln!("least_outstanding split: slow {s}, fast {f}");
    assert!(s * 2 < f, "slow got {s}, fast got {f}");
}

#[tokio::test]
async fn a_full_node_sends_the_request_to_another_node_before_503() {
    let backends = "  gpu1: {kind: sandbox, delay: 600ms, max_concurrency: 1, max_queue: 0}\n  \
                    gpu2: {kind: sandbox, delay: 600ms, max_concurrency: 1, max_queue: 0}";
    let models = "  pool: {rules: dall-e-2, route: {targets: [{backend: gpu1}, {backend: gpu2}]}}";
    let gw = Arc::new(Gateway::start(&sandbox_config(backends, models)).await);
    let mut running = Vec::new();
    for _ in 0..2 {
        let gw = gw.clone();
        running.push(tokio::spawn(async move {
            let resp = generate(&gw).await;
            (resp.status().as_u16(), header(&resp, "x-imagegate-backend"))
        }));
    }
    // Both nodes are busy now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = generate(&gw).await;
    assert_eq!(header(&resp, "retry-after"), "1");
    let err = expect_error(resp, 503).await;
    assert_eq!(err["code"], "backend_busy");
    let mut served = Vec::new();
    for r in running {
        let (status, backend) = r.await.unwrap();
        assert_eq!(status, 200);
        served.push(backend);
    }
    served.sort();
    assert_eq!(
        served,
        ["gpu1", "gpu2"],
        "the second request went to the free node"
    );
}
