//! The usage ledger's SQLite writer: a connection of its own (rusqlite) that writes each batch
//! in one transaction through prepared multi-row statements.
//!
//! Why not the shared sqlx pool: through sqlx's `Any` driver every value of a row was converted
//! twice and bound anew on sqlx's worker thread, and each statement was a round trip between
//! threads; the ledger insert cost ~24k instructions a row, a sixth of a whole request
//! (callgrind). Here a row is 19 binds into a statement prepared once (its strings bound
//! without copies, see [`Inserts`]) and a share of one step. The writes run on a blocking thread (`spawn_blocking` in the ledger's writer task), so neither
//! the inserts nor a checkpoint's `fsync` ever hold up the scheduler.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use std::ffi::c_int;

use rusqlite::{ffi, params, Connection, TransactionBehavior};

use super::sql::{budget_spent, idem_endings, ADD_SPENT, COLUMNS};
use super::{Settlement, UsageRow};
use crate::store::StoreError;

/// Rows per INSERT statement, at most: SQLite's per-statement work (opening a cursor on the
/// table and each index, the statement journal) is paid once per statement, so rows go in
/// multi-row `VALUES` lists. A batch is cut into statements of 64, 32, ..., 1 rows (its size
/// in binary), so at most seven statements exist, each prepared once.
const CHUNK: usize = 64;
const COLUMNS_PER_ROW: usize = 20;

fn insert_sql(rows: usize) -> &'static str {
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
    writer: Mutex<Writer>,
}

/// The connection and its INSERT statements. Field order matters: the statements are
/// finalized (dropped) before the connection closes.
struct Writer {
    inserts: Inserts,
    conn: Connection,
}

const SIZES: usize = CHUNK.trailing_zeros() as usize + 1;

/// The multi-row INSERTs (one per power of two up to [`CHUNK`] rows), prepared once on the
/// ledger's connection and driven through SQLite's C API, because rusqlite binds every string
/// with `SQLITE_TRANSIENT`: SQLite then allocates and copies each of a row's eight text
/// values and frees them again, ~4k instructions a row (callgrind, 512-row batches). Bound
/// with `SQLITE_STATIC`, SQLite reads the batch's own strings, which outlive the statement's
/// step; the bindings are cleared before `insert` returns, so no pointer to them is kept.
struct Inserts([*mut ffi::sqlite3_stmt; SIZES]);

// SAFETY: the statements belong to the connection beside them in `Writer` (rusqlite's
// `Connection` is `Send`); they move between threads only with it and are only used under
// the `SqliteLedger`'s mutex, one thread at a time, as SQLite's threading mode allows.
unsafe impl Send for Inserts {}

impl Drop for Inserts {
    fn drop(&mut self) {
        for stmt in self.0 {
            if !stmt.is_null() {
                // SAFETY: prepared by `insert` on the still open connection; finalized once.
                unsafe { ffi::sqlite3_finalize(stmt) };
            }
        }
    }
}

/// SQLite's message for a failed call on `db`.
fn sqlite_error(db: *mut ffi::sqlite3, rc: c_int) -> StoreError {
    // SAFETY: `db` is the open connection; the message is copied before any other call.
    let msg = unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db)) };
    StoreError::Invalid(format!(
        "sqlite (usage ledger): {} (code {rc})",
        msg.to_string_lossy()
    ))
}

impl Inserts {
    /// Inserts `rows` (a power of two, at most [`CHUNK`]) in one statement on `db`, inside
    /// the caller's transaction.
    fn insert(&mut self, db: *mut ffi::sqlite3, rows: &[&Settlement]) -> Result<(), StoreError> {
        debug_assert!(rows.len().is_power_of_two() && rows.len() <= CHUNK);
        let slot = &mut self.0[rows.len().trailing_zeros() as usize];
        if slot.is_null() {
            let sql = insert_sql(rows.len());
            let mut stmt = std::ptr::null_mut();
            // SAFETY: `db` is open; `sql` is valid UTF-8 of the given length; `stmt` receives
            // the statement (kept until `Inserts` is dropped).
            let rc = unsafe {
                ffi::sqlite3_prepare_v3(
                    db,
                    sql.as_ptr().cast(),
                    sql.len() as c_int,
                    ffi::SQLITE_PREPARE_PERSISTENT,
                    &mut stmt,
                    std::ptr::null_mut(),
                )
            };
            if rc != ffi::SQLITE_OK {
                return Err(sqlite_error(db, rc));
            }
            *slot = stmt;
        }
        let stmt = *slot;
        let mut bound = Ok(());
        for (i, s) in rows.iter().enumerate() {
            // SAFETY: the row's strings outlive this call, and the bindings are cleared
            // before it returns.
            bound = unsafe { bind_row(stmt, i * COLUMNS_PER_ROW, &s.row) };
            if bound.is_err() {
                break;
            }
        }
        // SAFETY: `stmt` is a live statement of `db`; step only when every value is bound.
        let rc = match bound {
            Ok(()) => unsafe { ffi::sqlite3_step(stmt) },
            Err(rc) => rc,
        };
        let result = if rc == ffi::SQLITE_DONE {
            Ok(())
        } else {
            Err(sqlite_error(db, rc))
        };
        // SAFETY: as above; afterwards the statement holds no pointer into the batch.
        unsafe {
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
        result
    }
}

/// Binds one row's columns from parameter `at + 1` on, in the INSERT's column order; the
/// first SQLite error code, if any.
///
/// # Safety
/// `stmt` is a live statement, and `r`'s strings stay alive and unchanged until its bindings
/// are cleared or replaced.
unsafe fn bind_row(stmt: *mut ffi::sqlite3_stmt, at: usize, r: &UsageRow) -> Result<(), c_int> {
    enum V<'a> {
        Text(Option<&'a str>),
        Int(Option<i64>),
    }
    let values: [V; COLUMNS_PER_ROW] = [
        V::Text(Some(&r.id)),
        V::Text(Some(&r.request_id)),
        V::Int(Some(r.ts_ms)),
        V::Text(Some(&r.tenant)),
        V::Text(Some(&r.key_id)),
        V::Text(Some(&r.model)),
        V::Text(r.backend.as_deref()),
        V::Text(Some(&r.size)),
        V::Text(r.quality.as_deref()),
        V::Int(Some(r.n_requested.into())),
        V::Int(Some(r.n_delivered.into())),
        V::Int(Some(r.reserved_micro_usd as i64)),
        V::Int(Some(r.cost_micro_usd as i64)),
        V::Int(Some(r.upstream_cost_micro_usd as i64)),
        V::Int(r.input_tokens),
        V::Int(r.output_tokens),
        V::Int(Some(r.status.into())),
        V::Int(Some(r.latency_ms as i64)),
        V::Text(r.idempotency_key.as_deref()),
        V::Text(Some(&r.operation)),
    ];
    for (i, v) in values.into_iter().enumerate() {
        let n = (at + i + 1) as c_int;
        let rc = match v {
            V::Text(Some(t)) => ffi::sqlite3_bind_text(
                stmt,
                n,
                t.as_ptr().cast(),
                t.len() as c_int,
                ffi::SQLITE_STATIC(),
            ),
            V::Int(Some(x)) => ffi::sqlite3_bind_int64(stmt, n, x),
            V::Text(None) | V::Int(None) => ffi::sqlite3_bind_null(stmt, n),
        };
        if rc != ffi::SQLITE_OK {
            return Err(rc);
        }
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
            writer: Mutex::new(Writer {
                inserts: Inserts([std::ptr::null_mut(); SIZES]),
                conn,
            }),
        })
    }

    /// Writes a batch in one transaction: every row (a row already there is not inserted
    /// again), what each budget spent, and each idempotency record's end.
    /// Blocking: call it from a blocking thread.
    pub fn write(&self, batch: &[&Settlement]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Writer { inserts, conn } = &mut *writer;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_error)?;
        {
            // SAFETY: the connection's own handle, used on this thread while we hold it.
            let db = unsafe { tx.handle() };
            let mut rest = batch;
            while !rest.is_empty() {
                // The largest power of two that fits (at most CHUNK).
                let n = CHUNK.min(1 << rest.len().ilog2());
                let (rows, tail) = rest.split_at(n);
                inserts.insert(db, rows)?;
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
