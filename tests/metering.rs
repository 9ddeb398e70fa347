//! Rate limits, budgets, the usage ledger and Idempotency-Key, over real loopback HTTP with a
//! fake OpenAI upstream: exactness under concurrency (one gateway on SQLite, two replicas
//! sharing PostgreSQL and Redis), failures and disconnects that leave budgets untouched.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const ADMIN: &str = "adm-metering-secret";
const KEY: &str = "sk-metered-key";
/// dall-e-2 256x256 at OpenAI's price.
const PRICE: u64 = 16_000;

/// A gateway in front of `upstream` for tenant `tenant` whose limits are `limits` (YAML flow
/// map), with `state` (YAML flow map) as its shared state.
fn config(upstream: &str, tenant: &str, limits: &str, state: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:${{PORT}}
public_url: http://127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
admin: {{tokens_sha256: [{admin}]}}
state: {state}
backends:
  up: {{kind: openai, base_url: "{upstream}/v1", api_key: sk-upstream, timeout: 20s}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: up}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: up}}]}},
             upstream_price: {{per_image: [{{size: 1024x1024, micro_usd: 30000}}]}}}}
  gpt-image-1: {{rules: gpt-image-2, route: {{targets: [{{backend: up, dialect: gpt-image}}]}},
                price: {{default_micro_usd: 50000}},
                upstream_price: {{input_tokens_per_million: 5000000, output_tokens_per_million: 40000000}}}}
tenants:
  {tenant}: {{models: ["*"], limits: {limits}}}
keys:
  - {{id: {tenant}-key, tenant: {tenant}, secret: {KEY}}}
"#,
        admin = hex::encode(imagegate::auth::hash_secret(ADMIN)),
    )
}

/// An upstream that answers every image request after `delay`, counting calls; prompts
/// starting with "fail" get a 500.
async fn upstream(delay: Duration) -> (FakeUpstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let fake = FakeUpstream::start(move |r| {
        c.fetch_add(1, Ordering::SeqCst);
        let prompt = r.body["prompt"].as_str().unwrap_or("");
        if prompt.starts_with("fail") {
            return Reply::json(
                500,
                json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}),
            )
            .delay(delay);
        }
        let n = r.body["n"].as_u64().unwrap_or(1) as usize;
        let png = tiny_png(8, 8);
        let mut answer = json!({"created": 1, "data": (0..n).map(|_| json!({"b64_json": b64(&png)})).collect::<Vec<_>>()});
        if r.body["model"].as_str().unwrap_or("").starts_with("gpt-image") {
            answer["usage"] = json!({"input_tokens": 100, "output_tokens": 4000, "total_tokens": 4100,
                                     "input_tokens_details": {"text_tokens": 100, "image_tokens": 0}});
        }
        Reply::json(200, answer).delay(delay)
    })
    .await;
    (fake, calls)
}

fn small() -> Value {
    json!({"model": "dall-e-2", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"})
}

async fn usage(gw: &Gateway, query: &str) -> reqwest::Response {
    client()
        .get(format!("{}/admin/v1/usage?{query}", gw.admin_base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

async fn ledger(gw: &Gateway, tenant: &str) -> Vec<Value> {
    let resp = usage(gw, &format!("tenant={tenant}&limit=10000")).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["data"].as_array().unwrap().clone()
}

/// Fires `n` requests at once, spread over `gateways`; returns the statuses and bodies.
async fn burst(gateways: &[&Gateway], n: usize, body: Value) -> Vec<(u16, Value)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = gateways[i % gateways.len()].url("/v1/images/generations");
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .post(url)
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.json::<Value>().await.unwrap_or(Value::Null);
            // Only errors are looked at (and printed when a count is off).
            (status, if status == 200 { Value::Null } else { body })
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn count(results: &[(u16, Value)], status: u16) -> usize {
    results.iter().filter(|(s, _)| *s == status).count()
}

async fn budget_exactness(gateways: &[&Gateway], tenant: &str) {
    let results = burst(gateways, 50, small()).await;
    assert_eq!(count(&results, 200), 7, "{results:?}");
    assert_eq!(count(&results, 429), 43);
    for (status, body) in &results {
        if *status == 429 {
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
            assert_eq!(body["error"]["type"], "insufficient_quota");
        }
    }
    let rows = ledger(gateways[0], tenant).await;
    let ok: Vec<_> = rows.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(ok.len(), 7);
    let spent: u64 = rows
        .iter()
        .map(|r| r["cost_micro_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(spent, 7 * PRICE, "the ledger sums to the budget");
    for r in &ok {
        assert_eq!(r["reserved_micro_usd"], r["cost_micro_usd"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_against_a_budget_for_seven_sqlite() {
    let (fake, _) = upstream(Duration::from_millis(100)).await;
    let tenant = unique("b7");
    let limits = format!("{{budget: {{micro_usd: {}, period: total}}}}", 7 * PRICE);
    let gw = Gateway::start(&config(&fake.base_url(), &tenant, &limits, "{}")).await;
    budget_exactness(&[&gw], &tenant).await;
    // Exhausted: the next one is refused too, and the SDK is told not to retry.
    let resp = gw.generate_as(KEY, small()).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-should-retry"], "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_against_a_budget_for_seven_in_memory() {
    let (fake, _) = upstream(Duration::from_millis(100)).await;
    let tenant = unique("m7");
    let limits = format!("{{budget: {{micro_usd: {}, period: daily}}}}", 7 * PRICE);
    let gw = Gateway::start(&config(&fake.base_url(), &tenant, &limits, "{store: none}")).await;
    let results = burst(&[&gw], 50, small()).await;
    assert_eq!(count(&results, 200), 7);
    assert_eq!(count(&results, 429), 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_sharing_postgres_and_redis_hold_the_budget_and_the_rate() {
    let (Some(pg), Some(redis)) = (pg_url(), redis_url()) else {
        eprintln!("IMAGEGATE_TEST_PG / IMAGEGATE_TEST_REDIS not set: skipped");
        return;
    };
    let (fake, _) = upstream(Duration::from_millis(100)).await;
    // Budget for 7, PostgreSQL only.
    let tenant = unique("pg7");
    let limits = format!("{{budget: {{micro_usd: {}, period: monthly}}}}", 7 * PRICE);
    let state = "{store: postgres, postgres: \"${PG}\"}";
    let vars = [("PG", pg.clone())];
    let yaml = config(&fake.base_url(), &tenant, &limits, state);
    let a = Gateway::start_with(&yaml, &vars).await;
    let b = Gateway::start_with(&yaml, &vars).await;
    budget_exactness(&[&a, &b], &tenant).await;

    // The same with Redis holding the limits.
    let tenant = unique("rd7");
    let state = format!(
        "{{store: postgres, postgres: \"${{PG}}\", redis: {{url: \"{redis}\", prefix: \"{}:\", timeout: 3s}}}}",
        unique("t")
    );
    let yaml = config(&fake.base_url(), &tenant, &limits, &state);
    let a = Gateway::start_with(&yaml, &vars).await;
    let b = Gateway::start_with(&yaml, &vars).await;
    budget_exactness(&[&a, &b], &tenant).await;

    // 10 requests per minute, 40 at once over both replicas: exactly 10 pass.
    let tenant = unique("rpm");
    let yaml = config(
        &fake.base_url(),
        &tenant,
        "{requests_per_minute: 10}",
        &state,
    );
    let a = Gateway::start_with(&yaml, &vars).await;
    let b = Gateway::start_with(&yaml, &vars).await;
    let results = burst(&[&a, &b], 40, small()).await;
    assert_eq!(count(&results, 200), 10, "{results:?}");
    assert_eq!(count(&results, 429), 30);
    let refused = results.iter().find(|(s, _)| *s == 429).unwrap();
    assert_eq!(refused.1["error"]["code"], "rate_limit_exceeded");
    assert!(refused.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("requests per minute"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_ten_with_forty_concurrent_in_process() {
    let (fake, _) = upstream(Duration::from_millis(50)).await;
    let tenant = unique("rl");
    let gw = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{requests_per_minute: 10}",
        "{}",
    ))
    .await;
    let results = burst(&[&gw], 40, small()).await;
    assert_eq!(count(&results, 200), 10);
    assert_eq!(count(&results, 429), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headers_on_success_and_on_429_name_the_limit_and_its_reset() {
    let (fake, _) = upstream(Duration::ZERO).await;
    let tenant = unique("hd");
    let gw = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{requests_per_minute: 2, images_per_minute: 10}",
        "{}",
    ))
    .await;
    let body = json!({"model": "dall-e-2", "prompt": "p", "size": "256x256", "n": 3, "response_format": "b64_json"});
    let resp = gw.generate_as(KEY, body.clone()).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-limit-images"], "10");
    assert_eq!(h["x-ratelimit-remaining-images"], "7", "n=3 takes 3 images");
    assert_eq!(h["x-ratelimit-reset-images"], "18s");
    gw.generate_as(KEY, body.clone()).await;
    let resp = gw.generate_as(KEY, body).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    let err = expect_error(resp, 429).await;
    assert_eq!(err["code"], "rate_limit_exceeded");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("requests per minute") && msg.contains("try again in"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_request_limit_admits_that_many_at_once() {
    let (fake, _) = upstream(Duration::from_millis(400)).await;
    let tenant = unique("cc");
    let gw = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{concurrent_requests: 2}",
        "{}",
    ))
    .await;
    let results = burst(&[&gw], 6, small()).await;
    assert_eq!(count(&results, 200), 2, "{results:?}");
    assert_eq!(count(&results, 429), 4);
    let msg = results.iter().find(|(s, _)| *s == 429).unwrap().1["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("concurrent requests"), "{msg}");
    // The slots are given back when the requests end.
    let results = burst(&[&gw], 2, small()).await;
    assert_eq!(count(&results, 200), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_failure_and_a_client_disconnect_leave_the_budget_untouched() {
    let (fake, calls) = upstream(Duration::from_millis(600)).await;
    let tenant = unique("fd");
    // Room for exactly one image.
    let limits = format!("{{budget: {{micro_usd: {PRICE}, period: total}}}}");
    let gw = Gateway::start(&config(&fake.base_url(), &tenant, &limits, "{}")).await;

    let mut failing = small();
    failing["prompt"] = json!("fail please");
    let resp = gw.generate_as(KEY, failing).await;
    assert_eq!(resp.status(), 502);

    // A client that gives up while the upstream works.
    let gone = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(KEY)
        .header("x-request-id", "walked-away")
        .timeout(Duration::from_millis(150))
        .json(&small())
        .send()
        .await;
    assert!(gone.is_err(), "the client timed out");
    // Its reservation is released once the gateway notices.
    let mut ok = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rows = ledger(&gw, &tenant).await;
        if rows.iter().any(|r| r["request_id"] == "walked-away") {
            ok = true;
            break;
        }
    }
    assert!(ok, "the abandoned request is in the ledger");
    let rows = ledger(&gw, &tenant).await;
    let gone = rows
        .iter()
        .find(|r| r["request_id"] == "walked-away")
        .unwrap();
    assert_eq!(gone["status"], 499);
    assert_eq!(gone["cost_micro_usd"], 0);
    let failed = rows.iter().find(|r| r["status"] == 502).unwrap();
    assert_eq!(failed["cost_micro_usd"], 0);

    // The whole budget is still there: one image passes, the next is refused.
    assert_eq!(gw.generate_as(KEY, small()).await.status(), 200);
    let resp = gw.generate_as(KEY, small()).await;
    assert_eq!(expect_error(resp, 429).await["code"], "insufficient_quota");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the refused one never reached upstream"
    );
}

async fn post_with_key(gw: &Gateway, idem: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", idem)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn idempotency_suite(gw: &Gateway, tenant: &str, calls: &AtomicUsize) {
    let body =
        json!({"model": "dall-e-2", "prompt": "same", "size": "256x256", "response_format": "url"});
    let before = calls.load(Ordering::SeqCst);
    let first = post_with_key(gw, "order-1", &body).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = post_with_key(gw, "order-1", &body).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again, "same images, same URLs");
    assert_eq!(
        calls.load(Ordering::SeqCst) - before,
        1,
        "one upstream call"
    );
    let rows = ledger(gw, tenant).await;
    assert_eq!(
        rows.iter()
            .filter(|r| r["idempotency_key"] == "order-1")
            .count(),
        1,
        "one ledger row"
    );

    // Another body with the same key: 422.
    let mut other = body.clone();
    other["prompt"] = json!("different");
    let resp = post_with_key(gw, "order-1", &other).await;
    assert_eq!(expect_error(resp, 422).await["param"], "Idempotency-Key");

    // A repeat while the first still runs: 409.
    let mut slow = body.clone();
    slow["prompt"] = json!("slow one");
    let (a, b) = tokio::join!(post_with_key(gw, "order-2", &slow), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        post_with_key(gw, "order-2", &slow).await
    });
    assert_eq!(a.status(), 200);
    let err = expect_error(b, 409).await;
    assert_eq!(err["code"], "idempotency_key_in_use");

    // A failed first request frees its key: the retry runs.
    let mut failing = body.clone();
    failing["prompt"] = json!("fail once");
    assert_eq!(post_with_key(gw, "order-3", &failing).await.status(), 502);
    assert_eq!(post_with_key(gw, "order-3", &failing).await.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_replay_refuse_in_flight_and_refuse_another_body() {
    let (fake, calls) = upstream(Duration::from_millis(500)).await;
    let tenant = unique("id");
    let gw = Gateway::start(&config(&fake.base_url(), &tenant, "{}", "{}")).await;
    idempotency_suite(&gw, &tenant, &calls).await;
    let resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "")
        .json(&small())
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(resp, 400).await["param"], "Idempotency-Key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_across_replicas_sharing_postgres() {
    let Some(pg) = pg_url() else {
        return;
    };
    let (fake, calls) = upstream(Duration::from_millis(500)).await;
    let tenant = unique("idpg");
    let state = "{store: postgres, postgres: \"${PG}\"}";
    let yaml = config(&fake.base_url(), &tenant, "{}", state);
    let vars = [("PG", pg)];
    let a = Gateway::start_with(&yaml, &vars).await;
    let b = Gateway::start_with(&yaml, &vars).await;
    idempotency_suite(&a, &tenant, &calls).await;
    // The other replica replays what the first answered.
    let body =
        json!({"model": "dall-e-2", "prompt": "same", "size": "256x256", "response_format": "url"});
    let before = calls.load(Ordering::SeqCst);
    let resp = post_with_key(&b, "order-1", &body).await;
    assert_eq!(resp.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prices_reserved_settled_upstream_cost_and_the_usage_report() {
    let (fake, _) = upstream(Duration::ZERO).await;
    let tenant = unique("pr");
    let gw = Gateway::start(&config(&fake.base_url(), &tenant, "{}", "{}")).await;
    let cases = [
        (
            json!({"model": "dall-e-3", "prompt": "p", "size": "1792x1024", "quality": "hd", "response_format": "b64_json"}),
            120_000u64,
            // Not in the upstream table: its 1024x1024 price scaled by pixels, 30,000 x 1.75.
            52_500u64,
        ),
        (
            json!({"model": "dall-e-3", "prompt": "p", "size": "1024x1024", "response_format": "b64_json"}),
            40_000,
            30_000,
        ),
        (
            json!({"model": "dall-e-2", "prompt": "p", "size": "512x512", "n": 2, "response_format": "b64_json"}),
            36_000,
            // No upstream_price: the catalog's price of what the target asks OpenAI for.
            36_000,
        ),
        // 100 input tokens at $5/M + 4000 output tokens at $40/M = $0.1605.
        (
            json!({"model": "gpt-image-1", "prompt": "p", "size": "1024x1024"}),
            50_000,
            160_500,
        ),
    ];
    for (body, cost, upstream_cost) in &cases {
        let resp = gw.generate_as(KEY, body.clone()).await;
        assert_eq!(resp.status(), 200, "{body}");
        let rows = ledger(&gw, &tenant).await;
        let row = &rows[0];
        assert_eq!(row["cost_micro_usd"].as_u64().unwrap(), *cost, "{body}");
        assert_eq!(row["reserved_micro_usd"], row["cost_micro_usd"]);
        assert_eq!(
            row["upstream_cost_micro_usd"].as_u64().unwrap(),
            *upstream_cost,
            "{body}"
        );
    }
    let rows = ledger(&gw, &tenant).await;
    let gpt = rows.iter().find(|r| r["model"] == "gpt-image-1").unwrap();
    assert_eq!(gpt["input_tokens"], 100);
    assert_eq!(gpt["output_tokens"], 4000);

    let by_model: Value = usage(&gw, &format!("tenant={tenant}&group_by=model"))
        .await
        .json()
        .await
        .unwrap();
    let groups = by_model["data"].as_array().unwrap();
    let d3 = groups.iter().find(|g| g["group"] == "dall-e-3").unwrap();
    assert_eq!(d3["requests"], 2);
    assert_eq!(d3["cost_micro_usd"], 160_000);
    // 160,000 charged less 30,000 and 52,500 upstream.
    assert_eq!(d3["margin_micro_usd"], 77_500);
    let d2 = groups.iter().find(|g| g["group"] == "dall-e-2").unwrap();
    assert_eq!(d2["images"], 2);

    let csv = usage(&gw, &format!("tenant={tenant}&group_by=day&format=csv")).await;
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let values: Vec<&str> = lines[1].split(',').collect();
    let col = |name: &str| values[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("requests"), "4");
    assert_eq!(col("cost_micro_usd"), "246000");

    // Filters and bad parameters.
    let none: Value = usage(&gw, &format!("tenant={tenant}&model=dall-e-9"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
    let future: Value = usage(&gw, &format!("tenant={tenant}&from=2999-01-01"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(future["data"].as_array().unwrap().len(), 0);
    let bad = usage(&gw, "group_by=week").await;
    assert_eq!(expect_error(bad, 400).await["param"], "group_by");
    let anon = client()
        .get(format!("{}/admin/v1/usage", gw.admin_base))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_fails_open_to_local_limits_or_closed_with_503() {
    let dead = refused_addr().await;
    let (fake, _) = upstream(Duration::ZERO).await;
    let tenant = unique("ro");
    let open = format!("{{redis: {{url: \"redis://{dead}\", on_failure: open, timeout: 100ms}}}}");
    let gw = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{requests_per_minute: 2}",
        &open,
    ))
    .await;
    assert_eq!(gw.generate_as(KEY, small()).await.status(), 200);
    assert_eq!(gw.generate_as(KEY, small()).await.status(), 200);
    assert_eq!(
        gw.generate_as(KEY, small()).await.status(),
        429,
        "the local limit still holds"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("imagegate_redis_failures_total 3"),
        "{metrics}"
    );

    // Budgets never fail open: with Redis away a budgeted request is refused, retryably.
    let budgeted = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{budget: {micro_usd: 1000000, period: daily}}",
        &open,
    ))
    .await;
    let resp = budgeted.generate_as(KEY, small()).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));

    let closed =
        format!("{{redis: {{url: \"redis://{dead}\", on_failure: closed, timeout: 100ms}}}}");
    let gw = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{requests_per_minute: 2}",
        &closed,
    ))
    .await;
    let resp = gw.generate_as(KEY, small()).await;
    assert_eq!(resp.status(), 503);
}

#[tokio::test]
async fn the_usage_cli_reads_the_ledger() {
    let (fake, _) = upstream(Duration::ZERO).await;
    let tenant = unique("cli");
    let yaml = config(&fake.base_url(), &tenant, "{}", "{}");
    let gw = Gateway::start(&yaml).await;
    for _ in 0..3 {
        assert_eq!(gw.generate_as(KEY, small()).await.status(), 200);
    }
    // The admin API commits what the gateway journaled; the CLI reads the database directly.
    assert_eq!(ledger(&gw, &tenant).await.len(), 3);
    let dir = gw.data_dir.path().to_path_buf();
    let file = dir.join("gateway.yaml");
    std::fs::write(
        &file,
        yaml.replace("${PORT}", "1")
            .replace("${DATA_DIR}", &dir.display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["usage", "--group-by", "key", "--format", "csv", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().nth(1).unwrap();
    assert!(line.contains(&format!("{tenant}-key")), "{text}");
    assert!(line.contains(",3,"), "{text}");
    assert!(line.contains(&(3 * PRICE).to_string()), "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["usage", "--from", "yesterday", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_budget_applies_on_top_of_its_tenants() {
    let (fake, _) = upstream(Duration::ZERO).await;
    let tenant = unique("kb");
    let limits = format!("{{budget: {{micro_usd: {}, period: total}}}}", 10 * PRICE);
    let yaml = config(&fake.base_url(), &tenant, &limits, "{}").replace(
        &format!("secret: {KEY}}}"),
        &format!(
            "secret: {KEY}, limits: {{budget: {{micro_usd: {}, period: daily}}}}}}",
            2 * PRICE
        ),
    );
    assert!(yaml.contains("period: daily"), "{yaml}");
    let gw = Gateway::start(&yaml).await;
    for _ in 0..2 {
        assert_eq!(gw.generate_as(KEY, small()).await.status(), 200);
    }
    let err = expect_error(gw.generate_as(KEY, small()).await, 429).await;
    assert_eq!(err["code"], "insufficient_quota");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("key's daily budget of $0.032000"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_past_its_retention_is_a_new_request() {
    let (fake, calls) = upstream(Duration::ZERO).await;
    let tenant = unique("ir");
    let gw = Gateway::start(&config(
        &fake.base_url(),
        &tenant,
        "{}",
        "{idempotency_retention: 1s}",
    ))
    .await;
    let body =
        json!({"model": "dall-e-2", "prompt": "p", "size": "256x256", "response_format": "url"});
    assert_eq!(post_with_key(&gw, "k-1", &body).await.status(), 200);
    let again = post_with_key(&gw, "k-1", &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = post_with_key(&gw, "k-1", &body).await;
    assert_eq!(later.status(), 200);
    assert!(later.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Another body is fine too once the old record is gone.
    let mut other = body.clone();
    other["prompt"] = json!("other");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post_with_key(&gw, "k-1", &other).await.status(), 200);
}

#[tokio::test]
async fn postgres_holds_are_leases_given_back_exactly_once() {
    use imagegate::metering::budget::{sql_release, sql_reserve, sql_spent, sql_sweep_holds, Hold};
    let Some(pg) = pg_url() else {
        return;
    };
    let db = imagegate::store::Database::connect(&pg).await.unwrap();
    let scope = format!("tenant:{}", unique("lease"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // A replica holds for two requests and dies: one lease has run out, one has not.
    let r = |member: &'static str, expires: i64| {
        let (db, scope) = (db.clone(), scope.clone());
        async move {
            sql_reserve(&db, &scope, "total", 100, 250, member, expires)
                .await
                .unwrap()
        }
    };
    assert_eq!(r("req-a", now - 1).await, Ok(()));
    assert_eq!(r("req-b", now + 60_000).await, Ok(()));
    assert_eq!(r("req-c", now + 60_000).await, Err(50), "250 - 200 held");
    assert_eq!(sql_spent(&db, &scope, "total").await.unwrap(), (0, 200));
    assert!(sql_sweep_holds(&db, now).await.unwrap() >= 1);
    assert_eq!(sql_spent(&db, &scope, "total").await.unwrap(), (0, 100));
    let hold = Hold {
        scope: scope.clone(),
        period: "total".into(),
        amount: 100,
    };
    sql_release(&db, &hold, "req-b").await.unwrap();
    sql_release(&db, &hold, "req-b").await.unwrap();
    sql_release(&db, &hold, "req-a").await.unwrap();
    assert_eq!(
        sql_spent(&db, &scope, "total").await.unwrap(),
        (0, 0),
        "each hold given back once, never below zero"
    );
}
