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

proptest::proptest! {
    /// Any settlement (strings of any characters, controls and astral ones included; any
    /// numbers; any holds and idempotency outcome): the hand-written line is serde_json's byte
    /// for byte, holds no raw newline (one line per settlement), and reads back to what was
    /// written.
    #[test]
    fn any_settlement_round_trips_through_its_journal_line(
        strings in proptest::collection::vec(proptest::prelude::any::<String>(), 9),
        ints in proptest::prelude::any::<(i64, u32, u32, u64, u64, u64, u16, u64)>(),
        tokens in proptest::prelude::any::<(Option<i64>, Option<i64>)>(),
        holds in proptest::collection::vec(
            (proptest::prelude::any::<String>(), proptest::prelude::any::<String>(), proptest::prelude::any::<u64>()),
            0..3,
        ),
        idem in 0u8..3,
        in_redis in proptest::prelude::any::<bool>(),
    ) {
        let text = |i: usize| strings[i].clone();
        let row = UsageRow {
            id: text(0),
            request_id: text(1),
            ts_ms: ints.0,
            tenant: text(2),
            key_id: text(3),
            model: text(4),
            backend: (!strings[5].is_empty()).then(|| text(5)),
            size: text(6),
            quality: (strings[7].len() % 2 == 1).then(|| text(7)),
            n_requested: ints.1,
            n_delivered: ints.2,
            reserved_micro_usd: ints.3,
            cost_micro_usd: ints.4,
            upstream_cost_micro_usd: ints.5,
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            status: ints.6,
            latency_ms: ints.7,
            idempotency_key: (strings[8].len() % 2 == 0).then(|| text(8)),
            operation: std::borrow::Cow::Owned(text(6)),
        };
        let s = Settlement {
            row,
            holds: holds
                .into_iter()
                .map(|(scope, period, amount)| Hold { scope, period, amount })
                .collect(),
            idem: match idem {
                0 => None,
                1 => Some(IdemOutcome::Complete { tenant: text(2), key: text(8), response: text(0) }),
                _ => Some(IdemOutcome::Release { tenant: text(2), key: text(8) }),
            },
        };
        let mut ours = Vec::new();
        encode_line(&s, in_redis, &mut ours).unwrap();
        let theirs = serde_json::to_vec(&SerdeLine::of(&s, in_redis)).unwrap();
        proptest::prop_assert_eq!(&ours, &theirs);
        proptest::prop_assert!(!ours.contains(&b'\n'));
        let back: Settlement = serde_json::from_slice(&ours).unwrap();
        proptest::prop_assert_eq!(&back.row, &s.row);
        proptest::prop_assert_eq!(&back.holds, &s.holds);
        proptest::prop_assert_eq!(
            serde_json::to_value(&back.idem).unwrap(),
            serde_json::to_value(&s.idem).unwrap()
        );
    }
}
