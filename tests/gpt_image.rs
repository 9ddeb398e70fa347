//! DALL·E clients on GPT image upstreams, and GPT image models at the edge.

mod support;

use serde_json::{json, Value};
use support::gpt::fake_gpt_image;
use support::*;

fn config(url: &str, target_extra: &str) -> String {
    let backends = format!(
        "  gpt: {{kind: openai, base_url: \"{url}/v1\", api_key: sk-up}}\n  \
           legacy: {{kind: openai, base_url: \"{url}/legacy/v1\", api_key: sk-up}}"
    );
    let models = format!(
        "  d2: {{rules: dall-e-2, route: {{targets: [{{backend: gpt, model: gpt-image-2, dialect: gpt-image{target_extra}}}]}}}}\n  \
           d3: {{rules: dall-e-3, route: {{targets: [{{backend: gpt, model: gpt-image-2, dialect: gpt-image{target_extra}}}]}}}}\n  \
           gpt-image-2: {{rules: gpt-image-2, route: {{targets: [{{backend: gpt, dialect: gpt-image}}]}}}}\n  \
           gpt-on-sandbox: {{rules: gpt-image-2, route: {{targets: [{{backend: sandbox}}]}}}}"
    );
    sandbox_config(&backends, &models)
}

fn image_size(b64: &str) -> String {
    let img = image::load_from_memory(&unb64(b64)).unwrap();
    format!("{}x{}", img.width(), img.height())
}

fn last_body(fake: &FakeUpstream) -> Value {
    fake.requests().last().unwrap().body.clone()
}

const VIVID: &str = "Style: vivid, hyper-real and dramatic, with rich saturated colors.";
const NATURAL: &str = "Style: natural, realistic and true to life, with soft natural light.";

#[tokio::test]
async fn every_dalle3_size_quality_and_style_translates_exactly() {
    let fake = fake_gpt_image().await;
    let gw = Gateway::start(&config(&fake.base_url(), "")).await;
    for size in ["1024x1024", "1792x1024", "1024x1792"] {
        for (quality, gpt_quality) in [("standard", "medium"), ("hd", "high")] {
            for (style, sentence) in [("vivid", VIVID), ("natural", NATURAL)] {
                let resp = gw
                    .generate(json!({"model": "d3", "prompt": "a red fox", "size": size, "quality": quality,
                                     "style": style, "response_format": "b64_json"}))
                    .await;
                assert_eq!(resp.status(), 200, "{size} {quality} {style}");
                let body: Value = resp.json().await.unwrap();
                let sent_prompt = format!("a red fox {sentence}");
                assert_eq!(
                    last_body(&fake),
                    json!({"model": "gpt-image-2", "prompt": sent_prompt, "n": 1, "size": size,
                           "quality": gpt_quality, "output_format": "png"}),
                );
                let item = &body["data"][0];
                assert_eq!(image_size(item["b64_json"].as_str().unwrap()), size);
                assert_eq!(item["revised_prompt"], sent_prompt.as_str());
                // The contract's shape, nothing more.
                let keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
                assert_eq!(keys, ["created", "data"], "{body}");
            }
        }
    }
    // dall-e-3 defaults: standard, vivid.
    gw.generate(json!({"model": "d3", "prompt": "p"})).await;
    let sent = last_body(&fake);
    assert_eq!(
        (sent["quality"].as_str(), sent["prompt"].as_str()),
        (Some("medium"), Some(format!("p {VIVID}").as_str()))
    );
}

#[tokio::test]
async fn every_dalle2_size_comes_back_exactly_as_asked() {
    let fake = fake_gpt_image().await;
    let gw = Gateway::start(&config(&fake.base_url(), "")).await;
    for (size, upstream) in [
        ("256x256", "816x816"),
        ("512x512", "816x816"),
        ("1024x1024", "1024x1024"),
    ] {
        let resp = gw
            .generate(
                json!({"model": "d2", "prompt": "a boat", "size": size, "n": 2,
                             "response_format": "b64_json", "user": "alice@example.com"}),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        let sent = last_body(&fake);
        assert_eq!(sent["size"], upstream);
        assert_eq!(sent["n"], 2);
        assert_eq!(sent["quality"], "medium");
        assert_eq!(sent["prompt"], "a boat", "no style for dall-e-2");
        let sid = sent["safety_identifier"].as_str().unwrap();
        assert_eq!(sid.len(), 64);
        assert!(
            !sid.contains("alice"),
            "end-user ids stay inside the gateway"
        );
        assert!(sent.get("user").is_none() && sent.get("response_format").is_none());
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        for item in data {
            assert_eq!(image_size(item["b64_json"].as_str().unwrap()), size);
            assert!(item.get("revised_prompt").is_none());
        }
    }
    // url: served from the gateway's store, at the asked size.
    let body: Value = gw
        .generate(json!({"model": "d2", "prompt": "p", "size": "512x512"}))
        .await
        .json()
        .await
        .unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&gw.base));
    let png = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (512, 512));
}

#[tokio::test]
async fn n_is_split_past_the_targets_max_n_and_rules_are_configurable() {
    let fake = fake_gpt_image().await;
    let extra = ", translation: {max_n: 2, quality: {standard: low, hd: high}, pass_user: true, style: {vivid: \"Make it pop.\"}}";
    let gw = Gateway::start(&config(&fake.base_url(), extra)).await;
    let resp = gw
        .generate(json!({"model": "d2", "prompt": "p", "n": 5, "size": "1024x1024", "response_format": "b64_json", "user": "u-7"}))
        .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 5);
    let mut ns: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.body["n"].as_u64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [1, 2, 2]);
    assert!(fake
        .requests()
        .iter()
        .all(|r| r.body["quality"] == "low" && r.body["safety_identifier"] == "u-7"));
    gw.generate(json!({"model": "d3", "prompt": "p", "style": "vivid"}))
        .await;
    assert_eq!(last_body(&fake)["prompt"], "p Make it pop.");
}

#[tokio::test]
async fn gpt_image_models_pass_through_with_every_field_and_usage() {
    let fake = fake_gpt_image().await;
    let gw = Gateway::start(&config(&fake.base_url(), "")).await;
    let resp = gw
        .generate(json!({"model": "gpt-image-2", "prompt": "a logo", "n": 2, "size": "1536x864", "quality": "high",
                         "background": "transparent", "output_format": "webp", "output_compression": 80,
                         "moderation": "low", "safety_identifier": "sid-1", "user": "u", "complexity": "high"}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        last_body(&fake),
        json!({"model": "gpt-image-2", "prompt": "a logo", "n": 2, "size": "1536x864", "quality": "high",
               "background": "transparent", "output_format": "webp", "output_compression": 80,
               "moderation": "low", "safety_identifier": "sid-1", "user": "u", "complexity": "high"})
    );
    assert_eq!(body["background"], "transparent");
    assert_eq!(body["output_format"], "webp");
    assert_eq!(body["quality"], "high");
    assert_eq!(body["size"], "1536x864");
    assert_eq!(body["usage"]["output_tokens"], 8320);
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert!(body["data"][0]["url"].is_null());

    // Defaults: size auto, quality auto.
    gw.generate(json!({"model": "gpt-image-2", "prompt": "p"}))
        .await;
    let sent = last_body(&fake);
    assert_eq!(
        (sent["size"].as_str(), sent["quality"].as_str()),
        (Some("auto"), Some("auto"))
    );
}

#[tokio::test]
async fn gpt_image_models_are_validated_at_the_edge() {
    let fake = fake_gpt_image().await;
    let gw = Gateway::start(&config(&fake.base_url(), "")).await;
    for (extra, param) in [
        (json!({"response_format": "url"}), "response_format"),
        (json!({"style": "vivid"}), "style"),
        (json!({"size": "1000x1000"}), "size"),
        (json!({"size": "3072x1008"}), "size"),
        (json!({"quality": "hd"}), "quality"),
        (json!({"output_compression": 50}), "output_compression"),
        (
            json!({"output_format": "jpeg", "background": "transparent"}),
            "background",
        ),
        (json!({"partial_images": 2}), "partial_images"),
        (json!({"output_format": "gif"}), "output_format"),
        (json!({"complexity": "extreme"}), "complexity"),
    ] {
        let mut body = json!({"model": "gpt-image-2", "prompt": "p"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let err = expect_error(gw.generate(body).await, 400).await;
        assert_eq!(err["param"], param);
    }
    assert!(
        fake.requests().is_empty(),
        "nothing invalid reached the upstream"
    );
}

/// A field OpenAI adds after this release reaches a gpt-image upstream untouched; a backend
/// that cannot honour it refuses it, and a DALL·E model refuses it at the edge.
#[tokio::test]
async fn unknown_fields_pass_through_to_gpt_image_upstreams_only() {
    let fake = fake_gpt_image().await;
    let gw = Gateway::start(&config(&fake.base_url(), "")).await;
    let resp = gw
        .generate(
            json!({"model": "gpt-image-2", "prompt": "p", "prompt_rewriter": {"mode": "off"}}),
        )
        .await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let sent = last_body(&fake);
    assert_eq!(sent["prompt_rewriter"], json!({"mode": "off"}));
    // A field OpenAI does not know either gets OpenAI's own 400, relayed.
    let err = expect_error(
        gw.generate(json!({"model": "gpt-image-2", "prompt": "p", "seed": 7}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["param"], "seed");
    let before = fake.requests().len();
    let err = expect_error(
        gw.generate(json!({"model": "gpt-on-sandbox", "prompt": "p", "seed": 7}))
            .await,
        400,
    )
    .await;
    assert_eq!(
        (err["param"].as_str(), err["code"].as_str()),
        (Some("seed"), Some("unsupported_parameter"))
    );
    let err = expect_error(
        gw.generate(json!({"model": "dall-e-3", "prompt": "p", "seed": 7}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["param"], "seed");
    assert_eq!(
        fake.requests().len(),
        before,
        "nothing refused reached the upstream"
    );
}

#[tokio::test]
async fn gpt_image_models_on_a_local_backend_map_back_or_refuse() {
    let gw = Gateway::start(&config("http://127.0.0.1:1", "")).await;
    let resp = gw.generate(json!({"model": "gpt-on-sandbox", "prompt": "p", "size": "1536x864", "quality": "high"})).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        image_size(body["data"][0]["b64_json"].as_str().unwrap()),
        "1536x864"
    );
    assert_eq!(body["output_format"], "png");
    assert_eq!(body["background"], "opaque");
    assert_eq!(body["quality"], "high");
    assert_eq!(body["size"], "1536x864");
    let err = expect_error(
        gw.generate(json!({"model": "gpt-on-sandbox", "prompt": "p", "background": "transparent"}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["param"], "background");
    let err = expect_error(
        gw.generate(json!({"model": "gpt-on-sandbox", "prompt": "p", "output_format": "jpeg"}))
            .await,
        400,
    )
    .await;
    assert_eq!(err["param"], "output_format");
}
