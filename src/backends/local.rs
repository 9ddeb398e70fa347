//! What the local node kinds (AUTOMATIC1111, ComfyUI) share: turning the contract's quality and
//! style into sampling settings and prompt text, the seed policy, and cancelling a job on the
//! node when the client's deadline passes or the client goes away.

use sha2::{Digest, Sha256};

use crate::api::{ImageRequest, Quality, Style};
use crate::config::{LocalGeneration, SamplingPreset, SeedPolicy};

/// The prompt actually sent: the client's, plus the style's suffix.
pub fn prompt(g: &LocalGeneration, request: &ImageRequest) -> String {
    let suffix = match request.style {
        Some(Style::Vivid) => g.style.vivid.as_str(),
        Some(Style::Natural) => g.style.natural.as_str(),
        None => "",
    };
    format!("{}{suffix}", request.prompt)
}

pub fn sampling(g: &LocalGeneration, request: &ImageRequest) -> SamplingPreset {
    // GPT image qualities map too: high, xhigh and max are hd.
    match super::translate::dalle_quality(request) {
        Quality::Hd => g.quality.hd,
        Quality::Standard => g.quality.standard,
    }
}

/// A concrete seed (below 2^32, which every node kind accepts).
pub fn seed(g: &LocalGeneration, prompt: &str) -> u64 {
    match g.seed {
        SeedPolicy::Fixed(n) => n,
        SeedPolicy::Prompt => {
            let d = Sha256::digest(prompt.as_bytes());
            u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
        }
        SeedPolicy::Random => u64::from(rand::random::<u32>()),
    }
}

/// Calls that stop a job on the node, sent if dropped while armed: the request was cancelled
/// (client gone) or timed out while the node was still working on it.
pub struct CancelOnDrop {
    calls: Vec<reqwest::RequestBuilder>,
    armed: bool,
}

impl CancelOnDrop {
    pub fn new() -> Self {
        CancelOnDrop {
            calls: Vec::new(),
            armed: true,
        }
    }

    pub fn add(&mut self, call: reqwest::RequestBuilder) {
        self.calls.push(call);
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed || self.calls.is_empty() {
            return;
        }
        let calls = std::mem::take(&mut self.calls);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for call in calls {
                    let sent = call.timeout(std::time::Duration::from_secs(5)).send().await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e.without_url(), "could not cancel a job on a local node");
                    }
                }
            });
        }
    }
}
