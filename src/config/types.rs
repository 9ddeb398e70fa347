//! The shape of gateway.yaml. Every key is documented in README.md ("Configuration").

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

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
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
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

fn yes() -> bool {
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
    /// How long SIGTERM/SIGINT waits for in-flight requests before exiting.
    #[serde(default = "default_shutdown", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// Time a client has to send its request headers.
    #[serde(default = "default_header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// How often the config file is checked for changes (0: only on SIGHUP).
    #[serde(default = "default_reload_poll", deserialize_with = "duration")]
    pub reload_poll: Duration,
    /// Threads that run requests; absent or 0: one per CPU this process may use (cgroup
    /// limits and CPU affinity included). With one, the runtime is single-threaded, which
    /// on one core is faster than a work-stealing scheduler with one worker.
    #[serde(default)]
    pub worker_threads: usize,
}

fn default_reload_poll() -> Duration {
    Duration::from_secs(2)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: default_max_body(),
            shutdown_timeout: default_shutdown(),
            header_timeout: default_header_timeout(),
            reload_poll: default_reload_poll(),
            worker_threads: 0,
        }
    }
}

fn default_max_body() -> usize {
    1024 * 1024
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

/// One upstream. Adding a kind means a variant here and a file in `backends/`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    Openai(OpenAiConfig),
    Azure(AzureConfig),
    Sandbox(SandboxConfig),
    /// AUTOMATIC1111, Forge, SD.Next (`/sdapi/v1/txt2img`).
    Automatic1111(A1111Config),
    Comfyui(ComfyConfig),
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            max_concurrency: None,
            max_queue: default_max_queue(),
            queue_timeout: default_queue_timeout(),
            health: HealthConfig::default(),
            delay: None,
        }
    }
}

/// `passthrough`: hand the provider's URL to the client; `rehost`: download it and serve it
/// from the gateway's image store, hiding the provider.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ImageUrlMode {
    Passthrough,
    Rehost,
}

fn default_max_image_bytes() -> usize {
    50 * 1024 * 1024
}

/// How image URLs returned by one backend are treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUrlPolicy {
    pub mode: ImageUrlMode,
    pub trusted_hosts: Vec<String>,
    pub allow_private: bool,
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// Per-backend capacity: at most `max_concurrency` requests at once (unlimited when unset),
/// up to `max_queue` more waiting at most `queue_timeout` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub max_concurrency: Option<u32>,
    pub max_queue: u32,
    pub queue_timeout: Duration,
}

fn default_max_queue() -> u32 {
    16
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(30)
}

impl BackendConfig {
    pub fn capacity(&self) -> Capacity {
        let (max_concurrency, max_queue, queue_timeout) = match self {
            BackendConfig::Openai(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Azure(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Sandbox(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Automatic1111(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Comfyui(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
        };
        Capacity {
            max_concurrency,
            max_queue,
            queue_timeout,
        }
    }

    pub fn image_url_policy(&self) -> ImageUrlPolicy {
        let host_of = |u: &str| {
            url::Url::parse(u)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .into_iter()
                .collect::<Vec<_>>()
        };
        match self {
            BackendConfig::Openai(c) => ImageUrlPolicy {
                mode: c.image_urls.unwrap_or(ImageUrlMode::Passthrough),
                trusted_hosts: c
                    .image_hosts
                    .clone()
                    .unwrap_or_else(|| host_of(&c.base_url)),
                allow_private: c.allow_private_image_hosts,
                max_bytes: c.max_image_bytes,
                timeout: c.timeout,
            },
            BackendConfig::Azure(c) => ImageUrlPolicy {
                mode: c.image_urls.unwrap_or(ImageUrlMode::Passthrough),
                trusted_hosts: c
                    .image_hosts
                    .clone()
                    .unwrap_or_else(|| host_of(&c.endpoint)),
                allow_private: c.allow_private_image_hosts,
                max_bytes: c.max_image_bytes,
                timeout: c.timeout,
            },
            // Local kinds answer with bytes; should one hand out URLs, serve them ourselves.
            BackendConfig::Sandbox(_)
            | BackendConfig::Automatic1111(_)
            | BackendConfig::Comfyui(_) => ImageUrlPolicy {
                mode: ImageUrlMode::Rehost,
                trusted_hosts: Vec::new(),
                allow_private: false,
                max_bytes: default_max_image_bytes(),
                timeout: Duration::from_secs(30),
            },
        }
    }

    pub fn health(&self) -> &HealthConfig {
        match self {
            BackendConfig::Openai(c) => &c.health,
            BackendConfig::Azure(c) => &c.health,
            BackendConfig::Sandbox(c) => &c.health,
            BackendConfig::Automatic1111(c) => &c.health,
            BackendConfig::Comfyui(c) => &c.health,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Openai(_) => "openai",
            BackendConfig::Azure(_) => "azure",
            BackendConfig::Sandbox(_) => "sandbox",
            BackendConfig::Automatic1111(_) => "automatic1111",
            BackendConfig::Comfyui(_) => "comfyui",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// What to do with image URLs this upstream returns when the client wants a URL.
    #[serde(default)]
    pub image_urls: Option<ImageUrlMode>,
    /// Hosts whose image URLs may be fetched (`*.example.com` matches subdomains); default:
    /// the host of this backend's own URL.
    #[serde(default)]
    pub image_hosts: Option<Vec<String>>,
    /// Allow fetching images from loopback, private and link-local addresses (off: SSRF guard).
    #[serde(default)]
    pub allow_private_image_hosts: bool,
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: usize,
    /// Requests this backend works on at once; more wait in a bounded queue.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration")]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub health: HealthConfig,
    /// Up to and including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<Secret>,
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub project: Option<String>,
    /// Per-attempt timeout for one upstream call.
    #[serde(default = "default_upstream_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// What to do with image URLs this upstream returns when the client wants a URL.
    #[serde(default)]
    pub image_urls: Option<ImageUrlMode>,
    /// Hosts whose image URLs may be fetched (`*.example.com` matches subdomains); default:
    /// the host of this backend's own URL.
    #[serde(default)]
    pub image_hosts: Option<Vec<String>>,
    /// Allow fetching images from loopback, private and link-local addresses (off: SSRF guard).
    #[serde(default)]
    pub allow_private_image_hosts: bool,
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: usize,
    /// Requests this backend works on at once; more wait in a bounded queue.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration")]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub health: HealthConfig,
    /// `https://{resource}.openai.azure.com`
    pub endpoint: String,
    /// Deployment used when a route target names no upstream model.
    #[serde(default)]
    pub deployment: Option<String>,
    #[serde(default = "default_azure_version")]
    pub api_version: String,
    pub api_key: Secret,
    #[serde(default = "default_upstream_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

fn default_azure_version() -> String {
    "2024-10-21".to_string()
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Requests this backend works on at once; more wait in a bounded queue.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration")]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub health: HealthConfig,
    /// Artificial latency per request, for trying timeouts and drains.
    #[serde(default, deserialize_with = "opt_duration")]
    pub delay: Option<Duration>,
}

/// Passive health (outlier ejection) of one backend.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Consecutive failures (connect error, timeout, 5xx) before the backend is ejected.
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// First cool-down; it doubles on each repeated ejection.
    #[serde(default = "default_ejection", deserialize_with = "duration")]
    pub ejection: Duration,
    #[serde(default = "default_max_ejection", deserialize_with = "duration")]
    pub max_ejection: Duration,
    /// How long an upstream 429 without `retry-after` parks the backend.
    #[serde(default = "default_throttle", deserialize_with = "duration")]
    pub throttle: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            eject_after: default_eject_after(),
            ejection: default_ejection(),
            max_ejection: default_max_ejection(),
            throttle: default_throttle(),
        }
    }
}

fn default_eject_after() -> u32 {
    5
}
fn default_ejection() -> Duration {
    Duration::from_secs(10)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_throttle() -> Duration {
    Duration::from_secs(1)
}

/// Steps and CFG scale a quality maps to on a local node.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingPreset {
    pub steps: u32,
    #[serde(alias = "cfg_scale")]
    pub cfg: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QualityPresets {
    #[serde(default = "default_standard_preset")]
    pub standard: SamplingPreset,
    #[serde(default = "default_hd_preset")]
    pub hd: SamplingPreset,
}

impl Default for QualityPresets {
    fn default() -> Self {
        QualityPresets {
            standard: default_standard_preset(),
            hd: default_hd_preset(),
        }
    }
}

fn default_standard_preset() -> SamplingPreset {
    SamplingPreset {
        steps: 20,
        cfg: 7.0,
    }
}
fn default_hd_preset() -> SamplingPreset {
    SamplingPreset {
        steps: 40,
        cfg: 7.5,
    }
}

/// What `style` adds to the prompt on a local node (diffusion models have no style switch).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StyleSuffixes {
    #[serde(default = "default_vivid")]
    pub vivid: String,
    #[serde(default = "default_natural")]
    pub natural: String,
}

impl Default for StyleSuffixes {
    fn default() -> Self {
        StyleSuffixes {
            vivid: default_vivid(),
            natural: default_natural(),
        }
    }
}

fn default_vivid() -> String {
    ", vivid colors, dramatic lighting, hyper-detailed".to_string()
}
fn default_natural() -> String {
    ", natural lighting, realistic, muted colors".to_string()
}

/// How a local node's seed is chosen: `random` (a new one per request), `prompt` (derived from
/// the prompt, so the same prompt gives the same picture), or a fixed number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedPolicy {
    Random,
    Prompt,
    Fixed(u64),
}

impl<'de> Deserialize<'de> for SeedPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(n) => Ok(SeedPolicy::Fixed(n)),
            Repr::Text(t) if t == "random" => Ok(SeedPolicy::Random),
            Repr::Text(t) if t == "prompt" => Ok(SeedPolicy::Prompt),
            Repr::Text(t) => Err(serde::de::Error::custom(format!(
                "seed must be `random`, `prompt` or a number, not \"{t}\""
            ))),
        }
    }
}

fn default_seed() -> SeedPolicy {
    SeedPolicy::Random
}

fn one() -> Option<u32> {
    Some(1)
}

fn default_local_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
}

/// Generation settings shared by the local node kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalGeneration {
    pub quality: QualityPresets,
    pub style: StyleSuffixes,
    pub negative_prompt: String,
    pub seed: SeedPolicy,
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct A1111Config {
    /// e.g. `http://gpu-1:7860`
    pub base_url: String,
    /// HTTP Basic credentials when the node runs with `--api-auth`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// Images per txt2img call; larger `n` is split into several calls.
    #[serde(default = "default_max_batch")]
    pub max_batch: u32,
    #[serde(default)]
    pub sampler: Option<String>,
    #[serde(default)]
    pub checkpoint: Option<String>,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "default_seed")]
    pub seed: SeedPolicy,
    #[serde(default)]
    pub quality: QualityPresets,
    #[serde(default)]
    pub style: StyleSuffixes,
    #[serde(default = "default_local_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_probe_interval", deserialize_with = "duration")]
    pub probe_interval: Duration,
    #[serde(default = "one")]
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration")]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub health: HealthConfig,
}

fn default_max_batch() -> u32 {
    4
}

impl A1111Config {
    pub fn generation(&self) -> LocalGeneration {
        LocalGeneration {
            quality: self.quality.clone(),
            style: self.style.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            checkpoint: self.checkpoint.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComfyConfig {
    /// e.g. `http://gpu-2:8188`
    pub base_url: String,
    /// A workflow in ComfyUI's API format ("Save (API)"), relative to the working directory.
    pub workflow: PathBuf,
    /// Where each of our fields goes: `field: "NODE_ID.inputs.NAME"`. Fields: prompt,
    /// negative_prompt, seed, width, height, batch_size, steps, cfg, checkpoint,
    /// filename_prefix. `prompt`, `width`, `height` and `batch_size` are required.
    pub inputs: BTreeMap<String, String>,
    #[serde(default)]
    pub checkpoint: Option<String>,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "default_seed")]
    pub seed: SeedPolicy,
    #[serde(default)]
    pub quality: QualityPresets,
    #[serde(default)]
    pub style: StyleSuffixes,
    /// How often `/history/{id}` is polled while a job runs.
    #[serde(default = "default_poll_interval", deserialize_with = "duration")]
    pub poll_interval: Duration,
    #[serde(default = "default_local_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_probe_interval", deserialize_with = "duration")]
    pub probe_interval: Duration,
    #[serde(default = "one")]
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration")]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub health: HealthConfig,
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}

impl ComfyConfig {
    pub fn generation(&self) -> LocalGeneration {
        LocalGeneration {
            quality: self.quality.clone(),
            style: self.style.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            checkpoint: self.checkpoint.clone(),
        }
    }
}

/// Fields of ours a ComfyUI workflow can take.
pub const COMFY_FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "batch_size",
    "steps",
    "cfg",
    "checkpoint",
    "filename_prefix",
];
pub const COMFY_REQUIRED: &[&str] = &["prompt", "width", "height", "batch_size"];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A preset name (`dall-e-2`, `dall-e-3`) or custom rules.
    pub rules: RulesConfig,
    pub route: RouteConfig,
    /// Overall deadline of one request to this model.
    #[serde(default = "default_model_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// What an image costs the client: a preset (`dall-e-2`, `dall-e-3`) or a table; default:
    /// the preset of the model's rules, else free.
    #[serde(default)]
    pub price: Option<PriceConfig>,
    /// What an image costs us upstream (same syntax as `price`, plus token prices), for the
    /// margin in the usage ledger; default: free.
    #[serde(default)]
    pub upstream_price: Option<PriceConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PriceConfig {
    Preset(String),
    Table(PriceTableConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTableConfig {
    #[serde(default)]
    pub per_image: Vec<PriceEntry>,
    /// Price of a size/quality not in the table.
    #[serde(default)]
    pub default_micro_usd: u64,
    /// Token prices (GPT image `usage`), micro-dollars per million tokens; when the upstream
    /// reports usage and either is set, they replace the per-image price.
    #[serde(default)]
    pub input_tokens_per_million: u64,
    #[serde(default)]
    pub output_tokens_per_million: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub size: String,
    /// `standard` or `hd`; absent matches any.
    #[serde(default)]
    pub quality: Option<String>,
    pub micro_usd: u64,
}

fn default_model_timeout() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RulesConfig {
    Preset(String),
    Custom(CustomRules),
}

/// Custom rules, optionally starting from a preset and overriding some fields.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRules {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub sizes: Option<Vec<String>>,
    #[serde(default)]
    pub default_size: Option<String>,
    #[serde(default)]
    pub max_n: Option<u32>,
    #[serde(default)]
    pub max_prompt_chars: Option<usize>,
    /// Accepted `quality` values; empty rejects the field.
    #[serde(default)]
    pub quality: Option<Vec<String>>,
    /// Accepted `style` values; empty rejects the field.
    #[serde(default)]
    pub style: Option<Vec<String>>,
    #[serde(default)]
    pub revised_prompt: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// Upstream calls one request may make (each to a different target); default: up to 3,
    /// never more than the number of targets.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Which upstream failures move the request to another target.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    pub targets: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random by weight within the best available tier.
    #[default]
    Weighted,
    /// Power of two choices (drawn by weight) on in-flight requests.
    LeastOutstanding,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// Connection refused, reset, DNS failure.
    Connect,
    /// No answer within the backend's timeout.
    Timeout,
    /// Upstream 429.
    RateLimited,
    /// Upstream 5xx or an unusable answer.
    ServerError,
    /// Upstream 401/403 (our credentials for that backend).
    UpstreamAuth,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::Connect,
        RetryOn::Timeout,
        RetryOn::RateLimited,
        RetryOn::ServerError,
    ]
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub backend: String,
    /// Model name sent upstream (Azure: the deployment); defaults to the public name.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Tier: lower first.
    #[serde(default)]
    pub priority: u32,
    /// The dialect the upstream speaks (openai/azure backends): `dall-e` or `gpt-image`.
    #[serde(default)]
    pub dialect: Dialect,
    /// How DALL·E requests are translated for a `gpt-image` upstream.
    #[serde(default)]
    pub translation: TranslationConfig,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum Dialect {
    /// The contract's fields (OpenAI-compatible servers that still accept DALL·E requests).
    #[default]
    #[serde(rename = "dall-e")]
    DallE,
    /// The GPT image dialect: no response_format or style, always base64.
    #[serde(rename = "gpt-image")]
    GptImage,
}

/// DALL·E -> GPT image translation rules of one target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TranslationConfig {
    /// GPT image quality for DALL·E `standard` and `hd`.
    #[serde(default = "default_quality_map")]
    pub quality: BTreeMap<String, String>,
    /// Sentences appended to the prompt for DALL·E `vivid` and `natural`.
    #[serde(default)]
    pub style: StyleSentences,
    /// Send `user` as is in `safety_identifier` (default: its SHA-256, so end-user ids stay
    /// inside the gateway).
    #[serde(default)]
    pub pass_user: bool,
    /// Images per upstream call; larger `n` is split into parallel calls.
    #[serde(default = "default_translation_max_n")]
    pub max_n: u32,
    /// Sizes the upstream accepts; default: gpt-image-2's free sizes (16-pixel grid, aspect
    /// up to 3:1, 655,360 to 8,294,400 pixels, edges up to 3840).
    #[serde(default)]
    pub sizes: Option<Vec<String>>,
}

impl Default for TranslationConfig {
    fn default() -> Self {
        TranslationConfig {
            quality: default_quality_map(),
            style: StyleSentences::default(),
            pass_user: false,
            max_n: default_translation_max_n(),
            sizes: None,
        }
    }
}

fn default_quality_map() -> BTreeMap<String, String> {
    [("standard", "medium"), ("hd", "high")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn default_translation_max_n() -> u32 {
    10
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StyleSentences {
    #[serde(default = "default_vivid_sentence")]
    pub vivid: String,
    #[serde(default = "default_natural_sentence")]
    pub natural: String,
}

impl Default for StyleSentences {
    fn default() -> Self {
        StyleSentences {
            vivid: default_vivid_sentence(),
            natural: default_natural_sentence(),
        }
    }
}

fn default_vivid_sentence() -> String {
    "Style: vivid, hyper-real and dramatic, with rich saturated colors.".to_string()
}

fn default_natural_sentence() -> String {
    "Style: natural, realistic and true to life, with soft natural light.".to_string()
}

fn default_weight() -> u32 {
    1
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

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match DurationRepr::deserialize(d)? {
        DurationRepr::Secs(s) => Ok(Duration::from_secs(s)),
        DurationRepr::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}
