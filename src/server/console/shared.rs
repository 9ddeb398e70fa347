//! What the ops console and the tenant portal both show, scoped: keys, usage, the playground
//! and budget bars. `tenant: Some(id)` is the portal's view (one tenant, nothing else).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use maud::{html, Markup};
use serde_json::json;

use super::layout::{self, csrf_field, notice, time, usd};
use super::{Ctx, Form};
use crate::server::respond::Body;
use crate::store::keys::{KeyInput, KeyRecord, NewKey};
use crate::store::Database;

pub const PAGE: i64 = 50;

pub fn key_state(k: &KeyRecord, now: i64) -> &'static str {
    if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else if k.disabled {
        "disabled"
    } else {
        "active"
    }
}

/// A page of keys with their actions. `tenant`: the portal's (no tenant column, no
/// disable/enable).
pub fn keys_table(ctx: &Ctx<'_>, keys: &[KeyRecord], tenant: Option<&str>) -> Markup {
    let now = crate::store::keys::now();
    let base = ctx.site.base;
    html! {
        @if keys.is_empty() {
            p.empty { "No keys." }
        } @else {
            div.scroll { table {
                thead { tr {
                    th scope="col" { "Key id" } th scope="col" { "Name" }
                    @if tenant.is_none() { th scope="col" { "Tenant" } }
                    th scope="col" { "State" } th scope="col" { "Manages keys" }
                    th scope="col" { "Created" } th scope="col" { "Last used" } th scope="col" { "Actions" }
                } }
                tbody { @for k in keys {
                    @let state = key_state(k, now);
                    tr data-key=(k.id) {
                        td { a href={ (base) "/keys/" (k.id) } { code { (k.id) } } }
                        td { (k.name) }
                        @if tenant.is_none() { td { a href={ (base) "/tenants/" (k.tenant) } { (k.tenant) } } }
                        td { span class={ "badge " (state) } { (state) } }
                        td { (if k.manage_keys { "yes" } else { "no" }) }
                        td { (time(k.created_at)) }
                        td { (k.last_used_at.map_or("never".to_string(), time)) }
                        td.actions {
                            @if state != "revoked" {
                                form.inline method="post" action={ (base) "/keys/" (k.id) "/rotate" } {
                                    (csrf_field(&ctx.csrf))
                                    label { span.sr { "Grace for the old secret of " (k.id) }
                                        select name="grace" {
                                            option value="0s" { "no grace" }
                                            option value="1h" selected { "1 h grace" }
                                            option value="24h" { "24 h grace" }
                                            option value="7d" { "7 d grace" }
                                        }
                                    }
                                    button type="submit" { "Rotate" }
                                }
                                form.inline method="post" action={ (base) "/keys/" (k.id) "/revoke" } data-confirm={ "Revoke key " (k.id) "? Clients using it stop at once." } {
                                    (csrf_field(&ctx.csrf))
                                    button.danger type="submit" { "Revoke" }
                                }
                                @if tenant.is_none() {
                                    @let (action, label) = if k.disabled { ("enable", "Enable") } else { ("disable", "Disable") };
                                    form.inline method="post" action={ (base) "/keys/" (k.id) "/" (action) } {
                                        (csrf_field(&ctx.csrf))
                                        button type="submit" { (label) }
                                    }
                                }
                            }
                        }
                    }
                } }
            } }
        }
    }
}

/// The form that creates a key (of `tenant`, or of a tenant the operator names).
pub fn new_key_form(ctx: &Ctx<'_>, tenant: Option<&str>) -> Markup {
    html! {
        form.card method="post" action={ (ctx.site.base) "/keys" } {
            h2 { "Create a key" }
            (csrf_field(&ctx.csrf))
            @match tenant {
                Some(t) => input type="hidden" name="tenant" value=(t);,
                None => label { "Tenant" input name="tenant" required; },
            }
            label { "Name" input name="name" maxlength="100"; }
            label.check { input type="checkbox" name="manage_keys" value="1"; " May manage this tenant's keys in the portal" }
            button type="submit" { "Create key" }
        }
    }
}

/// The one page that ever shows a key's secret.
pub fn secret_page(ctx: &Ctx<'_>, created: &NewKey, what: &str) -> Markup {
    html! {
        (notice("ok", &format!("{what} {}. Copy the secret now: it is not shown again.", created.key.id)))
        div.card.secret {
            label for="secret" { "Secret of " code { (created.key.id) } }
            input #secret type="text" readonly value=(created.secret) autocomplete="off" spellcheck="false";
            button type="button" data-copy="secret" { "Copy" }
            span.copied role="status" aria-live="polite" {}
        }
        p { a href={ (ctx.site.base) "/keys" } { "Back to keys" } }
    }
}

pub async fn create_key(
    db: &Database,
    form: &Form,
    tenant: &str,
) -> Result<NewKey, crate::store::StoreError> {
    db.create_key(&KeyInput {
        tenant: tenant.to_string(),
        name: form.get("name").trim().chars().take(100).collect(),
        manage_keys: form.checked("manage_keys"),
        ..KeyInput::default()
    })
    .await
}

/// One key's action (`revoke`, `rotate`, `disable`, `enable`), audited. A rotation answers
/// with the new secret.
pub async fn key_action(
    ctx: &Ctx<'_>,
    db: &Database,
    key: &KeyRecord,
    action: &str,
    form: &Form,
) -> Result<Option<NewKey>, String> {
    let e = |e: crate::store::StoreError| e.to_string();
    let mut rotated = None;
    let mut detail = json!({"tenant": key.tenant});
    match action {
        "revoke" => db.revoke_key(&key.id).await.map_err(e)?,
        "disable" | "enable" => db
            .set_key_disabled(&key.id, action == "disable")
            .await
            .map_err(e)?,
        "rotate" => {
            let grace = crate::config::parse_duration(form.get("grace"))
                .map_err(|why| format!("grace: {why}"))?;
            if grace > std::time::Duration::from_secs(30 * 86_400) {
                return Err("grace: at most 30 days".into());
            }
            detail["grace_s"] = json!(grace.as_secs());
            rotated = Some(db.rotate_key(&key.id, grace).await.map_err(e)?);
        }
        _ => return Err(format!("unknown action {action}")),
    }
    ctx.audit(&format!("key.{action}"), &key.id, detail).await;
    Ok(rotated)
}

/// The usage page's filters, results and CSV link. `tenant`: the portal's (forced).
pub async fn usage(ctx: &Ctx<'_>, db: &Database, q: &Form, tenant: Option<&str>) -> Markup {
    let (pairs, report) = match usage_report(q, tenant) {
        Ok(r) => r,
        Err(why) => return html! { (usage_form(ctx, q, tenant)) (notice("error", &why)) },
    };
    ctx.state.meter.flush().await;
    let csv_query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish();
    let body = match report.group_by {
        Some(by) => match crate::metering::report::groups(db, &report.query, by).await {
            Ok(groups) => {
                let total = |f: fn(&crate::metering::report::UsageGroup) -> i64| -> i64 {
                    groups.iter().map(f).sum()
                };
                html! {
                    div.scroll { table #usage {
                        thead { tr { th scope="col" { "Group" } th scope="col" { "Requests" } th scope="col" { "Images" }
                            th scope="col" { "Charged" } th scope="col" { "Upstream cost" } th scope="col" { "Margin" } } }
                        tbody { @for g in &groups { tr {
                            td { (g.group) } td.num { (g.requests) } td.num { (g.images) }
                            td.num { (usd(g.cost_micro_usd)) } td.num { (usd(g.upstream_cost_micro_usd)) } td.num { (usd(g.margin_micro_usd)) }
                        } } }
                        tfoot { tr { th scope="row" { "Total" } td.num { (total(|g| g.requests)) } td.num { (total(|g| g.images)) }
                            td.num { (usd(total(|g| g.cost_micro_usd))) } td.num { (usd(total(|g| g.upstream_cost_micro_usd))) }
                            td.num { (usd(total(|g| g.margin_micro_usd))) } } }
                    } }
                }
            }
            Err(e) => notice("error", &format!("The usage store did not answer: {e}")),
        },
        None => match crate::metering::report::rows(db, &report.query).await {
            Ok(rows) => {
                let cost: u64 = rows.iter().map(|r| r.cost_micro_usd).sum();
                let upstream: u64 = rows.iter().map(|r| r.upstream_cost_micro_usd).sum();
                let images: u32 = rows.iter().map(|r| r.n_delivered).sum();
                html! {
                    div.scroll { table #usage {
                        thead { tr { th scope="col" { "Time" } th scope="col" { "Request" }
                            @if tenant.is_none() { th scope="col" { "Tenant" } }
                            th scope="col" { "Key" } th scope="col" { "Model" } th scope="col" { "Operation" } th scope="col" { "Backend" }
                            th scope="col" { "Status" } th scope="col" { "Images" } th scope="col" { "Charged" } th scope="col" { "Upstream cost" } th scope="col" { "Margin" } } }
                        tbody { @for r in &rows { tr {
                            td { (time(r.ts_ms / 1000)) } td { code { (r.request_id) } }
                            @if tenant.is_none() { td { (r.tenant) } }
                            td { code { (r.key_id) } } td { (r.model) } td { (r.operation) } td { (r.backend.as_deref().unwrap_or("-")) }
                            td.num { (r.status) } td.num { (r.n_delivered) } td.num { (usd(r.cost_micro_usd as i64)) }
                            td.num { (usd(r.upstream_cost_micro_usd as i64)) }
                            td.num { (usd(r.cost_micro_usd as i64 - r.upstream_cost_micro_usd as i64)) }
                        } } }
                        tfoot { tr { th scope="row" { "Total (" (rows.len()) " rows)" }
                            td colspan=(if tenant.is_none() { 7 } else { 6 }) {}
                            td.num { (images) } td.num { (usd(cost as i64)) } td.num { (usd(upstream as i64)) }
                            td.num { (usd(cost as i64 - upstream as i64)) } } }
                    } }
                    @if rows.len() as i64 == report.query.limit {
                        p.more { "Showing the newest " (rows.len()) " rows; narrow the dates or raise the limit (up to 1000)." }
                    }
                }
            }
            Err(e) => notice("error", &format!("The usage store did not answer: {e}")),
        },
    };
    html! {
        (usage_form(ctx, q, tenant))
        p { a.button href={ (ctx.site.base) "/usage.csv?" (csv_query) } download="usage.csv" { "Download CSV of this view" } }
        (body)
    }
}

/// The report a usage query asks for, and the pairs it was built from (for the CSV link).
pub fn usage_report(
    q: &Form,
    tenant: Option<&str>,
) -> Result<(Vec<(String, String)>, crate::metering::report::Report), String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for name in [
        "tenant",
        "key",
        "model",
        "operation",
        "from",
        "to",
        "group_by",
    ] {
        if let Some(v) = q.trimmed(name) {
            pairs.push((name.to_string(), v.to_string()));
        }
    }
    if let Some(t) = tenant {
        pairs.retain(|(k, _)| k != "tenant");
        pairs.push(("tenant".into(), t.to_string()));
    }
    let limit = q.trimmed("limit").unwrap_or("100");
    match limit.parse::<u32>() {
        Ok(1..=1000) => pairs.push(("limit".into(), limit.to_string())),
        _ => return Err("limit: 1 to 1000".into()),
    }
    let report = crate::metering::report::Report::from_pairs(
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(|(k, why)| format!("{k}: {why}"))?;
    Ok((pairs, report))
}

fn usage_form(ctx: &Ctx<'_>, q: &Form, tenant: Option<&str>) -> Markup {
    let group = q.get("group_by");
    let op = q.get("operation");
    html! {
        form.filters method="get" action={ (ctx.site.base) "/usage" } {
            @if tenant.is_none() { label { "Tenant" input name="tenant" value=(q.get("tenant")); } }
            label { "Key id" input name="key" value=(q.get("key")); }
            label { "Model" input name="model" value=(q.get("model")); }
            label { "Operation" select name="operation" {
                option value="" { "any" }
                @for o in ["generation", "edit", "variation"] { option value=(o) selected[op == o] { (o) } }
            } }
            label { "From" input name="from" type="date" value=(q.get("from")); }
            label { "To" input name="to" type="date" value=(q.get("to")); }
            label { "Group by" select name="group_by" {
                option value="" { "no grouping (rows)" }
                @for g in ["day", "model", "key", "tenant"] {
                    @if !(tenant.is_some() && g == "tenant") { option value=(g) selected[group == g] { (g) } }
                }
            } }
            label { "Rows" input name="limit" type="number" min="1" max="1000" value=(q.trimmed("limit").unwrap_or("100")); }
            button type="submit" { "Show" }
        }
    }
}

/// `usage.csv`: exactly the rows or groups the same query shows.
pub async fn usage_csv(
    ctx: &Ctx<'_>,
    db: &Database,
    q: &Form,
    tenant: Option<&str>,
) -> Response<Body> {
    let (_, mut report) = match usage_report(q, tenant) {
        Ok(r) => r,
        Err(why) => return super::plain(StatusCode::BAD_REQUEST, &why),
    };
    report.csv = true;
    ctx.state.meter.flush().await;
    match report.render(db).await {
        Ok(text) => {
            let mut resp = crate::server::respond::with_type(
                StatusCode::OK,
                Bytes::from(text),
                "text/csv; charset=utf-8",
            );
            resp.headers_mut().insert(
                http::header::CONTENT_DISPOSITION,
                http::HeaderValue::from_static("attachment; filename=\"usage.csv\""),
            );
            resp.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            resp
        }
        Err(e) => super::plain(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

pub const SIZES: [&str; 8] = [
    "auto",
    "256x256",
    "512x512",
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "1792x1024",
    "1024x1792",
];

/// The models a playground may offer: those `may` allows, for generations and for edits.
pub fn playground_models(ctx: &Ctx<'_>, may: impl Fn(&str) -> bool) -> (Vec<String>, Vec<String>) {
    let rt = ctx.state.runtime.load();
    let mut generate = Vec::new();
    let mut edit = Vec::new();
    for name in rt.router.model_names().filter(|m| may(m)) {
        let Some(route) = rt.router.model(name) else {
            continue;
        };
        let serves = |op| route.rules.operations.contains(&op) && route.can(op);
        if serves(crate::api::Operation::Generation) {
            generate.push(name.to_string());
        }
        if serves(crate::api::Operation::Edit) {
            edit.push(name.to_string());
        }
    }
    (generate, edit)
}

/// The playground's two forms, generate and edit. `tenant`: the portal's.
pub fn playground_forms(
    ctx: &Ctx<'_>,
    f: &Form,
    tenant: Option<&str>,
    (models, edit_models): &(Vec<String>, Vec<String>),
) -> Markup {
    let size = f.trimmed("size").unwrap_or("1024x1024");
    let common = |models: &[String]| {
        html! {
            (csrf_field(&ctx.csrf))
            @if tenant.is_none() {
                label { "Tenant (who is charged)" input name="tenant" required value=(f.get("tenant")); }
            }
            label { "Model" select name="model" required {
                @for m in models { option value=(m) selected[f.get("model") == m] { (m) } }
            } }
            label { "Prompt" textarea name="prompt" rows="3" required maxlength="32000" { (f.get("prompt")) } }
            label { "Size" select name="size" {
                @for s in SIZES { option value=(s) selected[size == s] { (s) } }
            } }
        }
    };
    html! {
        div.split {
            form.card #playground method="post" action={ (ctx.site.base) "/playground" } {
                h2 { "Generate" }
                (common(models))
                button type="submit" { "Generate" }
            }
            @if !edit_models.is_empty() {
                form.card #playground-edit method="post" enctype="multipart/form-data" action={ (ctx.site.base) "/playground/edit" } {
                    h2 { "Edit an image" }
                    (common(edit_models))
                    label { "Image (PNG, JPEG or WebP)" input type="file" name="image" required accept="image/png,image/jpeg,image/webp"; }
                    label { "Mask (optional PNG; transparent where to edit)" input type="file" name="mask" accept="image/png"; }
                    button type="submit" { "Edit" }
                }
            }
        }
    }
}

/// Runs a generate form through the normal request path as `principal` and shows the answer.
pub async fn playground_run(ctx: &Ctx<'_>, principal: &crate::auth::Principal, f: &Form) -> Markup {
    let model = f.get("model");
    let mut body = json!({"model": model, "prompt": f.get("prompt"), "n": 1});
    if let Some(size) = f.trimmed("size") {
        body["size"] = json!(size);
    }
    if !is_gpt(ctx, model) {
        body["response_format"] = json!("b64_json");
    }
    let what = crate::server::handlers::AsRequest::Generation(Bytes::from(body.to_string()));
    answer(ctx, principal, what, f.get("prompt")).await
}

fn is_gpt(ctx: &Ctx<'_>, model: &str) -> bool {
    ctx.state
        .runtime
        .load()
        .router
        .model(model)
        .is_some_and(|r| r.rules.family == crate::api::Family::GptImage)
}

/// An edit form, read from its multipart body within the upload limits and checked for its
/// CSRF token: its text fields (for the page) and the parts the edit is made of.
pub struct EditForm {
    pub text: Form,
    parts: Vec<(String, Option<String>, Bytes)>,
    _held: crate::server::uploads::UploadPermit,
}

pub async fn read_edit_form(
    ctx: &Ctx<'_>,
    req: Request<Incoming>,
) -> Result<EditForm, Response<Body>> {
    use futures_util::StreamExt;
    let rt = ctx.state.runtime.load_full();
    let limit = rt.config.server.max_upload_bytes;
    let refuse = super::plain;
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let boundary = match crate::api::edit::boundary(content_type) {
        Ok(b) => b,
        Err(e) => return Err(refuse(StatusCode::BAD_REQUEST, &e.message)),
    };
    let held = match ctx
        .state
        .uploads
        .reserve(limit, rt.config.server.max_upload_memory)
    {
        Ok(h) => h,
        Err(e) => return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, &e.message)),
    };
    let frames = http_body_util::BodyStream::new(req.into_body()).filter_map(|frame| {
        std::future::ready(match frame {
            Ok(frame) => frame.into_data().ok().map(Ok),
            Err(e) => Some(Err(e)),
        })
    });
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit as u64));
    let mut multipart = multer::Multipart::with_constraints(frames, boundary, constraints);
    let mut text = Vec::new();
    let mut parts = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("Unreadable form: {e}"),
                ))
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let data = match field.bytes().await {
            Ok(d) => d,
            Err(e) => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("Unreadable form: {e}"),
                ))
            }
        };
        match filename {
            // A file input left empty.
            Some(_) if data.is_empty() => {}
            Some(_) => parts.push((name, filename, data)),
            None => {
                let value = String::from_utf8_lossy(&data).into_owned();
                if !matches!(name.as_str(), "csrf" | "tenant") {
                    parts.push((name.clone(), None, data));
                }
                text.push((name, value));
            }
        }
    }
    let text = Form(text);
    if !ctx.state.console.csrf_ok(&ctx.session, text.get("csrf")) {
        return Err(super::csrf_refused());
    }
    Ok(EditForm {
        text,
        parts,
        _held: held,
    })
}

/// Runs an edit form as `principal` and shows the answer.
pub async fn playground_edit(
    ctx: &Ctx<'_>,
    principal: &crate::auth::Principal,
    mut form: EditForm,
) -> Markup {
    let model = form.text.get("model").to_string();
    if !is_gpt(ctx, &model) {
        form.parts.push((
            "response_format".into(),
            None,
            Bytes::from_static(b"b64_json"),
        ));
    }
    let prompt = form.text.get("prompt").to_string();
    match crate::api::edit::form_from_parts(std::mem::take(&mut form.parts)) {
        Ok(edit) => {
            let what = crate::server::handlers::AsRequest::Edit(Box::new(edit));
            answer(ctx, principal, what, &prompt).await
        }
        Err(e) => notice("error", &e.message),
    }
}

/// Serves `what` as `principal` and shows the answer: the images, the error, and the
/// headers the gateway sent.
async fn answer(
    ctx: &Ctx<'_>,
    principal: &crate::auth::Principal,
    what: crate::server::handlers::AsRequest,
    prompt: &str,
) -> Markup {
    let resp = crate::server::handlers::serve_as(ctx.state, principal, what).await;
    let status = resp.status();
    let shown: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            k.starts_with("x-imagegate-") || k.starts_with("x-ratelimit-") || k == "x-request-id"
        })
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let answer = crate::server::respond::json_of(resp).await;
    let images: Vec<String> = answer["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|i| i["b64_json"].as_str())
                .map(|b| {
                    let kind = if b.starts_with("/9j/") {
                        "jpeg"
                    } else if b.starts_with("UklGR") {
                        "webp"
                    } else {
                        "png"
                    };
                    format!("data:image/{kind};base64,{b}")
                })
                .collect()
        })
        .unwrap_or_default();
    html! {
        section.result aria-live="polite" {
            h2 { "Answer: " (status.as_u16()) }
            @if !status.is_success() {
                (notice("error", answer["error"]["message"].as_str().unwrap_or("The request failed.")))
            }
            @for (i, src) in images.iter().enumerate() {
                img.generated src=(src) alt={ "Image " (i + 1) " for: " (prompt) };
            }
            @if let Some(p) = answer["data"][0]["revised_prompt"].as_str() { p { "Revised prompt: " (p) } }
            table.headers {
                caption { "Response headers" }
                tbody { @for (k, v) in &shown { tr { th scope="row" { (k) } td { code { (v) } } } } }
            }
        }
    }
}

/// A tenant's budget bar, if it has a budget.
pub async fn budget(
    state: &Arc<crate::server::AppState>,
    tenant: &str,
    limits: &crate::config::LimitsConfig,
) -> Markup {
    let Some(b) = limits.budget else {
        return html! { p { "No budget: spending is not capped." } };
    };
    let (period, _) = crate::metering::budget::period_of(b.period, crate::clock::now_unix());
    match state
        .meter
        .budgets()
        .usage(&format!("tenant:{tenant}"), &period)
        .await
    {
        Ok((spent, held)) => layout::budget_bar("Budget", spent, held, b.micro_usd, &period),
        Err(e) => notice("error", &format!("Budget store unavailable: {e}")),
    }
}

/// Reads a request's form, or answers why not; checks its CSRF token first.
pub async fn checked_form(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Form, Response<Body>> {
    let form = super::form(req).await?;
    if !ctx.state.console.csrf_ok(&ctx.session, form.get("csrf")) {
        return Err(super::csrf_refused());
    }
    Ok(form)
}
