//! The journal: the append-only file that makes a SQLite settlement durable before it is
//! committed, its grouped writes, and the hand-written encoder of its lines.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use super::writer::Msg;
use super::Settlement;

/// The append-only file that makes a settlement durable before it is committed.
///
/// Appends are grouped while other requests are in flight: the first request to journal in a
/// scheduler tick becomes the group's leader and yields once, so that every other request
/// finishing in the same tick adds its line; then one `write` takes them all, and each
/// settlement goes on to the writer task (or, if the file cannot be written, to be committed
/// before its request is answered). One system call per tick instead of one per request
/// (measured: the per-request `write` was 3.5% of the gateway's core at 10k requests/s).
pub struct Journal {
    /// The file, and a buffer a lone line is encoded into (kept, so its memory is reused).
    file: Mutex<(std::fs::File, Vec<u8>)>,
    path: PathBuf,
    /// Settlements appended and not yet committed.
    pending: AtomicUsize,
    /// Lines waiting for their group's write.
    group: Mutex<Group>,
    /// What each hold's `in_redis` says in a line: where the budget store keeps holds (one
    /// store per process, so one value per journal; kept in the line so the format stays).
    holds_in_redis: bool,
}

/// A settlement waiting for its group's write, and who to tell that it is durable.
type Member = (Box<Settlement>, oneshot::Sender<bool>);

#[derive(Default)]
struct Group {
    lines: Vec<u8>,
    members: Vec<Member>,
    /// A leader is gathering this group.
    led: bool,
}

/// Writes the group it leads when dropped, so a leader whose request is abandoned while it
/// yields (the client went away) still writes its followers' lines.
struct Leader<'a> {
    journal: &'a Journal,
    tx: &'a mpsc::UnboundedSender<Msg>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.journal.write_group(self.tx);
    }
}

impl Journal {
    pub(super) fn open(path: &Path, holds_in_redis: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Journal {
            file: Mutex::new((file, Vec::with_capacity(1024))),
            path: path.to_path_buf(),
            pending: AtomicUsize::new(0),
            group: Mutex::new(Group::default()),
            holds_in_redis,
        })
    }

    /// Appends now, alone: a settlement queued from synchronous code, or one with no other
    /// request in flight to group with.
    pub(super) fn append(&self, s: &Settlement) -> std::io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, line) = &mut *f;
        line.clear();
        encode_line(s, self.holds_in_redis, line)?;
        line.push(b'\n');
        self.write_counted(file, line, 1)
    }

    /// Journals `s` with whatever else is journaled in this scheduler tick and hands it to
    /// the writer task; true once it is durable (in the file or, when the file cannot be
    /// written, committed). Without `company` (no other request in flight, so nobody would
    /// join) the line is written at once, saving the yield's trip through the scheduler.
    ///
    /// Once its line is in the group a settlement no longer depends on this future: if the
    /// request is dropped meanwhile, the group's write still hands it to the writer task.
    pub(super) async fn append_grouped(
        &self,
        s: Box<Settlement>,
        tx: &mpsc::UnboundedSender<Msg>,
        company: bool,
    ) -> bool {
        if !company {
            return match self.append(&s) {
                Ok(()) => {
                    let _ = tx.send(Msg::Settle(s, None));
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "ledger journal write failed; committing instead");
                    commit_through(tx, s).await
                }
            };
        }
        let (done, wait) = oneshot::channel();
        let lead = {
            let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
            // Encoded straight into the group's buffer.
            let at = g.lines.len();
            match encode_line(&s, self.holds_in_redis, &mut g.lines) {
                Ok(()) => {
                    g.lines.push(b'\n');
                    g.members.push((s, done));
                    Ok(!std::mem::replace(&mut g.led, true))
                }
                Err(e) => {
                    g.lines.truncate(at);
                    Err((e, s))
                }
            }
        };
        let lead = match lead {
            Ok(lead) => lead,
            Err((e, s)) => {
                tracing::error!(error = %e, "cannot encode a ledger journal line; committing instead");
                return commit_through(tx, s).await;
            }
        };
        if lead {
            let leader = Leader { journal: self, tx };
            tokio::task::yield_now().await;
            drop(leader);
        }
        wait.await.unwrap_or(false)
    }

    fn write_group(&self, tx: &mpsc::UnboundedSender<Msg>) {
        let (mut lines, members) = {
            let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
            g.led = false;
            (std::mem::take(&mut g.lines), std::mem::take(&mut g.members))
        };
        let written = self.write_lines(&lines, members.len());
        // The buffer goes back for the next group, unless one has started meanwhile.
        lines.clear();
        {
            let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
            if g.lines.capacity() == 0 {
                g.lines = lines;
            }
        }
        match written {
            Ok(()) => {
                for (s, done) in members {
                    let _ = tx.send(Msg::Settle(s, None));
                    let _ = done.send(true);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, lines = members.len(), "ledger journal write failed; committing instead");
                // Each request is answered once the writer task has committed its settlement.
                for (s, done) in members {
                    let _ = tx.send(Msg::Settle(s, Some(done)));
                }
            }
        }
    }

    fn write_lines(&self, lines: &[u8], n: usize) -> std::io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        self.write_counted(&mut f.0, lines, n)
    }

    /// Writes `n` lines to `file`, whose lock the caller holds, and counts them pending.
    fn write_counted(
        &self,
        file: &mut std::fs::File,
        lines: &[u8],
        n: usize,
    ) -> std::io::Result<()> {
        file.write_all(lines)?;
        // Counted under the file's lock: `committed` must not empty the file between this
        // write and the count.
        self.pending.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// `n` journaled settlements are committed; empties the file once none is left.
    pub(super) fn committed(&self, n: usize) {
        if n == 0 {
            return;
        }
        if self.pending.fetch_sub(n, Ordering::AcqRel) == n {
            let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            if self.pending.load(Ordering::Acquire) == 0 {
                if let Err(e) = f.0.set_len(0) {
                    tracing::warn!(error = %e, path = %self.path.display(), "cannot empty the ledger journal");
                }
            }
        }
    }

    /// The settlements a previous process journaled (a torn last line is ignored).
    pub(super) fn read(path: &Path) -> Vec<Settlement> {
        let Ok(f) = std::fs::File::open(path) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}

/// `,"name":` for a field of the journal line, whole at compile time (the names are plain
/// identifiers: nothing to escape).
macro_rules! k {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

/// Writes a settlement as JSON, byte for byte what `serde_json::to_writer` writes (the replay
/// reads it back with serde), without serde's per-field work: keys are literals, numbers go
/// through `itoa`, and a string with nothing to escape is copied as it is. Under callgrind
/// serde_json took ~7.8k instructions a request for this line.
fn encode_line(s: &Settlement, holds_in_redis: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
    let r = &s.row;
    out.extend_from_slice(br#"{"row":{"id":"#);
    json_str(out, &r.id)?;
    str_field(out, k!("request_id"), &r.request_id)?;
    int_field(out, k!("ts_ms"), r.ts_ms);
    str_field(out, k!("tenant"), &r.tenant)?;
    str_field(out, k!("key_id"), &r.key_id)?;
    str_field(out, k!("model"), &r.model)?;
    opt_str_field(out, k!("backend"), r.backend.as_deref())?;
    str_field(out, k!("size"), &r.size)?;
    opt_str_field(out, k!("quality"), r.quality.as_deref())?;
    int_field(out, k!("n_requested"), r.n_requested);
    int_field(out, k!("n_delivered"), r.n_delivered);
    int_field(out, k!("reserved_micro_usd"), r.reserved_micro_usd);
    int_field(out, k!("cost_micro_usd"), r.cost_micro_usd);
    int_field(
        out,
        k!("upstream_cost_micro_usd"),
        r.upstream_cost_micro_usd,
    );
    opt_int_field(out, k!("input_tokens"), r.input_tokens);
    opt_int_field(out, k!("output_tokens"), r.output_tokens);
    int_field(out, k!("status"), r.status);
    int_field(out, k!("latency_ms"), r.latency_ms);
    opt_str_field(out, k!("idempotency_key"), r.idempotency_key.as_deref())?;
    str_field(out, k!("operation"), &r.operation)?;
    out.extend_from_slice(br#"},"holds":["#);
    for (i, h) in s.holds.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"scope":"#);
        json_str(out, &h.scope)?;
        str_field(out, k!("period"), &h.period)?;
        int_field(out, k!("amount"), h.amount);
        out.extend_from_slice(if holds_in_redis {
            br#","in_redis":true}"#
        } else {
            br#","in_redis":false}"#
        });
    }
    out.extend_from_slice(br#"],"idem":"#);
    match &s.idem {
        // Rare on this path (requests with an Idempotency-Key commit instead): serde's.
        Some(idem) => serde_json::to_writer(&mut *out, idem).map_err(std::io::Error::other)?,
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    Ok(())
}

fn str_field(out: &mut Vec<u8>, key: &[u8], s: &str) -> std::io::Result<()> {
    out.extend_from_slice(key);
    json_str(out, s)
}

fn opt_str_field(out: &mut Vec<u8>, key: &[u8], s: Option<&str>) -> std::io::Result<()> {
    match s {
        Some(s) => str_field(out, key, s),
        None => {
            out.extend_from_slice(key);
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn int_field(out: &mut Vec<u8>, key: &[u8], n: impl itoa::Integer) {
    out.extend_from_slice(key);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn opt_int_field(out: &mut Vec<u8>, key: &[u8], n: Option<i64>) {
    match n {
        Some(n) => int_field(out, key, n),
        None => {
            out.extend_from_slice(key);
            out.extend_from_slice(b"null");
        }
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) -> std::io::Result<()> {
    if !needs_escape(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *out, s).map_err(std::io::Error::other)
    }
}

/// Whether `s` holds a byte serde_json escapes (a control character, '"' or '\\'), checked
/// eight bytes at a time: a journal line's strings are ~150 bytes a request.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    // Bytes of `x` below `n` (n <= 128): the borrow of the subtraction sets their high bit.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_ne_bytes(c.try_into().unwrap_or_default());
        if below(x, 0x20)
            | below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            != 0
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Sends a settlement to the writer task and waits for its transaction.
pub(super) async fn commit_through(tx: &mpsc::UnboundedSender<Msg>, s: Box<Settlement>) -> bool {
    let (done, wait) = oneshot::channel();
    if tx.send(Msg::Settle(s, Some(done))).is_err() {
        return false;
    }
    wait.await.unwrap_or(false)
}

#[cfg(test)]
mod tests;
