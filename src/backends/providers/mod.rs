//! Remote image providers beyond OpenAI, one file each (`gemini`, `bfl`, `fal`, `stability`,
//! `replicate`), and what they share: the HTTP call with its deadline, error mapping (a
//! provider's moderation outcome is OpenAI's `content_policy_violation`; spent credits a 502
//! that is not retried), downloads of URL outputs through the SSRF-guarded fetcher, the
//! client's exact size by scaling, aspect ratios, and `n` as parallel calls for providers that
//! make one image per call.

pub mod bfl;
pub mod fal;
pub mod gemini;
pub mod poll;
pub mod replicate;
pub mod stability;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::client::{read_reply, transport_error, MAX_ANSWER_BYTES};
use super::translate::resize_exact;
use super::Download;
use super::{BackendError, GeneratedImage, ImagePayload, UpstreamCall};
use crate::api::{ImageRequest, Size, Style};
use crate::config::{ImageUrlPolicy, ProviderConfig, ProviderKind, Secret};
use poll::PollPolicy;

/// What every provider backend holds.
pub struct Remote {
    pub kind: ProviderKind,
    pub http: reqwest::Client,
    pub base: String,
    pub key: Option<Secret>,
    pub timeout: Duration,
    pub poll: PollPolicy,
    pub policy: ImageUrlPolicy,
    pub fetcher: Arc<dyn Download>,
}

/// A whole answer.
pub type Answer = super::client::Reply;

impl Answer {
    pub fn json(&self) -> Result<Value, BackendError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            BackendError::BadResponse(format!("the answer is not the expected JSON ({e})"))
        })
    }
}

impl Remote {
    pub fn new(
        kind: ProviderKind,
        c: &ProviderConfig,
        http: reqwest::Client,
        fetcher: Arc<dyn Download>,
    ) -> Self {
        Remote {
            kind,
            http,
            base: c.base_url(kind),
            key: c.api_key.clone(),
            timeout: c.timeout,
            poll: PollPolicy {
                first: c.poll_interval,
                max: c.max_poll_interval,
            },
            policy: c.image_url_policy(kind),
            fetcher,
        }
    }

    pub fn key(&self) -> &str {
        self.key.as_ref().map_or("", |k| k.expose())
    }

    /// Sends one call within both the per-call timeout and the request's deadline.
    pub async fn send(
        &self,
        call: &UpstreamCall<'_>,
        rb: reqwest::RequestBuilder,
    ) -> Result<Answer, BackendError> {
        let timeout = self.timeout.min(call.remaining());
        if timeout.is_zero() {
            return Err(BackendError::Timeout);
        }
        let resp = call
            .headers(rb)
            .timeout(timeout)
            .send()
            .await
            .map_err(transport_error)?;
        read_reply(resp, MAX_ANSWER_BYTES).await
    }

    /// Sends a call and maps a non-2xx answer to its error.
    pub async fn ok(
        &self,
        call: &UpstreamCall<'_>,
        rb: reqwest::RequestBuilder,
    ) -> Result<Answer, BackendError> {
        let a = self.send(call, rb).await?;
        if (200..300).contains(&a.status) {
            Ok(a)
        } else {
            Err(error_for(self.kind, a.status, &a.headers, &a.body))
        }
    }

    /// Downloads an output URL (trusted hosts only, size-capped, within the deadline).
    pub async fn download(
        &self,
        url: &str,
        call: &UpstreamCall<'_>,
    ) -> Result<Bytes, BackendError> {
        if let Some(data) = url.strip_prefix("data:") {
            let b64 = data.split_once(",").map(|(_, b)| b).unwrap_or_default();
            return base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                .map(Bytes::from)
                .map_err(|_| BackendError::BadResponse("an output data URI is not base64".into()));
        }
        self.fetcher
            .download(url, &self.policy, call.deadline)
            .await
            .map_err(|e| BackendError::BadResponse(format!("cannot download the output: {e}")))
    }

    /// Downloads every output URL at once, each scaled to the exact size asked.
    pub async fn download_all(
        &self,
        urls: &[impl AsRef<str>],
        call: &UpstreamCall<'_>,
    ) -> Result<Vec<GeneratedImage>, BackendError> {
        let each = urls.iter().map(|u| async move {
            let bytes = self.download(u.as_ref(), call).await?;
            exact(bytes, call.request.size, None)
        });
        futures_util::future::join_all(each)
            .await
            .into_iter()
            .collect()
    }

    /// A URL the provider handed back, used only when it points at the API's own host (the
    /// provider's key goes with it); else `fallback`.
    pub fn own_url(&self, given: Option<&str>, fallback: String) -> String {
        let host = |u: &str| {
            url::Url::parse(u)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
        };
        match given {
            Some(u) if host(u).is_some() && host(u) == host(&self.base) => u.to_string(),
            _ => fallback,
        }
    }
}

/// The request's prompt, with a DALL·E `style` as a sentence (providers have no style field);
/// a variation's is the target's `variation_prompt`.
pub fn prompt(call: &UpstreamCall<'_>) -> String {
    let r = call.request;
    if r.operation() == crate::api::Operation::Variation {
        return call.translation.variation_prompt.clone();
    }
    match r.style {
        Some(Style::Vivid) => format!("{} {}", r.prompt, call.translation.vivid),
        Some(Style::Natural) => format!("{} {}", r.prompt, call.translation.natural),
        None => r.prompt.clone(),
    }
}

/// The client's exact size, by scaling (and cropping to fill) when the provider made another.
pub fn exact(
    bytes: Bytes,
    size: Size,
    revised_prompt: Option<String>,
) -> Result<GeneratedImage, BackendError> {
    let fitted = resize_exact(&bytes, size)?;
    Ok(GeneratedImage {
        payload: ImagePayload::Bytes(fitted),
        revised_prompt,
    })
}

/// The ratio in `allowed` (`"16:9"`) nearest to `size`'s, by the log of the ratios.
pub fn aspect_ratio(size: Size, allowed: &[&'static str]) -> &'static str {
    let want = (f64::from(size.width) / f64::from(size.height)).ln();
    let ratio = |r: &str| {
        let (w, h) = r.split_once(':').unwrap_or(("1", "1"));
        (w.parse::<f64>().unwrap_or(1.0) / h.parse::<f64>().unwrap_or(1.0)).ln()
    };
    allowed
        .iter()
        .copied()
        .min_by(|a, b| (ratio(a) - want).abs().total_cmp(&(ratio(b) - want).abs()))
        .unwrap_or("1:1")
}

/// `n` images from a provider that makes up to `per` per call: the calls at once, each asked
/// for its share (`one(count)`), the images in order.
pub async fn batched<F, Fut>(n: u32, per: u32, one: F) -> Result<Vec<GeneratedImage>, BackendError>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<GeneratedImage>, BackendError>>,
{
    let batches = fan_out(n.div_ceil(per), |j| one((n - j * per).min(per))).await?;
    Ok(batches.into_iter().flatten().collect())
}

/// Runs `one(i)` for each of `n` images at once; the first failure fails the request.
pub async fn fan_out<T, F, Fut>(n: u32, one: F) -> Result<Vec<T>, BackendError>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let all = futures_util::future::join_all((0..n).map(one)).await;
    all.into_iter().collect()
}

/// OpenAI's answer to a moderated request.
pub fn policy_violation(provider: ProviderKind, detail: &str) -> BackendError {
    BackendError::Rejected {
        message: format!(
            "Your request was rejected as a result of the image provider's safety system \
             ({}: {detail}).",
            provider.as_str()
        ),
        error_type: Some("invalid_request_error".into()),
        code: Some("content_policy_violation".into()),
        param: Some("prompt".into()),
    }
}

/// A request field the provider cannot honour.
pub fn unsupported(param: &str, provider: ProviderKind) -> BackendError {
    BackendError::Rejected {
        message: format!(
            "Invalid '{param}': not supported by the {} backend serving this model.",
            provider.as_str()
        ),
        error_type: Some("invalid_request_error".into()),
        code: Some("unsupported_parameter".into()),
        param: Some(param.into()),
    }
}

/// What a GPT image request asks that a provider making plain images cannot give.
pub fn plain_images_only(req: &ImageRequest, provider: ProviderKind) -> Result<(), BackendError> {
    super::translate::require_plain_png(req).map_err(|e| match e {
        BackendError::Rejected { param, .. } => {
            unsupported(param.as_deref().unwrap_or("output_format"), provider)
        }
        other => other,
    })
}

/// The provider's error text, from whichever shape it uses: `{"error":{"message"}}` (Google),
/// `{"detail": "…" | [{"msg"}]}` (BFL, fal), `{"errors": [...]}` (Stability), `{"title",
/// "detail"}` (Replicate).
pub fn error_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    };
    let s = |v: &Value| v.as_str().map(str::to_string);
    s(&v["error"]["message"])
        .or_else(|| s(&v["detail"]))
        .or_else(|| {
            v["detail"].as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["msg"].as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .or_else(|| {
            v["errors"].as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .or_else(|| s(&v["title"]))
        .or_else(|| s(&v["message"]))
        .unwrap_or_else(|| "no message".into())
}

/// A non-2xx answer as an error: moderation as OpenAI's policy error, 401/403 as our
/// credentials, 402 as spent credits, 429 with its `retry-after`, 400/422 as the upstream's
/// refusal, anything else as a failed upstream.
pub fn error_for(
    kind: ProviderKind,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> BackendError {
    let text = error_text(body);
    let lower = text.to_ascii_lowercase();
    let moderated = lower.contains("moderat") || lower.contains("safety") || lower.contains("nsfw");
    if moderated && matches!(status, 400 | 403 | 422) {
        return policy_violation(kind, &text);
    }
    match status {
        401 | 403 => BackendError::Unauthorized { status },
        402 => BackendError::Exhausted(format!("{}: {text}", kind.as_str())),
        429 => BackendError::RateLimited {
            retry_after: super::openai::retry_after(headers),
        },
        400 | 404 | 413 | 422 => BackendError::Rejected {
            message: format!("The {} provider refused the request: {text}", kind.as_str()),
            error_type: Some("invalid_request_error".into()),
            code: Some("upstream_rejected".into()),
            param: None,
        },
        _ => BackendError::Status {
            status,
            message: text,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_ratios_are_the_nearest() {
        let all = ["1:1", "3:4", "4:3", "9:16", "16:9"];
        assert_eq!(aspect_ratio(Size::new(1024, 1024), &all), "1:1");
        assert_eq!(aspect_ratio(Size::new(1792, 1024), &all), "16:9");
        assert_eq!(aspect_ratio(Size::new(1024, 1536), &all), "3:4");
        assert_eq!(aspect_ratio(Size::new(1536, 1024), &all), "4:3");
    }

    #[test]
    fn error_shapes_give_their_text() {
        assert_eq!(
            error_text(br#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#),
            "bad"
        );
        assert_eq!(
            error_text(br#"{"detail":[{"loc":["body","prompt"],"msg":"field required"}]}"#),
            "field required"
        );
        assert_eq!(
            error_text(br#"{"id":"x","name":"bad_request","errors":["prompt: cannot be empty"]}"#),
            "prompt: cannot be empty"
        );
        assert_eq!(
            error_text(br#"{"title":"Invalid version","detail":"no","status":422}"#),
            "no"
        );
        let e = error_for(ProviderKind::Stability, 403, &Default::default(), br#"{"name":"content_moderation","errors":["Your request was flagged by our content moderation system"]}"#);
        assert!(
            matches!(e, BackendError::Rejected { code: Some(c), .. } if c == "content_policy_violation")
        );
        assert!(matches!(
            error_for(
                ProviderKind::Bfl,
                402,
                &Default::default(),
                br#"{"detail":"Insufficient credits"}"#
            ),
            BackendError::Exhausted(_)
        ));
    }
}
