//! Fake AUTOMATIC1111 and ComfyUI nodes that follow the real request and response shapes
//! (UPSTREAMS.md §4, §5), including their failure modes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::{b64, tiny_png, FakeUpstream, Recorded, Reply};

pub const SAMPLERS: &[&str] = &["Euler a", "Euler", "DPM++ 2M"];

/// Knobs of a fake node.
#[derive(Clone, Default)]
pub struct NodeControl {
    /// Each generation takes this long.
    pub delay: Duration,
    /// Health endpoints answer 500 while set.
    pub unhealthy: Arc<AtomicBool>,
    /// `--api-auth user:pass`.
    pub basic_auth: Option<(&'static str, &'static str)>,
}

fn raw(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), content_type.into())],
        body: body.into(),
        delay: Duration::ZERO,
    }
}

fn basic_ok(r: &Recorded, auth: Option<(&str, &str)>) -> bool {
    let Some((user, pass)) = auth else {
        return true;
    };
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    r.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
}

/// AUTOMATIC1111 `--api`: txt2img, img2img, progress, interrupt.
pub async fn fake_a1111(control: NodeControl) -> FakeUpstream {
    FakeUpstream::start(move |r| {
        if !basic_ok(r, control.basic_auth) {
            return raw(401, "application/json", r#"{"detail":"Incorrect credentials"}"#);
        }
        let unhealthy = control.unhealthy.load(Ordering::SeqCst);
        match (r.method.as_str(), r.path_and_query.split('?').next().unwrap_or("")) {
            ("POST", path @ ("/sdapi/v1/txt2img" | "/sdapi/v1/img2img")) => {
                let b = &r.body;
                if path.ends_with("img2img") && b["init_images"].as_array().is_none_or(|a| a.is_empty()) {
                    return Reply::json(422, json!({"detail": [{"loc": ["body", "init_images"], "msg": "field required", "type": "value_error.missing"}]}));
                }
                if let Some(s) = b["sampler_name"].as_str() {
                    if !SAMPLERS.contains(&s) {
                        return Reply::json(404, json!({"error": "HTTPException", "detail": "Sampler not found", "body": "", "errors": ""}));
                    }
                }
                let (w, h) = (b["width"].as_u64().unwrap_or(512), b["height"].as_u64().unwrap_or(512));
                if w % 8 != 0 || h % 8 != 0 || b["steps"].as_u64() == Some(0) {
                    return Reply::json(422, json!({"detail": [{"loc": ["body", "width"], "msg": "invalid", "type": "value_error"}]}));
                }
                if b["prompt"].as_str().unwrap_or("").contains("out of memory") {
                    return Reply::json(500, json!({"error": "RuntimeError", "detail": "", "body": "", "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"}));
                }
                let batch = b["batch_size"].as_u64().unwrap_or(1) * b["n_iter"].as_u64().unwrap_or(1);
                let png = b64(&tiny_png(w as u32, h as u32));
                let seed = b["seed"].as_i64().unwrap_or(-1);
                let seeds: Vec<i64> = (0..batch as i64).map(|i| seed + i).collect();
                let info = json!({"prompt": b["prompt"], "all_seeds": seeds, "seed": seed, "width": w, "height": h,
                                  "index_of_first_image": 0, "batch_size": batch}).to_string();
                Reply::json(200, json!({"images": vec![png; batch as usize], "parameters": b, "info": info}))
                    .delay(control.delay)
            }
            ("GET", "/sdapi/v1/progress") if unhealthy => Reply::json(500, json!({"error": "RuntimeError", "errors": "down"})),
            ("GET", "/sdapi/v1/progress") => Reply::json(200, json!({"progress": 0.0, "eta_relative": 0.0,
                "state": {"skipped": false, "interrupted": false, "job": "", "job_count": 0, "job_no": 0,
                          "sampling_step": 0, "sampling_steps": 0}, "current_image": null, "textinfo": null})),
            ("POST", "/sdapi/v1/interrupt") => Reply::json(200, json!({})),
            _ => Reply::json(404, json!({"detail": "Not Found"})),
        }
    })
    .await
}

struct ComfyJob {
    ready_at: Instant,
    width: u64,
    height: u64,
    batch: u64,
    prefix: String,
    fails: bool,
}

/// ComfyUI: /prompt -> /history/{id} -> /view, node_errors, execution errors, interrupt.
pub async fn fake_comfyui(
    control: NodeControl,
    checkpoints: &'static [&'static str],
) -> FakeUpstream {
    let jobs: Arc<Mutex<HashMap<String, ComfyJob>>> = Arc::default();
    let counter = Arc::new(Mutex::new(0u64));
    // Files uploaded into the node's input folder, by name.
    let uploaded: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    FakeUpstream::start(move |r| {
        let path = r.path_and_query.split('?').next().unwrap_or("").to_string();
        let path = path.strip_prefix("/api").unwrap_or(&path).to_string();
        match (r.method.as_str(), path.as_str()) {
            ("POST", "/upload/image") => {
                // multipart: `image` (the file), `type`, `overwrite`; answers the stored name.
                let text = String::from_utf8_lossy(&r.raw);
                let Some(name) = text.split("filename=\"").nth(1).and_then(|t| t.split('"').next()) else {
                    return raw(400, "text/plain", "no image");
                };
                let start = r.raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(0);
                let body_end = r.raw[start..].windows(4).position(|w| w == b"\r\n--").map(|i| start + i).unwrap_or(r.raw.len());
                uploaded.lock().unwrap().insert(name.to_string(), r.raw[start..body_end].to_vec());
                Reply::json(200, json!({"name": name, "subfolder": "", "type": "input"}))
            }
            ("POST", "/prompt") => {
                let graph = &r.body["prompt"];
                let Some(nodes) = graph.as_object().filter(|n| !n.is_empty()) else {
                    return Reply::json(400, json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}}, "node_errors": {}}));
                };
                let mut node_errors = serde_json::Map::new();
                for (id, node) in nodes {
                    if node["class_type"] == "CheckpointLoaderSimple" {
                        let ckpt = node["inputs"]["ckpt_name"].as_str().unwrap_or("");
                        if !checkpoints.contains(&ckpt) {
                            node_errors.insert(id.clone(), json!({"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                "details": format!("ckpt_name: '{ckpt}' not in {checkpoints:?}"),
                                "extra_info": {"input_name": "ckpt_name", "received_value": ckpt}}],
                                "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}));
                        }
                    }
                }
                for (id, node) in nodes {
                    let class = node["class_type"].as_str().unwrap_or("");
                    if class == "LoadImage" || class == "LoadImageMask" {
                        let file = node["inputs"]["image"].as_str().unwrap_or("");
                        if !uploaded.lock().unwrap().contains_key(file) {
                            node_errors.insert(id.clone(), json!({"errors": [{"type": "custom_validation_failed",
                                "message": "Custom validation failed for node", "details": format!("image - Invalid image file: {file}"),
                                "extra_info": {}}], "dependent_outputs": ["9"], "class_type": class}));
                        }
                    }
                }
                if !node_errors.is_empty() {
                    return Reply::json(400, json!({"error": {"type": "prompt_outputs_failed_validation",
                        "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": node_errors}));
                }
                let latent = nodes.values().find(|n| n["class_type"] == "EmptyLatentImage" || n["class_type"] == "ImageScale")
                    .cloned().unwrap_or(Value::Null);
                let save = nodes.values().find(|n| n["class_type"] == "SaveImage").cloned().unwrap_or(Value::Null);
                let text = nodes.values().filter(|n| n["class_type"] == "CLIPTextEncode")
                    .map(|n| n["inputs"]["text"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>().join(" ");
                let mut n = counter.lock().unwrap();
                *n += 1;
                let id = format!("9c6f{:04}-0000-4000-8000-000000000000", *n);
                jobs.lock().unwrap().insert(id.clone(), ComfyJob {
                    ready_at: Instant::now() + control.delay,
                    width: latent["inputs"]["width"].as_u64().unwrap_or(512),
                    height: latent["inputs"]["height"].as_u64().unwrap_or(512),
                    batch: latent["inputs"]["batch_size"].as_u64().unwrap_or(1),
                    prefix: save["inputs"]["filename_prefix"].as_str().unwrap_or("ComfyUI").to_string(),
                    fails: text.contains("explode"),
                });
                Reply::json(200, json!({"prompt_id": id, "number": *n, "node_errors": {}}))
            }
            ("GET", p) if p.starts_with("/history/") => {
                let id = &p["/history/".len()..];
                let jobs = jobs.lock().unwrap();
                let Some(job) = jobs.get(id).filter(|j| Instant::now() >= j.ready_at) else {
                    return Reply::json(200, json!({}));
                };
                if job.fails {
                    return Reply::json(200, json!({id: {"outputs": {}, "status": {"status_str": "error", "completed": false,
                        "messages": [["execution_start", {"prompt_id": id, "timestamp": 1}],
                                     ["execution_error", {"prompt_id": id, "node_id": "3", "node_type": "KSampler",
                                      "exception_message": "Allocation on device 0 would exceed allowed memory.\n",
                                      "exception_type": "torch.OutOfMemoryError", "traceback": []}]]}}}));
                }
                let images: Vec<Value> = (0..job.batch)
                    .map(|i| json!({"filename": format!("{}_{:05}_.png", job.prefix, i + 1), "subfolder": "", "type": "output"}))
                    .collect();
                Reply::json(200, json!({id: {"prompt": [1, id, {}, {}, ["9"]], "outputs": {"9": {"images": images}},
                    "status": {"status_str": "success", "completed": true, "messages": []},
                    "meta": {"9": {"node_id": "9"}}}}))
            }
            ("GET", "/view") => {
                let query = r.path_and_query.split_once('?').map(|x| x.1).unwrap_or("");
                let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
                let filename = params.get("filename").cloned().unwrap_or_default();
                if filename.starts_with('/') || filename.contains("..") || params.get("type").map(String::as_str) != Some("output") {
                    return raw(400, "text/plain", "invalid filename");
                }
                let jobs = jobs.lock().unwrap();
                match jobs.values().find(|j| filename.starts_with(&format!("{}_", j.prefix))) {
                    Some(j) => raw(200, "image/png", tiny_png(j.width as u32, j.height as u32)),
                    None => raw(404, "text/plain", "404: Not Found"),
                }
            }
            ("POST", "/interrupt") | ("POST", "/queue") => raw(200, "text/plain", ""),
            ("GET", "/system_stats") if control.unhealthy.load(Ordering::SeqCst) => raw(500, "text/plain", "500"),
            ("GET", "/system_stats") => Reply::json(200, json!({"system": {"os": "posix", "comfyui_version": "0.3.40"}, "devices": []})),
            _ => raw(404, "text/plain", "404: Not Found"),
        }
    })
    .await
}
