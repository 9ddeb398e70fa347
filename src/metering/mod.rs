//! What a request costs and who pays, behind one [`Meter`]: prices ([`price`]), budgets held
//! before relaying and settled at the images delivered ([`budget`], one store per storage
//! mode), the usage ledger ([`ledger`]), `Idempotency-Key` records ([`idempotency`]) and the
//! usage reports that read the ledger ([`report`]).
//!
//! A handler asks [`Meter::begin`] for a [`Charge`], reserves the request's cost on it, and
//! ends it once with [`Charge::deliver`] or [`Charge::fail`] (or by dropping it). The ledger
//! row is built here, never by the handler.

pub mod budget;
mod charge;
pub mod idempotency;
pub mod ledger;
mod price;
pub mod report;

use std::sync::Arc;
use std::time::Duration;

pub use budget::{BudgetStore, Hold};
pub use charge::{Begun, Charge, Delivered, IdempotencyKey, RequestFacts};
pub use price::{dollars, usage_tokens, PriceTable, TokenRates, TokenUsage};

use crate::api::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::store::redis::{Redis, RedisUnavailable};
use crate::store::{Database, StoreError};
use budget::HoldAsk;
use ledger::{BudgetBook, Ledger, Settlement};

/// Why metering could not do its part: its stores did not answer.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] RedisUnavailable),
}

impl From<MeterError> for ApiError {
    fn from(e: MeterError) -> Self {
        match e {
            MeterError::Store(e) => {
                tracing::error!(error = %e, "metering store error");
                ApiError::new(
                    ErrorKind::Unavailable,
                    "The usage store is temporarily unavailable; please retry.",
                )
                .retry_after(Duration::from_secs(1))
            }
            MeterError::Redis(e) => e.into(),
        }
    }
}

/// Where a request's lasting records go.
enum Records {
    /// SQLite or PostgreSQL: the ledger (rows, what budgets spent and how idempotency records
    /// end, one transaction) and idempotency claims in the same database.
    Database { db: Database, ledger: Ledger },
    /// `state.store: none`: idempotency records in this process, no ledger.
    Memory(idempotency::MemoryIdempotency),
}

/// Budgets, the ledger and idempotency records.
pub struct Meter {
    budgets: Arc<dyn BudgetStore>,
    records: Records,
}

impl Meter {
    /// Chooses the budget store, starts the ledger writer (replaying SQLite's journal from
    /// `data_dir` first) and the sweeper of leases and idempotency records.
    pub async fn new(
        db: Option<Database>,
        retention: Duration,
        data_dir: &std::path::Path,
        redis: Option<Arc<Redis>>,
    ) -> Result<Arc<Self>, StoreError> {
        let budgets = budget::open(db.as_ref(), redis);
        Self::with_budgets(db, retention, data_dir, budgets).await
    }

    /// As [`Meter::new`] with a budget store of the caller's choosing (tests run one list of
    /// cases on every store through this).
    pub async fn with_budgets(
        db: Option<Database>,
        retention: Duration,
        data_dir: &std::path::Path,
        budgets: Arc<dyn BudgetStore>,
    ) -> Result<Arc<Self>, StoreError> {
        let records = match db {
            Some(db) => {
                let journal = (db.kind == crate::store::Kind::Sqlite)
                    .then(|| data_dir.join("ledger.journal"));
                let ledger = Ledger::start(
                    db.clone(),
                    budgets.book(),
                    journal.as_deref(),
                    budgets.holds_in_redis(),
                )
                .await?;
                Records::Database { db, ledger }
            }
            None => Records::Memory(idempotency::MemoryIdempotency::default()),
        };
        let meter = Arc::new(Meter { budgets, records });
        let weak = Arc::downgrade(&meter);
        tokio::spawn(async move {
            // Holds every 30 s, idempotency records every 10 min.
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            for round in 1u64.. {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { break };
                if round % 20 == 0 {
                    m.sweep_records(retention).await;
                }
                match m.budgets.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        budgets = n,
                        "gave back budget holds whose lease ran out (a replica died mid-request)"
                    ),
                    Err(e) => tracing::warn!(error = %e, "budget hold sweep failed"),
                }
            }
        });
        Ok(meter)
    }

    /// The budget store (for reports and tests).
    pub fn budgets(&self) -> &Arc<dyn BudgetStore> {
        &self.budgets
    }

    async fn sweep_records(&self, retention: Duration) {
        let now = crate::clock::now_ms();
        match &self.records {
            Records::Database { db, .. } => {
                if let Err(e) = idempotency::sql_sweep(db, retention, now).await {
                    tracing::warn!(error = %e, "idempotency sweep failed");
                }
            }
            Records::Memory(idem) => idem.sweep(retention, now as u64),
        }
    }

    /// Opens the charge of a request that passed validation: claims its `Idempotency-Key`
    /// when it has one (a repeat of a finished request is answered from the record: no
    /// limit, no charge) and builds its ledger row.
    pub async fn begin(
        self: &Arc<Self>,
        principal: &Principal,
        facts: RequestFacts<'_>,
        idempotency: Option<IdempotencyKey<'_>>,
    ) -> Result<Begun, ApiError> {
        let mut claim = None;
        if let Some(k) = idempotency {
            let fp = idempotency::fingerprint(k.body);
            match self
                .claim(&principal.tenant, k.key, &fp, k.lock_for, k.retention)
                .await?
            {
                idempotency::Claim::Run => {
                    claim = Some(charge::IdemClaim {
                        tenant: principal.tenant.to_string(),
                        key: k.key.to_string(),
                    })
                }
                idempotency::Claim::Replay(answer) => return Ok(Begun::Replay(answer)),
                refused => {
                    return Err(refused
                        .error()
                        .unwrap_or_else(|| ApiError::internal("idempotency claim")))
                }
            }
        }
        Ok(Begun::Charge(Charge::open(
            self.clone(),
            principal,
            facts,
            claim,
        )))
    }

    /// Where an `Idempotency-Key` stands for this request (`lock_for`: how long the first
    /// request may run before a repeat may take the key over).
    async fn claim(
        &self,
        tenant: &str,
        key: &str,
        fp: &str,
        lock_for: Duration,
        retention: Duration,
    ) -> Result<idempotency::Claim, ApiError> {
        let now = crate::clock::now_ms();
        match &self.records {
            Records::Database { db, .. } => Ok(Box::pin(idempotency::sql_claim(
                db, tenant, key, fp, lock_for, retention, now,
            ))
            .await
            .map_err(MeterError::from)?),
            Records::Memory(idem) => {
                Ok(idem.claim(tenant, key, fp, lock_for, retention, now as u64))
            }
        }
    }

    /// Holds `cost` in the tenant's budget and then the key's; refuses with 429
    /// `insufficient_quota` (and holds nothing) when either would be exceeded. `member` names
    /// the request's hold; `lease` bounds how long a hold outlives a replica that died.
    async fn reserve(
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
        let now = crate::clock::now_unix();
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
            let ask = HoldAsk {
                scope: &scope,
                period: &period,
                member,
                cost,
                limit: b.micro_usd,
                lease,
                resets_at,
            };
            let held = match self.budgets.try_hold(&ask) {
                Some(held) => Ok(held),
                None => self.budgets.hold(&ask).await,
            };
            match held {
                Ok(Ok(())) => holds.push(Hold {
                    scope,
                    period,
                    amount: cost,
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
                    return Err(e.into());
                }
            }
        }
        Ok(holds)
    }

    async fn release_holds(&self, holds: &[Hold], member: &str) {
        for h in holds {
            self.budgets.release(h, member).await;
        }
    }

    /// Ends a relayed request: ledger row, holds settled at its cost, idempotency record kept
    /// or dropped, in one commit that the answer waits for. False if it could not be written.
    /// Boxed: the settlement is moved through several futures on its way to the ledger.
    async fn settle(&self, s: Box<Settlement>) -> bool {
        self.budgets
            .settle(&s.holds, &s.row.id, s.row.cost_micro_usd);
        match &self.records {
            Records::Database { ledger, .. } => {
                // An idempotency record must be readable by the next request at once, and
                // holds in the database are given back by the transaction.
                let wait = self.budgets.book() == BudgetBook::HoldsInDatabase || s.idem.is_some();
                ledger.commit(s, wait).await
            }
            Records::Memory(idem) => {
                idem.finish(s.idem);
                true
            }
        }
    }

    /// As [`Meter::settle`] without waiting (from a `Drop`).
    fn settle_later(&self, s: Settlement) {
        self.budgets
            .settle(&s.holds, &s.row.id, s.row.cost_micro_usd);
        match &self.records {
            Records::Database { ledger, .. } => ledger.submit(s),
            Records::Memory(idem) => idem.finish(s.idem),
        }
    }

    /// Gives back holds and an idempotency claim of a request that was never relayed.
    async fn abandon(&self, holds: Vec<Hold>, member: &str, idem: Option<charge::IdemClaim>) {
        self.release_holds(&holds, member).await;
        if let Some(c) = idem {
            match &self.records {
                Records::Database { db, .. } => {
                    if let Err(e) = idempotency::sql_release(db, &c.tenant, &c.key).await {
                        tracing::error!(error = %e, "idempotency release failed");
                    }
                }
                Records::Memory(idem) => idem.release(&c.tenant, &c.key),
            }
        }
    }

    /// Waits for queued ledger writes (shutdown).
    pub async fn flush(&self) {
        if let Records::Database { ledger, .. } = &self.records {
            ledger.flush().await;
        }
    }
}

fn exhausted(e: &budget::Exhausted, cost: u64) -> ApiError {
    let period = match e.budget.period {
        crate::config::BudgetPeriod::Daily => "daily ",
        crate::config::BudgetPeriod::Monthly => "monthly ",
        crate::config::BudgetPeriod::Total => "",
    };
    let resets = match e.resets_at {
        Some(t) => {
            let (y, m, d) = crate::clock::civil_from_days((t / 86_400) as i64);
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
        let before = format!("{:012x}", crate::clock::now_ms());
        let ids: Vec<String> = (0..100)
            .map(|_| new_id_at(crate::clock::now_ms()))
            .collect();
        let after = format!("{:012x}", crate::clock::now_ms());
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
}
