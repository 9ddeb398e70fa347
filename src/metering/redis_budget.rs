//! Budgets in Redis (with `state.redis`): one Lua script holds, settles and seeds a budget
//! atomically. Holds are leases (a sorted set of request ids by expiry plus their amounts), so
//! a replica that dies mid-request gives its holds back when the lease runs out. What is spent
//! is also kept in the database by the usage ledger, and an empty Redis (restarted, flushed) is
//! seeded from there on first use.

use std::sync::Arc;
use std::time::Duration;

use super::budget::Hold;
use crate::policy::RedisLimiter;

const SCRIPT: &str = r#"
-- KEYS[1]: budget hash {spent, held}; KEYS[2]: holds by expiry (zset); KEYS[3]: hold amounts.
-- ARGV: op, member, amount, limit, lease_ms, value (seed: spent, settle: cost), ttl_ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local ttl = tonumber(ARGV[7])
if op == 'seed' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'spent', ARGV[6], 'held', 0)
    if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  end
  return {1}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if op == 'settle' then return {1} end
  return {-1}
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, m in ipairs(dead) do
  local a = tonumber(redis.call('HGET', KEYS[3], m) or '0')
  redis.call('HINCRBY', KEYS[1], 'held', -a)
  redis.call('HDEL', KEYS[3], m)
  redis.call('ZREM', KEYS[2], m)
end
if op == 'reserve' then
  local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
  local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0')
  local amount = tonumber(ARGV[3])
  local limit = tonumber(ARGV[4])
  if spent + held + amount > limit then
    return {0, limit - spent - held}
  end
  local lease = tonumber(ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'held', amount)
  redis.call('ZADD', KEYS[2], now + lease, ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[2], amount)
  redis.call('PEXPIRE', KEYS[2], lease)
  redis.call('PEXPIRE', KEYS[3], lease)
  return {1}
end
-- settle: give back the hold (if its lease has not run out) and add what was spent
local a = redis.call('HGET', KEYS[3], ARGV[2])
if a then
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(a))
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
redis.call('HINCRBY', KEYS[1], 'spent', tonumber(ARGV[6]))
return {1}
"#;

pub enum Reserve {
    Held,
    /// Refused: what is left.
    Exhausted(u64),
    /// Redis has no such budget yet: seed it and ask again.
    Unseeded,
}

pub struct RedisBudgets {
    redis: Arc<RedisLimiter>,
    script: redis::Script,
}

impl RedisBudgets {
    pub fn new(redis: Arc<RedisLimiter>) -> Self {
        RedisBudgets {
            redis,
            script: redis::Script::new(SCRIPT),
        }
    }

    pub fn limiter(&self) -> &Arc<RedisLimiter> {
        &self.redis
    }

    fn keys(&self, scope: &str, period: &str) -> [String; 3] {
        let base = format!("{}bg:{scope}:{period}", self.redis.prefix());
        let holds = format!("{base}:holds");
        let amounts = format!("{base}:amounts");
        [base, holds, amounts]
    }

    async fn run(&self, scope: &str, period: &str, args: [String; 7]) -> Result<Vec<i64>, String> {
        let keys = self.keys(scope, period);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.redis.eval(&self.script, &keys, &args).await
    }

    pub async fn reserve(
        &self,
        scope: &str,
        period: &str,
        member: &str,
        amount: u64,
        limit: u64,
        lease: Duration,
    ) -> Result<Reserve, String> {
        let out = self
            .run(
                scope,
                period,
                [
                    "reserve".into(),
                    member.into(),
                    amount.to_string(),
                    limit.to_string(),
                    lease.as_millis().to_string(),
                    "0".into(),
                    "0".into(),
                ],
            )
            .await?;
        Ok(match out.first() {
            Some(1) => Reserve::Held,
            Some(0) => Reserve::Exhausted(out.get(1).copied().unwrap_or(0).max(0) as u64),
            _ => Reserve::Unseeded,
        })
    }

    /// Starts a budget at `spent` unless another replica did first; `ttl` past the period's end.
    pub async fn seed(
        &self,
        scope: &str,
        period: &str,
        spent: u64,
        ttl: Option<Duration>,
    ) -> Result<(), String> {
        self.run(
            scope,
            period,
            [
                "seed".into(),
                String::new(),
                "0".into(),
                "0".into(),
                "0".into(),
                spent.to_string(),
                ttl.map_or(0, |t| t.as_millis()).to_string(),
            ],
        )
        .await
        .map(|_| ())
    }

    /// Gives back a hold and adds what the request cost.
    pub async fn settle(&self, hold: &Hold, member: &str, cost: u64) -> Result<(), String> {
        self.run(
            &hold.scope,
            &hold.period,
            [
                "settle".into(),
                member.into(),
                "0".into(),
                "0".into(),
                "0".into(),
                cost.to_string(),
                "0".into(),
            ],
        )
        .await
        .map(|_| ())
    }
}
