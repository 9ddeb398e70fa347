//! One pool of targets and the life of one dispatch over it: pick a target (tiers by
//! `priority`, then `weighted` or `least_outstanding` within the tier), wait for its capacity
//! (fairly, by tenant and class), call it, and on a retryable failure move to another target,
//! within `max_attempts` and the request's deadline.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::Instrument;

use super::capacity::{self, Busy};
use super::fair::Caller;
use super::health::{Outcome, Permit, Unavailable};
use super::Target;
use crate::api::{ApiError, ErrorKind, ImageRequest};
use crate::backends::{BackendError, EventStream, Generation, UpstreamCall};
use crate::config::{ImageUrlPolicy, RetryOn, Strategy};
use crate::metering::PriceTable;

/// A route's targets (sorted by priority) and how it uses them.
pub struct Pool {
    pub targets: Vec<Target>,
    pub strategy: Strategy,
    pub max_attempts: u32,
    pub retry_on: HashSet<RetryOn>,
}

/// What a dispatch produced: whole images, or server-sent events relayed as they arrive.
pub enum Output {
    Images(Generation),
    Events(EventStream),
}

/// Keeps a backend's capacity slot for as long as its event stream runs.
struct Guarded {
    inner: EventStream,
    _slot: capacity::Slot,
}

impl futures_core::Stream for Guarded {
    type Item = bytes::Bytes;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().inner.as_mut().poll_next(cx)
    }
}

/// The result of one dispatch, with what ops need to know about it.
pub struct Dispatch {
    pub result: Result<Output, ApiError>,
    /// The backend that answered (or failed last).
    pub backend: Option<Arc<str>>,
    pub attempts: u32,
    /// How the answering backend's image URLs are treated.
    pub url_policy: Option<Arc<ImageUrlPolicy>>,
    /// What the answer cost us on the answering target.
    pub upstream_price: Option<Arc<PriceTable>>,
    /// Time spent in upstream calls (the rest is the gateway's overhead).
    pub upstream_time: Duration,
}

impl Pool {
    /// Whether some target's backend can serve `operation` at all.
    pub fn can(&self, operation: crate::api::Operation) -> bool {
        self.targets.iter().any(|t| t.backend.can(operation))
    }

    /// Whether some target could take a request now.
    pub fn available(&self, now: Instant) -> bool {
        self.targets
            .iter()
            .any(|t| t.health.availability(now).is_ok())
    }

    /// Picks and claims a target not yet `tried`: the lowest tier with an available target,
    /// then by strategy within it. `Err` carries the earliest time one becomes available.
    pub(super) fn select(
        &self,
        tried: &mut [bool],
        now: Instant,
    ) -> Result<(usize, Permit), Option<Instant>> {
        let mut earliest: Option<Instant> = None;
        let mut start = 0;
        while start < self.targets.len() {
            let tier = self.targets[start].priority;
            let end = start
                + self.targets[start..]
                    .iter()
                    .take_while(|t| t.priority == tier)
                    .count();
            // Claiming can race with other requests; retry within the tier until it is empty.
            loop {
                let candidates: Vec<usize> = (start..end)
                    .filter(|&i| !tried[i])
                    .filter(|&i| match self.targets[i].health.availability(now) {
                        Ok(()) => true,
                        Err(Unavailable::Ejected(t) | Unavailable::Throttled(t)) => {
                            earliest = Some(earliest.map_or(t, |e| e.min(t)));
                            false
                        }
                        Err(Unavailable::Probing | Unavailable::ProbeFailed) => false,
                    })
                    .collect();
                if candidates.is_empty() {
                    break;
                }
                let i = self.choose(&candidates);
                match self.targets[i].health.acquire(now) {
                    Ok(permit) => return Ok((i, permit)),
                    Err(_) => tried[i] = true,
                }
            }
            start = end;
        }
        Err(earliest)
    }

    fn choose(&self, candidates: &[usize]) -> usize {
        let mut rng = rand::rng();
        let weight = |i: usize| u64::from(self.targets[i].weight);
        let mut by_weight = |pool: &[usize]| {
            let total: u64 = pool.iter().map(|&i| weight(i)).sum();
            let mut roll = rng.random_range(0..total.max(1));
            for &i in pool {
                if roll < weight(i) {
                    return i;
                }
                roll -= weight(i);
            }
            pool[0]
        };
        let a = by_weight(candidates);
        if self.strategy == Strategy::Weighted || candidates.len() == 1 {
            return a;
        }
        // Power of two choices: a second, distinct candidate, also drawn by weight; the one
        // with less load per unit of weight, (in_flight + 1) / weight, wins (ties: the first).
        let rest: Vec<usize> = candidates.iter().copied().filter(|&i| i != a).collect();
        let b = by_weight(&rest);
        let load = |i: usize| u64::from(self.targets[i].health.in_flight()) + 1;
        if load(b) * weight(a) < load(a) * weight(b) {
            b
        } else {
            a
        }
    }

    fn retryable(&self, e: &BackendError) -> bool {
        let class = match e {
            BackendError::Rejected { .. } => return false,
            BackendError::Connect(_) => RetryOn::Connect,
            BackendError::Timeout => RetryOn::Timeout,
            BackendError::RateLimited { .. } => RetryOn::RateLimited,
            BackendError::Status { .. }
            | BackendError::BadResponse(_)
            | BackendError::Workflow(_) => RetryOn::ServerError,
            BackendError::Unauthorized { .. } | BackendError::Exhausted(_) => RetryOn::UpstreamAuth,
        };
        self.retry_on.contains(&class)
    }

    /// Sends the request to the pool: at most `max_attempts` calls, each to a different target,
    /// all inside `deadline`. 4xx answers of the upstream's own are never retried.
    pub async fn dispatch(
        &self,
        request: &ImageRequest,
        caller: &Caller,
        request_id: &str,
        deadline: Instant,
        stream: bool,
    ) -> Dispatch {
        // A target that cannot serve this operation counts as tried already.
        let operation = request.operation();
        let mut tried: Vec<bool> = self
            .targets
            .iter()
            .map(|t| !t.backend.can(operation))
            .collect();
        let mut attempts = 0;
        let mut busy = false;
        // The soonest a shedding backend expects to have room, for `retry-after`.
        let mut shed_for: Option<Duration> = None;
        let mut upstream_time = Duration::ZERO;
        let mut last: Option<(Arc<str>, BackendError)> = None;
        while attempts < self.max_attempts {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let (index, permit) = match self.select(&mut tried, now) {
                Ok(picked) => picked,
                Err(earliest) => {
                    if attempts == 0 {
                        let error = if busy {
                            at_capacity(&request.model, shed_for)
                        } else {
                            no_target(&request.model, earliest, now)
                        };
                        return Dispatch {
                            result: Err(error),
                            backend: None,
                            attempts,
                            url_policy: None,
                            upstream_price: None,
                            upstream_time,
                        };
                    }
                    break;
                }
            };
            tried[index] = true;
            let target = &self.targets[index];
            // A full node sends the request to another target of the pool, not to a 503.
            let slot = match target.capacity.acquire(caller, deadline).await {
                Ok((slot, waited)) => {
                    if !waited.is_zero() {
                        tracing::info!(request_id, backend = %target.backend_name, waited_ms = waited.as_millis() as u64, "waited for backend capacity");
                    }
                    slot
                }
                Err(why) => {
                    tracing::info!(
                        request_id,
                        backend = %target.backend_name,
                        reason = ?why,
                        queue_depth = target.capacity.queue_depth(),
                        "backend at capacity"
                    );
                    if let Busy::Shed { retry_after } = why {
                        shed_for = Some(shed_for.map_or(retry_after, |s| s.min(retry_after)));
                    }
                    busy = true;
                    drop(permit);
                    continue;
                }
            };
            attempts += 1;
            if attempts > 1 {
                crate::telemetry::metrics().failover(&request.model);
            }
            let attempt_span = tracing::info_span!(
                "upstream_attempt",
                backend = %target.backend_name,
                attempt = attempts
            );
            let trace_headers = crate::telemetry::trace_headers(&attempt_span);
            let call = UpstreamCall {
                request,
                upstream_model: target.upstream_model.as_deref(),
                request_id,
                deadline,
                dialect: target.dialect,
                translation: &target.translation,
                trace_headers: &trace_headers,
            };
            let started = Instant::now();
            let result = if stream {
                // Only the start of a stream is bounded here; the upstream call itself
                // carries the deadline for the rest.
                let attempt = target
                    .backend
                    .generate_stream(call)
                    .instrument(attempt_span);
                tokio::time::timeout_at(deadline.into(), attempt)
                    .await
                    .unwrap_or(Err(BackendError::Timeout))
                    .map(|events| {
                        Output::Events(Box::pin(Guarded {
                            inner: events,
                            _slot: slot,
                        }))
                    })
            } else {
                let attempt = target.backend.generate(call).instrument(attempt_span);
                let result = tokio::time::timeout_at(deadline.into(), attempt)
                    .await
                    .unwrap_or(Err(BackendError::Timeout))
                    .map(Output::Images);
                drop(slot);
                result
            };
            let took = started.elapsed();
            upstream_time += took;
            crate::telemetry::metrics().attempt(
                &target.series,
                outcome_label(&result.as_ref().map(|_| ())),
                took,
            );
            permit.record(Outcome::of(&result.as_ref().map(|_| ())));
            match result {
                Ok(output) => {
                    return Dispatch {
                        result: Ok(output),
                        backend: Some(target.backend_name.clone()),
                        attempts,
                        url_policy: Some(target.url_policy.clone()),
                        upstream_price: Some(target.upstream_price.clone()),
                        upstream_time,
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        request_id,
                        backend = %target.backend_name,
                        attempt = attempts,
                        error = %e,
                        "upstream attempt failed"
                    );
                    let retry = self.retryable(&e);
                    last = Some((target.backend_name.clone(), e));
                    if !retry {
                        break;
                    }
                }
            }
        }
        let (backend, error) = match last {
            Some((b, e)) => (Some(b), e.into()),
            None if busy && Instant::now() < deadline => {
                (None, at_capacity(&request.model, shed_for))
            }
            None => (None, BackendError::Timeout.into()),
        };
        Dispatch {
            result: Err(error),
            backend,
            attempts,
            url_policy: None,
            upstream_price: None,
            upstream_time,
        }
    }
}

/// The `outcome` label of an upstream attempt.
fn outcome_label(result: &Result<(), &BackendError>) -> &'static str {
    match result {
        Ok(()) => "success",
        Err(BackendError::Rejected { .. }) => "rejected",
        Err(BackendError::Timeout) => "timeout",
        Err(BackendError::Connect(_)) => "connect_error",
        Err(BackendError::RateLimited { .. }) => "rate_limited",
        Err(BackendError::Unauthorized { .. }) => "auth_error",
        Err(BackendError::Exhausted(_)) => "credits_exhausted",
        Err(BackendError::Workflow(_)) => "workflow_error",
        Err(BackendError::Status { .. } | BackendError::BadResponse(_)) => "server_error",
    }
}

fn no_target(model: &str, earliest: Option<Instant>, now: Instant) -> ApiError {
    let after = earliest
        .map(|t| t.saturating_duration_since(now))
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(100));
    ApiError::new(
        ErrorKind::Unavailable,
        format!("No backend is available for the model `{model}` right now. Please retry later."),
    )
    .code("no_backend_available")
    .retry_after(after)
}

/// Every target full, or (`shed`) its queue too long to finish before the deadline: then
/// `retry-after` is the expected wait.
fn at_capacity(model: &str, shed: Option<Duration>) -> ApiError {
    let message = match shed {
        Some(wait) => format!(
            "Every backend for the model `{model}` is busy: the wait (about {} s) would pass \
             this request's deadline. Please retry later.",
            wait.as_secs_f64().ceil() as u64
        ),
        None => {
            format!("Every backend for the model `{model}` is at capacity. Please retry shortly.")
        }
    };
    ApiError::new(ErrorKind::Unavailable, message)
        .code("backend_busy")
        .retry_after(shed.unwrap_or(Duration::from_secs(1)))
}
