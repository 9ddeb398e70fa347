//! The same limits across replicas, in Redis: one Lua script checks every limit of a request
//! (GCRA for requests and images per minute, a leased sorted set for concurrent requests) and
//! takes from all of them or from none, in one round trip. Redis's own clock decides, so the
//! replicas' clocks do not matter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{limited, too_many_at_once, RateHeaders, Standing};
use crate::api::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::config::{LimitsConfig, RedisConfig, RedisFailure};

const SCRIPT: &str = r#"
-- ARGV[1]: member id of this request, ARGV[2]: concurrency lease (ms);
-- then 4 per key: kind ('r' rate, 'c' concurrency), a, b, cost.
-- rate: a = ms per cell, b = burst (cells); concurrency: a = max in flight.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {1}
local tats = {}
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local b = tonumber(ARGV[base + 3])
  local cost = tonumber(ARGV[base + 4])
  if kind == 'r' then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + cost * a
    local allow_at = new_tat - b * a
    if allow_at > now then
      return {0, i, math.ceil(allow_at - now)}
    end
    tats[i] = new_tat
    out[#out + 1] = math.floor((now - allow_at) / a)
    out[#out + 1] = math.ceil(new_tat - now)
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local c = redis.call('ZCARD', KEYS[i])
    if c + 1 > a then
      return {0, i, 1000}
    end
    out[#out + 1] = a - c - 1
    out[#out + 1] = 0
  end
end
local lease = tonumber(ARGV[2])
for i = 1, #KEYS do
  if tats[i] then
    redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
  else
    redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], lease)
  end
end
return out
"#;

/// One limit of a request, as the script sees it.
struct Spec {
    key: String,
    rate: bool,
    a: f64,
    b: u32,
    cost: u32,
    /// For messages and headers.
    what: String,
    per_minute: u32,
    images: bool,
}

pub enum Outcome {
    /// Admitted; these concurrency slots are ours until released.
    Admitted(Vec<String>),
    Refused(ApiError),
    /// Redis could not answer: the failure policy applies.
    Unavailable(String),
}

pub struct RedisLimiter {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    /// No new attempt before this (Unix ms) after a failed one.
    retry_at: AtomicU64,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    pub on_failure: RedisFailure,
    last_warned: AtomicU64,
}

impl RedisLimiter {
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Self>, String> {
        let client =
            redis::Client::open(cfg.url.expose()).map_err(|e| format!("state.redis.url: {e}"))?;
        Ok(Arc::new(RedisLimiter {
            client,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            retry_at: AtomicU64::new(0),
            script: redis::Script::new(SCRIPT),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            on_failure: cfg.on_failure,
            last_warned: AtomicU64::new(0),
        }))
    }

    /// The connection, made on first use (the gateway starts while Redis is down and follows
    /// its failure policy until Redis is back).
    async fn connection(&self) -> Result<ConnectionManager, String> {
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let now = now_ms();
        if now < self.retry_at.load(Ordering::Acquire) {
            return Err("not connected (retrying shortly)".into());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        if !matches!(made, Ok(Ok(_))) {
            self.retry_at.store(now_ms() + 1000, Ordering::Release);
        }
        match made {
            Ok(Ok(c)) => {
                tracing::info!("connected to Redis: limits are shared by every replica");
                self.conn.store(Some(Arc::new(c.clone())));
                Ok(c)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out connecting".into()),
        }
    }

    fn specs(&self, principal: &Principal, n: u32) -> Result<Vec<Spec>, ApiError> {
        let mut specs = Vec::new();
        let mut add = |scope: &str, id: &str, l: &LimitsConfig| -> Result<(), ApiError> {
            let label = if scope == "t" { "" } else { "key " };
            for (what, per_minute, cost) in [
                ("requests", l.requests_per_minute, 1),
                ("images", l.images_per_minute, n),
            ] {
                let Some(rate) = per_minute.filter(|r| *r > 0) else {
                    continue;
                };
                let burst = l.burst.filter(|b| *b > 0).unwrap_or(rate);
                if cost > burst {
                    return Err(too_many_at_once(n, label, rate));
                }
                specs.push(Spec {
                    key: format!("{}rl:{scope}:{id}:{what}", self.prefix),
                    rate: true,
                    a: 60_000.0 / f64::from(rate),
                    b: burst,
                    cost,
                    what: format!("{label}{what}"),
                    per_minute: rate,
                    images: what == "images",
                });
            }
            if let Some(max) = l.concurrent_requests.filter(|m| *m > 0) {
                specs.push(Spec {
                    key: format!("{}cc:{scope}:{id}", self.prefix),
                    rate: false,
                    a: f64::from(max),
                    b: 0,
                    cost: 1,
                    what: format!("{label}concurrent requests"),
                    per_minute: max,
                    images: false,
                });
            }
            Ok(())
        };
        add("t", &principal.tenant, &principal.limits)?;
        if let Some(own) = &principal.key_limits {
            add("k", &principal.key_id, own)?;
        }
        Ok(specs)
    }

    /// Runs a Lua script (EVALSHA, loading it when Redis does not know it yet) within the
    /// configured timeout; the error says why Redis could not answer.
    pub async fn eval(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[String],
    ) -> Result<Vec<i64>, String> {
        let mut conn = self.connection().await?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(a.as_str());
        }
        match tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Checks and takes every limit of the request at once.
    pub async fn check(
        &self,
        principal: &Principal,
        n: u32,
        member: &str,
        lease: Duration,
        headers: &mut RateHeaders,
    ) -> Outcome {
        let specs = match self.specs(principal, n) {
            Ok(s) => s,
            Err(e) => return Outcome::Refused(e),
        };
        if specs.is_empty() {
            return Outcome::Admitted(Vec::new());
        }
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => return Outcome::Unavailable(e),
        };
        let mut inv = self.script.prepare_invoke();
        inv.arg(member).arg(lease.as_millis() as u64);
        for s in &specs {
            inv.key(&s.key)
                .arg(if s.rate { "r" } else { "c" })
                .arg(s.a)
                .arg(s.b)
                .arg(s.cost);
        }
        let answer =
            tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn)).await;
        let out = match answer {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Outcome::Unavailable(e.to_string()),
            Err(_) => return Outcome::Unavailable("timed out".into()),
        };
        if out.first() == Some(&0) {
            let i = out.get(1).copied().unwrap_or(1).max(1) as usize - 1;
            let wait = Duration::from_millis(out.get(2).copied().unwrap_or(1000).max(1) as u64);
            let Some(s) = specs.get(i) else {
                return Outcome::Unavailable("unexpected script answer".into());
            };
            crate::telemetry::metrics().rate_limited(&principal.tenant, &s.what);
            if s.rate {
                headers.merge_limit(
                    s.images,
                    Standing {
                        limit: s.per_minute,
                        remaining: 0,
                        reset: wait,
                    },
                );
                return Outcome::Refused(limited(&s.what, s.per_minute, wait));
            }
            return Outcome::Refused(super::concurrency_refused(&s.what, s.per_minute));
        }
        let mut slots = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let remaining = out.get(1 + 2 * i).copied().unwrap_or(0).max(0) as u32;
            let reset = out.get(2 + 2 * i).copied().unwrap_or(0).max(0) as u64;
            if s.rate {
                headers.merge_limit(
                    s.images,
                    Standing {
                        limit: s.per_minute,
                        remaining,
                        reset: Duration::from_millis(reset),
                    },
                );
            } else {
                slots.push(s.key.clone());
            }
        }
        Outcome::Admitted(slots)
    }

    /// Gives back concurrency slots (a request ended).
    pub fn release(self: &Arc<Self>, keys: Vec<String>, member: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = me.connection().await else {
                return; // the lease runs out by itself
            };
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.zrem(k, &member).ignore();
            }
            let _ = tokio::time::timeout(me.timeout, pipe.query_async::<()>(&mut conn)).await;
        });
    }

    /// Says (at most every 10 s) that Redis is unreachable and what the gateway does instead.
    pub fn warn(&self, why: &str) {
        crate::telemetry::metrics().redis_failure();
        let now = crate::metering::budget::now_unix();
        let last = self.last_warned.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            match self.on_failure {
                RedisFailure::Open => tracing::warn!(
                    error = %why,
                    "Redis unreachable: rate limits fail open (each replica applies them in process); budgets held in Redis are refused until it is back"
                ),
                RedisFailure::Closed => tracing::error!(
                    error = %why,
                    "Redis unreachable: failing closed, requests are refused with 503"
                ),
            }
        }
        // A broken connection is remade at the next check.
        if !why.starts_with("not connected") && !why.contains("timed out") {
            self.conn.store(None);
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn unavailable() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "The shared limits and budgets store is unavailable; please retry.",
    )
    .retry_after(Duration::from_secs(1))
}
