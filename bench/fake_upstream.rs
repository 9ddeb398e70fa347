//! A fast fake OpenAI Images upstream for benchmarks: answers every
//! `POST /v1/images/generations` with `n` images (the request's `n`), each either a small URL
//! or a base64 "PNG" of a fixed size (its signature, noise and its closing `IEND` chunk),
//! after an optional delay. The answer is built from one pre-encoded image shared by every
//! response (no per-request encoding), so the fake costs as little as possible and the
//! gateway's cost is what the benchmark sees.
//!
//! Usage: fake_upstream [--port P] [--b64-bytes N] [--delay-ms D]
//!   --b64-bytes 0 (default) answers with URLs; N > 0 answers with N raw bytes per image,
//!   base64-encoded (about 4N/3 bytes of JSON each).

#[path = "common.rs"]
mod common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::arg;
use hyper::Request;

fn image_b64(len: usize) -> Bytes {
    let mut raw = Vec::with_capacity(len);
    raw.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    // PNG's closing chunk: the gateway refuses an image cut short (issue 26).
    const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
    let mut x: u32 = 2463534242;
    while raw.len() + IEND.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        raw.push(x as u8);
    }
    raw.extend_from_slice(&IEND);
    Bytes::from(base64::engine::general_purpose::STANDARD.encode(&raw))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port = arg("--port", 9100) as u16;
    let b64_bytes = arg("--b64-bytes", 0) as usize;
    let delay = Duration::from_millis(arg("--delay-ms", 0));
    let image = (b64_bytes > 0).then(|| image_b64(b64_bytes));
    eprintln!("fake upstream on 127.0.0.1:{port} (b64 bytes {b64_bytes}, delay {delay:?})");
    common::serve(port, move |req: Request<hyper::body::Incoming>| {
        let image = image.clone();
        async move {
            let body = common::body(req).await;
            let n = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["n"].as_u64())
                .unwrap_or(1)
                .clamp(1, 10) as usize;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let json = match &image {
                None => {
                    let items =
                        vec![r#"{"url":"https://images.example/x.png","revised_prompt":"p"}"#; n];
                    Bytes::from(format!(r#"{{"created":1,"data":[{}]}}"#, items.join(",")))
                }
                Some(img) => {
                    let mut out = Vec::with_capacity(n * (img.len() + 20) + 32);
                    out.extend_from_slice(br#"{"created":1,"data":["#);
                    for i in 0..n {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(br#"{"b64_json":""#);
                        out.extend_from_slice(img);
                        out.extend_from_slice(br#""}"#);
                    }
                    out.extend_from_slice(b"]}");
                    Bytes::from(out)
                }
            };
            common::json(json)
        }
    })
    .await;
}
