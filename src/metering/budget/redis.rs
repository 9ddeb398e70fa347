//! Budgets in Redis (with `state.redis`): one Lua script holds, settles and seeds a budget
//! atomically. Holds are leases (a sorted set of request ids by expiry plus their amounts), so
//! a replica that dies mid-request gives its holds back when the lease runs out. What is spent
//! is also kept in the database by the usage ledger, and an empty Redis (restarted, flushed) is
//! seeded from there on first use.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{BudgetStore, Hold, HoldAsk};
use crate::metering::ledger::BudgetBook;
use crate::metering::MeterError;
use crate::store::redis::{Redis, RedisUnavailable};
use crate::store::Database;

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

enum Reserve {
    Held,
    /// Refused: what is left.
    Exhausted(u64),
    /// Redis has no such budget yet: seed it and ask again.
    Unseeded,
}

/// Budgets held in Redis (`state.redis`), shared by every replica.
pub struct RedisBudgets {
    redis: Arc<Redis>,
    script: redis::Script,
    /// Where `spent` is kept for good (the ledger writes it), to seed an empty Redis from.
    db: Option<Database>,
}

impl RedisBudgets {
    pub fn new(redis: Arc<Redis>, db: Option<Database>) -> Self {
        RedisBudgets {
            redis,
            script: redis::Script::new(SCRIPT),
            db,
        }
    }

    fn keys(&self, scope: &str, period: &str) -> [String; 3] {
        let base = format!("{}bg:{scope}:{period}", self.redis.prefix());
        let holds = format!("{base}:holds");
        let amounts = format!("{base}:amounts");
        [base, holds, amounts]
    }

    async fn run(&self, scope: &str, period: &str, args: [String; 7]) -> Result<Vec<i64>, String> {
        run(&self.redis, &self.script, &self.keys(scope, period), args).await
    }

    async fn reserve(&self, ask: &HoldAsk<'_>) -> Result<Reserve, String> {
        let out = self
            .run(
                ask.scope,
                ask.period,
                [
                    "reserve".into(),
                    ask.member.into(),
                    ask.cost.to_string(),
                    ask.limit.to_string(),
                    ask.lease.as_millis().to_string(),
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
    async fn seed(
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

    /// Holds a budget, seeding it from the database's `spent` the first time.
    /// `Ok(None)`: held; `Ok(Some(left))`: exhausted; `Err`: Redis did not answer.
    async fn reserve_seeded(&self, ask: &HoldAsk<'_>) -> Result<Option<u64>, String> {
        for _ in 0..2 {
            match self.reserve(ask).await? {
                Reserve::Held => return Ok(None),
                Reserve::Exhausted(left) => return Ok(Some(left)),
                Reserve::Unseeded => {
                    let spent = match &self.db {
                        Some(db) => {
                            super::sql_spent(db, ask.scope, ask.period)
                                .await
                                .map_err(|e| e.to_string())?
                                .0
                        }
                        None => 0,
                    };
                    let ttl = ask.resets_at.map(|end| {
                        Duration::from_secs(
                            end.saturating_sub(crate::clock::now_unix()) + 2 * 86_400,
                        )
                    });
                    self.seed(ask.scope, ask.period, spent, ttl).await?;
                }
            }
        }
        Err("budget could not be seeded".into())
    }
}

/// Runs the script on one budget's keys.
async fn run(
    redis: &Redis,
    script: &redis::Script,
    keys: &[String; 3],
    args: [String; 7],
) -> Result<Vec<i64>, String> {
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    redis.eval(script, &keys, &args).await
}

/// The script's arguments that give back `member`'s hold and add `cost` to what is spent.
fn settle_args(member: &str, cost: u64) -> [String; 7] {
    [
        "settle".into(),
        member.into(),
        "0".into(),
        "0".into(),
        "0".into(),
        cost.to_string(),
        "0".into(),
    ]
}

#[async_trait]
impl BudgetStore for RedisBudgets {
    fn book(&self) -> BudgetBook {
        BudgetBook::SpentOnly
    }

    fn holds_in_redis(&self) -> bool {
        true
    }

    async fn hold(&self, ask: &HoldAsk<'_>) -> Result<Result<(), u64>, MeterError> {
        match self.reserve_seeded(ask).await {
            Ok(None) => Ok(Ok(())),
            Ok(Some(left)) => Ok(Err(left)),
            Err(why) => {
                // Money never fails open: a hold that cannot be made exactly (the other
                // replicas' holds are in Redis) is refused, retryably.
                self.redis.warn(&why);
                Err(RedisUnavailable(why).into())
            }
        }
    }

    async fn release(&self, hold: &Hold, member: &str) {
        if let Err(e) = self
            .run(&hold.scope, &hold.period, settle_args(member, 0))
            .await
        {
            // Its lease runs out by itself.
            tracing::warn!(error = %e, scope = %hold.scope, "budget release in Redis failed");
        }
    }

    /// In the background: the ledger has the truth, and an empty Redis is seeded from it.
    fn settle(&self, holds: &[Hold], member: &str, cost: u64) {
        if holds.is_empty() {
            return;
        }
        let jobs: Vec<([String; 3], String)> = holds
            .iter()
            .map(|h| (self.keys(&h.scope, &h.period), h.scope.clone()))
            .collect();
        let (redis, script, member) = (self.redis.clone(), self.script.clone(), member.to_string());
        tokio::spawn(async move {
            for (keys, scope) in &jobs {
                if let Err(e) = run(&redis, &script, keys, settle_args(&member, cost)).await {
                    tracing::warn!(error = %e, scope = %scope, "budget settlement in Redis failed");
                }
            }
        });
    }

    async fn usage(&self, scope: &str, period: &str) -> Result<(u64, u64), MeterError> {
        let key = &self.keys(scope, period)[0];
        let mut conn = self.redis.connection().await.map_err(RedisUnavailable)?;
        let (spent, held): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(key)
            .arg("spent")
            .arg("held")
            .query_async(&mut conn)
            .await
            .map_err(|e| RedisUnavailable(e.to_string()))?;
        Ok((
            spent.unwrap_or(0).max(0) as u64,
            held.unwrap_or(0).max(0) as u64,
        ))
    }
}
