//! The admin API on the admin listener: token guard, tenants CRUD, keys lifecycle, pagination,
//! clear 4xx errors, secrets shown once.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const ADMIN: &str = "adm-0123456789-secret";

async fn gateway() -> Gateway {
    let yaml = sandbox_config("", "").replace(
        "log: {level: warn}",
        &format!(
            "log: {{level: warn}}\nadmin: {{tokens_sha256: [{}]}}",
            hex::encode(imagegate::auth::hash_secret(ADMIN))
        ),
    );
    Gateway::start(&yaml).await
}

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut rb = client().request(method.parse().unwrap(), format!("{}{path}", gw.admin_base));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call(gw, method, path, body, Some(ADMIN)).await
}

async fn status_within_a_second(gw: &Gateway, key: &str, want: u16) -> bool {
    for _ in 0..30 {
        let s = gw
            .generate_as(
                key,
                json!({"prompt": "x", "size": "256x256", "response_format": "b64_json"}),
            )
            .await
            .status();
        if s == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn admin_requests_need_a_valid_admin_token() {
    let gw = gateway().await;
    let (s, e) = call(&gw, "GET", "/admin/v1/tenants", None, None).await;
    assert_eq!(s, 401);
    assert!(e["error"]["message"].is_string());
    assert_eq!(
        call(&gw, "GET", "/admin/v1/tenants", None, Some("wrong"))
            .await
            .0,
        401
    );
    assert_eq!(
        call(&gw, "GET", "/admin/v1/tenants", None, Some(DEMO_KEY))
            .await
            .0,
        401,
        "an API key is not an admin token"
    );
    assert_eq!(admin(&gw, "GET", "/admin/v1/tenants", None).await.0, 200);
    // /metrics stays open for scrapers.
    assert!(gw.metrics().await.contains("imagegate_"));
}

#[tokio::test]
async fn tenants_crud_with_pagination_and_clear_errors() {
    let gw = gateway().await;
    for id in ["t-a", "t-b", "t-c"] {
        let (s, t) = admin(&gw, "POST", "/admin/v1/tenants", Some(json!({"id": id, "models": ["dall-e-2"], "limits": {"requests_per_minute": 10}, "labels": {"plan": "pro"}}))).await;
        assert_eq!(s, 201, "{t}");
        assert_eq!(t["labels"]["plan"], "pro");
    }
    assert_eq!(
        admin(&gw, "POST", "/admin/v1/tenants", Some(json!({"id": "t-a"})))
            .await
            .0,
        409
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/v1/tenants",
            Some(json!({"id": "bad id"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/v1/tenants",
            Some(json!({"id": "x", "colour": 1}))
        )
        .await
        .0,
        400
    );
    let (s, page1) = admin(&gw, "GET", "/admin/v1/tenants?limit=2", None).await;
    assert_eq!(s, 200);
    assert_eq!(page1["data"].as_array().unwrap().len(), 2);
    assert_eq!(page1["has_more"], true);
    let next = page1["next_after"].as_str().unwrap();
    let (_, page2) = admin(
        &gw,
        "GET",
        &format!("/admin/v1/tenants?limit=2&after={next}"),
        None,
    )
    .await;
    assert_eq!(page2["data"][0]["id"], "t-c");
    assert_eq!(page2["has_more"], false);
    assert_eq!(
        admin(&gw, "GET", "/admin/v1/tenants?limit=0", None).await.0,
        400
    );
    assert_eq!(
        admin(&gw, "GET", "/admin/v1/tenants?colour=1", None)
            .await
            .0,
        400
    );

    let (s, t) = admin(
        &gw,
        "PUT",
        "/admin/v1/tenants/t-b",
        Some(json!({"models": ["*"]})),
    )
    .await;
    assert_eq!((s, t["models"].clone()), (200, json!(["*"])));
    assert_eq!(
        admin(
            &gw,
            "PUT",
            "/admin/v1/tenants/t-b",
            Some(json!({"id": "other"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        admin(&gw, "GET", "/admin/v1/tenants/nope", None).await.0,
        404
    );
    let (_, t) = admin(&gw, "POST", "/admin/v1/tenants/t-b/disable", None).await;
    assert_eq!(t["disabled"], true);
    assert_eq!(
        admin(&gw, "DELETE", "/admin/v1/tenants/t-c", None).await.0,
        200
    );
    assert_eq!(
        admin(&gw, "GET", "/admin/v1/tenants/t-c", None).await.0,
        404
    );
}

#[tokio::test]
async fn keys_lifecycle_through_the_admin_api() {
    let gw = gateway().await;
    admin(
        &gw,
        "POST",
        "/admin/v1/tenants",
        Some(json!({"id": "acme", "models": ["*"]})),
    )
    .await;
    let (s, k) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(json!({"tenant": "acme", "name": "web"})),
    )
    .await;
    assert_eq!(s, 201);
    let (id, secret) = (
        k["id"].as_str().unwrap().to_string(),
        k["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/v1/keys",
            Some(json!({"tenant": "ghost"}))
        )
        .await
        .0,
        404
    );

    let (_, got) = admin(&gw, "GET", &format!("/admin/v1/keys/{id}"), None).await;
    assert_eq!(got["tenant"], "acme");
    assert!(got.get("secret").is_none() && got.get("secret_sha256").is_none());
    let (_, listed) = admin(&gw, "GET", "/admin/v1/keys?tenant=acme", None).await;
    assert!(
        !listed.to_string().contains(&secret[secret.len() - 40..]),
        "no secret after creation"
    );

    assert!(status_within_a_second(&gw, &secret, 200).await);
    admin(&gw, "POST", &format!("/admin/v1/keys/{id}/disable"), None).await;
    assert!(status_within_a_second(&gw, &secret, 401).await);
    admin(&gw, "POST", &format!("/admin/v1/keys/{id}/enable"), None).await;
    assert!(status_within_a_second(&gw, &secret, 200).await);

    let (s, r) = admin(
        &gw,
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        Some(json!({"grace": "1h"})),
    )
    .await;
    assert_eq!(s, 200);
    let new_secret = r["secret"].as_str().unwrap().to_string();
    assert!(status_within_a_second(&gw, &new_secret, 200).await);
    assert!(
        status_within_a_second(&gw, &secret, 200).await,
        "the old secret works during its grace"
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            &format!("/admin/v1/keys/{id}/rotate"),
            Some(json!({"grace": "soon"}))
        )
        .await
        .0,
        400
    );

    admin(&gw, "POST", &format!("/admin/v1/keys/{id}/revoke"), None).await;
    assert!(status_within_a_second(&gw, &new_secret, 401).await);
    assert!(status_within_a_second(&gw, &secret, 401).await);
    assert_eq!(
        admin(
            &gw,
            "POST",
            &format!("/admin/v1/keys/{id}/rotate"),
            Some(json!({}))
        )
        .await
        .0,
        409
    );
    assert_eq!(admin(&gw, "GET", "/admin/v1/keys/nope", None).await.0, 404);
    assert_eq!(admin(&gw, "DELETE", "/admin/v1/keys", None).await.0, 404);
}

#[tokio::test]
async fn a_key_can_narrow_its_tenants_limits() {
    let gw = gateway().await;
    admin(
        &gw,
        "POST",
        "/admin/v1/tenants",
        Some(json!({"id": "acme", "models": ["*"], "limits": {"requests_per_minute": 100}})),
    )
    .await;
    let (_, k) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(json!({"tenant": "acme", "limits": {"requests_per_minute": 1}})),
    )
    .await;
    let (_, other) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(json!({"tenant": "acme"})),
    )
    .await;
    let secret = k["secret"].as_str().unwrap().to_string();
    assert!(status_within_a_second(&gw, &secret, 200).await);
    let resp = gw
        .generate_as(&secret, json!({"prompt": "x", "size": "256x256"}))
        .await;
    let err = expect_error(resp, 429).await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("key requests per minute"),
        "{err}"
    );
    assert!(status_within_a_second(&gw, other["secret"].as_str().unwrap(), 200).await);
}

/// A key created through the admin API works on the very next request to the replica that
/// made it, and one revoked there stops on the very next request (the replica's key cache
/// takes its own changes in at once; other replicas within their 500 ms poll). Ten rounds, so
/// a cache that waited for its poll would be caught.
#[tokio::test]
async fn a_key_changed_here_takes_effect_on_the_next_request() {
    let gw = gateway().await;
    let (status, _) = admin(
        &gw,
        "POST",
        "/admin/v1/tenants",
        Some(json!({"id": "now", "models": ["*"]})),
    )
    .await;
    assert_eq!(status, 201);
    let body = json!({"prompt": "x", "size": "256x256", "response_format": "b64_json"});
    for round in 0..10 {
        let (status, key) = admin(
            &gw,
            "POST",
            "/admin/v1/keys",
            Some(json!({"tenant": "now"})),
        )
        .await;
        assert_eq!(status, 201, "{key}");
        let secret = key["secret"].as_str().unwrap();
        let s = gw.generate_as(secret, body.clone()).await.status();
        assert_eq!(s, 200, "round {round}: a new key");
        let id = key["id"].as_str().unwrap();
        let (status, _) = admin(&gw, "POST", &format!("/admin/v1/keys/{id}/revoke"), None).await;
        assert_eq!(status, 200);
        let s = gw.generate_as(secret, body.clone()).await.status();
        assert_eq!(s, 401, "round {round}: a revoked key");
    }
}
