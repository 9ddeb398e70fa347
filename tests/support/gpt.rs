//! A fake GPT image upstream that enforces the GPT image dialect (as openai-python's
//! `image_generate_params.py` documents it), so a translation mistake fails the test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::{b64, tiny_png, FakeUpstream, Reply};

/// What OpenAI's GPT image endpoints take in December 2026, `prompt_rewriter` included (a
/// field the SDK mentions and the gateway does not know: it must pass through).
const ALLOWED: &[&str] = &[
    "prompt_rewriter",
    "frame_count",
    "frame_duration_ms",
    "svg",
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "safety_identifier",
    "user",
    "stream",
    "partial_images",
    "complexity",
];

fn bad(message: &str, param: &str) -> Reply {
    Reply::json(
        400,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}),
    )
}

/// Why the body breaks the GPT image rules, if it does.
pub fn check(body: &Value) -> Result<(u32, u32, bool), Reply> {
    let obj = body
        .as_object()
        .ok_or_else(|| bad("body must be an object", ""))?;
    for key in obj.keys() {
        if !ALLOWED.contains(&key.as_str()) {
            return Err(bad(&format!("Unknown parameter: '{key}'."), key));
        }
    }
    if !body["model"]
        .as_str()
        .unwrap_or("")
        .starts_with("gpt-image")
    {
        return Err(bad("model must be a GPT image model", "model"));
    }
    let n = body["n"].as_u64().unwrap_or(1);
    if !(1..=10).contains(&n) {
        return Err(bad("n must be between 1 and 10", "n"));
    }
    let size = body["size"].as_str().unwrap_or("auto");
    let (w, h, auto) = if size == "auto" {
        (1024, 1024, true)
    } else {
        let (w, h) = size
            .split_once('x')
            .ok_or_else(|| bad("Invalid size", "size"))?;
        let (w, h): (u32, u32) = (
            w.parse().map_err(|_| bad("Invalid size", "size"))?,
            h.parse().map_err(|_| bad("Invalid size", "size"))?,
        );
        let px = u64::from(w) * u64::from(h);
        if w % 16 != 0
            || h % 16 != 0
            || w.max(h) > 3 * w.min(h)
            || w.max(h) > 3840
            || !(655_360..=8_294_400).contains(&px)
        {
            return Err(bad(&format!("Invalid size '{size}'."), "size"));
        }
        (w, h, false)
    };
    if let Some(q) = body.get("quality") {
        if !["low", "medium", "high", "xhigh", "max", "auto"].contains(&q.as_str().unwrap_or("")) {
            return Err(bad("Invalid quality", "quality"));
        }
    }
    let format = body["output_format"].as_str().unwrap_or("png");
    if !["png", "jpeg", "webp"].contains(&format) {
        return Err(bad("Invalid output_format", "output_format"));
    }
    if body.get("output_compression").is_some() && format == "png" {
        return Err(bad(
            "output_compression requires jpeg or webp",
            "output_compression",
        ));
    }
    if body["background"] == "transparent" && format == "jpeg" {
        return Err(bad("transparent needs png or webp", "background"));
    }
    if body.get("partial_images").is_some() && body["stream"] != true {
        return Err(bad("partial_images requires stream", "partial_images"));
    }
    Ok((w, h, auto))
}

pub fn usage(n: u64) -> Value {
    json!({"input_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
           "output_tokens": 4160 * n, "total_tokens": 50 + 4160 * n,
           "output_tokens_details": {"image_tokens": 4160 * n, "text_tokens": 0}})
}

/// Answers valid requests with `n` real PNGs of exactly the requested size.
pub async fn fake_gpt_image() -> FakeUpstream {
    let cache: Arc<Mutex<HashMap<(u32, u32), String>>> = Arc::default();
    FakeUpstream::start(move |r| {
        let (w, h, _) = match check(&r.body) {
            Ok(v) => v,
            Err(reply) => return reply,
        };
        let n = r.body["n"].as_u64().unwrap_or(1);
        let png = cache
            .lock()
            .unwrap()
            .entry((w, h))
            .or_insert_with(|| b64(&tiny_png(w, h)))
            .clone();
        let quality = match r.body["quality"].as_str().unwrap_or("auto") {
            "auto" => "medium",
            q => q,
        };
        let background = match r.body["background"].as_str().unwrap_or("auto") {
            "transparent" => "transparent",
            _ => "opaque",
        };
        Reply::json(
            200,
            json!({
                "created": 1745000000,
                "background": background,
                "output_format": r.body["output_format"].as_str().unwrap_or("png"),
                "quality": quality,
                "size": format!("{w}x{h}"),
                "data": vec![json!({"b64_json": png}); n as usize],
                "usage": usage(n),
            }),
        )
    })
    .await
}

/// A GPT image upstream that streams: one partial image event at once, then waits until the
/// test calls `release` before sending the completed event. It notices when its client (the
/// gateway) closes the connection.
pub struct StreamingGpt {
    pub addr: std::net::SocketAddr,
    pub release: Arc<tokio::sync::Notify>,
    pub completed_sent: Arc<std::sync::atomic::AtomicBool>,
    pub client_gone: Arc<std::sync::atomic::AtomicBool>,
    pub bodies: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StreamingGpt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn sse(event: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!(
        "event: {}\ndata: {event}\n\n",
        event["type"].as_str().unwrap()
    ))
}

impl StreamingGpt {
    pub async fn start() -> StreamingGpt {
        use http_body_util::{BodyExt, StreamBody};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(tokio::sync::Notify::new());
        let completed_sent = Arc::new(AtomicBool::new(false));
        let client_gone = Arc::new(AtomicBool::new(false));
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (rel, sent, gone, recorded) = (
            release.clone(),
            completed_sent.clone(),
            client_gone.clone(),
            bodies.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (rel, sent, gone, recorded) =
                    (rel.clone(), sent.clone(), gone.clone(), recorded.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (rel, sent, gone, recorded) =
                                (rel.clone(), sent.clone(), gone.clone(), recorded.clone());
                            async move {
                                let body: Value = serde_json::from_slice(
                                    &req.into_body().collect().await.unwrap().to_bytes(),
                                )
                                .unwrap();
                                recorded.lock().unwrap().push(body.clone());
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<
                                        hyper::body::Frame<bytes::Bytes>,
                                        std::convert::Infallible,
                                    >,
                                >(4);
                                let png = b64(&tiny_png(1024, 1024));
                                let common = json!({"background": "opaque", "created_at": 1745000000, "output_format": "png",
                                                "quality": "medium", "size": "1024x1024"});
                                tokio::spawn(async move {
                                    let mut partial = common.clone();
                                    partial["type"] = "image_generation.partial_image".into();
                                    partial["b64_json"] = png.clone().into();
                                    partial["partial_image_index"] = 0.into();
                                    if tx
                                        .send(Ok(hyper::body::Frame::data(sse(&partial))))
                                        .await
                                        .is_err()
                                    {
                                        gone.store(true, Ordering::SeqCst);
                                        return;
                                    }
                                    tokio::select! {
                                        _ = rel.notified() => {}
                                        _ = tx.closed() => {
                                            gone.store(true, Ordering::SeqCst);
                                            return;
                                        }
                                    }
                                    let mut done = common.clone();
                                    done["type"] = "image_generation.completed".into();
                                    done["b64_json"] = png.into();
                                    done["usage"] = usage(1);
                                    sent.store(true, Ordering::SeqCst);
                                    let _ = tx.send(Ok(hyper::body::Frame::data(sse(&done)))).await;
                                });
                                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                                let mut resp = hyper::Response::new(StreamBody::new(stream));
                                resp.headers_mut()
                                    .insert("content-type", "text/event-stream".parse().unwrap());
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        StreamingGpt {
            addr,
            release,
            completed_sent,
            client_gone,
            bodies,
            task,
        }
    }
}
