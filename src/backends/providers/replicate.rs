//! Replicate predictions: `POST {base}/models/{owner}/{name}/predictions` (or
//! `{base}/predictions` with `version` when the target names `owner/name:version`) with
//! `Prefer: wait=N`; a prediction still `starting`/`processing` after the wait is polled at
//! `urls.get` until it ends, and cancelled (`urls.cancel`) when the request ends first.
//! Inputs follow the FLUX models (`prompt`, `aspect_ratio`, `num_outputs` up to 4,
//! `output_format`); `output` is one URL or a list, downloaded and scaled to the exact size.

use async_trait::async_trait;
use base64::Engine;
use serde_json::{json, Value};

use super::poll::{until_done, Poll};
use super::{
    aspect_ratio, batched, plain_images_only, policy_violation, prompt, unsupported, Remote,
};
use crate::api::Operation;
use crate::backends::local::CancelOnDrop;
use crate::backends::{Backend, BackendError, GeneratedImage, Generation, UpstreamCall};
use crate::config::{ProviderConfig, ProviderKind};

const PER_PREDICTION: u32 = 4;
const RATIOS: &[&str] = &[
    "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21",
];

pub struct ReplicateBackend {
    remote: Remote,
    wait: u32,
}

impl ReplicateBackend {
    pub fn new(c: &ProviderConfig, remote: Remote) -> Self {
        ReplicateBackend {
            remote,
            wait: c.wait_seconds,
        }
    }

    fn create(
        &self,
        call: &UpstreamCall<'_>,
        outputs: u32,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let r = &self.remote;
        let model = call.upstream_model.unwrap_or(&call.request.model);
        let mut input = json!({
            "prompt": prompt(call),
            "aspect_ratio": aspect_ratio(call.request.size, RATIOS),
            "num_outputs": outputs,
            "output_format": "png",
        });
        if let Some(inputs) = &call.request.inputs {
            if inputs.mask.is_some() {
                return Err(unsupported("mask", ProviderKind::Replicate));
            }
            let first = &inputs.images[0];
            input["input_image"] = format!(
                "data:{};base64,{}",
                first.format.content_type(),
                base64::engine::general_purpose::STANDARD.encode(&first.bytes)
            )
            .into();
        }
        let (url, body) = match model.split_once(':') {
            Some((_, version)) => (
                format!("{}/predictions", r.base),
                json!({"version": version, "input": input}),
            ),
            None => (
                format!("{}/models/{model}/predictions", r.base),
                json!({"input": input}),
            ),
        };
        // Never hold the call open past the request's deadline.
        let wait = (call.remaining().as_secs() as u32).clamp(1, self.wait);
        Ok(r.http
            .post(url)
            .bearer_auth(r.key())
            .header("prefer", format!("wait={wait}"))
            .json(&body))
    }

    /// Where a prediction stands: its output URLs once it succeeded.
    fn state(&self, p: &Value) -> Result<Poll<Vec<String>>, BackendError> {
        match p["status"].as_str().unwrap_or_default() {
            "succeeded" => {
                let urls: Vec<String> = match &p["output"] {
                    Value::String(u) => vec![u.clone()],
                    Value::Array(a) => a
                        .iter()
                        .filter_map(|u| u.as_str().map(str::to_string))
                        .collect(),
                    _ => vec![],
                };
                if urls.is_empty() {
                    return Err(BackendError::BadResponse(
                        "the prediction has no output".into(),
                    ));
                }
                Ok(Poll::Done(urls))
            }
            "starting" | "processing" => Ok(Poll::Pending(None)),
            "failed" => {
                let why = p["error"].as_str().unwrap_or("failed");
                if why.to_ascii_lowercase().contains("nsfw") {
                    Err(policy_violation(ProviderKind::Replicate, why))
                } else {
                    Err(BackendError::Status {
                        status: 502,
                        message: format!("the prediction failed: {why}"),
                    })
                }
            }
            "canceled" => Err(BackendError::Status {
                status: 502,
                message: "the prediction was canceled".into(),
            }),
            other => Err(BackendError::BadResponse(format!(
                "unknown prediction status {other:?}"
            ))),
        }
    }

    async fn prediction(
        &self,
        call: &UpstreamCall<'_>,
        outputs: u32,
    ) -> Result<Vec<GeneratedImage>, BackendError> {
        let r = &self.remote;
        let created = r.ok(call, self.create(call, outputs)?).await?.json()?;
        let urls = match self.state(&created)? {
            Poll::Done(urls) => urls,
            Poll::Pending(_) => {
                let id = created["id"].as_str().unwrap_or_default();
                let get = r.own_url(
                    created["urls"]["get"].as_str(),
                    format!("{}/predictions/{id}", r.base),
                );
                let cancel_url = r.own_url(
                    created["urls"]["cancel"].as_str(),
                    format!("{}/predictions/{id}/cancel", r.base),
                );
                let mut cancel = CancelOnDrop::new();
                cancel.add(r.http.post(cancel_url).bearer_auth(r.key()));
                until_done(call.deadline, r.poll, cancel, || async {
                    let a = r.ok(call, r.http.get(&get).bearer_auth(r.key())).await?;
                    self.state(&a.json()?)
                })
                .await?
            }
        };
        r.download_all(&urls, call).await
    }
}

#[async_trait]
impl Backend for ReplicateBackend {
    fn kind(&self) -> &'static str {
        "replicate"
    }

    /// Edits and variations go to models that take `input_image` (FLUX Kontext).
    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        plain_images_only(call.request, ProviderKind::Replicate)?;
        let images = batched(call.request.n, PER_PREDICTION, |count| {
            self.prediction(&call, count)
        })
        .await?;
        Ok(Generation { images, meta: None })
    }
}
