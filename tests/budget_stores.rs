//! One list of budget cases, run on every budget store: in process (`state.store: none`),
//! SQLite-seeded, PostgreSQL leases and Redis leases. The cases go through the public seam
//! (`BudgetStore`) and through `Meter` and `Charge` where settling involves the ledger.
//! PostgreSQL and Redis cases run when `IMAGEGATE_TEST_PG` / `IMAGEGATE_TEST_REDIS` name a
//! server (scripts/test.sh starts both), and say that they are skipped otherwise.

use std::sync::Arc;
use std::time::Duration;

use imagegate::api::{ErrorKind, Size};
use imagegate::auth::{ModelSet, Principal};
use imagegate::config::{
    BudgetConfig, BudgetPeriod, LimitsConfig, RedisConfig, RedisFailure, Secret,
};
use imagegate::metering::budget::{
    BudgetStore, HoldAsk, InProcessBudgets, PostgresBudgets, RedisBudgets, SqliteBudgets,
};
use imagegate::metering::{Begun, Delivered, Hold, Meter, RequestFacts};
use imagegate::store::redis::Redis;
use imagegate::store::Database;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    InProcess,
    Sqlite,
    Postgres,
    Redis,
}

/// A store's backing (files, database, Redis), from which fresh stores and meters are made:
/// a second store over the same backing is what a restarted process or another replica sees.
struct Backing {
    mode: Mode,
    dir: tempfile::TempDir,
    db: Option<Database>,
    redis: Option<Arc<Redis>>,
    /// Unique per test run: PostgreSQL and Redis are shared by every test.
    tag: String,
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}-{:08x}",
        imagegate::clock::now_ms(),
        rand_u32()
    )
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(imagegate::clock::now_ms() as u64);
    h.finish() as u32
}

impl Backing {
    /// `None` (the case is skipped) when the mode's server is not configured.
    async fn new(mode: Mode) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let tag = unique("bs");
        let (db, redis) = match mode {
            Mode::InProcess => (None, None),
            Mode::Sqlite => (Some(Database::sqlite(dir.path()).await.unwrap()), None),
            Mode::Postgres => {
                let Ok(url) = std::env::var("IMAGEGATE_TEST_PG") else {
                    eprintln!("skipped: IMAGEGATE_TEST_PG is not set");
                    return None;
                };
                (Some(Database::connect(&url).await.unwrap()), None)
            }
            Mode::Redis => {
                let Ok(url) = std::env::var("IMAGEGATE_TEST_REDIS") else {
                    eprintln!("skipped: IMAGEGATE_TEST_REDIS is not set");
                    return None;
                };
                let config = RedisConfig {
                    url: Secret::new(url),
                    on_failure: RedisFailure::Closed,
                    timeout: Duration::from_secs(2),
                    prefix: format!("{tag}:"),
                };
                // Redis holds the budgets; SQLite keeps what was spent for good.
                (
                    Some(Database::sqlite(dir.path()).await.unwrap()),
                    Some(Redis::new(&config).unwrap()),
                )
            }
        };
        Some(Backing {
            mode,
            dir,
            db,
            redis,
            tag,
        })
    }

    /// A fresh store over this backing.
    fn store(&self) -> Arc<dyn BudgetStore> {
        match self.mode {
            Mode::InProcess => Arc::new(InProcessBudgets::default()),
            Mode::Sqlite => Arc::new(SqliteBudgets::new(self.db.clone().unwrap())),
            Mode::Postgres => Arc::new(PostgresBudgets::new(self.db.clone().unwrap())),
            Mode::Redis => Arc::new(RedisBudgets::new(
                self.redis.clone().unwrap(),
                self.db.clone(),
            )),
        }
    }

    /// A meter (ledger included, where the mode has a database) over a fresh store.
    async fn meter(&self) -> Arc<Meter> {
        Meter::with_budgets(
            self.db.clone(),
            Duration::from_secs(3600),
            self.dir.path(),
            self.store(),
        )
        .await
        .unwrap()
    }

    fn scope(&self, name: &str) -> String {
        format!("tenant:{}-{name}", self.tag)
    }

    /// A caller whose tenant has a total budget of `micro_usd`.
    fn principal(&self, name: &str, micro_usd: u64) -> Principal {
        Principal {
            share: Default::default(),
            key_id: Arc::from(format!("{}-{name}-key", self.tag)),
            tenant: Arc::from(format!("{}-{name}", self.tag)),
            models: ModelSet::All,
            limits: Arc::new(LimitsConfig {
                budget: Some(BudgetConfig {
                    micro_usd,
                    period: BudgetPeriod::Total,
                }),
                ..LimitsConfig::default()
            }),
            key_limits: None,
        }
    }
}

fn ask<'a>(scope: &'a str, member: &'a str, cost: u64, limit: u64) -> HoldAsk<'a> {
    HoldAsk {
        scope,
        period: "total",
        member,
        cost,
        limit,
        lease: Duration::from_secs(60),
        resets_at: None,
    }
}

fn hold(scope: &str, amount: u64) -> Hold {
    Hold {
        scope: scope.to_string(),
        period: "total".into(),
        amount,
    }
}

/// Polls a store's (spent, held) until it is `want` (Redis settles in the background, the
/// SQLite store's database side through the ledger), for at most 5 s.
async fn eventually(store: &dyn BudgetStore, scope: &str, want: (u64, u64)) {
    let mut last = (u64::MAX, u64::MAX);
    for _ in 0..100 {
        last = store.usage(scope, "total").await.unwrap();
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{scope}: (spent, held) is {last:?}, expected {want:?}");
}

fn facts(request_id: &str) -> RequestFacts<'_> {
    RequestFacts {
        request_id,
        model: "dall-e-2",
        size: Size::new(256, 256),
        quality: None,
        n: 1,
        operation: imagegate::api::Operation::Generation,
    }
}

/// Opens a charge, reserves `reserve`, and delivers one image at `cost`; true if durable.
async fn spend(
    meter: &Arc<Meter>,
    who: &Principal,
    request_id: &str,
    reserve: u64,
    cost: u64,
) -> bool {
    let Begun::Charge(mut charge) = meter.begin(who, facts(request_id), None).await.unwrap() else {
        panic!("no idempotency key: always a charge");
    };
    charge
        .reserve(who, reserve, Duration::from_secs(60))
        .await
        .unwrap();
    charge.relayed();
    let delivered = Delivered {
        backend: Some("sandbox"),
        images: 1,
        cost,
        ..Delivered::default()
    };
    charge.deliver(delivered, None).await
}

// === the cases ===

/// Holds are taken while they fit, and a hold that would pass the limit is refused with
/// exactly what is left, holding nothing.
async fn holds_up_to_the_limit_then_refuses_with_what_is_left(b: Backing) {
    let store = b.store();
    let scope = b.scope("limit");
    assert_eq!(
        store.hold(&ask(&scope, "r1", 100, 250)).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        store.hold(&ask(&scope, "r2", 100, 250)).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        store.hold(&ask(&scope, "r3", 100, 250)).await.unwrap(),
        Err(50)
    );
    assert_eq!(store.usage(&scope, "total").await.unwrap(), (0, 200));
    assert_eq!(
        store.hold(&ask(&scope, "r4", 50, 250)).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        store.hold(&ask(&scope, "r5", 1, 250)).await.unwrap(),
        Err(0)
    );
}

/// A released hold is given back once: the room is there again, and releasing it twice
/// gives nothing more back.
async fn a_released_hold_is_given_back_once(b: Backing) {
    let store = b.store();
    let scope = b.scope("release");
    store
        .hold(&ask(&scope, "r1", 100, 200))
        .await
        .unwrap()
        .unwrap();
    store
        .hold(&ask(&scope, "r2", 100, 200))
        .await
        .unwrap()
        .unwrap();
    store.release(&hold(&scope, 100), "r1").await;
    assert_eq!(store.usage(&scope, "total").await.unwrap(), (0, 100));
    if b.mode == Mode::Postgres || b.mode == Mode::Redis {
        // Leases are named by their request: a repeat finds nothing to give back.
        store.release(&hold(&scope, 100), "r1").await;
        assert_eq!(store.usage(&scope, "total").await.unwrap(), (0, 100));
    }
    assert_eq!(
        store.hold(&ask(&scope, "r3", 100, 200)).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        store.hold(&ask(&scope, "r4", 1, 200)).await.unwrap(),
        Err(0)
    );
}

/// Two scopes, or one scope in two periods, never share a budget.
async fn scopes_and_periods_are_kept_apart(b: Backing) {
    let store = b.store();
    let (x, y) = (b.scope("x"), b.scope("y"));
    store.hold(&ask(&x, "r1", 90, 100)).await.unwrap().unwrap();
    assert_eq!(store.hold(&ask(&y, "r2", 90, 100)).await.unwrap(), Ok(()));
    let other_period = HoldAsk {
        period: "2026-12",
        ..ask(&x, "r3", 90, 100)
    };
    assert_eq!(store.hold(&other_period).await.unwrap(), Ok(()));
    assert_eq!(store.usage(&x, "total").await.unwrap(), (0, 90));
    assert_eq!(store.usage(&x, "2026-12").await.unwrap(), (0, 90));
    assert_eq!(store.usage(&y, "total").await.unwrap(), (0, 90));
}

/// Many holds at once never take more than the limit: exactly as many fit as room allows.
async fn concurrent_holds_never_pass_the_limit(b: Backing) {
    let store = b.store();
    let scope = b.scope("race");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (store, scope) = (store.clone(), scope.clone());
            tokio::spawn(async move {
                let member = format!("r{i}");
                store.hold(&ask(&scope, &member, 10, 155)).await.unwrap()
            })
        })
        .collect();
    let mut held = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            held += 1;
        }
    }
    assert_eq!(held, 15, "155 / 10 holds fit");
    assert_eq!(store.usage(&scope, "total").await.unwrap(), (0, 150));
}

/// A charge reserves what was asked, and settles at what was delivered: the hold is given
/// back, the cost is spent, and what is left follows.
async fn a_delivered_charge_spends_its_cost_and_frees_its_hold(b: Backing) {
    let meter = b.meter().await;
    let who = b.principal("deliver", 1000);
    let scope = format!("tenant:{}", who.tenant);
    assert!(spend(&meter, &who, "req-1", 300, 120).await, "durable");
    meter.flush().await;
    eventually(meter.budgets().as_ref(), &scope, (120, 0)).await;

    // 880 left: a 900 reservation is refused, 880 fits.
    let Begun::Charge(mut big) = meter.begin(&who, facts("req-2"), None).await.unwrap() else {
        panic!()
    };
    let refused = big
        .reserve(&who, 900, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(refused.kind, ErrorKind::InsufficientQuota);
    assert!(
        refused.message.contains("$0.000880 left"),
        "{}",
        refused.message
    );
    big.reserve(&who, 880, Duration::from_secs(60))
        .await
        .unwrap();
}

/// A charge dropped before it was relayed (refused later, or the client went away) gives
/// its holds back and spends nothing.
async fn an_abandoned_charge_gives_its_hold_back(b: Backing) {
    let meter = b.meter().await;
    let who = b.principal("abandon", 500);
    let scope = format!("tenant:{}", who.tenant);
    let Begun::Charge(mut charge) = meter.begin(&who, facts("req-1"), None).await.unwrap() else {
        panic!()
    };
    charge
        .reserve(&who, 400, Duration::from_secs(60))
        .await
        .unwrap();
    drop(charge);
    eventually(meter.budgets().as_ref(), &scope, (0, 0)).await;
}

/// What a process spent is what the next one (or another replica) starts from, except in
/// process, where budgets live and die with the process.
async fn a_new_store_over_the_same_backing_sees_what_was_spent(b: Backing) {
    let who = b.principal("restart", 1000);
    let scope = format!("tenant:{}", who.tenant);
    {
        let meter = b.meter().await;
        assert!(spend(&meter, &who, "req-1", 200, 200).await);
        meter.flush().await;
        eventually(meter.budgets().as_ref(), &scope, (200, 0)).await;
    }
    let fresh = b.store();
    let want = if b.mode == Mode::InProcess { 0 } else { 200 };
    eventually(fresh.as_ref(), &scope, (want, 0)).await;
    let left = fresh
        .hold(&ask(&scope, "r2", 1000, 1000))
        .await
        .unwrap()
        .err();
    assert_eq!(left, (want > 0).then_some(800));
}

/// Runs each case on every store.
macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::*;

                #[tokio::test]
                async fn in_process() {
                    super::$case(Backing::new(Mode::InProcess).await.unwrap()).await;
                }

                #[tokio::test]
                async fn sqlite() {
                    super::$case(Backing::new(Mode::Sqlite).await.unwrap()).await;
                }

                #[tokio::test]
                async fn postgres() {
                    if let Some(b) = Backing::new(Mode::Postgres).await {
                        super::$case(b).await;
                    }
                }

                #[tokio::test]
                async fn redis() {
                    if let Some(b) = Backing::new(Mode::Redis).await {
                        super::$case(b).await;
                    }
                }
            }
        )*
    };
}

on_every_store!(
    holds_up_to_the_limit_then_refuses_with_what_is_left,
    a_released_hold_is_given_back_once,
    scopes_and_periods_are_kept_apart,
    concurrent_holds_never_pass_the_limit,
    a_delivered_charge_spends_its_cost_and_frees_its_hold,
    an_abandoned_charge_gives_its_hold_back,
    a_new_store_over_the_same_backing_sees_what_was_spent,
);
