//! Google's image models, on the Gemini API (`x-goog-api-key`) or Vertex AI (an OAuth token
//! minted from a service-account key: an RS256 JWT exchanged at the key's `token_uri`, cached
//! until a minute before it expires). Native image models (`gemini-*-image`) use
//! `generateContent` with image output, one image per call, `imageConfig.aspectRatio` and
//! `imageSize`; input images in `parts` make an edit. Imagen (`imagen-*`) uses `predict`, up
//! to four images per call. Sizes go as the nearest aspect ratio and come back scaled to the
//! exact size. `IMAGE_SAFETY`, a `blockReason` or Imagen's empty answer are policy
//! violations; `usageMetadata` becomes OpenAI's `usage`, image tokens counted apart.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    aspect_ratio, batched, exact, fan_out, plain_images_only, policy_violation, prompt,
    unsupported, Remote,
};
use crate::api::Operation;
use crate::backends::{
    AnswerMeta, Backend, BackendError, GeneratedImage, Generation, UpstreamCall,
};
use crate::config::{ProviderConfig, ProviderKind};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const NATIVE_RATIOS: &[&str] = &[
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];
const IMAGEN_RATIOS: &[&str] = &["1:1", "3:4", "4:3", "9:16", "16:9"];

#[derive(Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default = "default_token_uri")]
    token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

/// Vertex AI sign-in: the key, and the token it last minted.
struct Vertex {
    account: ServiceAccount,
    key: jsonwebtoken::EncodingKey,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

pub struct GeminiBackend {
    remote: Remote,
    vertex: Option<Vertex>,
}

impl GeminiBackend {
    pub fn new(c: &ProviderConfig, mut remote: Remote) -> Result<Self, String> {
        let vertex = match &c.service_account {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let account: ServiceAccount = serde_json::from_str(&text)
                    .map_err(|e| format!("{} is not a service-account key: {e}", path.display()))?;
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key.as_bytes())
                    .map_err(|e| format!("{}: private_key: {e}", path.display()))?;
                let (project, location) = (
                    c.project.clone().unwrap_or_default(),
                    c.location.clone().unwrap_or_default(),
                );
                let root = c
                    .base_url
                    .clone()
                    .unwrap_or_else(|| format!("https://{location}-aiplatform.googleapis.com/v1"));
                remote.base = format!(
                    "{}/projects/{project}/locations/{location}/publishers/google",
                    root.trim_end_matches('/')
                );
                Some(Vertex {
                    account,
                    key,
                    token: tokio::sync::Mutex::new(None),
                })
            }
        };
        Ok(GeminiBackend { remote, vertex })
    }

    /// The call with its credentials: the API key, or a (cached) Vertex access token.
    async fn authorized(
        &self,
        call: &UpstreamCall<'_>,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let Some(v) = &self.vertex else {
            return Ok(rb.header("x-goog-api-key", self.remote.key()));
        };
        let mut cached = v.token.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() + Duration::from_secs(60) < *until {
                return Ok(rb.bearer_auth(token));
            }
        }
        let now = crate::clock::now_unix();
        let claims = json!({
            "iss": v.account.client_email,
            "scope": "https://www.googleapis.com/auth/cloud-platform",
            "aud": v.account.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &v.key,
        )
        .map_err(|e| BackendError::Connect(format!("cannot sign the Vertex token request: {e}")))?;
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", jwt.as_str()),
        ];
        let a = self
            .remote
            .send(
                call,
                self.remote.http.post(&v.account.token_uri).form(&form),
            )
            .await?;
        if !(200..300).contains(&a.status) {
            // A refused service account is our credentials problem, whatever the status.
            return Err(BackendError::Unauthorized { status: a.status });
        }
        let t = a.json()?;
        let token = t["access_token"]
            .as_str()
            .ok_or_else(|| {
                BackendError::BadResponse("the token answer has no access_token".into())
            })?
            .to_string();
        let ttl = Duration::from_secs(t["expires_in"].as_u64().unwrap_or(3600));
        *cached = Some((token.clone(), Instant::now() + ttl));
        Ok(rb.bearer_auth(token))
    }

    async fn post(
        &self,
        call: &UpstreamCall<'_>,
        method: &str,
        body: &Value,
    ) -> Result<Value, BackendError> {
        let model = call.upstream_model.unwrap_or(&call.request.model);
        let url = format!("{}/models/{model}:{method}", self.remote.base);
        let rb = self
            .authorized(call, self.remote.http.post(url).json(body))
            .await?;
        self.remote.ok(call, rb).await?.json()
    }

    /// `imageSize` for the longer side asked for.
    fn image_size(call: &UpstreamCall<'_>) -> &'static str {
        match call.request.size.width.max(call.request.size.height) {
            0..=1024 => "1K",
            1025..=2048 => "2K",
            _ => "4K",
        }
    }

    /// One native image.
    async fn native(
        &self,
        call: &UpstreamCall<'_>,
    ) -> Result<(GeneratedImage, Option<Value>), BackendError> {
        let mut parts = vec![json!({"text": prompt(call)})];
        if let Some(inputs) = &call.request.inputs {
            if inputs.mask.is_some() {
                return Err(unsupported("mask", ProviderKind::Gemini));
            }
            for image in &inputs.images {
                parts.push(json!({"inline_data": {
                    "mime_type": image.format.content_type(),
                    "data": B64.encode(&image.bytes),
                }}));
            }
        }
        let body = json!({
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": {
                "responseModalities": ["TEXT", "IMAGE"],
                "candidateCount": 1,
                "imageConfig": {
                    "aspectRatio": aspect_ratio(call.request.size, NATIVE_RATIOS),
                    "imageSize": Self::image_size(call),
                },
            },
        });
        let answer = self.post(call, "generateContent", &body).await?;
        if let Some(reason) = answer["promptFeedback"]["blockReason"].as_str() {
            return Err(policy_violation(ProviderKind::Gemini, reason));
        }
        let candidate = &answer["candidates"][0];
        let finish = candidate["finishReason"].as_str().unwrap_or("STOP");
        let image = candidate["content"]["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|p| p.get("inlineData").or_else(|| p.get("inline_data")))
            .and_then(|d| d["data"].as_str());
        let Some(data) = image else {
            return Err(match finish {
                "IMAGE_SAFETY" | "SAFETY" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" => {
                    policy_violation(ProviderKind::Gemini, finish)
                }
                other => BackendError::BadResponse(format!(
                    "no image in the answer (finishReason {other})"
                )),
            });
        };
        let bytes = B64
            .decode(data)
            .map_err(|_| BackendError::BadResponse("the image is not base64".into()))?;
        let text: String = candidate["content"]["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["text"].as_str())
            .collect();
        let revised = (!text.trim().is_empty()).then(|| text.trim().to_string());
        Ok((
            exact(bytes.into(), call.request.size, revised)?,
            usage(&answer["usageMetadata"]),
        ))
    }

    /// Up to four Imagen images.
    async fn imagen(
        &self,
        call: &UpstreamCall<'_>,
        count: u32,
    ) -> Result<Vec<GeneratedImage>, BackendError> {
        if call.request.inputs.is_some() {
            return Err(unsupported("image", ProviderKind::Gemini));
        }
        let body = json!({
            "instances": [{"prompt": prompt(call)}],
            "parameters": {
                "sampleCount": count,
                "aspectRatio": aspect_ratio(call.request.size, IMAGEN_RATIOS),
                "includeRaiReason": true,
                "outputOptions": {"mimeType": "image/png"},
            },
        });
        let answer = self.post(call, "predict", &body).await?;
        let images: Vec<&str> = answer["predictions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["bytesBase64Encoded"].as_str())
            .collect();
        if images.is_empty() {
            let reason = answer["predictions"][0]["raiFilteredReason"]
                .as_str()
                .unwrap_or("every image was filtered");
            return Err(policy_violation(ProviderKind::Gemini, reason));
        }
        images
            .into_iter()
            .map(|b| {
                let bytes = B64
                    .decode(b)
                    .map_err(|_| BackendError::BadResponse("an image is not base64".into()))?;
                exact(bytes.into(), call.request.size, None)
            })
            .collect()
    }
}

/// Gemini's `usageMetadata` as OpenAI's `usage` (image tokens apart from text tokens).
pub fn usage(meta: &Value) -> Option<Value> {
    let input = meta["promptTokenCount"].as_u64()?;
    let output = meta["candidatesTokenCount"].as_u64().unwrap_or(0);
    let by_modality = |details: &Value, modality: &str| -> u64 {
        details
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["modality"] == modality)
            .filter_map(|d| d["tokenCount"].as_u64())
            .sum()
    };
    let image_out = by_modality(&meta["candidatesTokensDetails"], "IMAGE");
    let image_in = by_modality(&meta["promptTokensDetails"], "IMAGE");
    Some(json!({
        "input_tokens": input,
        "input_tokens_details": {"text_tokens": input.saturating_sub(image_in), "image_tokens": image_in},
        "output_tokens": output,
        "output_tokens_details": {"text_tokens": output.saturating_sub(image_out), "image_tokens": image_out},
        "total_tokens": input + output,
    }))
}

#[async_trait]
impl Backend for GeminiBackend {
    fn kind(&self) -> &'static str {
        "gemini"
    }

    /// Native image models edit (input images in `parts`); Imagen refuses edits per call.
    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        plain_images_only(call.request, ProviderKind::Gemini)?;
        let model = call.upstream_model.unwrap_or(&call.request.model);
        let n = call.request.n;
        if model.starts_with("imagen") {
            let images = batched(n, 4, |count| self.imagen(&call, count)).await?;
            return Ok(Generation { images, meta: None });
        }
        let made = fan_out(n, |_| self.native(&call)).await?;
        let mut meta: Option<AnswerMeta> = None;
        let mut images = Vec::with_capacity(made.len());
        for (image, used) in made {
            images.push(image);
            meta = Some(AnswerMeta::merge_usage(meta, used));
        }
        Ok(Generation { images, meta })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_image_tokens_apart() {
        let u = usage(&json!({"promptTokenCount": 12, "candidatesTokenCount": 1300,
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}, {"modality": "TEXT", "tokenCount": 10}]}))
        .unwrap();
        assert_eq!(u["output_tokens_details"]["image_tokens"], 1290);
        assert_eq!(u["output_tokens_details"]["text_tokens"], 10);
        assert_eq!(u["input_tokens_details"]["text_tokens"], 12);
    }
}
