//! Model name -> a pool of targets, and the life of one upstream dispatch: pick a target
//! (tiers by `priority`, then `weighted` or `least_outstanding` within the tier), call it, and
//! on a retryable failure move to another target, within `max_attempts` and the request's
//! deadline. Every attempt's outcome feeds the backend's passive health ([`health`]).

pub mod capacity;
pub mod health;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::Instrument;

use crate::api::{ApiError, ErrorKind, ImageRequest, ModelRules};
use crate::backends::translate::Translation;
use crate::backends::{Backend, BackendError, EventStream, Generation, UpstreamCall};
use crate::config::{Config, ConfigError, Dialect, ImageUrlPolicy, RetryOn, Strategy};
use crate::metering::PriceTable;

use capacity::CapacityGate;
use health::{BackendHealth, HealthSnapshot, Outcome, Permit, Unavailable};
use serde::Serialize;

pub struct Target {
    pub backend_name: Arc<str>,
    /// The backend's metric series every successful attempt touches.
    pub series: crate::telemetry::BackendSeries,
    pub backend: Arc<dyn Backend>,
    pub health: Arc<BackendHealth>,
    pub capacity: Arc<CapacityGate>,
    pub url_policy: Arc<ImageUrlPolicy>,
    /// What an image costs us on this target (the ledger's upstream cost).
    pub upstream_price: Arc<PriceTable>,
    pub upstream_model: Option<String>,
    pub dialect: Dialect,
    pub translation: Arc<Translation>,
    pub weight: u32,
    pub priority: u32,
}

pub struct ModelRoute {
    /// The model's name (its metrics label).
    pub name: Arc<str>,
    /// Images delivered for this model (`imagegate_images_generated_total`).
    pub images: prometheus_client::metrics::counter::Counter,
    pub rules: ModelRules,
    pub prices: PriceTable,
    pub timeout: Duration,
    strategy: Strategy,
    max_attempts: u32,
    retry_on: HashSet<RetryOn>,
    /// Sorted by priority.
    targets: Vec<Target>,
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

impl ModelRoute {
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

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
    fn select(&self, tried: &mut [bool], now: Instant) -> Result<(usize, Permit), Option<Instant>> {
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
                            at_capacity(&request.model)
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
            let slot = match target.capacity.acquire(deadline).await {
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
            None if busy && Instant::now() < deadline => (None, at_capacity(&request.model)),
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

fn at_capacity(model: &str) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        format!("Every backend for the model `{model}` is at capacity. Please retry shortly."),
    )
    .code("backend_busy")
    .retry_after(Duration::from_secs(1))
}

/// One backend's state as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendState {
    #[serde(flatten)]
    pub health: HealthSnapshot,
    pub queue_depth: u32,
}

pub struct Router {
    models: crate::FastMap<String, ModelRoute>,
    /// Per backend, shared by every model routed to it. Sorted for stable output.
    health: BTreeMap<String, Arc<BackendHealth>>,
    capacity: HashMap<String, Arc<CapacityGate>>,
    backends: BTreeMap<String, Arc<dyn Backend>>,
    configs: BTreeMap<String, crate::config::BackendConfig>,
}

/// What an image costs us on a remote target by default: the catalog's price of the model the
/// target asks for (local nodes and unknown names: free).
fn catalog_price(config: &Config, t: &crate::config::TargetConfig, public: &str) -> PriceTable {
    use crate::config::BackendConfig as B;
    let local = matches!(
        config.backends.get(&t.backend),
        None | Some(B::Sandbox(_) | B::Automatic1111(_) | B::Comfyui(_))
    );
    if local {
        return PriceTable::default();
    }
    let name = t.model.as_deref().unwrap_or(public);
    config
        .catalog
        .get(name)
        .and_then(|e| e.price.as_ref())
        .and_then(|p| PriceTable::explicit(p, &config.catalog).ok())
        .unwrap_or_default()
}

/// What the compile step built for the router: each backend, and each model's prices.
pub struct RouterParts {
    pub backends: BTreeMap<String, Arc<dyn Backend>>,
    pub prices: HashMap<String, ModelPrices>,
}

/// What a model's images cost the tenant, and what they cost us upstream when the config
/// says (`upstream_price`; else each remote target's catalog price, see [`Router::build`]).
#[derive(Debug, Clone, Default)]
pub struct ModelPrices {
    pub charged: PriceTable,
    pub upstream: Option<PriceTable>,
}

impl Router {
    /// Builds every model's route from a checked config and the backends and prices the
    /// compile step built. A backend whose config did not change keeps its health and
    /// capacity state across a reload: an ejected backend stays ejected, queues keep their
    /// order.
    pub fn build(
        config: &Config,
        parts: RouterParts,
        previous: Option<&Router>,
    ) -> Result<Self, Vec<ConfigError>> {
        let RouterParts {
            backends,
            mut prices,
        } = parts;
        let kept = |name: &str| {
            let prev = previous?;
            (prev.configs.get(name)? == config.backends.get(name)?).then_some(prev)
        };
        let mut health: BTreeMap<String, Arc<BackendHealth>> = BTreeMap::new();
        let mut capacity: HashMap<String, Arc<CapacityGate>> = HashMap::new();
        for (name, c) in &config.backends {
            let reused = kept(name)
                .and_then(|p| Some((p.health.get(name)?.clone(), p.capacity.get(name)?.clone())));
            let (h, cap) = reused.unwrap_or_else(|| {
                (
                    BackendHealth::new(name, c.health().clone()),
                    Arc::new(CapacityGate::new(name, c.capacity())),
                )
            });
            health.insert(name.clone(), h);
            capacity.insert(name.clone(), cap);
        }
        let url_policies: HashMap<&str, Arc<ImageUrlPolicy>> = config
            .backends
            .iter()
            .map(|(name, c)| (name.as_str(), Arc::new(c.image_url_policy())))
            .collect();
        let mut models = crate::FastMap::default();
        for (name, m) in &config.models {
            let rules = m
                .rules
                .resolve(&config.catalog)
                .map_err(|e| vec![ConfigError::new(format!("models.{name}.rules"), e)])?;
            let ModelPrices { charged, upstream } = prices.remove(name).unwrap_or_default();
            let explicit = upstream.map(Arc::new);
            let mut targets = m
                .route
                .targets
                .iter()
                .map(|t| {
                    let upstream_price = explicit
                        .clone()
                        .unwrap_or_else(|| Arc::new(catalog_price(config, t, name)));
                    let (Some(backend), Some(h), Some(cap), Some(policy)) = (
                        backends.get(&t.backend),
                        health.get(&t.backend),
                        capacity.get(&t.backend),
                        url_policies.get(t.backend.as_str()),
                    ) else {
                        return Err(ConfigError::new(
                            format!("models.{name}.route.targets"),
                            format!("unknown backend \"{}\"", t.backend),
                        ));
                    };
                    Ok(Target {
                        series: crate::telemetry::metrics().backend_series(&h.name),
                        backend_name: h.name.clone(),
                        backend: backend.clone(),
                        health: h.clone(),
                        capacity: cap.clone(),
                        url_policy: policy.clone(),
                        upstream_price,
                        upstream_model: t.model.clone(),
                        dialect: t.dialect,
                        translation: Arc::new(Translation::from_config(&t.translation)),
                        weight: t.weight.max(1),
                        priority: t.priority,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()
                .map_err(|e| vec![e])?;
            if targets.is_empty() {
                return Err(vec![ConfigError::new(
                    format!("models.{name}.route.targets"),
                    "a route needs at least one target",
                )]);
            }
            targets.sort_by_key(|t| t.priority);
            let max_attempts = m
                .route
                .max_attempts
                .unwrap_or(3)
                .clamp(1, targets.len() as u32);
            // One `Arc` for the route's name and its metrics label.
            let model_name: Arc<str> = Arc::from(name.as_str());
            models.insert(
                name.clone(),
                ModelRoute {
                    images: crate::telemetry::metrics().images_of(&model_name),
                    name: model_name,
                    rules,
                    prices: charged,
                    timeout: m.timeout,
                    strategy: m.route.strategy,
                    max_attempts,
                    retry_on: m.route.retry_on.iter().copied().collect(),
                    targets,
                },
            );
        }
        Ok(Router {
            models,
            health,
            capacity,
            backends,
            configs: config.backends.clone().into_iter().collect(),
        })
    }

    /// Backends with an active probe, with the health state it feeds and its interval.
    pub fn probes(&self) -> Vec<(Arc<dyn Backend>, Arc<BackendHealth>, Duration)> {
        self.backends
            .iter()
            .filter_map(|(name, b)| {
                let interval = b.probe_interval()?;
                Some((b.clone(), self.health.get(name)?.clone(), interval))
            })
            .collect()
    }

    pub fn model(&self, name: &str) -> Option<&ModelRoute> {
        self.models.get(name)
    }

    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Models with no available target right now.
    pub fn unavailable_models(&self, now: Instant) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .models
            .iter()
            .filter(|(_, m)| !m.available(now))
            .map(|(n, _)| n.as_str())
            .collect();
        out.sort_unstable();
        out
    }

    pub fn backend_states(&self, now: Instant) -> BTreeMap<&str, BackendState> {
        self.health
            .iter()
            .map(|(name, h)| {
                let state = BackendState {
                    health: h.snapshot(now),
                    queue_depth: self.capacity.get(name).map_or(0, |c| c.queue_depth()),
                };
                (name.as_str(), state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
