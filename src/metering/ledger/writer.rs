//! The ledger's writer task: settlements arrive through a channel and are written in batches
//! (one transaction each), after a short linger when they are journaled already; failed
//! batches are retried; at start, what a previous process journaled is replayed first.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::journal::{commit_through, Journal};
use super::sql::write_batch;
use super::sqlite::SqliteLedger;
use super::{BudgetBook, Settlement};
use crate::store::{Database, StoreError};

/// What the writer task is sent.
pub(super) enum Msg {
    Settle(Box<Settlement>, Option<oneshot::Sender<bool>>),
    Flush(oneshot::Sender<()>),
}

/// The ledger's writer task, fed through a channel.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Msg>,
    journal: Option<Arc<Journal>>,
}

const MAX_BATCH: usize = 512;
/// How long journaled settlements wait for company before they are committed.
const LINGER: Duration = Duration::from_millis(20);

impl Ledger {
    /// Starts the writer; with a journal path, first replays what a previous process left
    /// there.
    pub async fn start(
        db: Database,
        book: BudgetBook,
        journal: Option<&Path>,
        holds_in_redis: bool,
    ) -> Result<Self, StoreError> {
        let sink = Sink::open(db, book)?;
        let journal = match journal {
            Some(path) => {
                replay(&sink, path).await?;
                Some(Arc::new(Journal::open(path, holds_in_redis).map_err(
                    |e| StoreError::Invalid(format!("ledger journal {}: {e}", path.display())),
                )?))
            }
            None => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(sink, rx, journal.clone()));
        Ok(Ledger { tx, journal })
    }

    /// Makes a settlement durable: journaled (returns within the scheduler tick, see
    /// [`Journal`]) when there is a journal and `wait` is false, else committed (waits for the
    /// transaction). False if it could not be made durable.
    pub async fn commit(&self, s: Box<Settlement>, wait: bool) -> bool {
        if let (Some(j), false) = (&self.journal, wait) {
            // This request counts itself among those in flight.
            let company = crate::telemetry::metrics().in_flight().get() > 1;
            return j.append_grouped(s, &self.tx, company).await;
        }
        commit_through(&self.tx, s).await
    }

    /// Queues a settlement without waiting (a request abandoned by its client).
    pub fn submit(&self, s: Settlement) {
        if let Some(j) = &self.journal {
            if j.append(&s).is_err() {
                tracing::error!("ledger journal write failed");
            }
        }
        let _ = self.tx.send(Msg::Settle(Box::new(s), None));
    }

    /// Waits until everything queued so far is written (shutdown).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

type Batch = Vec<(Box<Settlement>, Option<oneshot::Sender<bool>>)>;

async fn run(sink: Sink, mut rx: mpsc::UnboundedReceiver<Msg>, journal: Option<Arc<Journal>>) {
    let mut batch: Batch = Vec::new();
    let mut flushes = Vec::new();
    // Rows whose write failed (the database down, the disk full): kept, first in the next
    // batch, and retried until they are written; never dropped. Their waiters were told
    // "not durable" already. `held_journaled` of them are in the journal too.
    let mut held: Batch = Vec::new();
    let mut held_journaled = 0usize;
    let mut closed = false;
    loop {
        let first = if held.is_empty() {
            match rx.recv().await {
                Some(m) => Some(m),
                None => break,
            }
        } else {
            tokio::select! {
                m = rx.recv(), if !closed => {
                    closed = m.is_none();
                    m
                }
                () = tokio::time::sleep(HELD_RETRY) => None,
            }
        };
        let mut next = first;
        let mut lingered = false;
        loop {
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Settle(s, done) => batch.push((s, done)),
                    Msg::Flush(done) => flushes.push(done),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            // Journaled settlements are durable already: gather a few milliseconds' worth
            // into one transaction, unless someone waits for this batch.
            let waited_on = !flushes.is_empty() || batch.iter().any(|(_, d)| d.is_some());
            if batch.is_empty() || lingered || waited_on || batch.len() >= MAX_BATCH {
                break;
            }
            lingered = true;
            tokio::time::sleep(LINGER).await;
            next = rx.try_recv().ok();
            if next.is_none() {
                break;
            }
        }
        if !batch.is_empty() || !held.is_empty() {
            let fresh_journaled = batch.iter().filter(|(_, d)| d.is_none()).count();
            let mut all = std::mem::take(&mut held);
            all.append(&mut batch);
            let ok;
            (all, ok) = write_with_retry(&sink, all).await;
            crate::telemetry::metrics().ledger_batch(all.len(), ok);
            if ok {
                for (_, done) in all.drain(..) {
                    if let Some(done) = done {
                        let _ = done.send(true);
                    }
                }
                if let Some(j) = &journal {
                    j.committed(held_journaled + fresh_journaled);
                }
                held_journaled = 0;
            } else {
                // Not written: waiters hear so now, the rows stay for the next try.
                for (_, done) in all.iter_mut() {
                    if let Some(done) = done.take() {
                        let _ = done.send(false);
                    }
                }
                // An empty batch: the SQLite writer thread died holding it, and its journaled
                // rows stay in the journal for the next start.
                held_journaled = if all.is_empty() {
                    0
                } else {
                    held_journaled + fresh_journaled
                };
                held = all;
                if !held.is_empty() {
                    tracing::error!(
                        rows = held.len(),
                        "usage ledger unavailable: rows kept in memory and retried"
                    );
                }
            }
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

/// How often rows that could not be written are tried again.
const HELD_RETRY: Duration = Duration::from_secs(1);

/// Applies what a previous process journaled, skipping rows already committed.
async fn replay(sink: &Sink, path: &Path) -> Result<(), StoreError> {
    let entries = Journal::read(path);
    if entries.is_empty() {
        return Ok(());
    }
    let mut fresh = Vec::new();
    for s in &entries {
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM usage_ledger WHERE id = $1")
            .bind(&s.row.id)
            .fetch_optional(&sink.db().pool)
            .await?;
        if exists.is_none() {
            fresh.push(s);
        }
    }
    sink.write(&fresh).await?;
    tracing::warn!(
        journaled = entries.len(),
        replayed = fresh.len(),
        "usage ledger journal replayed (the previous process stopped before committing it)"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .map_err(|e| StoreError::Invalid(format!("ledger journal {}: {e}", path.display())))?;
    Ok(())
}

async fn write_with_retry(sink: &Sink, mut batch: Batch) -> (Batch, bool) {
    let mut wait = Duration::from_millis(50);
    for attempt in 0..5 {
        let result;
        (batch, result) = sink.write_owned(batch).await;
        match result {
            Ok(()) => return (batch, true),
            Err(e) => {
                tracing::error!(error = %e, attempt, rows = batch.len(), "usage ledger write failed");
                if batch.is_empty() {
                    // The blocking write panicked (or was cancelled at shutdown) and took the
                    // batch with it: its journaled rows stay in the journal for the next
                    // start; its waiters were told "not durable".
                    return (batch, false);
                }
                tokio::time::sleep(wait).await;
                wait *= 3;
            }
        }
    }
    (batch, false)
}

/// Where batches are written.
enum Sink {
    /// SQLite: the ledger's own connection ([`SqliteLedger`]), written on its own thread
    /// ([`SqliteWriter`]). (The pool stays for the journal's replay check.)
    Sqlite(Arc<SqliteLedger>, SqliteWriter, Database),
    /// PostgreSQL, through the pool.
    Pool(Database, BudgetBook),
}

impl Sink {
    fn open(db: Database, book: BudgetBook) -> Result<Self, StoreError> {
        match (&db.kind, &db.sqlite_file) {
            (crate::store::Kind::Sqlite, Some(file)) => {
                let ledger = Arc::new(SqliteLedger::open(file)?);
                let writer = SqliteWriter::start(ledger.clone())?;
                Ok(Sink::Sqlite(ledger, writer, db))
            }
            (crate::store::Kind::Sqlite, None) => Err(StoreError::Invalid(
                "the usage ledger needs a SQLite database file".into(),
            )),
            (crate::store::Kind::Postgres, _) => Ok(Sink::Pool(db, book)),
        }
    }

    fn db(&self) -> &Database {
        match self {
            Sink::Sqlite(_, _, db) | Sink::Pool(db, _) => db,
        }
    }

    /// Writes a batch where it stands (replay at start, tests).
    async fn write(&self, batch: &[&Settlement]) -> Result<(), StoreError> {
        match self {
            Sink::Sqlite(w, _, _) => w.write(batch),
            Sink::Pool(db, book) => write_batch(db, *book, batch).await,
        }
    }

    /// Writes the writer task's batch, off the scheduler's thread for SQLite, and gives it
    /// back (empty if the SQLite writer thread died while it held the batch).
    async fn write_owned(&self, batch: Batch) -> (Batch, Result<(), StoreError>) {
        match self {
            Sink::Sqlite(_, writer, _) => writer.write(batch).await,
            Sink::Pool(db, book) => {
                let result = write_batch(db, *book, &settlements(&batch)).await;
                (batch, result)
            }
        }
    }
}

/// The nice value of the SQLite ledger's thread. The gateway's request thread and this one
/// share a core when the gateway has one (or when requests keep every core busy): at nice 0 a
/// group commit of a few hundred rows (~0.7 ms of CPU) took the core from requests in flight
/// half the time while it ran, and p99 latency at concurrency 1 was ~0.75-1.2 ms; at nice 10
/// it was 0.25-0.63 ms, with the same throughput at concurrency 64 (bench/README.md). At nice
/// 10 the thread still gets ~10% of a saturated core (CFS weights 110 vs 1024); it needs ~7%
/// at full load (perf, c=64), and kept up through 60 s at c=64 (1.35M rows, none behind).
const SQLITE_WRITER_NICE: i32 = 10;

type WriteJob = (Batch, oneshot::Sender<(Batch, Result<(), StoreError>)>);

/// The thread that runs the SQLite ledger's transactions, at a lower CPU priority than the
/// request thread ([`SQLITE_WRITER_NICE`]). Ends when the [`Sink`] is dropped.
struct SqliteWriter(std::sync::mpsc::Sender<WriteJob>);

impl SqliteWriter {
    fn start(ledger: Arc<SqliteLedger>) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                lower_priority(SQLITE_WRITER_NICE);
                for (batch, reply) in rx {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        ledger.write(&settlements(&batch))
                    }))
                    .unwrap_or_else(|_| {
                        Err(StoreError::Invalid("usage ledger writer panicked".into()))
                    });
                    let _ = reply.send((batch, result));
                }
            })
            .map_err(|e| {
                StoreError::Invalid(format!("cannot start the usage ledger writer: {e}"))
            })?;
        Ok(SqliteWriter(tx))
    }

    async fn write(&self, batch: Batch) -> (Batch, Result<(), StoreError>) {
        let gone = || StoreError::Invalid("usage ledger writer stopped".into());
        let (reply, answer) = oneshot::channel();
        if let Err(std::sync::mpsc::SendError((batch, _))) = self.0.send((batch, reply)) {
            return (batch, Err(gone()));
        }
        answer.await.unwrap_or_else(|_| (Vec::new(), Err(gone())))
    }
}

/// Raises the calling thread's nice value (Linux keeps one per thread); a failure only leaves
/// it where it was.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority on the calling thread's own id changes only its nice value.
        let rc =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the usage ledger writer's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

fn settlements(batch: &Batch) -> Vec<&Settlement> {
    batch.iter().map(|(s, _)| &**s).collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::settlement;
    use super::*;

    /// Batches padded to a power of two, and batches of many chunks, keep every row once,
    /// with its own values, and the budget adds each row's cost once.
    #[tokio::test]
    async fn sqlite_batches_of_any_size_write_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::sqlite(dir.path()).await.unwrap();
        let sink = Sink::open(db.clone(), BudgetBook::SpentOnly).unwrap();
        let all: Vec<Settlement> = (0..600).map(settlement).collect();
        let mut start = 0;
        for n in [5, 1, 594] {
            let batch: Vec<&Settlement> = all[start..start + n].iter().collect();
            sink.write(&batch).await.unwrap();
            start += n;
        }
        let (rows, distinct, sum): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT id), SUM(cost_micro_usd) FROM usage_ledger",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let expected: i64 = (0..600).map(|i| 10 + i).sum();
        assert_eq!((rows, distinct, sum), (600, 600, expected));
        let spent: i64 = sqlx::query_scalar(
            "SELECT spent FROM budget_usage WHERE scope = 'tenant:t' AND period = 'total'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(spent, expected);
        let (request_id, backend, tokens, n): (String, Option<String>, Option<i64>, i64) =
            sqlx::query_as(
                "SELECT request_id, backend, input_tokens, n_requested FROM usage_ledger \
                 WHERE id = 'row-0003'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            (request_id.as_str(), backend, tokens, n),
            ("req-3", None, Some(3), 2)
        );
    }

    /// The writer task's batches go through the SQLite writer thread and come back whole,
    /// written; the thread runs at the lower priority that keeps its commits from taking the
    /// core from requests.
    #[tokio::test]
    async fn sqlite_writer_thread_writes_batches_at_lower_priority() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::sqlite(dir.path()).await.unwrap();
        let sink = Sink::open(db.clone(), BudgetBook::SpentOnly).unwrap();
        let batch: Batch = (0..70).map(|i| (Box::new(settlement(i)), None)).collect();
        let (back, result) = sink.write_owned(batch).await;
        result.unwrap();
        assert_eq!(back.len(), 70);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_ledger")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(rows, 70);

        #[cfg(target_os = "linux")]
        {
            // Every ledger writer thread of this test process (tests run side by side).
            let mut nices = Vec::new();
            for task in std::fs::read_dir("/proc/self/task").unwrap() {
                let task = task.unwrap().path();
                let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
                if comm.trim() == "ledger-writer" {
                    let stat = std::fs::read_to_string(task.join("stat")).unwrap();
                    // Fields after the command's closing parenthesis; nice is the 19th field.
                    let after = &stat[stat.rfind(')').unwrap() + 2..];
                    let nice: i32 = after.split(' ').nth(16).unwrap().parse().unwrap();
                    nices.push(nice);
                }
            }
            assert!(!nices.is_empty(), "no ledger-writer thread");
            assert!(nices.iter().all(|&n| n == SQLITE_WRITER_NICE), "{nices:?}");
        }
    }
}
