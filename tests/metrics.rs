//! `/metrics` on the admin listener after a scripted mix of requests. Metrics are per process,
//! so this binary holds this one test.

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn counters_follow_a_scripted_mix_of_requests() {
    let good = FakeUpstream::start(|_| {
        Reply::json(
            200,
            json!({"created": 1, "data": [{"b64_json": b64(&tiny_png(2, 2))}]}),
        )
    })
    .await;
    let refused = refused_addr().await;
    let backends = format!(
        "  dead: {{kind: openai, base_url: \"http://{refused}/v1\"}}\n  good: {{kind: openai, base_url: \"{}/v1\"}}",
        good.base_url()
    );
    let models = "  pool: {rules: dall-e-2, route: {targets: [{backend: dead}, {backend: good, priority: 1}]}}";
    let yaml = sandbox_config(&backends, models).replace(
        "narrow: {models: [dall-e-2]}",
        "narrow: {models: [dall-e-2], limits: {requests_per_minute: 1}}",
    );
    let gw = Gateway::start(&yaml).await;
    let ok = json!({"prompt": "x", "size": "256x256", "n": 2, "response_format": "b64_json"});
    for _ in 0..3 {
        assert_eq!(gw.generate(ok.clone()).await.status(), 200);
    }
    assert_eq!(gw.generate(json!({"prompt": ""})).await.status(), 400);
    assert_eq!(gw.generate_as("sk-nope", ok.clone()).await.status(), 401);
    assert_eq!(
        gw.generate_as("sk-narrow-key", ok.clone()).await.status(),
        200
    );
    assert_eq!(
        gw.generate_as("sk-narrow-key", ok.clone()).await.status(),
        429
    );
    let pool =
        json!({"model": "pool", "prompt": "x", "size": "256x256", "response_format": "b64_json"});
    assert_eq!(gw.generate(pool).await.status(), 200);
    // A model no route has: a 404, labelled `-` (clients cannot mint label values).
    let unknown = json!({"model": "no-such-model-7", "prompt": "x"});
    assert_eq!(gw.generate(unknown).await.status(), 404);

    let text = gw.metrics().await;
    assert!(!text.contains("no-such-model-7"), "{text}");
    assert_eq!(
        line_value(
            &text,
            r#"imagegate_requests_total{model="-",operation="generation",status="4xx",tenant="demo"}"#
        ),
        Some(1.0)
    );
    let v = |prefix: &str| {
        line_value(&text, prefix).unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    };
    assert_eq!(
        v(
            r#"imagegate_requests_total{model="dall-e-2",operation="generation",status="2xx",tenant="demo"}"#
        ),
        3.0
    );
    assert_eq!(
        v(
            r#"imagegate_requests_total{model="dall-e-2",operation="generation",status="2xx",tenant="narrow"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"imagegate_requests_total{model="dall-e-2",operation="generation",status="4xx",tenant="demo"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"imagegate_requests_total{model="dall-e-2",operation="generation",status="4xx",tenant="narrow"}"#
        ),
        1.0
    );
    assert_eq!(
        v(r#"imagegate_requests_total{model="-",operation="generation",status="4xx",tenant="-"}"#),
        1.0
    );
    assert_eq!(
        v(
            r#"imagegate_requests_total{model="pool",operation="generation",status="2xx",tenant="demo"}"#
        ),
        1.0
    );
    assert_eq!(
        v(r#"imagegate_images_generated_total{model="dall-e-2"}"#),
        8.0
    );
    assert_eq!(v(r#"imagegate_images_generated_total{model="pool"}"#), 1.0);
    assert_eq!(
        v(r#"imagegate_rate_limited_total{tenant="narrow",limit="requests"}"#),
        1.0
    );
    assert_eq!(
        v(r#"imagegate_upstream_attempts_total{backend="sandbox",outcome="success"}"#),
        4.0
    );
    assert_eq!(
        v(r#"imagegate_upstream_attempts_total{backend="dead",outcome="connect_error"}"#),
        1.0
    );
    assert_eq!(
        v(r#"imagegate_upstream_attempts_total{backend="good",outcome="success"}"#),
        1.0
    );
    assert_eq!(v(r#"imagegate_failovers_total{model="pool"}"#), 1.0);
    assert_eq!(v("imagegate_gateway_overhead_seconds_count"), 5.0);
    assert_eq!(
        v(r#"imagegate_upstream_latency_seconds_count{backend="sandbox"}"#),
        4.0
    );
    assert_eq!(
        v("imagegate_in_flight_requests"),
        0.0,
        "nothing in flight; the admin listener is not counted"
    );
    // dall-e-2 256x256 costs 16,000 micro-dollars an image.
    assert_eq!(
        v(r#"imagegate_spend_microdollars_total{tenant="demo",model="dall-e-2"}"#),
        96_000.0
    );
    assert_eq!(
        v(r#"imagegate_spend_microdollars_total{tenant="narrow",model="dall-e-2"}"#),
        32_000.0
    );
    // Never a per-key label.
    assert!(!text.contains("sk-") && !text.contains("key_id"));
}
