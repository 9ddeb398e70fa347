//! Request heads on the wire: their size and count are capped (431) on HTTP/1.1 and HTTP/2
//! alike, at `server.max_header_bytes` / `server.max_headers`, and the gateway goes on
//! serving others; both versions are served on one plain listener.

mod support;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (a whole HTTP/1.1 request head) on a raw connection and returns the status
/// line's code, or `None` if the connection closed without an answer.
async fn raw_status(gw: &Gateway, head: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // The server may answer and close before it has read everything we send.
    let _ = s.write_all(head).await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn head_with(headers: &str) -> Vec<u8> {
    format!(
        "GET /v1/models HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n{headers}\r\n"
    )
    .into_bytes()
}

/// The sandbox config with `server: {server}` added.
fn with_server(server: &str) -> String {
    sandbox_config("", "").replace(
        "log: {level: warn}",
        &format!("log: {{level: warn}}\nserver: {server}"),
    )
}

/// The errors of loading the sandbox config with `server: {server}` (it must fail).
fn config_errors(server: &str) -> String {
    imagegate::config::Config::from_yaml(&with_server(server), &|name| match name {
        "PORT" => Some("1".into()),
        "DATA_DIR" => Some("/tmp".into()),
        _ => None,
    })
    .unwrap_err()
    .to_string()
}

#[tokio::test]
async fn http1_heads_over_the_default_caps_get_431_and_others_are_served() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    // 200 KB of headers: far over the 32 KiB default.
    let big = format!("x-pad: {}\r\n", "a".repeat(200 * 1024));
    assert_eq!(raw_status(&gw, &head_with(&big)).await, Some(431));
    // 20 KB is under it: served.
    let fine = format!("x-pad: {}\r\n", "a".repeat(20 * 1024));
    assert_eq!(raw_status(&gw, &head_with(&fine)).await, Some(200));
    // 150 headers: over the default count of 100.
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    assert_eq!(raw_status(&gw, &head_with(&many)).await, Some(431));
    let some: String = (0..50).map(|i| format!("x-h{i}: v\r\n")).collect();
    assert_eq!(raw_status(&gw, &head_with(&some)).await, Some(200));
    models_ok(&gw).await;
}

#[tokio::test]
async fn configured_caps_apply_to_http1_and_http2() {
    let yaml = with_server("{max_header_bytes: 4096, max_headers: 20}");
    let gw = Gateway::start(&yaml).await;
    let over = format!("x-pad: {}\r\n", "a".repeat(8 * 1024));
    assert_eq!(raw_status(&gw, &head_with(&over)).await, Some(431));
    let under = format!("x-pad: {}\r\n", "a".repeat(1024));
    assert_eq!(raw_status(&gw, &head_with(&under)).await, Some(200));
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    assert_eq!(raw_status(&gw, &head_with(&many)).await, Some(431));

    // HTTP/2 with prior knowledge on the same plain listener.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let ok = h2
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(DEMO_KEY)
        .json(&json!({"prompt": "a kite", "size": "256x256"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.version(), reqwest::Version::HTTP_2);
    assert_eq!(ok.status(), 200);
    let refused = h2
        .get(gw.url("/v1/models"))
        .bearer_auth(DEMO_KEY)
        .header("x-pad", "a".repeat(8 * 1024))
        .send()
        .await;
    match refused {
        Ok(resp) => assert_eq!(resp.status(), 431),
        // h2 may refuse the stream instead of answering it; either way it is not served.
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    // The connection and the gateway go on serving.
    let again = h2
        .get(gw.url("/v1/models"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    models_ok(&gw).await;
}

#[test]
fn header_caps_out_of_range_are_config_errors() {
    for (server, path) in [
        ("{max_header_bytes: 100}", "server.max_header_bytes"),
        ("{max_header_bytes: 4000000}", "server.max_header_bytes"),
        ("{max_headers: 2}", "server.max_headers"),
    ] {
        let err = config_errors(server);
        assert!(err.contains(path), "{server}: {err}");
    }
}

/// Everything the server sends on one raw connection until it closes it (or 5 s pass).
async fn raw_exchange(gw: &Gateway, bytes: &[u8], half_close: bool) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| answer.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Request smuggling shapes (RFC 9112 section 6.3): a request framed two ways, or with two
/// lengths, is refused, and what follows it on the connection is never served as a request.
#[tokio::test]
async fn ambiguous_framing_is_refused_and_nothing_is_smuggled() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let smuggled = "GET /v1/models HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-demo\r\n\r\n";
    let cases = [
        format!(
            "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
             content-type: application/json\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n\
             0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
             content-type: application/json\r\ncontent-length: 2\r\ncontent-length: 40\r\n\r\n{{}}{smuggled}"
        ),
        format!(
            "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
             content-type: application/json\r\ntransfer-encoding: gzip, chunked, identity\r\n\r\n\
             0\r\n\r\n{smuggled}"
        ),
    ];
    for case in &cases {
        let answer = raw_exchange(&gw, case.as_bytes(), false).await;
        let got = statuses(&answer);
        assert!(
            !got.is_empty() && got.iter().all(|s| (400..500).contains(s)),
            "{case:?} -> {answer:?}"
        );
        assert!(
            !answer.contains("\"object\":\"list\""),
            "smuggled request served: {answer}"
        );
    }
    models_ok(&gw).await;
}

/// A body shorter than its Content-Length (the client gives up) and a head cut short cost the
/// gateway nothing: no answer is invented, nothing is charged, others are served.
#[tokio::test]
async fn truncated_bodies_and_heads_are_dropped_and_others_are_served() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let short = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"prompt\":\"a"
    );
    let answer = raw_exchange(&gw, short.as_bytes(), true).await;
    assert!(
        statuses(&answer).iter().all(|s| *s == 400),
        "a truncated body is a 400 or no answer: {answer:?}"
    );
    let answer = raw_exchange(&gw, b"POST /v1/images/gener", true).await;
    assert!(
        answer.is_empty() || statuses(&answer) == [400],
        "{answer:?}"
    );
    // Nothing was generated: the image store is empty.
    let stored = std::fs::read_dir(gw.data_dir.path().join("images"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0);
    models_ok(&gw).await;
}

/// Path tricks on the image route never reach a file outside the image store.
#[tokio::test]
async fn image_route_path_tricks_are_404_or_403() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    for path in [
        "/images/../gateway.yaml",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/images/..%2f..%2fetc%2fpasswd",
        "/images/%00.png",
        "/images/a/b/c.png",
        "/images//etc/passwd",
        "/images/\u{ff0e}\u{ff0e}/x.png",
    ] {
        let answer = raw_exchange(
            &gw,
            format!("GET {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n").as_bytes(),
            false,
        )
        .await;
        let got = statuses(&answer);
        assert!(
            got.len() == 1 && [400, 403, 404].contains(&got[0]),
            "{path}: {answer:?}"
        );
        assert!(!answer.contains("root:"), "{path} leaked a file");
    }
}

/// A client trickling its body gets 408 after `server.body_timeout`; one that never finishes
/// its head is cut off after `server.header_timeout`; others are served meanwhile.
#[tokio::test]
async fn slow_bodies_get_408_and_slow_heads_are_cut_off() {
    let yaml = with_server("{body_timeout: 1s, header_timeout: 1s}");
    let gw = Gateway::start(&yaml).await;
    let started = std::time::Instant::now();
    let slow_body = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"prompt\":"
    );
    let (body_answer, head_answer, ()) = tokio::join!(
        raw_exchange(&gw, slow_body.as_bytes(), false),
        raw_exchange(
            &gw,
            b"POST /v1/images/generations HTTP/1.1\r\nhost: g",
            false
        ),
        models_ok(&gw),
    );
    assert_eq!(statuses(&body_answer), [408], "{body_answer}");
    assert!(body_answer.contains("request_timeout"), "{body_answer}");
    assert!(
        statuses(&head_answer).iter().all(|s| *s >= 400),
        "{head_answer:?}"
    );
    // Both were ended by the gateway, well before raw_exchange's own 5 s guard.
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    models_ok(&gw).await;
}

/// A batch's JSON body is capped like any other (it was read whole, uncapped, before).
#[tokio::test]
async fn batch_bodies_are_capped_like_any_json_body() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let big = format!(
        "{{\"input_file_id\":\"file-x\",\"endpoint\":\"/v1/images/generations\",\"completion_window\":\"24h\",\"metadata\":{{\"pad\":\"{}\"}}}}",
        "a".repeat(2 * 1024 * 1024)
    );
    let resp = client()
        .post(gw.url("/v1/batches"))
        .bearer_auth(DEMO_KEY)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, 413).await;
    assert_eq!(err["code"], "request_too_large");
}

#[test]
fn a_body_timeout_under_a_second_is_a_config_error() {
    let err = config_errors("{body_timeout: 0s}");
    assert!(err.contains("server.body_timeout"), "{err}");
}

/// Invalid UTF-8 where a string goes (a JSON string, the key, the idempotency key, a query,
/// a path) is a 4xx with an OpenAI-shaped body or hyper's own 400, never a 5xx, and the
/// gateway goes on serving.
#[tokio::test]
async fn invalid_utf8_anywhere_is_a_4xx() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let body_with = |json: &[u8]| {
        let mut req = format!(
            "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
             content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            json.len()
        )
        .into_bytes();
        req.extend_from_slice(json);
        req
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "prompt",
            body_with(b"{\"prompt\":\"a \xff\xfe cat\",\"size\":\"256x256\"}"),
        ),
        ("member name", body_with(b"{\"pro\xc3\x28mpt\":\"a cat\"}")),
        ("lone surrogate", body_with(b"{\"prompt\":\"\\ud800\"}")),
    ];
    let mut key = b"POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-\xff\xfe\r\n\
                    content-type: application/json\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
        .to_vec();
    cases.push(("api key", std::mem::take(&mut key)));
    let mut idem = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: application/json\r\nconnection: close\r\nidempotency-key: k"
    )
    .into_bytes();
    idem.extend_from_slice(b"\xff\xfe\r\ncontent-length: 19\r\n\r\n{\"prompt\":\"a cat\"}");
    cases.push(("idempotency key", idem));
    cases.push((
        "query",
        b"GET /v1/models?x=\xff HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n".to_vec(),
    ));
    cases.push((
        "path",
        b"GET /images/\xff\xfe.png HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n".to_vec(),
    ));
    for (what, raw) in cases {
        let answer = raw_exchange(&gw, &raw, false).await;
        let got = statuses(&answer);
        assert!(
            got.len() == 1 && (400..500).contains(&got[0]),
            "{what}: {answer:?}"
        );
        // Ours carry an OpenAI error body; hyper refuses a malformed head with a bare 400.
        let bare_400 = got[0] == 400 && answer.contains("content-length: 0");
        assert!(
            answer.contains("{\"error\":") || bare_400,
            "{what}: not OpenAI-shaped: {answer:?}"
        );
    }
    models_ok(&gw).await;
}

/// A connection that has not sent a byte when the gateway is told to stop does not hold the
/// drain up (load balancers open such connections ahead of use).
#[tokio::test]
async fn a_silent_connection_does_not_hold_up_shutdown() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let _silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    models_ok(&gw).await;
    let started = std::time::Instant::now();
    gw.stop().await;
    // The header timeout (30 s) and the drain timeout (30 s) are far longer.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
}

/// While a request waits on its upstream, its connection reads only into a small buffer
/// (vendor/hyper/IMAGEGATE-PATCH.md) to notice the client leaving. A request pipelined behind
/// the waiting one, whether sent with it or during the wait, and with a head far larger than
/// that buffer, is still read whole and answered after it, in order.
#[tokio::test]
async fn requests_pipelined_behind_a_waiting_one_are_answered_in_order() {
    let gw = Gateway::start(&sandbox_config(
        "  slow: {kind: sandbox, delay: 400ms}",
        "  slow-model: {rules: dall-e-2, route: {targets: [{backend: slow}]}}",
    ))
    .await;
    let body = r#"{"model":"slow-model","prompt":"a lighthouse","size":"256x256"}"#;
    let first = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // 6 KiB of head: a hundred times the buffer read into while the first request waits.
    let second = format!(
        "GET /v1/models HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         x-padding: {}\r\nconnection: close\r\n\r\n",
        "p".repeat(6000)
    );
    for during_the_wait in [false, true] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        if during_the_wait {
            s.write_all(first.as_bytes()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            // In pieces, as a slow client would send it.
            for piece in second.as_bytes().chunks(1000) {
                s.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        } else {
            s.write_all(format!("{first}{second}").as_bytes())
                .await
                .unwrap();
        }
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.read_to_end(&mut answer),
        )
        .await
        .expect("both answers within 10 s")
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(statuses(&answer), [200, 200], "{answer}");
        let image = answer.find("\"b64_json\"").or(answer.find("\"url\""));
        let list = answer.find("\"object\":\"list\"");
        assert!(
            matches!((image, list), (Some(i), Some(l)) if i < l),
            "the image first, then the model list: {answer}"
        );
    }
    models_ok(&gw).await;
}
