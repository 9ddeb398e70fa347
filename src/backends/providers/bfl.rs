//! Black Forest Labs FLUX: `POST {base}/{model}` with `x-key` returns `{id, polling_url}`;
//! the task is polled until `Ready`, and its `result.sample` (a signed URL that expires in
//! minutes) is downloaded at once. One image per task: `n` images are `n` tasks, in parallel.
//! Edits (FLUX Kontext) send the first image as `input_image`. BFL has no cancel call: a task
//! abandoned by its request is left to finish (moderated tasks are not charged).

use async_trait::async_trait;
use base64::Engine;
use serde_json::{json, Value};

use super::poll::{until_done, Poll};
use super::{exact, fan_out, plain_images_only, policy_violation, prompt, unsupported, Remote};
use crate::api::{Operation, Size};
use crate::backends::local::CancelOnDrop;
use crate::backends::{Backend, BackendError, GeneratedImage, Generation, UpstreamCall};
use crate::config::ProviderKind;

pub struct BflBackend {
    remote: Remote,
}

/// Width and height BFL accepts: multiples of 32 within 256..=1440, the aspect kept.
pub fn bfl_size(want: Size) -> Size {
    let (w, h) = (f64::from(want.width), f64::from(want.height));
    let scale = (1440.0 / w.max(h)).min(1.0).max(256.0 / w.min(h));
    let fit = |v: f64| (((v * scale) / 32.0).round() as u32 * 32).clamp(256, 1440);
    Size::new(fit(w), fit(h))
}

impl BflBackend {
    pub fn new(remote: Remote) -> Self {
        BflBackend { remote }
    }

    fn model<'a>(&self, call: &UpstreamCall<'a>) -> &'a str {
        call.upstream_model.unwrap_or(&call.request.model)
    }

    fn body(&self, call: &UpstreamCall<'_>) -> Result<Value, BackendError> {
        let size = bfl_size(call.request.size);
        let mut body = json!({
            "prompt": prompt(call),
            "width": size.width,
            "height": size.height,
            "output_format": "png",
            "prompt_upsampling": false,
        });
        if let Some(inputs) = &call.request.inputs {
            if inputs.mask.is_some() {
                return Err(unsupported("mask", ProviderKind::Bfl));
            }
            let first = &inputs.images[0];
            body["input_image"] = base64::engine::general_purpose::STANDARD
                .encode(&first.bytes)
                .into();
        }
        Ok(body)
    }

    /// One task: submit, poll, download.
    async fn one(
        &self,
        call: &UpstreamCall<'_>,
        body: &Value,
    ) -> Result<GeneratedImage, BackendError> {
        let r = &self.remote;
        let submit = r
            .http
            .post(format!("{}/{}", r.base, self.model(call)))
            .header("x-key", r.key())
            .json(body);
        let task = r.ok(call, submit).await?.json()?;
        let id = task["id"]
            .as_str()
            .ok_or_else(|| BackendError::BadResponse("the task has no id".into()))?;
        let polling = r.own_url(
            task["polling_url"].as_str(),
            format!("{}/get_result?id={id}", r.base),
        );
        let sample = until_done(call.deadline, r.poll, CancelOnDrop::new(), || async {
            let a = r
                .send(call, r.http.get(&polling).header("x-key", r.key()))
                .await?;
            if !(200..300).contains(&a.status) {
                return Err(super::error_for(
                    ProviderKind::Bfl,
                    a.status,
                    &a.headers,
                    &a.body,
                ));
            }
            let v = a.json()?;
            match v["status"].as_str().unwrap_or_default() {
                "Ready" => v["result"]["sample"]
                    .as_str()
                    .map(|s| Poll::Done(s.to_string()))
                    .ok_or_else(|| BackendError::BadResponse("a Ready task has no sample".into())),
                "Pending" | "Queued" | "Processing" => Ok(Poll::Pending(None)),
                s @ ("Request Moderated" | "Content Moderated") => {
                    Err(policy_violation(ProviderKind::Bfl, s))
                }
                "Task not found" => Err(BackendError::BadResponse("the task was lost".into())),
                other => Err(BackendError::Status {
                    status: 502,
                    message: format!("the task ended as {other:?}"),
                }),
            }
        })
        .await?;
        let bytes = r.download(&sample, call).await?;
        exact(bytes, call.request.size, None)
    }
}

#[async_trait]
impl Backend for BflBackend {
    fn kind(&self) -> &'static str {
        "bfl"
    }

    /// Edits and variations (as edits) need a model that takes `input_image` (FLUX Kontext).
    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        plain_images_only(call.request, ProviderKind::Bfl)?;
        let body = self.body(&call)?;
        let images = fan_out(call.request.n, |_| self.one(&call, &body)).await?;
        Ok(Generation { images, meta: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_fit_bfls_grid() {
        assert_eq!(bfl_size(Size::new(1024, 1024)), Size::new(1024, 1024));
        assert_eq!(bfl_size(Size::new(1792, 1024)), Size::new(1440, 832));
        assert_eq!(bfl_size(Size::new(256, 256)), Size::new(256, 256));
        assert_eq!(bfl_size(Size::new(3840, 2160)), Size::new(1440, 800));
        assert_eq!(bfl_size(Size::new(816, 816)), Size::new(832, 832));
    }
}
