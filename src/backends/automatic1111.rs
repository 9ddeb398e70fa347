//! AUTOMATIC1111 / Forge / SD.Next: `POST /sdapi/v1/txt2img` (edits and variations:
//! `/sdapi/v1/img2img` with the uploaded image, and for a mask the inpainting fields, the mask
//! turned from OpenAI's alpha-0-means-edit into A1111's white-means-repaint), synchronous,
//! base64 images in the answer. `n` above the node's `max_batch` is split into several calls; a request past its
//! deadline (or abandoned by its client) interrupts the node's job.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::client::{read_capped, transport_error, MAX_ANSWER_BYTES};
use super::local::{self, CancelOnDrop};
use super::{
    Backend, BackendError, GeneratedImage, Generation, ImagePayload, RawBase64, UpstreamCall,
};
use crate::api::{EditInputs, Operation};
use crate::config::{A1111Config, LocalGeneration, Secret};
use base64::Engine;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub struct A1111Backend {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, Secret)>,
    max_batch: u32,
    edit_denoising: f32,
    variation_denoising: f32,
    sampler: Option<String>,
    generation: LocalGeneration,
    timeout: Duration,
    probe_interval: Duration,
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow, default)]
    images: Vec<RawBase64<'a>>,
    /// A JSON document inside a string (or "" on compatible servers).
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize, Default)]
struct Info {
    #[serde(default)]
    index_of_first_image: usize,
}

impl A1111Backend {
    pub fn new(c: &A1111Config, http: reqwest::Client) -> Self {
        A1111Backend {
            http,
            base: c.base_url.trim_end_matches('/').to_string(),
            auth: c.username.clone().zip(c.password.clone()),
            max_batch: c.max_batch.max(1),
            edit_denoising: c.edit_denoising_strength,
            variation_denoising: c.variation_denoising_strength,
            sampler: c.sampler.clone(),
            generation: c.generation(),
            timeout: c.timeout,
            probe_interval: c.probe_interval,
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.post(format!("{}{path}", self.base));
        match &self.auth {
            Some((user, pass)) => rb.basic_auth(user, Some(pass.expose())),
            None => rb,
        }
    }

    /// The txt2img body for one batch.
    pub fn body(
        &self,
        call: &UpstreamCall<'_>,
        prompt: &str,
        seed: u64,
        batch: u32,
    ) -> serde_json::Value {
        let r = call.request;
        let sampling = local::sampling(&self.generation, r);
        let mut body = json!({
            "prompt": prompt,
            "negative_prompt": self.generation.negative_prompt,
            "width": r.size.width,
            "height": r.size.height,
            "batch_size": batch,
            "n_iter": 1,
            "steps": sampling.steps,
            "cfg_scale": sampling.cfg,
            "seed": seed,
            "send_images": true,
            "save_images": false,
        });
        if let Some(sampler) = &self.sampler {
            body["sampler_name"] = sampler.as_str().into();
        }
        if let Some(ckpt) = &self.generation.checkpoint {
            body["override_settings"] = json!({"sd_model_checkpoint": ckpt});
            body["override_settings_restore_afterwards"] = false.into();
        }
        body
    }

    /// The img2img fields of an edit or variation: the first uploaded image (A1111 edits one
    /// image), resized to the request's size, and for a mask the inpainting fields.
    fn img2img_fields(
        &self,
        inputs: &EditInputs,
        mask: Option<&str>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let strength = match inputs.operation {
            Operation::Variation => self.variation_denoising,
            _ => self.edit_denoising,
        };
        let mut fields = serde_json::Map::new();
        fields.insert(
            "init_images".into(),
            json!([B64.encode(&inputs.images[0].bytes)]),
        );
        fields.insert("denoising_strength".into(), json!(strength));
        fields.insert("resize_mode".into(), json!(0));
        if let Some(mask) = mask {
            fields.insert("mask".into(), json!(mask));
            fields.insert("mask_blur".into(), json!(4));
            fields.insert("inpainting_fill".into(), json!(1));
            fields.insert("inpaint_full_res".into(), json!(false));
            fields.insert("inpainting_mask_invert".into(), json!(0));
        }
        fields
    }
}

/// OpenAI's mask (alpha 0 = edit here) as A1111 wants it: a grayscale PNG, white where the
/// image is repainted and black where it is kept; base64.
pub fn a1111_mask(openai_mask: &[u8]) -> Result<String, BackendError> {
    let mask = image::load_from_memory(openai_mask)
        .map_err(|e| BackendError::BadResponse(format!("unreadable mask: {e}")))?
        .to_rgba8();
    let converted = image::GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        image::Luma([if mask.get_pixel(x, y).0[3] == 0 {
            255
        } else {
            0
        }])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    converted
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| BackendError::BadResponse(format!("cannot encode the mask: {e}")))?;
    Ok(B64.encode(out.into_inner()))
}

fn map_status(status: u16, body: &[u8]) -> BackendError {
    // `{"error","detail","body","errors"}` from the middleware, `{"detail":[...]}` from FastAPI.
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .map(|v| {
            let text = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
            text("errors")
                .or_else(|| text("detail"))
                .unwrap_or_else(|| v["detail"].to_string())
        })
        .unwrap_or_default();
    match status {
        401 | 403 => BackendError::Unauthorized { status },
        429 => BackendError::RateLimited { retry_after: None },
        _ => BackendError::Status {
            status,
            message: detail,
        },
    }
}

#[async_trait]
impl Backend for A1111Backend {
    fn kind(&self) -> &'static str {
        "automatic1111"
    }

    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        super::translate::require_plain_png(call.request)?;
        let inputs = call.request.inputs.as_deref();
        let mask = match inputs.and_then(|i| i.mask.clone()) {
            Some(m) => Some(
                tokio::task::spawn_blocking(move || a1111_mask(&m.bytes))
                    .await
                    .map_err(|e| {
                        BackendError::BadResponse(format!("mask conversion failed: {e}"))
                    })??,
            ),
            None => None,
        };
        let path = if inputs.is_some() {
            "/sdapi/v1/img2img"
        } else {
            "/sdapi/v1/txt2img"
        };
        let prompt = local::prompt(&self.generation, call.request);
        let revised = (prompt != call.request.prompt).then(|| prompt.clone());
        let first_seed = local::seed(&self.generation, &call.request.prompt);
        let mut cancel = CancelOnDrop::new();
        cancel.add(self.post("/sdapi/v1/interrupt"));

        // One body for every batch (an upload's base64 is built and held once); each batch
        // changes only its size and seed.
        let mut body = self.body(&call, &prompt, first_seed, self.max_batch);
        if let (Some(inputs), Some(fields)) = (inputs, body.as_object_mut()) {
            fields.extend(self.img2img_fields(inputs, mask.as_deref()));
        }
        let mut images = Vec::with_capacity(call.request.n as usize);
        let mut remaining = call.request.n;
        while remaining > 0 {
            let batch = remaining.min(self.max_batch);
            // A1111 gives image i of a batch seed+i; later batches continue the sequence.
            let seed = first_seed + u64::from(call.request.n - remaining);
            let timeout = self.timeout.min(call.remaining());
            if timeout.is_zero() {
                return Err(BackendError::Timeout);
            }
            body["batch_size"] = batch.into();
            body["seed"] = seed.into();
            let resp = call
                .headers(self.post(path))
                .json(&body)
                .timeout(timeout)
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let e = transport_error(e);
                    // Only a call that may still be running on the node needs interrupting.
                    if !matches!(e, BackendError::Timeout) {
                        cancel.disarm();
                    }
                    return Err(e);
                }
            };
            let status = resp.status().as_u16();
            let body = read_capped(resp, MAX_ANSWER_BYTES).await?;
            if !(200..300).contains(&status) {
                cancel.disarm();
                return Err(map_status(status, &body));
            }
            let answer: Answer<'_> = serde_json::from_slice(&body)
                .map_err(|e| BackendError::BadResponse(format!("invalid JSON ({e})")))?;
            let first = answer
                .info
                .as_deref()
                .and_then(|i| serde_json::from_str::<Info>(i).ok())
                .unwrap_or_default()
                .index_of_first_image;
            let got: Vec<_> = answer
                .images
                .into_iter()
                .skip(first)
                .take(batch as usize)
                .map(|b64| b64.into_bytes(&body))
                .collect();
            if got.len() < batch as usize {
                cancel.disarm();
                return Err(BackendError::BadResponse(format!(
                    "asked for {batch} images, got {}",
                    got.len()
                )));
            }
            images.extend(got.into_iter().map(|b64| GeneratedImage {
                payload: ImagePayload::Base64(b64),
                revised_prompt: revised.clone(),
            }));
            remaining -= batch;
        }
        cancel.disarm();
        Ok(Generation { images, meta: None })
    }

    fn probe_interval(&self) -> Option<Duration> {
        Some(self.probe_interval)
    }

    async fn probe(&self) -> Result<(), BackendError> {
        let mut rb = self
            .http
            .get(format!(
                "{}/sdapi/v1/progress?skip_current_image=true",
                self.base
            ))
            .timeout(Duration::from_secs(5));
        if let Some((user, pass)) = &self.auth {
            rb = rb.basic_auth(user, Some(pass.expose()));
        }
        let resp = rb.send().await.map_err(transport_error)?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(map_status(status, &[]))
        }
    }
}
