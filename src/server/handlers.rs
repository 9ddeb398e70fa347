//! The routes, and a request up to its validation ([`generations`]): auth -> parse -> model
//! rights -> validate; from there [`super::pipeline::run`] (limits -> route -> backend ->
//! images -> response). Each step returns a typed value or an `ApiError`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tracing::Instrument;

use super::respond::{self, Body, REQUEST_ID};
use super::state::{AppState, Runtime};
use crate::api::{self, ApiError, ErrorKind, ModelList, ModelObject, Operation};
use crate::auth::{bearer_token, KeyStore, Principal};
use crate::images::FILES_PREFIX;
use crate::metering::idempotency;

/// What the access log line says about a request, filled in as it goes.
#[derive(Default)]
pub(crate) struct AccessLog {
    pub(super) key_id: Option<Arc<str>>,
    pub(super) tenant: Option<Arc<str>>,
    pub(super) model: Option<String>,
    /// The route that took the request (its model name is the metrics label; a name no route
    /// has is never one).
    pub(super) route: Option<Arc<str>>,
    pub(super) backend: Option<Arc<str>>,
    pub(super) attempts: u32,
    /// Token usage the upstream reported (GPT image), for the log line until metering;
    /// written out only when the line is.
    pub(super) usage: Option<serde_json::Value>,
    pub(super) upstream_time: std::time::Duration,
    pub(super) rate: crate::policy::RateHeaders,
    /// Micro-dollars charged (price table x images delivered).
    pub(super) cost: Option<u64>,
    /// Images delivered.
    pub(super) images: u32,
    /// `generation`, `edit` or `variation`, once the request is validated.
    pub(super) operation: Option<Operation>,
    /// The batch a line belongs to (batch lines run in the batch class, below interactive).
    pub(crate) batch: Option<String>,
}

/// The public API's OpenAPI 3.1 document (docs/openapi.json), served at `/openapi.json`.
const OPENAPI: &str = include_str!("../../docs/openapi.json");

const BACKEND: HeaderName = HeaderName::from_static("x-imagegate-backend");
const ATTEMPTS: HeaderName = HeaderName::from_static("x-imagegate-attempts");

/// Counts a request in flight for as long as it lives.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        crate::telemetry::metrics().in_flight().inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::telemetry::metrics().in_flight().dec();
    }
}

pub async fn handle(
    state: Arc<AppState>,
    req: Box<Request<Incoming>>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let _in_flight = InFlight::new();
    let request_id = respond::request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut log = AccessLog::default();
    let span = tracing::info_span!("request", otel.name = %format!("{method} {path}"), request_id = %request_id);
    crate::telemetry::continue_trace(&span, req.headers());
    let trace_id = crate::telemetry::trace_id(&span);

    let mut resp = match route(&state, req, &path, &request_id, &mut log)
        .instrument(span)
        .await
    {
        Ok(resp) => resp,
        Err(err) => respond::error(&err),
    };
    finish(
        &mut resp,
        &log,
        &request_id,
        started,
        &method,
        &path,
        trace_id.as_deref(),
    );
    Ok(resp)
}

/// What every answered request gets: its id, backend, attempts and rate-limit headers, its
/// metrics and its access log line.
fn finish(
    resp: &mut Response<Body>,
    log: &AccessLog,
    request_id: &str,
    started: Instant,
    method: &Method,
    path: &str,
    trace_id: Option<&str>,
) {
    let headers = resp.headers_mut();
    // request id, backend, attempts and six rate-limit headers: one growth, not several.
    headers.reserve(9);
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, v);
    }
    // What routing did, for ops: in headers and the log line, never in the body.
    if let Some(backend) = log
        .backend
        .as_deref()
        .and_then(|b| HeaderValue::from_str(b).ok())
    {
        headers.insert(BACKEND, backend);
    }
    if log.attempts > 0 {
        headers.insert(ATTEMPTS, crate::policy::number_header(log.attempts));
    }
    log.rate.insert_into(headers);

    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    if path.starts_with("/v1/") {
        let m = crate::telemetry::metrics();
        // From the path, so a request refused before it was read still has one.
        let operation = match path {
            "/v1/images/generations" => "generation",
            "/v1/images/edits" => "edit",
            "/v1/images/variations" => "variation",
            _ => "-",
        };
        m.request(log.route.as_ref(), operation, status, log.tenant.as_ref());
        if operation != "-" {
            crate::telemetry::recent().record(crate::telemetry::recent::Finished {
                status,
                latency: elapsed,
                tenant: log.tenant.as_ref(),
                model: log.route.as_ref(),
                images: log.images,
                spend_micro_usd: log.cost.unwrap_or(0),
            });
        }
        if log.attempts > 0 {
            m.overhead(elapsed.saturating_sub(log.upstream_time));
        }
    }
    let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    tracing::info!(
        target: "imagegate::access",
        request_id = %request_id,
        method = %method,
        path = %path,
        status,
        latency_ms = (latency_ms * 100.0).round() / 100.0,
        key_id = %dash(log.key_id.as_deref()),
        tenant = %dash(log.tenant.as_deref()),
        model = %dash(log.model.as_deref()),
        backend = %dash(log.backend.as_deref()),
        attempts = log.attempts,
        usage = %log.usage.as_ref().map_or_else(|| "-".to_string(), |u| u.to_string()),
        trace_id = %dash(trace_id),
        cost_micro_usd = log.cost.unwrap_or(0),
        operation = log.operation.map_or("-", Operation::as_str),
        "request"
    );
}

/// A request the console's playground makes for a principal, without an API key.
pub(crate) enum AsRequest {
    /// A generation's JSON body.
    Generation(Bytes),
    /// An edit's form, read.
    Edit(Box<api::edit::Form>),
}

/// Serves `what` for `principal`: the same path as `POST /v1/images/generations` (or
/// `/edits`) from parsing on, counted and logged the same way.
pub(crate) async fn serve_as(
    state: &Arc<AppState>,
    principal: &Principal,
    what: AsRequest,
) -> Response<Body> {
    let started = Instant::now();
    let _in_flight = InFlight::new();
    let request_id = respond::request_id(&http::HeaderMap::new());
    let mut log = AccessLog {
        key_id: Some(principal.key_id.clone()),
        tenant: Some(principal.tenant.clone()),
        ..AccessLog::default()
    };
    let rt = state.runtime.load_full();
    let (path, result) = match what {
        AsRequest::Generation(body) => (
            "/v1/images/generations",
            generate(state, &rt, principal, body, None, &request_id, &mut log).await,
        ),
        AsRequest::Edit(form) => (
            "/v1/images/edits",
            Box::pin(super::uploads::serve_form(
                state,
                &rt,
                principal,
                *form,
                None,
                &request_id,
                &mut log,
                Operation::Edit,
            ))
            .await,
        ),
    };
    let mut resp = result.unwrap_or_else(|err| respond::error(&err));
    finish(
        &mut resp,
        &log,
        &request_id,
        started,
        &Method::POST,
        path,
        None,
    );
    resp
}

/// `path` is the request's own, read once by [`handle`].
async fn route(
    state: &Arc<AppState>,
    req: Box<Request<Incoming>>,
    path: &str,
    request_id: &str,
    log: &mut AccessLog,
) -> Result<Response<Body>, ApiError> {
    match (req.method(), path) {
        (&Method::POST, "/v1/images/generations") => generations(state, req, request_id, log).await,
        // The other endpoints' futures are boxed: a request's future is allocated at the size
        // of its largest route, and the generation path (the one held by the thousands of
        // requests waiting on upstreams) is not the largest (bench/README.md, "Memory per
        // request in flight").
        (&Method::POST, "/v1/images/edits") => {
            Box::pin(super::uploads::handle(
                state,
                *req,
                request_id,
                log,
                Operation::Edit,
            ))
            .await
        }
        (&Method::POST, "/v1/images/variations") => {
            Box::pin(super::uploads::handle(
                state,
                *req,
                request_id,
                log,
                Operation::Variation,
            ))
            .await
        }
        (&Method::GET, "/v1/models") => models(state, &req, log).await,
        (&Method::GET, p) if p.starts_with("/v1/models/") => {
            model(state, &req, &p["/v1/models/".len()..], log).await
        }
        (_, p)
            if p == "/v1/files"
                || p.starts_with("/v1/files/")
                || p == "/v1/batches"
                || p.starts_with("/v1/batches/") =>
        {
            Box::pin(super::batches::route(state, *req, p, log)).await
        }
        (&Method::GET | &Method::HEAD, "/healthz") => {
            Ok(respond::json(StatusCode::OK, &json!({"status": "ok"})))
        }
        (&Method::GET | &Method::HEAD, "/readyz") => Ok(readyz(state)),
        (&Method::GET | &Method::HEAD, "/openapi.json") => Ok(respond::with_type(
            StatusCode::OK,
            Bytes::from_static(OPENAPI.as_bytes()),
            "application/json",
        )),
        (&Method::GET | &Method::HEAD, p) if p.starts_with(FILES_PREFIX) => {
            file(state, &req, &p[FILES_PREFIX.len()..]).await
        }
        (
            _,
            "/v1/images/generations"
            | "/v1/images/edits"
            | "/v1/images/variations"
            | "/v1/models"
            | "/healthz"
            | "/readyz",
        ) => Err(ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("Method {} is not allowed for {path}.", req.method()),
        )),
        (method, _) => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("Invalid URL ({method} {path})"),
        )),
    }
}

pub(super) async fn authenticate(
    rt: &Runtime,
    req: &Request<Incoming>,
    log: &mut AccessLog,
) -> Result<Principal, ApiError> {
    let token = bearer_token(req.headers().get(http::header::AUTHORIZATION))?;
    let principal = rt.keys.authenticate(token).await?;
    log.key_id = Some(principal.key_id.clone());
    log.tenant = Some(principal.tenant.clone());
    Ok(principal)
}

fn require_json(req: &Request<Incoming>) -> Result<(), ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        let shown = if content_type.is_empty() {
            "none"
        } else {
            content_type
        };
        Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "Invalid Content-Type header ({shown}): this endpoint expects application/json."
            ),
        ))
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("The request body exceeds the maximum size of {limit} bytes."),
    )
    .code("request_too_large")
}

/// The body length a request declares (`Content-Length`), if it is a number.
pub(super) fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A JSON request's body, whole: over `server.max_body_bytes` is 413, not in within
/// `server.body_timeout` is 408 (a client trickling a body holds a connection, not the gateway).
pub(super) async fn read_body(
    req: Request<Incoming>,
    server: &crate::config::ServerConfig,
) -> Result<Bytes, ApiError> {
    let limit = server.max_body_bytes;
    if declared_length(&req).is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    let read = Limited::new(req.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(server.body_timeout, read).await else {
        return Err(ApiError::new(
            ErrorKind::RequestTimeout,
            format!(
                "The request body was not received within {} seconds.",
                server.body_timeout.as_secs()
            ),
        )
        .code("request_timeout"));
    };
    match read {
        // A body that came in one read with its head is a view of hyper's read buffer:
        // copied, so the buffer is not pinned while the request waits on its upstream (hyper
        // would then take another 8 KiB for the connection's next read; bench/README.md,
        // "Memory per request in flight"). Bodies of several reads are already their own.
        Ok(collected) => Ok(Bytes::copy_from_slice(&collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(_) => Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "The request body could not be read.",
        )),
    }
}

/// The route of the model a request names, once the caller may use it (a model it may not
/// use is as unknown as one that does not exist: 404, so names do not leak).
pub(super) fn model_route<'r>(
    rt: &'r Runtime,
    principal: &Principal,
    model_name: &str,
    log: &mut AccessLog,
) -> Result<&'r crate::routing::ModelRoute, ApiError> {
    log.model = Some(model_name.to_string());
    let Some(route) = rt.router.model(model_name) else {
        return Err(shut_down(rt, principal, model_name)
            .unwrap_or_else(|| ApiError::model_not_found(model_name)));
    };
    rt.policy.check_model(principal, model_name)?;
    log.route = Some(route.name.clone());
    Ok(route)
}

/// A 400 when the model's rules do not list `operation` (the catalog's `operations`).
pub(super) fn serves(
    route: &crate::routing::ModelRoute,
    operation: api::Operation,
) -> Result<(), ApiError> {
    if route.rules.serves(operation) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "model",
        format!(
            "The model '{}' does not do image {}s.",
            route.name,
            operation.as_str()
        ),
    )
    .code("operation_not_supported"))
}

/// The 404 of a model this gateway does not route and the catalog says is shut down: it names
/// the date and the replacement (and whether this key can use the replacement here).
fn shut_down(rt: &Runtime, principal: &Principal, model: &str) -> Option<ApiError> {
    let entry = rt.config.catalog.get(model)?;
    let date = entry.lifecycle.shutdown_date.as_deref()?;
    if !entry.is_shut_down(&crate::clock::today()) {
        return None;
    }
    let mut message = format!("The model `{model}` was shut down on {date}.");
    if let Some(r) = &entry.lifecycle.replacement {
        let here = rt.router.model(r).is_some() && principal.may_use(r);
        message.push_str(&format!(
            " Use `{r}` instead{}.",
            if here { " (served here)" } else { "" }
        ));
    }
    Some(
        ApiError::new(ErrorKind::NotFound, message)
            .param("model")
            .code("model_not_found"),
    )
}

/// The checked `Idempotency-Key` header, if any.
pub(super) fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>, ApiError> {
    req.headers()
        .get("idempotency-key")
        .map(idempotency::check_key)
        .transpose()
}

/// `POST /v1/images/generations`.
async fn generations(
    state: &Arc<AppState>,
    req: Box<Request<Incoming>>,
    request_id: &str,
    log: &mut AccessLog,
) -> Result<Response<Body>, ApiError> {
    // One config snapshot for the whole request.
    let rt = state.runtime.load_full();
    let principal = authenticate(&rt, &req, log).await?;
    require_json(&req)?;
    let idem_key = idempotency_key(&req)?;
    let body = read_body(*req, &rt.config.server).await?;
    generate(state, &rt, &principal, body, idem_key, request_id, log).await
}

/// A generation's body, parsed, checked against its model's rules and run.
async fn generate(
    state: &Arc<AppState>,
    rt: &Runtime,
    principal: &Principal,
    body: Bytes,
    idem_key: Option<String>,
    request_id: &str,
    log: &mut AccessLog,
) -> Result<Response<Body>, ApiError> {
    let (route, request) = validated(rt, principal, &body, log)?;
    let idempotency = idem_key.as_deref().map(|key| (key, &body[..]));
    super::pipeline::run(
        state,
        rt,
        principal,
        route,
        request,
        idempotency,
        request_id,
        log,
    )
    .await
}

/// A generation's body, parsed and checked against its model's rules. Apart from
/// [`generate`], so the parsed body is gone before the request waits on its upstream: a local
/// borrowed in an async fn keeps its slot in the future until its scope ends.
fn validated<'r>(
    rt: &'r Runtime,
    principal: &Principal,
    body: &[u8],
    log: &mut AccessLog,
) -> Result<(&'r crate::routing::ModelRoute, api::ImageRequest), ApiError> {
    let raw = api::parse_request(body)?;
    let route = model_route(rt, principal, raw.model(), log)?;
    serves(route, api::Operation::Generation)?;
    Ok((route, raw.validate(&route.rules)?))
}

fn model_object(rt: &Runtime, id: &str) -> ModelObject {
    ModelObject {
        id: id.to_string(),
        object: "model",
        created: rt.created,
        owned_by: "imagegate".to_string(),
        shutdown_date: rt
            .config
            .catalog
            .get(id)
            .and_then(|e| e.lifecycle.shutdown_date.clone()),
    }
}

/// `GET /v1/models`: exactly the models this key may use.
async fn models(
    state: &Arc<AppState>,
    req: &Request<Incoming>,
    log: &mut AccessLog,
) -> Result<Response<Body>, ApiError> {
    let rt = state.runtime.load_full();
    let principal = authenticate(&rt, req, log).await?;
    let mut ids: Vec<&str> = rt
        .router
        .model_names()
        .filter(|m| principal.may_use(m))
        .collect();
    ids.sort_unstable();
    let list = ModelList {
        object: "list",
        data: ids.into_iter().map(|id| model_object(&rt, id)).collect(),
    };
    Ok(respond::json(StatusCode::OK, &list))
}

/// `GET /v1/models/{id}`.
async fn model(
    state: &Arc<AppState>,
    req: &Request<Incoming>,
    id: &str,
    log: &mut AccessLog,
) -> Result<Response<Body>, ApiError> {
    let rt = state.runtime.load_full();
    let principal = authenticate(&rt, req, log).await?;
    let id = percent_decode(id);
    if rt.router.model(&id).is_none() || !principal.may_use(&id) {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(respond::json(StatusCode::OK, &model_object(&rt, &id)))
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Ready while not draining and every model has an available target; the body lists each
/// backend's state either way.
fn readyz(state: &AppState) -> Response<Body> {
    let rt = state.runtime.load();
    let now = Instant::now();
    let draining = state.draining.load(Ordering::SeqCst);
    let unavailable = rt.router.unavailable_models(now);
    let (status, word) = if draining {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !unavailable.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    } else {
        (StatusCode::OK, "ready")
    };
    respond::json(
        status,
        &json!({
            "status": word,
            "unavailable_models": unavailable,
            "backends": rt.router.backend_states(now),
        }),
    )
}

/// `GET /images/{name}?expires=..&signature=..`: a hosted image behind a signed link.
async fn file(
    state: &Arc<AppState>,
    req: &Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let image = state.images.serve(name, req.uri().query()).await?;
    let not_modified = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == image.etag));
    let mut resp = if not_modified {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        respond::with_type(StatusCode::OK, image.bytes, image.content_type)
    };
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&image.etag) {
        headers.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("private, max-age={}", image.max_age.as_secs())) {
        headers.insert(CACHE_CONTROL, v);
    }
    Ok(resp)
}
