//! Response building: JSON bodies, OpenAI-shaped errors with their retry headers, request ids.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Frame, SizeHint};
use serde::Serialize;

use crate::api::ApiError;

/// A stream of body chunks (server-sent events relayed as they arrive).
pub type ChunkStream = Pin<Box<dyn futures_core::Stream<Item = Bytes> + Send>>;

/// A response body: buffers sent in order with an exact length (large images go out as the
/// buffers they are held in, never concatenated), or a stream relayed as it arrives.
#[derive(Default)]
pub struct Body {
    chunks: VecDeque<Bytes>,
    remaining: u64,
    stream: Option<ChunkStream>,
}

impl Body {
    pub fn chunks(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Body {
            chunks,
            remaining,
            stream: None,
        }
    }

    pub fn empty() -> Self {
        Body::default()
    }

    pub fn stream(stream: ChunkStream) -> Self {
        Body {
            stream: Some(stream),
            ..Body::default()
        }
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::chunks([b])
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            self.remaining -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match self.stream.as_mut() {
            Some(stream) => stream
                .as_mut()
                .poll_next(cx)
                .map(|next| next.map(|c| Ok(Frame::data(c)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.stream.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.stream {
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(self.remaining),
        }
    }
}

pub use crate::api::REQUEST_ID;

/// An answer's body read back as JSON, for callers that serve a request in-process (the
/// batch runner, the console's playground); `Null` if it is not JSON.
pub async fn json_of(resp: Response<Body>) -> serde_json::Value {
    use http_body_util::BodyExt;
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, Bytes::from(bytes), "application/json"),
        Err(e) => error(&ApiError::internal(format!(
            "cannot encode the response: {e}"
        ))),
    }
}

pub fn with_type(
    status: StatusCode,
    body: impl Into<Body>,
    content_type: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    // Room for what the handler adds (request id, rate limits, routing): one allocation
    // instead of growing and rehashing twice.
    *resp.headers_mut() = HeaderMap::with_capacity(16);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn error(err: &ApiError) -> Response<Body> {
    let mut resp = with_type(err.status(), Bytes::from(err.to_json()), "application/json");
    let headers = resp.headers_mut();
    if let Some(after) = err.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        headers.insert(
            "retry-after-ms",
            HeaderValue::from(after.as_millis().max(1) as u64),
        );
    }
    if let Some(retry) = err.should_retry {
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    resp
}

/// The client's `x-request-id` when it is sane (1-128 of `[A-Za-z0-9._:-]`), else a new one.
pub fn request_id(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        let ok = !v.is_empty()
            && v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            return v.to_string();
        }
    }
    let id: [u8; 16] = rand::random();
    let mut hex = [0u8; 32];
    // Cannot fail: the buffer is exactly twice the input.
    let _ = hex::encode_to_slice(id, &mut hex);
    let mut out = String::with_capacity(36);
    out.push_str("req_");
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_req_and_32_hex_digits() {
        let a = request_id(&HeaderMap::new());
        let b = request_id(&HeaderMap::new());
        assert_ne!(a, b);
        for id in [a, b] {
            let hex = id.strip_prefix("req_").expect("req_ prefix");
            assert_eq!(hex.len(), 32, "{id}");
            assert!(hex
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123_X:9.z"));
        assert_eq!(request_id(&h), "abc-123_X:9.z");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(request_id(&h).starts_with("req_"));
        h.insert(REQUEST_ID, HeaderValue::from_str(&"a".repeat(129)).unwrap());
        assert!(request_id(&h).starts_with("req_"));
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }

    #[test]
    fn errors_carry_retry_headers() {
        let err = ApiError::new(crate::api::ErrorKind::RateLimited, "slow")
            .retry_after(std::time::Duration::from_millis(1200));
        let resp = error(&err);
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["retry-after-ms"], "1200");
    }
}
