//! The web console, served by the gateway from assets compiled into the binary: the ops
//! console on the admin listener (`/console/`, admin tokens or admin JWTs log in) and the
//! tenant portal on the main listener (`/portal/`, `console.portal: true`; store API keys log
//! in). Pages are rendered on the server ([`layout`]); a little script refreshes the overview
//! and copies a new key's secret.
//!
//! Every page carries a strict Content-Security-Policy, `no-store` and `nosniff`; sessions
//! are signed `HttpOnly`, `SameSite=Strict` cookies ([`session`]); every form carries a CSRF
//! token checked before anything else; every change lands in the audit log.

mod layout;
mod ops;
mod portal;
pub mod session;
mod shared;
mod tenants;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use maud::{html, Markup};

use super::respond::Body;
use super::state::AppState;
pub use session::Console;
use session::Session;

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// Forms are small; an upload never comes through the console.
const MAX_FORM: usize = 64 * 1024;

/// The ops console (admin listener).
pub async fn ops(state: &Arc<AppState>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let site = Site {
        base: "/console",
        cookie: "ig_console",
        secure: state.admin_tls.load().is_some()
            || state.runtime.load().config.console.secure_cookies,
    };
    if !state.runtime.load().config.console.enabled {
        return not_found();
    }
    ops::route(state, &site, req, peer).await
}

/// The tenant portal (main listener).
pub async fn portal(state: &Arc<AppState>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let site = Site {
        base: "/portal",
        cookie: "ig_portal",
        secure: state.tls.load().is_some() || state.runtime.load().config.console.secure_cookies,
    };
    if !state.runtime.load().config.console.portal {
        return not_found();
    }
    portal::route(state, &site, req, peer).await
}

/// Which of the two sites a request is for.
pub(super) struct Site {
    pub base: &'static str,
    pub cookie: &'static str,
    pub secure: bool,
}

impl Site {
    fn login_cookie(&self) -> String {
        format!("{}_login", self.cookie)
    }

    fn cookie_header(&self, name: &str, value: &str, max_age: Option<u64>) -> String {
        let mut c = format!(
            "{name}={value}; Path={}/; HttpOnly; SameSite=Strict",
            self.base
        );
        if let Some(age) = max_age {
            c.push_str(&format!("; Max-Age={age}"));
        }
        if self.secure {
            c.push_str("; Secure");
        }
        c
    }
}

/// A request's session, checked, and the token its forms carry.
pub(super) struct Ctx<'a> {
    pub state: &'a Arc<AppState>,
    pub site: &'a Site,
    pub session: Session,
    pub csrf: String,
}

impl Ctx<'_> {
    /// Writes the audit log; a failure is logged (the change itself is made).
    pub async fn audit(&self, action: &str, target: &str, detail: serde_json::Value) {
        let Some(db) = database(self.state) else {
            return;
        };
        if let Err(e) = db
            .audit(&self.session.who.actor(), action, target, &detail)
            .await
        {
            tracing::error!(error = %e, action, "audit log write failed");
        }
        // Every change is audited: the key cache takes it in here too.
        crate::server::admin::refresh_keys(self.state).await;
    }
}

pub(super) fn database(state: &AppState) -> Option<crate::store::Database> {
    state.db_keys.as_ref().map(|k| k.database().clone())
}

pub(super) fn cookie<'r>(req: &'r Request<Incoming>, name: &str) -> Option<&'r str> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The session of a request's cookie, if it still opens.
pub(super) fn session_of(
    state: &AppState,
    site: &Site,
    req: &Request<Incoming>,
) -> Option<Session> {
    let cookie = cookie(req, site.cookie)?;
    state
        .console
        .open(site.base, cookie, crate::clock::now_unix())
}

/// A form body's fields.
pub(super) struct Form(Vec<(String, String)>);

impl Form {
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn trimmed(&self, name: &str) -> Option<&str> {
        Some(self.get(name).trim()).filter(|v| !v.is_empty())
    }

    pub fn checked(&self, name: &str) -> bool {
        !self.get(name).is_empty()
    }
}

pub(super) async fn form(req: Request<Incoming>) -> Result<Form, Response<Body>> {
    let urlencoded = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !urlencoded {
        return Err(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Forms are sent as application/x-www-form-urlencoded.",
        ));
    }
    let bytes: Bytes = match Limited::new(req.into_body(), MAX_FORM).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, "Form over 64 KiB.")),
    };
    Ok(Form(
        url::form_urlencoded::parse(&bytes).into_owned().collect(),
    ))
}

pub(super) fn query(req: &Request<Incoming>) -> Form {
    Form(
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
    )
}

/// The headers every console answer carries.
fn harden(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

pub(super) fn html_page(status: StatusCode, markup: Markup) -> Response<Body> {
    let mut resp = super::respond::with_type(
        status,
        Bytes::from(markup.into_string()),
        "text/html; charset=utf-8",
    );
    harden(&mut resp);
    resp
}

pub(super) fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let page = html! {
        (maud::DOCTYPE)
        html lang="en" { head { meta charset="utf-8"; title { (status.as_u16()) } }
            body { main { h1 { (status.canonical_reason().unwrap_or("Error")) } p { (text) } } } }
    };
    html_page(status, page)
}

pub(super) fn not_found() -> Response<Body> {
    plain(StatusCode::NOT_FOUND, "No such page.")
}

/// `303 See Other` to `to` (after a form, so a reload does not post it again).
pub(super) fn redirect(to: &str) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(LOCATION, v);
    }
    harden(&mut resp);
    resp
}

pub(super) fn with_cookie(mut resp: Response<Body>, cookie: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
    resp
}

fn asset(site: &Site, path: &str) -> Option<Response<Body>> {
    let (body, kind) = match path.strip_prefix(site.base)? {
        "/assets/app.css" => (CSS, "text/css; charset=utf-8"),
        "/assets/app.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let mut resp =
        super::respond::with_type(StatusCode::OK, Bytes::from_static(body.as_bytes()), kind);
    harden(&mut resp);
    resp.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    Some(resp)
}

/// What both sites do before their own pages: assets, the login form, logout, and the
/// session and CSRF checks. `Ok(ctx)`: a page of the site's own to serve.
// Lives for one call: the size of the larger variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(super) enum Gate<'a> {
    Page(Ctx<'a>, Request<Incoming>),
    Done(Response<Body>),
}

/// A login attempt's credential, checked by the site: the session it opens, or why not.
pub(super) type Verdict = Result<(session::Who, u64), String>;

pub(super) async fn gate<'a, F, Fut>(
    state: &'a Arc<AppState>,
    site: &'a Site,
    req: Request<Incoming>,
    peer: IpAddr,
    login_hint: &'static str,
    verify: F,
) -> Gate<'a>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Verdict>,
{
    let path = req.uri().path().to_string();
    if req.method() == Method::GET {
        if let Some(resp) = asset(site, &path) {
            return Gate::Done(resp);
        }
    }
    let rest = path.strip_prefix(site.base).unwrap_or("");
    match (req.method().clone(), rest) {
        (Method::GET, "/login") => {
            let nonce = hex::encode(rand::random::<[u8; 16]>());
            let resp = login_page(state, site, &nonce, login_hint, None, StatusCode::OK);
            Gate::Done(with_cookie(
                resp,
                &site.cookie_header(&site.login_cookie(), &nonce, Some(900)),
            ))
        }
        (Method::POST, "/login") => {
            Gate::Done(login(state, site, req, peer, login_hint, verify).await)
        }
        (method, rest) => {
            let Some(session) = session_of(state, site, &req) else {
                return Gate::Done(if method == Method::GET {
                    redirect(&format!("{}/login", site.base))
                } else {
                    plain(StatusCode::UNAUTHORIZED, "Log in first.")
                });
            };
            let csrf = state.console.csrf(&session);
            let ctx = Ctx {
                state,
                site,
                session,
                csrf,
            };
            if method == Method::POST && rest == "/logout" {
                let Ok(form) = form(req).await else {
                    return Gate::Done(plain(StatusCode::BAD_REQUEST, "Bad form."));
                };
                if !state.console.csrf_ok(&ctx.session, form.get("csrf")) {
                    return Gate::Done(csrf_refused());
                }
                state.console.end(&ctx.session, crate::clock::now_unix());
                let resp = redirect(&format!("{}/login", site.base));
                return Gate::Done(with_cookie(
                    resp,
                    &site.cookie_header(site.cookie, "", Some(0)),
                ));
            }
            Gate::Page(ctx, req)
        }
    }
}

pub(super) fn csrf_refused() -> Response<Body> {
    plain(
        StatusCode::FORBIDDEN,
        "This form's CSRF token is missing or wrong. Reload the page and try again.",
    )
}

fn login_page(
    state: &AppState,
    site: &Site,
    nonce: &str,
    hint: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response<Body> {
    let csrf = state.console.login_csrf(nonce);
    let frame = layout::Frame {
        base: site.base,
        title: "Log in",
        active: "",
        session: None,
        csrf: &csrf,
        nav: &[],
    };
    let content = html! {
        @if let Some(e) = error { (layout::notice("error", e)) }
        form.card method="post" action={ (site.base) "/login" } {
            (layout::csrf_field(&csrf))
            label for="credential" { (hint) }
            input #credential type="password" name="credential" autocomplete="off" required autofocus;
            button type="submit" { "Log in" }
        }
    };
    html_page(status, layout::page(&frame, content))
}

async fn login<F, Fut>(
    state: &Arc<AppState>,
    site: &Site,
    req: Request<Incoming>,
    peer: IpAddr,
    hint: &'static str,
    verify: F,
) -> Response<Body>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Verdict>,
{
    let nonce = cookie(&req, &site.login_cookie()).unwrap_or("").to_string();
    let form = match form(req).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    if !state.console.login_csrf_ok(&nonce, form.get("csrf")) {
        return csrf_refused();
    }
    if !state.console.login_allowed(peer) {
        tracing::warn!(%peer, site = site.base, "console login attempts over the limit");
        let mut resp = login_page(
            state,
            site,
            &nonce,
            hint,
            Some("Too many login attempts from this address; wait a minute."),
            StatusCode::TOO_MANY_REQUESTS,
        );
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("60"));
        return resp;
    }
    match verify(form.get("credential").trim().to_string()).await {
        Ok((who, exp)) => {
            tracing::info!(actor = %who.actor(), site = site.base, "console login");
            let ttl = exp.saturating_sub(crate::clock::now_unix());
            let (_, value) = state.console.issue(site.base, who, exp);
            let resp = redirect(&format!("{}/", site.base));
            let resp = with_cookie(resp, &site.cookie_header(site.cookie, &value, Some(ttl)));
            with_cookie(resp, &site.cookie_header(&site.login_cookie(), "", Some(0)))
        }
        Err(why) => {
            tracing::info!(%peer, site = site.base, "console login refused");
            login_page(
                state,
                site,
                &nonce,
                hint,
                Some(&why),
                StatusCode::UNAUTHORIZED,
            )
        }
    }
}
