//! Upstreams behind one [`Backend`] trait. One file per kind; adding a kind touches this
//! directory and the config enum, nothing else.

mod automatic1111;
pub mod client;
pub mod comfyui;
mod h1;
mod local;
mod openai;
mod pool;
pub mod providers;
mod sandbox;
pub mod translate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::api::{ApiError, ErrorKind, ImageRequest, Operation};
use crate::config::{BackendConfig, ConfigError, Dialect, ProviderKind};

pub use client::HttpClient;
use translate::Translation;

pub use automatic1111::A1111Backend;
pub use comfyui::ComfyBackend;
pub use openai::OpenAiBackend;
pub use sandbox::SandboxBackend;

/// Downloads a provider's output URL under a backend's URL policy (the SSRF-guarded fetcher of
/// `images::`, handed to the backends by the compile step so they need not import it).
#[async_trait]
pub trait Download: Send + Sync {
    async fn download(
        &self,
        url: &str,
        policy: &crate::config::ImageUrlPolicy,
        deadline: Instant,
    ) -> Result<Bytes, String>;
}

/// Server-sent event bytes for the client, as they arrive.
pub type EventStream = std::pin::Pin<Box<dyn futures_core::Stream<Item = Bytes> + Send>>;

/// What a backend is asked to do: a validated request plus where it goes.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamCall<'a> {
    pub request: &'a ImageRequest,
    /// Model name (Azure: deployment) the route target names; `None` means the backend's
    /// default (Azure: its configured deployment; elsewhere: the public model name).
    pub upstream_model: Option<&'a str>,
    /// Our request id, forwarded as `x-request-id`.
    pub request_id: &'a str,
    /// The request's overall deadline; a backend never waits past it.
    pub deadline: Instant,
    /// The dialect the upstream speaks (openai/azure).
    pub dialect: Dialect,
    pub translation: &'a Translation,
    /// W3C trace context (`traceparent`, `tracestate`) for the upstream request.
    pub trace_headers: &'a [(String, String)],
}

impl UpstreamCall<'_> {
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Adds this call's request id and trace context to an upstream request.
    pub fn add_headers(&self, headers: &mut http::HeaderMap) {
        if let Ok(v) = http::HeaderValue::from_str(self.request_id) {
            headers.insert(crate::api::REQUEST_ID, v);
        }
        for (k, v) in self.trace_headers {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
    }

    /// The same, on a reqwest request.
    pub fn headers(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let mut headers = http::HeaderMap::new();
        self.add_headers(&mut headers);
        rb.headers(headers)
    }
}

/// Images as the upstream returned them; `images::` turns them into what the client asked for.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub images: Vec<GeneratedImage>,
    /// GPT image answers' top-level fields (`background`, `usage`, ...), when the upstream
    /// gave them.
    pub meta: Option<AnswerMeta>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerMeta {
    pub background: Option<String>,
    pub output_format: Option<String>,
    pub quality: Option<String>,
    pub size: Option<String>,
    /// Token usage as the upstream reported it (kept for metering).
    pub usage: Option<serde_json::Value>,
}

impl AnswerMeta {
    /// Adds the usage of one more upstream call (a split `n`) to `meta`.
    pub fn merge_usage(meta: Option<AnswerMeta>, usage: Option<serde_json::Value>) -> AnswerMeta {
        let mut meta = meta.unwrap_or_default();
        meta.usage = match (meta.usage.take(), usage) {
            (Some(a), Some(b)) => Some(add_json_numbers(a, b)),
            (a, b) => a.or(b),
        };
        meta
    }
}

/// Sums numeric leaves of two JSON objects of the same shape (token counts).
fn add_json_numbers(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            Value::from(x.as_u64().unwrap_or(0) + y.as_u64().unwrap_or(0))
        }
        (Value::Object(mut x), Value::Object(y)) => {
            for (k, v) in y {
                let merged = match x.remove(&k) {
                    Some(old) => add_json_numbers(old, v),
                    None => v,
                };
                x.insert(k, merged);
            }
            Value::Object(x)
        }
        (a, _) => a,
    }
}

#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub payload: ImagePayload,
    pub revised_prompt: Option<String>,
}

/// Base64 text in an upstream's JSON answer, borrowed from the answer's buffer: no copy of the
/// megabytes and no UTF-8 pass over them (`images::` checks the base64 alphabet, which is
/// ASCII, before the text is used). A newtype because serde's `borrow` reaches a `Cow` only as
/// a field's own type: an `Option<Cow<str>>` or `Vec<Cow<str>>` is always copied.
#[derive(serde::Deserialize)]
pub(crate) struct RawBase64<'a>(#[serde(borrow)] std::borrow::Cow<'a, [u8]>);

impl RawBase64<'_> {
    /// The text as `Bytes`: a slice of `body` (the buffer it was parsed from) when borrowed,
    /// a copy only when the upstream escaped something in it.
    pub(crate) fn into_bytes(self, body: &Bytes) -> Bytes {
        match self.0 {
            std::borrow::Cow::Borrowed(b) => body.slice_ref(b),
            std::borrow::Cow::Owned(v) => Bytes::from(v),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ImagePayload {
    /// Decoded image bytes (a binary answer, or rendered locally).
    Bytes(Bytes),
    /// Base64 text as the upstream sent it (kept as is: b64 -> b64 makes no copy).
    Base64(Bytes),
    /// A URL the upstream hosts.
    Url(String),
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;

    /// Whether this backend can serve `operation`. Routing never sends an edit or a variation
    /// to a backend that says no.
    fn can(&self, operation: Operation) -> bool {
        operation == Operation::Generation
    }

    /// Generates, or, when `call.request.inputs` is set, edits or varies the uploaded images.
    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError>;

    /// Server-sent events for `stream: true`. Backends that cannot stream answer whole, as
    /// one `image_generation.completed` event per image.
    async fn generate_stream(&self, call: UpstreamCall<'_>) -> Result<EventStream, BackendError> {
        whole_as_events(self, call).await
    }

    /// How often [`Backend::probe`] runs; `None`: this kind has no active probe.
    fn probe_interval(&self) -> Option<Duration> {
        None
    }

    /// A cheap health check; a failing node takes no new requests until it passes again.
    async fn probe(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Generates the whole answer, then sends it as the events a streaming upstream would.
pub async fn whole_as_events<B: Backend + ?Sized>(
    backend: &B,
    call: UpstreamCall<'_>,
) -> Result<EventStream, BackendError> {
    let request = call.request.clone();
    let generation = backend.generate(call).await?;
    let events = translate::completed_events(&request, generation)?;
    Ok(Box::pin(futures_util::stream::iter(events)))
}

/// How an upstream call failed, in terms the client-facing mapping needs.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The upstream refused the request itself (400, e.g. content policy): passed through.
    #[error("upstream rejected the request: {message}")]
    Rejected {
        message: String,
        error_type: Option<String>,
        code: Option<String>,
        param: Option<String>,
    },
    /// Our credentials were refused (401/403): a gateway problem, never the client's.
    #[error("upstream refused our credentials (HTTP {status})")]
    Unauthorized { status: u16 },
    #[error("upstream rate limited the request")]
    RateLimited { retry_after: Option<Duration> },
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    #[error("upstream answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("upstream answer unusable: {0}")]
    BadResponse(String),
    /// A local node refused or failed the workflow (ComfyUI `node_errors`, execution error).
    #[error("workflow failed on the node: {0}")]
    Workflow(String),
    /// The provider account is out of credits (BFL 402 and the like): an ops problem that a
    /// retry does not fix.
    #[error("upstream account out of credits: {0}")]
    Exhausted(String),
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Rejected {
                message,
                error_type,
                code,
                param,
            } => {
                let mut err = ApiError::new(ErrorKind::InvalidRequest, message);
                if let Some(t) = error_type {
                    err = err.error_type(t);
                }
                err.code = code;
                err.param = param;
                err
            }
            BackendError::Unauthorized { .. } => ApiError::new(
                ErrorKind::BadGateway,
                "The upstream provider refused the gateway's credentials. This is a gateway \
                 configuration problem; please contact its operators.",
            )
            .code("upstream_auth_failed")
            .should_retry(false),
            BackendError::RateLimited { retry_after } => {
                let after = retry_after.unwrap_or(Duration::from_secs(1));
                ApiError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "The upstream provider is rate limiting requests for this model. Please retry after {} s.",
                        after.as_secs_f64().ceil() as u64
                    ),
                )
                .code("rate_limit_exceeded")
                .retry_after(after)
            }
            BackendError::Timeout => ApiError::new(
                ErrorKind::Timeout,
                "The upstream provider did not answer in time.",
            )
            .code("upstream_timeout"),
            BackendError::Connect(_) => ApiError::new(
                ErrorKind::BadGateway,
                "The gateway could not connect to the upstream provider.",
            )
            .code("upstream_unreachable"),
            BackendError::Status { status, .. } => ApiError::new(
                ErrorKind::BadGateway,
                format!("The upstream provider failed (HTTP {status})."),
            )
            .code("upstream_error"),
            BackendError::Workflow(detail) => ApiError::new(
                ErrorKind::BadGateway,
                format!("The image node could not run the workflow: {detail}."),
            )
            .code("upstream_workflow_error")
            .should_retry(false),
            BackendError::Exhausted(_) => ApiError::new(
                ErrorKind::BadGateway,
                "The upstream provider's account for this model is out of credits. This is a \
                 gateway billing problem; please contact its operators.",
            )
            .code("upstream_credits_exhausted")
            .should_retry(false),
            BackendError::BadResponse(detail) => ApiError::new(
                ErrorKind::BadGateway,
                format!("The upstream provider returned an unusable answer: {detail}."),
            )
            .code("upstream_error"),
        }
    }
}

/// Builds the backend a config entry describes (in the compile step, once per config
/// generation); errors name their path under `backends.NAME`. `http` is shared by all remote
/// backends, so a rebuilt backend keeps its connections.
pub fn build(
    name: &str,
    config: &BackendConfig,
    http: &HttpClient,
    download: &Arc<dyn Download>,
) -> Result<Arc<dyn Backend>, Vec<ConfigError>> {
    let remote = |kind| {
        let (_, c) = config.provider().expect("a provider kind");
        providers::Remote::new(kind, c, http.reqwest().clone(), download.clone())
    };
    Ok(match config {
        BackendConfig::Openai(c) => Arc::new(OpenAiBackend::openai(c, http.clone())),
        BackendConfig::Azure(c) => Arc::new(OpenAiBackend::azure(c, http.clone())),
        BackendConfig::Sandbox(c) => Arc::new(SandboxBackend::new(c)),
        BackendConfig::Automatic1111(c) => Arc::new(A1111Backend::new(c, http.reqwest().clone())),
        BackendConfig::Comfyui(c) => Arc::new(ComfyBackend::new(
            c,
            http.reqwest().clone(),
            &format!("backends.{name}"),
        )?),
        BackendConfig::Gemini(c) => Arc::new(
            providers::gemini::GeminiBackend::new(c, remote(ProviderKind::Gemini)).map_err(
                |e| {
                    vec![ConfigError::new(
                        format!("backends.{name}.service_account"),
                        e,
                    )]
                },
            )?,
        ),
        BackendConfig::Bfl(_) => {
            Arc::new(providers::bfl::BflBackend::new(remote(ProviderKind::Bfl)))
        }
        BackendConfig::Fal(_) => {
            Arc::new(providers::fal::FalBackend::new(remote(ProviderKind::Fal)))
        }
        BackendConfig::Stability(_) => Arc::new(providers::stability::StabilityBackend::new(
            remote(ProviderKind::Stability),
        )),
        BackendConfig::Replicate(c) => Arc::new(providers::replicate::ReplicateBackend::new(
            c,
            remote(ProviderKind::Replicate),
        )),
    })
}
