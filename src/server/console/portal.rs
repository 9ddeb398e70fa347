//! The tenant portal: a store API key logs in and sees its own tenant only: usage, limits,
//! budget left, the playground with its models, and (keys with `manage_keys`) the tenant's
//! keys. Every request re-reads the key: revoked, disabled or expired, the session ends.
//! Another tenant's key is "not found", whatever its id.

use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use maud::{html, Markup};
use serde_json::json;

use super::layout::{self, notice, Frame};
use super::session::Who;
use super::shared::{self, checked_form, PAGE};
use super::{database, html_page, not_found, plain, redirect, Ctx, Gate, Site};
use crate::auth::KeyStore;
use crate::server::respond::Body;
use crate::server::AppState;
use crate::store::keys::{KeyRecord, TenantRecord};
use crate::store::Database;

const NAV_ALL: &[(&str, &str)] = &[
    ("home", "Home"),
    ("usage", "Usage"),
    ("keys", "Keys"),
    ("playground", "Playground"),
];
const NAV_USAGE: &[(&str, &str)] = &[
    ("home", "Home"),
    ("usage", "Usage"),
    ("playground", "Playground"),
];

/// The logged-in key and its tenant, as the store has them now.
struct Me {
    key: KeyRecord,
    tenant: TenantRecord,
}

pub async fn route(
    state: &Arc<AppState>,
    site: &Site,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<Body> {
    let verify = |credential: String| async move {
        let ttl = state.runtime.load().config.console.session_ttl.as_secs();
        let Some(store) = state.db_keys.as_ref() else {
            return Err("The portal needs the key store (state.store).".to_string());
        };
        if crate::store::keys::parse_token(&credential).is_none() {
            return Err("That is not an API key of this gateway's key store (sk-ig-…).".into());
        }
        // A key made a moment ago may not be in this replica's cache yet: one refresh.
        let mut result = store.authenticate(&credential).await;
        if matches!(result, Err(crate::auth::AuthError::Unknown))
            && store.refresh().await.unwrap_or(false)
        {
            result = store.authenticate(&credential).await;
        }
        match result {
            Ok(p) => Ok((
                Who::Key {
                    tenant: p.tenant.to_string(),
                    key: p.key_id.to_string(),
                },
                crate::clock::now_unix() + ttl,
            )),
            Err(e) => Err(format!("This key cannot log in: {e}.")),
        }
    };
    let hint = "API key";
    let (ctx, req) = match super::gate(state, site, req, peer, hint, verify).await {
        Gate::Done(resp) => return resp,
        Gate::Page(ctx, req) => (ctx, req),
    };
    let Some(db) = database(state) else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "No key store.");
    };
    let Some(me) = me(&ctx, &db).await else {
        // The key was revoked, disabled or has expired since the login.
        state.console.end(&ctx.session, crate::clock::now_unix());
        return redirect("/portal/login");
    };
    let path = req.uri().path().trim_end_matches('/').to_string();
    let rest = path.strip_prefix(site.base).unwrap_or("");
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method().clone();
    let tenant = me.tenant.id.clone();
    match (method, parts.as_slice()) {
        (Method::GET, [] | ["home"]) => frame(&ctx, &me, "Home", "home", home(&ctx, &me).await),
        (Method::GET, ["usage"]) => {
            let q = super::query(&req);
            let body = shared::usage(&ctx, &db, &q, Some(&tenant)).await;
            frame(&ctx, &me, "Usage", "usage", body)
        }
        (Method::GET, ["usage.csv"]) => {
            let q = super::query(&req);
            shared::usage_csv(&ctx, &db, &q, Some(&tenant)).await
        }
        (Method::GET, ["playground"]) => {
            let q = super::query(&req);
            let form =
                shared::playground_forms(&ctx, &q, Some(&tenant), &playground_models(&ctx, &me));
            frame(&ctx, &me, "Playground", "playground", form)
        }
        (Method::POST, ["playground", "edit"]) => {
            let form = match shared::read_edit_form(&ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let forms = shared::playground_forms(
                &ctx,
                &form.text,
                Some(&tenant),
                &playground_models(&ctx, &me),
            );
            let principal = crate::auth::principal_of(&me.key, &me.tenant);
            let result = shared::playground_edit(&ctx, &principal, form).await;
            frame(
                &ctx,
                &me,
                "Playground",
                "playground",
                html! { (forms) (result) },
            )
        }
        (Method::POST, ["playground"]) => {
            let form = match checked_form(&ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let principal = crate::auth::principal_of(&me.key, &me.tenant);
            let result = shared::playground_run(&ctx, &principal, &form).await;
            let body = html! {
                (shared::playground_forms(&ctx, &form, Some(&tenant), &playground_models(&ctx, &me)))
                (result)
            };
            frame(&ctx, &me, "Playground", "playground", body)
        }
        (_, ["keys", ..]) if !me.key.manage_keys => plain(
            StatusCode::FORBIDDEN,
            "This key may see usage only: it cannot manage keys (manage_keys).",
        ),
        (Method::GET, ["keys"]) => {
            let q = super::query(&req);
            let body = keys(&ctx, &db, &tenant, q.trimmed("after")).await;
            frame(&ctx, &me, "Keys", "keys", body)
        }
        (Method::POST, ["keys"]) => {
            let form = match checked_form(&ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            match shared::create_key(&db, &form, &tenant).await {
                Ok(created) => {
                    ctx.audit(
                        "key.create",
                        &created.key.id,
                        json!({"tenant": tenant, "name": created.key.name, "manage_keys": created.key.manage_keys}),
                    )
                    .await;
                    let body = shared::secret_page(&ctx, &created, "Created key");
                    frame(&ctx, &me, "New key", "keys", body)
                }
                Err(e) => frame(&ctx, &me, "Keys", "keys", notice("error", &e.to_string())),
            }
        }
        (Method::GET, ["keys", id]) => match own_key(&db, id, &tenant).await {
            Some(k) => {
                let body = shared::keys_table(&ctx, std::slice::from_ref(&k), Some(&tenant));
                frame(&ctx, &me, "Key", "keys", body)
            }
            None => not_found(),
        },
        (Method::POST, ["keys", id, action @ ("revoke" | "rotate")]) => {
            let form = match checked_form(&ctx, req).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let Some(key) = own_key(&db, id, &tenant).await else {
                return not_found();
            };
            match shared::key_action(&ctx, &db, &key, action, &form).await {
                Ok(Some(rotated)) => {
                    let body = shared::secret_page(&ctx, &rotated, "Rotated key");
                    frame(&ctx, &me, "Rotated key", "keys", body)
                }
                // Revoking the key of this very session ends it at the next request.
                Ok(None) => redirect("/portal/keys"),
                Err(why) => frame(&ctx, &me, "Keys", "keys", notice("error", &why)),
            }
        }
        (Method::GET, _) => not_found(),
        _ => plain(StatusCode::METHOD_NOT_ALLOWED, "Not here."),
    }
}

/// The session's key and tenant, if the key still works.
async fn me(ctx: &Ctx<'_>, db: &Database) -> Option<Me> {
    let Who::Key { tenant, key } = &ctx.session.who else {
        return None;
    };
    let key = db.get_key(key).await.ok()??;
    let now = crate::store::keys::now();
    let usable = &key.tenant == tenant
        && key.revoked_at.is_none()
        && !key.disabled
        && key.expires_at.is_none_or(|e| e > now);
    if !usable {
        return None;
    }
    let tenant = db.get_tenant(tenant).await.ok()??;
    (!tenant.disabled).then_some(Me { key, tenant })
}

/// A key of this tenant; another tenant's is as if it did not exist.
async fn own_key(db: &Database, id: &str, tenant: &str) -> Option<KeyRecord> {
    db.get_key(id).await.ok()?.filter(|k| k.tenant == tenant)
}

fn playground_models(ctx: &Ctx<'_>, me: &Me) -> (Vec<String>, Vec<String>) {
    let principal = crate::auth::principal_of(&me.key, &me.tenant);
    shared::playground_models(ctx, |m| principal.may_use(m))
}

fn models(ctx: &Ctx<'_>, me: &Me) -> Vec<String> {
    let principal = crate::auth::principal_of(&me.key, &me.tenant);
    ctx.state
        .runtime
        .load()
        .router
        .model_names()
        .filter(|m| principal.may_use(m))
        .map(String::from)
        .collect()
}

fn frame(ctx: &Ctx<'_>, me: &Me, title: &str, active: &str, content: Markup) -> Response<Body> {
    let f = Frame {
        base: ctx.site.base,
        title,
        active,
        session: Some(&ctx.session),
        csrf: &ctx.csrf,
        nav: if me.key.manage_keys {
            NAV_ALL
        } else {
            NAV_USAGE
        },
    };
    html_page(StatusCode::OK, layout::page(&f, content))
}

async fn home(ctx: &Ctx<'_>, me: &Me) -> Markup {
    let limits = me.tenant.effective_limits();
    let n = |v: Option<u32>| v.map_or("no limit".to_string(), |v| v.to_string());
    let budget = shared::budget(ctx.state, &me.tenant.id, &limits).await;
    html! {
        dl.facts {
            dt { "Tenant" } dd { (me.tenant.id) }
            dt { "Logged in with key" } dd { code { (me.key.id) } " (" (me.key.name) ")" }
            dt { "Models" } dd { (models(ctx, me).join(", ")) }
            dt { "Requests per minute" } dd { (n(limits.requests_per_minute)) }
            dt { "Images per minute" } dd { (n(limits.images_per_minute)) }
            dt { "Requests at once" } dd { (n(limits.concurrent_requests)) }
        }
        (budget)
        p { a href="/portal/usage?group_by=day" { "Usage by day" } }
    }
}

async fn keys(ctx: &Ctx<'_>, db: &Database, tenant: &str, after: Option<&str>) -> Markup {
    match db.list_keys(Some(tenant), None, after, PAGE).await {
        Err(e) => notice("error", &e.to_string()),
        Ok(list) => html! {
            (shared::keys_table(ctx, &list, Some(tenant)))
            @if list.len() as i64 == PAGE {
                p.more { a href={ "/portal/keys?after=" (list[list.len() - 1].id) } { "Next page" } }
            }
            (shared::new_key_form(ctx, Some(tenant)))
        },
    }
}
