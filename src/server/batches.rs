//! `/v1/files` and `/v1/batches`, as the `openai` package calls them. A file or a batch is
//! visible to its own tenant only (another tenant's id is a 404). A batch's input is checked
//! whole when it is created: a bad file fails the batch at once, with `errors` naming its
//! lines, before anything runs or is charged. The lines then run in `batch_runner`.

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::handlers::{authenticate, AccessLog};
use super::respond::{self, Body};
use super::state::{AppState, Runtime};
use crate::api::{self, ApiError, ErrorKind};
use crate::auth::Principal;
use crate::batch::{self, input, BatchObject, FileObject, RequestCounts};
use crate::images::BlobStore;

/// What the Batch API needs: its store and where file contents live.
pub struct Batches {
    pub store: batch::BatchStore,
    pub files: Arc<dyn BlobStore>,
    pub webhooks: batch::webhooks::WebhookStore,
}

/// A batch event as OpenAI sends it (`batch.completed`, `batch.failed`, ...).
pub fn event(kind: &str, batch_id: &str, now: i64) -> Value {
    json!({"id": batch::new_id("evt_"), "object": "event", "created_at": now,
           "type": format!("batch.{kind}"), "data": {"id": batch_id}})
}

/// Why `url` may not receive webhooks, if it may not.
pub fn check_webhook_url(url: &str, c: &crate::config::WebhooksConfig) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    match u.scheme() {
        "https" => {}
        "http" if c.allow_http => {}
        s => {
            return Err(format!(
                "the scheme must be https, not {s} (webhooks.allow_http allows http)"
            ))
        }
    }
    let host = u.host_str().ok_or("the URL has no host")?;
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<std::net::IpAddr>() {
        if crate::images::is_private(ip) && !c.allow_private_hosts {
            return Err(format!("{host} is a private, loopback or link-local address (webhooks.allow_private_hosts allows it)"));
        }
    }
    if host.eq_ignore_ascii_case("localhost") && !c.allow_private_hosts {
        return Err(
            "localhost is a loopback address (webhooks.allow_private_hosts allows it)".into(),
        );
    }
    Ok(())
}

fn unavailable() -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        "Batches need a database: set state.store to sqlite or postgres.",
    )
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("No {what} found with id '{id}'."),
    )
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "batch store error");
    ApiError::new(ErrorKind::Unavailable, "The batch store is unavailable.")
}

/// The principal a batch's lines run as: the creating key's rights when it was created.
pub fn principal_json(p: &Principal) -> String {
    let models = match &p.models {
        crate::auth::ModelSet::All => json!("*"),
        crate::auth::ModelSet::Only(set) => json!(set.iter().collect::<Vec<_>>()),
    };
    json!({
        "key_id": &*p.key_id, "tenant": &*p.tenant, "models": models,
        "limits": &*p.limits, "key_limits": p.key_limits.as_deref(),
        "labels": &p.share.labels,
    })
    .to_string()
}

pub fn principal_from(text: &str) -> Option<Principal> {
    let v: Value = serde_json::from_str(text).ok()?;
    let models = match &v["models"] {
        Value::Array(list) => crate::auth::ModelSet::from_list(
            &list
                .iter()
                .filter_map(|m| m.as_str().map(String::from))
                .collect::<Vec<_>>(),
        ),
        _ => crate::auth::ModelSet::All,
    };
    let labels: std::collections::BTreeMap<String, String> =
        serde_json::from_value(v["labels"].clone()).unwrap_or_default();
    Some(Principal {
        key_id: Arc::from(v["key_id"].as_str()?),
        tenant: Arc::from(v["tenant"].as_str()?),
        models,
        limits: Arc::new(serde_json::from_value(v["limits"].clone()).ok()?),
        key_limits: serde_json::from_value(v["key_limits"].clone())
            .ok()
            .map(Arc::new),
        share: Arc::new(crate::auth::Share::from_labels(&labels)),
    })
}

pub(super) async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    path: &str,
    log: &mut AccessLog,
) -> Result<http::Response<Body>, ApiError> {
    let rt = state.runtime.load_full();
    let principal = authenticate(&rt, &req, log).await?;
    let b = state.batches.as_ref().ok_or_else(unavailable)?;
    let tenant = principal.tenant.clone();
    let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let method = req.method().clone();
    match (method, parts.as_slice()) {
        (Method::POST, ["files"]) => {
            upload(state, b, &tenant, req, rt.config.server.max_upload_bytes).await
        }
        (Method::GET, ["files"]) => {
            let files = b.store.files(&tenant, 10_000).await.map_err(store_error)?;
            Ok(respond::json(
                StatusCode::OK,
                &json!({"object": "list", "data": files, "has_more": false}),
            ))
        }
        (Method::GET, ["files", id]) => {
            let f = b.store.file(&tenant, id).await.map_err(store_error)?;
            let f = f.ok_or_else(|| not_found("file", id))?;
            Ok(respond::json(StatusCode::OK, &f))
        }
        (Method::GET, ["files", id, "content"]) => {
            b.store
                .file(&tenant, id)
                .await
                .map_err(store_error)?
                .ok_or_else(|| not_found("file", id))?;
            let bytes = b.files.get(&batch::blob_name(id)).await.ok().flatten();
            let bytes = bytes.ok_or_else(|| not_found("file", id))?;
            Ok(respond::with_type(
                StatusCode::OK,
                Body::chunks([bytes]),
                "application/octet-stream",
            ))
        }
        (Method::DELETE, ["files", id]) => {
            if !b
                .store
                .delete_file(&tenant, id)
                .await
                .map_err(store_error)?
            {
                return Err(not_found("file", id));
            }
            Ok(respond::json(
                StatusCode::OK,
                &json!({"id": id, "object": "file", "deleted": true}),
            ))
        }
        (Method::POST, ["batches"]) => create(&rt, b, &principal, req).await,
        (Method::GET, ["batches"]) => {
            let query = req.uri().query().unwrap_or_default();
            let q: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect();
            let limit = match q.get("limit") {
                None => 20,
                Some(l) => l
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", "Invalid 'limit': expected 1 to 100.")
                    })?,
            };
            let mut page = b
                .store
                .batches(&tenant, q.get("after").map(String::as_str), limit + 1)
                .await
                .map_err(store_error)?;
            let has_more = page.len() as i64 > limit;
            page.truncate(limit as usize);
            Ok(respond::json(
                StatusCode::OK,
                &json!({
                    "object": "list", "data": page, "has_more": has_more,
                    "first_id": page.first().map(|x| &x.id), "last_id": page.last().map(|x| &x.id),
                }),
            ))
        }
        (Method::GET, ["batches", id]) => {
            let found = b.store.batch(&tenant, id).await.map_err(store_error)?;
            Ok(respond::json(
                StatusCode::OK,
                &found.ok_or_else(|| not_found("batch", id))?,
            ))
        }
        (Method::POST, ["batches", id, "cancel"]) => {
            let now = crate::clock::now_unix() as i64;
            let found = b
                .store
                .cancel(&tenant, id, now)
                .await
                .map_err(store_error)?;
            Ok(respond::json(
                StatusCode::OK,
                &found.ok_or_else(|| not_found("batch", id))?,
            ))
        }
        (m, _) => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("Invalid URL ({m} {path})"),
        )),
    }
}

/// `POST /v1/files`: multipart with `purpose` and `file`.
async fn upload(
    state: &Arc<AppState>,
    b: &Batches,
    tenant: &str,
    req: Request<Incoming>,
    limit: usize,
) -> Result<http::Response<Body>, ApiError> {
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let boundary = api::edit::boundary(content_type)?;
    // Held to the end of the upload: its memory reservation and pace, as an edit's.
    let rt = state.runtime.load_full();
    let server = &rt.config.server;
    let (frames, received) = super::uploads::receive(state, server, req, limit)?;
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit as u64));
    let mut form = multer::Multipart::with_constraints(frames, boundary, constraints);
    let (mut purpose, mut file) = (None, None);
    let bad = |m: String| ApiError::new(ErrorKind::InvalidRequest, m);
    let unreadable = |e: multer::Error| {
        received.or_slow(
            server,
            match e {
                multer::Error::StreamSizeExceeded { .. } => api::edit::too_large(limit as u64),
                e => bad(format!("Invalid upload: {e}")),
            },
        )
    };
    while let Some(field) = form.next_field().await.map_err(unreadable)? {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(unreadable)?;
        match name.as_str() {
            "purpose" => purpose = Some(String::from_utf8_lossy(&data).into_owned()),
            "file" => file = Some((filename.unwrap_or_else(|| "file.jsonl".into()), data)),
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("Unrecognized request argument supplied: {other}"),
                ))
            }
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid("purpose", "Missing required parameter: 'purpose'."))?;
    if purpose != "batch" {
        return Err(ApiError::invalid(
            "purpose",
            format!(
                "'{purpose}' is not supported here; this gateway takes files with purpose 'batch'."
            ),
        ));
    }
    let (filename, data) =
        file.ok_or_else(|| ApiError::invalid("file", "Missing required parameter: 'file'."))?;
    let f = FileObject {
        id: batch::new_id("file-"),
        object: "file",
        bytes: data.len() as i64,
        created_at: crate::clock::now_unix() as i64,
        filename,
        purpose,
        status: "processed",
    };
    b.files
        .put(&batch::blob_name(&f.id), data)
        .await
        .map_err(|e| ApiError::internal(format!("cannot store the file: {e}")))?;
    b.store.insert_file(tenant, &f).await.map_err(store_error)?;
    let _ = state;
    Ok(respond::json(StatusCode::OK, &f))
}

/// `POST /v1/batches`: checks the input file whole, then queues its lines.
async fn create(
    rt: &Runtime,
    b: &Batches,
    principal: &Principal,
    req: Request<Incoming>,
) -> Result<http::Response<Body>, ApiError> {
    // Bounded and timed like any JSON body (it was read without a cap before).
    let body = super::handlers::read_body(req, &rt.config.server).await?;
    api::json::reject_duplicate_keys(&body)?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!("We could not parse the JSON body of your request ({e})."),
        )
    })?;
    let field = |k: &str| {
        v[k].as_str()
            .ok_or_else(|| ApiError::invalid(k, format!("Missing required parameter: '{k}'.")))
    };
    let (file_id, endpoint, window) = (
        field("input_file_id")?,
        field("endpoint")?,
        field("completion_window")?,
    );
    if !batch::ENDPOINTS.contains(&endpoint) {
        return Err(ApiError::invalid(
            "endpoint",
            format!(
                "'{endpoint}' is not one of {:?} - 'endpoint'",
                batch::ENDPOINTS
            ),
        ));
    }
    if window != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            format!("'{window}' is not one of ['24h'] - 'completion_window'"),
        ));
    }
    let tenant = &principal.tenant;
    b.store
        .file(tenant, file_id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found("file", file_id))?;
    let text = b
        .files
        .get(&batch::blob_name(file_id))
        .await
        .ok()
        .flatten()
        .ok_or_else(|| not_found("file", file_id))?;
    let checked = input::check(&text, endpoint, |body| {
        let raw = api::parse_request(body).map_err(|e| (e.param.clone(), e.message.clone()))?;
        let model = raw.model().to_string();
        let route = rt
            .router
            .model(&model)
            .filter(|_| principal.may_use(&model));
        let route = route.ok_or_else(|| {
            (
                Some("model".to_string()),
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        })?;
        raw.validate(&route.rules)
            .map(|_| ())
            .map_err(|e| (e.param.clone(), e.message.clone()))
    });
    let now = crate::clock::now_unix() as i64;
    let (lines, status, errors) = match checked {
        Ok(lines) => (lines, "in_progress", None),
        Err(errors) => (
            Vec::new(),
            "failed",
            Some(json!({"object": "list", "data": errors})),
        ),
    };
    let batch = BatchObject {
        id: batch::new_id("batch_"),
        object: "batch",
        endpoint: endpoint.to_string(),
        errors,
        input_file_id: file_id.to_string(),
        completion_window: window.to_string(),
        status: status.to_string(),
        output_file_id: None,
        error_file_id: None,
        created_at: now,
        in_progress_at: (status == "in_progress").then_some(now),
        expires_at: now + 24 * 3600,
        finalizing_at: None,
        completed_at: None,
        failed_at: (status == "failed").then_some(now),
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts {
            total: lines.len() as i64,
            completed: 0,
            failed: 0,
        },
        metadata: v.get("metadata").filter(|m| m.is_object()).cloned(),
    };
    b.store
        .create(tenant, &principal_json(principal), &batch, &lines)
        .await
        .map_err(store_error)?;
    if batch.status == "failed" {
        b.webhooks
            .enqueue(tenant, &event("failed", &batch.id, now), now)
            .await
            .map_err(store_error)?;
    }
    Ok(respond::json(StatusCode::OK, &batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_must_be_public_https_unless_allowed() {
        let strict = crate::config::WebhooksConfig::default();
        assert!(check_webhook_url("https://hooks.example.com/x", &strict).is_ok());
        for bad in [
            "http://hooks.example.com/x",
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest",
            "https://localhost/x",
            "ftp://hooks.example.com/x",
        ] {
            assert!(check_webhook_url(bad, &strict).is_err(), "{bad}");
        }
        let dev = crate::config::WebhooksConfig {
            allow_private_hosts: true,
            allow_http: true,
        };
        assert!(check_webhook_url("http://127.0.0.1:9000/hook", &dev).is_ok());
    }
}
