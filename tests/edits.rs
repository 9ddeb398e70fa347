//! `POST /v1/images/edits` and `/v1/images/variations` over real HTTP: multipart bodies as
//! the SDKs send them, the files checked from their bytes, the sandbox's deterministic edit
//! inside the mask, the multipart form an OpenAI upstream receives, and the ledger's
//! operation column.

mod support;

use reqwest::multipart::{Form, Part};
use serde_json::json;
use support::*;

/// A 256x256 PNG whose pixels vary (so a change shows), or any size.
fn picture(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A mask the size of the image: transparent (edit here) on the left half, opaque on the right.
fn left_half_mask(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(width, height, |x, _| {
        image::Rgba([0, 0, 0, if x < width / 2 { 0 } else { 255 }])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb([90, 90, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn file(name: &str, bytes: Vec<u8>) -> Part {
    Part::bytes(bytes).file_name(name.to_string())
}

async fn post(gw: &Gateway, path: &str, form: Form) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .bearer_auth(DEMO_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

fn decode(b64_json: &serde_json::Value) -> image::RgbImage {
    image::load_from_memory(&unb64(b64_json.as_str().unwrap()))
        .unwrap()
        .to_rgb8()
}

/// The parts of a multipart body as an upstream received it: (name, file name, bytes).
async fn parts(recorded: &Recorded) -> Vec<(String, Option<String>, Vec<u8>)> {
    let ct = recorded.headers["content-type"].to_str().unwrap();
    let boundary = multer::parse_boundary(ct).unwrap();
    let raw = recorded.raw.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(raw) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut out = Vec::new();
    while let Some(field) = form.next_field().await.unwrap() {
        let name = field.name().unwrap().to_string();
        let filename = field.file_name().map(str::to_string);
        out.push((name, filename, field.bytes().await.unwrap().to_vec()));
    }
    out
}

fn text<'a>(parts: &'a [(String, Option<String>, Vec<u8>)], name: &str) -> Option<&'a str> {
    parts
        .iter()
        .find(|(n, f, _)| n == name && f.is_none())
        .map(|(_, _, v)| std::str::from_utf8(v).unwrap())
}

#[tokio::test]
async fn sandbox_edit_changes_only_what_the_mask_leaves_transparent() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let original = picture(256, 256);
    let form = Form::new()
        .text("model", "dall-e-2")
        .text("prompt", "a red sun")
        .text("size", "256x256")
        .text("response_format", "b64_json")
        .part("image", file("in.png", original.clone()))
        .part("mask", file("mask.png", left_half_mask(256, 256)));
    let resp = post(&gw, "/v1/images/edits", form).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let edited = decode(&body["data"][0]["b64_json"]);
    let before = image::load_from_memory(&original).unwrap().to_rgb8();
    assert_eq!(edited.dimensions(), (256, 256));
    let (mut left_changed, mut right_changed) = (0, 0);
    for (x, y, px) in edited.enumerate_pixels() {
        if px != before.get_pixel(x, y) {
            if x < 128 {
                left_changed += 1
            } else {
                right_changed += 1
            }
        }
    }
    assert_eq!(
        right_changed, 0,
        "pixels under the opaque mask must not change"
    );
    assert!(left_changed > 128 * 256 / 2, "only {left_changed} changed");

    // Deterministic: the same edit gives the same image; another prompt another one.
    let again = |prompt: &'static str| {
        Form::new()
            .text("prompt", prompt)
            .text("size", "256x256")
            .text("response_format", "b64_json")
            .part("image", file("in.png", original.clone()))
            .part("mask", file("mask.png", left_half_mask(256, 256)))
    };
    let same: serde_json::Value = post(&gw, "/v1/images/edits", again("a red sun"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(decode(&same["data"][0]["b64_json"]), edited);
    let other: serde_json::Value = post(&gw, "/v1/images/edits", again("a blue moon"))
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(decode(&other["data"][0]["b64_json"]), edited);
}

#[tokio::test]
async fn variations_follow_the_dalle2_contract_on_the_sandbox() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let form = Form::new()
        .text("n", "2")
        .text("size", "512x512")
        .part("image", file("in.png", picture(256, 256)));
    let resp = post(&gw, "/v1/images/variations", form).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(data[0]["url"].as_str().unwrap().contains("/images/"));
    let png = client()
        .get(data[0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (512, 512));

    // A prompt is not part of a variation; nor is a non-square image.
    let form = Form::new()
        .text("prompt", "x")
        .part("image", file("in.png", picture(256, 256)));
    let err = expect_error(post(&gw, "/v1/images/variations", form).await, 400).await;
    assert_eq!(err["param"], "prompt");
    let form = Form::new().part("image", file("wide.png", picture(300, 200)));
    let err = expect_error(post(&gw, "/v1/images/variations", form).await, 400).await;
    assert_eq!(err["param"], "image");
    assert!(err["message"].as_str().unwrap().contains("square"), "{err}");
}

#[tokio::test]
async fn each_contract_violation_is_a_400_naming_its_field() {
    let gw = Gateway::start(&sandbox_config(
        "",
        "  gpt-image-2: {rules: gpt-image-2, route: {targets: [{backend: sandbox}]}}",
    ))
    .await;
    let edit = |parts: Vec<(&str, Part)>| {
        let mut form = Form::new().text("prompt", "x");
        for (name, part) in parts {
            form = form.part(name.to_string(), part);
        }
        form
    };
    let cases: Vec<(&str, Form, &str, &str)> = vec![
        (
            "missing image",
            edit(vec![]),
            "image",
            "Missing required parameter",
        ),
        (
            "not an image",
            edit(vec![("image", file("notes.png", b"hello, world".to_vec()))]),
            "image",
            "not a PNG, JPEG or WebP",
        ),
        (
            "dall-e-2 takes a PNG",
            edit(vec![("image", file("in.jpg", jpeg(256, 256)))]),
            "image",
            "must be a PNG",
        ),
        (
            "dall-e-2 takes a square",
            edit(vec![("image", file("in.png", picture(256, 128)))]),
            "image",
            "square",
        ),
        (
            "dall-e-2 takes one image",
            edit(vec![
                ("image[]", file("a.png", picture(256, 256))),
                ("image[]", file("b.png", picture(256, 256))),
            ]),
            "image",
            "at most 1",
        ),
        (
            "mask of another size",
            edit(vec![
                ("image", file("in.png", picture(256, 256))),
                ("mask", file("mask.png", left_half_mask(128, 128))),
            ]),
            "mask",
            "same size",
        ),
        (
            "mask not a PNG",
            edit(vec![
                ("image", file("in.png", picture(256, 256))),
                ("mask", file("mask.jpg", jpeg(256, 256))),
            ]),
            "mask",
            "PNG",
        ),
    ];
    for (what, form, param, words) in cases {
        let err = expect_error(post(&gw, "/v1/images/edits", form).await, 400).await;
        assert_eq!(err["param"], param, "{what}: {err}");
        assert!(
            err["message"].as_str().unwrap().contains(words),
            "{what}: {err}"
        );
    }
    // dall-e-2 takes no GPT image fields; GPT image models take no markup with a mask.
    let form =
        edit(vec![("image", file("in.png", picture(256, 256)))]).text("background", "transparent");
    let err = expect_error(post(&gw, "/v1/images/edits", form).await, 400).await;
    assert_eq!(err["param"], "background");
    let form = edit(vec![
        ("image", file("in.png", picture(256, 256))),
        ("mask", file("mask.png", left_half_mask(256, 256))),
        ("markup", file("markup.png", left_half_mask(256, 256))),
    ])
    .text("model", "gpt-image-2");
    let err = expect_error(post(&gw, "/v1/images/edits", form).await, 400).await;
    assert_eq!(err["param"], "markup");
    // Sixteen images for a GPT image model, not seventeen.
    let many = |count: usize| {
        (0..count).fold(
            Form::new().text("model", "gpt-image-2").text("prompt", "x"),
            |f, i| f.part("image[]", file(&format!("{i}.jpg"), jpeg(64, 48))),
        )
    };
    let err = expect_error(post(&gw, "/v1/images/edits", many(17)).await, 400).await;
    assert_eq!(err["param"], "image");
    let ok = post(&gw, "/v1/images/edits", many(16)).await;
    assert_eq!(ok.status(), 200);
    // Not multipart at all.
    let resp = client()
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(DEMO_KEY)
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, 400).await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("multipart/form-data"),
        "{err}"
    );
}

#[tokio::test]
async fn uploads_over_the_limit_are_413_before_they_are_read() {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        "log: {level: warn}\nserver: {max_upload_bytes: 100000}",
    );
    let gw = Gateway::start(&yaml).await;
    let big = vec![0x89u8; 200_000];
    let form = Form::new()
        .text("prompt", "x")
        .part("image", file("big.png", big));
    let err = expect_error(post(&gw, "/v1/images/edits", form).await, 413).await;
    assert_eq!(err["code"], "request_too_large");
}

/// A variation's multipart request for `image`, whole, with its head.
fn raw_variation(image: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let boundary = "ig-test-boundary-7f3a";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"response_format\"\r\n\r\nb64_json\r\n\
             --{boundary}\r\ncontent-disposition: form-data; name=\"size\"\r\n\r\n256x256\r\n\
             --{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"in.png\"\r\n\
             content-type: image/png\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /v1/images/variations HTTP/1.1\r\nhost: gw\r\nconnection: close\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: multipart/form-data; boundary={boundary}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    (head.into_bytes(), body)
}

/// Sends `head`, then `body` in `chunk`-byte pieces `every` apart (stopping if the gateway
/// answers first), and returns the answer's status and body text.
async fn trickle(
    gw: &Gateway,
    head: &[u8],
    body: &[u8],
    chunk: usize,
    every: std::time::Duration,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            rd.read_to_end(&mut answer),
        )
        .await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    wr.write_all(head).await.unwrap();
    for piece in body.chunks(chunk) {
        if reader.is_finished() || wr.write_all(piece).await.is_err() {
            break;
        }
        tokio::time::sleep(every).await;
    }
    let answer = reader.await.unwrap();
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// An upload must keep a pace (`server.min_upload_rate` after `server.body_timeout`): one
/// trickled at 1 KiB/s against 2 KiB/s is cut with 408 and its memory reservation given back
/// (the upload memory fits one such upload: the next one would get 503 otherwise); one sent at
/// 16 KiB/s, which takes well past the 1 s grace, is served; others are served meanwhile.
#[tokio::test]
async fn a_trickled_upload_is_cut_with_408_and_a_steady_slow_one_is_served() {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        "log: {level: warn}\nserver: {body_timeout: 1s, min_upload_rate: 2048, max_upload_bytes: 250000, max_upload_memory: 250000}",
    );
    let gw = Gateway::start(&yaml).await;
    let (head, body) = raw_variation(&picture(256, 256));
    assert!((40_000..250_000).contains(&body.len()), "{}", body.len());
    let ms = std::time::Duration::from_millis;

    let started = std::time::Instant::now();
    let ((status, answer), ()) = tokio::join!(trickle(&gw, &head, &body, 512, ms(500)), async {
        tokio::time::sleep(ms(300)).await;
        models_ok(&gw).await;
    });
    let took = started.elapsed();
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // 1 s of grace plus 1 s per 2 KiB, at 1 KiB/s: cut at about 2 s, not at the end (~40 s).
    assert!(took < std::time::Duration::from_secs(8), "{took:?}");

    let started = std::time::Instant::now();
    let (status, answer) = trickle(&gw, &head, &body, 4096, ms(250)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("b64_json"), "{answer}");
    assert!(started.elapsed() > std::time::Duration::from_secs(2));
    models_ok(&gw).await;
}

/// A batch file upload (`POST /v1/files`) keeps the same pace and memory reservation as an
/// edit: trickled, it is cut with 408; sent steadily past the grace, it is stored.
#[tokio::test]
async fn a_trickled_batch_file_is_cut_with_408_too() {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        "log: {level: warn}\nserver: {body_timeout: 1s, min_upload_rate: 2048, max_upload_bytes: 250000, max_upload_memory: 250000}",
    );
    let gw = Gateway::start(&yaml).await;
    let lines: String = (0..400)
        .map(|i| format!("{{\"custom_id\":\"c{i}\",\"method\":\"POST\",\"url\":\"/v1/images/generations\",\"body\":{{\"prompt\":\"x\"}}}}\n"))
        .collect();
    let boundary = "ig-test-boundary-batch";
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         content-type: application/jsonl\r\n\r\n{lines}\r\n--{boundary}--\r\n"
    )
    .into_bytes();
    assert!(body.len() > 30_000, "{}", body.len());
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nhost: gw\r\nconnection: close\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: multipart/form-data; boundary={boundary}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let ms = std::time::Duration::from_millis;
    let (status, answer) = trickle(&gw, head.as_bytes(), &body, 512, ms(500)).await;
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    let (status, answer) = trickle(&gw, head.as_bytes(), &body, 4096, ms(250)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"purpose\":\"batch\""), "{answer}");
}

#[tokio::test]
async fn a_model_none_of_whose_backends_can_edit_says_so() {
    // ComfyUI serves generations only (its edit workflow is still to come).
    let workflow = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/comfyui/txt2img_api.json"
    );
    let gw = Gateway::start(&sandbox_config(
        &format!(
            "  node:\n    kind: comfyui\n    base_url: \"http://127.0.0.1:9\"\n    workflow: \"{workflow}\"\n    \
             inputs: {{prompt: 6.inputs.text, width: 5.inputs.width, height: 5.inputs.height, batch_size: 5.inputs.batch_size}}"
        ),
        "  local: {rules: dall-e-2, route: {targets: [{backend: node}]}}",
    ))
    .await;
    let form = Form::new()
        .text("model", "local")
        .text("prompt", "x")
        .part("image", file("in.png", picture(256, 256)));
    let err = expect_error(post(&gw, "/v1/images/edits", form).await, 400).await;
    assert_eq!(err["code"], "operation_not_supported");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("cannot serve image edits"),
        "{err}"
    );
}

fn openai_answer(n: usize) -> serde_json::Value {
    json!({"created": 1, "data": (0..n).map(|_| json!({"b64_json": b64(&tiny_png(256, 256))})).collect::<Vec<_>>()})
}

#[tokio::test]
async fn an_openai_upstream_receives_the_edit_as_multipart_with_the_same_bytes() {
    let fake = FakeUpstream::start(|r| {
        let n = if r.path_and_query.ends_with("/variations") {
            2
        } else {
            1
        };
        Reply::json(200, openai_answer(n))
    })
    .await;
    let backends = format!(
        "  up: {{kind: openai, base_url: \"{}/v1\", api_key: sk-upstream}}",
        fake.base_url()
    );
    let models = "  remote-d2: {rules: dall-e-2, route: {targets: [{backend: up, model: dall-e-2}]}}\n  \
                  gpt-image-2: {rules: {preset: gpt-image-2, input_fidelity: [high, low]}, \
                  route: {targets: [{backend: up, dialect: gpt-image, translation: {variation_prompt: \"the same, again\"}}]}}";
    let gw = Gateway::start(&sandbox_config(&backends, models)).await;

    let image = picture(256, 256);
    let mask = left_half_mask(256, 256);
    let form = Form::new()
        .text("model", "remote-d2")
        .text("prompt", "a red sun")
        .text("n", "1")
        .text("size", "256x256")
        .text("response_format", "b64_json")
        .part("image", file("in.png", image.clone()))
        .part("mask", file("mask.png", mask.clone()));
    let resp = post(&gw, "/v1/images/edits", form).await;
    assert_eq!(resp.status(), 200);
    let sent = &fake.requests()[0];
    assert_eq!(sent.path_and_query, "/v1/images/edits");
    assert_eq!(sent.headers["authorization"], "Bearer sk-upstream");
    let got = parts(sent).await;
    assert_eq!(text(&got, "model"), Some("dall-e-2"));
    assert_eq!(text(&got, "prompt"), Some("a red sun"));
    assert_eq!(text(&got, "size"), Some("256x256"));
    assert_eq!(text(&got, "response_format"), Some("b64_json"));
    let files: Vec<_> = got.iter().filter(|(_, f, _)| f.is_some()).collect();
    assert_eq!(files.len(), 2);
    assert_eq!((files[0].0.as_str(), &files[0].2), ("image", &image));
    assert_eq!((files[1].0.as_str(), &files[1].2), ("mask", &mask));

    // Three images to a GPT image model: image[] three times, in order, with input_fidelity.
    let images: Vec<Vec<u8>> = (0..3).map(|i| picture(64 + i * 16, 64)).collect();
    let mut form = Form::new()
        .text("model", "gpt-image-2")
        .text("prompt", "combine them")
        .text("input_fidelity", "high");
    for (i, img) in images.iter().enumerate() {
        form = form.part("image[]", file(&format!("{i}.png"), img.clone()));
    }
    assert_eq!(post(&gw, "/v1/images/edits", form).await.status(), 200);
    let got = parts(&fake.requests()[1]).await;
    let sent_images: Vec<&Vec<u8>> = got
        .iter()
        .filter(|(n, _, _)| n == "image[]")
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(sent_images, images.iter().collect::<Vec<_>>());
    assert_eq!(text(&got, "input_fidelity"), Some("high"));
    assert_eq!(text(&got, "model"), Some("gpt-image-2"));
    assert_eq!(
        text(&got, "response_format"),
        None,
        "GPT image models take none"
    );

    // A variation: to /images/variations in the DALL·E dialect, with no prompt.
    let form = Form::new()
        .text("model", "remote-d2")
        .text("n", "2")
        .text("size", "256x256")
        .part("image", file("in.png", image.clone()));
    let resp = post(&gw, "/v1/images/variations", form).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let sent = &fake.requests()[2];
    assert_eq!(sent.path_and_query, "/v1/images/variations");
    let got = parts(sent).await;
    assert_eq!(text(&got, "prompt"), None);
    assert_eq!(text(&got, "n"), Some("2"));

    // On a GPT image target a variation is an edit with the target's variation prompt, at a
    // size the upstream takes, answered at the size asked for.
    let form = Form::new()
        .text("model", "gpt-image-2")
        .text("size", "256x256")
        .text("response_format", "b64_json")
        .part("image", file("in.png", image.clone()));
    let resp = post(&gw, "/v1/images/variations", form).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        decode(&body["data"][0]["b64_json"]).dimensions(),
        (256, 256)
    );
    let sent = &fake.requests()[3];
    assert_eq!(sent.path_and_query, "/v1/images/edits");
    let got = parts(sent).await;
    assert_eq!(text(&got, "prompt"), Some("the same, again"));
    assert_eq!(text(&got, "model"), Some("gpt-image-2"));
    assert_eq!(text(&got, "response_format"), None);
}

#[tokio::test]
async fn an_edit_is_metered_as_an_edit_and_replayed_by_its_idempotency_key() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let form = || {
        Form::new()
            .text("prompt", "a red sun")
            .text("size", "256x256")
            .part("image", file("in.png", picture(256, 256)))
    };
    let send = |form: Form| {
        client()
            .post(gw.url("/v1/images/edits"))
            .bearer_auth(DEMO_KEY)
            .header("idempotency-key", "edit-1")
            .multipart(form)
            .send()
    };
    // reqwest draws a new boundary for each form: the key still matches the same parts.
    let first = send(form()).await.unwrap();
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    let again = send(form()).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first_body);
    let other = send(form().text("n", "2")).await.unwrap();
    assert_eq!(other.status(), 422, "the same key with other parts");

    let db = imagegate::store::Database::sqlite(gw.data_dir.path())
        .await
        .unwrap();
    let mut found = Vec::new();
    for _ in 0..100 {
        found = sqlx::query_as::<_, (String, i64)>(
            "SELECT operation, n_delivered FROM usage_ledger ORDER BY ts_ms",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        found,
        vec![("edit".to_string(), 1)],
        "one charged edit, the repeat uncharged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_edits_against_a_budget_for_seven() {
    const PRICE: u64 = 16_000; // dall-e-2 256x256
    let yaml = format!(
        r#"
listen: 127.0.0.1:${{PORT}}
public_url: http://127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
backends:
  slow: {{kind: sandbox, delay: 100ms}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: slow}}]}}}}
tenants:
  seven: {{models: ["*"], limits: {{budget: {{micro_usd: {}, period: total}}}}}}
keys:
  - {{id: seven, tenant: seven, secret: sk-seven-edits}}
"#,
        7 * PRICE
    );
    let gw = Gateway::start(&yaml).await;
    let image = picture(256, 256);
    let sends = (0..50).map(|i| {
        let form = Form::new()
            .text("prompt", format!("edit {i}"))
            .text("size", "256x256")
            .part("image", file("in.png", image.clone()));
        client()
            .post(gw.url("/v1/images/edits"))
            .bearer_auth("sk-seven-edits")
            .multipart(form)
            .send()
    });
    let results = futures_util::future::join_all(sends).await;
    let mut statuses = Vec::new();
    for r in results {
        let r = r.unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        if status == 429 {
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 43);

    let db = imagegate::store::Database::sqlite(gw.data_dir.path())
        .await
        .unwrap();
    let mut spent = (0i64, 0i64);
    for _ in 0..100 {
        spent = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(cost_micro_usd), 0) FROM usage_ledger \
             WHERE operation = 'edit' AND status = 200",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if spent.0 == 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        spent,
        (7, 7 * PRICE as i64),
        "the ledger sums to the budget"
    );
}

#[tokio::test]
async fn an_a1111_node_gets_img2img_with_the_image_and_a_repaint_mask_of_the_opposite_polarity() {
    let fake = support::local_nodes::fake_a1111(Default::default()).await;
    let gw = Gateway::start(&sandbox_config(
        &format!(
            "  gpu: {{kind: automatic1111, base_url: \"{}\", variation_denoising_strength: 0.55}}",
            fake.base_url()
        ),
        "  sd: {rules: dall-e-2, route: {targets: [{backend: gpu}]}}",
    ))
    .await;
    let image = picture(256, 256);
    let form = Form::new()
        .text("model", "sd")
        .text("prompt", "a red sun")
        .text("size", "256x256")
        .part("image", file("in.png", image.clone()))
        .part("mask", file("mask.png", left_half_mask(256, 256)));
    assert_eq!(post(&gw, "/v1/images/edits", form).await.status(), 200);
    let posts = || -> Vec<Recorded> {
        fake.requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect()
    };
    let sent = &posts()[0];
    assert_eq!(sent.path_and_query, "/sdapi/v1/img2img");
    let b = &sent.body;
    assert_eq!(unb64(b["init_images"][0].as_str().unwrap()), image);
    assert_eq!(b["denoising_strength"], 0.75);
    assert_eq!(
        (b["width"].as_u64(), b["height"].as_u64()),
        (Some(256), Some(256))
    );
    assert_eq!(b["prompt"], "a red sun");
    let mask = image::load_from_memory(&unb64(b["mask"].as_str().unwrap()))
        .unwrap()
        .to_luma8();
    // OpenAI: transparent (left) = edit. A1111: white = repaint, black = keep.
    assert_eq!(mask.get_pixel(10, 100).0[0], 255);
    assert_eq!(mask.get_pixel(250, 100).0[0], 0);

    let form = Form::new()
        .text("model", "sd")
        .text("size", "256x256")
        .part("image", file("in.png", image.clone()));
    assert_eq!(post(&gw, "/v1/images/variations", form).await.status(), 200);
    let sent = &posts()[1];
    let b = &sent.body;
    assert_eq!(sent.path_and_query, "/sdapi/v1/img2img");
    assert!((b["denoising_strength"].as_f64().unwrap() - 0.55).abs() < 1e-6);
    assert!(b.get("mask").is_none());
}

#[tokio::test]
async fn a_comfyui_node_gets_the_uploads_and_its_edit_workflow_with_their_names() {
    let fake =
        support::local_nodes::fake_comfyui(Default::default(), &["sd_xl_base_1.0.safetensors"])
            .await;
    let dir = env!("CARGO_MANIFEST_DIR");
    let backends = format!(
        "  comfy:\n    kind: comfyui\n    base_url: \"{}\"\n    poll_interval: 20ms\n    \
         workflow: \"{dir}/examples/comfyui/txt2img_api.json\"\n    \
         inputs: {{prompt: 6.inputs.text, width: 5.inputs.width, height: 5.inputs.height, batch_size: 5.inputs.batch_size}}\n    \
         edit_workflow: \"{dir}/examples/comfyui/img2img_api.json\"\n    \
         edit_inputs: {{prompt: 6.inputs.text, image: 1.inputs.image, mask: 2.inputs.image, denoise: 3.inputs.denoise, \
         width: 5.inputs.width, height: 5.inputs.height}}",
        fake.base_url()
    );
    let gw = Gateway::start(&sandbox_config(
        &backends,
        "  comfy-d2: {rules: dall-e-2, route: {targets: [{backend: comfy}]}}",
    ))
    .await;
    let image = picture(256, 256);
    let mask = left_half_mask(256, 256);
    let form = Form::new()
        .text("model", "comfy-d2")
        .text("prompt", "a red sun")
        .text("size", "256x256")
        .text("response_format", "b64_json")
        .part("image", file("in.png", image.clone()))
        .part("mask", file("mask.png", mask.clone()));
    let resp = post(&gw, "/v1/images/edits", form).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        decode(&body["data"][0]["b64_json"]).dimensions(),
        (256, 256)
    );

    let posts: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    let uploads: Vec<&Recorded> = posts
        .iter()
        .filter(|r| r.path_and_query == "/upload/image")
        .collect();
    assert_eq!(uploads.len(), 2, "the image and its mask");
    let got_image = parts(uploads[0]).await;
    let image_name = got_image[0].1.clone().unwrap();
    assert_eq!(got_image[0].0, "image");
    assert_eq!(got_image[0].2, image);
    assert_eq!(text(&got_image, "type"), Some("input"));
    let got_mask = parts(uploads[1]).await;
    assert_eq!(
        got_mask[0].2, mask,
        "OpenAI's mask goes as it is (LoadImageMask reads alpha)"
    );
    let mask_name = got_mask[0].1.clone().unwrap();
    assert_ne!(image_name, mask_name);
    let prompt = posts
        .iter()
        .find(|r| r.path_and_query == "/prompt")
        .unwrap();
    let graph = &prompt.body["prompt"];
    assert_eq!(graph["1"]["inputs"]["image"], image_name.as_str());
    assert_eq!(graph["2"]["inputs"]["image"], mask_name.as_str());
    assert_eq!(graph["3"]["inputs"]["denoise"], 0.75);
    assert_eq!(graph["5"]["inputs"]["width"], 256);
    assert_eq!(graph["6"]["inputs"]["text"], "a red sun");

    // A variation: no mask given, so an all-transparent one (edit everywhere), and the
    // variation's denoise; the image keeps its content-derived name.
    let form = Form::new()
        .text("model", "comfy-d2")
        .text("size", "256x256")
        .part("image", file("again.png", image.clone()));
    assert_eq!(post(&gw, "/v1/images/variations", form).await.status(), 200);
    let posts: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    let prompts: Vec<&Recorded> = posts
        .iter()
        .filter(|r| r.path_and_query == "/prompt")
        .collect();
    let graph = &prompts[1].body["prompt"];
    assert_eq!(graph["1"]["inputs"]["image"], image_name.as_str());
    assert!((graph["3"]["inputs"]["denoise"].as_f64().unwrap() - 0.6).abs() < 1e-6);
    let last_upload = posts
        .iter()
        .rev()
        .find(|r| r.path_and_query == "/upload/image")
        .unwrap();
    let clear = image::load_from_memory(&parts(last_upload).await[0].2)
        .unwrap()
        .to_rgba8();
    assert_eq!(clear.dimensions(), (256, 256));
    assert!(clear.pixels().all(|p| p.0[3] == 0));
}

#[tokio::test]
async fn an_azure_deployment_gets_the_edit_at_its_edits_path_with_its_api_version() {
    let fake = FakeUpstream::start(|_| Reply::json(200, openai_answer(1))).await;
    let gw = Gateway::start(&sandbox_config(
        &format!(
            "  az: {{kind: azure, endpoint: \"{}\", deployment: gpt-image-prod, api_version: 2025-04-01-preview, api_key: az-secret}}",
            fake.base_url()
        ),
        "  az-image: {rules: gpt-image-2, route: {targets: [{backend: az, dialect: gpt-image}]}}",
    ))
    .await;
    let form = Form::new()
        .text("model", "az-image")
        .text("prompt", "a red sun")
        .part("image", file("in.png", picture(256, 256)));
    assert_eq!(post(&gw, "/v1/images/edits", form).await.status(), 200);
    let sent = &fake.requests()[0];
    assert_eq!(
        sent.path_and_query,
        "/openai/deployments/gpt-image-prod/images/edits?api-version=2025-04-01-preview"
    );
    assert_eq!(sent.headers["api-key"], "az-secret");
    assert!(sent.headers.get("authorization").is_none());
    let got = parts(sent).await;
    assert_eq!(
        text(&got, "model"),
        None,
        "Azure names the deployment in the URL"
    );
    assert_eq!(text(&got, "prompt"), Some("a red sun"));
}

#[tokio::test]
async fn edits_and_variations_are_counted_under_their_operation() {
    // A model of its own: the metrics registry is the process's, shared by this file's tests.
    let gw = Gateway::start(&sandbox_config(
        "",
        "  counted: {rules: dall-e-2, route: {targets: [{backend: sandbox}]}}",
    ))
    .await;
    let form = |with_prompt: bool| {
        let form = Form::new()
            .text("model", "counted")
            .text("size", "256x256")
            .part("image", Part::bytes(tiny_png(256, 256)).file_name("in.png"));
        if with_prompt {
            form.text("prompt", "x")
        } else {
            form
        }
    };
    for (path, with_prompt, status) in [
        ("/v1/images/edits", true, 200),
        ("/v1/images/edits", false, 400),
        ("/v1/images/variations", false, 200),
    ] {
        let resp = client()
            .post(gw.url(path))
            .bearer_auth(DEMO_KEY)
            .multipart(form(with_prompt))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}");
    }
    let text = gw.metrics().await;
    for (labels, want) in [
        (
            r#"{model="counted",operation="edit",status="2xx",tenant="demo"}"#,
            1.0,
        ),
        (
            r#"{model="counted",operation="edit",status="4xx",tenant="demo"}"#,
            1.0,
        ),
        (
            r#"{model="counted",operation="variation",status="2xx",tenant="demo"}"#,
            1.0,
        ),
    ] {
        let line = format!("imagegate_requests_total{labels}");
        assert_eq!(line_value(&text, &line), Some(want), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn a_streamed_edit_on_a_backend_that_cannot_stream_ends_with_an_image_edit_event() {
    let gw = Gateway::start(&sandbox_config(
        "",
        "  gpt-image-2: {rules: gpt-image-2, route: {targets: [{backend: sandbox}]}}",
    ))
    .await;
    let form = Form::new()
        .text("model", "gpt-image-2")
        .text("prompt", "a red sun")
        .text("stream", "true")
        .part("image", file("in.png", picture(64, 64)));
    let resp = post(&gw, "/v1/images/edits", form).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert!(
        text.starts_with("event: image_edit.completed\n"),
        "{text:.200}"
    );
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let event: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(event["type"], "image_edit.completed");
    assert!(!unb64(event["b64_json"].as_str().unwrap()).is_empty());
}

#[tokio::test]
async fn a_failed_edit_is_retried_on_the_next_target_with_the_same_parts() {
    let broken = FakeUpstream::start(|_| {
        Reply::json(
            500,
            json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}),
        )
    })
    .await;
    let good = FakeUpstream::start(|_| Reply::json(200, openai_answer(1))).await;
    let backends = format!(
        "  broken: {{kind: openai, base_url: \"{}/v1\", api_key: sk-a}}\n  \
           good: {{kind: openai, base_url: \"{}/v1\", api_key: sk-b}}",
        broken.base_url(),
        good.base_url()
    );
    let gw = Gateway::start(&sandbox_config(
        &backends,
        "  failover: {rules: dall-e-2, route: {targets: [{backend: broken, model: dall-e-2}, \
         {backend: good, model: dall-e-2, priority: 1}]}}",
    ))
    .await;
    let image = picture(256, 256);
    let form = Form::new()
        .text("model", "failover")
        .text("prompt", "a red sun")
        .text("size", "256x256")
        .part("image", file("in.png", image.clone()));
    let resp = post(&gw, "/v1/images/edits", form).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-imagegate-attempts"], "2");
    let first = parts(&broken.requests()[0]).await;
    let second = parts(&good.requests()[0]).await;
    assert_eq!(first, second, "the retry resends the same parts");
    assert!(second.iter().any(|(n, _, b)| n == "image" && *b == image));
}
