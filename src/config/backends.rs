//! The `backends:` section of gateway.yaml: one config type per upstream kind, and what every
//! kind shares (capacity, health, how its image URLs are treated). Data only: a kind's
//! constructor in `backends/` builds the running backend from it in the compile step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::providers::{ProviderConfig, ProviderKind};
use super::types::*;

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
    /// Google Gemini image models and Imagen (Gemini API or Vertex AI).
    Gemini(ProviderConfig),
    /// Black Forest Labs FLUX (submit, then poll).
    Bfl(ProviderConfig),
    /// fal.ai's queue (submit, status, result, cancel).
    Fal(ProviderConfig),
    /// Stability AI's v2beta stable-image endpoints.
    Stability(ProviderConfig),
    /// Replicate predictions (`Prefer: wait`, then polling).
    Replicate(ProviderConfig),
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
    /// The provider kinds' shared config, with which kind it is.
    pub fn provider(&self) -> Option<(ProviderKind, &ProviderConfig)> {
        match self {
            BackendConfig::Gemini(c) => Some((ProviderKind::Gemini, c)),
            BackendConfig::Bfl(c) => Some((ProviderKind::Bfl, c)),
            BackendConfig::Fal(c) => Some((ProviderKind::Fal, c)),
            BackendConfig::Stability(c) => Some((ProviderKind::Stability, c)),
            BackendConfig::Replicate(c) => Some((ProviderKind::Replicate, c)),
            _ => None,
        }
    }

    pub fn capacity(&self) -> Capacity {
        if let Some((_, c)) = self.provider() {
            return c.capacity();
        }
        let (max_concurrency, max_queue, queue_timeout) = match self {
            BackendConfig::Openai(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Azure(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Sandbox(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Automatic1111(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            BackendConfig::Comfyui(c) => (c.max_concurrency, c.max_queue, c.queue_timeout),
            _ => unreachable!("provider kinds answered above"),
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
        if let Some((kind, c)) = self.provider() {
            return c.image_url_policy(kind);
        }
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
            _ => unreachable!("provider kinds answered above"),
        }
    }

    pub fn health(&self) -> &HealthConfig {
        match self {
            BackendConfig::Openai(c) => &c.health,
            BackendConfig::Azure(c) => &c.health,
            BackendConfig::Sandbox(c) => &c.health,
            BackendConfig::Automatic1111(c) => &c.health,
            BackendConfig::Comfyui(c) => &c.health,
            BackendConfig::Gemini(c)
            | BackendConfig::Bfl(c)
            | BackendConfig::Fal(c)
            | BackendConfig::Stability(c)
            | BackendConfig::Replicate(c) => &c.health,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Openai(_) => "openai",
            BackendConfig::Azure(_) => "azure",
            BackendConfig::Sandbox(_) => "sandbox",
            BackendConfig::Automatic1111(_) => "automatic1111",
            BackendConfig::Comfyui(_) => "comfyui",
            BackendConfig::Gemini(_) => "gemini",
            BackendConfig::Bfl(_) => "bfl",
            BackendConfig::Fal(_) => "fal",
            BackendConfig::Stability(_) => "stability",
            BackendConfig::Replicate(_) => "replicate",
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
    /// How far img2img may move from the uploaded image (0-1) for an edit, and for a
    /// variation.
    #[serde(default = "default_edit_denoising")]
    pub edit_denoising_strength: f32,
    #[serde(default = "default_variation_denoising")]
    pub variation_denoising_strength: f32,
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
fn default_edit_denoising() -> f32 {
    0.75
}
fn default_variation_denoising() -> f32 {
    0.6
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
    /// The workflow edits and variations run (API format): it loads the uploaded image, and
    /// the mask when it maps one (a `LoadImageMask` on the alpha channel reads OpenAI's masks
    /// as they are).
    #[serde(default)]
    pub edit_workflow: Option<PathBuf>,
    /// Where each field goes in `edit_workflow`: the fields of `inputs`, plus `image`
    /// (required), `mask` and `denoise`.
    #[serde(default)]
    pub edit_inputs: BTreeMap<String, String>,
    /// The `denoise` written for an edit, and for a variation (0-1).
    #[serde(default = "default_edit_denoising")]
    pub edit_denoising_strength: f32,
    #[serde(default = "default_variation_denoising")]
    pub variation_denoising_strength: f32,
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
/// Fields only an edit workflow takes.
pub const COMFY_EDIT_FIELDS: &[&str] = &["image", "mask", "denoise"];
pub const COMFY_EDIT_REQUIRED: &[&str] = &["prompt", "image"];
