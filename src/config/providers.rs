//! Remote image providers beyond OpenAI (`gemini`, `bfl`, `fal`, `stability`, `replicate`):
//! one config shape for all five, each kind reading the keys it needs. Data only; the
//! backends live in `backends/providers/`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::backends::{Capacity, HealthConfig, ImageUrlMode, ImageUrlPolicy};
use super::types::*;
use super::ConfigError;

/// The five provider kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Gemini,
    Bfl,
    Fal,
    Stability,
    Replicate,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "gemini",
            ProviderKind::Bfl => "bfl",
            ProviderKind::Fal => "fal",
            ProviderKind::Stability => "stability",
            ProviderKind::Replicate => "replicate",
        }
    }

    /// The provider's public API.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta",
            ProviderKind::Bfl => "https://api.bfl.ai/v1",
            ProviderKind::Fal => "https://queue.fal.run",
            ProviderKind::Stability => "https://api.stability.ai/v2beta",
            ProviderKind::Replicate => "https://api.replicate.com/v1",
        }
    }

    /// Where the provider delivers its images (trusted for download by default).
    pub fn delivery_hosts(self) -> &'static [&'static str] {
        match self {
            ProviderKind::Gemini | ProviderKind::Stability => &[],
            ProviderKind::Bfl => &["*.bfl.ai", "*.blob.core.windows.net"],
            ProviderKind::Fal => &["*.fal.media", "fal.media", "*.fal.run"],
            ProviderKind::Replicate => &["replicate.delivery", "*.replicate.delivery"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Default: the provider's public API (see [`ProviderKind::default_base_url`]).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The provider's key (Gemini API key, BFL `x-key`, fal key, Stability or Replicate token).
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Gemini on Vertex AI: a service-account JSON file (the OAuth token is minted from it).
    #[serde(default)]
    pub service_account: Option<PathBuf>,
    /// Vertex AI project and region (with `service_account`).
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    /// Asynchronous kinds: the first wait before polling a job, and the longest between polls.
    #[serde(default = "default_poll_first", deserialize_with = "duration")]
    pub poll_interval: Duration,
    #[serde(default = "default_poll_max", deserialize_with = "duration")]
    pub max_poll_interval: Duration,
    /// Replicate: seconds `Prefer: wait` holds the create call open (1-60).
    #[serde(default = "default_wait")]
    pub wait_seconds: u32,
    /// Per-call timeout (one submit, one poll, one download).
    #[serde(default = "default_provider_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Hosts whose image URLs may be downloaded; default: the provider's delivery hosts.
    #[serde(default)]
    pub image_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub allow_private_image_hosts: bool,
    #[serde(default = "default_provider_max_image_bytes")]
    pub max_image_bytes: usize,
    /// Requests this backend works on at once; more wait in a bounded queue.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_provider_max_queue")]
    pub max_queue: u32,
    #[serde(
        default = "default_provider_queue_timeout",
        deserialize_with = "duration"
    )]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub health: HealthConfig,
}

fn default_poll_first() -> Duration {
    Duration::from_millis(500)
}

fn default_poll_max() -> Duration {
    Duration::from_secs(5)
}

fn default_wait() -> u32 {
    60
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_provider_max_image_bytes() -> usize {
    50 * 1024 * 1024
}

fn default_provider_max_queue() -> u32 {
    16
}

fn default_provider_queue_timeout() -> Duration {
    Duration::from_secs(30)
}

impl ProviderConfig {
    pub fn base_url(&self, kind: ProviderKind) -> String {
        self.base_url
            .as_deref()
            .unwrap_or(kind.default_base_url())
            .trim_end_matches('/')
            .to_string()
    }

    pub fn capacity(&self) -> Capacity {
        Capacity {
            max_concurrency: self.max_concurrency,
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
        }
    }

    /// Outputs are always downloaded (and hosted by the gateway when the client wants a URL):
    /// provider URLs expire within minutes (BFL) or an hour.
    pub fn image_url_policy(&self, kind: ProviderKind) -> ImageUrlPolicy {
        ImageUrlPolicy {
            mode: ImageUrlMode::Rehost,
            trusted_hosts: self.image_hosts.clone().unwrap_or_else(|| {
                kind.delivery_hosts()
                    .iter()
                    .map(|h| h.to_string())
                    .collect()
            }),
            allow_private: self.allow_private_image_hosts,
            max_bytes: self.max_image_bytes,
            timeout: self.timeout,
        }
    }

    /// What the config alone can tell is wrong, at `path`.
    pub fn problems(&self, kind: ProviderKind, path: &str) -> Vec<ConfigError> {
        let mut out = Vec::new();
        let vertex = self.service_account.is_some();
        if self.api_key.is_none() && !(kind == ProviderKind::Gemini && vertex) {
            let what = if kind == ProviderKind::Gemini {
                "api_key (the Gemini API) or service_account (Vertex AI)"
            } else {
                "api_key"
            };
            out.push(ConfigError::new(
                format!("{path}.api_key"),
                format!("{} needs {what}", kind.as_str()),
            ));
        }
        if vertex && (self.project.is_none() || self.location.is_none()) {
            out.push(ConfigError::new(
                format!("{path}.service_account"),
                "Vertex AI needs project and location too",
            ));
        }
        if vertex && kind != ProviderKind::Gemini {
            out.push(ConfigError::new(
                format!("{path}.service_account"),
                "only the gemini kind signs in with a service account",
            ));
        }
        if !(1..=60).contains(&self.wait_seconds) {
            out.push(ConfigError::new(
                format!("{path}.wait_seconds"),
                "must be between 1 and 60",
            ));
        }
        if self.poll_interval.is_zero() || self.max_poll_interval < self.poll_interval {
            out.push(ConfigError::new(
                format!("{path}.poll_interval"),
                "must be above 0 and at most max_poll_interval",
            ));
        }
        out
    }
}
