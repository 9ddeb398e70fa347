//! One fake server speaking five providers' protocols, each under its own path prefix, as
//! UPSTREAMS.md section 7 describes them: `/bfl/v1` (submit, poll, signed sample URL),
//! `/fal` (queue: submit, status, result, cancel), `/replicate/v1` (predictions with `Prefer:
//! wait`, polling, cancel), `/stability/v2beta` (multipart in, JSON out), `/gemini/v1beta`
//! (generateContent, Imagen predict) and `/vertex/v1` behind `/token` (a service-account JWT
//! exchanged for a bearer token). Images come back at the provider's own size for the aspect
//! ratio asked (the gateway must scale them). The prompt picks a failure: `moderate-me`,
//! `blur-me` (Stability's 200 CONTENT_FILTERED), `block-me` (Gemini blockReason),
//! `never-done`, `slow-down` (429, retry-after 7), `no-credits` (402), `garbage`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{tiny_png, FakeUpstream, Recorded, Reply};

pub const BFL_KEY: &str = "bfl-test-key";
pub const FAL_KEY: &str = "fal-test-key";
pub const REPLICATE_KEY: &str = "r8_test_key";
pub const STABILITY_KEY: &str = "sk-stability-test";
pub const GEMINI_KEY: &str = "gemini-test-key";
pub const VERTEX_TOKEN: &str = "ya29.test-token";

fn png_reply(w: u32, h: u32) -> Reply {
    Reply {
        status: 200,
        headers: vec![("content-type".into(), "image/png".into())],
        body: Bytes::from(tiny_png(w, h)),
        delay: std::time::Duration::ZERO,
    }
}

fn b64_png(w: u32, h: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(tiny_png(w, h))
}

/// The provider's own output size for an aspect ratio (about a megapixel, multiples of 64).
pub fn ratio_size(ratio: &str) -> (u32, u32) {
    let (w, h) = ratio.split_once(':').unwrap_or(("1", "1"));
    let (w, h) = (w.parse::<f64>().unwrap(), h.parse::<f64>().unwrap());
    let scale = (1024.0 * 1024.0 / (w * h)).sqrt();
    let r = |v: f64| ((v * scale / 64.0).round() as u32 * 64).max(64);
    (r(w), r(h))
}

fn host(r: &Recorded) -> String {
    r.headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

fn err(status: u16, body: Value) -> Reply {
    Reply::json(status, body)
}

/// A field of a multipart body (the fake parses as little as it needs).
pub fn form_field(r: &Recorded, name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(&r.raw);
    let marker = format!("name=\"{name}\"");
    let at = text.find(&marker)?;
    let rest = &text[at + marker.len()..];
    let start = rest.find("\r\n\r\n")? + 4;
    let end = rest[start..].find("\r\n--")?;
    Some(rest[start..start + end].to_string())
}

#[derive(Default)]
struct Job {
    size: (u32, u32),
    prompt: String,
    polls: u32,
    count: u32,
}

type Jobs = Arc<Mutex<HashMap<String, Job>>>;

/// The prompt's first word: the gateway appends a DALL·E style sentence to the client's prompt.
fn key(prompt: &str) -> String {
    prompt
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Common prompt-driven failures at submit time.
fn submit_failure(prompt: &str) -> Option<Reply> {
    match prompt {
        "slow-down" => {
            Some(err(429, json!({"detail": "Too many active tasks"})).header("retry-after", "7"))
        }
        "no-credits" => Some(err(402, json!({"detail": "Insufficient credits"}))),
        "garbage" => Some(Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"<html>upstream proxy error</html>"),
            delay: std::time::Duration::ZERO,
        }),
        _ => None,
    }
}

pub async fn fake_providers() -> FakeUpstream {
    let jobs: Jobs = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    FakeUpstream::start(move |r| {
        let path = r
            .path_and_query
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        let id = || {
            format!(
                "job-{}",
                next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            )
        };
        if let Some(rest) = path.strip_prefix("/files/") {
            let (w, h) = rest
                .trim_end_matches(".png")
                .rsplit_once('-')
                .and_then(|(_, s)| s.split_once('x'))
                .map(|(w, h)| (w.parse().unwrap(), h.parse().unwrap()))
                .unwrap_or((64, 64));
            return png_reply(w, h);
        }
        if path.starts_with("/bfl/") {
            return bfl(r, &path, &jobs, &id);
        }
        if path.starts_with("/fal/") {
            return fal(r, &path, &jobs, &id);
        }
        if path.starts_with("/replicate/") {
            return replicate(r, &path, &jobs, &id);
        }
        if path.starts_with("/stability/") {
            return stability(r);
        }
        if path == "/token" {
            let raw = String::from_utf8_lossy(&r.raw);
            if !raw.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
                || !raw.contains("assertion=ey")
            {
                return err(400, json!({"error": "invalid_grant"}));
            }
            return Reply::json(
                200,
                json!({"access_token": VERTEX_TOKEN, "expires_in": 3599, "token_type": "Bearer"}),
            );
        }
        if path.starts_with("/gemini/") || path.starts_with("/vertex/") {
            return gemini(r, &path);
        }
        err(404, json!({"detail": "Not Found"}))
    })
    .await
}

fn bfl(r: &Recorded, path: &str, jobs: &Jobs, id: &dyn Fn() -> String) -> Reply {
    if r.headers.get("x-key").and_then(|k| k.to_str().ok()) != Some(BFL_KEY) {
        return err(
            403,
            json!({"detail": "Not authenticated - Invalid Authentication"}),
        );
    }
    if path == "/bfl/v1/get_result" {
        let query = r
            .path_and_query
            .split_once("id=")
            .map(|(_, id)| id)
            .unwrap_or("");
        let mut jobs = jobs.lock().unwrap();
        let Some(job) = jobs.get_mut(query) else {
            return Reply::json(200, json!({"id": query, "status": "Task not found"}));
        };
        job.polls += 1;
        let status = match job.prompt.as_str() {
            "never-done" => "Pending",
            "moderate-me" if job.polls > 1 => "Content Moderated",
            _ if job.polls > 2 => "Ready",
            _ => "Pending",
        };
        let mut body = json!({"id": query, "status": status, "progress": 0.5});
        if status == "Ready" {
            let (w, h) = job.size;
            body["result"] = json!({"sample": format!("http://{}/files/{query}-{w}x{h}.png?se=2026&sig=x", host(r)),
                                    "prompt": job.prompt, "seed": 42});
        }
        return Reply::json(200, body);
    }
    let prompt = key(r.body["prompt"].as_str().unwrap_or_default());
    if let Some(reply) = submit_failure(&prompt) {
        return reply;
    }
    let (w, h) = (
        r.body["width"].as_u64().unwrap_or(1024),
        r.body["height"].as_u64().unwrap_or(768),
    );
    if w % 32 != 0 || h % 32 != 0 || !(256..=1440).contains(&w) || !(256..=1440).contains(&h) {
        return err(
            422,
            json!({"detail": [{"loc": ["body", "width"], "msg": "must be a multiple of 32 within 256-1440", "type": "value_error"}]}),
        );
    }
    let id = id();
    let polling = format!("http://{}/bfl/v1/get_result?id={id}", host(r));
    jobs.lock().unwrap().insert(
        id.clone(),
        Job {
            size: (w as u32, h as u32),
            prompt,
            ..Job::default()
        },
    );
    Reply::json(200, json!({"id": id, "polling_url": polling}))
}

fn fal(r: &Recorded, path: &str, jobs: &Jobs, id: &dyn Fn() -> String) -> Reply {
    if r.headers.get("authorization").and_then(|k| k.to_str().ok())
        != Some(&format!("Key {FAL_KEY}"))
    {
        return err(401, json!({"detail": "Invalid credentials"}));
    }
    if let Some(rest) = path.strip_prefix("/fal/fal-ai/flux/requests/") {
        let (job_id, what) = rest.split_once('/').unwrap_or((rest, ""));
        let mut jobs = jobs.lock().unwrap();
        let Some(job) = jobs.get_mut(job_id) else {
            return err(404, json!({"detail": "Request not found"}));
        };
        return match (r.method.as_str(), what) {
            ("PUT", "cancel") => Reply::json(202, json!({"status": "CANCELLATION_REQUESTED"})),
            ("GET", "status") => {
                job.polls += 1;
                let status = match (job.prompt.as_str(), job.polls) {
                    ("never-done", _) => "IN_PROGRESS",
                    (_, 1) => "IN_QUEUE",
                    (_, 2) => "IN_PROGRESS",
                    _ => "COMPLETED",
                };
                Reply::json(
                    if status == "COMPLETED" { 200 } else { 202 },
                    json!({"status": status, "queue_position": 0}),
                )
            }
            ("GET", "") => {
                let (w, h) = job.size;
                let images: Vec<Value> = (0..job.count)
                    .map(|i| json!({"url": format!("http://{}/files/{job_id}.{i}-{w}x{h}.png", host(r)), "width": w, "height": h, "content_type": "image/png"}))
                    .collect();
                let flagged = vec![job.prompt == "moderate-me"; job.count as usize];
                Reply::json(
                    200,
                    json!({"images": images, "has_nsfw_concepts": flagged, "seed": 7, "prompt": job.prompt}),
                )
            }
            _ => err(405, json!({"detail": "Method Not Allowed"})),
        };
    }
    let prompt = key(r.body["prompt"].as_str().unwrap_or_default());
    if let Some(reply) = submit_failure(&prompt) {
        return reply;
    }
    let size = &r.body["image_size"];
    let (w, h) = (
        size["width"].as_u64().unwrap_or(1024) as u32,
        size["height"].as_u64().unwrap_or(768) as u32,
    );
    let count = r.body["num_images"].as_u64().unwrap_or(1) as u32;
    if !(1..=4).contains(&count) {
        return err(
            422,
            json!({"detail": [{"loc": ["body", "num_images"], "msg": "ensure this value is less than or equal to 4"}]}),
        );
    }
    let id = id();
    let base = format!("http://{}/fal/fal-ai/flux/requests/{id}", host(r));
    jobs.lock().unwrap().insert(
        id.clone(),
        Job {
            size: (w, h),
            prompt,
            count,
            polls: 0,
        },
    );
    Reply::json(
        200,
        json!({"request_id": id, "response_url": base, "status_url": format!("{base}/status"),
                            "cancel_url": format!("{base}/cancel"), "queue_position": 0}),
    )
}

fn replicate(r: &Recorded, path: &str, jobs: &Jobs, id: &dyn Fn() -> String) -> Reply {
    if r.headers.get("authorization").and_then(|k| k.to_str().ok())
        != Some(&format!("Bearer {REPLICATE_KEY}"))
    {
        return err(
            401,
            json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}),
        );
    }
    let prediction = |id: &str, job: &Job, host: &str| {
        let (w, h) = job.size;
        let status = match (job.prompt.as_str(), job.polls) {
            ("never-done", _) => "processing",
            ("moderate-me", p) if p >= 1 => "failed",
            ("quick", _) => "succeeded",
            (_, p) if p >= 2 => "succeeded",
            (_, 0) => "starting",
            _ => "processing",
        };
        let output: Vec<String> = (0..job.count)
            .map(|i| format!("http://{host}/files/{id}.{i}-{w}x{h}.png"))
            .collect();
        json!({"id": id, "model": "black-forest-labs/flux-schnell", "status": status,
               "output": if status == "succeeded" { json!(output) } else { Value::Null },
               "error": if status == "failed" { json!("NSFW content detected. Try running it again, or try a different prompt.") } else { Value::Null },
               "urls": {"get": format!("http://{host}/replicate/v1/predictions/{id}"),
                        "cancel": format!("http://{host}/replicate/v1/predictions/{id}/cancel")}})
    };
    if let Some(rest) = path.strip_prefix("/replicate/v1/predictions/") {
        let (pid, what) = rest.split_once('/').unwrap_or((rest, ""));
        let mut jobs = jobs.lock().unwrap();
        let Some(job) = jobs.get_mut(pid) else {
            return err(
                404,
                json!({"title": "Not found", "detail": "Not found", "status": 404}),
            );
        };
        if what == "cancel" {
            job.prompt = "canceled".into();
            return Reply::json(200, json!({"id": pid, "status": "canceled"}));
        }
        job.polls += 1;
        return Reply::json(200, prediction(pid, job, &host(r)));
    }
    let input = &r.body["input"];
    let prompt = key(input["prompt"].as_str().unwrap_or_default());
    if let Some(reply) = submit_failure(&prompt) {
        return reply;
    }
    let count = input["num_outputs"].as_u64().unwrap_or(1) as u32;
    if !(1..=4).contains(&count) || input["aspect_ratio"].as_str().is_none() {
        return err(
            422,
            json!({"title": "Input validation failed", "detail": "num_outputs: must be <= 4", "status": 422}),
        );
    }
    let size = ratio_size(input["aspect_ratio"].as_str().unwrap());
    let id = id();
    let job = Job {
        size,
        prompt,
        count,
        polls: 0,
    };
    let body = prediction(&id, &job, &host(r));
    jobs.lock().unwrap().insert(id, job);
    Reply::json(201, body)
}

fn stability(r: &Recorded) -> Reply {
    if r.headers.get("authorization").and_then(|k| k.to_str().ok())
        != Some(&format!("Bearer {STABILITY_KEY}"))
    {
        return err(
            401,
            json!({"id": "e1", "name": "unauthorized", "errors": ["authorization: invalid key"]}),
        );
    }
    let content_type = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("multipart/form-data") {
        return err(
            400,
            json!({"id": "e2", "name": "bad_request", "errors": ["request must be multipart/form-data"]}),
        );
    }
    let prompt = key(&form_field(r, "prompt").unwrap_or_default());
    if prompt.is_empty() {
        return err(
            400,
            json!({"id": "e3", "name": "bad_request", "errors": ["prompt: cannot be empty"]}),
        );
    }
    if let Some(reply) = submit_failure(&prompt) {
        return reply;
    }
    if prompt == "moderate-me" {
        return err(
            403,
            json!({"id": "e4", "name": "content_moderation",
            "errors": ["Your request was flagged by our content moderation system, as a result your request was denied and you were not charged."]}),
        );
    }
    let (w, h) = ratio_size(&form_field(r, "aspect_ratio").unwrap_or_else(|| "1:1".into()));
    let finish = if prompt == "blur-me" {
        "CONTENT_FILTERED"
    } else {
        "SUCCESS"
    };
    Reply::json(
        200,
        json!({"image": b64_png(w, h), "finish_reason": finish, "seed": 343940597}),
    )
}

fn gemini(r: &Recorded, path: &str) -> Reply {
    let vertex = path.starts_with("/vertex/");
    let authorized = if vertex {
        r.headers.get("authorization").and_then(|k| k.to_str().ok())
            == Some(&format!("Bearer {VERTEX_TOKEN}"))
    } else {
        r.headers
            .get("x-goog-api-key")
            .and_then(|k| k.to_str().ok())
            == Some(GEMINI_KEY)
    };
    if !authorized {
        return err(
            403,
            json!({"error": {"code": 403, "message": "Method doesn't allow unregistered callers.", "status": "PERMISSION_DENIED"}}),
        );
    }
    if path.ends_with(":predict") {
        let prompt = key(r.body["instances"][0]["prompt"]
            .as_str()
            .unwrap_or_default());
        if prompt == "moderate-me" {
            return Reply::json(200, json!({}));
        }
        let n = r.body["parameters"]["sampleCount"].as_u64().unwrap_or(1);
        if n > 4 {
            return err(
                400,
                json!({"error": {"code": 400, "message": "sampleCount must be 1-4", "status": "INVALID_ARGUMENT"}}),
            );
        }
        let (w, h) = ratio_size(
            r.body["parameters"]["aspectRatio"]
                .as_str()
                .unwrap_or("1:1"),
        );
        let preds: Vec<Value> = (0..n)
            .map(|_| json!({"bytesBase64Encoded": b64_png(w, h), "mimeType": "image/png"}))
            .collect();
        return Reply::json(200, json!({"predictions": preds}));
    }
    if !path.ends_with(":generateContent") {
        return err(
            404,
            json!({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}),
        );
    }
    let parts = &r.body["contents"][0]["parts"];
    let prompt = key(parts[0]["text"].as_str().unwrap_or_default());
    let prompt = prompt.as_str();
    if let Some(reply) = submit_failure(prompt) {
        return match prompt {
            "slow-down" => err(429, json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}})).header("retry-after", "7"),
            _ => reply,
        };
    }
    if r.body["generationConfig"]["candidateCount"]
        .as_u64()
        .unwrap_or(1)
        != 1
    {
        return err(
            400,
            json!({"error": {"code": 400, "message": "Multiple candidates is not enabled for this model", "status": "INVALID_ARGUMENT"}}),
        );
    }
    let usage = json!({"promptTokenCount": 12, "candidatesTokenCount": 1300, "totalTokenCount": 1312,
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}, {"modality": "TEXT", "tokenCount": 10}]});
    match prompt {
        "block-me" => {
            return Reply::json(
                200,
                json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 12}}),
            )
        }
        "moderate-me" => {
            return Reply::json(
                200,
                json!({"candidates": [{"content": {"parts": [{"text": "I can't make that."}]}, "finishReason": "IMAGE_SAFETY"}], "usageMetadata": usage}),
            )
        }
        _ => {}
    }
    let image_config = &r.body["generationConfig"]["imageConfig"];
    let (w, h) = ratio_size(image_config["aspectRatio"].as_str().unwrap_or("1:1"));
    // An edit answers at its first input's size, as the real model keeps the framing.
    let inputs = parts.as_array().map_or(0, |p| {
        p.iter().filter(|p| p.get("inline_data").is_some()).count()
    });
    Reply::json(
        200,
        json!({"candidates": [{"content": {"role": "model", "parts": [
        {"text": format!("Here is your image ({inputs} inputs).")},
        {"inlineData": {"mimeType": "image/png", "data": b64_png(w, h)}}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": usage, "modelVersion": "gemini-3-pro-image"}),
    )
}
