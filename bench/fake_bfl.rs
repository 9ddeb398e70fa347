//! A fake Black Forest Labs API for the polling benchmark: `POST /v1/{model}` starts a task
//! that is `Ready` 2 to 5 s later (spread evenly by task number), `GET /v1/get_result?id=`
//! answers `Pending` until then, and the sample URL serves one small pre-encoded PNG. It
//! counts submits and polls and prints them on `GET /stats`.
//!
//! Usage: fake_bfl [--port P] [--side S]   (S: the PNG's width and height, default 256)

#[path = "common.rs"]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::arg;
use hyper::Request;

fn png(side: u32) -> Bytes {
    let img = image::RgbImage::from_pixel(side, side, image::Rgb([40, 90, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    Bytes::from(out.into_inner())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port = arg("--port", 9200) as u16;
    let image = png(arg("--side", 256) as u32);
    let tasks: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let (next, polls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    eprintln!("fake BFL on 127.0.0.1:{port}");
    common::serve(port, move |req: Request<hyper::body::Incoming>| {
        let (tasks, next, polls, image) = (tasks.clone(), next.clone(), polls.clone(), image.clone());
        async move {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1")
                .to_string();
            let _ = common::body(req).await;
            if path == "/stats" {
                let body = format!(
                    r#"{{"submits":{},"polls":{}}}"#,
                    next.load(Ordering::Relaxed),
                    polls.load(Ordering::Relaxed)
                );
                return common::json(Bytes::from(body));
            }
            if path.starts_with("/files/") {
                let mut resp = common::json(image);
                resp.headers_mut()
                    .insert("content-type", "image/png".parse().unwrap());
                return resp;
            }
            if path == "/v1/get_result" {
                polls.fetch_add(1, Ordering::Relaxed);
                let id: u64 = query.trim_start_matches("id=").parse().unwrap_or(0);
                let ready = tasks
                    .lock()
                    .unwrap()
                    .get(&id)
                    .is_some_and(|at| Instant::now() >= *at);
                let body = if ready {
                    tasks.lock().unwrap().remove(&id);
                    format!(
                        r#"{{"id":"{id}","status":"Ready","result":{{"sample":"http://{host}/files/{id}.png","seed":1}}}}"#
                    )
                } else {
                    format!(r#"{{"id":"{id}","status":"Pending","progress":0.5}}"#)
                };
                return common::json(Bytes::from(body));
            }
            let id = next.fetch_add(1, Ordering::Relaxed);
            let after = Duration::from_millis(2000 + (id * 7919) % 3001);
            tasks.lock().unwrap().insert(id, Instant::now() + after);
            common::json(Bytes::from(format!(
                r#"{{"id":"{id}","polling_url":"http://{host}/v1/get_result?id={id}"}}"#
            )))
        }
    })
    .await;
}
