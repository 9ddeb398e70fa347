//! Whatever the backend returned, the client gets what it asked for: bytes -> url,
//! b64 -> b64, url -> b64, url -> url (passthrough and rehost), byte-identical; the SSRF guard,
//! size cap and image check on downloads; signed links and the sweeper.

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use support::*;

/// A fake provider that answers with URLs to images it serves itself under /files/.
async fn url_provider(png: Vec<u8>) -> FakeUpstream {
    let png = Bytes::from(png);
    let holder = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let base = holder.clone();
    let fake = FakeUpstream::start(move |r| {
        let base = base.lock().unwrap().clone().unwrap_or_default();
        match (r.method.as_str(), r.path_and_query.as_str()) {
            ("POST", _) => {
                let target = r.body["prompt"].as_str().unwrap_or("a.png").to_string();
                let url = if target.starts_with("http") {
                    target
                } else {
                    format!("{base}/files/{target}")
                };
                Reply::json(
                    200,
                    json!({"created": 1, "data": [{"url": url, "revised_prompt": "rp"}]}),
                )
            }
            (_, "/files/a.png") => raw(200, "image/png", png.clone()),
            (_, "/files/text.png") => raw(
                200,
                "text/plain",
                Bytes::from_static(b"definitely not an image"),
            ),
            (_, "/files/redirect.png") => {
                let other = base.replace("127.0.0.1", "localhost");
                raw(302, "text/plain", Bytes::new())
                    .header("location", &format!("{other}/files/a.png"))
            }
            _ => raw(404, "text/plain", Bytes::new()),
        }
    })
    .await;
    *holder.lock().unwrap() = Some(fake.base_url());
    fake
}

fn raw(status: u16, content_type: &str, body: Bytes) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), content_type.into())],
        body,
        delay: Duration::ZERO,
    }
}

async fn gateway_for(fake: &FakeUpstream, backend_extra: &str) -> Gateway {
    let backends = format!(
        "  up: {{kind: openai, base_url: \"{}/v1\"{backend_extra}}}",
        fake.base_url()
    );
    let models = "  remote: {rules: dall-e-2, route: {targets: [{backend: up}]}}";
    Gateway::start(&sandbox_config(&backends, models)).await
}

async fn generate(gw: &Gateway, prompt: &str, format: &str) -> reqwest::Response {
    gw.generate(
        json!({"model": "remote", "prompt": prompt, "response_format": format, "size": "256x256"}),
    )
    .await
}

async fn fetch(url: &str) -> Vec<u8> {
    let resp = client().get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    resp.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn b64_to_b64_and_b64_to_url_are_byte_identical() {
    let png = tiny_png(33, 17);
    let answer = b64(&png);
    let fake = FakeUpstream::start(move |_| {
        Reply::json(
            200,
            json!({"created": 1, "data": [{"b64_json": answer, "revised_prompt": "kept"}]}),
        )
    })
    .await;
    let gw = gateway_for(&fake, "").await;
    let body: serde_json::Value = generate(&gw, "p", "b64_json").await.json().await.unwrap();
    assert_eq!(unb64(body["data"][0]["b64_json"].as_str().unwrap()), png);
    assert_eq!(body["data"][0]["revised_prompt"], "kept");
    let body: serde_json::Value = generate(&gw, "p", "url").await.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&gw.base));
    assert_eq!(fetch(url).await, png);
}

#[tokio::test]
async fn sandbox_bytes_to_url_serve_the_same_png_as_b64() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let req =
        |format: &str| json!({"prompt": "same", "size": "256x256", "response_format": format});
    let b: serde_json::Value = gw.generate(req("b64_json")).await.json().await.unwrap();
    let u: serde_json::Value = gw.generate(req("url")).await.json().await.unwrap();
    assert_eq!(
        fetch(u["data"][0]["url"].as_str().unwrap()).await,
        unb64(b["data"][0]["b64_json"].as_str().unwrap())
    );
}

#[tokio::test]
async fn url_to_b64_downloads_from_the_trusted_host() {
    let png = tiny_png(20, 10);
    let fake = url_provider(png.clone()).await;
    let gw = gateway_for(&fake, ", allow_private_image_hosts: true").await;
    let resp = generate(&gw, "a.png", "b64_json").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(unb64(body["data"][0]["b64_json"].as_str().unwrap()), png);
    assert_eq!(body["data"][0]["revised_prompt"], "rp");
}

#[tokio::test]
async fn url_to_url_passthrough_and_rehost() {
    let png = tiny_png(9, 9);
    let fake = url_provider(png.clone()).await;
    let gw = gateway_for(&fake, "").await;
    let body: serde_json::Value = generate(&gw, "a.png", "url").await.json().await.unwrap();
    assert_eq!(
        body["data"][0]["url"],
        format!("{}/files/a.png", fake.base_url())
    );

    let gw = gateway_for(
        &fake,
        ", image_urls: rehost, allow_private_image_hosts: true",
    )
    .await;
    let body: serde_json::Value = generate(&gw, "a.png", "url").await.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&gw.base), "rehosted: {url}");
    assert_eq!(fetch(url).await, png);
}

#[tokio::test]
async fn ssrf_guard_refuses_private_and_untrusted_hosts() {
    let fake = url_provider(tiny_png(4, 4)).await;
    // The fake itself is on 127.0.0.1: trusted by default (base_url host) but private.
    let gw = gateway_for(&fake, "").await;
    let err = expect_error(generate(&gw, "a.png", "b64_json").await, 502).await;
    assert!(
        err["message"].as_str().unwrap().contains("private"),
        "{err}"
    );

    let gw = gateway_for(
        &fake,
        ", image_hosts: [169.254.169.254, 10.0.0.1, 127.0.0.1, '::1']",
    )
    .await;
    for url in [
        "http://169.254.169.254/latest/meta-data/x.png",
        "http://10.0.0.1/x.png",
        "http://[::1]/x.png",
    ] {
        let err = expect_error(generate(&gw, url, "b64_json").await, 502).await;
        assert!(
            err["message"].as_str().unwrap().contains("private"),
            "{url}: {err}"
        );
    }
    let err = expect_error(
        generate(&gw, "https://evil.example/x.png", "b64_json").await,
        502,
    )
    .await;
    assert!(
        err["message"].as_str().unwrap().contains("not trusted"),
        "{err}"
    );
    // A name that resolves to loopback is refused after resolution, not by its spelling.
    let gw = gateway_for(&fake, ", image_hosts: [localhost]").await;
    let local = fake.base_url().replace("127.0.0.1", "localhost");
    let err = expect_error(
        generate(&gw, &format!("{local}/files/a.png"), "b64_json").await,
        502,
    )
    .await;
    assert!(
        err["message"].as_str().unwrap().contains("private"),
        "{err}"
    );
    let fetched = fake.requests().iter().filter(|r| r.method == "GET").count();
    assert_eq!(fetched, 0, "nothing private was fetched");
}

#[tokio::test]
async fn oversized_non_image_and_cross_host_redirects_are_refused() {
    let fake = url_provider(tiny_png(64, 64)).await;
    let gw = gateway_for(
        &fake,
        ", allow_private_image_hosts: true, max_image_bytes: 50",
    )
    .await;
    let err = expect_error(generate(&gw, "a.png", "b64_json").await, 502).await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("larger than 50 bytes"),
        "{err}"
    );

    let gw = gateway_for(
        &fake,
        ", allow_private_image_hosts: true, image_hosts: [127.0.0.1, localhost]",
    )
    .await;
    let err = expect_error(generate(&gw, "text.png", "b64_json").await, 502).await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("not a PNG, JPEG or WebP"),
        "{err}"
    );
    let err = expect_error(generate(&gw, "redirect.png", "b64_json").await, 502).await;
    assert!(
        err["message"].as_str().unwrap().contains("redirected"),
        "{err}"
    );
}

#[tokio::test]
async fn a_non_image_from_the_upstream_is_502_and_never_stored() {
    let fake = FakeUpstream::start(|_| {
        Reply::json(
            200,
            json!({"created": 1, "data": [{"b64_json": b64(b"GIF89a but really text")}]}),
        )
    })
    .await;
    let gw = gateway_for(&fake, "").await;
    let err = expect_error(generate(&gw, "p", "url").await, 502).await;
    assert!(err["message"].as_str().unwrap().contains("not a PNG"));
    let stored = std::fs::read_dir(gw.data_dir.path().join("images"))
        .unwrap()
        .count();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn links_with_a_changed_signature_id_or_path_are_refused() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let body: serde_json::Value = gw
        .generate(json!({"prompt": "x", "size": "256x256"}))
        .await
        .json()
        .await
        .unwrap();
    let url = body["data"][0]["url"].as_str().unwrap().to_string();
    assert!(fetch(&url).await.len() > 100);
    let (path, query) = url.split_once('?').unwrap();
    let (prefix, sig) = query.split_once("signature=").unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let changed_sig = format!("{path}?{prefix}signature={flipped}{}", &sig[1..]);
    let name = path.rsplit('/').next().unwrap();
    let other_name = format!(
        "{}{}",
        if name.starts_with('0') { "1" } else { "0" },
        &name[1..]
    );
    let changed_id = format!("{}?{query}", path.replace(name, &other_name));
    for (u, status) in [
        (changed_sig, 403),
        (changed_id, 403),
        (gw.url("/images/../url-signing.key"), 404),
        (gw.url("/images/%2e%2e%2furl-signing.key"), 404),
        (
            format!("{}?{query}", gw.url("/images/..%2Furl-signing.key")),
            404,
        ),
    ] {
        let resp = client().get(&u).send().await.unwrap();
        let text = resp.status().as_u16();
        assert_eq!(text, status, "{u}");
    }
}

#[tokio::test]
async fn the_sweeper_deletes_expired_images() {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        "log: {level: warn}\nimages: {url_ttl: 1s}",
    );
    let gw = Gateway::start(&yaml).await;
    let body: serde_json::Value = gw
        .generate(json!({"prompt": "x", "size": "256x256"}))
        .await
        .json()
        .await
        .unwrap();
    assert!(body["data"][0]["url"].is_string());
    let dir = gw.data_dir.path().join("images");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    // Files outlive their link by some slack (here 1 s); the sweeper runs every second here.
    let mut gone = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if std::fs::read_dir(&dir).unwrap().count() == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "expired image still on disk");
}
