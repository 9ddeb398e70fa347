//! JWT bearer auth: HS256, RS256 (PEM) and ES256 (JWKS by kid) accepted; expired, not yet
//! valid, wrong issuer or audience, bad signature, alg none, HS/RS confusion and unknown kid
//! refused; disabled tenants refused; a models claim narrows; an admin role opens the admin API.

mod support;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

const HS_SECRET: &str = "a-shared-hs256-secret-for-tests-0123456789";

struct Keys {
    dir: tempfile::TempDir,
    rsa_private: Vec<u8>,
    rsa_public: Vec<u8>,
    ec_private: Vec<u8>,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let rsa = dir.path().join("rsa.pem");
    let rsa_pub = dir.path().join("rsa_pub.pem");
    assert!(Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&rsa)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success());
    assert!(Command::new("openssl")
        .args(["rsa", "-in"])
        .arg(&rsa)
        .args(["-pubout", "-out"])
        .arg(&rsa_pub)
        .output()
        .unwrap()
        .status
        .success());
    let ec = rcgen::KeyPair::generate().unwrap();
    let ec_private = ec.serialize_pem().into_bytes();
    // The JWKS holds the EC key under kid "ec-1".
    let mut jwk = Jwk::from_encoding_key(
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
        Algorithm::ES256,
    )
    .unwrap();
    jwk.common.key_id = Some("ec-1".into());
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    Keys {
        rsa_private: std::fs::read(&rsa).unwrap(),
        rsa_public: std::fs::read(&rsa_pub).unwrap(),
        ec_private,
        dir,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": "https://idp.test", "aud": "imagegate", "sub": "alice", "tenant": "demo",
                       "exp": now() + 300, "nbf": now() - 5});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs(c: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn gateway(k: &Keys, with_hs: bool) -> Gateway {
    let hs = if with_hs {
        format!("hs256_secret: {HS_SECRET}, ")
    } else {
        String::new()
    };
    let jwt = format!(
        "jwt: {{issuer: \"https://idp.test\", audience: imagegate, {hs}public_keys: [{}], jwks_file: {}, \
         admin_claim: roles, admin_value: imagegate-admin}}",
        k.dir.path().join("rsa_pub.pem").display(),
        k.dir.path().join("jwks.json").display()
    );
    Gateway::start(&sandbox_config("", "").replace(
        "log: {level: warn}",
        &format!("log: {{level: warn}}\n{jwt}"),
    ))
    .await
}

async fn status(gw: &Gateway, token: &str, model: &str) -> u16 {
    gw.generate_as(
        token,
        json!({"model": model, "prompt": "x", "size": "1024x1024", "response_format": "b64_json"}),
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test]
async fn valid_tokens_of_each_kind_are_accepted() {
    let k = keys();
    let gw = gateway(&k, true).await;
    assert_eq!(status(&gw, &hs(&claims(json!({}))), "dall-e-2").await, 200);
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(&k.rsa_private).unwrap(),
    )
    .unwrap();
    assert_eq!(status(&gw, &rs, "dall-e-2").await, 200);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".into());
    let es = encode(
        &header,
        &claims(json!({})),
        &EncodingKey::from_ec_pem(&k.ec_private).unwrap(),
    )
    .unwrap();
    assert_eq!(status(&gw, &es, "dall-e-2").await, 200);
    // Within the leeway (30 s) an expired token still passes.
    assert_eq!(
        status(&gw, &hs(&claims(json!({"exp": now() - 10}))), "dall-e-2").await,
        200
    );
    // A models claim narrows the tenant's models.
    let narrow = hs(&claims(json!({"models": ["dall-e-2"]})));
    assert_eq!(status(&gw, &narrow, "dall-e-2").await, 200);
    assert_eq!(status(&gw, &narrow, "dall-e-3").await, 404);
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let k = keys();
    let gw = gateway(&k, true).await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let good = hs(&claims(json!({})));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims(json!({"tenant": "narrow"}))),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    let mut unknown_kid = Header::new(Algorithm::ES256);
    unknown_kid.kid = Some("ec-9".into());
    let unknown_kid = encode(
        &unknown_kid,
        &claims(json!({})),
        &EncodingKey::from_ec_pem(&k.ec_private).unwrap(),
    )
    .unwrap();
    let no_exp = {
        let mut c = claims(json!({}));
        c.as_object_mut().unwrap().remove("exp");
        hs(&c)
    };
    for (what, token) in [
        ("expired", hs(&claims(json!({"exp": now() - 120})))),
        ("not yet valid", hs(&claims(json!({"nbf": now() + 600})))),
        (
            "wrong issuer",
            hs(&claims(json!({"iss": "https://evil.test"}))),
        ),
        (
            "wrong audience",
            hs(&claims(json!({"aud": "someone-else"}))),
        ),
        ("no exp", no_exp),
        ("bad signature", tampered),
        ("alg none", none),
        ("unknown kid", unknown_kid),
        (
            "wrong secret",
            encode(
                &Header::new(Algorithm::HS256),
                &claims(json!({})),
                &EncodingKey::from_secret(b"guess"),
            )
            .unwrap(),
        ),
        ("unknown tenant", hs(&claims(json!({"tenant": "nobody"})))),
    ] {
        let resp = gw.generate_as(&token, json!({"prompt": "x"})).await;
        assert_eq!(resp.status(), 401, "{what}");
        let err = expect_error(resp, 401).await;
        assert_eq!(err["code"], "invalid_api_key", "{what}");
    }
    let err = expect_error(
        gw.generate_as(
            &hs(&claims(json!({"tenant": "off"}))),
            json!({"prompt": "x"}),
        )
        .await,
        401,
    )
    .await;
    assert_eq!(
        err["message"], "This API key has been disabled.",
        "a disabled tenant's JWT is refused"
    );
}

#[tokio::test]
async fn hs_rs_confusion_is_refused() {
    let k = keys();
    // No HS256 secret configured: a token "signed" with the RSA public key as an HMAC secret
    // must not verify against that public key.
    let gw = gateway(&k, false).await;
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(&k.rsa_public),
    )
    .unwrap();
    assert_eq!(status(&gw, &confused, "dall-e-2").await, 401);
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(&k.rsa_private).unwrap(),
    )
    .unwrap();
    assert_eq!(status(&gw, &rs, "dall-e-2").await, 200);
}

#[tokio::test]
async fn an_admin_role_opens_the_admin_api() {
    let k = keys();
    let gw = gateway(&k, true).await;
    let get = |token: String| {
        let url = format!("{}/admin/v1/tenants", gw.admin_base);
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        get(hs(&claims(json!({"roles": ["imagegate-admin"]})))).await,
        200
    );
    assert_eq!(get(hs(&claims(json!({"roles": ["viewer"]})))).await, 401);
    assert_eq!(
        get(hs(&claims(
            json!({"roles": "imagegate-admin", "aud": "other"})
        )))
        .await,
        401
    );
}

#[tokio::test]
async fn a_limits_claim_limits_the_token_on_top_of_its_tenant() {
    let k = keys();
    let gw = gateway(&k, true).await;
    let limited = hs(&claims(
        json!({"sub": "bot", "limits": {"requests_per_minute": 1}}),
    ));
    assert_eq!(status(&gw, &limited, "dall-e-2").await, 200);
    let resp = gw
        .generate_as(&limited, json!({"prompt": "x", "size": "256x256"}))
        .await;
    let err = expect_error(resp, 429).await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("key requests per minute"),
        "{err}"
    );
    // The tenant itself is not limited: another token of it still passes.
    assert_eq!(
        status(&gw, &hs(&claims(json!({"sub": "human"}))), "dall-e-2").await,
        200
    );
    let bad = hs(&claims(json!({"limits": {"requests_per_minute": "lots"}})));
    assert_eq!(status(&gw, &bad, "dall-e-2").await, 401);
}
