//! `stream: true` on GPT image models: upstream events reach the client as they arrive, a
//! client that leaves closes the upstream connection, backends that cannot stream answer
//! with completed events, and a stream is charged when it ends for the images that went
//! through, at the usage its completed event reports.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use support::gpt::StreamingGpt;
use support::*;

fn config(url: &str) -> String {
    let backends = format!("  gpt: {{kind: openai, base_url: \"{url}/v1\", api_key: sk-up}}");
    let models = "  gpt-image-2: {rules: gpt-image-2, route: {targets: [{backend: gpt, dialect: gpt-image}]}}\n  \
                  gpt-local: {rules: gpt-image-2, route: {targets: [{backend: sandbox}]}}";
    sandbox_config(&backends, models).replace(
        "log: {level: warn}",
        &format!(
            "log: {{level: warn}}\nadmin: {{tokens_sha256: [{}]}}",
            hex::encode(imagegate::auth::hash_secret(ADMIN))
        ),
    )
}

const ADMIN: &str = "streaming-admin-token";

/// The demo tenant's ledger rows once there are `want` (the stream's charge is written when
/// it ends, after the client has read its last byte).
async fn rows(gw: &Gateway, want: usize) -> Vec<Value> {
    let mut rows = Vec::new();
    for _ in 0..100 {
        let resp = client()
            .get(format!("{}/admin/v1/usage?tenant=demo", gw.admin_base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        rows = resp.json::<Value>().await.unwrap()["data"]
            .as_array()
            .unwrap()
            .clone();
        if rows.len() >= want {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} ledger rows, wanted {want}: {rows:?}", rows.len());
}

/// Reads the body until it holds `events` complete server-sent events.
async fn read_events(resp: &mut reqwest::Response, buf: &mut String, events: usize) -> Vec<Value> {
    loop {
        let parsed: Vec<Value> = buf
            .split("\n\n")
            .filter(|e| e.contains("data: "))
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        if parsed.len() >= events {
            return parsed;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
            .await
            .expect("the gateway relays events as they arrive")
            .unwrap()
            .expect("stream ended early");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn start_stream(gw: &Gateway, model: &str) -> reqwest::Response {
    client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": model, "prompt": "a kite", "stream": true, "partial_images": 1}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn events_reach_the_client_before_the_upstream_has_finished() {
    let up = StreamingGpt::start().await;
    let gw = Gateway::start(&config(&format!("http://{}", up.addr))).await;
    let mut resp = start_stream(&gw, "gpt-image-2").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    let first = read_events(&mut resp, &mut buf, 1).await;
    assert_eq!(first[0]["type"], "image_generation.partial_image");
    // The upstream has not sent its completed event: it waits for us.
    assert!(!up.completed_sent.load(Ordering::SeqCst));
    up.release.notify_one();
    let all = read_events(&mut resp, &mut buf, 2).await;
    assert_eq!(all[1]["type"], "image_generation.completed");
    assert_eq!(all[1]["usage"]["output_tokens"], 4160);
    // Charged once the stream ended: one image, at the tokens its completed event reported.
    while resp.chunk().await.unwrap().is_some() {}
    let row = &rows(&gw, 1).await[0];
    assert_eq!(row["status"], 200, "{row}");
    assert_eq!(row["n_delivered"], 1, "{row}");
    assert_eq!(row["output_tokens"], 4160, "{row}");
    assert!(row["cost_micro_usd"].as_u64().unwrap() > 0, "{row}");
    let sent = up.bodies.lock().unwrap()[0].clone();
    assert_eq!(
        (sent["stream"].as_bool(), sent["partial_images"].as_u64()),
        (Some(true), Some(1))
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_closes_the_upstream_connection() {
    let up = StreamingGpt::start().await;
    let gw = Gateway::start(&config(&format!("http://{}", up.addr))).await;
    let mut resp = start_stream(&gw, "gpt-image-2").await;
    let mut buf = String::new();
    read_events(&mut resp, &mut buf, 1).await;
    drop(resp);
    let mut gone = false;
    for _ in 0..100 {
        if up.client_gone.load(Ordering::SeqCst) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "the upstream connection stayed open after the client left"
    );
    assert!(!up.completed_sent.load(Ordering::SeqCst));
    // It left before its image: recorded, nothing charged.
    let row = &rows(&gw, 1).await[0];
    assert_eq!(row["status"], 499, "{row}");
    assert_eq!(row["cost_micro_usd"], 0, "{row}");
}

#[tokio::test]
async fn a_backend_that_cannot_stream_answers_with_a_completed_event() {
    let gw = Gateway::start(&config("http://127.0.0.1:1")).await;
    let mut resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .json(
            &json!({"model": "gpt-local", "prompt": "a kite", "size": "1024x1536", "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    let events = read_events(&mut resp, &mut buf, 1).await;
    assert_eq!(events[0]["type"], "image_generation.completed");
    assert_eq!(events[0]["size"], "1024x1536");
    let img = image::load_from_memory(&unb64(events[0]["b64_json"].as_str().unwrap())).unwrap();
    assert_eq!((img.width(), img.height()), (1024, 1536));
    assert!(
        resp.chunk().await.unwrap().is_none(),
        "the stream ends after the last image"
    );
    let row = &rows(&gw, 1).await[0];
    assert_eq!(
        (row["status"].as_u64(), row["n_delivered"].as_u64()),
        (Some(200), Some(1)),
        "{row}"
    );
    assert!(row["cost_micro_usd"].as_u64().unwrap() > 0, "{row}");
}
