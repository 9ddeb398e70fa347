//! Prometheus metrics, served on the admin listener's `/metrics`. Labels are bounded: model,
//! backend, tenant (can be switched off), status class, outcome — never a key or a prompt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

// Label values the request path already holds are `Arc<str>` (the route's model name, the
// principal's tenant, the target's backend name): a label set costs reference counts, not a
// `String` per label per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: Arc<str>,
    /// `generation`, `edit`, `variation`, or `-` (`/v1/models`).
    operation: &'static str,
    status: &'static str,
    tenant: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    backend: Arc<str>,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    backend: Arc<str>,
    tenant: Arc<str>,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    backend: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    tenant: Arc<str>,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantModel {
    tenant: Arc<str>,
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~200 s
    Histogram::new(exponential_buckets(0.0001, 2.5, 17))
}

fn overhead_histogram() -> Histogram {
    // 10 µs .. ~1.3 s
    Histogram::new(exponential_buckets(0.00001, 2.2, 16))
}

pub struct Metrics {
    registry: Registry,
    tenant_label: AtomicBool,
    requests: Family<RequestLabels, Counter>,
    overhead: Histogram,
    upstream_latency: HistogramFamily<BackendLabel>,
    attempts: Family<AttemptLabels, Counter>,
    failovers: Family<ModelLabel, Counter>,
    ejections: Family<BackendLabel, Counter>,
    queue_depth: Family<BackendLabel, Gauge>,
    queue_depth_by_class: Family<ClassLabels, Gauge>,
    queue_wait: HistogramFamily<QueueLabels>,
    queue_shed: Family<QueueLabels, Counter>,
    batches: Family<ResultLabel, Counter>,
    batch_lines: Family<ResultLabel, Counter>,
    in_flight: Gauge,
    rate_limited: Family<LimitLabels, Counter>,
    over_budget: Family<LimitLabels, Counter>,
    images: Family<ModelLabel, Counter>,
    spend: Family<TenantModel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    ledger_rows: Family<ResultLabel, Counter>,
    ledger_batches: Family<ResultLabel, Counter>,
    redis_failures: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("imagegate");
        let m = Metrics {
            tenant_label: AtomicBool::new(true),
            requests: Family::default(),
            overhead: overhead_histogram(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            attempts: Family::default(),
            failovers: Family::default(),
            ejections: Family::default(),
            queue_depth: Family::default(),
            queue_depth_by_class: Family::default(),
            queue_wait: Family::new_with_constructor(latency_histogram),
            queue_shed: Family::default(),
            batches: Family::default(),
            batch_lines: Family::default(),
            in_flight: Gauge::default(),
            rate_limited: Family::default(),
            over_budget: Family::default(),
            images: Family::default(),
            spend: Family::default(),
            reloads: Family::default(),
            ledger_rows: Family::default(),
            ledger_batches: Family::default(),
            redis_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by model, status class and tenant",
            m.requests.clone(),
        );
        registry.register(
            "gateway_overhead_seconds",
            "Time spent in the gateway itself (total minus upstream)",
            m.overhead.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Upstream call latency by backend",
            m.upstream_latency.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Upstream attempts by backend and outcome",
            m.attempts.clone(),
        );
        registry.register(
            "failovers",
            "Requests moved to another target after a failure",
            m.failovers.clone(),
        );
        registry.register(
            "ejections",
            "Backends ejected by passive health",
            m.ejections.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for backend capacity",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_depth_by_class",
            "Requests waiting for backend capacity, by class (interactive, batch)",
            m.queue_depth_by_class.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time spent waiting for backend capacity, by backend, tenant and class",
            m.queue_wait.clone(),
        );
        registry.register(
            "queue_shed",
            "Requests refused at once because their wait would pass their deadline (or a \
             higher class needed the place)",
            m.queue_shed.clone(),
        );
        registry.register(
            "batches_finished",
            "Batches finalized, by final status",
            m.batches.clone(),
        );
        registry.register(
            "batch_lines",
            "Batch lines run, by outcome (completed, failed)",
            m.batch_lines.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being handled",
            m.in_flight.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "ledger_rows",
            "Usage ledger rows written (result=ok) or not written after retries (result=error)",
            m.ledger_rows.clone(),
        );
        registry.register(
            "ledger_batches",
            "Usage ledger transactions (group commits)",
            m.ledger_batches.clone(),
        );
        registry.register(
            "redis_failures",
            "Limit checks that could not reach Redis (the failure policy applied)",
            m.redis_failures.clone(),
        );
        registry.register(
            "over_budget",
            "Requests refused by an exhausted budget",
            m.over_budget.clone(),
        );
        registry.register(
            "images_generated",
            "Images delivered to clients",
            m.images.clone(),
        );
        registry.register(
            "spend_microdollars",
            "Spend in micro-dollars",
            m.spend.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn set_tenant_label(&self, on: bool) {
        self.tenant_label.store(on, Ordering::Relaxed);
    }

    /// The tenant label: the tenant, or `-` when tenant labels are off or there is none.
    fn tenant(&self, tenant: Option<&Arc<str>>) -> Arc<str> {
        match tenant {
            Some(t) if self.tenant_label.load(Ordering::Relaxed) => t.clone(),
            _ => dash(),
        }
    }

    /// A request's end. `model` is the route that served it: `None` (labelled `-`) when the
    /// request named no model this gateway routes, so clients cannot mint label values.
    pub fn request(
        &self,
        model: Option<&Arc<str>>,
        operation: &'static str,
        status: u16,
        tenant: Option<&Arc<str>>,
    ) {
        let labels = RequestLabels {
            model: model.cloned().unwrap_or_else(dash),
            operation,
            status: match status / 100 {
                1 => "1xx",
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            },
            tenant: self.tenant(tenant),
        };
        self.requests.get_or_create(&labels).inc();
    }

    pub fn overhead(&self, d: Duration) {
        self.overhead.observe(d.as_secs_f64());
    }

    /// The series of `backend` that every successful attempt touches (see
    /// [`BackendSeries`]).
    pub fn backend_series(&self, backend: &Arc<str>) -> BackendSeries {
        let latency = self.upstream_latency.get_or_create(&BackendLabel {
            backend: backend.clone(),
        });
        let successes = self.attempts.get_or_create(&AttemptLabels {
            backend: backend.clone(),
            outcome: "success",
        });
        BackendSeries {
            backend: backend.clone(),
            latency: latency.clone(),
            successes: successes.clone(),
        }
    }

    /// An upstream attempt of the backend whose series are `series`.
    pub fn attempt(&self, series: &BackendSeries, outcome: &'static str, latency: Duration) {
        series.latency.observe(latency.as_secs_f64());
        if outcome == "success" {
            series.successes.inc();
        } else {
            let labels = AttemptLabels {
                backend: series.backend.clone(),
                outcome,
            };
            self.attempts.get_or_create(&labels).inc();
        }
    }

    pub fn failover(&self, model: &str) {
        self.failovers
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .inc();
    }

    pub fn ejection(&self, backend: &str) {
        self.ejections
            .get_or_create(&BackendLabel {
                backend: backend.into(),
            })
            .inc();
    }

    pub fn queue_depth(&self, backend: &str, depth: u32) {
        self.queue_depth
            .get_or_create(&BackendLabel {
                backend: backend.into(),
            })
            .set(i64::from(depth));
    }

    pub fn queue_depth_of_class(&self, backend: &str, class: &'static str, depth: usize) {
        self.queue_depth_by_class
            .get_or_create(&ClassLabels {
                backend: backend.into(),
                class,
            })
            .set(depth as i64);
    }

    pub fn queue_wait(&self, backend: &str, tenant: &Arc<str>, class: &'static str, d: Duration) {
        self.queue_wait
            .get_or_create(&QueueLabels {
                backend: backend.into(),
                tenant: self.tenant(Some(tenant)),
                class,
            })
            .observe(d.as_secs_f64());
    }

    pub fn queue_shed(&self, backend: &str, tenant: &Arc<str>, class: &'static str) {
        self.queue_shed
            .get_or_create(&QueueLabels {
                backend: backend.into(),
                tenant: self.tenant(Some(tenant)),
                class,
            })
            .inc();
    }

    pub fn batch_finished(&self, status: &str) {
        self.batches
            .get_or_create(&ResultLabel {
                result: status.to_string(),
            })
            .inc();
    }

    pub fn batch_line(&self, outcome: &str) {
        self.batch_lines
            .get_or_create(&ResultLabel {
                result: outcome.to_string(),
            })
            .inc();
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    pub fn rate_limited(&self, tenant: &Arc<str>, limit: &str) {
        let labels = LimitLabels {
            tenant: self.tenant(Some(tenant)),
            limit: limit.to_string(),
        };
        self.rate_limited.get_or_create(&labels).inc();
    }

    pub fn over_budget(&self, tenant: &Arc<str>, scope: &str) {
        let labels = LimitLabels {
            tenant: self.tenant(Some(tenant)),
            limit: scope.to_string(),
        };
        self.over_budget.get_or_create(&labels).inc();
    }

    /// The counter of images delivered for `model`, looked up once per route.
    pub fn images_of(&self, model: &Arc<str>) -> Counter {
        self.images
            .get_or_create(&ModelLabel {
                model: model.clone(),
            })
            .clone()
    }

    pub fn ledger_batch(&self, rows: usize, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        let labels = ResultLabel {
            result: result.to_string(),
        };
        self.ledger_rows.get_or_create(&labels).inc_by(rows as u64);
        self.ledger_batches.get_or_create(&labels).inc();
    }

    pub fn redis_failure(&self) {
        self.redis_failures.inc();
    }

    pub fn spend(&self, tenant: &Arc<str>, model: &Arc<str>, micro_dollars: u64) {
        let labels = TenantModel {
            tenant: self.tenant(Some(tenant)),
            model: model.clone(),
        };
        self.spend.get_or_create(&labels).inc_by(micro_dollars);
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `-`, the label of an absent value (made once).
fn dash() -> Arc<str> {
    static DASH: OnceLock<Arc<str>> = OnceLock::new();
    DASH.get_or_init(|| Arc::from("-")).clone()
}

/// A backend's latency histogram and its `success` attempts counter, looked up once when the
/// router is built instead of hashing their label sets (SipHash) on every request. Families
/// never drop a series, so the handles stay the registry's across config reloads.
#[derive(Clone, Debug)]
pub struct BackendSeries {
    /// The backend's name, the label of its other outcomes' series.
    backend: Arc<str>,
    latency: Histogram,
    successes: Counter,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
