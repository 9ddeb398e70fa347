//! What an authenticated caller may do: model rights and per-tenant rate limits (requests
//! and images per minute, GCRA via governor, in process).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::api::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::config::LimitsConfig;
use dashmap::DashMap;

struct Limit {
    per_minute: u32,
    limiter: DefaultDirectRateLimiter,
}

impl Limit {
    fn new(per_minute: Option<u32>, burst: Option<u32>) -> Option<Self> {
        let rate = NonZeroU32::new(per_minute?)?;
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
        Some(Limit {
            per_minute: rate.get(),
            limiter: RateLimiter::direct(Quota::per_minute(rate).allow_burst(burst)),
        })
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
    tenants: DashMap<Arc<str>, Arc<TenantLimits>>,
    keys: DashMap<Arc<str>, Arc<TenantLimits>>,
    clock: DefaultClock,
}

impl Policy {
    pub fn new() -> Self {
        Policy::default()
    }

    /// Model rights: the same 404 for "no such model" and "not yours".
    pub fn check_model(&self, principal: &Principal, model: &str) -> Result<(), ApiError> {
        if principal.may_use(model) {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model))
        }
    }

    /// Takes one request and `n` images from the tenant's limits, or says when to retry.
    /// Takes one request and `n` images from the tenant's limits and then from the key's own
    /// (when it narrows them), or says when to retry.
    pub fn admit(&self, principal: &Principal, n: u32) -> Result<(), ApiError> {
        let tenant = limiters(&self.tenants, &principal.tenant, &principal.limits);
        self.take(&tenant, principal, n, "")?;
        if let Some(own) = &principal.key_limits {
            let key = limiters(&self.keys, &principal.key_id, own);
            self.take(&key, principal, n, "key ")?;
        }
        Ok(())
    }

    fn take(
        &self,
        limits: &TenantLimits,
        principal: &Principal,
        n: u32,
        scope: &str,
    ) -> Result<(), ApiError> {
        if let Some(l) = &limits.requests {
            if let Err(not_until) = l.limiter.check() {
                let wait = not_until.wait_time_from(self.clock.now());
                crate::telemetry::metrics()
                    .rate_limited(&principal.tenant, &format!("{scope}requests"));
                return Err(limited(&format!("{scope}requests"), l.per_minute, wait));
            }
        }
        if let Some(l) = &limits.images {
            let cells = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            match l.limiter.check_n(cells) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    crate::telemetry::metrics()
                        .rate_limited(&principal.tenant, &format!("{scope}images"));
                    return Err(limited(&format!("{scope}images"), l.per_minute, wait));
                }
                Err(_) => {
                    crate::telemetry::metrics()
                        .rate_limited(&principal.tenant, &format!("{scope}images"));
                    return Err(ApiError::new(
                        ErrorKind::RateLimited,
                        format!(
                            "This request asks for {n} images, more than the {scope}images-per-minute limit of {} allows at once.",
                            l.per_minute
                        ),
                    )
                    .code("rate_limit_exceeded")
                    .should_retry(false));
                }
            }
        }
        Ok(())
    }
}

/// The limiters of one tenant or key, made on first use and remade when its limits change.
fn limiters(
    map: &DashMap<Arc<str>, Arc<TenantLimits>>,
    id: &Arc<str>,
    limits: &LimitsConfig,
) -> Arc<TenantLimits> {
    if let Some(l) = map.get(id) {
        if l.config == *limits {
            return l.clone();
        }
    }
    let fresh = Arc::new(TenantLimits::new(limits));
    map.insert(id.clone(), fresh.clone());
    fresh
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
