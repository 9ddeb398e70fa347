//! Relaying to OpenAI-compatible and Azure upstreams (fakes speaking their real protocol over
//! loopback): what is sent, what comes back, and how every upstream failure maps.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

fn openai_config(base_url: &str, extra_backend: &str, timeout: &str) -> String {
    let backends = format!(
        "  up: {{kind: openai, base_url: \"{base_url}/v1\", api_key: \"${{UPSTREAM_KEY}}\", timeout: 10s, headers: {{x-extra: yes}}{extra_backend}}}"
    );
    let models = format!(
        "  gpt-dalle: {{rules: dall-e-3, timeout: {timeout}, route: {{targets: [{{backend: up, model: dall-e-3-upstream}}]}}}}\n  \
           gpt-d2: {{rules: dall-e-2, route: {{targets: [{{backend: up}}]}}}}"
    );
    sandbox_config(&backends, &models)
}

async fn start(fake: &FakeUpstream, timeout: &str) -> Gateway {
    Gateway::start_with(
        &openai_config(&fake.base_url(), "", timeout),
        &[("UPSTREAM_KEY", "sk-upstream-secret".to_string())],
    )
    .await
}

fn ok_b64(n: usize) -> Reply {
    let png = tiny_png(8, 8);
    let data: Vec<_> = (0..n)
        .map(|_| json!({"b64_json": b64(&png), "revised_prompt": "an upstream revision"}))
        .collect();
    Reply::json(200, json!({"created": 1, "data": data}))
}

#[tokio::test]
async fn relays_every_field_with_our_credentials_and_request_id() {
    let fake = FakeUpstream::start(|_| ok_b64(1)).await;
    let gw = start(&fake, "30s").await;
    let resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .header("x-request-id", "trace-me-42")
        .json(
            &json!({"model": "gpt-dalle", "prompt": "a boat", "size": "1792x1024", "quality": "hd",
                      "style": "natural", "response_format": "b64_json", "user": "end-user-1"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "trace-me-42");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"][0]["revised_prompt"], "an upstream revision");
    assert_eq!(
        unb64(body["data"][0]["b64_json"].as_str().unwrap()),
        tiny_png(8, 8)
    );

    let sent = fake.requests();
    assert_eq!(sent.len(), 1);
    let r = &sent[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path_and_query, "/v1/images/generations");
    assert_eq!(r.headers["authorization"], "Bearer sk-upstream-secret");
    assert_eq!(r.headers["x-request-id"], "trace-me-42");
    assert_eq!(r.headers["x-extra"], "yes");
    assert_eq!(
        r.body,
        json!({"model": "dall-e-3-upstream", "prompt": "a boat", "n": 1, "size": "1792x1024", "quality": "hd",
               "style": "natural", "response_format": "b64_json", "user": "end-user-1"})
    );
}

#[tokio::test]
async fn dalle2_upstream_gets_n_and_no_style() {
    let fake = FakeUpstream::start(|r| ok_b64(r.body["n"].as_u64().unwrap() as usize)).await;
    let gw = start(&fake, "30s").await;
    let resp = gw
        .generate(json!({"model": "gpt-d2", "prompt": "p", "n": 3, "size": "512x512", "response_format": "b64_json"}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    let sent = &fake.requests()[0].body;
    assert_eq!(sent["model"], "gpt-d2");
    assert_eq!(sent["n"], 3);
    assert!(
        sent.get("style").is_none() && sent.get("quality").is_none(),
        "{sent}"
    );
}

#[tokio::test]
async fn upstream_b64_becomes_a_hosted_url_when_the_client_wants_url() {
    let fake = FakeUpstream::start(|_| ok_b64(1)).await;
    let gw = start(&fake, "30s").await;
    let body: serde_json::Value = gw
        .generate(json!({"model": "gpt-dalle", "prompt": "p"}))
        .await
        .json()
        .await
        .unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    // The client asked for url; the upstream answered b64 anyway: we host it.
    let got = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.to_vec(), tiny_png(8, 8));
}

#[tokio::test]
async fn upstream_url_answers_pass_through_for_url_requests() {
    let fake = FakeUpstream::start(|_| {
        Reply::json(200, json!({"created": 1, "data": [{"url": "https://cdn.example/x.png", "revised_prompt": "r"}]}))
    })
    .await;
    let gw = start(&fake, "30s").await;
    let body: serde_json::Value = gw
        .generate(json!({"model": "gpt-dalle", "prompt": "p"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["data"][0]["url"], "https://cdn.example/x.png");
}

#[tokio::test]
async fn content_policy_400_passes_through_with_its_message_and_code() {
    let fake = FakeUpstream::start(|_| {
        Reply::json(400, json!({"error": {"message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error", "param": null, "code": "content_policy_violation"}}))
    })
    .await;
    let gw = start(&fake, "30s").await;
    let err = expect_error(
        gw.generate(json!({"model": "gpt-dalle", "prompt": "p"}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["code"], "content_policy_violation");
    assert_eq!(
        err["message"],
        "Your request was rejected as a result of our safety system."
    );
}

#[tokio::test]
async fn upstream_auth_failures_become_502_without_leaking_credentials() {
    for status in [401, 403] {
        let fake = FakeUpstream::start(move |_| {
            Reply::json(
                status,
                json!({"error": {"message": "Incorrect API key provided: sk-ups***cret.",
                "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
            )
        })
        .await;
        let gw = start(&fake, "30s").await;
        let resp = gw
            .generate(json!({"model": "gpt-dalle", "prompt": "p"}))
            .await;
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        let text = resp.text().await.unwrap();
        assert!(!text.contains("sk-up"), "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            body["error"]["code"], "upstream_auth_failed",
            "the client's own key is fine"
        );
    }
}

#[tokio::test]
async fn upstream_429_becomes_429_with_retry_after() {
    let fake = FakeUpstream::start(|_| {
        Reply::json(429, json!({"error": {"message": "Rate limit exceeded for images per minute in organization org-secret.",
            "type": "requests", "param": null, "code": "rate_limit_exceeded"}}))
        .header("retry-after", "7")
    })
    .await;
    let gw = start(&fake, "30s").await;
    let resp = gw
        .generate(json!({"model": "gpt-dalle", "prompt": "p"}))
        .await;
    assert_eq!(resp.headers()["retry-after"], "7");
    let err = expect_error(resp, 429).await;
    assert_eq!(err["code"], "rate_limit_exceeded");
    assert!(!err["message"].as_str().unwrap().contains("org-secret"));
}

#[tokio::test]
async fn upstream_5xx_and_garbage_become_502() {
    let fake = FakeUpstream::start(|r| match r.body["prompt"].as_str().unwrap() {
        "500" => Reply::json(500, json!({"error": {"message": "The server had an error", "type": "server_error", "param": null, "code": null}})),
        "503" => Reply::json(503, json!({"error": {"message": "The engine is currently overloaded"}})),
        "html" => Reply { status: 200, headers: vec![("content-type".into(), "text/html".into())], body: "<html>".into(), delay: Duration::ZERO },
        "empty" => Reply::json(200, json!({"created": 1, "data": []})),
        "notimage" => Reply::json(200, json!({"created": 1, "data": [{"b64_json": b64(b"hello world")}]})),
        _ => Reply::json(404, json!({"error": {"message": "The model `x` does not exist", "code": "model_not_found"}})),
    })
    .await;
    let gw = start(&fake, "30s").await;
    for prompt in ["500", "503", "html", "empty", "notimage", "404"] {
        let err = expect_error(
            gw.generate(
                json!({"model": "gpt-dalle", "prompt": prompt, "response_format": "b64_json"}),
            )
            .await,
            502,
        )
        .await;
        assert_ne!(
            err["code"], "model_not_found",
            "an upstream 404 is our config problem, not the client's"
        );
    }
}

#[tokio::test]
async fn connection_refused_is_502() {
    let addr = refused_addr().await;
    let gw = Gateway::start_with(
        &openai_config(&format!("http://{addr}"), "", "30s"),
        &[("UPSTREAM_KEY", "k".to_string())],
    )
    .await;
    let err = expect_error(
        gw.generate(json!({"model": "gpt-dalle", "prompt": "p"}))
            .await,
        502,
    )
    .await;
    assert_eq!(err["code"], "upstream_unreachable");
}

#[tokio::test]
async fn slow_upstream_past_the_model_deadline_is_504() {
    let fake = FakeUpstream::start(|_| ok_b64(1).delay(Duration::from_secs(5))).await;
    let gw = start(&fake, "500ms").await;
    let err = expect_error(
        gw.generate(json!({"model": "gpt-dalle", "prompt": "p"}))
            .await,
        504,
    )
    .await;
    assert_eq!(err["code"], "upstream_timeout");
}

#[tokio::test]
async fn azure_deployment_url_api_key_and_content_filter() {
    let fake = FakeUpstream::start(|r| {
        if r.body["prompt"] == "bad" {
            Reply::json(400, json!({"error": {"code": "contentFilter", "message": "Your task failed as a result of our safety system.",
                "inner_error": {"code": "ResponsibleAIPolicyViolation"}}}))
        } else {
            let png = tiny_png(4, 4);
            Reply::json(200, json!({"created": 1, "data": [{"b64_json": b64(&png), "revised_prompt": "rev",
                "content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}}]}))
        }
    })
    .await;
    let backends = format!(
        "  az: {{kind: azure, endpoint: \"{}\", deployment: dalle3-prod, api_version: 2024-10-21, api_key: az-secret}}",
        fake.base_url()
    );
    let models = "  azure-dalle: {rules: dall-e-3, route: {targets: [{backend: az}]}}";
    let gw = Gateway::start(&sandbox_config(&backends, models)).await;
    let resp = gw
        .generate(json!({"model": "azure-dalle", "prompt": "ok", "response_format": "b64_json"}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["data"][0].get("content_filter_results").is_none(),
        "Azure annotations are dropped"
    );
    let sent = &fake.requests()[0];
    assert_eq!(
        sent.path_and_query,
        "/openai/deployments/dalle3-prod/images/generations?api-version=2024-10-21"
    );
    assert_eq!(sent.headers["api-key"], "az-secret");
    assert!(sent.headers.get("authorization").is_none());

    let err = expect_error(
        gw.generate(json!({"model": "azure-dalle", "prompt": "bad"}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["code"], "content_policy_violation");
}
