//! The usage ledger: one row per relayed request, written by one task in batches (group
//! commit: multi-row INSERTs and one UPDATE per budget touched, per transaction). The row,
//! the settlement of its budget holds and the idempotency record go into one transaction.
//! PostgreSQL's batches go through the pool; SQLite's through the ledger's own connection on
//! a thread of its own ([`sqlite`]).
//!
//! Durability before the answer is sent, two ways:
//! - **commit** (PostgreSQL, and any request carrying an `Idempotency-Key`): the answer waits
//!   for the transaction;
//! - **journal** (SQLite): the settlement is appended to `data_dir/ledger.journal` (a `write`
//!   into the OS page cache, which outlives a `kill -9` of the process) and the transaction
//!   follows; at start the journal is replayed (rows already in the table are skipped, so
//!   nothing is charged twice) and emptied whenever everything in it is committed.
//!
//! Layout: the row and settlement types here; [`journal`] (the append-only file and its line
//! encoder), [`writer`] (the task that batches settlements, the SQLite writer thread, the
//! replay at start), [`sql`] (the statements both databases run, PostgreSQL's batch) and
//! [`sqlite`] (SQLite's batch, on a connection of its own). Usage reports read the table
//! through `metering::report`.

mod journal;
pub(crate) mod sql;
mod sqlite;
mod writer;

use serde::{Deserialize, Serialize};

pub use writer::Ledger;

/// A budget a request drew on (`scope` `tenant:<id>` or `key:<id>`, in one `period`), with the
/// micro-dollars held in it. Where the hold lives is the budget store's business
/// (`metering::budget`), not the hold's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hold {
    pub scope: String,
    pub period: String,
    /// Micro-dollars held.
    pub amount: u64,
}

/// One request, as the ledger keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub id: String,
    pub request_id: String,
    pub ts_ms: i64,
    pub tenant: String,
    pub key_id: String,
    pub model: String,
    pub backend: Option<String>,
    pub size: String,
    pub quality: Option<String>,
    pub n_requested: u32,
    pub n_delivered: u32,
    pub reserved_micro_usd: u64,
    pub cost_micro_usd: u64,
    pub upstream_cost_micro_usd: u64,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub status: u16,
    pub latency_ms: u64,
    pub idempotency_key: Option<String>,
    /// `generation`, `edit` or `variation`; journal lines written before edits existed have
    /// none and were generations.
    #[serde(default = "generation")]
    pub operation: std::borrow::Cow<'static, str>,
}

fn generation() -> std::borrow::Cow<'static, str> {
    std::borrow::Cow::Borrowed("generation")
}

/// What becomes of an `Idempotency-Key` record when its request ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum IdemOutcome {
    /// Keep the answer for repeats.
    Complete {
        tenant: String,
        key: String,
        response: String,
    },
    /// Forget the key: the request failed, a repeat runs anew.
    Release { tenant: String, key: String },
}

/// Everything that ends one request, committed together.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settlement {
    pub row: UsageRow,
    /// Each hold is settled at `row.cost_micro_usd`.
    pub holds: Vec<Hold>,
    pub idem: Option<IdemOutcome>,
}

/// What the ledger's transaction does to a budget row when a request settles; the budget
/// store says which ([`crate::metering::budget::BudgetStore::book`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetBook {
    /// Holds live in the database (PostgreSQL budgets): the transaction gives the request's
    /// holds back and adds its cost, `held -= hold, spent += cost`.
    HoldsInDatabase,
    /// Holds live elsewhere (this process, or Redis): the transaction only adds the cost to
    /// `spent`, which is what the next process or replica seeds its budgets from.
    SpentOnly,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A settlement whose fields vary with `i`.
    pub(crate) fn settlement(i: u64) -> Settlement {
        Settlement {
            row: UsageRow {
                id: format!("row-{i:04}"),
                request_id: format!("req-{i}"),
                ts_ms: 1_700_000_000_000 + i as i64,
                tenant: "t".into(),
                key_id: "k".into(),
                model: "dall-e-2".into(),
                backend: (i % 2 == 0).then(|| "b".into()),
                size: "256x256".into(),
                n_requested: 2,
                n_delivered: 1,
                cost_micro_usd: 10 + i,
                input_tokens: (i % 3 == 0).then_some(i as i64),
                status: 200,
                ..UsageRow::default()
            },
            holds: vec![Hold {
                scope: "tenant:t".into(),
                period: "total".into(),
                amount: 10 + i,
            }],
            idem: None,
        }
    }
}
