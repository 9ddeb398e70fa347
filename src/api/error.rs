use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

/// The class of an error, which fixes the HTTP status and the OpenAI `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is wrong and retrying it unchanged cannot help.
    InvalidRequest,
    /// 401: missing, unknown or disabled API key.
    Authentication,
    /// 403: authenticated but not allowed (signed URL tampered/expired).
    Permission,
    /// 404: unknown model, route or file.
    NotFound,
    /// 405: a known path with the wrong method.
    MethodNotAllowed,
    /// 408: the request body did not arrive in time.
    RequestTimeout,
    /// 409: conflicts with the current state (an idempotent repeat in flight, a duplicate).
    Conflict,
    /// 422: well-formed but unusable here (an Idempotency-Key reused with another body).
    Unprocessable,
    /// 413: body over the configured limit.
    PayloadTooLarge,
    /// 429: a rate limit (ours or the upstream's).
    RateLimited,
    /// 429: budget exhausted.
    InsufficientQuota,
    /// 500: a bug or an internal failure of ours.
    Internal,
    /// 502: the upstream failed or answered something we cannot use.
    BadGateway,
    /// 503: no capacity right now, or the gateway is draining.
    Unavailable,
    /// 504: the upstream did not answer within the deadline.
    Timeout,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::Permission => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimited | ErrorKind::InsufficientQuota => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn default_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::Authentication
            | ErrorKind::Permission
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::RequestTimeout
            | ErrorKind::Conflict
            | ErrorKind::Unprocessable
            | ErrorKind::PayloadTooLarge => "invalid_request_error",
            ErrorKind::RateLimited => "requests",
            ErrorKind::InsufficientQuota => "insufficient_quota",
            ErrorKind::Internal => "server_error",
            ErrorKind::BadGateway | ErrorKind::Unavailable | ErrorKind::Timeout => "upstream_error",
        }
    }
}

/// An error as the client sees it: `{"error":{"message","type","param","code"}}` plus the
/// status and the retry headers. Every layer converts its own error into this once.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub error_type: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Sent as `retry-after` (whole seconds, rounded up) and `retry-after-ms`.
    pub retry_after: Option<Duration>,
    /// Sent as `x-should-retry`; the official SDKs honour it over their own rules.
    pub should_retry: Option<bool>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            error_type: kind.default_type().to_string(),
            param: None,
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn error_type(mut self, error_type: impl Into<String>) -> Self {
        self.error_type = error_type.into();
        self
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn should_retry(mut self, retry: bool) -> Self {
        self.should_retry = Some(retry);
        self
    }

    /// 400 naming the offending field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::InvalidRequest, message).param(param)
    }

    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Authentication, message).code("invalid_api_key")
    }

    /// The same answer for a model that does not exist and for one the caller may not use,
    /// so that model names do not leak across tenants.
    pub fn model_not_found(model: &str) -> Self {
        ApiError::new(
            ErrorKind::NotFound,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .param("model")
        .code("model_not_found")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Internal, message)
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let body = Body {
            error: Inner {
                message: &self.message,
                error_type: &self.error_type,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status())
    }
}

impl std::error::Error for ApiError {}
