//! Stability AI v2beta: `POST {base}/stable-image/generate/{ultra|core|sd3}` as multipart form
//! (even without files), `Accept: application/json` for `{image, finish_reason, seed}`. One
//! image per call (`n` calls in parallel); the size goes as the nearest `aspect_ratio` and the
//! image is scaled to the exact size. `finish_reason: CONTENT_FILTERED` (a 200 with a blurred
//! image) and 403 `content_moderation` are policy violations. Edits use sd3's image-to-image
//! mode (`image` + `strength`). The target's model picks the endpoint: `stable-image-ultra`,
//! `stable-image-core`, or an sd3 model (`sd3.5-large`, ...), sent as `model`.

use async_trait::async_trait;
use base64::Engine;
use reqwest::multipart::{Form, Part};

use super::{
    aspect_ratio, exact, fan_out, plain_images_only, policy_violation, prompt, unsupported, Remote,
};
use crate::api::{Operation, Quality};
use crate::backends::{Backend, BackendError, GeneratedImage, Generation, UpstreamCall};
use crate::config::ProviderKind;

const RATIOS: &[&str] = &[
    "1:1", "16:9", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21",
];

pub struct StabilityBackend {
    remote: Remote,
}

impl StabilityBackend {
    pub fn new(remote: Remote) -> Self {
        StabilityBackend { remote }
    }

    /// The endpoint and, for sd3, the model field. DALL·E `hd` asks for ultra when the target
    /// names no model.
    fn endpoint<'a>(&self, call: &UpstreamCall<'a>) -> (&'static str, Option<&'a str>) {
        match call.upstream_model {
            Some(m) if m.starts_with("sd3") => ("sd3", Some(m)),
            Some(m) if m.contains("ultra") => ("ultra", None),
            Some(_) => ("core", None),
            None if call.request.quality == Some(Quality::Hd) => ("ultra", None),
            None => ("core", None),
        }
    }

    fn form(&self, call: &UpstreamCall<'_>) -> Result<(Form, &'static str), BackendError> {
        let (endpoint, model) = self.endpoint(call);
        let mut form = Form::new()
            .text("prompt", prompt(call))
            .text("output_format", "png")
            .text("aspect_ratio", aspect_ratio(call.request.size, RATIOS));
        if let Some(m) = model {
            form = form.text("model", m.to_string());
        }
        if let Some(inputs) = &call.request.inputs {
            if inputs.mask.is_some() {
                return Err(unsupported("mask", ProviderKind::Stability));
            }
            if endpoint != "sd3" {
                return Err(unsupported("image", ProviderKind::Stability));
            }
            let first = &inputs.images[0];
            let part = Part::bytes(first.bytes.to_vec())
                .file_name(first.filename.clone())
                .mime_str(first.format.content_type())
                .map_err(|e| BackendError::BadResponse(e.to_string()))?;
            // image-to-image has no aspect ratio: it keeps the input's.
            form = Form::new()
                .text("prompt", prompt(call))
                .text("output_format", "png")
                .text("mode", "image-to-image")
                .text("strength", "0.6")
                .part("image", part);
            if let Some(m) = model {
                form = form.text("model", m.to_string());
            }
        }
        Ok((form, endpoint))
    }

    async fn one(&self, call: &UpstreamCall<'_>) -> Result<GeneratedImage, BackendError> {
        let r = &self.remote;
        let (form, endpoint) = self.form(call)?;
        let rb = r
            .http
            .post(format!("{}/stable-image/generate/{endpoint}", r.base))
            .bearer_auth(r.key())
            .header("accept", "application/json")
            .multipart(form);
        let answer = r.ok(call, rb).await?.json()?;
        match answer["finish_reason"].as_str() {
            Some("SUCCESS") | None => {}
            Some("CONTENT_FILTERED") => {
                return Err(policy_violation(
                    ProviderKind::Stability,
                    "CONTENT_FILTERED",
                ))
            }
            Some(other) => {
                return Err(BackendError::BadResponse(format!("finish_reason {other}")));
            }
        }
        let b64 = answer["image"]
            .as_str()
            .ok_or_else(|| BackendError::BadResponse("the answer has no image".into()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| BackendError::BadResponse("the image is not base64".into()))?;
        exact(bytes.into(), call.request.size, None)
    }
}

#[async_trait]
impl Backend for StabilityBackend {
    fn kind(&self) -> &'static str {
        "stability"
    }

    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        plain_images_only(call.request, ProviderKind::Stability)?;
        let images = fan_out(call.request.n, |_| self.one(&call)).await?;
        Ok(Generation { images, meta: None })
    }
}
