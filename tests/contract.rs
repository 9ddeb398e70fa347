//! The client-facing contract against the sandbox: validation per model, auth, model rights,
//! response shapes, hosted image URLs, request ids.

mod support;

use serde_json::json;
use support::*;

async fn gateway() -> Gateway {
    Gateway::start(&sandbox_config("", "")).await
}

#[tokio::test]
async fn dalle2_default_request_returns_a_hosted_png_url() {
    let gw = gateway().await;
    let resp = gw
        .generate(json!({"prompt": "a lighthouse at dusk", "size": "256x256"}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert!(data[0].get("b64_json").is_none());
    assert!(
        data[0].get("revised_prompt").is_none(),
        "dall-e-2 has no revised_prompt"
    );
    let url = data[0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/images/", gw.base)), "{url}");

    let img = client().get(url).send().await.unwrap();
    assert_eq!(img.status(), 200);
    assert_eq!(img.headers()["content-type"], "image/png");
    assert!(img.headers().contains_key("etag"));
    assert!(img.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("max-age="));
    let bytes = img.bytes().await.unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (256, 256));
}

#[tokio::test]
async fn b64_json_returns_the_image_bytes_of_each_requested_size() {
    let gw = gateway().await;
    for (model, size) in [
        ("dall-e-2", "512x512"),
        ("dall-e-3", "1792x1024"),
        ("dall-e-3", "1024x1792"),
    ] {
        let resp = gw
            .generate(json!({"model": model, "prompt": "a fox", "size": size, "response_format": "b64_json"}))
            .await;
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        let png = unb64(body["data"][0]["b64_json"].as_str().unwrap());
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!(format!("{}x{}", img.width(), img.height()), size);
        assert!(body["data"][0].get("url").is_none());
    }
}

#[tokio::test]
async fn dalle2_n_images_are_all_different_and_the_prompt_matters() {
    let gw = gateway().await;
    let gen = |prompt: &'static str, n: u32| {
        let gw = &gw;
        async move {
            let body: serde_json::Value = gw
                .generate(json!({"prompt": prompt, "n": n, "size": "256x256", "response_format": "b64_json"}))
                .await
                .json()
                .await
                .unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["b64_json"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let three = gen("a red fox", 3).await;
    assert_eq!(three.len(), 3);
    assert_ne!(three[0], three[1]);
    assert_eq!(
        gen("a red fox", 1).await[0],
        three[0],
        "deterministic per prompt"
    );
    assert_ne!(gen("a green frog", 1).await[0], three[0]);
}

#[tokio::test]
async fn dalle3_answers_with_revised_prompt_and_accepts_quality_and_style() {
    let gw = gateway().await;
    let resp = gw
        .generate(json!({"model": "dall-e-3", "prompt": "a castle", "quality": "hd", "style": "natural", "user": "u-1"}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"][0]["revised_prompt"], "a castle");
}

#[tokio::test]
async fn validation_errors_are_400_and_name_the_field() {
    let gw = gateway().await;
    let cases = [
        (json!({}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "a".repeat(1001)}), "prompt"),
        (
            json!({"model": "dall-e-3", "prompt": "a".repeat(4001)}),
            "prompt",
        ),
        (json!({"prompt": "x", "n": 11}), "n"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "n": "1"}), "n"),
        (json!({"model": "dall-e-3", "prompt": "x", "n": 2}), "n"),
        (json!({"prompt": "x", "size": "1792x1024"}), "size"),
        (
            json!({"model": "dall-e-3", "prompt": "x", "size": "256x256"}),
            "size",
        ),
        (json!({"prompt": "x", "size": "big"}), "size"),
        (json!({"prompt": "x", "quality": "hd"}), "quality"),
        (json!({"prompt": "x", "style": "vivid"}), "style"),
        (
            json!({"model": "dall-e-3", "prompt": "x", "quality": "ultra"}),
            "quality",
        ),
        (
            json!({"model": "dall-e-3", "prompt": "x", "style": "anime"}),
            "style",
        ),
        (
            json!({"prompt": "x", "response_format": "png"}),
            "response_format",
        ),
        (json!({"prompt": "x", "user": 7}), "user"),
        (json!({"prompt": "x", "seed": 7}), "seed"),
    ];
    for (body, param) in cases {
        let err = expect_error(gw.generate(body.clone()).await, 400).await;
        assert_eq!(err["param"], param, "{body} -> {err}");
        assert_eq!(err["type"], "invalid_request_error");
    }
    // dall-e-3's n rule uses OpenAI's wording.
    let err = expect_error(
        gw.generate(json!({"model": "dall-e-3", "prompt": "x", "n": 2}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["message"], "You must provide n=1 for this model.");
    // Limits are inclusive and count characters.
    let ok = gw.generate(json!({"prompt": "ü".repeat(1000), "size": "256x256", "n": 10, "response_format": "b64_json"})).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn malformed_bodies_wrong_content_type_and_oversize_bodies() {
    let gw = gateway().await;
    let post = |body: &'static str, ct: Option<&'static str>| {
        let mut rb = client()
            .post(gw.url("/v1/images/generations"))
            .bearer_auth(DEMO_KEY)
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        rb.send()
    };
    let err = expect_error(
        post("{\"prompt\":", Some("application/json"))
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("parse the JSON body"));
    expect_error(
        post("[\"prompt\"]", Some("application/json"))
            .await
            .unwrap(),
        400,
    )
    .await;
    let err = expect_error(
        post("{\"prompt\":\"x\"}", Some("text/plain"))
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("Content-Type"));
    expect_error(post("{\"prompt\":\"x\"}", None).await.unwrap(), 400).await;
    assert_eq!(
        post(
            "{\"prompt\":\"x\",\"size\":\"256x256\"}",
            Some("application/json; charset=utf-8")
        )
        .await
        .unwrap()
        .status(),
        200
    );

    let huge = format!("{{\"prompt\":\"{}\"}}", "a".repeat(1024 * 1024 + 10));
    let resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_error(resp, 413).await;
}

#[tokio::test]
async fn body_limit_is_configurable_and_applies_to_chunked_bodies() {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        "log: {level: warn}\nserver: {max_body_bytes: 2048}",
    );
    let gw = Gateway::start(&yaml).await;
    let body = format!("{{\"prompt\":\"{}\"}}", "a".repeat(3000));
    // A streamed body has no Content-Length: the limit must hold while reading.
    let stream = futures_stream(body.into_bytes());
    let resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413).await;
}

fn futures_stream(
    bytes: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(512).map(|c| Ok(c.to_vec())).collect();
    tokio_stream::iter(chunks)
}

#[tokio::test]
async fn auth_failures_are_401_invalid_api_key() {
    let gw = gateway().await;
    let body = json!({"prompt": "x", "size": "256x256"});
    for key in ["sk-wrong", "sk-revoked-key", "sk-off-tenant-key"] {
        let err = expect_error(gw.generate_as(key, body.clone()).await, 401).await;
        assert_eq!(err["code"], "invalid_api_key");
        assert!(
            !err["message"].as_str().unwrap().contains(key),
            "the key must not be echoed"
        );
    }
    for header in [
        None,
        Some("Basic abc"),
        Some("Bearer"),
        Some("sk-imagegate-demo"),
    ] {
        let mut rb = client().post(gw.url("/v1/images/generations")).json(&body);
        if let Some(h) = header {
            rb = rb.header("authorization", h);
        }
        let err = expect_error(rb.send().await.unwrap(), 401).await;
        assert_eq!(err["code"], "invalid_api_key");
    }
    // A key stored only as its SHA-256 works.
    assert_eq!(gw.generate_as("sk-hashed-secret", body).await.status(), 200);
}

#[tokio::test]
async fn unknown_and_forbidden_models_get_the_same_404() {
    let gw = gateway().await;
    let err = expect_error(
        gw.generate(json!({"model": "dall-e-9", "prompt": "x"}))
            .await,
        404,
    )
    .await;
    assert_eq!(err["code"], "model_not_found");
    assert_eq!(
        err["message"],
        "The model `dall-e-9` does not exist or you do not have access to it."
    );
    let forbidden = expect_error(
        gw.generate_as("sk-narrow-key", json!({"model": "dall-e-3", "prompt": "x"}))
            .await,
        404,
    )
    .await;
    assert_eq!(
        forbidden["message"],
        "The model `dall-e-3` does not exist or you do not have access to it."
    );
    assert_eq!(forbidden["code"], "model_not_found");
    let ok = gw
        .generate_as("sk-narrow-key", json!({"prompt": "x", "size": "256x256"}))
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn models_lists_exactly_what_the_key_may_use() {
    let gw = gateway().await;
    let list = |key: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            let resp = client().get(url).bearer_auth(key).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["object"], "list");
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    assert_eq!(m["object"], "model");
                    m["id"].as_str().unwrap().to_string()
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(DEMO_KEY).await, ["dall-e-2", "dall-e-3"]);
    assert_eq!(list("sk-narrow-key").await, ["dall-e-2"]);
    let one = client()
        .get(gw.url("/v1/models/dall-e-2"))
        .bearer_auth("sk-narrow-key")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let hidden = client()
        .get(gw.url("/v1/models/dall-e-3"))
        .bearer_auth("sk-narrow-key")
        .send()
        .await
        .unwrap();
    expect_error(hidden, 404).await;
    let anon = client().get(gw.url("/v1/models")).send().await.unwrap();
    expect_error(anon, 401).await;
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let gw = gateway().await;
    let resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .header("x-request-id", "client-abc-123")
        .json(&json!({"prompt": "x", "size": "256x256"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-abc-123");
    let resp = client()
        .post(gw.url("/v1/images/generations"))
        .header("x-request-id", "bad id with spaces")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req_") && id.len() > 10, "{id}");
    assert_eq!(resp.status(), 401, "errors carry the id too");
}

#[tokio::test]
async fn image_links_reject_tampering_expiry_and_unknown_names() {
    let gw = gateway().await;
    let body: serde_json::Value = gw
        .generate(json!({"prompt": "x", "size": "256x256"}))
        .await
        .json()
        .await
        .unwrap();
    let url = body["data"][0]["url"].as_str().unwrap().to_string();
    let (path, query) = url.split_once('?').unwrap();

    let get = |u: String| async move { client().get(u).send().await.unwrap() };
    let etag = get(url.clone()).await.headers()["etag"].clone();
    let cached = client()
        .get(&url)
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);

    let tampered = format!("{path}?{}", query.replace("expires=", "expires=1"));
    let err = expect_error(get(tampered).await, 403).await;
    assert_eq!(err["message"], "This image link is not valid.");
    expect_error(get(path.to_string()).await, 403).await;
    let other = path.replacen("/images/", "/images/0", 1);
    let other = format!("{}?{query}", &other[..other.len() - 5]);
    expect_error(get(other).await, 404).await;
    expect_error(get(gw.url("/images/..%2Fsigning.key")).await, 404).await;
}

#[tokio::test]
async fn expired_links_are_403_and_swept_files_are_gone() {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        "log: {level: warn}\nimages: {url_ttl: 2s}",
    );
    let gw = Gateway::start(&yaml).await;
    let body: serde_json::Value = gw
        .generate(json!({"prompt": "x", "size": "256x256"}))
        .await
        .json()
        .await
        .unwrap();
    let url = body["data"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let err = expect_error(client().get(&url).send().await.unwrap(), 403).await;
    assert_eq!(err["message"], "This image link has expired.");
}

#[tokio::test]
async fn health_endpoints_and_unknown_routes() {
    let gw = gateway().await;
    assert_eq!(
        client()
            .get(gw.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    expect_error(client().get(gw.url("/v1/nope")).send().await.unwrap(), 404).await;
    expect_error(
        client()
            .get(gw.url("/v1/images/generations"))
            .send()
            .await
            .unwrap(),
        405,
    )
    .await;
}

#[tokio::test]
async fn custom_rules_apply_to_a_custom_model() {
    let models = "  sdxl: {rules: {sizes: [512x512, 768x768], max_n: 2, max_prompt_chars: 20, quality: [standard, hd]}, price: free, route: {targets: [{backend: sandbox}]}}";
    let gw = Gateway::start(&sandbox_config("", models)).await;
    let ok = gw
        .generate(json!({"model": "sdxl", "prompt": "x", "n": 2, "quality": "hd", "response_format": "b64_json"}))
        .await;
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    let img =
        image::load_from_memory(&unb64(body["data"][0]["b64_json"].as_str().unwrap())).unwrap();
    assert_eq!(
        img.width(),
        512,
        "default size is the first listed when 1024x1024 is not allowed"
    );
    for (body, param) in [
        (json!({"model": "sdxl", "prompt": "x", "n": 3}), "n"),
        (json!({"model": "sdxl", "prompt": "x".repeat(21)}), "prompt"),
        (
            json!({"model": "sdxl", "prompt": "x", "size": "1024x1024"}),
            "size",
        ),
        (
            json!({"model": "sdxl", "prompt": "x", "style": "vivid"}),
            "style",
        ),
    ] {
        let err = expect_error(gw.generate(body).await, 400).await;
        assert_eq!(err["param"], param);
    }
}

#[tokio::test]
async fn tenant_rate_limits_answer_429_with_retry_after() {
    let yaml = sandbox_config("", "").replace(
        "demo: {models: [\"*\"]}",
        "demo: {models: [\"*\"], limits: {requests_per_minute: 2, images_per_minute: 3}}",
    );
    let gw = Gateway::start(&yaml).await;
    let body = json!({"prompt": "x", "size": "256x256", "response_format": "b64_json"});
    let first = gw.generate(body.clone()).await;
    assert_eq!(first.status(), 200);
    let h = |r: &reqwest::Response, name: &str| r.headers()[name].to_str().unwrap().to_string();
    assert_eq!(h(&first, "x-ratelimit-limit-requests"), "2");
    assert_eq!(h(&first, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(h(&first, "x-ratelimit-reset-requests"), "30s");
    assert_eq!(h(&first, "x-ratelimit-limit-images"), "3");
    assert_eq!(h(&first, "x-ratelimit-remaining-images"), "2");
    assert_eq!(gw.generate(body.clone()).await.status(), 200);
    let resp = gw.generate(body.clone()).await;
    assert_eq!(h(&resp, "x-ratelimit-remaining-requests"), "0");
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let err = expect_error(resp, 429).await;
    assert_eq!(err["code"], "rate_limit_exceeded");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("requests per minute"));
    // Another tenant is not affected.
    assert_eq!(gw.generate_as("sk-narrow-key", body).await.status(), 200);
}

/// I-JSON (RFC 7493): a member given twice is a 400 naming it, never "the last one wins"
/// (a filter that reads the first value would see another prompt than the one generated).
#[tokio::test]
async fn a_json_member_given_twice_is_refused_naming_it() {
    let gw = gateway().await;
    for (body, param) in [
        (r#"{"prompt":"a cat","prompt":"something else"}"#, "prompt"),
        (r#"{"prompt":"a cat","n":1,"size":"256x256","n":2}"#, "n"),
    ] {
        let resp = client()
            .post(gw.url("/v1/images/generations"))
            .bearer_auth(DEMO_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let err = expect_error(resp, 400).await;
        assert_eq!(err["param"], param, "{body}: {err}");
        assert!(
            err["message"].as_str().unwrap().contains("more than once"),
            "{err}"
        );
    }
}
