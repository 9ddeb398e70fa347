//! Upstreams that fail the way real ones do on the wire, from a raw TCP fake: an answer that
//! stalls mid-body, a connection reset mid-head, a body shorter than its length, a truncated
//! base64 image, an event stream that never ends. For each: what the client gets, that nothing
//! is charged, the metric that shows it, and that the next request through the same backend is
//! served (no poisoned connection is reused).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one HTTP/1.1 request (head and Content-Length body) and returns its JSON body.
async fn read_request(s: &mut TcpStream) -> Option<Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return serde_json::from_slice(&buf[end + 4..end + 4 + len]).ok();
        }
    }
}

fn answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One connection's behaviour, chosen by the request's prompt.
async fn misbehave(mut s: TcpStream) {
    while let Some(req) = read_request(&mut s).await {
        let png = b64(&tiny_png(8, 8));
        if req["stream"] == true {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            // Partial images forever, never a completed event.
            for i in 0.. {
                let event = format!(
                    "event: image_generation.partial_image\ndata: {}\n\n",
                    json!({"type": "image_generation.partial_image", "partial_image_index": i, "b64_json": png})
                );
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        match req["prompt"].as_str().unwrap_or("") {
            "stall" => {
                let body = format!("{{\"created\":1,\"data\":[{{\"b64_json\":\"{}", &png[..20]);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{body}"
                );
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            "reset" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-ty").await;
                // Closing with SO_LINGER 0 sends a reset instead of a FIN.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                return;
            }
            "short" => {
                let body = format!("{{\"created\":1,\"data\":[{{\"b64_json\":\"{png}\"}}]}}");
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len() + 500
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                return;
            }
            "truncated" => {
                let cut = &png[..png.len() / 2];
                let body = format!("{{\"created\":1,\"data\":[{{\"b64_json\":\"{cut}\"}}]}}");
                let _ = s.write_all(answer(&body).as_bytes()).await;
            }
            _ => {
                let body = format!("{{\"created\":1,\"data\":[{{\"b64_json\":\"{png}\"}}]}}");
                let _ = s.write_all(answer(&body).as_bytes()).await;
            }
        }
    }
}

async fn gateway() -> Gateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(misbehave(s));
        }
    });
    let backends =
        format!("  up: {{kind: openai, base_url: \"http://{addr}/v1\", api_key: sk-up}}");
    // One attempt: each fault is seen as the client sees it, not retried away.
    let models = "  flaky: {rules: dall-e-2, timeout: 2s, route: {max_attempts: 1, targets: [{backend: up}]}}\n  \
                  flaky-gpt: {rules: gpt-image-2, timeout: 2s, route: {max_attempts: 1, targets: [{backend: up, dialect: gpt-image}]}}";
    let yaml = sandbox_config(&backends, models).replace(
        "log: {level: warn}",
        &format!(
            "log: {{level: warn}}\nadmin: {{tokens_sha256: [{}]}}",
            hex::encode(imagegate::auth::hash_secret(ADMIN))
        ),
    );
    Gateway::start(&yaml).await
}

const ADMIN: &str = "faults-admin-token";

async fn generate(gw: &Gateway, prompt: &str) -> (u16, Value) {
    let resp = gw
        .generate(json!({"model": "flaky", "prompt": prompt, "size": "256x256", "response_format": "b64_json"}))
        .await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// What this gateway's ledger charged the demo tenant, and its rows.
async fn spent(gw: &Gateway) -> (u64, Vec<Value>) {
    let resp = client()
        .get(format!(
            "{}/admin/v1/usage?tenant=demo&limit=10000",
            gw.admin_base
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rows = resp.json::<Value>().await.unwrap()["data"]
        .as_array()
        .unwrap()
        .clone();
    let total = rows
        .iter()
        .map(|r| r["cost_micro_usd"].as_u64().unwrap())
        .sum();
    (total, rows)
}

fn attempts(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("imagegate_upstream_attempts_total{"))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")) && l.contains("backend=\"up\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn broken_answers_are_5xx_charge_nothing_and_the_next_request_is_served() {
    let gw = gateway().await;
    for (prompt, want) in [
        ("stall", 504),
        ("reset", 502),
        ("short", 502),
        ("truncated", 502),
    ] {
        let started = Instant::now();
        let (status, body) = generate(&gw, prompt).await;
        assert_eq!(status, want, "{prompt}: {body}");
        assert!(
            body["error"]["message"].is_string(),
            "{prompt}: OpenAI-shaped"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{prompt}: held past its 2 s deadline ({:?})",
            started.elapsed()
        );
        let (total, rows) = spent(&gw).await;
        let failed: u64 = rows
            .iter()
            .filter(|r| r["status"] != 200)
            .map(|r| r["cost_micro_usd"].as_u64().unwrap())
            .sum();
        assert_eq!(failed, 0, "{prompt} charged: {rows:?}");
        // Each good answer charged once, nothing else.
        let good = rows.iter().filter(|r| r["status"] == 200).count() as u64;
        assert_eq!(total, good * 16_000, "{rows:?}");
        // The connection that failed is not reused: the next request is served.
        let (status, body) = generate(&gw, "fine").await;
        assert_eq!(status, 200, "after {prompt}: {body}");
        assert!(body["data"][0]["b64_json"].is_string());
    }
    // The good answers were charged (so the checks above could fail).
    assert!(spent(&gw).await.0 > 0);
    // The alerts: failed upstream attempts by outcome (a stall is a timeout, a reset or a cut
    // body a server or connect error); the truncated image was a whole HTTP answer, so it
    // shows as a 5xx answered to the client.
    let metrics = gw.metrics().await;
    assert!(attempts(&metrics, "timeout") >= 1, "{metrics}");
    let broken = attempts(&metrics, "server_error") + attempts(&metrics, "connect_error");
    assert!(broken >= 2, "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("imagegate_requests_total{")
                && l.contains("model=\"flaky\"")
                && l.contains("status=\"5xx\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_endless_event_stream_ends_at_the_deadline_with_an_error_event() {
    let gw = gateway().await;
    let started = Instant::now();
    let mut resp = client()
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .json(
            &json!({"model": "flaky-gpt", "prompt": "a kite", "stream": true, "partial_images": 2}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .unwrap()
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let took = started.elapsed();
    assert!(
        text.contains("image_generation.partial_image"),
        "events were relayed"
    );
    assert!(
        text.contains("event: error"),
        "the stream ends with an error event the SDK raises: {}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(
        took < Duration::from_secs(6),
        "the stream outlived its 2 s deadline: {took:?}"
    );
    // No image went through: recorded as failed, nothing charged (it was charged as asked
    // before, as soon as the upstream started answering).
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = spent(&gw).await.1;
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], 502, "{rows:?}");
    assert_eq!(rows[0]["cost_micro_usd"], 0, "{rows:?}");
    assert_eq!(rows[0]["n_delivered"], 0, "{rows:?}");
}
