//! OpenAI-compatible upstreams (OpenAI itself and anything that speaks its Images API) and
//! Azure OpenAI, which differs only in URL shape and auth header.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::{read_capped, transport_error, Endpoint, HttpClient, MAX_ANSWER_BYTES};
use super::translate;
use super::{
    AnswerMeta, Backend, BackendError, EventStream, GeneratedImage, Generation, ImagePayload,
    RawBase64, UpstreamCall,
};
use crate::api::ImageRequest;
use crate::config::{AzureConfig, Dialect, OpenAiConfig, Secret};
use base64::Engine;

enum Flavor {
    OpenAi {
        /// Parsed once: a string would be parsed (and IDNA-mapped) on every request.
        endpoint: Result<Endpoint, String>,
    },
    Azure {
        base: String,
        api_version: String,
        default_deployment: Option<String>,
    },
}

pub struct OpenAiBackend {
    http: HttpClient,
    flavor: Flavor,
    headers: HeaderMap,
    timeout: Duration,
}

fn header_map(extra: &std::collections::BTreeMap<String, Secret>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in extra {
        // Validated at config load.
        if let (Ok(n), Ok(mut v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value.expose()),
        ) {
            v.set_sensitive(true);
            headers.insert(n, v);
        }
    }
    headers
}

fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl OpenAiBackend {
    pub fn openai(c: &OpenAiConfig, http: HttpClient) -> Self {
        let mut headers = header_map(&c.headers);
        if let Some(v) = c
            .api_key
            .as_ref()
            .and_then(|k| sensitive(&format!("Bearer {}", k.expose())))
        {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        if let Some(v) = c.organization.as_deref().and_then(sensitive) {
            headers.insert("openai-organization", v);
        }
        if let Some(v) = c.project.as_deref().and_then(sensitive) {
            headers.insert("openai-project", v);
        }
        OpenAiBackend {
            http,
            flavor: Flavor::OpenAi {
                endpoint: {
                    let url = format!("{}/images/generations", c.base_url.trim_end_matches('/'));
                    Endpoint::parse(&url).map_err(|_| url)
                },
            },
            headers,
            timeout: c.timeout,
        }
    }

    pub fn azure(c: &AzureConfig, http: HttpClient) -> Self {
        let mut headers = header_map(&c.headers);
        if let Some(v) = sensitive(c.api_key.expose()) {
            headers.insert("api-key", v);
        }
        OpenAiBackend {
            http,
            flavor: Flavor::Azure {
                base: c.endpoint.trim_end_matches('/').to_string(),
                api_version: c.api_version.clone(),
                default_deployment: c.deployment.clone(),
            },
            headers,
            timeout: c.timeout,
        }
    }

    /// The model named in the body: the target's upstream model, else the public name; none
    /// for Azure (the deployment in the URL names it).
    fn body_model<'a>(&self, call: &UpstreamCall<'a>) -> Option<&'a str> {
        match self.flavor {
            Flavor::OpenAi { .. } => Some(call.upstream_model.unwrap_or(&call.request.model)),
            Flavor::Azure { .. } => None,
        }
    }

    /// The endpoint of this call: the backend's own, borrowed (OpenAI), or built for the
    /// call's deployment (Azure).
    fn endpoint(&self, call: &UpstreamCall<'_>) -> Result<Cow<'_, Endpoint>, String> {
        let model = &call.request.model;
        match &self.flavor {
            // Validated at load.
            Flavor::OpenAi { endpoint } => {
                endpoint.as_ref().map(Cow::Borrowed).map_err(Clone::clone)
            }
            Flavor::Azure {
                base,
                api_version,
                default_deployment,
            } => {
                // The upstream model of an Azure target is its deployment; a target that names
                // none uses the backend's default deployment.
                let deployment = call
                    .upstream_model
                    .or(default_deployment.as_deref())
                    .unwrap_or(model);
                Endpoint::parse(&format!(
                    "{base}/openai/deployments/{}/images/generations?api-version={}",
                    url::form_urlencoded::byte_serialize(deployment.as_bytes()).collect::<String>(),
                    url::form_urlencoded::byte_serialize(api_version.as_bytes())
                        .collect::<String>()
                ))
                .map(Cow::Owned)
            }
        }
    }

    /// The headers of an upstream request: the backend's own (credentials), then this call's
    /// request id and trace context.
    fn request_headers(&self, call: &UpstreamCall<'_>) -> HeaderMap {
        let mut headers = self.headers.clone();
        call.add_headers(&mut headers);
        headers
    }

    /// One upstream call with a body built as JSON values; sets `model` where the upstream
    /// wants it.
    async fn send(&self, call: &UpstreamCall<'_>, mut body: Value) -> Result<Bytes, BackendError> {
        self.set_model(call, &mut body);
        match &call.request.inputs {
            Some(inputs) => self.send_upload(call, body, inputs).await,
            None => self.send_json(call, &body).await,
        }
    }

    /// An edit or variation (see `upload`): the raw answer on success.
    async fn send_upload(
        &self,
        call: &UpstreamCall<'_>,
        body: Value,
        inputs: &crate::api::EditInputs,
    ) -> Result<Bytes, BackendError> {
        let timeout = self.timeout.min(call.remaining());
        if timeout.is_zero() {
            return Err(BackendError::Timeout);
        }
        let resp = self
            .upload_request(call, body, inputs)?
            .timeout(timeout)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let answer = read_capped(resp, MAX_ANSWER_BYTES).await?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(map_error(status, &headers, &answer))
        }
    }

    fn set_model(&self, call: &UpstreamCall<'_>, body: &mut Value) {
        if let Some(model) = self.body_model(call) {
            body["model"] = model.into();
        }
    }

    /// One upstream call: the raw answer on success.
    async fn send_json(
        &self,
        call: &UpstreamCall<'_>,
        body: &impl Serialize,
    ) -> Result<Bytes, BackendError> {
        let timeout = self.timeout.min(call.remaining());
        if timeout.is_zero() {
            return Err(BackendError::Timeout);
        }
        let endpoint = self.endpoint(call).map_err(BackendError::Connect)?;
        let json = serde_json::to_vec(body)
            .map_err(|e| BackendError::BadResponse(format!("request not serializable: {e}")))?;
        let reply = self
            .http
            .post_json(
                &endpoint,
                self.request_headers(call),
                Bytes::from(json),
                timeout,
                MAX_ANSWER_BYTES,
            )
            .await?;
        if (200..300).contains(&reply.status) {
            Ok(reply.body)
        } else {
            Err(map_error(reply.status, &reply.headers, &reply.body))
        }
    }

    /// A DALL·E request on a GPT image upstream (see `translate`).
    async fn translated(&self, call: &UpstreamCall<'_>) -> Result<Generation, BackendError> {
        let (req, t) = (call.request, call.translation);
        let upstream_size = t.sizes.upstream_size(req.size);
        let (body, sent_prompt) = translate::gpt_body_from_dalle(req, t, upstream_size);
        let mut calls = Vec::new();
        let mut left = req.n;
        while left > 0 {
            let n = left.min(t.max_n);
            let mut b = body.clone();
            b["n"] = n.into();
            calls.push(self.send(call, b));
            left -= n;
        }
        let answers = futures_util::future::try_join_all(calls).await?;
        let mut generation = Generation::default();
        for answer in &answers {
            let part = parse_answer(answer)?;
            generation.images.extend(part.images);
            let usage = part.meta.and_then(|m| m.usage);
            generation.meta = Some(AnswerMeta::merge_usage(generation.meta.take(), usage));
        }
        // DALL·E clients get exactly the size they asked for.
        if upstream_size != req.size {
            let want = req.size;
            let images = std::mem::take(&mut generation.images);
            generation.images = tokio::task::spawn_blocking(move || {
                images
                    .into_iter()
                    .map(|img| {
                        let bytes = match img.payload {
                            ImagePayload::Base64(b64) => {
                                Bytes::from(B64.decode(&b64).map_err(|_| {
                                    BackendError::BadResponse("invalid base64 image".into())
                                })?)
                            }
                            ImagePayload::Bytes(b) => b,
                            ImagePayload::Url(_) => {
                                return Err(BackendError::BadResponse(
                                    "a GPT image upstream answered with a URL".into(),
                                ))
                            }
                        };
                        Ok(GeneratedImage {
                            payload: ImagePayload::Bytes(translate::resize_exact(&bytes, want)?),
                            revised_prompt: img.revised_prompt,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| BackendError::BadResponse(format!("resizing failed: {e}")))??;
        }
        // DALL·E 3 answers carry the prompt actually sent (with the style sentence).
        if req.style.is_some() {
            for img in &mut generation.images {
                img.revised_prompt = Some(sent_prompt.clone());
            }
        }
        Ok(generation)
    }
}

/// The body of the contract's own dialect, written straight to JSON (no map of values).
#[derive(Serialize)]
struct DalleBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    prompt: &'a str,
    n: u32,
    #[serde(serialize_with = "as_text")]
    size: crate::api::Size,
    response_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    style: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

impl<'a> DalleBody<'a> {
    fn new(r: &'a ImageRequest, model: Option<&'a str>) -> Self {
        DalleBody {
            model,
            prompt: &r.prompt,
            n: r.n,
            size: r.size,
            response_format: r.response_format.as_str(),
            quality: r.quality.map(|q| q.as_str()),
            style: r.style.map(|s| s.as_str()),
            user: r.user.as_deref(),
        }
    }
}

fn as_text<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    data: Vec<AnswerImage<'a>>,
    #[serde(default)]
    background: Option<String>,
    #[serde(default)]
    output_format: Option<String>,
    #[serde(default)]
    quality: Option<String>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct AnswerImage<'a> {
    #[serde(default)]
    url: Option<String>,
    #[serde(default, borrow)]
    b64_json: Option<RawBase64<'a>>,
    #[serde(default)]
    revised_prompt: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: UpstreamError,
}

#[derive(Deserialize, Default)]
struct UpstreamError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    param: Option<String>,
    /// A string at OpenAI, sometimes a number elsewhere.
    #[serde(default)]
    code: Option<Value>,
}

/// `retry-after-ms` (float ms), else `retry-after` in seconds, else OpenAI's reset header of
/// whichever limit is exhausted (`x-ratelimit-reset-requests: 6m0s`).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let get = |name: &str| text(name)?.parse::<f64>().ok();
    let secs = get("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| get("retry-after"));
    if let Some(secs) = secs {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    ["requests", "tokens"]
        .iter()
        .filter(|kind| text(&format!("x-ratelimit-remaining-{kind}")) == Some("0"))
        .filter_map(|kind| go_duration(text(&format!("x-ratelimit-reset-{kind}"))?))
        .max()
}

/// Go-style durations as OpenAI sends them: `1s`, `6m0s`, `12ms`, `1h2m3.5s`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..split].parse().ok()?;
        rest = &rest[split..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total > 0.0).then(|| Duration::from_secs_f64(total.min(3600.0)))
}

fn map_error(status: u16, headers: &reqwest::header::HeaderMap, body: &[u8]) -> BackendError {
    let err = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_default();
    let code = err.code.map(|c| match c {
        Value::String(s) => s,
        other => other.to_string(),
    });
    match status {
        400 => {
            // Azure says `contentFilter`; clients know OpenAI's code.
            let code = match code.as_deref() {
                Some("contentFilter") | Some("content_filter") => {
                    Some("content_policy_violation".to_string())
                }
                _ => code,
            };
            BackendError::Rejected {
                message: err
                    .message
                    .unwrap_or_else(|| "The upstream provider rejected the request.".into()),
                error_type: Some(
                    err.error_type
                        .unwrap_or_else(|| "invalid_request_error".to_string()),
                ),
                code,
                param: err.param,
            }
        }
        401 | 403 => BackendError::Unauthorized { status },
        408 => BackendError::Timeout,
        429 => BackendError::RateLimited {
            retry_after: retry_after(headers),
        },
        _ => BackendError::Status {
            status,
            message: err.message.unwrap_or_default(),
        },
    }
}

fn parse_answer(body: &Bytes) -> Result<Generation, BackendError> {
    let answer: Answer<'_> = serde_json::from_slice(body)
        .map_err(|e| BackendError::BadResponse(format!("invalid JSON ({e})")))?;
    if answer.data.is_empty() {
        return Err(BackendError::BadResponse("no images in the answer".into()));
    }
    let images = answer
        .data
        .into_iter()
        .map(|img| {
            let payload = match (img.b64_json, img.url) {
                (Some(b64), _) => ImagePayload::Base64(b64.into_bytes(body)),
                (None, Some(url)) => ImagePayload::Url(url),
                (None, None) => {
                    return Err(BackendError::BadResponse(
                        "an image has neither url nor b64_json".into(),
                    ))
                }
            };
            Ok(GeneratedImage {
                payload,
                revised_prompt: img.revised_prompt,
            })
        })
        .collect::<Result<_, _>>()?;
    let meta = AnswerMeta {
        background: answer.background,
        output_format: answer.output_format,
        quality: answer.quality,
        size: answer.size,
        usage: answer.usage,
    };
    Ok(Generation {
        images,
        meta: Some(meta),
    })
}

#[async_trait]
impl Backend for OpenAiBackend {
    fn kind(&self) -> &'static str {
        match self.flavor {
            Flavor::OpenAi { .. } => "openai",
            Flavor::Azure { .. } => "azure",
        }
    }

    /// Generations, edits and variations (a variation on a GPT image upstream is an edit).
    fn can(&self, _operation: crate::api::Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        let req = call.request;
        match (call.dialect, &req.gpt) {
            (Dialect::DallE, None) if req.inputs.is_some() => {
                let body = serde_json::to_value(DalleBody::new(req, self.body_model(&call)))
                    .map_err(|e| BackendError::BadResponse(format!("request: {e}")))?;
                parse_answer(&self.send(&call, body).await?)
            }
            (Dialect::DallE, None) => {
                let body = DalleBody::new(req, self.body_model(&call));
                parse_answer(&self.send_json(&call, &body).await?)
            }
            (Dialect::DallE, Some(_)) => {
                let body = translate::dalle_body_from_gpt(req)?;
                parse_answer(&self.send(&call, body).await?)
            }
            (Dialect::GptImage, Some(g)) => {
                parse_answer(&self.send(&call, translate::gpt_body(req, g)).await?)
            }
            (Dialect::GptImage, None) => self.translated(&call).await,
        }
    }

    /// GPT image upstreams stream themselves: their events are relayed byte for byte as they
    /// arrive. Everything else answers whole, as completed events.
    async fn generate_stream(&self, call: UpstreamCall<'_>) -> Result<EventStream, BackendError> {
        let (Dialect::GptImage, Some(g)) = (call.dialect, &call.request.gpt) else {
            return super::whole_as_events(self, call).await;
        };
        let mut body = translate::gpt_body(call.request, g);
        let timeout = call.remaining();
        if timeout.is_zero() {
            return Err(BackendError::Timeout);
        }
        self.set_model(&call, &mut body);
        let request = match &call.request.inputs {
            Some(inputs) => self.upload_request(&call, body, inputs)?,
            None => {
                let endpoint = self.endpoint(&call).map_err(BackendError::Connect)?;
                self.http
                    .reqwest()
                    .post(endpoint.url().clone())
                    .headers(self.request_headers(&call))
                    .json(&body)
            }
        };
        let resp = request
            .header(http::header::ACCEPT, "text/event-stream")
            .timeout(timeout)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let headers = resp.headers().clone();
            let answer = read_capped(resp, MAX_ANSWER_BYTES).await?;
            return Err(map_error(status, &headers, &answer));
        }
        let relay = futures_util::StreamExt::scan(resp.bytes_stream(), false, |failed, chunk| {
            let out = match chunk {
                _ if *failed => None,
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    *failed = true;
                    tracing::warn!(error = %e.without_url(), "upstream event stream broke off");
                    // The SDK raises an APIError for a data object with an "error" member.
                    let event = json!({"type": "error", "error": {
                        "message": "The upstream provider's event stream broke off.",
                        "type": "upstream_error", "param": null, "code": "upstream_error"}});
                    Some(Bytes::from(format!("event: error\ndata: {event}\n\n")))
                }
            };
            std::future::ready(out)
        });
        Ok(Box::pin(relay))
    }
}

mod upload;

#[cfg(test)]
mod tests;
