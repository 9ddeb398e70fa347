//! `POST /v1/images/edits` and `POST /v1/images/variations` up to validation (from there
//! `pipeline::run` serves them as it serves a generation), and the bound on the bytes of
//! uploads held at once: an upload reserves what it declares (or the largest upload, when it
//! declares nothing) before it is read, and gives it back when its request ends. One that
//! would pass `server.max_upload_memory` gets a 503 with `retry-after`, so a burst of large
//! uploads cannot take the process's memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiError, ErrorKind};
use futures_util::StreamExt;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body_util::BodyStream;
use hyper::body::Incoming;

use super::handlers::{authenticate, idempotency_key, model_route, AccessLog};
use super::pipeline::run;
use super::respond::Body;
use super::state::AppState;
use crate::api::{self, Operation};

/// `POST /v1/images/edits` and `POST /v1/images/variations`: a multipart upload, read as it
/// arrives within `server.max_upload_bytes` and the memory all uploads may hold, then the same
/// pipeline as a generation.
pub(super) async fn handle(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    request_id: &str,
    log: &mut AccessLog,
    operation: Operation,
) -> Result<Response<Body>, ApiError> {
    let rt = state.runtime.load_full();
    let principal = authenticate(&rt, &req, log).await?;
    let boundary = api::edit::boundary(
        req.headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    let idem_key = idempotency_key(&req)?;
    let server = &rt.config.server;
    let limit = server.max_upload_bytes;
    // `received` holds the upload's memory until the request ends.
    let (frames, received) = receive(state, server, req, limit)?;
    let form = api::edit::read_form(frames, &boundary, limit as u64)
        .await
        .map_err(|e| received.or_slow(server, e))?;
    serve_form(
        state, &rt, &principal, form, idem_key, request_id, log, operation,
    )
    .await
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upload's body, as the multipart reader takes it.
pub(super) type Frames =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, BoxError>> + Send>>;

/// An upload being received: its share of `server.max_upload_memory` (given back on drop) and
/// whether it was cut for its pace.
pub(super) struct Received {
    slow: Arc<AtomicBool>,
    _held: UploadPermit,
}

impl Received {
    /// The error reading the upload ended with: 408 if it was cut for its pace, else `other`.
    pub(super) fn or_slow(
        &self,
        server: &crate::config::ServerConfig,
        other: ApiError,
    ) -> ApiError {
        if self.slow.load(Ordering::Relaxed) {
            too_slow(server)
        } else {
            other
        }
    }
}

/// Admits a multipart upload (edits, variations, batch files): one that declares more than
/// `limit` bytes is 413 before a byte is read; its declared size (or `limit`) is reserved from
/// `server.max_upload_memory` (503 `uploads_busy` past it); its body must keep the upload pace.
pub(super) fn receive(
    state: &AppState,
    server: &crate::config::ServerConfig,
    req: Request<Incoming>,
    limit: usize,
) -> Result<(Frames, Received), ApiError> {
    let declared = super::handlers::declared_length(&req);
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(api::edit::too_large(limit as u64));
    }
    let reserve = declared.map_or(limit, |len| len as usize);
    let held = state.uploads.reserve(reserve, server.max_upload_memory)?;
    let frames = BodyStream::new(req.into_body()).filter_map(|frame| {
        std::future::ready(match frame {
            Ok(frame) => frame.into_data().ok().map(Ok),
            Err(e) => Some(Err(e)),
        })
    });
    let slow = Arc::new(AtomicBool::new(false));
    let frames = paced(
        frames,
        server.body_timeout,
        server.min_upload_rate,
        slow.clone(),
    );
    Ok((Box::pin(frames), Received { slow, _held: held }))
}

/// `frames`, cut off once they arrive slower than the upload pace allows: the whole body must
/// be in within `grace` plus one second per `min_rate` bytes received so far (Apache's
/// `mod_reqtimeout` rule, `body=grace,MinRate=min_rate`). A client trickling bytes would
/// otherwise hold its share of `server.max_upload_memory` for as long as it liked. When cut,
/// `slow` is set and the stream ends in an error.
fn paced<S, E>(
    frames: S,
    grace: Duration,
    min_rate: u64,
    slow: Arc<AtomicBool>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, BoxError>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    E: Into<BoxError>,
{
    let start = tokio::time::Instant::now();
    let state = (Box::pin(frames), 0u64, false);
    futures_util::stream::unfold(state, move |(mut frames, received, ended)| {
        let slow = slow.clone();
        async move {
            if ended {
                return None;
            }
            let next = if min_rate == 0 {
                frames.next().await
            } else {
                let allowed = grace + Duration::from_secs_f64(received as f64 / min_rate as f64);
                match tokio::time::timeout_at(start + allowed, frames.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        slow.store(true, Ordering::Relaxed);
                        let cut: BoxError = "the upload arrived too slowly".into();
                        return Some((Err(cut), (frames, received, true)));
                    }
                }
            };
            match next {
                None => None,
                Some(Ok(bytes)) => {
                    let received = received + bytes.len() as u64;
                    Some((Ok(bytes), (frames, received, false)))
                }
                Some(Err(e)) => Some((Err(e.into()), (frames, received, true))),
            }
        }
    })
}

fn too_slow(server: &crate::config::ServerConfig) -> ApiError {
    ApiError::new(
        ErrorKind::RequestTimeout,
        format!(
            "The upload arrived too slowly: it must be in within {} seconds plus one second per {} bytes.",
            server.body_timeout.as_secs(),
            server.min_upload_rate
        ),
    )
    .code("request_timeout")
}

/// An upload's form, read: the model's rules, then the pipeline every request shares.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve_form(
    state: &Arc<AppState>,
    rt: &super::state::Runtime,
    principal: &crate::auth::Principal,
    form: api::edit::Form,
    idem_key: Option<String>,
    request_id: &str,
    log: &mut AccessLog,
    operation: Operation,
) -> Result<Response<Body>, ApiError> {
    let model_name = form.model().to_string();
    let route = model_route(rt, principal, &model_name, log)?;
    super::handlers::serves(route, operation)?;
    if !route.can(operation) {
        return Err(ApiError::invalid(
            "model",
            format!(
                "The model '{model_name}' cannot serve image {}s here: none of its backends can.",
                operation.as_str()
            ),
        )
        .code("operation_not_supported"));
    }
    let fingerprint = form.fingerprint().to_vec();
    let request = match operation {
        Operation::Variation => form.into_variation()?,
        _ => form.into_edit(&route.rules)?,
    };
    let idempotency = idem_key.as_deref().map(|key| (key, &fingerprint[..]));
    run(
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

#[derive(Default)]
pub struct UploadGate {
    held: Arc<AtomicUsize>,
}

/// Bytes reserved by one upload, given back on drop.
#[derive(Debug)]
pub struct UploadPermit {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl UploadGate {
    /// Reserves `bytes` if the total stays within `max`.
    pub fn reserve(&self, bytes: usize, max: usize) -> Result<UploadPermit, ApiError> {
        let mut now = self.held.load(Ordering::Acquire);
        loop {
            if now.saturating_add(bytes) > max {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    "The gateway is receiving as many uploads as it can hold; please retry shortly.",
                )
                .code("uploads_busy")
                .retry_after(Duration::from_secs(1)));
            }
            match self.held.compare_exchange_weak(
                now,
                now + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(UploadPermit {
                        held: self.held.clone(),
                        bytes,
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// Bytes reserved right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_past_the_limit_are_refused_until_one_ends() {
        let gate = UploadGate::default();
        let a = gate.reserve(600, 1000).unwrap();
        let refused = gate.reserve(500, 1000).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Unavailable);
        let b = gate.reserve(400, 1000).unwrap();
        assert_eq!(gate.held(), 1000);
        drop(a);
        assert_eq!(gate.held(), 400);
        gate.reserve(600, 1000).unwrap();
        drop(b);
        assert_eq!(gate.held(), 0, "every permit gave its bytes back");
    }
}
