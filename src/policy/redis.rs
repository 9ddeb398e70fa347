//! The same limits across replicas, in Redis: one Lua script checks every limit of a request
//! (GCRA for requests and images per minute, a leased sorted set for concurrent requests) and
//! takes from all of them or from none, in one round trip. Redis's own clock decides, so the
//! replicas' clocks do not matter.

use std::sync::Arc;
use std::time::Duration;

use super::{limited, too_many_at_once, RateHeaders, Standing};
use crate::api::ApiError;
use crate::auth::Principal;
use crate::config::LimitsConfig;
use crate::store::redis::Redis;

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
    redis: Arc<Redis>,
    script: redis::Script,
}

impl RedisLimiter {
    pub fn new(redis: Arc<Redis>) -> Arc<Self> {
        Arc::new(RedisLimiter {
            redis,
            script: redis::Script::new(SCRIPT),
        })
    }

    /// The connection and its failure policy.
    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
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
                    key: format!("{}rl:{scope}:{id}:{what}", self.redis.prefix()),
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
                    key: format!("{}cc:{scope}:{id}", self.redis.prefix()),
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
        let mut conn = match self.redis.connection().await {
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
        let answer = tokio::time::timeout(
            self.redis.timeout(),
            inv.invoke_async::<Vec<i64>>(&mut conn),
        )
        .await;
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
            let Ok(mut conn) = me.redis.connection().await else {
                return; // the lease runs out by itself
            };
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.zrem(k, &member).ignore();
            }
            let _ =
                tokio::time::timeout(me.redis.timeout(), pipe.query_async::<()>(&mut conn)).await;
        });
    }
}
