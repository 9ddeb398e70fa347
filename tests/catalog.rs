//! The model catalog: override files hot-reloaded, `check` naming a bad entry's path, the
//! lifecycle at the edge, and token-exact billing from a GPT image upstream's `usage`.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::gpt::fake_gpt_image;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_imagegate");
const KEY: &str = "sk-catalog-key";
const ADMIN: &str = "catalog-admin-token";

fn gateway_yaml(port: u16, dir: &std::path::Path, models: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {data}
server: {{reload_poll: 100ms}}
catalog: [{catalog}]
backends:
  sandbox: {{kind: sandbox}}
models:
{models}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: k, tenant: t, secret: {KEY}}}
"#,
        data = dir.join("data").display(),
        catalog = dir.join("extra.yaml").display(),
    )
}

const STUDIO: &str = r#"
models:
  studio-xl:
    provider: local
    rules: {family: dall-e, sizes: [512x512], max_n: 1, quality: [standard]}
    price: {per_image: [{size: 512x512, micro_usd: 7000}]}
"#;

/// Status and body; status 0 while the gateway is not listening yet.
async fn post(port: u16, body: Value) -> (u16, Value) {
    let Ok(resp) = client()
        .post(format!("http://127.0.0.1:{port}/v1/images/generations"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
    else {
        return (0, Value::Null);
    };
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls until `body` gets `want`, or fails after 10 s.
async fn until_status(port: u16, body: Value, want: u16) -> Value {
    let mut last = (0, Value::Null);
    for _ in 0..100 {
        last = post(port, body.clone()).await;
        if last.0 == want {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never got {want} for {body}; last: {last:?}");
}

#[tokio::test]
async fn an_override_catalog_is_hot_reloaded_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("extra.yaml"), STUDIO).unwrap();
    let config = dir.path().join("gw.yaml");
    let studio = "  studio: {rules: studio-xl, route: {targets: [{backend: sandbox}]}}";
    std::fs::write(&config, gateway_yaml(port, dir.path(), studio)).unwrap();
    let mut child = serve_binary(&config);

    let two = json!({"model": "studio", "prompt": "p", "n": 2, "size": "512x512", "response_format": "b64_json"});
    let err = until_status(port, two.clone(), 400).await;
    assert_eq!(err["error"]["param"], "n");

    // The catalog file alone changes: the model takes n=2 and a second size, no restart.
    std::fs::write(
        dir.path().join("extra.yaml"),
        STUDIO.replace(
            "sizes: [512x512], max_n: 1",
            "sizes: [512x512, 768x768], max_n: 4",
        ),
    )
    .unwrap();
    let ok = until_status(port, two.clone(), 200).await;
    assert_eq!(ok["data"].as_array().unwrap().len(), 2);

    // A new entry, and a model routed to it in gateway.yaml: served at once.
    let added = format!(
        "{}\n  studio-gif:\n    extends: gpt-image-2.5-sunburst\n    provider: local\n",
        std::fs::read_to_string(dir.path().join("extra.yaml")).unwrap()
    );
    std::fs::write(dir.path().join("extra.yaml"), added).unwrap();
    let both = format!(
        "{studio}\n  animated: {{rules: studio-gif, route: {{targets: [{{backend: sandbox}}]}}}}"
    );
    std::fs::write(&config, gateway_yaml(port, dir.path(), &both)).unwrap();
    let body = until_status(
        port,
        json!({"model": "animated", "prompt": "p", "quality": "max"}),
        200,
    )
    .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);

    // A catalog file that contradicts itself is refused; the old catalog keeps serving.
    std::fs::write(
        dir.path().join("extra.yaml"),
        STUDIO.replace("quality: [standard]", "quality: [standard], stream: true"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(post(port, two).await.0, 200);
    child.kill().await.unwrap();
}

#[test]
fn check_names_a_contradicting_entry_and_a_model_without_a_price() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("extra.yaml"),
        r#"
models:
  bad:
    provider: local
    rules: {family: dall-e, sizes: [512x512], output_format: [gif]}
  orphan:
    extends: no-such-model
  loop-a: {extends: loop-b}
  loop-b: {extends: loop-a}
  late:
    provider: openai
    rules: {family: gpt-image}
    lifecycle: {released: 2026-12-01, shutdown_date: 2026-01-01}
"#,
    )
    .unwrap();
    let config = dir.path().join("gw.yaml");
    let models = "  local: {rules: {sizes: [512x512]}, route: {targets: [{backend: sandbox}]}}";
    std::fs::write(&config, gateway_yaml(free_port(), dir.path(), models)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "catalog[0].models.bad.rules: `output_format` is a GPT image field",
        r#"catalog[0].models.orphan.extends: "no-such-model" is not in the catalog"#,
        "catalog[0].models.loop-a.extends: extends itself",
        "catalog[0].models.late.lifecycle.shutdown_date: 2026-01-01 is before the release",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }

    // Without the bad file, the one remaining problem: a model with no price anywhere.
    std::fs::write(dir.path().join("extra.yaml"), "models: {}\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("models.local.price: the model has no price"),
        "{stderr}"
    );
    let free = std::fs::read_to_string(&config).unwrap().replace(
        "route: {targets: [{backend: sandbox}]}}",
        "price: free, route: {targets: [{backend: sandbox}]}}",
    );
    std::fs::write(&config, free).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn models_lists_what_is_served_and_warns_about_shut_down_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("extra.yaml"), "models: {}\n").unwrap();
    let config = dir.path().join("gw.yaml");
    let models = "  old: {rules: gpt-image-1.5, route: {targets: [{backend: up, model: gpt-image-1, dialect: gpt-image}]}}\n  \
                  new: {rules: gpt-image-2.5-flare-2026-09-08, route: {targets: [{backend: up, dialect: gpt-image}]}}";
    let yaml = gateway_yaml(free_port(), dir.path(), models).replace(
        "  sandbox: {kind: sandbox}",
        "  sandbox: {kind: sandbox}\n  up: {kind: openai, base_url: \"http://127.0.0.1:9/v1\", api_key: sk-x}",
    );
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["models", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("models.old.route.targets[0]: the upstream model `gpt-image-1` was shut down on 2026-10-23; route it to `gpt-image-2.5-sunburst` instead"),
        "{stderr}"
    );
    assert!(!stderr.contains("models.new"), "{stderr}");
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let new = listed.iter().find(|m| m["model"] == "new").unwrap();
    // The snapshot resolves to its family's entry: rules, price and all.
    assert_eq!(new["catalog_entry"], "gpt-image-2.5-flare");
    assert!(new["rules"]["quality"]
        .as_array()
        .unwrap()
        .contains(&json!("max")));
    assert_eq!(new["token_rates_per_million"]["image_output"], 30_000_000);
}

fn billing_config(upstream: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
admin: {{tokens_sha256: [{admin}]}}
backends:
  up: {{kind: openai, base_url: "{upstream}/v1", api_key: sk-upstream}}
models:
  gpt-image-2: {{rules: gpt-image-2, route: {{targets: [{{backend: up, dialect: gpt-image}}]}}}}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: k, tenant: t, secret: {KEY}}}
"#,
        admin = hex::encode(imagegate::auth::hash_secret(ADMIN)),
    )
}

/// A GPT image model with no `price:` is billed at the catalog's token rates, each kind of
/// token at its own rate, and the ledger row holds the same figure.
#[tokio::test]
async fn usage_is_priced_per_token_kind_to_the_micro_dollar() {
    let fake = fake_gpt_image().await;
    let gw = Gateway::start(&billing_config(&fake.base_url())).await;
    let resp = gw
        .generate_as(KEY, json!({"model": "gpt-image-2", "prompt": "p", "n": 2}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let usage = &body["usage"];
    let (text_in, image_in) = (
        usage["input_tokens_details"]["text_tokens"]
            .as_u64()
            .unwrap(),
        usage["input_tokens_details"]["image_tokens"]
            .as_u64()
            .unwrap(),
    );
    let image_out = usage["output_tokens_details"]["image_tokens"]
        .as_u64()
        .unwrap();
    assert!(text_in > 0 && image_in > 0 && image_out > 0, "{usage}");
    // gpt-image-2: $5, $8 and $30 per million text-input, image-input and image-output tokens.
    let want =
        (text_in * 5_000_000 + image_in * 8_000_000 + image_out * 30_000_000).div_ceil(1_000_000);
    let rows: Value = client()
        .get(format!("{}/admin/v1/usage?tenant=t", gw.admin_base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &rows["data"][0];
    assert_eq!(row["cost_micro_usd"].as_u64(), Some(want), "{row}");
    // The upstream cost (no upstream_price set) is the catalog's price of the same usage.
    assert_eq!(row["upstream_cost_micro_usd"].as_u64(), Some(want), "{row}");
    // The hold was the catalog's per-image estimate: 2 x $0.053 (1024x1024, auto = medium).
    assert_eq!(row["reserved_micro_usd"].as_u64(), Some(106_000), "{row}");
}

/// A model past its shutdown date that ops have not routed: a 404 naming the replacement. A
/// routed one keeps working, and `/v1/models` carries the catalog's date.
#[tokio::test]
async fn shut_down_models_are_named_at_the_edge() {
    let gw = Gateway::start(&sandbox_config(
        "",
        "  gpt-image-2.5-sunburst: {rules: gpt-image-2.5-sunburst, route: {targets: [{backend: sandbox}]}}",
    ))
    .await;
    let err = expect_error(
        gw.generate(json!({"model": "gpt-image-1", "prompt": "p"}))
            .await,
        404,
    )
    .await;
    assert_eq!(err["code"], "model_not_found");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("was shut down on 2026-10-23"), "{message}");
    assert!(
        message.contains("`gpt-image-2.5-sunburst` instead (served here)"),
        "{message}"
    );
    // A name nobody knows keeps OpenAI's wording.
    let err = expect_error(
        gw.generate(json!({"model": "gpt-image-9", "prompt": "p"}))
            .await,
        404,
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("does not exist"));

    let resp = gw
        .generate(json!({"model": "dall-e-3", "prompt": "p"}))
        .await;
    assert_eq!(resp.status(), 200);
    let d3: Value = client()
        .get(gw.url("/v1/models/dall-e-3"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d3["shutdown_date"], "2026-05-12");
    let list: Value = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sunburst = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-image-2.5-sunburst")
        .unwrap();
    assert!(sunburst.get("shutdown_date").is_none(), "{sunburst}");
}
