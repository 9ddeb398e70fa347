//! Model name -> a pool of targets, and the life of one upstream dispatch: pick a target
//! (tiers by `priority`, then `weighted` or `least_outstanding` within the tier), call it, and
//! on a retryable failure move to another target, within `max_attempts` and the request's
//! deadline. Every attempt's outcome feeds the backend's passive health ([`health`]).

pub mod capacity;
pub mod fair;
pub mod health;
mod pool;

pub use fair::{Caller, Class};
pub use pool::{Dispatch, Output, Pool};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{ImageRequest, ModelRules};
use crate::backends::translate::Translation;
use crate::backends::Backend;
use crate::config::{Config, ConfigError, Dialect, ImageUrlPolicy};
use crate::metering::PriceTable;

use capacity::CapacityGate;
use health::{BackendHealth, HealthSnapshot};
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
    /// The route's targets for every caller no override selects.
    pub pool: Pool,
    /// Pools for the tenants (or tenant labels) an override names, first match wins.
    pub overrides: Vec<Override>,
}

/// Targets a route uses for some tenants instead of its own (`plan: gold` -> OpenAI).
pub struct Override {
    pub tenants: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub pool: Pool,
}

impl Override {
    fn selects(&self, tenant: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant))
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl ModelRoute {
    /// The pool that serves this tenant.
    pub fn pool_for(&self, tenant: &str, labels: &BTreeMap<String, String>) -> &Pool {
        self.overrides
            .iter()
            .find(|o| o.selects(tenant, labels))
            .map_or(&self.pool, |o| &o.pool)
    }

    /// Every pool, the route's own first.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        std::iter::once(&self.pool).chain(self.overrides.iter().map(|o| &o.pool))
    }

    /// Sends the request to the pool that serves `caller` (see [`Pool::dispatch`]).
    pub async fn dispatch(
        &self,
        request: &ImageRequest,
        caller: &Caller,
        labels: &BTreeMap<String, String>,
        request_id: &str,
        deadline: Instant,
        stream: bool,
    ) -> Dispatch {
        self.pool_for(&caller.tenant, labels)
            .dispatch(request, caller, request_id, deadline, stream)
            .await
    }

    /// The default pool's targets.
    pub fn targets(&self) -> &[Target] {
        &self.pool.targets
    }

    /// Whether some pool's backend can serve `operation` at all.
    pub fn can(&self, operation: crate::api::Operation) -> bool {
        self.pools().any(|p| p.can(operation))
    }

    /// Whether some target could take a request now.
    pub fn available(&self, now: Instant) -> bool {
        self.pools().any(|p| p.available(now))
    }
}

/// One backend's state as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendState {
    #[serde(flatten)]
    pub health: HealthSnapshot,
    pub queue_depth: u32,
    /// Waiting requests by tenant (only tenants with some).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub queued_by_tenant: BTreeMap<String, usize>,
    /// The moving average of a job's time on the backend, once one has finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_time_ms: Option<u64>,
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
                    Arc::new(CapacityGate::with_policy(
                        name,
                        c.capacity(),
                        capacity::QueuePolicy {
                            fair: config.server.fair_queues,
                            shed: config.server.shed_before_deadline,
                        },
                    )),
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
            let pool = |path: String,
                        targets: &[crate::config::TargetConfig],
                        strategy: crate::config::Strategy,
                        max_attempts: Option<u32>|
             -> Result<Pool, Vec<ConfigError>> {
                let mut built = targets
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
                                path.clone(),
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
                if built.is_empty() {
                    return Err(vec![ConfigError::new(
                        path,
                        "a route needs at least one target",
                    )]);
                }
                built.sort_by_key(|t| t.priority);
                let max_attempts = max_attempts.unwrap_or(3).clamp(1, built.len() as u32);
                Ok(Pool {
                    targets: built,
                    strategy,
                    max_attempts,
                    retry_on: m.route.retry_on.iter().copied().collect(),
                })
            };
            let own = pool(
                format!("models.{name}.route.targets"),
                &m.route.targets,
                m.route.strategy,
                m.route.max_attempts,
            )?;
            let overrides = m
                .route
                .overrides
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    Ok(Override {
                        tenants: o.tenants.clone(),
                        labels: o.labels.clone(),
                        pool: pool(
                            format!("models.{name}.route.overrides[{i}].targets"),
                            &o.targets,
                            o.strategy.unwrap_or(m.route.strategy),
                            o.max_attempts.or(m.route.max_attempts),
                        )?,
                    })
                })
                .collect::<Result<Vec<_>, Vec<ConfigError>>>()?;
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
                    pool: own,
                    overrides,
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
                let gate = self.capacity.get(name);
                let state = BackendState {
                    health: h.snapshot(now),
                    queue_depth: gate.map_or(0, |c| c.queue_depth()),
                    queued_by_tenant: gate.map(|c| c.queued_by_tenant()).unwrap_or_default(),
                    job_time_ms: gate
                        .and_then(|c| c.job_time())
                        .map(|t| t.as_millis() as u64),
                };
                (name.as_str(), state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
