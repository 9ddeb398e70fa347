//! The `s3` image store against a real S3-compatible server (moto in server mode, started by
//! scripts/test.sh and named by IMAGEGATE_TEST_S3). Two replicas share a bucket and a
//! signing key: a link made by one is served by the other.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

fn endpoint() -> Option<String> {
    service("IMAGEGATE_TEST_S3", "an S3-compatible server")
}

async fn bucket(endpoint: &str) -> String {
    let name = format!("imagegate-{}", hex::encode(rand::random::<[u8; 6]>()));
    let resp = client()
        .put(format!("{endpoint}/{name}"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "create bucket: {}",
        resp.status()
    );
    name
}

fn s3_config(endpoint: &str, bucket: &str, ttl: &str) -> String {
    sandbox_config("", "").replace(
        "log: {level: warn}",
        &format!(
            "log: {{level: warn}}\nimages:\n  store: s3\n  url_ttl: {ttl}\n  signing_key: shared-signing-key-for-all-replicas-0123\n  \
             s3: {{bucket: {bucket}, endpoint: \"{endpoint}\", path_style: true, access_key_id: test, secret_access_key: test}}"
        ),
    )
}

async fn object_keys(endpoint: &str, bucket: &str) -> Vec<String> {
    let xml = client()
        .get(format!("{endpoint}/{bucket}?list-type=2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    xml.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_link_made_by_one_replica_is_served_by_another() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = bucket(&endpoint).await;
    let yaml = s3_config(&endpoint, &bucket, "60m");
    let one = Gateway::start(&yaml).await;
    let two = Gateway::start(&yaml).await;

    let req =
        |format: &str| json!({"prompt": "shared", "size": "256x256", "response_format": format});
    let body: serde_json::Value = one.generate(req("url")).await.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&one.base));
    let keys = object_keys(&endpoint, &bucket).await;
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].starts_with("images/") && keys[0].ends_with(".png"),
        "{keys:?}"
    );
    assert!(
        std::fs::read_dir(one.data_dir.path().join("images")).is_err(),
        "nothing on local disk"
    );

    let via_two = url.replace(&one.base, &two.base);
    let resp = client().get(&via_two).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let bytes = resp.bytes().await.unwrap();
    let b64: serde_json::Value = two.generate(req("b64_json")).await.json().await.unwrap();
    assert_eq!(
        bytes.to_vec(),
        unb64(b64["data"][0]["b64_json"].as_str().unwrap())
    );

    let tampered = via_two.replace("signature=", "signature=x");
    expect_error(client().get(&tampered).send().await.unwrap(), 403).await;
}

#[tokio::test]
async fn the_sweeper_deletes_expired_objects() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = bucket(&endpoint).await;
    let gw = Gateway::start(&s3_config(&endpoint, &bucket, "1s")).await;
    let resp = gw
        .generate(json!({"prompt": "short-lived", "size": "256x256"}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(object_keys(&endpoint, &bucket).await.len(), 1);
    // A batch file in the same bucket is never swept.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name("in.jsonl"),
        );
    let file: serde_json::Value = client()
        .post(gw.url("/v1/files"))
        .bearer_auth(DEMO_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut gone = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let keys = object_keys(&endpoint, &bucket).await;
        if keys.len() == 1 {
            assert!(keys[0].contains("batch-files/"), "{keys:?}");
            gone = true;
            break;
        }
    }
    assert!(gone, "expired object still in the bucket");
    let content = client()
        .get(gw.url(&format!(
            "/v1/files/{}/content",
            file["id"].as_str().unwrap()
        )))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(content.status(), 200);
    assert_eq!(content.bytes().await.unwrap().as_ref(), b"{}\n");
}
