//! What a request costs and who pays: price tables per model x size x quality in integer
//! micro-dollars (presets for dall-e-2 and dall-e-3 at OpenAI's published prices), budgets
//! reserved before relaying and settled at the images delivered ([`budget`]), the usage ledger
//! ([`ledger`]) and `Idempotency-Key` records ([`idempotency`]), behind one [`Meter`].

pub mod budget;
pub mod idempotency;
pub mod ledger;
pub mod redis_budget;
mod sqlite_ledger;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use budget::Hold;

use crate::api::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::store::Database;

use crate::api::{ImageRequest, Quality, Size};
use crate::config::{PriceConfig, RulesConfig};

/// Per-image prices in micro-dollars.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    /// (size, quality) -> price; a `None` quality matches any.
    entries: crate::FastMap<(Size, Option<Quality>), u64>,
    default: u64,
    /// Micro-dollars per million input / output tokens (upstream tables).
    tokens: Option<(u64, u64)>,
}

const fn s(w: u32, h: u32) -> Size {
    Size::new(w, h)
}

impl PriceTable {
    /// OpenAI's published prices.
    pub fn preset(name: &str) -> Option<Self> {
        let entries: Vec<((Size, Option<Quality>), u64)> = match name {
            "dall-e-2" => vec![
                ((s(256, 256), None), 16_000),
                ((s(512, 512), None), 18_000),
                ((s(1024, 1024), None), 20_000),
            ],
            "dall-e-3" => vec![
                ((s(1024, 1024), Some(Quality::Standard)), 40_000),
                ((s(1792, 1024), Some(Quality::Standard)), 80_000),
                ((s(1024, 1792), Some(Quality::Standard)), 80_000),
                ((s(1024, 1024), Some(Quality::Hd)), 80_000),
                ((s(1792, 1024), Some(Quality::Hd)), 120_000),
                ((s(1024, 1792), Some(Quality::Hd)), 120_000),
            ],
            _ => return None,
        };
        Some(PriceTable {
            entries: entries.into_iter().collect(),
            default: 0,
            tokens: None,
        })
    }

    /// A model's table: its `price`, else the preset of its rules, else free.
    pub fn for_model(price: Option<&PriceConfig>, rules: &RulesConfig) -> Result<Self, String> {
        match price {
            Some(PriceConfig::Preset(name)) => {
                Self::preset(name).ok_or_else(|| format!("unknown price preset \"{name}\""))
            }
            Some(PriceConfig::Table(t)) => {
                let mut entries = crate::FastMap::default();
                for e in &t.per_image {
                    let size: Size = e.size.parse()?;
                    let quality = match &e.quality {
                        Some(q) => Some(
                            Quality::parse(q).ok_or_else(|| format!("unknown quality \"{q}\""))?,
                        ),
                        None => None,
                    };
                    entries.insert((size, quality), e.micro_usd);
                }
                let tokens = (t.input_tokens_per_million > 0 || t.output_tokens_per_million > 0)
                    .then_some((t.input_tokens_per_million, t.output_tokens_per_million));
                Ok(PriceTable {
                    entries,
                    default: t.default_micro_usd,
                    tokens,
                })
            }
            None => Ok(match rules {
                RulesConfig::Preset(name) => Self::preset(name).unwrap_or_default(),
                RulesConfig::Custom(c) => c
                    .preset
                    .as_deref()
                    .and_then(Self::preset)
                    .unwrap_or_default(),
            }),
        }
    }

    pub fn per_image(&self, size: Size, quality: Option<Quality>) -> u64 {
        let quality = quality.unwrap_or(Quality::Standard);
        self.entries
            .get(&(size, Some(quality)))
            .or_else(|| self.entries.get(&(size, None)))
            .copied()
            .unwrap_or(self.default)
    }

    /// The cost of `images` images of this request.
    pub fn cost(&self, request: &ImageRequest, images: u32) -> u64 {
        self.per_image(request.size, request.quality) * u64::from(images)
    }

    /// The cost with the upstream's token counts when the table has token prices, else per
    /// image (rounded up to the micro-dollar).
    pub fn cost_with_tokens(
        &self,
        request: &ImageRequest,
        images: u32,
        tokens: (Option<i64>, Option<i64>),
    ) -> u64 {
        match (self.tokens, tokens) {
            (Some((pi, po)), (i, o)) if i.is_some() || o.is_some() => {
                let t = |n: Option<i64>, p: u64| n.unwrap_or(0).max(0) as u128 * p as u128;
                (t(i, pi) + t(o, po)).div_ceil(1_000_000) as u64
            }
            _ => self.cost(request, images),
        }
    }
}

/// `input_tokens` and `output_tokens` of a GPT image `usage` object.
pub fn usage_tokens(usage: Option<&serde_json::Value>) -> (Option<i64>, Option<i64>) {
    let get = |k: &str| usage.and_then(|u| u.get(k)).and_then(|v| v.as_i64());
    (get("input_tokens"), get("output_tokens"))
}

/// `$0.040000`, as the budget messages write money.
pub fn dollars(micro: u64) -> String {
    format!("${}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// Budgets, the ledger and idempotency records, in the shared store when there is one (SQLite
/// on one machine, PostgreSQL for many replicas), else in this process.
pub struct Meter {
    db: Option<Database>,
    ledger: Option<ledger::Ledger>,
    /// Where holds live: in the database (PostgreSQL, shared by replicas) or here (SQLite,
    /// whose file one process owns, and `store: none`).
    book: ledger::BudgetBook,
    /// Budgets held in this process; with SQLite each row is seeded from the database on
    /// first use and the ledger adds what is spent.
    budgets: budget::MemoryBudgets,
    idem: idempotency::MemoryIdempotency,
    /// With `state.redis`: budgets held in Redis, shared by every replica.
    redis: Option<Arc<redis_budget::RedisBudgets>>,
}

fn store_unavailable(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "metering store error");
    ApiError::new(
        ErrorKind::Unavailable,
        "The usage store is temporarily unavailable; please retry.",
    )
    .retry_after(Duration::from_secs(1))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Meter {
    /// Starts the ledger writer (replaying SQLite's journal from `data_dir` first) and the
    /// idempotency sweeper.
    pub async fn new(
        db: Option<Database>,
        retention: Duration,
        data_dir: &std::path::Path,
        redis: Option<Arc<crate::policy::RedisLimiter>>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let book = match db.as_ref().map(|d| d.kind) {
            Some(crate::store::Kind::Postgres) => ledger::BudgetBook::Shared,
            _ => ledger::BudgetBook::Local,
        };
        let ledger = match &db {
            Some(db) => {
                let journal = (db.kind == crate::store::Kind::Sqlite)
                    .then(|| data_dir.join("ledger.journal"));
                Some(ledger::Ledger::start(db.clone(), book, journal.as_deref()).await?)
            }
            None => None,
        };
        let meter = Arc::new(Meter {
            db,
            ledger,
            book,
            budgets: budget::MemoryBudgets::default(),
            idem: idempotency::MemoryIdempotency::default(),
            redis: redis.map(|r| Arc::new(redis_budget::RedisBudgets::new(r))),
        });
        let weak = Arc::downgrade(&meter);
        tokio::spawn(async move {
            // Holds every 30 s, idempotency records every 10 min.
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            for round in 1u64.. {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { break };
                let records = round % 20 == 0;
                match &m.db {
                    Some(db) => {
                        if records {
                            if let Err(e) = idempotency::sql_sweep(db, retention, now_ms()).await {
                                tracing::warn!(error = %e, "idempotency sweep failed");
                            }
                        }
                        if m.book == ledger::BudgetBook::Shared {
                            match budget::sql_sweep_holds(db, now_ms()).await {
                                Ok(0) => {}
                                Ok(n) => tracing::warn!(
                                    budgets = n,
                                    "gave back budget holds whose lease ran out (a replica died mid-request)"
                                ),
                                Err(e) => tracing::warn!(error = %e, "budget hold sweep failed"),
                            }
                        }
                    }
                    None if records => m.idem.sweep(retention, now_ms() as u64),
                    None => {}
                }
            }
        });
        Ok(meter)
    }

    /// Budgets held in the database (PostgreSQL) rather than in this process.
    fn shared_book(&self) -> Option<&Database> {
        match self.book {
            ledger::BudgetBook::Shared => self.db.as_ref(),
            ledger::BudgetBook::Local => None,
        }
    }

    /// Seeds an in-process budget row from the database the first time it is used.
    async fn seed(&self, scope: &str, period: &str) -> Result<(), crate::store::StoreError> {
        if let Some(db) = &self.db {
            if !self.budgets.has(scope, period) {
                let (spent, _) = Box::pin(budget::sql_spent(db, scope, period)).await?;
                self.budgets.seed(scope, period, spent);
            }
        }
        Ok(())
    }

    /// Where an `Idempotency-Key` stands for this request (`lock_for`: how long the first
    /// request may run before a repeat may take the key over).
    pub async fn claim(
        &self,
        tenant: &str,
        key: &str,
        fp: &str,
        lock_for: Duration,
        retention: Duration,
    ) -> Result<idempotency::Claim, ApiError> {
        match &self.db {
            Some(db) => Box::pin(idempotency::sql_claim(
                db,
                tenant,
                key,
                fp,
                lock_for,
                retention,
                now_ms(),
            ))
            .await
            .map_err(store_unavailable),
            None => Ok(self
                .idem
                .claim(tenant, key, fp, lock_for, retention, now_ms() as u64)),
        }
    }

    /// Holds a budget in Redis, seeding it from the database's `spent` the first time.
    /// `Ok(None)`: held; `Ok(Some(left))`: exhausted; `Err`: Redis did not answer.
    async fn redis_reserve(
        &self,
        rb: &redis_budget::RedisBudgets,
        ask: &HoldAsk<'_>,
    ) -> Result<Option<u64>, String> {
        let (scope, period) = (ask.scope, ask.period);
        for _ in 0..2 {
            match rb
                .reserve(scope, period, ask.member, ask.cost, ask.limit, ask.lease)
                .await?
            {
                redis_budget::Reserve::Held => return Ok(None),
                redis_budget::Reserve::Exhausted(left) => return Ok(Some(left)),
                redis_budget::Reserve::Unseeded => {
                    let spent = match &self.db {
                        Some(db) => {
                            budget::sql_spent(db, scope, period)
                                .await
                                .map_err(|e| e.to_string())?
                                .0
                        }
                        None => 0,
                    };
                    let ttl = ask.resets_at.map(|end| {
                        Duration::from_secs(end.saturating_sub(budget::now_unix()) + 2 * 86_400)
                    });
                    rb.seed(scope, period, spent, ttl).await?;
                }
            }
        }
        Err("budget could not be seeded".into())
    }

    /// Holds one budget where budgets live: `Ok(Ok(in_redis))` held, `Ok(Err(left))`
    /// exhausted.
    async fn hold_one(&self, ask: &HoldAsk<'_>) -> Result<Result<bool, u64>, ApiError> {
        if let Some(rb) = &self.redis {
            // Remote steps are boxed: the request's future stays small on the in-process path.
            return match Box::pin(self.redis_reserve(rb, ask)).await {
                Ok(None) => Ok(Ok(true)),
                Ok(Some(left)) => Ok(Err(left)),
                Err(why) => {
                    // Money never fails open: a hold that cannot be made exactly (the other
                    // replicas' holds are in Redis) is refused, retryably.
                    rb.limiter().warn(&why);
                    Err(crate::policy::redis_unavailable())
                }
            };
        }
        let (scope, period, cost, limit) = (ask.scope, ask.period, ask.cost, ask.limit);
        let outcome = match self.shared_book() {
            Some(db) => {
                let expires = now_ms() + ask.lease.as_millis() as i64;
                Box::pin(budget::sql_reserve(
                    db, scope, period, cost, limit, ask.member, expires,
                ))
                .await
            }
            None => self
                .seed(scope, period)
                .await
                .map(|()| self.budgets.reserve(scope, period, cost, limit)),
        };
        Ok(outcome.map_err(store_unavailable)?.map(|()| false))
    }

    /// Holds `cost` in the tenant's budget and then the key's; refuses with 429
    /// `insufficient_quota` (and holds nothing) when either would be exceeded. `member` names
    /// the request's hold; `lease` bounds how long a hold outlives a replica that died.
    pub async fn reserve(
        &self,
        principal: &Principal,
        cost: u64,
        member: &str,
        lease: Duration,
    ) -> Result<Vec<Hold>, ApiError> {
        let mut holds = Vec::new();
        if cost == 0 {
            return Ok(holds);
        }
        let now = budget::now_unix();
        let scopes = [
            ("tenant", &principal.tenant, principal.limits.budget),
            (
                "key",
                &principal.key_id,
                principal.key_limits.as_ref().and_then(|l| l.budget),
            ),
        ];
        for (kind, id, b) in scopes {
            let Some(b) = b else { continue };
            let (period, resets_at) = budget::period_of(b.period, now);
            let scope = format!("{kind}:{id}");
            let held = self
                .hold_one(&HoldAsk {
                    scope: &scope,
                    period: &period,
                    member,
                    cost,
                    limit: b.micro_usd,
                    lease,
                    resets_at,
                })
                .await;
            match held {
                Ok(Ok(in_redis)) => holds.push(Hold {
                    scope,
                    period,
                    amount: cost,
                    in_redis,
                }),
                Ok(Err(left)) => {
                    self.release_holds(&holds, member).await;
                    crate::telemetry::metrics().over_budget(&principal.tenant, kind);
                    return Err(exhausted(
                        &budget::Exhausted {
                            scope_kind: kind,
                            budget: b,
                            left,
                            resets_at,
                        },
                        cost,
                    ));
                }
                Err(e) => {
                    self.release_holds(&holds, member).await;
                    return Err(e);
                }
            }
        }
        Ok(holds)
    }

    async fn release_holds(&self, holds: &[Hold], member: &str) {
        for h in holds {
            if h.in_redis {
                if let Some(rb) = &self.redis {
                    // Boxed, like every remote step: the request's future stays small.
                    if let Err(e) = Box::pin(rb.settle(h, member, 0)).await {
                        // Its lease runs out by itself.
                        tracing::warn!(error = %e, scope = %h.scope, "budget release in Redis failed");
                    }
                }
                continue;
            }
            match self.shared_book() {
                Some(db) => {
                    if let Err(e) = Box::pin(budget::sql_release(db, h, member)).await {
                        tracing::error!(error = %e, scope = %h.scope, "budget release failed");
                    }
                }
                None => self.budgets.settle(h, 0),
            }
        }
    }

    /// Ends a relayed request: ledger row, holds settled at its cost, idempotency record kept
    /// or dropped, in one commit that the answer waits for. False if it could not be written.
    /// Boxed: the settlement is moved through several futures on its way to the ledger.
    pub async fn settle(&self, s: Box<ledger::Settlement>) -> bool {
        match &self.ledger {
            Some(l) => {
                if self.book == ledger::BudgetBook::Local {
                    self.settle_holds_here(&s);
                }
                self.settle_in_redis(&s);
                // An idempotency record must be readable by the next request at once.
                let wait = self.book == ledger::BudgetBook::Shared || s.idem.is_some();
                l.commit(s, wait).await
            }
            None => {
                self.settle_in_memory(*s);
                true
            }
        }
    }

    fn settle_holds_here(&self, s: &ledger::Settlement) {
        for h in s.holds.iter().filter(|h| !h.in_redis) {
            self.budgets.settle(h, s.row.cost_micro_usd);
        }
    }

    /// Settles the holds that live in Redis (in the background: the ledger has the truth).
    fn settle_in_redis(&self, s: &ledger::Settlement) {
        let Some(rb) = &self.redis else { return };
        let holds: Vec<Hold> = s.holds.iter().filter(|h| h.in_redis).cloned().collect();
        if holds.is_empty() {
            return;
        }
        let (rb, member, cost) = (rb.clone(), s.row.id.clone(), s.row.cost_micro_usd);
        tokio::spawn(async move {
            for h in &holds {
                if let Err(e) = rb.settle(h, &member, cost).await {
                    tracing::warn!(error = %e, scope = %h.scope, "budget settlement in Redis failed");
                }
            }
        });
    }

    fn settle_in_memory(&self, s: ledger::Settlement) {
        self.settle_holds_here(&s);
        match s.idem {
            Some(ledger::IdemOutcome::Complete {
                tenant,
                key,
                response,
            }) => self.idem.complete(&tenant, &key, response),
            Some(ledger::IdemOutcome::Release { tenant, key }) => self.idem.release(&tenant, &key),
            None => {}
        }
    }

    /// As [`Meter::settle`] without waiting (from a `Drop`).
    pub fn settle_later(&self, s: ledger::Settlement) {
        match &self.ledger {
            Some(l) => {
                if self.book == ledger::BudgetBook::Local {
                    self.settle_holds_here(&s);
                }
                self.settle_in_redis(&s);
                l.submit(s)
            }
            None => self.settle_in_memory(s),
        }
    }

    /// Gives back holds and an idempotency claim of a request that was never relayed.
    pub async fn abandon(&self, holds: Vec<Hold>, member: &str, idem: Option<(String, String)>) {
        self.release_holds(&holds, member).await;
        if let Some((tenant, key)) = idem {
            match &self.db {
                Some(db) => {
                    if let Err(e) = idempotency::sql_release(db, &tenant, &key).await {
                        tracing::error!(error = %e, "idempotency release failed");
                    }
                }
                None => self.idem.release(&tenant, &key),
            }
        }
    }

    /// Waits for queued ledger writes (shutdown).
    pub async fn flush(&self) {
        if let Some(l) = &self.ledger {
            l.flush().await;
        }
    }
}

/// One budget a request asks to hold `cost` in.
struct HoldAsk<'a> {
    scope: &'a str,
    period: &'a str,
    /// The request's ledger row id, naming its hold.
    member: &'a str,
    cost: u64,
    limit: u64,
    /// How long the hold outlives a replica that died.
    lease: Duration,
    /// When the period ends (Unix seconds; `None`: total).
    resets_at: Option<u64>,
}

fn exhausted(e: &budget::Exhausted, cost: u64) -> ApiError {
    let period = match e.budget.period {
        crate::config::BudgetPeriod::Daily => "daily ",
        crate::config::BudgetPeriod::Monthly => "monthly ",
        crate::config::BudgetPeriod::Total => "",
    };
    let resets = match e.resets_at {
        Some(t) => {
            let (y, m, d) = budget::civil_from_days((t / 86_400) as i64);
            format!(" It resets at {y:04}-{m:02}-{d:02}T00:00:00Z.")
        }
        None => String::new(),
    };
    ApiError::new(
        ErrorKind::InsufficientQuota,
        format!(
            "You exceeded your current quota: this request costs {} and the {}'s {period}budget of {} has {} left.{resets}",
            dollars(cost),
            e.scope_kind,
            dollars(e.budget.micro_usd),
            dollars(e.left),
        ),
    )
    .code("insufficient_quota")
    .should_retry(false)
}

/// A relayed request's claim on budgets and on its `Idempotency-Key`, ended exactly once:
/// by [`Charge::finish`], or, when the request is dropped (the client went away), by `Drop`,
/// which releases everything (and records the request as abandoned if it was relayed).
pub struct Charge {
    meter: Arc<Meter>,
    pub row: ledger::UsageRow,
    holds: Vec<Hold>,
    idem: Option<(String, String)>,
    relayed: bool,
    started: Instant,
    done: bool,
}

impl Charge {
    pub fn new(meter: Arc<Meter>, row: ledger::UsageRow, idem: Option<(String, String)>) -> Self {
        Charge {
            meter,
            row,
            holds: Vec::new(),
            idem,
            relayed: false,
            started: Instant::now(),
            done: false,
        }
    }

    /// Reserves the request's cost (see [`Meter::reserve`]).
    pub async fn reserve(
        &mut self,
        principal: &Principal,
        cost: u64,
        lease: Duration,
    ) -> Result<(), ApiError> {
        self.holds = self
            .meter
            .reserve(principal, cost, &self.row.id, lease)
            .await?;
        self.row.reserved_micro_usd = cost;
        Ok(())
    }

    pub fn has_idempotency_key(&self) -> bool {
        self.idem.is_some()
    }

    /// From here on the request counts in the ledger.
    pub fn relayed(&mut self) {
        self.relayed = true;
    }

    /// Settles at `row.cost_micro_usd` with the row as filled in; `response` (the answer's
    /// body) is kept for the idempotency key when the request succeeded.
    pub async fn finish(mut self, status: u16, response: Option<String>) -> bool {
        self.done = true;
        self.row.status = status;
        self.row.latency_ms = self.started.elapsed().as_millis() as u64;
        if status != 200 {
            self.row.cost_micro_usd = 0;
            self.row.n_delivered = 0;
        }
        let idem = self.idem.take().map(|(tenant, key)| match response {
            Some(response) if status == 200 => ledger::IdemOutcome::Complete {
                tenant,
                key,
                response,
            },
            _ => ledger::IdemOutcome::Release { tenant, key },
        });
        let settlement = ledger::Settlement {
            row: std::mem::take(&mut self.row),
            holds: std::mem::take(&mut self.holds),
            idem,
        };
        self.meter.settle(Box::new(settlement)).await
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let holds = std::mem::take(&mut self.holds);
        let idem = self.idem.take();
        if self.relayed {
            // The client went away mid-request: nothing delivered, nothing charged.
            self.row.status = 499;
            self.row.cost_micro_usd = 0;
            self.row.n_delivered = 0;
            self.row.latency_ms = self.started.elapsed().as_millis() as u64;
            self.meter.settle_later(ledger::Settlement {
                row: std::mem::take(&mut self.row),
                holds,
                idem: idem.map(|(tenant, key)| ledger::IdemOutcome::Release { tenant, key }),
            });
        } else if !holds.is_empty() || idem.is_some() {
            let meter = self.meter.clone();
            let member = self.row.id.clone();
            tokio::spawn(async move { meter.abandon(holds, &member, idem).await });
        }
    }
}

/// A ledger row id for a row stamped `ms` (one clock read for the row's time and its id):
/// the milliseconds since the epoch then 64 random bits, both in hex (sorts by time, so the
/// primary key grows at its end).
pub fn new_id_at(ms: i64) -> String {
    // 12 hex digits of milliseconds (the low 48 bits: until the year 10889), then 16 random.
    let mut raw = [0u8; 14];
    raw[..6].copy_from_slice(&(ms as u64).to_be_bytes()[2..]);
    raw[6..].copy_from_slice(&rand::random::<[u8; 8]>());
    let mut hex = [0u8; 28];
    // Cannot fail: the buffer is exactly twice the input.
    let _ = hex::encode_to_slice(raw, &mut hex);
    std::str::from_utf8(&hex).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_28_hex_digits_that_start_with_the_time() {
        let before = format!("{:012x}", now_ms());
        let ids: Vec<String> = (0..100).map(|_| new_id_at(now_ms())).collect();
        let after = format!("{:012x}", now_ms());
        for id in &ids {
            assert_eq!(id.len(), 28, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(
                before.as_str() <= &id[..12] && &id[..12] <= after.as_str(),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn every_dalle_size_and_quality_has_openais_price() {
        let d2 = PriceTable::preset("dall-e-2").unwrap();
        for (size, price) in [
            ((256, 256), 16_000),
            ((512, 512), 18_000),
            ((1024, 1024), 20_000),
        ] {
            let size = s(size.0, size.1);
            assert_eq!(d2.per_image(size, None), price);
            assert_eq!(d2.per_image(size, Some(Quality::Standard)), price);
        }
        let d3 = PriceTable::preset("dall-e-3").unwrap();
        for (size, q, price) in [
            ((1024, 1024), Quality::Standard, 40_000),
            ((1792, 1024), Quality::Standard, 80_000),
            ((1024, 1792), Quality::Standard, 80_000),
            ((1024, 1024), Quality::Hd, 80_000),
            ((1792, 1024), Quality::Hd, 120_000),
            ((1024, 1792), Quality::Hd, 120_000),
        ] {
            assert_eq!(
                d3.per_image(s(size.0, size.1), Some(q)),
                price,
                "{size:?} {q}"
            );
        }
        assert_eq!(PriceTable::default().per_image(s(512, 512), None), 0);
    }
}
