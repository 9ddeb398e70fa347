//! Budgets held in PostgreSQL, shared by every replica: a hold is a row of `budget_holds` (a
//! lease, named by the request's ledger row id) and an addition to the budget's `held`, made
//! in one statement; the ledger's transaction gives it back when the request settles, and a
//! sweep gives back the holds of replicas that died.

use async_trait::async_trait;

use super::{BudgetStore, Hold, HoldAsk};
use crate::metering::ledger::sql::give_back_sql;
use crate::metering::ledger::BudgetBook;
use crate::metering::MeterError;
use crate::store::{Database, StoreError};

pub struct PostgresBudgets {
    db: Database,
}

impl PostgresBudgets {
    pub fn new(db: Database) -> Self {
        PostgresBudgets { db }
    }
}

#[async_trait]
impl BudgetStore for PostgresBudgets {
    fn book(&self) -> BudgetBook {
        BudgetBook::HoldsInDatabase
    }

    async fn hold(&self, ask: &HoldAsk<'_>) -> Result<Result<(), u64>, MeterError> {
        let expires = crate::clock::now_ms() + ask.lease.as_millis() as i64;
        Ok(sql_reserve(
            &self.db, ask.scope, ask.period, ask.cost, ask.limit, ask.member, expires,
        )
        .await?)
    }

    async fn release(&self, hold: &Hold, member: &str) {
        if let Err(e) = sql_release(&self.db, hold, member).await {
            tracing::error!(error = %e, scope = %hold.scope, "budget release failed");
        }
    }

    fn settle(&self, _holds: &[Hold], _member: &str, _cost: u64) {
        // The ledger's transaction gives the holds back and adds the cost.
    }

    async fn sweep(&self) -> Result<u64, MeterError> {
        Ok(sql_sweep_holds(&self.db, crate::clock::now_ms()).await?)
    }

    async fn usage(&self, scope: &str, period: &str) -> Result<(u64, u64), MeterError> {
        Ok(sql_spent(&self.db, scope, period).await?)
    }
}

/// Holds `amount` in one PostgreSQL budget row and records the hold (a lease until
/// `expires_ms`) in the same statement, or says what is left. The row is created the first
/// time a period is used.
pub async fn sql_reserve(
    db: &Database,
    scope: &str,
    period: &str,
    amount: u64,
    limit: u64,
    member: &str,
    expires_ms: i64,
) -> Result<Result<(), u64>, StoreError> {
    let hold = || {
        sqlx::query(
            "WITH u AS (UPDATE budget_usage SET held = held + $3 \
             WHERE scope = $1 AND period = $2 AND spent + held + $3 <= $4 RETURNING scope) \
             INSERT INTO budget_holds (member, scope, period, amount, expires_at) \
             SELECT $5, $1, $2, $3, $6 FROM u",
        )
        .bind(scope)
        .bind(period)
        .bind(amount as i64)
        .bind(limit as i64)
        .bind(member)
        .bind(expires_ms)
    };
    if hold().execute(&db.pool).await?.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    // The period's row may not exist yet (made here, or by a concurrent request).
    sqlx::query(
        "INSERT INTO budget_usage (scope, period, spent, held) VALUES ($1, $2, 0, 0) \
         ON CONFLICT (scope, period) DO NOTHING",
    )
    .bind(scope)
    .bind(period)
    .execute(&db.pool)
    .await?;
    if hold().execute(&db.pool).await?.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    let (spent, held) = sql_spent(db, scope, period).await?;
    Ok(Err(limit.saturating_sub(spent + held)))
}

/// Gives back the holds whose lease ran out (their replica died); returns how many budgets.
pub async fn sql_sweep_holds(db: &Database, now_ms: i64) -> Result<u64, StoreError> {
    Ok(sqlx::query(&give_back_sql("expires_at < $1"))
        .bind(now_ms)
        .execute(&db.pool)
        .await?
        .rows_affected())
}

/// (spent, held) of one budget row.
pub async fn sql_spent(db: &Database, scope: &str, period: &str) -> Result<(u64, u64), StoreError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT spent, held FROM budget_usage WHERE scope = $1 AND period = $2")
            .bind(scope)
            .bind(period)
            .fetch_optional(&db.pool)
            .await?;
    let (s, h) = row.unwrap_or((0, 0));
    Ok((s.max(0) as u64, h.max(0) as u64))
}

/// Gives back a request's hold in one budget (a later budget refused it).
pub async fn sql_release(db: &Database, hold: &Hold, member: &str) -> Result<(), StoreError> {
    sqlx::query(&give_back_sql("member = $1 AND scope = $2"))
        .bind(member)
        .bind(&hold.scope)
        .execute(&db.pool)
        .await?;
    Ok(())
}
