//! Budgets held in this process: alone (`state.store: none`), or seeded from SQLite, whose
//! file one process owns, so its holds need be nowhere else. One implementation, two modes:
//! they differ only in where a row starts ([`Seed`]).

use async_trait::async_trait;

use super::{BudgetStore, Hold, HoldAsk};
use crate::metering::ledger::BudgetBook;
use crate::metering::MeterError;
use crate::store::Database;

/// Budget rows in this process: (spent, held) per scope and period, shard-locked.
#[derive(Default)]
pub struct MemoryBudgets {
    /// `scope` `\n` `period` (see [`with_key`]) -> (spent, held)
    rows: crate::FastDashMap<String, (u64, u64)>,
}

/// Calls `f` with the map key of a budget, built on the stack when it is short: a request looks
/// its budgets up three times, and a `(String, String)` key made two allocations each time.
/// A period never holds a newline, so the key splits one way only.
fn with_key<R>(scope: &str, period: &str, f: impl FnOnce(&str) -> R) -> R {
    const ROOM: usize = 128;
    let len = scope.len() + 1 + period.len();
    if len > ROOM {
        return f(&format!("{scope}\n{period}"));
    }
    let mut buf = [0u8; ROOM];
    buf[..scope.len()].copy_from_slice(scope.as_bytes());
    buf[scope.len()] = b'\n';
    buf[scope.len() + 1..len].copy_from_slice(period.as_bytes());
    // Two strs joined by an ASCII byte: valid UTF-8.
    f(std::str::from_utf8(&buf[..len]).unwrap_or_default())
}

impl MemoryBudgets {
    pub fn reserve(&self, scope: &str, period: &str, amount: u64, limit: u64) -> Result<(), u64> {
        with_key(scope, period, |key| {
            let mut row = match self.rows.get_mut(key) {
                Some(row) => row,
                None => self.rows.entry(key.to_string()).or_default(),
            };
            let (spent, held) = *row;
            // Saturating: a limit near u64::MAX (budgets given in dollars, unchecked upward)
            // must not wrap the sum and let a hold through.
            let committed = spent.saturating_add(held);
            if committed.saturating_add(amount) > limit {
                return Err(limit.saturating_sub(committed));
            }
            row.1 += amount;
            Ok(())
        })
    }

    pub fn has(&self, scope: &str, period: &str) -> bool {
        with_key(scope, period, |key| self.rows.contains_key(key))
    }

    /// Starts a row at what the database says is spent (first use in this process).
    pub fn seed(&self, scope: &str, period: &str, spent: u64) {
        with_key(scope, period, |key| {
            self.rows.entry(key.to_string()).or_insert((spent, 0));
        })
    }

    pub fn settle(&self, hold: &Hold, actual: u64) {
        with_key(&hold.scope, &hold.period, |key| {
            if let Some(mut row) = self.rows.get_mut(key) {
                row.1 = row.1.saturating_sub(hold.amount);
                row.0 += actual;
            }
        })
    }

    pub fn spent(&self, scope: &str, period: &str) -> (u64, u64) {
        with_key(scope, period, |key| {
            self.rows.get(key).map(|r| *r).unwrap_or_default()
        })
    }
}

/// Budgets held in this process, each row starting where `S` says: at zero
/// ([`InProcessBudgets`]) or at what SQLite says was spent ([`SqliteBudgets`]).
pub struct InProcess<S> {
    rows: MemoryBudgets,
    seed: S,
}

/// Where an in-process budget row starts the first time it is used.
pub trait Seed: Send + Sync {
    /// The database that keeps what was spent before this process; `None`: start at zero.
    fn database(&self) -> Option<&Database>;
}

/// Rows start at zero: budgets live and die with the process.
#[derive(Default)]
pub struct AtZero;

impl Seed for AtZero {
    fn database(&self) -> Option<&Database> {
        None
    }
}

/// Rows start at what the SQLite file says was spent; the ledger adds each request's cost
/// there.
pub struct FromDatabase(Database);

impl Seed for FromDatabase {
    fn database(&self) -> Option<&Database> {
        Some(&self.0)
    }
}

/// `state.store: none`.
pub type InProcessBudgets = InProcess<AtZero>;
/// `state.store: sqlite`: SQLite's file has one process, so its holds need be nowhere else.
pub type SqliteBudgets = InProcess<FromDatabase>;

impl Default for InProcessBudgets {
    fn default() -> Self {
        InProcess {
            rows: MemoryBudgets::default(),
            seed: AtZero,
        }
    }
}

impl SqliteBudgets {
    pub fn new(db: Database) -> Self {
        InProcess {
            rows: MemoryBudgets::default(),
            seed: FromDatabase(db),
        }
    }
}

impl<S: Seed> InProcess<S> {
    /// Seeds a budget row from the database the first time it is used.
    async fn seed(&self, scope: &str, period: &str) -> Result<(), MeterError> {
        if let Some(db) = self.seed.database() {
            if !self.rows.has(scope, period) {
                let (spent, _) = Box::pin(super::sql_spent(db, scope, period)).await?;
                self.rows.seed(scope, period, spent);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl<S: Seed> BudgetStore for InProcess<S> {
    fn book(&self) -> BudgetBook {
        BudgetBook::SpentOnly
    }

    async fn hold(&self, ask: &HoldAsk<'_>) -> Result<Result<(), u64>, MeterError> {
        self.seed(ask.scope, ask.period).await?;
        Ok(self
            .rows
            .reserve(ask.scope, ask.period, ask.cost, ask.limit))
    }

    fn try_hold(&self, ask: &HoldAsk<'_>) -> Option<Result<(), u64>> {
        let seeded = self.seed.database().is_none() || self.rows.has(ask.scope, ask.period);
        seeded.then(|| {
            self.rows
                .reserve(ask.scope, ask.period, ask.cost, ask.limit)
        })
    }

    async fn release(&self, hold: &Hold, _member: &str) {
        self.rows.settle(hold, 0);
    }

    fn settle(&self, holds: &[Hold], _member: &str, cost: u64) {
        for h in holds {
            self.rows.settle(h, cost);
        }
    }

    async fn usage(&self, scope: &str, period: &str) -> Result<(u64, u64), MeterError> {
        self.seed(scope, period).await?;
        Ok(self.rows.spent(scope, period))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short keys (built on the stack) and long ones (on the heap) find the same rows, and two
    /// scopes with one period, or one scope with two periods, never share a row.
    #[test]
    fn memory_budgets_keep_each_scope_and_period_apart() {
        let b = MemoryBudgets::default();
        let long = format!("tenant:{}", "x".repeat(200));
        for scope in ["tenant:a", "tenant:ab", long.as_str()] {
            assert!(!b.has(scope, "2026-12"));
            b.reserve(scope, "2026-12", 30, 100).unwrap();
            assert_eq!(b.reserve(scope, "2026-12", 80, 100), Err(70), "{scope}");
            assert!(b.has(scope, "2026-12"));
        }
        b.seed("tenant:a", "2026-12-01", 40);
        b.seed("tenant:a", "2026-12-01", 99);
        assert_eq!(b.spent("tenant:a", "2026-12-01"), (40, 0), "seeded once");
        let hold = Hold {
            scope: long.clone(),
            period: "2026-12".into(),
            amount: 30,
        };
        b.settle(&hold, 20);
        assert_eq!(b.spent(&long, "2026-12"), (20, 0));
        assert_eq!(b.spent("tenant:a", "2026-12"), (0, 30));
        assert_eq!(b.spent("tenant:ab", "2026-12"), (0, 30));
    }

    #[test]
    fn memory_budget_holds_and_settles() {
        let b = MemoryBudgets::default();
        for _ in 0..7 {
            b.reserve("tenant:t", "total", 10, 70).unwrap();
        }
        assert_eq!(b.reserve("tenant:t", "total", 10, 70), Err(0));
        let hold = Hold {
            scope: "tenant:t".into(),
            period: "total".into(),
            amount: 10,
        };
        b.settle(&hold, 0);
        assert_eq!(b.spent("tenant:t", "total"), (0, 60));
        b.reserve("tenant:t", "total", 10, 70).unwrap();
        b.settle(&hold, 10);
        assert_eq!(b.spent("tenant:t", "total"), (10, 60));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u64),
        /// Settle an open hold (picked by index) at this many thousandths of its amount.
        Settle(usize, u64),
        Release(usize),
    }

    fn op(max: u64) -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..=max).prop_map(Op::Reserve),
            (any::<usize>(), 0u64..=1000).prop_map(|(i, p)| Op::Settle(i, p)),
            any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest::proptest! {
        /// Any interleaving of holds, settlements (at most the amount held) and releases:
        /// a hold is refused exactly when it would pass the limit (and says what is left),
        /// spent is exactly the sum settled, held exactly the sum of open holds (never below
        /// zero), and spent never passes the limit. Small amounts and amounts near u64::MAX.
        #[test]
        fn holds_and_settlements_never_overspend_or_lose_a_micro_dollar(
            (limit, ops) in proptest::prop_oneof![
                (0u64..20_000_000, proptest::collection::vec(op(5_000_000), 1..200)),
                (u64::MAX - 1_000..=u64::MAX, proptest::collection::vec(op(u64::MAX / 3), 1..50)),
            ]
        ) {
            use proptest::{prop_assert, prop_assert_eq};
            let b = MemoryBudgets::default();
            let mut open: Vec<Hold> = Vec::new();
            let mut spent: u64 = 0;
            for op in ops {
                match op {
                    Op::Reserve(amount) => {
                        let (s, h) = b.spent("tenant:t", "2026-12");
                        let got = b.reserve("tenant:t", "2026-12", amount, limit);
                        if (s as u128) + (h as u128) + (amount as u128) > limit as u128 {
                            prop_assert_eq!(got, Err(limit - s - h));
                        } else {
                            prop_assert_eq!(got, Ok(()));
                            open.push(Hold { scope: "tenant:t".into(), period: "2026-12".into(), amount });
                        }
                    }
                    Op::Settle(i, per_mille) if !open.is_empty() => {
                        let hold = open.swap_remove(i % open.len());
                        let actual = ((hold.amount as u128) * (per_mille as u128) / 1000) as u64;
                        b.settle(&hold, actual);
                        spent += actual;
                    }
                    Op::Release(i) if !open.is_empty() => {
                        let hold = open.swap_remove(i % open.len());
                        b.settle(&hold, 0);
                    }
                    _ => {}
                }
                let held: u128 = open.iter().map(|h| h.amount as u128).sum();
                let (s, h) = b.spent("tenant:t", "2026-12");
                prop_assert_eq!(s, spent);
                prop_assert_eq!(h as u128, held);
                prop_assert!((s as u128) + (h as u128) <= limit as u128);
            }
            for hold in open.drain(..) {
                b.settle(&hold, hold.amount);
                spent += hold.amount;
            }
            prop_assert_eq!(b.spent("tenant:t", "2026-12"), (spent, 0));
            prop_assert!(spent <= limit);
        }
    }
}
