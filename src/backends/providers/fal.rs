//! fal.ai's queue: `POST {base}/{model_id}` (`Authorization: Key …`) returns a `request_id`
//! and its status, result and cancel URLs; the status is polled until `COMPLETED`, then the
//! result's `images[].url` are downloaded. `num_images` is capped at 4 per job (more are more
//! jobs); the exact size goes as `image_size: {width, height}`. A job still queued or running
//! when the request ends is cancelled (`PUT …/cancel`). Images the safety checker flags
//! (`has_nsfw_concepts`) are dropped; all flagged is a policy violation.

use async_trait::async_trait;
use base64::Engine;
use serde_json::{json, Value};

use super::poll::{until_done, Poll};
use super::{batched, plain_images_only, policy_violation, prompt, unsupported, Remote};
use crate::api::Operation;
use crate::backends::local::CancelOnDrop;
use crate::backends::{Backend, BackendError, GeneratedImage, Generation, UpstreamCall};
use crate::config::ProviderKind;

const PER_JOB: u32 = 4;

pub struct FalBackend {
    remote: Remote,
}

impl FalBackend {
    pub fn new(remote: Remote) -> Self {
        FalBackend { remote }
    }

    fn body(&self, call: &UpstreamCall<'_>, images: u32) -> Result<Value, BackendError> {
        let size = call.request.size;
        let mut body = json!({
            "prompt": prompt(call),
            "image_size": {"width": size.width, "height": size.height},
            "num_images": images,
            "output_format": "png",
            "enable_safety_checker": true,
        });
        if let Some(inputs) = &call.request.inputs {
            if inputs.mask.is_some() {
                return Err(unsupported("mask", ProviderKind::Fal));
            }
            let first = &inputs.images[0];
            body["image_url"] = format!(
                "data:{};base64,{}",
                first.format.content_type(),
                base64::engine::general_purpose::STANDARD.encode(&first.bytes)
            )
            .into();
        }
        Ok(body)
    }

    /// One job of `images` images.
    async fn job(
        &self,
        call: &UpstreamCall<'_>,
        images: u32,
    ) -> Result<Vec<GeneratedImage>, BackendError> {
        let r = &self.remote;
        let model = call.upstream_model.unwrap_or(&call.request.model);
        let auth = format!("Key {}", r.key());
        let submit = r
            .http
            .post(format!("{}/{model}", r.base))
            .header("authorization", &auth)
            .json(&self.body(call, images)?);
        let queued = r.ok(call, submit).await?.json()?;
        let id = queued["request_id"]
            .as_str()
            .ok_or_else(|| BackendError::BadResponse("the job has no request_id".into()))?;
        // Queue URLs name the model without its subpath (fal-ai/flux/schnell -> fal-ai/flux).
        let root: Vec<&str> = model.split('/').take(2).collect();
        let jobs = format!("{}/{}/requests/{id}", r.base, root.join("/"));
        let status_url = r.own_url(queued["status_url"].as_str(), format!("{jobs}/status"));
        let result_url = r.own_url(queued["response_url"].as_str(), jobs.clone());
        let cancel_url = r.own_url(queued["cancel_url"].as_str(), format!("{jobs}/cancel"));
        let mut cancel = CancelOnDrop::new();
        cancel.add(r.http.put(&cancel_url).header("authorization", &auth));
        until_done(call.deadline, r.poll, cancel, || async {
            let a = r
                .send(call, r.http.get(&status_url).header("authorization", &auth))
                .await?;
            if !(200..300).contains(&a.status) && a.status != 202 {
                return Err(super::error_for(
                    ProviderKind::Fal,
                    a.status,
                    &a.headers,
                    &a.body,
                ));
            }
            match a.json()?["status"].as_str().unwrap_or_default() {
                "COMPLETED" => Ok(Poll::Done(())),
                "IN_QUEUE" | "IN_PROGRESS" => Ok(Poll::Pending(None)),
                other => Err(BackendError::BadResponse(format!(
                    "unknown job status {other:?}"
                ))),
            }
        })
        .await?;
        let result = r
            .ok(call, r.http.get(&result_url).header("authorization", &auth))
            .await?
            .json()?;
        let flags: Vec<bool> = result["has_nsfw_concepts"]
            .as_array()
            .map(|a| a.iter().map(|f| f.as_bool().unwrap_or(false)).collect())
            .unwrap_or_default();
        let urls: Vec<&str> = result["images"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["url"].as_str()).collect())
            .unwrap_or_default();
        if urls.is_empty() {
            return Err(BackendError::BadResponse("the result has no images".into()));
        }
        let clean: Vec<&str> = urls
            .iter()
            .enumerate()
            .filter(|(i, _)| !flags.get(*i).copied().unwrap_or(false))
            .map(|(_, u)| *u)
            .collect();
        if clean.is_empty() {
            return Err(policy_violation(ProviderKind::Fal, "has_nsfw_concepts"));
        }
        r.download_all(&clean, call).await
    }
}

#[async_trait]
impl Backend for FalBackend {
    fn kind(&self) -> &'static str {
        "fal"
    }

    /// Edits and variations go to image-to-image models (`image_url`).
    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        plain_images_only(call.request, ProviderKind::Fal)?;
        let images = batched(call.request.n, PER_JOB, |count| self.job(&call, count)).await?;
        Ok(Generation { images, meta: None })
    }
}
