//! Budgets: per tenant and per key, per period, in micro-dollars. A request's cost is held
//! before it is relayed and settled at the images delivered, or released, when it ends.
//!
//! Where holds live is one [`BudgetStore`], chosen once at start ([`open`]) from the state
//! configuration:
//!
//! | state | store | holds live | the ledger's transaction |
//! | --- | --- | --- | --- |
//! | `store: none` | [`InProcessBudgets`] | this process | (no ledger) |
//! | `store: sqlite` | [`SqliteBudgets`] | this process, seeded from the file | adds `spent` |
//! | `store: postgres` | [`PostgresBudgets`] | the database, as leases | gives holds back, adds `spent` |
//! | `redis:` set | [`RedisBudgets`] | Redis, as leases, seeded from the database | adds `spent` |

mod memory;
mod postgres;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::ledger::BudgetBook;
use super::MeterError;
use crate::config::{BudgetConfig, BudgetPeriod};
use crate::store::Database;

pub use super::ledger::Hold;
pub use memory::{InProcess, InProcessBudgets, MemoryBudgets, Seed, SqliteBudgets};
pub use postgres::{sql_release, sql_reserve, sql_spent, sql_sweep_holds, PostgresBudgets};
pub use redis::RedisBudgets;

/// One budget a request asks to hold `cost` in.
#[derive(Debug, Clone, Copy)]
pub struct HoldAsk<'a> {
    pub scope: &'a str,
    pub period: &'a str,
    /// The request's ledger row id, naming its hold.
    pub member: &'a str,
    pub cost: u64,
    pub limit: u64,
    /// How long the hold outlives a replica that died.
    pub lease: Duration,
    /// When the period ends (Unix seconds; `None`: total).
    pub resets_at: Option<u64>,
}

/// Where budgets are held: one implementation per storage mode.
#[async_trait]
pub trait BudgetStore: Send + Sync {
    /// What the ledger's transaction does to budget rows when a request settles.
    fn book(&self) -> BudgetBook;

    /// Whether holds live in Redis (each hold of a journal line says so, `in_redis`).
    fn holds_in_redis(&self) -> bool {
        false
    }

    /// Holds `ask.cost` in one budget: `Ok(Ok(()))` held, `Ok(Err(left))` refused, holding
    /// nothing, with what is left; `Err` when the store could not answer (money never fails
    /// open: the request is refused, retryably).
    async fn hold(&self, ask: &HoldAsk<'_>) -> Result<Result<(), u64>, MeterError>;

    /// [`BudgetStore::hold`] answered at once, when the store can without waiting (in process,
    /// for a row already seeded): `None` sends the caller to `hold`. Saves the request path the
    /// boxed future of an `async` trait call.
    fn try_hold(&self, _ask: &HoldAsk<'_>) -> Option<Result<(), u64>> {
        None
    }

    /// Gives back a hold that will never be spent (a later budget refused the request, or it
    /// was never relayed). A failure is logged: the hold's lease runs out by itself.
    async fn release(&self, hold: &Hold, member: &str);

    /// The part of settling a finished request's holds at `cost` that happens outside the
    /// ledger's transaction (in process: at once; Redis: in the background; PostgreSQL:
    /// nothing, the transaction does it all).
    fn settle(&self, holds: &[Hold], member: &str, cost: u64);

    /// Gives back holds whose lease ran out (their replica died mid-request); returns how many
    /// budgets changed.
    async fn sweep(&self) -> Result<u64, MeterError> {
        Ok(0)
    }

    /// (spent, held) of one budget as this store sees it.
    async fn usage(&self, scope: &str, period: &str) -> Result<(u64, u64), MeterError>;
}

/// The store the state configuration asks for: Redis when it is set (shared by replicas,
/// seeded from the database), else the database's own mode, else this process.
pub fn open(
    db: Option<&Database>,
    redis: Option<Arc<crate::store::redis::Redis>>,
) -> Arc<dyn BudgetStore> {
    use crate::store::Kind;
    match (redis, db) {
        (Some(r), db) => Arc::new(RedisBudgets::new(r, db.cloned())),
        (None, Some(db)) if db.kind == Kind::Postgres => Arc::new(PostgresBudgets::new(db.clone())),
        (None, Some(db)) => Arc::new(SqliteBudgets::new(db.clone())),
        (None, None) => Arc::new(InProcessBudgets::default()),
    }
}

/// Why a budget refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// `tenant` or `key`.
    pub scope_kind: &'static str,
    pub budget: BudgetConfig,
    /// What is left in this period (budget - spent - held), never negative.
    pub left: u64,
    /// Unix seconds when the period ends (`None` for `total`).
    pub resets_at: Option<u64>,
}

/// `2026-11-25` or `2026-11` (every request with a budget names its period: no formatter).
fn date_label(y: i64, m: u32, d: Option<u32>) -> String {
    if !(0..=9999).contains(&y) {
        return match d {
            Some(d) => format!("{y:04}-{m:02}-{d:02}"),
            None => format!("{y:04}-{m:02}"),
        };
    }
    let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
    let y = y as u32;
    let mut out = String::with_capacity(10);
    out.extend([digit(y / 1000), digit(y / 100), digit(y / 10), digit(y)]);
    out.extend(['-', digit(m / 10), digit(m)]);
    if let Some(d) = d {
        out.extend(['-', digit(d / 10), digit(d)]);
    }
    out
}

/// The period a moment falls in (`2026-11-25`, `2026-11`, `total`) and when it ends.
pub fn period_of(period: BudgetPeriod, unix: u64) -> (String, Option<u64>) {
    let days = (unix / 86_400) as i64;
    let (y, m, d) = crate::clock::civil_from_days(days);
    match period {
        BudgetPeriod::Daily => (date_label(y, m, Some(d)), Some((days as u64 + 1) * 86_400)),
        BudgetPeriod::Monthly => {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                date_label(y, m, None),
                Some(crate::clock::days_from_civil(ny, nm, 1) as u64 * 86_400),
            )
        }
        BudgetPeriod::Total => ("total".to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{civil_from_days, days_from_civil};

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-11-25T16:00:00Z
        let t = 1_795_564_800 + 16 * 3600;
        assert_eq!(civil_from_days((t / 86_400) as i64), (2026, 11, 25));
        let (d, end) = period_of(BudgetPeriod::Daily, t);
        assert_eq!(d, "2026-11-25");
        assert_eq!(end, Some(1_795_564_800 + 86_400));
        let (m, end) = period_of(BudgetPeriod::Monthly, t);
        assert_eq!(m, "2026-11");
        assert_eq!(
            civil_from_days((end.unwrap() / 86_400) as i64),
            (2026, 12, 1)
        );
        let dec = days_from_civil(2026, 12, 31) as u64 * 86_400;
        let (_, end) = period_of(BudgetPeriod::Monthly, dec);
        assert_eq!(
            civil_from_days((end.unwrap() / 86_400) as i64),
            (2027, 1, 1)
        );
        assert_eq!(period_of(BudgetPeriod::Total, t), ("total".into(), None));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            days_from_civil(2000, 2, 29) + 1,
            days_from_civil(2000, 3, 1)
        );
    }
}
