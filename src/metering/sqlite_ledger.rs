//! The usage ledger's SQLite writer: a connection of its own (rusqlite) that writes each batch
//! in one transaction through prepared multi-row statements.
//!
//! Why not the shared sqlx pool: through sqlx's `Any` driver every value of a row was converted
//! twice and bound anew on sqlx's worker thread, and each statement was a round trip between
//! threads; the ledger insert cost ~24k instructions a row, a sixth of a whole request
//! (callgrind). Here a row is 19 binds into a cached statement and a share of one step. The
//! writes run on a blocking thread (`spawn_blocking` in the ledger's writer task), so neither
//! the inserts nor a checkpoint's `fsync` ever hold up the scheduler.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, ToSql, TransactionBehavior};

use super::ledger::{budget_spent, idem_endings, Settlement, UsageRow, ADD_SPENT, COLUMNS};
use crate::store::StoreError;

/// Rows per INSERT statement, at most: SQLite's per-statement work (opening a cursor on the
/// table and each index, the statement journal) is paid once per statement, so rows go in
/// multi-row `VALUES` lists. A batch is cut into statements of 64, 32, ..., 1 rows (its size
/// in binary), so at most seven statements exist, each prepared once.
const CHUNK: usize = 64;
const COLUMNS_PER_ROW: usize = 19;

fn insert_sql(rows: usize) -> &'static str {
    const SIZES: usize = CHUNK.trailing_zeros() as usize + 1;
    static SQL: [std::sync::OnceLock<String>; SIZES] =
        [const { std::sync::OnceLock::new() }; SIZES];
    SQL[rows.trailing_zeros() as usize].get_or_init(|| {
        debug_assert_eq!(COLUMNS.split(", ").count(), COLUMNS_PER_ROW);
        let one = format!("({})", vec!["?"; COLUMNS_PER_ROW].join(","));
        format!(
            "INSERT INTO usage_ledger ({COLUMNS}) VALUES {} ON CONFLICT (id) DO NOTHING",
            vec![one; rows].join(",")
        )
    })
}

pub struct SqliteLedger {
    conn: Mutex<Connection>,
}

/// Binds one row's columns from parameter `at + 1` on, in the INSERT's column order.
fn bind_row(q: &mut rusqlite::Statement<'_>, at: usize, r: &UsageRow) -> rusqlite::Result<()> {
    let values: [&dyn ToSql; COLUMNS_PER_ROW] = [
        &r.id,
        &r.request_id,
        &r.ts_ms,
        &r.tenant,
        &r.key_id,
        &r.model,
        &r.backend,
        &r.size,
        &r.quality,
        &r.n_requested,
        &r.n_delivered,
        &(r.reserved_micro_usd as i64),
        &(r.cost_micro_usd as i64),
        &(r.upstream_cost_micro_usd as i64),
        &r.input_tokens,
        &r.output_tokens,
        &r.status,
        &(r.latency_ms as i64),
        &r.idempotency_key,
    ];
    for (i, v) in values.into_iter().enumerate() {
        q.raw_bind_parameter(at + i + 1, v)?;
    }
    Ok(())
}

fn db_error(e: rusqlite::Error) -> StoreError {
    StoreError::Invalid(format!("sqlite (usage ledger): {e}"))
}

impl SqliteLedger {
    /// Opens the database file (already migrated by the pool) with the pool's settings.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(db_error)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(db_error)?;
        // As the pool's connections: WAL, and NORMAL (a commit survives the process; the
        // journal covers the rest).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_error)?;
        Ok(SqliteLedger {
            conn: Mutex::new(conn),
        })
    }

    /// Writes a batch in one transaction: every row (a row already there is not inserted
    /// again), what each budget spent, and each idempotency record's end.
    /// Blocking: call it from a blocking thread.
    pub fn write(&self, batch: &[&Settlement]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_error)?;
        {
            let mut rest = batch;
            while !rest.is_empty() {
                // The largest power of two that fits (at most CHUNK).
                let n = CHUNK.min(1 << rest.len().ilog2());
                let (rows, tail) = rest.split_at(n);
                let mut insert = tx.prepare_cached(insert_sql(n)).map_err(db_error)?;
                for (i, s) in rows.iter().enumerate() {
                    bind_row(&mut insert, i * COLUMNS_PER_ROW, &s.row).map_err(db_error)?;
                }
                insert.raw_execute().map_err(db_error)?;
                rest = tail;
            }
            let mut add = tx.prepare_cached(ADD_SPENT).map_err(db_error)?;
            for ((scope, period), cost) in budget_spent(batch) {
                add.execute(params![scope, period, cost])
                    .map_err(db_error)?;
            }
            for (sql, values) in idem_endings(batch) {
                tx.prepare_cached(sql)
                    .and_then(|mut q| q.execute(rusqlite::params_from_iter(values)))
                    .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }
}
