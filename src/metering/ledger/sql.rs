//! The statements both databases' batches run, and PostgreSQL's batch (SQLite's is
//! [`super::sqlite`]).

use super::{BudgetBook, IdemOutcome, Settlement, UsageRow};
use crate::store::{Database, StoreError};

// The statements both databases' batches run. Parameters are `$N` in order of first appearance:
// sqlx binds `$N` by number, rusqlite by position (SQLite numbers `$N` names as they appear).
pub(crate) const ADD_SPENT: &str = "INSERT INTO budget_usage (scope, period, spent, held) \
     VALUES ($1, $2, $3, 0) ON CONFLICT (scope, period) DO UPDATE SET spent = budget_usage.spent + $3";
const IDEM_COMPLETE: &str =
    "UPDATE idempotency SET state = 'done', response = $1 WHERE tenant = $2 AND idem_key = $3";
const IDEM_RELEASE: &str = "DELETE FROM idempotency WHERE tenant = $1 AND idem_key = $2";

/// How each idempotency record of a batch ends: a statement and its parameters.
pub(super) fn idem_endings<'a>(
    batch: &'a [&'a Settlement],
) -> impl Iterator<Item = (&'static str, Vec<&'a str>)> + 'a {
    batch.iter().filter_map(|s| match &s.idem {
        Some(IdemOutcome::Complete {
            tenant,
            key,
            response,
        }) => Some((IDEM_COMPLETE, vec![response.as_str(), tenant, key])),
        Some(IdemOutcome::Release { tenant, key }) => {
            Some((IDEM_RELEASE, vec![tenant.as_str(), key]))
        }
        None => None,
    })
}

/// What each budget touched by a batch spent: one UPDATE per budget, not per row.
pub(super) fn budget_spent<'a>(
    batch: &[&'a Settlement],
) -> crate::FastMap<(&'a str, &'a str), i64> {
    let mut spent = crate::FastMap::default();
    for s in batch {
        for h in &s.holds {
            *spent
                .entry((h.scope.as_str(), h.period.as_str()))
                .or_default() += s.row.cost_micro_usd as i64;
        }
    }
    spent
}

pub(crate) const COLUMNS: &str =
    "id, request_id, ts_ms, tenant, key_id, model, backend, size, quality, \
     n_requested, n_delivered, reserved_micro_usd, cost_micro_usd, upstream_cost_micro_usd, \
     input_tokens, output_tokens, status, latency_ms, idempotency_key, operation";

fn postgres_insert() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "INSERT INTO usage_ledger ({COLUMNS}) SELECT {COLUMNS} FROM \
             json_populate_recordset(NULL::usage_ledger, $1::json) ON CONFLICT (id) DO NOTHING \
             RETURNING id"
        )
    })
}

/// PostgreSQL's batch, in one transaction (SQLite's: [`SqliteLedger::write`]).
pub(super) async fn write_batch(
    db: &Database,
    book: BudgetBook,
    batch: &[&Settlement],
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut tx = db.pool.begin().await?;
    // One statement for the batch: no per-row round trips to the database.
    let rows: Vec<&UsageRow> = batch.iter().map(|s| &s.row).collect();
    // One parameter (a JSON array): one prepared statement whatever the batch size.
    let json = serde_json::to_string(&rows).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // The rows this transaction adds: a batch tried again after a commit whose answer was
    // lost finds its rows there already, and must not add their cost to the budgets twice.
    let inserted: std::collections::HashSet<String> = sqlx::query_scalar(postgres_insert())
        .bind(json)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let fresh: Vec<&Settlement> = batch
        .iter()
        .copied()
        .filter(|s| inserted.contains(&s.row.id))
        .collect();
    // One statement per budget row touched by the batch.
    // Holds in the database (PostgreSQL without Redis) are given back by deleting their rows
    // (a hold whose lease already ran out was given back by the sweep, and is not again);
    // then every budget touched adds what was spent.
    if book == BudgetBook::HoldsInDatabase {
        let members: Vec<&str> = batch
            .iter()
            .filter(|s| !s.holds.is_empty())
            .map(|s| s.row.id.as_str())
            .collect();
        if !members.is_empty() {
            let json =
                serde_json::to_string(&members).map_err(|e| StoreError::Invalid(e.to_string()))?;
            sqlx::query(&give_back_sql(
                "member IN (SELECT json_array_elements_text($1::json))",
            ))
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
    }
    for ((scope, period), cost) in budget_spent(&fresh) {
        sqlx::query(ADD_SPENT)
            .bind(scope)
            .bind(period)
            .bind(cost)
            .execute(&mut *tx)
            .await?;
    }
    for (sql, params) in idem_endings(batch) {
        let mut q = sqlx::query(sql);
        for p in params {
            q = q.bind(p);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// `DELETE`s hold rows (chosen by `filter`, with `$1` bound) and takes their amounts off
/// `held`, in one statement: a hold is given back exactly once, whoever gets there first.
pub(crate) fn give_back_sql(filter: &str) -> String {
    format!(
        "WITH d AS (DELETE FROM budget_holds WHERE {filter} RETURNING scope, period, amount), \
         s AS (SELECT scope, period, SUM(amount) AS amount FROM d GROUP BY scope, period) \
         UPDATE budget_usage SET held = budget_usage.held - s.amount FROM s \
         WHERE budget_usage.scope = s.scope AND budget_usage.period = s.period"
    )
}
