//! The console over real HTTP (the browser suite, tests/browser, drives it in Chromium):
//! login limits, sessions that end with their credential, escaping, security headers, the
//! audit log of admin API changes, the portal off by default.

mod support;

use serde_json::{json, Value};
use support::*;

const ADMIN: &str = "console-admin-0123456789";

fn config(extra: &str) -> String {
    sandbox_config("", "").replace(
        "log: {level: warn}",
        &format!(
            "log: {{level: warn}}\nadmin: {{tokens_sha256: [{}]}}\n{extra}",
            hex::encode(imagegate::auth::hash_secret(ADMIN))
        ),
    )
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The login form's nonce cookie and CSRF token.
async fn login_form(base: &str, site: &str) -> (String, String) {
    let resp = no_redirects()
        .get(format!("{base}{site}/login"))
        .send()
        .await
        .unwrap();
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .find(|c| c.contains("_login="))
        .unwrap();
    let page = resp.text().await.unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    (cookie, csrf)
}

/// Logs in: the status and the session cookie (`name=value`), if one was set.
async fn login(base: &str, site: &str, credential: &str) -> (u16, Option<String>) {
    let (nonce, csrf) = login_form(base, site).await;
    let resp = no_redirects()
        .post(format!("{base}{site}/login"))
        .header("cookie", nonce)
        .form(&[("csrf", csrf.as_str()), ("credential", credential)])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let session = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .find(|c| c.starts_with("ig_console=") || c.starts_with("ig_portal="))
        .filter(|c| !c.ends_with('='));
    (status, session)
}

async fn page(url: &str, cookie: &str) -> (u16, String) {
    let resp = no_redirects()
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Value) -> Value {
    client()
        .request(
            method.parse().unwrap(),
            format!("{}/admin/v1{path}", gw.admin_base),
        )
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn login_attempts_are_limited_per_address_even_with_the_right_token() {
    let gw = Gateway::start(&config("console: {login_attempts_per_minute: 3}")).await;
    for _ in 0..3 {
        assert_eq!(login(&gw.admin_base, "/console", "wrong").await.0, 401);
    }
    let (status, session) = login(&gw.admin_base, "/console", ADMIN).await;
    assert_eq!(status, 429);
    assert!(session.is_none());
}

#[tokio::test]
async fn a_login_sets_a_strict_httponly_cookie_and_pages_carry_the_security_headers() {
    let gw = Gateway::start(&config("")).await;
    let (nonce, csrf) = login_form(&gw.admin_base, "/console").await;
    let resp = no_redirects()
        .post(format!("{}/console/login", gw.admin_base))
        .header("cookie", nonce)
        .form(&[("csrf", csrf.as_str()), ("credential", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    let set = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("ig_console="))
        .unwrap();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console/",
        "Max-Age=43200",
    ] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    // Plain HTTP: not Secure unless asked (console.secure_cookies).
    assert!(!set.contains("Secure"));
    assert!(!set.contains(ADMIN));
    let cookie = set.split(';').next().unwrap();
    let resp = no_redirects()
        .get(format!("{}/console/overview", gw.admin_base))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-frame-options"], "DENY");
    // A page never holds an inline script.
    let body = resp.text().await.unwrap();
    assert!(!body.contains("<script>") && !body.contains("onclick"));
}

#[tokio::test]
async fn what_tenants_name_is_escaped_in_pages() {
    let gw = Gateway::start(&config("")).await;
    admin(
        &gw,
        "POST",
        "/tenants",
        json!({"id": "esc", "models": ["dall-e-2"]}),
    )
    .await;
    let evil = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>";
    admin(&gw, "POST", "/keys", json!({"tenant": "esc", "name": evil})).await;
    let (_, cookie) = login(&gw.admin_base, "/console", ADMIN).await;
    let (status, body) = page(
        &format!("{}/console/tenants/esc", gw.admin_base),
        &cookie.unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!body.contains("<script>alert"));
    assert!(!body.contains("<img src=x"));
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
}

#[tokio::test]
async fn admin_api_and_console_changes_are_in_the_audit_log() {
    let gw = Gateway::start(&config("")).await;
    admin(
        &gw,
        "POST",
        "/tenants",
        json!({"id": "audited", "models": ["dall-e-2"]}),
    )
    .await;
    let (_, cookie) = login(&gw.admin_base, "/console", ADMIN).await;
    let cookie = cookie.unwrap();
    let (_, body) = page(&format!("{}/console/audit", gw.admin_base), &cookie).await;
    let fingerprint = &hex::encode(imagegate::auth::hash_secret(ADMIN))[..12];
    assert!(body.contains("admin_api.post"), "{body}");
    assert!(body.contains("/admin/v1/tenants"));
    assert!(body.contains(&format!("admin:token:{fingerprint}")));
    // Reads are not changes.
    admin(&gw, "GET", "/tenants", json!({})).await;
    let (_, again) = page(&format!("{}/console/audit", gw.admin_base), &cookie).await;
    assert_eq!(
        body.matches("admin_api.").count(),
        again.matches("admin_api.").count()
    );
}

#[tokio::test]
async fn the_portal_is_off_unless_configured() {
    let gw = Gateway::start(&config("")).await;
    let (status, _) = page(&format!("{}/portal/login", gw.base), "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_portal_session_ends_when_its_key_is_revoked() {
    let gw = Gateway::start(&config("console: {portal: true}")).await;
    admin(
        &gw,
        "POST",
        "/tenants",
        json!({"id": "p1", "models": ["dall-e-2"]}),
    )
    .await;
    let key = admin(
        &gw,
        "POST",
        "/keys",
        json!({"tenant": "p1", "manage_keys": true}),
    )
    .await;
    // gateway.yaml's plaintext keys are not portal keys.
    assert_eq!(login(&gw.base, "/portal", DEMO_KEY).await.0, 401);
    let (status, cookie) = login(&gw.base, "/portal", key["secret"].as_str().unwrap()).await;
    assert_eq!(status, 303);
    let cookie = cookie.unwrap();
    let home = format!("{}/portal/home", gw.base);
    let (status, body) = page(&home, &cookie).await;
    assert_eq!(status, 200);
    assert!(body.contains("p1"));
    // The console's cookie name is not the portal's: a portal session is no ops session.
    let (status, _) = page(
        &format!("{}/console/overview", gw.admin_base),
        &cookie.replace("ig_portal=", "ig_console="),
    )
    .await;
    assert_eq!(status, 303);
    let id = key["id"].as_str().unwrap();
    admin(&gw, "POST", &format!("/keys/{id}/revoke"), json!({})).await;
    let (status, _) = page(&home, &cookie).await;
    assert_eq!(status, 303, "a revoked key's session must end at once");
}
