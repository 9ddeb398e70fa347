//! What an authenticated caller may do: model rights and limits per tenant and per key
//! (requests and images per minute with a burst, GCRA; concurrent requests), in process with
//! governor, or across replicas in Redis ([`redis`]) with a failure policy; OpenAI's
//! `x-ratelimit-*` headers describe where the caller stands.

mod redis;

pub use redis::RedisLimiter;

use std::sync::atomic::{AtomicU32, Ordering};

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::api::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::config::LimitsConfig;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

struct Limit {
    per_minute: u32,
    burst: u32,
    limiter: Limiter,
}

impl Limit {
    fn new(per_minute: Option<u32>, burst: Option<u32>) -> Option<Self> {
        let rate = NonZeroU32::new(per_minute?)?;
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
        Some(Limit {
            per_minute: rate.get(),
            burst: burst.get(),
            limiter: RateLimiter::direct(Quota::per_minute(rate).allow_burst(burst))
                .with_middleware::<StateInformationMiddleware>(),
        })
    }

    /// Where this limit stands after a decision.
    fn standing(&self, remaining: u32, reset: Duration) -> Standing {
        Standing {
            limit: self.per_minute,
            remaining,
            reset,
        }
    }

    fn after(&self, snapshot: &StateSnapshot) -> Standing {
        let remaining = snapshot.remaining_burst_capacity();
        // Until the bucket is full again: one cell per (60 s / per_minute).
        let per_cell = Duration::from_secs(60) / self.per_minute;
        self.standing(remaining, per_cell * self.burst.saturating_sub(remaining))
    }
}

/// One limit's `x-ratelimit-{limit,remaining,reset}-*` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

/// The rate-limit headers of an answer (the tighter of tenant and key when both apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<Standing>,
    pub images: Option<Standing>,
}

impl RateHeaders {
    /// Merges the standing of an images (`true`) or requests limit.
    pub(crate) fn merge_limit(&mut self, images: bool, s: Standing) {
        let slot = if images {
            &mut self.images
        } else {
            &mut self.requests
        };
        Self::merge(slot, s);
    }

    pub(crate) fn merge(slot: &mut Option<Standing>, s: Standing) {
        if slot.is_none_or(|old| s.remaining < old.remaining) {
            *slot = Some(s);
        }
    }

    /// Sets the headers on an answer: OpenAI's names and duration format (`6m0s`, `1s`,
    /// `250ms`). The names are built at compile time; the numbers are written without
    /// `format!`.
    pub fn insert_into(&self, headers: &mut http::HeaderMap) {
        use http::{HeaderName, HeaderValue};
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-images"),
                HeaderName::from_static("x-ratelimit-remaining-images"),
                HeaderName::from_static("x-ratelimit-reset-images"),
            ],
        ];
        for ([limit, remaining, reset], s) in NAMES.into_iter().zip([self.requests, self.images]) {
            if let Some(s) = s {
                headers.insert(limit, number_header(s.limit));
                headers.insert(remaining, number_header(s.remaining));
                let mut buf = DurationText::default();
                if let Ok(v) = HeaderValue::from_bytes(buf.go(s.reset)) {
                    headers.insert(reset, v);
                }
            }
        }
    }
}

/// A number as a header value, in one allocation (`HeaderValue::from(u32)` takes two: a
/// `BytesMut` and then the `Bytes` it is frozen into).
pub fn number_header(n: impl itoa::Integer) -> http::HeaderValue {
    let mut buf = itoa::Buffer::new();
    http::HeaderValue::from_str(buf.format(n)).unwrap_or(http::HeaderValue::from_static("0"))
}

/// A reset time as OpenAI writes it (`6m0s`, `1s`, `250ms`), on the stack: the rate headers
/// of every answer.
#[derive(Default)]
struct DurationText {
    buf: [u8; 32],
    len: usize,
}

impl DurationText {
    fn push(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(self.buf.len());
        self.buf[self.len..end].copy_from_slice(&bytes[..end - self.len]);
        self.len = end;
    }

    fn number(&mut self, n: impl itoa::Integer) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    fn go(&mut self, d: Duration) -> &[u8] {
        self.len = 0;
        if d < Duration::from_secs(1) {
            self.number(d.as_millis());
            self.push(b"ms");
        } else {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if secs >= 60 {
                self.number(secs / 60);
                self.push(b"m");
            }
            self.number(secs % 60);
            self.push(b"s");
        }
        &self.buf[..self.len]
    }
}

struct TenantLimits {
    config: LimitsConfig,
    requests: Option<Limit>,
    images: Option<Limit>,
}

impl TenantLimits {
    fn new(l: &LimitsConfig) -> Self {
        TenantLimits {
            config: l.clone(),
            requests: Limit::new(l.requests_per_minute, l.burst),
            images: Limit::new(l.images_per_minute, l.burst),
        }
    }
}

/// Limiters per tenant and per key, made on first use from the limits the principal carries
/// (gateway.yaml, the key store or a JWT), and remade when those limits change.
#[derive(Default)]
pub struct Policy {
    tenants: crate::FastDashMap<Arc<str>, Arc<TenantLimits>>,
    keys: crate::FastDashMap<Arc<str>, Arc<TenantLimits>>,
    /// Requests in flight per tenant and per key (looked up by the principal's own `Arc<str>`:
    /// no key string is built per request).
    tenants_in_flight: crate::FastDashMap<Arc<str>, Arc<AtomicU32>>,
    keys_in_flight: crate::FastDashMap<Arc<str>, Arc<AtomicU32>>,
    clock: DefaultClock,
    redis: Option<Arc<RedisLimiter>>,
}

/// Concurrency slots a request holds until it ends (dropped: given back).
#[derive(Default)]
pub struct Permits {
    /// The tenant's and the key's slots (when they limit concurrency).
    local: [Option<Arc<AtomicU32>>; 2],
    redis: Option<(Arc<RedisLimiter>, Vec<String>, String)>,
}

impl Drop for Permits {
    fn drop(&mut self) {
        for c in self.local.iter().flatten() {
            c.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((r, keys, member)) = self.redis.take() {
            if !keys.is_empty() {
                r.release(keys, member);
            }
        }
    }
}

impl Policy {
    pub fn new() -> Self {
        Policy::default()
    }

    /// Limits shared through Redis (with the in-process ones as the fail-open fallback).
    pub fn with_redis(redis: Option<Arc<RedisLimiter>>) -> Self {
        Policy {
            redis,
            ..Policy::default()
        }
    }

    /// Admits a request for `n` images against every limit of its tenant and key, in Redis
    /// when configured, else (or when Redis fails open) in process. `member` names the request
    /// (its concurrency slot) and `lease` bounds how long a slot outlives a crashed replica.
    pub async fn admit_request(
        &self,
        principal: &Principal,
        n: u32,
        member: &str,
        lease: Duration,
        headers: &mut RateHeaders,
    ) -> Result<Permits, ApiError> {
        if let Some(r) = &self.redis {
            // Boxed, like every remote step on the hot path: the request's future stays small
            // for the in-process path (it is moved whole into its task).
            match Box::pin(r.check(principal, n, member, lease, headers)).await {
                redis::Outcome::Admitted(keys) => {
                    return Ok(Permits {
                        local: [None, None],
                        redis: Some((r.clone(), keys, member.to_string())),
                    })
                }
                redis::Outcome::Refused(e) => return Err(e),
                redis::Outcome::Unavailable(why) => {
                    r.redis().warn(&why);
                    if r.redis().on_failure == crate::config::RedisFailure::Closed {
                        return Err(crate::store::redis::RedisUnavailable(why).into());
                    }
                }
            }
        }
        let permits = self.occupy(principal)?;
        self.admit(principal, n, headers)?;
        Ok(permits)
    }

    /// Takes a concurrency slot of the tenant and of the key (when they limit it).
    fn occupy(&self, principal: &Principal) -> Result<Permits, ApiError> {
        let mut permits = Permits::default();
        let scopes = [
            (
                &self.tenants_in_flight,
                "",
                &principal.tenant,
                Some(&principal.limits),
            ),
            (
                &self.keys_in_flight,
                "key ",
                &principal.key_id,
                principal.key_limits.as_ref(),
            ),
        ];
        for (slot, (map, label, id, limits)) in permits.local.iter_mut().zip(scopes) {
            let Some(max) = limits
                .and_then(|l| l.concurrent_requests)
                .filter(|m| *m > 0)
            else {
                continue;
            };
            let counter = match map.get(&**id) {
                Some(c) => c.clone(),
                None => map.entry(id.clone()).or_default().clone(),
            };
            if counter.fetch_add(1, Ordering::AcqRel) >= max {
                counter.fetch_sub(1, Ordering::AcqRel);
                let what = format!("{label}concurrent requests");
                crate::telemetry::metrics().rate_limited(&principal.tenant, &what);
                return Err(concurrency_refused(&what, max));
            }
            *slot = Some(counter);
        }
        Ok(permits)
    }

    /// Model rights: the same 404 for "no such model" and "not yours".
    pub fn check_model(&self, principal: &Principal, model: &str) -> Result<(), ApiError> {
        if principal.may_use(model) {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model))
        }
    }

    /// Takes one request and `n` images from the tenant's limits and then from the key's own
    /// (when it has them), or says when to retry. `headers` is filled either way.
    pub fn admit(
        &self,
        principal: &Principal,
        n: u32,
        headers: &mut RateHeaders,
    ) -> Result<(), ApiError> {
        let tenant = limiters(&self.tenants, &principal.tenant, &principal.limits);
        self.take(&tenant, principal, n, "", headers)?;
        if let Some(own) = &principal.key_limits {
            let key = limiters(&self.keys, &principal.key_id, own);
            self.take(&key, principal, n, "key ", headers)?;
        }
        Ok(())
    }

    fn take(
        &self,
        limits: &TenantLimits,
        principal: &Principal,
        n: u32,
        scope: &str,
        headers: &mut RateHeaders,
    ) -> Result<(), ApiError> {
        let refuse = |what: &str| {
            crate::telemetry::metrics().rate_limited(&principal.tenant, &format!("{scope}{what}"));
        };
        if let Some(l) = &limits.requests {
            match l.limiter.check() {
                Ok(snapshot) => RateHeaders::merge(&mut headers.requests, l.after(&snapshot)),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    RateHeaders::merge(&mut headers.requests, l.standing(0, wait));
                    refuse("requests");
                    return Err(limited(&format!("{scope}requests"), l.per_minute, wait));
                }
            }
        }
        if let Some(l) = &limits.images {
            let cells = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            match l.limiter.check_n(cells) {
                Ok(Ok(snapshot)) => RateHeaders::merge(&mut headers.images, l.after(&snapshot)),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    RateHeaders::merge(&mut headers.images, l.standing(0, wait));
                    refuse("images");
                    return Err(limited(&format!("{scope}images"), l.per_minute, wait));
                }
                Err(_) => {
                    refuse("images");
                    return Err(too_many_at_once(n, scope, l.per_minute));
                }
            }
        }
        Ok(())
    }
}

/// The limiters of one tenant or key, made on first use and remade when its limits change.
fn limiters(
    map: &crate::FastDashMap<Arc<str>, Arc<TenantLimits>>,
    id: &Arc<str>,
    limits: &LimitsConfig,
) -> Arc<TenantLimits> {
    if let Some(l) = map.get(id) {
        if l.config == *limits {
            return l.clone();
        }
    }
    // Made under the map's lock: two first requests must not each get a fresh limiter.
    let mut entry = map
        .entry(id.clone())
        .or_insert_with(|| Arc::new(TenantLimits::new(limits)));
    if entry.config != *limits {
        *entry = Arc::new(TenantLimits::new(limits));
    }
    entry.clone()
}

/// A request for more images than a limit's burst: it can never pass.
fn too_many_at_once(n: u32, scope: &str, per_minute: u32) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "This request asks for {n} images, more than the {scope}images-per-minute limit of {per_minute} allows at once."
        ),
    )
    .code("rate_limit_exceeded")
    .should_retry(false)
}

fn concurrency_refused(what: &str, max: u32) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "Rate limit exceeded for {what}: at most {max} at once. Please try again when one of them has finished."
        ),
    )
    .code("rate_limit_exceeded")
    .retry_after(Duration::from_secs(1))
}

fn limited(what: &str, per_minute: u32, wait: Duration) -> ApiError {
    let wait = wait.max(Duration::from_millis(1));
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "Rate limit exceeded for {what} per minute. Limit: {per_minute}/1min. Please try again in {:.3}s.",
            wait.as_secs_f64()
        ),
    )
    .code("rate_limit_exceeded")
    .retry_after(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_times_are_written_like_openai() {
        let go_duration = |d| String::from_utf8(DurationText::default().go(d).to_vec()).unwrap();
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "2s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(61)), "1m1s");
    }

    #[test]
    fn headers_count_down_and_the_tighter_limit_wins() {
        let policy = Policy::new();
        let principal = Principal {
            share: Default::default(),
            key_id: Arc::from("k"),
            tenant: Arc::from("t"),
            models: crate::auth::ModelSet::All,
            limits: Arc::new(LimitsConfig {
                requests_per_minute: Some(60),
                images_per_minute: Some(100),
                burst: None,
                ..Default::default()
            }),
            key_limits: Some(Arc::new(LimitsConfig {
                requests_per_minute: Some(3),
                images_per_minute: None,
                burst: None,
                ..Default::default()
            })),
        };
        let mut h = RateHeaders::default();
        policy.admit(&principal, 4, &mut h).unwrap();
        let r = h.requests.unwrap();
        assert_eq!(
            (r.limit, r.remaining),
            (3, 2),
            "the key's limit is the tighter one"
        );
        let i = h.images.unwrap();
        assert_eq!((i.limit, i.remaining), (100, 96));
        assert_eq!(i.reset, Duration::from_millis(600) * 4);
        let mut h = RateHeaders::default();
        policy.admit(&principal, 1, &mut h).unwrap();
        policy.admit(&principal, 1, &mut h).unwrap();
        let mut h = RateHeaders::default();
        assert!(policy.admit(&principal, 1, &mut h).is_err());
        assert_eq!(h.requests.unwrap().remaining, 0);
        let mut headers = http::HeaderMap::new();
        h.insert_into(&mut headers);
        assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
        assert_eq!(headers["x-ratelimit-limit-requests"], "3");
        assert!(headers.contains_key("x-ratelimit-reset-requests"));
    }
}
