//! AUTOMATIC1111 and ComfyUI nodes as backends: the exact upstream request built from each
//! field, batching, per-node capacity, cancellation past the deadline, node errors, probes.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::local_nodes::{fake_a1111, fake_comfyui, NodeControl};
use support::*;

const WORKFLOW: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/comfyui/txt2img_api.json"
);

fn a1111_config(url: &str, extra: &str, model_timeout: &str) -> String {
    let backends = format!(
        "  gpu: {{kind: automatic1111, base_url: \"{url}\", username: ops, password: s3cret, sampler: \"Euler a\", \
         checkpoint: sdxl_base.safetensors, negative_prompt: \"blurry, lowres\", seed: 1234, max_batch: 2{extra}}}"
    );
    let models = format!(
        "  sd-d3: {{rules: dall-e-3, timeout: {model_timeout}, route: {{targets: [{{backend: gpu}}]}}}}\n  \
           sd-d2: {{rules: dall-e-2, timeout: {model_timeout}, route: {{targets: [{{backend: gpu}}]}}}}"
    );
    sandbox_config(&backends, &models)
}

fn control() -> NodeControl {
    NodeControl {
        basic_auth: Some(("ops", "s3cret")),
        ..NodeControl::default()
    }
}

fn txt2img_calls(fake: &FakeUpstream) -> Vec<serde_json::Value> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/sdapi/v1/txt2img")
        .map(|r| r.body)
        .collect()
}

fn size_of(b64_png: &str) -> (u32, u32) {
    let img = image::load_from_memory(&unb64(b64_png)).unwrap();
    (img.width(), img.height())
}

#[tokio::test]
async fn a1111_request_is_built_from_every_field() {
    let fake = fake_a1111(control()).await;
    let gw = Gateway::start(&a1111_config(&fake.base_url(), "", "30s")).await;
    let resp = gw
        .generate(
            json!({"model": "sd-d3", "prompt": "a lighthouse", "size": "1792x1024", "quality": "hd",
                         "style": "natural", "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-imagegate-backend"], "gpu");
    let body: serde_json::Value = resp.json().await.unwrap();
    let sent_prompt = "a lighthouse, natural lighting, realistic, muted colors";
    assert_eq!(body["data"][0]["revised_prompt"], sent_prompt);
    assert_eq!(
        size_of(body["data"][0]["b64_json"].as_str().unwrap()),
        (1792, 1024)
    );
    let calls = txt2img_calls(&fake);
    assert_eq!(
        calls,
        [
            json!({"prompt": sent_prompt, "negative_prompt": "blurry, lowres", "width": 1792, "height": 1024,
                "batch_size": 1, "n_iter": 1, "steps": 40, "cfg_scale": 7.5, "seed": 1234, "sampler_name": "Euler a",
                "send_images": true, "save_images": false,
                "override_settings": {"sd_model_checkpoint": "sdxl_base.safetensors"},
                "override_settings_restore_afterwards": false})
        ]
    );

    // standard quality and vivid style.
    gw.generate(json!({"model": "sd-d3", "prompt": "p", "size": "1024x1792", "style": "vivid"}))
        .await;
    let call = &txt2img_calls(&fake)[1];
    assert_eq!(
        (call["steps"].as_u64(), call["cfg_scale"].as_f64()),
        (Some(20), Some(7.0))
    );
    assert_eq!(
        call["prompt"],
        "p, vivid colors, dramatic lighting, hyper-detailed"
    );
    assert_eq!(
        (call["width"].as_u64(), call["height"].as_u64()),
        (Some(1024), Some(1792))
    );
}

#[tokio::test]
async fn a1111_splits_n_above_max_batch_and_continues_the_seed() {
    let fake = fake_a1111(control()).await;
    let gw = Gateway::start(&a1111_config(&fake.base_url(), "", "30s")).await;
    let resp = gw
        .generate(json!({"model": "sd-d2", "prompt": "fox", "n": 5, "size": "512x512", "response_format": "b64_json"}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 5);
    assert!(data
        .iter()
        .all(|d| size_of(d["b64_json"].as_str().unwrap()) == (512, 512)));
    assert!(
        data[0].get("revised_prompt").is_none(),
        "no style, prompt unchanged"
    );
    let calls = txt2img_calls(&fake);
    let batches: Vec<_> = calls
        .iter()
        .map(|c| c["batch_size"].as_u64().unwrap())
        .collect();
    let seeds: Vec<_> = calls.iter().map(|c| c["seed"].as_u64().unwrap()).collect();
    assert_eq!(batches, [2, 2, 1]);
    assert_eq!(seeds, [1234, 1236, 1238]);
}

#[tokio::test]
async fn a1111_errors_map_to_502() {
    let fake = fake_a1111(control()).await;
    let gw = Gateway::start(&a1111_config(&fake.base_url(), "", "30s")).await;
    let err = expect_error(
        gw.generate(json!({"model": "sd-d2", "prompt": "out of memory"}))
            .await,
        502,
    )
    .await;
    assert_eq!(err["code"], "upstream_error");
    let gw =
        Gateway::start(&a1111_config(&fake.base_url(), "", "30s").replace("Euler a", "Nope")).await;
    expect_error(
        gw.generate(json!({"model": "sd-d2", "prompt": "x"})).await,
        502,
    )
    .await;
    let gw =
        Gateway::start(&a1111_config(&fake.base_url(), "", "30s").replace("s3cret", "wrong")).await;
    let err = expect_error(
        gw.generate(json!({"model": "sd-d2", "prompt": "x"})).await,
        502,
    )
    .await;
    assert_eq!(err["code"], "upstream_auth_failed");
}

#[tokio::test]
async fn one_job_at_a_time_per_node_in_arrival_order_and_a_bounded_queue() {
    let fake = fake_a1111(NodeControl {
        delay: Duration::from_millis(400),
        ..control()
    })
    .await;
    let gw = Arc::new(
        Gateway::start(&a1111_config(
            &fake.base_url(),
            ", max_concurrency: 1, max_queue: 2",
            "30s",
        ))
        .await,
    );
    let mut running = Vec::new();
    for i in 0..3 {
        let gw = gw.clone();
        running.push(tokio::spawn(async move {
            gw.generate(json!({"model": "sd-d2", "prompt": format!("job {i}"), "size": "256x256"}))
                .await
                .status()
                .as_u16()
        }));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // One running, two queued: the fourth finds the queue full.
    let resp = gw
        .generate(json!({"model": "sd-d2", "prompt": "job 3", "size": "256x256"}))
        .await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let err = expect_error(resp, 503).await;
    assert_eq!(err["code"], "backend_busy");
    for r in running {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(
        fake.max_in_flight.load(Ordering::SeqCst),
        1,
        "the node never saw two jobs at once"
    );
    let order: Vec<_> = txt2img_calls(&fake)
        .iter()
        .map(|c| c["prompt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["job 0", "job 1", "job 2"]);
}

async fn wait_for(fake: &FakeUpstream, path: &str) -> Option<Recorded> {
    for _ in 0..50 {
        if let Some(r) = fake
            .requests()
            .into_iter()
            .find(|r| r.path_and_query == path)
        {
            return Some(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn a1111_job_past_the_deadline_is_interrupted_and_504() {
    let fake = fake_a1111(NodeControl {
        delay: Duration::from_secs(20),
        ..control()
    })
    .await;
    let gw = Gateway::start(&a1111_config(&fake.base_url(), "", "1s")).await;
    let err = expect_error(
        gw.generate(json!({"model": "sd-d2", "prompt": "slow"}))
            .await,
        504,
    )
    .await;
    assert_eq!(err["code"], "upstream_timeout");
    let interrupt = wait_for(&fake, "/sdapi/v1/interrupt")
        .await
        .expect("the job was interrupted");
    assert!(
        interrupt.headers.contains_key("authorization"),
        "interrupt is authenticated too"
    );
}

#[tokio::test]
async fn a_node_failing_its_probe_takes_no_requests_until_it_passes() {
    let ctl = control();
    let fake = fake_a1111(ctl.clone()).await;
    let gw = Gateway::start(&a1111_config(
        &fake.base_url(),
        ", probe_interval: 100ms",
        "30s",
    ))
    .await;
    let state = || async {
        let r: serde_json::Value = client()
            .get(gw.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["backends"]["gpu"]["state"].as_str().unwrap().to_string()
    };
    assert_eq!(
        gw.generate(json!({"model": "sd-d2", "prompt": "x", "size": "256x256"}))
            .await
            .status(),
        200
    );
    ctl.unhealthy.store(true, Ordering::SeqCst);
    let mut seen = String::new();
    for _ in 0..30 {
        seen = state().await;
        if seen == "probe_failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "probe_failed");
    let before = txt2img_calls(&fake).len();
    let err = expect_error(
        gw.generate(json!({"model": "sd-d2", "prompt": "x"})).await,
        503,
    )
    .await;
    assert_eq!(err["code"], "no_backend_available");
    assert_eq!(txt2img_calls(&fake).len(), before);
    ctl.unhealthy.store(false, Ordering::SeqCst);
    for _ in 0..30 {
        if state().await == "healthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gw.generate(json!({"model": "sd-d2", "prompt": "x", "size": "256x256"}))
            .await
            .status(),
        200
    );
}

fn comfy_config(url: &str, extra: &str, model_timeout: &str) -> String {
    let backends = format!(
        "  comfy:\n    kind: comfyui\n    base_url: \"{url}\"\n    workflow: \"{WORKFLOW}\"\n    poll_interval: 50ms\n    \
         checkpoint: sd_xl_base_1.0.safetensors\n    negative_prompt: ugly\n    seed: 77\n    \
         inputs: {{prompt: 6.inputs.text, negative_prompt: 7.inputs.text, seed: 3.inputs.seed, steps: 3.inputs.steps, \
         cfg: 3.inputs.cfg, width: 5.inputs.width, height: 5.inputs.height, batch_size: 5.inputs.batch_size, \
         checkpoint: 4.inputs.ckpt_name, filename_prefix: 9.inputs.filename_prefix}}\n{extra}"
    );
    let models = format!(
        "  comfy-d3: {{rules: dall-e-3, timeout: {model_timeout}, route: {{targets: [{{backend: comfy}}]}}}}\n  \
           comfy-d2: {{rules: dall-e-2, timeout: {model_timeout}, route: {{targets: [{{backend: comfy}}]}}}}"
    );
    sandbox_config(&backends, &models)
}

const CKPTS: &[&str] = &["sd_xl_base_1.0.safetensors"];

#[tokio::test]
async fn comfyui_prompt_history_view_cycle_with_mapped_inputs() {
    let fake = fake_comfyui(NodeControl::default(), CKPTS).await;
    let gw = Gateway::start(&comfy_config(&fake.base_url(), "", "30s")).await;
    let resp = gw
        .client_request(
            json!({"model": "comfy-d3", "prompt": "a castle", "size": "1024x1792", "quality": "hd",
                               "style": "vivid", "response_format": "b64_json"}),
            "req-comfy-1",
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        size_of(body["data"][0]["b64_json"].as_str().unwrap()),
        (1024, 1792)
    );
    let sent_prompt = "a castle, vivid colors, dramatic lighting, hyper-detailed";
    assert_eq!(body["data"][0]["revised_prompt"], sent_prompt);

    let submitted = fake
        .requests()
        .into_iter()
        .find(|r| r.path_and_query == "/prompt")
        .unwrap();
    assert!(submitted.body["client_id"].as_str().unwrap().len() >= 16);
    let g = &submitted.body["prompt"];
    assert_eq!(g["6"]["inputs"]["text"], sent_prompt);
    assert_eq!(g["7"]["inputs"]["text"], "ugly");
    assert_eq!(g["3"]["inputs"]["seed"], 77);
    assert_eq!(g["3"]["inputs"]["steps"], 40);
    assert_eq!(g["3"]["inputs"]["cfg"], 7.5);
    assert_eq!(
        (
            g["5"]["inputs"]["width"].as_u64(),
            g["5"]["inputs"]["height"].as_u64()
        ),
        (Some(1024), Some(1792))
    );
    assert_eq!(g["5"]["inputs"]["batch_size"], 1);
    assert_eq!(g["4"]["inputs"]["ckpt_name"], "sd_xl_base_1.0.safetensors");
    assert_eq!(g["9"]["inputs"]["filename_prefix"], "imagegate_req-comfy-1");
    assert_eq!(
        g["3"]["inputs"]["model"],
        json!(["4", 0]),
        "links are untouched"
    );
    let paths: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.path_and_query.split('?').next().unwrap().to_string())
        .collect();
    assert!(paths.iter().any(|p| p.starts_with("/history/")));
    assert!(paths.iter().any(|p| p == "/view"));

    // n maps to the latent batch: every output comes back.
    let resp = gw
        .generate(json!({"model": "comfy-d2", "prompt": "p", "n": 3, "size": "256x256", "response_format": "b64_json"}))
        .await;
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn comfyui_node_errors_and_execution_errors_are_502_naming_the_node() {
    let fake = fake_comfyui(NodeControl::default(), &["other.safetensors"]).await;
    let gw = Gateway::start(&comfy_config(&fake.base_url(), "", "30s")).await;
    let resp = gw
        .generate(json!({"model": "comfy-d2", "prompt": "x"}))
        .await;
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let err = expect_error(resp, 502).await;
    assert_eq!(err["code"], "upstream_workflow_error");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("node 4 (CheckpointLoaderSimple)") && msg.contains("ckpt_name"),
        "{msg}"
    );

    let fake = fake_comfyui(NodeControl::default(), CKPTS).await;
    let gw = Gateway::start(&comfy_config(&fake.base_url(), "", "30s")).await;
    let err = expect_error(
        gw.generate(json!({"model": "comfy-d2", "prompt": "explode"}))
            .await,
        502,
    )
    .await;
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("node 3 (KSampler)") && msg.contains("exceed allowed memory"),
        "{msg}"
    );
}

#[tokio::test]
async fn comfyui_job_past_the_deadline_is_interrupted_dequeued_and_504() {
    let fake = fake_comfyui(
        NodeControl {
            delay: Duration::from_secs(60),
            ..NodeControl::default()
        },
        CKPTS,
    )
    .await;
    let gw = Gateway::start(&comfy_config(&fake.base_url(), "", "1s")).await;
    let err = expect_error(
        gw.generate(json!({"model": "comfy-d2", "prompt": "slow"}))
            .await,
        504,
    )
    .await;
    assert_eq!(err["code"], "upstream_timeout");
    let interrupt = wait_for(&fake, "/interrupt").await.expect("interrupted");
    let prompt_id = interrupt.body["prompt_id"].as_str().unwrap().to_string();
    assert!(prompt_id.starts_with("9c6f"));
    let dequeued = wait_for(&fake, "/queue")
        .await
        .expect("deleted from the queue");
    assert_eq!(dequeued.body, json!({"delete": [prompt_id]}));
}

#[test]
fn comfyui_config_errors_name_the_input() {
    let yaml = comfy_config("http://127.0.0.1:1", "", "30s")
        .replace("prompt: 6.inputs.text", "prompt: 66.inputs.text");
    // Where each field goes is read from the workflow in the compile step (`check`).
    let err = imagegate::config::Config::from_yaml(&yaml, &|n| match n {
        "PORT" => Some("1".into()),
        "DATA_DIR" => Some("/tmp".into()),
        _ => None,
    })
    .and_then(|c| imagegate::server::check(&c))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("backends.comfy.inputs.prompt: the workflow has no node \"66\""),
        "{err}"
    );
}
