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
mod tests {
    use std::time::Duration;

    use super::super::tests::settlement;
    use super::super::{Hold, IdemOutcome, UsageRow};
    use super::*;

    /// Every byte value at every place of strings of 1 to 19 bytes (a word-sized check and its
    /// tail): the fast check agrees with serde_json's list of escaped bytes.
    #[test]
    fn needs_escape_finds_exactly_what_serde_escapes() {
        let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for len in 1..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(needs_escape(&s), escaped(b), "byte {b:#x} at {at} of {len}");
                }
            }
        }
        assert!(!needs_escape(b""));
        assert!(!needs_escape("caf\u{e9} \u{1F98A} ~\x7f".as_bytes()));
    }

    fn journal_ids(path: &Path) -> Vec<String> {
        let mut ids: Vec<String> = Journal::read(path).into_iter().map(|s| s.row.id).collect();
        ids.sort();
        ids
    }

    /// The settlements handed to the writer task: (row id, someone waits for the commit).
    fn handed(rx: &mut mpsc::UnboundedReceiver<Msg>) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Settle(s, done) = msg {
                out.push((s.row.id.clone(), done.is_some()));
            }
        }
        out.sort();
        out
    }

    /// Requests journaling in the same tick share one write; each line lands once and whole,
    /// and each settlement goes on to the writer task once.
    #[tokio::test(flavor = "current_thread")]
    async fn grouped_appends_land_every_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.journal");
        let j = Journal::open(&path, false).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let all: Vec<Box<Settlement>> = (0..50).map(|i| Box::new(settlement(i))).collect();
        let want: Vec<String> = all.iter().map(|s| s.row.id.clone()).collect();
        let oks =
            futures_util::future::join_all(all.into_iter().map(|s| j.append_grouped(s, &tx, true)))
                .await;
        assert!(oks.iter().all(|ok| *ok));
        assert_eq!(j.pending.load(Ordering::Acquire), 50);
        assert_eq!(journal_ids(&path), want);
        let journaled: Vec<(String, bool)> = want.iter().map(|id| (id.clone(), false)).collect();
        assert_eq!(handed(&mut rx), journaled);
        // A later tick starts a new group.
        assert!(j.append_grouped(Box::new(settlement(50)), &tx, true).await);
        // Alone: written at once.
        assert!(j.append_grouped(Box::new(settlement(51)), &tx, false).await);
        assert_eq!(journal_ids(&path).len(), 52);
        assert_eq!(j.pending.load(Ordering::Acquire), 52);
        assert_eq!(handed(&mut rx).len(), 2);
    }

    /// A leader abandoned while it gathers its group (its client went away) still writes the
    /// lines of the requests that joined it; a member abandoned after joining still has its
    /// settlement handed on (else it would sit in the journal until the next start).
    #[tokio::test(flavor = "current_thread")]
    async fn abandoned_members_of_a_group_are_still_written_and_handed_on() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.journal");
        let j = Journal::open(&path, false).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut leader = Box::pin(j.append_grouped(Box::new(settlement(1)), &tx, true));
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        let mut follower = Box::pin(j.append_grouped(Box::new(settlement(2)), &tx, true));
        assert!(follower.as_mut().poll(&mut cx).is_pending());
        let mut gone = Box::pin(j.append_grouped(Box::new(settlement(3)), &tx, true));
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        drop(gone);
        assert!(journal_ids(&path).is_empty());
        drop(leader);
        let written = tokio::time::timeout(Duration::from_secs(5), follower).await;
        assert_eq!(written, Ok(true), "the follower was left waiting");
        assert_eq!(journal_ids(&path), vec!["row-0001", "row-0002", "row-0003"]);
        assert_eq!(
            handed(&mut rx),
            vec![
                ("row-0001".to_string(), false),
                ("row-0002".to_string(), false),
                ("row-0003".to_string(), false)
            ]
        );
    }

    /// When the journal cannot be written, each member of the group is committed instead, and
    /// its request waits for that commit's outcome.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_group_write_commits_each_member_instead() {
        // Every write to /dev/full fails (ENOSPC).
        let j = Journal::open(Path::new("/dev/full"), false).expect("/dev/full");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(Msg::Settle(s, done)) = rx.recv().await {
                let done = done.expect("a failed journal write must wait for the commit");
                // The "database" takes row 1 and refuses row 2.
                let _ = done.send(s.row.id == "row-0001");
                ids.push(s.row.id.clone());
            }
            ids
        });
        let (a, b) = futures_util::future::join(
            j.append_grouped(Box::new(settlement(1)), &tx, true),
            j.append_grouped(Box::new(settlement(2)), &tx, true),
        )
        .await;
        assert_eq!((a, b), (true, false));
        assert!(!j.append_grouped(Box::new(settlement(3)), &tx, false).await);
        assert_eq!(j.pending.load(Ordering::Acquire), 0);
        drop(tx);
        assert_eq!(writer.await.unwrap(), ["row-0001", "row-0002", "row-0003"]);
    }

    /// The hand-written journal line is exactly serde_json's, so the replay (serde) reads it,
    /// whatever the strings hold and whichever fields are empty.
    #[test]
    fn journal_line_is_serde_json_byte_for_byte() {
        let odd = [
            "",
            "plain",
            "quote \" in",
            "back\\slash",
            "tab\tnew\nline\u{1}",
            "caf\u{e9} \u{1F98A}",
            "\u{7f}del",
        ];
        let mut cases = Vec::new();
        for (i, text) in odd.iter().enumerate() {
            let mut s = settlement(i as u64);
            s.row.id = text.to_string();
            s.row.request_id = format!("{text}-req");
            s.row.tenant = text.to_string();
            s.row.key_id = text.to_string();
            s.row.model = text.to_string();
            s.row.backend = (i % 2 == 1).then(|| text.to_string());
            s.row.size = text.to_string();
            s.row.quality = (i % 3 != 0).then(|| text.to_string());
            s.row.idempotency_key = (i % 2 == 0).then(|| text.to_string());
            s.row.ts_ms = if i == 3 {
                i64::MIN
            } else {
                i64::MAX - i as i64
            };
            s.row.reserved_micro_usd = u64::MAX;
            s.row.upstream_cost_micro_usd = i as u64;
            s.row.output_tokens = (i % 2 == 0).then_some(-(i as i64));
            s.row.status = 599;
            s.row.latency_ms = 12_345;
            s.holds = (0..i % 3)
                .map(|h| Hold {
                    scope: format!("tenant:{text}"),
                    period: text.to_string(),
                    amount: h as u64 * 1_000_000,
                })
                .collect();
            s.idem = match i % 3 {
                0 => None,
                1 => Some(IdemOutcome::Complete {
                    tenant: text.to_string(),
                    key: "k\"1".into(),
                    response: format!("{{\"data\":[\"{text}\"]}}"),
                }),
                _ => Some(IdemOutcome::Release {
                    tenant: "t".into(),
                    key: text.to_string(),
                }),
            };
            cases.push(s);
        }
        cases.push(Settlement {
            row: UsageRow::default(),
            holds: Vec::new(),
            idem: None,
        });
        for s in &cases {
            for in_redis in [false, true] {
                let mut ours = Vec::new();
                encode_line(s, in_redis, &mut ours).unwrap();
                let theirs = serde_json::to_vec(&SerdeLine::of(s, in_redis)).unwrap();
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(theirs).unwrap()
                );
                // And the replay reads it back whole.
                let back: Settlement = serde_json::from_str(
                    &String::from_utf8(serde_json::to_vec(&SerdeLine::of(s, in_redis)).unwrap())
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(back.row, s.row);
                assert_eq!(back.holds, s.holds);
            }
        }
    }

    /// The journal line as serde writes it: the settlement, each hold with the `in_redis` flag
    /// the line has always carried.
    #[derive(serde::Serialize)]
    struct SerdeLine<'a> {
        row: &'a UsageRow,
        holds: Vec<SerdeHold<'a>>,
        idem: &'a Option<IdemOutcome>,
    }

    #[derive(serde::Serialize)]
    struct SerdeHold<'a> {
        scope: &'a str,
        period: &'a str,
        amount: u64,
        in_redis: bool,
    }

    impl<'a> SerdeLine<'a> {
        fn of(s: &'a Settlement, in_redis: bool) -> Self {
            SerdeLine {
                row: &s.row,
                holds: s
                    .holds
                    .iter()
                    .map(|h| SerdeHold {
                        scope: &h.scope,
                        period: &h.period,
                        amount: h.amount,
                        in_redis,
                    })
                    .collect(),
                idem: &s.idem,
            }
        }
    }
}
