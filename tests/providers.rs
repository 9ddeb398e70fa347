//! The provider kinds against a fake that speaks each one's protocol (tests/support/providers.rs):
//! both response formats with the bytes checked at the exact size, n > 1 on one-image-per-call
//! providers, each moderation outcome, 429 with retry-after, a job that never finishes (504
//! within the deadline, and the cancel where the provider has one), a garbage answer (502),
//! spent credits (502, no retry), Gemini's token usage in the ledger, Vertex sign-in.

mod support;

use serde_json::{json, Value};
use support::providers::*;
use support::*;

fn config(fake: &str, account: &str) -> String {
    let backends = format!(
        r#"  bfl: {{kind: bfl, base_url: "{fake}/bfl/v1", api_key: {BFL_KEY}, poll_interval: 50ms, max_poll_interval: 200ms, image_hosts: ["127.0.0.1"], allow_private_image_hosts: true}}
  fal: {{kind: fal, base_url: "{fake}/fal", api_key: {FAL_KEY}, poll_interval: 50ms, max_poll_interval: 200ms, image_hosts: ["127.0.0.1"], allow_private_image_hosts: true}}
  replicate: {{kind: replicate, base_url: "{fake}/replicate/v1", api_key: {REPLICATE_KEY}, wait_seconds: 5, poll_interval: 50ms, max_poll_interval: 200ms, image_hosts: ["127.0.0.1"], allow_private_image_hosts: true}}
  stability: {{kind: stability, base_url: "{fake}/stability/v2beta", api_key: {STABILITY_KEY}}}
  gemini: {{kind: gemini, base_url: "{fake}/gemini/v1beta", api_key: {GEMINI_KEY}}}
  vertex: {{kind: gemini, base_url: "{fake}/vertex/v1", service_account: "{account}", project: p1, location: us-central1}}"#
    );
    // Each model's rules and price come from its catalog entry.
    let target = |name: &str, backend: &str, model: &str| {
        format!("  {name}: {{rules: \"{model}\", timeout: 3s, route: {{retry_on: [], targets: [{{backend: {backend}, model: \"{model}\"}}]}}}}")
    };
    let models = [
        target("flux", "bfl", "flux-kontext-pro"),
        target("fal-flux", "fal", "fal-ai/flux/dev"),
        target("rep-flux", "replicate", "black-forest-labs/flux-schnell"),
        target("sd", "stability", "sd3.5-large"),
        target("banana", "gemini", "gemini-3-pro-image"),
        target("imagen", "gemini", "imagen-4.0-generate-001"),
        target("vertex-banana", "vertex", "gemini-3-pro-image"),
        "  flux-many: {rules: dall-e-2, price: dall-e-2, timeout: 5s, route: {targets: [{backend: bfl, model: flux-pro-1.1}]}}".into(),
        "  banana-many: {rules: dall-e-2, price: dall-e-2, route: {targets: [{backend: gemini, model: gemini-3-pro-image}]}}".into(),
        "  sd-many: {rules: dall-e-2, price: dall-e-2, route: {targets: [{backend: stability, model: sd3.5-large}]}}".into(),
        "  fal-many: {rules: dall-e-2, price: dall-e-2, route: {targets: [{backend: fal, model: fal-ai/flux/dev}]}}".into(),
        "  rep-many: {rules: dall-e-2, price: dall-e-2, route: {targets: [{backend: replicate, model: black-forest-labs/flux-schnell}]}}".into(),
        "  banana-tokens: {rules: dall-e-3, route: {targets: [{backend: gemini, model: gemini-3-pro-image}]},\n    \
           price: {per_image: [{size: 1024x1024, micro_usd: 40000}], text_input_per_million: 2000000, \
           text_output_per_million: 12000000, image_output_per_million: 30000000}}".into(),
    ]
    .join("\n");
    sandbox_config(&backends, &models)
}

struct Setup {
    fake: FakeUpstream,
    gw: Gateway,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let fake = fake_providers().await;
    let dir = tempfile::tempdir().unwrap();
    let account = dir.path().join("sa.json");
    std::fs::write(
        &account,
        json!({
            "type": "service_account",
            "client_email": "imagegate@p1.iam.gserviceaccount.com",
            "private_key": include_str!("fixtures/vertex-test-key.pem"),
            "token_uri": format!("{}/token", fake.base_url()),
        })
        .to_string(),
    )
    .unwrap();
    let gw = Gateway::start(&config(&fake.base_url(), &account.display().to_string())).await;
    Setup {
        fake,
        gw,
        _dir: dir,
    }
}

fn png_dims(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).expect("a decodable image");
    (img.width(), img.height())
}

/// A wide DALL·E 3 image in b64_json, then as a URL the gateway hosts: exact size both ways.
async fn both_formats(gw: &Gateway, model: &str) {
    let resp = gw
        .generate(json!({"model": model, "prompt": "a lighthouse", "size": "1792x1024", "response_format": "b64_json"}))
        .await;
    assert_eq!(
        resp.status(),
        200,
        "{model}: {}",
        resp.text().await.unwrap()
    );
    let body: Value = resp.json().await.unwrap();
    let bytes = unb64(body["data"][0]["b64_json"].as_str().unwrap());
    assert_eq!(png_dims(&bytes), (1792, 1024), "{model}");
    let resp = gw
        .generate(json!({"model": model, "prompt": "a lighthouse", "size": "1024x1792"}))
        .await;
    assert_eq!(resp.status(), 200, "{model}");
    let body: Value = resp.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&gw.url("/images/")),
        "{model}: the gateway hosts it: {url}"
    );
    let bytes = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(png_dims(&bytes), (1024, 1792), "{model}");
}

#[tokio::test]
async fn every_kind_generates_in_both_formats_at_the_exact_size() {
    let s = setup().await;
    for model in [
        "flux",
        "fal-flux",
        "rep-flux",
        "sd",
        "banana",
        "imagen",
        "vertex-banana",
    ] {
        both_formats(&s.gw, model).await;
    }
    // The provider's key goes where its protocol says, and nowhere else.
    let reqs = s.fake.requests();
    let bfl = reqs
        .iter()
        .find(|r| r.path_and_query.starts_with("/bfl/v1/flux-kontext-pro"))
        .unwrap();
    assert_eq!(
        (bfl.body["width"].as_u64(), bfl.body["height"].as_u64()),
        (Some(1440), Some(832))
    );
    let files: Vec<_> = reqs
        .iter()
        .filter(|r| r.path_and_query.starts_with("/files/"))
        .collect();
    assert!(!files.is_empty());
    for f in files {
        for h in ["x-key", "authorization", "x-goog-api-key"] {
            assert!(f.headers.get(h).is_none(), "a download carried {h}");
        }
    }
    // Vertex: one token minted (and cached) for both calls.
    assert_eq!(
        reqs.iter().filter(|r| r.path_and_query == "/token").count(),
        1
    );
    let sd = reqs
        .iter()
        .find(|r| r.path_and_query.contains("/stable-image/generate/sd3"))
        .unwrap();
    assert_eq!(form_field(sd, "model").as_deref(), Some("sd3.5-large"));
    assert_eq!(form_field(sd, "aspect_ratio").as_deref(), Some("16:9"));
}

#[tokio::test]
async fn n_images_on_one_image_per_call_providers_are_parallel_calls() {
    let s = setup().await;
    for (model, prefix, calls) in [
        ("flux-many", "/bfl/v1/flux-pro-1.1", 3),
        (
            "banana-many",
            "/gemini/v1beta/models/gemini-3-pro-image:generateContent",
            3,
        ),
        ("sd-many", "/stability/v2beta/stable-image/generate/sd3", 3),
        // Batching providers take up to four per job.
        ("fal-many", "/fal/fal-ai/flux/dev", 1),
        (
            "rep-many",
            "/replicate/v1/models/black-forest-labs/flux-schnell/predictions",
            1,
        ),
    ] {
        let before = s
            .fake
            .requests()
            .iter()
            .filter(|r| r.path_and_query == prefix)
            .count();
        let resp = s
            .gw
            .generate(json!({"model": model, "prompt": "p", "n": 3, "size": "512x512", "response_format": "b64_json"}))
            .await;
        assert_eq!(resp.status(), 200, "{model}");
        let body: Value = resp.json().await.unwrap();
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3, "{model}");
        for d in data {
            assert_eq!(
                png_dims(&unb64(d["b64_json"].as_str().unwrap())),
                (512, 512)
            );
        }
        let after = s
            .fake
            .requests()
            .iter()
            .filter(|r| r.path_and_query == prefix)
            .count();
        assert_eq!(after - before, calls, "{model}");
    }
}

#[tokio::test]
async fn moderation_outcomes_are_content_policy_violations() {
    let s = setup().await;
    for (model, prompt) in [
        ("flux", "moderate-me"),
        ("fal-flux", "moderate-me"),
        ("rep-flux", "moderate-me"),
        ("sd", "moderate-me"),
        ("sd", "blur-me"),
        ("banana", "moderate-me"),
        ("banana", "block-me"),
        ("imagen", "moderate-me"),
    ] {
        let err = expect_error(
            s.gw.generate(json!({"model": model, "prompt": prompt}))
                .await,
            400,
        )
        .await;
        assert_eq!(
            err["code"], "content_policy_violation",
            "{model} {prompt}: {err}"
        );
    }
}

#[tokio::test]
async fn failures_map_to_openai_errors() {
    let s = setup().await;
    let resp =
        s.gw.generate(json!({"model": "flux", "prompt": "no-credits"}))
            .await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_credits_exhausted");
    let text = body.to_string();
    for key in [BFL_KEY, FAL_KEY, REPLICATE_KEY, STABILITY_KEY, GEMINI_KEY] {
        assert!(!text.contains(key));
    }
    // Garbage, then a 429 (which parks the backend for its retry-after: last).
    for model in ["flux", "fal-flux", "rep-flux", "sd", "banana"] {
        let resp =
            s.gw.generate(json!({"model": model, "prompt": "garbage"}))
                .await;
        assert_eq!(resp.status(), 502, "{model}");
        let resp =
            s.gw.generate(json!({"model": model, "prompt": "slow-down"}))
                .await;
        assert_eq!(resp.status(), 429, "{model}");
        assert_eq!(resp.headers()["retry-after"], "7", "{model}");
    }
}

#[tokio::test]
async fn a_job_that_never_finishes_is_a_504_in_time_and_cancelled() {
    let s = setup().await;
    for (model, cancel) in [
        ("flux", None),
        ("fal-flux", Some(("PUT", "/cancel"))),
        ("rep-flux", Some(("POST", "/cancel"))),
    ] {
        let started = std::time::Instant::now();
        let resp =
            s.gw.generate(json!({"model": model, "prompt": "never-done"}))
                .await;
        assert_eq!(resp.status(), 504, "{model}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{model}: {:?}",
            started.elapsed()
        );
        if let Some((method, suffix)) = cancel {
            let mut seen = false;
            for _ in 0..50 {
                seen = s
                    .fake
                    .requests()
                    .iter()
                    .any(|r| r.method == method && r.path_and_query.ends_with(suffix));
                if seen {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(seen, "{model}: the job was not cancelled");
        }
    }
}

#[tokio::test]
async fn gemini_usage_is_billed_with_image_tokens_apart() {
    let s = setup().await;
    let resp =
        s.gw.generate(
            json!({"model": "banana-tokens", "prompt": "p", "n": 1, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    // Gemini's text reply becomes the revised prompt.
    assert!(body["data"][0]["revised_prompt"]
        .as_str()
        .unwrap()
        .starts_with("Here is your image"));
    // usageMetadata: 12 prompt tokens, 10 text and 1,290 image tokens out:
    // 12 x 2 + 10 x 12 + 1290 x 30 = 38,844 micro-dollars, not 1,300 tokens at one rate.
    let metrics = s.gw.metrics().await;
    let spent = line_value(
        &metrics,
        r#"imagegate_spend_microdollars_total{tenant="demo",model="banana-tokens"}"#,
    );
    assert_eq!(spent, Some(38_844.0), "{metrics}");
}

#[tokio::test]
async fn edits_reach_gemini_and_flux_kontext_with_the_image() {
    let s = setup().await;
    let image = tiny_png(64, 64);
    for (model, path) in [
        ("banana", ":generateContent"),
        ("flux", "/bfl/v1/flux-kontext-pro"),
    ] {
        let form = reqwest::multipart::Form::new()
            .text("model", model.to_string())
            .text("prompt", "make it blue")
            .text("response_format", "b64_json")
            .part(
                "image",
                reqwest::multipart::Part::bytes(image.clone())
                    .file_name("in.png")
                    .mime_str("image/png")
                    .unwrap(),
            );
        let resp = client()
            .post(s.gw.url("/v1/images/edits"))
            .bearer_auth(DEMO_KEY)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{model}: {}",
            resp.text().await.unwrap()
        );
        let sent = s
            .fake
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.path_and_query.ends_with(path))
            .unwrap();
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &image);
        let carried = match model {
            "banana" => {
                sent.body["contents"][0]["parts"][1]["inline_data"]["data"].as_str()
                    == Some(b64.as_str())
            }
            _ => sent.body["input_image"].as_str() == Some(b64.as_str()),
        };
        assert!(carried, "{model}: the upload did not reach the provider");
    }
}
