//! The admin API on the admin listener: tenants CRUD and keys create/list/get/disable/enable/
//! revoke/rotate, guarded by admin tokens (kept as SHA-256 in gateway.yaml). JSON in and out,
//! cursor pagination (`after`, `limit`), OpenAI-shaped errors. Secrets appear once: in the
//! answer that creates or rotates a key.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::respond::{self, Body};
use super::state::AppState;
use crate::api::{ApiError, ErrorKind};
use crate::store::keys::{KeyInput, TenantInput};
use crate::store::{Database, StoreError};

const MAX_PAGE: i64 = 500;

pub async fn handle(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    match route(state, req).await {
        Ok(resp) => resp,
        Err(e) => respond::error(&e),
    }
}

fn authorized(state: &AppState, req: &Request<Incoming>) -> Result<Admin, ApiError> {
    let token = crate::auth::bearer_token(req.headers().get(http::header::AUTHORIZATION))
        .map_err(|_| ApiError::new(ErrorKind::Authentication, "An admin token is required."))?;
    admin_of(state, token)
        .ok_or_else(|| ApiError::new(ErrorKind::Authentication, "Invalid admin token."))
}

/// Who an admin credential is: an admin token of gateway.yaml or a JWT with the admin role.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Admin {
    /// The SHA-256 (hex) of the token, as gateway.yaml lists it.
    Token { sha256: String },
    Jwt {
        sub: String,
        expires_at: Option<u64>,
    },
}

impl Admin {
    /// The audit log's name for this admin: never the token, only a short fingerprint.
    pub(super) fn actor(&self) -> String {
        match self {
            Admin::Token { sha256 } => format!("admin:token:{}", &sha256[..12.min(sha256.len())]),
            Admin::Jwt { sub, .. } => format!("admin:jwt:{sub}"),
        }
    }
}

/// The admin `token` names, if any (compared in constant time with the configured hashes).
pub(super) fn admin_of(state: &AppState, token: &str) -> Option<Admin> {
    let rt = state.runtime.load();
    if rt.keys.jwt_admin(token) {
        let claims = rt.keys.jwt.as_ref()?.verify(token).ok()?;
        let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("-");
        return Some(Admin::Jwt {
            sub: sub.chars().take(80).collect(),
            expires_at: claims.get("exp").and_then(|v| v.as_u64()),
        });
    }
    let hash = hex::encode(crate::auth::hash_secret(token));
    token_configured(state, &hash).then_some(Admin::Token { sha256: hash })
}

/// Whether the admin token with this SHA-256 (hex) is still in the running config.
pub(super) fn token_configured(state: &AppState, sha256: &str) -> bool {
    let rt = state.runtime.load();
    let mut found = false;
    for t in &rt.config.admin.tokens_sha256 {
        // Every entry compared, in constant time.
        found |= bool::from(t.to_ascii_lowercase().as_bytes().ct_eq(sha256.as_bytes()));
    }
    found
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes: Bytes = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|_| ApiError::new(ErrorKind::PayloadTooLarge, "Body over 64 KiB."))?
        .to_bytes();
    crate::api::json::reject_duplicate_keys(&bytes)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, format!("Invalid JSON body: {e}")))
}

#[derive(Deserialize, Default)]
struct Page {
    after: Option<String>,
    limit: Option<i64>,
    tenant: Option<String>,
    /// Only tenants (keys) whose id (or name) contains this.
    q: Option<String>,
}

fn page(req: &Request<Incoming>) -> Result<Page, ApiError> {
    let mut p = Page::default();
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => p.after = Some(v.into_owned()),
            "tenant" => p.tenant = Some(v.into_owned()),
            "q" => p.q = Some(v.into_owned()).filter(|q| !q.is_empty()),
            "limit" => {
                let n: i64 = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "limit",
                            format!("limit must be between 1 and {MAX_PAGE}"),
                        )
                    })?;
                p.limit = Some(n);
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("Unknown query parameter: {other}"),
                ))
            }
        }
    }
    Ok(p)
}

fn list<T: serde::Serialize>(items: Vec<T>, limit: i64, last_id: Option<String>) -> Response<Body> {
    let has_more = items.len() as i64 == limit;
    respond::json(
        StatusCode::OK,
        &json!({"object": "list", "data": items, "has_more": has_more,
                "next_after": if has_more { last_id } else { None }}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    #[serde(default)]
    grace: Option<String>,
}

fn no_batches() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "Webhooks need a database (state.store).",
    )
}

async fn route(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let admin = authorized(state, &req)?;
    let db: Database = state
        .db_keys
        .as_ref()
        .map(|k| k.database().clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unavailable,
                "No key store is configured (state.store).",
            )
        })?;
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.trim_start_matches("/admin/v1/").split('/').collect();
    let method = req.method().clone();
    let mutates = method != Method::GET;
    let resp = match (method.clone(), parts.as_slice()) {
        (Method::GET, ["usage"]) => {
            let query = req.uri().query().unwrap_or("").to_string();
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            let report = crate::metering::report::Report::from_pairs(
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .map_err(|(param, why)| ApiError::invalid(&param, format!("{param}: {why}")))?;
            // Read-your-writes: what this replica has journaled is committed first.
            state.meter.flush().await;
            let text = report.render(&db).await?;
            let kind = if report.csv {
                "text/csv; charset=utf-8"
            } else {
                "application/json"
            };
            Ok(respond::with_type(StatusCode::OK, Bytes::from(text), kind))
        }
        (Method::GET, ["tenants"]) => {
            let p = page(&req)?;
            let limit = p.limit.unwrap_or(100);
            let items = db
                .list_tenants(p.q.as_deref(), p.after.as_deref(), limit)
                .await?;
            let last = items.last().map(|t| t.id.clone());
            Ok(list(items, limit, last))
        }
        (Method::POST, ["tenants"]) => {
            let input: TenantInput = body(req).await?;
            Ok(respond::json(
                StatusCode::CREATED,
                &db.create_tenant(&input).await?,
            ))
        }
        (Method::GET, ["tenants", id]) => {
            let t = db
                .get_tenant(id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("tenant \"{id}\"")))?;
            Ok(respond::json(StatusCode::OK, &t))
        }
        (Method::PUT, ["tenants", id]) => {
            let id = id.to_string();
            let mut input: TenantInput = body(req).await?;
            if !input.id.is_empty() && input.id != id {
                return Err(ApiError::invalid(
                    "id",
                    "the body's id differs from the path's",
                ));
            }
            input.id = id;
            Ok(respond::json(
                StatusCode::OK,
                &db.update_tenant(&input).await?,
            ))
        }
        (Method::POST, ["tenants", id, action @ ("disable" | "enable")]) => {
            db.set_tenant_disabled(id, *action == "disable").await?;
            Ok(respond::json(StatusCode::OK, &db.get_tenant(id).await?))
        }
        (Method::GET, ["tenants", id, "webhooks"]) => {
            let b = state.batches.as_ref().ok_or_else(no_batches)?;
            let hooks = b.webhooks.list(id).await?;
            Ok(respond::json(
                StatusCode::OK,
                &json!({"object": "list", "data": hooks}),
            ))
        }
        (Method::POST, ["tenants", id, "webhooks"]) => {
            let b = state.batches.as_ref().ok_or_else(no_batches)?;
            let known = state.runtime.load().config.tenants.contains_key(*id)
                || db.get_tenant(id).await.is_ok();
            if !known {
                return Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("tenant {id} not found"),
                ));
            }
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct NewHook {
                url: String,
            }
            let hook: NewHook = body(req).await?;
            let rules = state.runtime.load().config.webhooks.clone();
            super::batches::check_webhook_url(&hook.url, &rules)
                .map_err(|why| ApiError::invalid("url", format!("Invalid 'url': {why}.")))?;
            let now = crate::clock::now_unix() as i64;
            Ok(respond::json(
                StatusCode::OK,
                &b.webhooks.add(id, &hook.url, now).await?,
            ))
        }
        (Method::DELETE, ["tenants", id, "webhooks", hook]) => {
            let b = state.batches.as_ref().ok_or_else(no_batches)?;
            if !b.webhooks.delete(id, hook).await? {
                return Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("webhook {hook} not found"),
                ));
            }
            Ok(respond::json(
                StatusCode::OK,
                &json!({"id": hook, "deleted": true}),
            ))
        }
        (Method::DELETE, ["tenants", id]) => {
            db.delete_tenant(id).await?;
            Ok(respond::json(
                StatusCode::OK,
                &json!({"id": id, "deleted": true}),
            ))
        }
        (Method::GET, ["keys"]) => {
            let p = page(&req)?;
            let limit = p.limit.unwrap_or(100);
            let items = db
                .list_keys(
                    p.tenant.as_deref(),
                    p.q.as_deref(),
                    p.after.as_deref(),
                    limit,
                )
                .await?;
            let last = items.last().map(|k| k.id.clone());
            Ok(list(items, limit, last))
        }
        (Method::POST, ["keys"]) => {
            let input: KeyInput = body(req).await?;
            Ok(respond::json(
                StatusCode::CREATED,
                &db.create_key(&input).await?,
            ))
        }
        (Method::GET, ["keys", id]) => {
            let k = db
                .get_key(id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("key \"{id}\"")))?;
            Ok(respond::json(StatusCode::OK, &k))
        }
        (Method::POST, ["keys", id, action @ ("disable" | "enable" | "revoke")]) => {
            match *action {
                "revoke" => db.revoke_key(id).await?,
                a => db.set_key_disabled(id, a == "disable").await?,
            }
            Ok(respond::json(StatusCode::OK, &db.get_key(id).await?))
        }
        (Method::POST, ["keys", id, "rotate"]) => {
            let id = id.to_string();
            let r: Rotate = body(req).await?;
            let grace = match r.grace.as_deref() {
                None => std::time::Duration::ZERO,
                Some(g) => {
                    crate::config::parse_duration(g).map_err(|e| ApiError::invalid("grace", e))?
                }
            };
            Ok(respond::json(
                StatusCode::OK,
                &db.rotate_key(&id, grace).await?,
            ))
        }
        (m, _) => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("Invalid URL ({m} {path})"),
        )),
    }?;
    if mutates && resp.status().is_success() {
        // The change is made; an audit store failure is logged, not turned into an error.
        if let Err(e) = db
            .audit(
                &admin.actor(),
                &format!("admin_api.{}", method.as_str().to_ascii_lowercase()),
                &path,
                &json!({}),
            )
            .await
        {
            tracing::error!(error = %e, "audit log write failed");
        }
        refresh_keys(state).await;
    }
    Ok(resp)
}

/// After a change to keys or tenants made on this replica: its key cache sees it at once (a
/// key created here works on the next request, one revoked here stops), instead of at the
/// next poll of the store's revision. Other replicas see it within their poll (500 ms).
pub(crate) async fn refresh_keys(state: &AppState) {
    if let Some(keys) = &state.db_keys {
        if let Err(e) = keys.refresh().await {
            tracing::warn!(error = %e, "key store refresh after a change failed");
        }
    }
}
