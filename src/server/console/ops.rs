//! The ops console's pages: overview, backends, tenants, keys, usage, playground, config and
//! the audit log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use maud::{html, Markup};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::layout::{self, bars, csrf_field, notice, time, usd, Frame};
use super::session::Who;
use super::shared::{self, checked_form, PAGE};
use super::tenants::{keys, tenant_detail, tenant_fields, tenant_input, tenants};
use super::{database, html_page, not_found, plain, redirect, Ctx, Gate, Site};
use crate::server::admin::{admin_of, Admin};
use crate::server::respond::Body;
use crate::server::AppState;
use crate::store::Database;

const NAV: &[(&str, &str)] = &[
    ("overview", "Overview"),
    ("backends", "Backends"),
    ("tenants", "Tenants"),
    ("keys", "Keys"),
    ("usage", "Usage"),
    ("playground", "Playground"),
    ("config", "Config"),
    ("audit", "Audit log"),
];

pub async fn route(
    state: &Arc<AppState>,
    site: &Site,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<Body> {
    let verify = |credential: String| async move {
        let ttl = state.runtime.load().config.console.session_ttl.as_secs();
        let now = crate::clock::now_unix();
        match admin_of(state, &credential) {
            Some(Admin::Token { sha256 }) => Ok((
                Who::AdminToken {
                    fp: state.console.token_fingerprint(&sha256),
                    name: sha256[..12].to_string(),
                },
                now + ttl,
            )),
            Some(Admin::Jwt { sub, expires_at }) => Ok((
                Who::AdminJwt { sub },
                expires_at.map_or(now + ttl, |e| e.min(now + ttl)),
            )),
            None => Err("That is not an admin token or an admin JWT of this gateway.".to_string()),
        }
    };
    let hint = "Admin token or admin JWT";
    let (ctx, req) = match super::gate(state, site, req, peer, hint, verify).await {
        Gate::Done(resp) => return resp,
        Gate::Page(ctx, req) => (ctx, req),
    };
    // The credential behind the session must still be good: a token removed from the
    // config ends its sessions at once.
    let still_good = match &ctx.session.who {
        Who::AdminToken { fp, .. } => {
            let rt = state.runtime.load();
            let mut found = false;
            for t in &rt.config.admin.tokens_sha256 {
                let candidate = state.console.token_fingerprint(&t.to_ascii_lowercase());
                found |= bool::from(candidate.as_bytes().ct_eq(fp.as_bytes()));
            }
            found
        }
        Who::AdminJwt { .. } => true,
        Who::Key { .. } => false,
    };
    if !still_good {
        return redirect(&format!("{}/login", site.base));
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let rest = path.strip_prefix(site.base).unwrap_or("");
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method().clone();
    match (method, parts.as_slice()) {
        (Method::GET, []) => redirect("/console/overview"),
        (Method::GET, ["overview"]) => {
            let q = super::query(&req);
            if q.get("part") == "1" {
                html_page(StatusCode::OK, overview_body())
            } else {
                frame(&ctx, "Overview", "overview", overview_body())
            }
        }
        (Method::GET, ["backends"]) => frame(&ctx, "Backends", "backends", backends_of(state)),
        (Method::GET, ["config"]) => frame(&ctx, "Config", "config", config(state)),
        (_, rest) => match database(state) {
            Some(db) => with_db(&ctx, &db, req, rest).await,
            None => frame(
                &ctx,
                "Unavailable",
                "",
                notice(
                    "error",
                    "This page needs a database (state.store: sqlite or postgres).",
                ),
            ),
        },
    }
}

/// Pages that read or change the store.
async fn with_db(
    ctx: &Ctx<'_>,
    db: &Database,
    req: Request<Incoming>,
    parts: &[&str],
) -> Response<Body> {
    let method = req.method().clone();
    match (method, parts) {
        (Method::GET, ["tenants"]) => {
            let q = super::query(&req);
            frame(ctx, "Tenants", "tenants", tenants(ctx, db, &q, None).await)
        }
        (Method::POST, ["tenants"]) => {
            let form = match checked_form(ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let input = match tenant_input(&form, form.get("id")) {
                Ok(i) => i,
                Err(why) => return tenants_error(ctx, db, &why).await,
            };
            match db.create_tenant(&input).await {
                Ok(t) => {
                    ctx.audit("tenant.create", &t.id, tenant_detail(&input))
                        .await;
                    redirect(&format!("/console/tenants/{}", t.id))
                }
                Err(e) => tenants_error(ctx, db, &e.to_string()).await,
            }
        }
        (Method::GET, ["tenants", id]) => tenant_page(ctx, db, id, None).await,
        (Method::POST, ["tenants", id]) => {
            let form = match checked_form(ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let Ok(Some(old)) = db.get_tenant(id).await else {
                return not_found();
            };
            let mut input = match tenant_input(&form, id) {
                Ok(i) => i,
                Err(why) => return tenant_page(ctx, db, id, Some(("error", why))).await,
            };
            input.disabled = old.disabled;
            input.labels = old.labels;
            match db.update_tenant(&input).await {
                Ok(_) => {
                    ctx.audit("tenant.update", id, tenant_detail(&input)).await;
                    tenant_page(ctx, db, id, Some(("ok", "Saved.".into()))).await
                }
                Err(e) => tenant_page(ctx, db, id, Some(("error", e.to_string()))).await,
            }
        }
        (Method::POST, ["tenants", id, action @ ("disable" | "enable")]) => {
            if let Err(resp) = checked_form(ctx, req).await {
                return resp;
            }
            match db.set_tenant_disabled(id, *action == "disable").await {
                Ok(()) => {
                    ctx.audit(&format!("tenant.{action}"), id, json!({})).await;
                    redirect(&format!("/console/tenants/{id}"))
                }
                Err(e) => tenant_page(ctx, db, id, Some(("error", e.to_string()))).await,
            }
        }
        (Method::GET, ["keys"]) => {
            let q = super::query(&req);
            frame(ctx, "Keys", "keys", keys(ctx, db, &q).await)
        }
        (Method::POST, ["keys"]) => {
            let form = match checked_form(ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let tenant = form.get("tenant").trim().to_string();
            match shared::create_key(db, &form, &tenant).await {
                Ok(created) => {
                    ctx.audit(
                        "key.create",
                        &created.key.id,
                        json!({"tenant": tenant, "name": created.key.name, "manage_keys": created.key.manage_keys}),
                    )
                    .await;
                    frame(
                        ctx,
                        "New key",
                        "keys",
                        shared::secret_page(ctx, &created, "Created key"),
                    )
                }
                Err(e) => frame(
                    ctx,
                    "Keys",
                    "keys",
                    html! {
                        (notice("error", &format!("Could not create the key: {e}")))
                        (keys(ctx, db, &super::Form(Vec::new())).await)
                    },
                ),
            }
        }
        (Method::GET, ["keys", id]) => match db.get_key(id).await {
            Ok(Some(k)) => frame(
                ctx,
                "Key",
                "keys",
                html! {
                    (shared::keys_table(ctx, std::slice::from_ref(&k), None))
                    p { a href={ "/console/usage?key=" (k.id) } { "Usage of this key" } }
                },
            ),
            _ => not_found(),
        },
        (Method::POST, ["keys", id, action @ ("revoke" | "disable" | "enable" | "rotate")]) => {
            let form = match checked_form(ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let Ok(Some(key)) = db.get_key(id).await else {
                return not_found();
            };
            match shared::key_action(ctx, db, &key, action, &form).await {
                Ok(Some(rotated)) => frame(
                    ctx,
                    "Rotated key",
                    "keys",
                    shared::secret_page(ctx, &rotated, "Rotated key"),
                ),
                Ok(None) => redirect(&format!("/console/tenants/{}", key.tenant)),
                Err(why) => frame(ctx, "Keys", "keys", notice("error", &why)),
            }
        }
        (Method::GET, ["usage"]) => {
            let q = super::query(&req);
            frame(
                ctx,
                "Usage",
                "usage",
                shared::usage(ctx, db, &q, None).await,
            )
        }
        (Method::GET, ["usage.csv"]) => {
            let q = super::query(&req);
            shared::usage_csv(ctx, db, &q, None).await
        }
        (Method::GET, ["playground"]) => {
            let q = super::query(&req);
            let models = shared::playground_models(ctx, |_| true);
            let forms = shared::playground_forms(ctx, &q, None, &models);
            frame(ctx, "Playground", "playground", forms)
        }
        (Method::POST, ["playground"]) => {
            let form = match checked_form(ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let result = match principal(ctx, form.get("tenant").trim()).await {
                Ok(principal) => shared::playground_run(ctx, &principal, &form).await,
                Err(e) => e,
            };
            let models = shared::playground_models(ctx, |_| true);
            let forms = shared::playground_forms(ctx, &form, None, &models);
            frame(ctx, "Playground", "playground", html! { (forms) (result) })
        }
        (Method::POST, ["playground", "edit"]) => {
            let form = match shared::read_edit_form(ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let models = shared::playground_models(ctx, |_| true);
            let forms = shared::playground_forms(ctx, &form.text, None, &models);
            let result = match principal(ctx, form.text.get("tenant").trim()).await {
                Ok(principal) => shared::playground_edit(ctx, &principal, form).await,
                Err(e) => e,
            };
            frame(ctx, "Playground", "playground", html! { (forms) (result) })
        }
        (Method::GET, ["audit"]) => {
            let q = super::query(&req);
            frame(ctx, "Audit log", "audit", audit(db, &q).await)
        }
        (Method::GET, _) => not_found(),
        _ => plain(StatusCode::METHOD_NOT_ALLOWED, "Not here."),
    }
}

fn frame(ctx: &Ctx<'_>, title: &str, active: &str, content: Markup) -> Response<Body> {
    let f = Frame {
        base: ctx.site.base,
        title,
        active,
        session: Some(&ctx.session),
        csrf: &ctx.csrf,
        nav: NAV,
    };
    html_page(StatusCode::OK, layout::page(&f, content))
}

/// Who the playground acts as: the tenant the operator names, under the operator's name.
async fn principal(ctx: &Ctx<'_>, tenant: &str) -> Result<crate::auth::Principal, Markup> {
    let who = format!("console:{}", ctx.session.who.actor());
    let rt = ctx.state.runtime.load_full();
    rt.keys
        .principal_for_tenant(tenant, &who)
        .await
        .map_err(|e| notice("error", &format!("Tenant \"{tenant}\": {e}")))
}

/// The overview's live part (the page script fetches it again every five seconds).
fn overview_body() -> Markup {
    let o = crate::telemetry::recent().overview();
    let errors = o.hour.client_errors + o.hour.rate_limited + o.hour.server_errors;
    let rate = |n: u64| {
        if o.hour.requests == 0 {
            "0.0%".to_string()
        } else {
            format!("{:.1}%", n as f64 * 100.0 / o.hour.requests as f64)
        }
    };
    let ms = |v: Option<u64>| match v {
        None => "-".to_string(),
        Some(u64::MAX) => "> 120 s".to_string(),
        Some(v) => format!("≤ {v} ms"),
    };
    let per = |f: fn(&crate::telemetry::recent::Counts) -> u64,
               v: &[crate::telemetry::recent::Counts]|
     -> Vec<u64> { v.iter().map(f).collect() };
    html! {
        div #live data-refresh="/console/overview?part=1" {
            p.meta { "This replica, updated " (time(crate::clock::now_unix() as i64)) " (every 5 s)." }
            div.tiles {
                div.tile { span.label { "Requests, last hour" } span.value { (o.hour.requests) } }
                div.tile { span.label { "Images, last hour" } span.value { (o.hour.images) } }
                div.tile { span.label { "Spend, last hour" } span.value { (usd(o.hour.spend_micro_usd as i64)) } }
                div.tile { span.label { "Errors, last hour" } span.value { (errors) " (" (rate(errors)) ")" } }
                div.tile { span.label { "Latency p50 / p95" } span.value { (ms(o.p50_ms)) " / " (ms(o.p95_ms)) } }
                div.tile { span.label { "Requests, last 24 h" } span.value { (o.day.requests) } }
                div.tile { span.label { "Spend, last 24 h" } span.value { (usd(o.day.spend_micro_usd as i64)) } }
            }
            div.charts {
                (bars("Requests per minute, last hour", &per(|c| c.requests, &o.minutes), "60 min ago", "now", "requests"))
                (bars("Images per minute, last hour", &per(|c| c.images, &o.minutes), "60 min ago", "now", "images"))
                (bars("Spend per minute, last hour (micro-USD)", &per(|c| c.spend_micro_usd, &o.minutes), "60 min ago", "now", "µ$"))
                (bars("Requests per hour, last day", &per(|c| c.requests, &o.hours), "24 h ago", "this hour", "requests"))
            }
            div.split {
                table {
                    caption { "Errors by class, last hour" }
                    tbody {
                        tr { th scope="row" { "Client errors (4xx)" } td.num { (o.hour.client_errors) } td.num { (rate(o.hour.client_errors)) } }
                        tr { th scope="row" { "Rate limited (429)" } td.num { (o.hour.rate_limited) } td.num { (rate(o.hour.rate_limited)) } }
                        tr { th scope="row" { "Server and upstream (5xx)" } td.num { (o.hour.server_errors) } td.num { (rate(o.hour.server_errors)) } }
                    }
                }
                table {
                    caption { "Busiest tenants, last hour" }
                    tbody { @for (t, n) in &o.top_tenants { tr { th scope="row" { (t) } td.num { (n) } } } }
                }
                table {
                    caption { "Busiest models, last hour" }
                    tbody { @for (m, n) in &o.top_models { tr { th scope="row" { (m) } td.num { (n) } } } }
                }
            }
        }
    }
}

fn config(state: &AppState) -> Markup {
    let log = state
        .config_log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let shown = log
        .source
        .as_deref()
        .map(redact_yaml)
        .unwrap_or_else(|| "(built in memory: no file)".to_string());
    html! {
        dl.facts {
            dt { "File" } dd { code { (state.config_path.as_ref().map_or("-".to_string(), |p| p.display().to_string())) } }
            dt { "Loaded" } dd { (time(log.loaded_at as i64)) }
            dt { "Last rejected reload" }
            dd { @match &log.rejected {
                None => "none",
                Some((at, why)) => { (time(*at as i64)) ": " pre.why { (why) } },
            } }
        }
        p.meta { "As loaded, before ${VARIABLES} are filled in; every value under a name that may hold a secret is replaced by [redacted]." }
        pre.config { code { (shown) } }
    }
}

/// The config's YAML with every value that may be a secret replaced. Names that look like a
/// secret's (key, secret, token, password, credential, authorization) are redacted whatever
/// their value, except a `${VARIABLE}` reference, which names the secret without holding it.
pub fn redact_yaml(text: &str) -> String {
    fn secretive(name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        [
            "key",
            "secret",
            "token",
            "password",
            "credential",
            "authorization",
            "dsn",
            "postgres",
            "redis",
        ]
        .iter()
        .any(|w| n.contains(w))
            && !matches!(n.as_str(), "key_cache_ttl" | "manage_keys" | "tenant_claim")
    }
    fn walk(v: &mut serde_yaml_ng::Value, secret: bool) {
        match v {
            serde_yaml_ng::Value::Mapping(m) => {
                for (k, val) in m.iter_mut() {
                    let s = secret || k.as_str().is_some_and(secretive);
                    walk(val, s);
                }
            }
            serde_yaml_ng::Value::Sequence(items) => {
                for i in items {
                    walk(i, secret);
                }
            }
            serde_yaml_ng::Value::String(s) if secret => {
                let reference =
                    s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
                if !reference {
                    *s = "[redacted]".into();
                }
            }
            serde_yaml_ng::Value::Null | serde_yaml_ng::Value::Bool(_) => {}
            other if secret => *other = serde_yaml_ng::Value::String("[redacted]".into()),
            _ => {}
        }
    }
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        Ok(mut doc) => {
            walk(&mut doc, false);
            serde_yaml_ng::to_string(&doc).unwrap_or_default()
        }
        Err(_) => "(the file no longer parses)".into(),
    }
}

async fn tenants_error(ctx: &Ctx<'_>, db: &Database, why: &str) -> Response<Body> {
    let body = tenants(ctx, db, &super::Form(Vec::new()), Some(why)).await;
    frame(ctx, "Tenants", "tenants", body)
}

async fn tenant_page(
    ctx: &Ctx<'_>,
    db: &Database,
    id: &str,
    message: Option<(&str, String)>,
) -> Response<Body> {
    let t = match db.get_tenant(id).await {
        Ok(Some(t)) => t,
        Ok(None) => return not_found(),
        Err(e) => return frame(ctx, "Tenant", "tenants", notice("error", &e.to_string())),
    };
    let keys = db
        .list_keys(Some(id), None, None, PAGE)
        .await
        .unwrap_or_default();
    let budget = shared::budget(ctx.state, &t.id, &t.effective_limits()).await;
    let (action, label) = if t.disabled {
        ("enable", "Enable tenant")
    } else {
        ("disable", "Disable tenant")
    };
    let body = html! {
        @if let Some((kind, text)) = &message { (notice(kind, text)) }
        p { "State: " span class={ "badge " (if t.disabled { "disabled" } else { "active" }) } { (if t.disabled { "disabled" } else { "active" }) }
            " · created " (time(t.created_at)) " · " a href={ "/console/usage?tenant=" (t.id) "&group_by=day" } { "usage" } }
        (budget)
        form.card method="post" action={ "/console/tenants/" (t.id) } {
            h2 { "Models, limits and budget" }
            (csrf_field(&ctx.csrf))
            (tenant_fields(Some(&t)))
            button type="submit" { "Save" }
        }
        form.inline method="post" action={ "/console/tenants/" (t.id) "/" (action) } {
            (csrf_field(&ctx.csrf))
            button.danger[!t.disabled] type="submit" { (label) }
        }
        h2 { "Keys" }
        (shared::keys_table(ctx, &keys, None))
        (shared::new_key_form(ctx, Some(&t.id)))
    };
    frame(ctx, &format!("Tenant {}", t.id), "tenants", body)
}

async fn audit(db: &Database, q: &super::Form) -> Markup {
    let before = q.trimmed("before");
    match db.audit_entries(before, PAGE).await {
        Err(e) => notice("error", &format!("The store did not answer: {e}")),
        Ok(entries) => html! {
            @if entries.is_empty() { p.empty { "Nothing yet." } } @else {
                div.scroll { table #audit {
                    thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "What" } th scope="col" { "On" } th scope="col" { "Detail" } } }
                    tbody { @for e in &entries { tr {
                        td { (time(e.at_ms / 1000)) } td { code { (e.actor) } } td { (e.action) } td { code { (e.target) } } td { code { (e.detail) } }
                    } } }
                } }
                @if entries.len() as i64 == PAGE {
                    p.more { a href={ "/console/audit?before=" (entries[entries.len() - 1].id) } { "Older" } }
                }
            }
        },
    }
}

/// Each backend's state and the routes drawn as tiers of targets.
pub fn backends_of(state: &AppState) -> Markup {
    let rt = state.runtime.load();
    let now = Instant::now();
    let states = rt.router.backend_states(now);
    let unix_now = crate::clock::now_unix();
    let mut models_of: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for name in rt.router.model_names() {
        if let Some(route) = rt.router.model(name) {
            for pool in route.pools() {
                for t in &pool.targets {
                    let list = models_of.entry(&t.backend_name).or_default();
                    if !list.contains(&name) {
                        list.push(name);
                    }
                }
            }
        }
    }
    html! {
        div.scroll { table #backends {
            thead { tr { th scope="col" { "Backend" } th scope="col" { "State" } th scope="col" { "Recovers" }
                th scope="col" { "In flight" } th scope="col" { "Queued" } th scope="col" { "Recent latency" }
                th scope="col" { "Failures in a row" } th scope="col" { "Models" } } }
            tbody { @for (name, s) in &states { tr {
                th scope="row" { (name) }
                td { span class={ "badge " (s.health.state) } { (s.health.state) } }
                td { (s.health.until.map_or("-".to_string(), |u| format!("{} (in {} s)", time(u as i64), u.saturating_sub(unix_now)))) }
                td.num { (s.health.in_flight) }
                td.num { (s.queue_depth) }
                td.num { (s.health.recent_latency_ms.or(s.job_time_ms).map_or("-".to_string(), |t| format!("{t} ms"))) }
                td.num { (s.health.consecutive_failures) }
                td { (models_of.get(name).map_or(String::new(), |v| v.join(", "))) }
            } } }
        } }
        p.meta { "Latency per backend over time: " code { "imagegate_upstream_duration_seconds" } " on " a href="/metrics" { "/metrics" } "." }
        h2 { "Routes" }
        @for name in rt.router.model_names() {
            @if let Some(route) = rt.router.model(name) {
                section.route {
                    h3 { (name) }
                    @for (label, pool) in std::iter::once(("default".to_string(), &route.pool)).chain(route.overrides.iter().map(|o| (format!("override for {}", describe(o)), &o.pool))) {
                        @let tiers = tiers_of(pool);
                        div.pool {
                            p.meta { (label) " · " (format!("{:?}", pool.strategy).to_lowercase()) " · up to " (pool.max_attempts) " attempts" }
                            ol.tiers { @for tier in &tiers {
                                @let total: u32 = pool.targets.iter().filter(|t| t.priority == *tier).map(|t| t.weight).sum();
                                li { span.tier { "tier " (tier) } ul.targets {
                                    @for t in pool.targets.iter().filter(|t| t.priority == *tier) {
                                        li {
                                            span.target { (t.backend_name) }
                                            @if let Some(m) = &t.upstream_model { " → " code { (m) } }
                                            " · weight " (t.weight)
                                            meter min="0" max=(total.max(1)) value=(t.weight) { (t.weight) "/" (total) }
                                        }
                                    }
                                } }
                            } }
                        }
                    }
                }
            }
        }
    }
}

fn describe(o: &crate::routing::Override) -> String {
    let mut parts: Vec<String> = o.tenants.iter().map(|t| format!("tenant {t}")).collect();
    parts.extend(o.labels.iter().map(|(k, v)| format!("{k}={v}")));
    parts.join(", ")
}

/// A pool's priorities, lowest (tried first) first.
fn tiers_of(pool: &crate::routing::Pool) -> Vec<u32> {
    let mut tiers: Vec<u32> = pool.targets.iter().map(|t| t.priority).collect();
    tiers.sort_unstable();
    tiers.dedup();
    tiers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_page_redacts_every_secret_but_names_variables() {
        let text = r#"
admin: {tokens_sha256: [abc123]}
keys:
  - {id: demo, tenant: demo, secret: sk-imagegate-demo}
backends:
  openai: {kind: openai, api_key: "${OPENAI_API_KEY}", base_url: "https://api.openai.com/v1"}
  gemini: {kind: gemini, credentials: {private_key: "-----BEGIN", client_email: a@b}}
state: {postgres: "postgres://u:pw@db/x", key_cache_ttl: 30s}
images: {signing_key: 0123456789abcdef0123456789abcdef}
"#;
        let out = redact_yaml(text);
        for secret in [
            "abc123",
            "sk-imagegate-demo",
            "-----BEGIN",
            "u:pw",
            "0123456789abcdef",
        ] {
            assert!(!out.contains(secret), "{secret} shown:\n{out}");
        }
        assert!(out.contains("${OPENAI_API_KEY}"));
        assert!(out.contains("https://api.openai.com/v1"));
        assert!(out.contains("30s"));
        assert!(out.contains("[redacted]"));
    }
}
