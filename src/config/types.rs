//! The shape of gateway.yaml. Every key is documented in README.md ("Configuration").

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::backends::BackendConfig;
use super::models::ModelConfig;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Base of image URLs handed to clients; defaults to `http://{listen}`.
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub server: ServerConfig,
    /// JWT bearer auth (enterprise identity providers); off when absent.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Where tenants and `sk-ig-` keys live (the keys of gateway.yaml work in any case).
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub images: ImagesConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// TLS on the main listener (off when absent).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    /// Tenants' webhook endpoints (batch events).
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Catalog files merged over the built-in model catalog, in order (hot-reloaded).
    #[serde(default, rename = "catalog")]
    pub catalog_files: Vec<PathBuf>,
    /// The merged catalog (built when the config is loaded).
    #[serde(skip)]
    pub catalog: std::sync::Arc<super::Catalog>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

impl Config {
    /// `public_url` without a trailing slash.
    pub fn public_base(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// HS256 shared secret.
    #[serde(default)]
    pub hs256_secret: Option<Secret>,
    /// RS256/ES256 public keys as PEM files.
    #[serde(default)]
    pub public_keys: Vec<PathBuf>,
    /// A JWKS file (keys matched by `kid`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// Claim naming the tenant (gateway.yaml or store tenant).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Optional claim (array of model names) narrowing the tenant's models.
    #[serde(default = "default_models_claim")]
    pub models_claim: String,
    /// Optional claim (an object like a tenant's `limits`) with the token's own rate limits,
    /// applied on top of the tenant's.
    #[serde(default = "default_limits_claim")]
    pub limits_claim: String,
    /// A JWT whose `admin_claim` holds `admin_value` (string or array) may use the admin API.
    #[serde(default)]
    pub admin_claim: Option<String>,
    #[serde(default)]
    pub admin_value: Option<String>,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_tenant_claim() -> String {
    "tenant".to_string()
}
fn default_limits_claim() -> String {
    "limits".to_string()
}
fn default_models_claim() -> String {
    "models".to_string()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default)]
    pub store: StoreChoice,
    /// PostgreSQL URL for `store: postgres` (`postgres://user:pass@host/db`).
    #[serde(default)]
    pub postgres: Option<Secret>,
    /// How long a key looked up in the store is trusted before it is looked up again (changes
    /// made anywhere also drop it within a second).
    #[serde(default = "default_key_cache_ttl", deserialize_with = "duration")]
    pub key_cache_ttl: Duration,
    /// Redis for rate and concurrency limits shared by every replica.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(
        default = "default_idempotency_retention",
        deserialize_with = "duration"
    )]
    pub idempotency_retention: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0`.
    pub url: Secret,
    /// When Redis cannot be reached: `open` (each replica applies the limits locally, in
    /// process) or `closed` (refuse with 503).
    #[serde(default)]
    pub on_failure: RedisFailure,
    /// How long one limit check may wait for Redis before the failure policy applies.
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Prefix of every key imagegate writes.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    #[default]
    Open,
    Closed,
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(250)
}

fn default_redis_prefix() -> String {
    "imagegate:".into()
}

fn default_idempotency_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            store: StoreChoice::default(),
            postgres: None,
            key_cache_ttl: default_key_cache_ttl(),
            redis: None,
            idempotency_retention: default_idempotency_retention(),
        }
    }
}

fn default_key_cache_ttl() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreChoice {
    /// Only gateway.yaml's keys.
    None,
    /// `data_dir/imagegate.db` (the embedded default).
    #[default]
    Sqlite,
    Postgres,
}

/// The admin listener (`/metrics`), kept off the public port.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `null` turns the admin listener off.
    #[serde(default = "default_admin_listen")]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Hex SHA-256 of the admin tokens that may use `/admin/v1/` (`imagegate hash-key`).
    #[serde(default)]
    pub tokens_sha256: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            tls: None,
            tokens_sha256: Vec::new(),
        }
    }
}

/// The web console: the ops console on the admin listener (`/console/`) and the tenant portal
/// on the main listener (`/portal/`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The ops console (admin tokens or admin JWTs log in).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The tenant portal (API keys log in; off by default).
    #[serde(default)]
    pub portal: bool,
    /// How long a console session lasts.
    #[serde(default = "default_session_ttl", deserialize_with = "duration")]
    pub session_ttl: Duration,
    /// Marks session cookies `Secure` even on a plain-HTTP listener (set it behind a proxy
    /// that terminates TLS); a listener with TLS always does.
    #[serde(default)]
    pub secure_cookies: bool,
    /// Login attempts per minute from one address (each listener counts its own).
    #[serde(default = "default_login_attempts")]
    pub login_attempts_per_minute: u32,
}

fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}

fn default_login_attempts() -> u32 {
    10
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            portal: false,
            session_ttl: default_session_ttl(),
            secure_cookies: false,
            login_attempts_per_minute: default_login_attempts(),
        }
    }
}

/// PEM files of a listener's certificate chain and private key; re-read on every reload, so
/// renewed certificates are picked up without a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_admin_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 8081)))
}

/// Where the gateway may call tenants' webhook endpoints: public HTTPS addresses, unless
/// ops allow more (a local receiver in development).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Allow loopback, private and link-local addresses (checked on every resolved address).
    #[serde(default)]
    pub allow_private_hosts: bool,
    /// Allow `http://` endpoints.
    #[serde(default)]
    pub allow_http: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Label request metrics with the tenant (switch off with very many tenants).
    #[serde(default = "yes")]
    pub tenant_label: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { tenant_label: true }
    }
}

pub(super) fn yes() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest accepted request body; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest multipart upload (edits, variations); larger ones get 413 before they are
    /// read whole.
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: usize,
    /// Bytes of uploads held at once across all requests; an upload that would pass it gets
    /// 503 with `retry-after`.
    #[serde(default = "default_max_upload_memory")]
    pub max_upload_memory: usize,
    /// How long SIGTERM/SIGINT waits for in-flight requests before exiting.
    #[serde(default = "default_shutdown", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// Time a client has to send its request headers.
    #[serde(default = "default_header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time a client has to send a JSON request body once its head is in (408 after it).
    #[serde(default = "default_body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Slowest upload (edits, variations) accepted, in bytes a second: an upload must be in
    /// within `body_timeout` plus one second for every this many bytes received (Apache's
    /// `mod_reqtimeout` rule), else 408. 0: no pace is required.
    #[serde(default = "default_min_upload_rate")]
    pub min_upload_rate: u64,
    /// Largest request head (HTTP/1.1: request line and headers; HTTP/2: the header list as
    /// RFC 9113 counts it); larger ones get 431. nginx's default allows 4 x 8 KiB lines.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most headers in a request; more get 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// How often the config file is checked for changes (0: only on SIGHUP).
    #[serde(default = "default_reload_poll", deserialize_with = "duration")]
    pub reload_poll: Duration,
    /// Threads that run requests; absent or 0: one per CPU this process may use (cgroup
    /// limits and CPU affinity included). With one, the runtime is single-threaded, which
    /// on one core is faster than a work-stealing scheduler with one worker.
    #[serde(default)]
    pub worker_threads: usize,
    /// Backend queues serve waiting requests by tenant weight (deficit round robin); `false`:
    /// one FIFO per class, as before (kept for comparison).
    #[serde(default = "yes")]
    pub fair_queues: bool,
    /// Refuse at once (503 `backend_busy`, honest `retry-after`) a request whose expected
    /// wait plus one job would pass its deadline, instead of queueing it until 504.
    #[serde(default = "yes")]
    pub shed_before_deadline: bool,
}

fn default_reload_poll() -> Duration {
    Duration::from_secs(2)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: default_max_body(),
            max_upload_bytes: default_max_upload(),
            max_upload_memory: default_max_upload_memory(),
            shutdown_timeout: default_shutdown(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            min_upload_rate: default_min_upload_rate(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            reload_poll: default_reload_poll(),
            worker_threads: 0,
            fair_queues: true,
            shed_before_deadline: true,
        }
    }
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}
/// 16 KiB/s: a 4 MB picture over a 130 kbit/s link still makes it; a client trickling bytes
/// to hold an upload's memory reservation does not.
fn default_min_upload_rate() -> u64 {
    16 * 1024
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
/// hyper's own default (its parser keeps this many slots on the stack).
pub const DEFAULT_MAX_HEADERS: usize = 100;
fn default_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_max_upload() -> usize {
    64 * 1024 * 1024
}
fn default_max_upload_memory() -> usize {
    1024 * 1024 * 1024
}
fn default_shutdown() -> Duration {
    Duration::from_secs(30)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    #[serde(default)]
    pub store: StoreKind,
    /// Lifetime of a signed image URL (and of the stored image).
    #[serde(default = "default_url_ttl", deserialize_with = "duration")]
    pub url_ttl: Duration,
    /// HMAC key for signed URLs; replicas that share it verify each other's links. When absent
    /// a random key is generated once and kept in `data_dir/url-signing.key`.
    #[serde(default)]
    pub signing_key: Option<Secret>,
    /// Settings of the `s3` store.
    #[serde(default)]
    pub s3: Option<S3Config>,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            store: StoreKind::Local,
            url_ttl: default_url_ttl(),
            signing_key: None,
            s3: None,
        }
    }
}

/// Any S3-compatible service (AWS, MinIO, Ceph, R2, ...).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Endpoint URL for non-AWS services, e.g. `http://minio:9000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub access_key_id: Option<Secret>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// `http://endpoint/bucket/key` instead of `http://bucket.endpoint/key` (MinIO needs it).
    #[serde(default)]
    pub path_style: bool,
    /// Key prefix of stored images.
    #[serde(default = "default_s3_prefix")]
    pub prefix: String,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_s3_prefix() -> String {
    "images/".to_string()
}

fn default_url_ttl() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Local,
    S3,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    #[serde(default)]
    pub level: Option<String>,
    /// OTLP/HTTP collector base URL (e.g. `http://otel-collector:4318`): spans of each request
    /// and upstream attempt are exported there. Off when absent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "imagegate".to_string()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: None,
            otlp_endpoint: None,
            service_name: default_service_name(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    #[default]
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Models this tenant may use; `"*"` means every model.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A `weight` label: 1 to 1000.
pub fn parse_weight(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(w) if (1..=1000).contains(&w) => Ok(w),
        _ => Err(format!(
            "weight \"{s}\" must be a whole number from 1 to 1000"
        )),
    }
}

/// A `max_share` label: `50%` or `0.5`, above 0 and at most 100%.
pub fn parse_share(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    };
    match v {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!(
            "max_share \"{s}\" must be a share above 0 and at most 100% (e.g. 50%)"
        )),
    }
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub images_per_minute: Option<u32>,
    /// Extra requests/images allowed at once above the steady rate; defaults to the per-minute
    /// value (a full minute's worth at once), as OpenAI's limits behave.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Requests in flight at once.
    #[serde(default)]
    pub concurrent_requests: Option<u32>,
    /// What may be spent per period, reserved before relaying and settled per image delivered.
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    /// The tenant's (or key's) batch lines' own rate and concurrency, apart from its
    /// interactive ones (so a batch never takes the interactive allowance); default: no rate
    /// limit (a replica runs 8 lines at a time, in the batch class of the queues). Its budget
    /// is the tenant's.
    #[serde(default)]
    pub batch: Option<Box<LimitsConfig>>,
}

/// A spending cap in micro-dollars per period.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub micro_usd: u64,
    #[serde(default)]
    pub period: BudgetPeriod,
}

/// Periods start at 00:00 UTC (daily) and on the 1st at 00:00 UTC (monthly).
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Daily,
    #[default]
    Monthly,
    Total,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Public identifier: appears in logs, never the secret.
    pub id: String,
    pub tenant: String,
    /// Hex SHA-256 of the secret (preferred).
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// Plaintext secret (local demos only; warned about at start).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// Narrows the tenant's models for this key.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The key's own limits and budget, on top of its tenant's.
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[serde(default)]
    pub disabled: bool,
}

/// A string that never prints itself.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `"90s"`, `"60m"`, `"1h 30m"`, `"250ms"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration \"{s}\": {e}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationRepr {
    Secs(u64),
    Text(String),
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match DurationRepr::deserialize(d)? {
        DurationRepr::Secs(s) => Ok(Duration::from_secs(s)),
        DurationRepr::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

pub(super) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}
