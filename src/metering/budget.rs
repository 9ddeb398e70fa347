//! Budgets: per tenant and per key, per period, in micro-dollars. A request's cost is held
//! before it is relayed (one conditional UPDATE in SQLite/PostgreSQL, a shard-locked map entry
//! in memory) and settled at the images delivered, or released, when it ends.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{BudgetConfig, BudgetPeriod};
use crate::store::{Database, StoreError};

/// One budget a request draws on: a scope (`tenant:<id>`, `key:<id>`) in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub scope: String,
    pub period: String,
    /// Micro-dollars held.
    pub amount: u64,
    /// Held in Redis (settled there, and only added to `spent` in the database).
    #[serde(default)]
    pub in_redis: bool,
}

/// Why a budget refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// `tenant` or `key`.
    pub scope_kind: &'static str,
    pub budget: BudgetConfig,
    /// What is left in this period (budget - spent - held), never negative.
    pub left: u64,
    /// Unix seconds when the period ends (`None` for `total`).
    pub resets_at: Option<u64>,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-25` or `2026-11` (every request with a budget names its period: no formatter).
fn date_label(y: i64, m: u32, d: Option<u32>) -> String {
    if !(0..=9999).contains(&y) {
        return match d {
            Some(d) => format!("{y:04}-{m:02}-{d:02}"),
            None => format!("{y:04}-{m:02}"),
        };
    }
    let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
    let y = y as u32;
    let mut out = String::with_capacity(10);
    out.extend([digit(y / 1000), digit(y / 100), digit(y / 10), digit(y)]);
    out.extend(['-', digit(m / 10), digit(m)]);
    if let Some(d) = d {
        out.extend(['-', digit(d / 10), digit(d)]);
    }
    out
}

/// The period a moment falls in (`2026-11-25`, `2026-11`, `total`) and when it ends.
pub fn period_of(period: BudgetPeriod, unix: u64) -> (String, Option<u64>) {
    let days = (unix / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    match period {
        BudgetPeriod::Daily => (date_label(y, m, Some(d)), Some((days as u64 + 1) * 86_400)),
        BudgetPeriod::Monthly => {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                date_label(y, m, None),
                Some(days_from_civil(ny, nm, 1) as u64 * 86_400),
            )
        }
        BudgetPeriod::Total => ("total".to_string(), None),
    }
}

/// Budgets kept in this process only (`state.store: none`).
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
            if spent + held + amount > limit {
                return Err(limit.saturating_sub(spent + held));
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

/// Holds `amount` in one PostgreSQL budget row and records the hold (a lease until
/// `expires_ms`) in the same statement, or says what is left. The row is created the first
/// time a period is used.
pub async fn sql_reserve(
    db: &Database,
    scope: &str,
    period: &str,
    amount: u64,
    limit: u64,
    member: &str,
    expires_ms: i64,
) -> Result<Result<(), u64>, StoreError> {
    let hold = || {
        sqlx::query(
            "WITH u AS (UPDATE budget_usage SET held = held + $3 \
             WHERE scope = $1 AND period = $2 AND spent + held + $3 <= $4 RETURNING scope) \
             INSERT INTO budget_holds (member, scope, period, amount, expires_at) \
             SELECT $5, $1, $2, $3, $6 FROM u",
        )
        .bind(scope)
        .bind(period)
        .bind(amount as i64)
        .bind(limit as i64)
        .bind(member)
        .bind(expires_ms)
    };
    if hold().execute(&db.pool).await?.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    // The period's row may not exist yet (made here, or by a concurrent request).
    sqlx::query(
        "INSERT INTO budget_usage (scope, period, spent, held) VALUES ($1, $2, 0, 0) \
         ON CONFLICT (scope, period) DO NOTHING",
    )
    .bind(scope)
    .bind(period)
    .execute(&db.pool)
    .await?;
    if hold().execute(&db.pool).await?.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    let (spent, held) = sql_spent(db, scope, period).await?;
    Ok(Err(limit.saturating_sub(spent + held)))
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

/// Gives back the holds whose lease ran out (their replica died); returns how many budgets.
pub async fn sql_sweep_holds(db: &Database, now_ms: i64) -> Result<u64, StoreError> {
    Ok(sqlx::query(&give_back_sql("expires_at < $1"))
        .bind(now_ms)
        .execute(&db.pool)
        .await?
        .rows_affected())
}

/// (spent, held) of one budget row.
pub async fn sql_spent(db: &Database, scope: &str, period: &str) -> Result<(u64, u64), StoreError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT spent, held FROM budget_usage WHERE scope = $1 AND period = $2")
            .bind(scope)
            .bind(period)
            .fetch_optional(&db.pool)
            .await?;
    let (s, h) = row.unwrap_or((0, 0));
    Ok((s.max(0) as u64, h.max(0) as u64))
}

/// Gives back a request's hold in one budget (a later budget refused it).
pub async fn sql_release(db: &Database, hold: &Hold, member: &str) -> Result<(), StoreError> {
    sqlx::query(&give_back_sql("member = $1 AND scope = $2"))
        .bind(member)
        .bind(&hold.scope)
        .execute(&db.pool)
        .await?;
    Ok(())
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
            in_redis: false,
        };
        b.settle(&hold, 20);
        assert_eq!(b.spent(&long, "2026-12"), (20, 0));
        assert_eq!(b.spent("tenant:a", "2026-12"), (0, 30));
        assert_eq!(b.spent("tenant:ab", "2026-12"), (0, 30));
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-11-25T16:00:00Z
        let t = 1_795_564_800 + 16 * 3600;
        assert_eq!(civil_from_days((t / 86_400) as i64), (2026, 11, 25));
        let (d, end) = period_of(BudgetPeriod::Daily, t);
        assert_eq!(d, "2026-11-25");
        assert_eq!(end, Some(1_795_564_800 + 86_400));
        let (m, end) = period_of(BudgetPeriod::Monthly, t);
        assert_eq!(m, "2026-11");
        assert_eq!(
            civil_from_days((end.unwrap() / 86_400) as i64),
            (2026, 12, 1)
        );
        let dec = days_from_civil(2026, 12, 31) as u64 * 86_400;
        let (_, end) = period_of(BudgetPeriod::Monthly, dec);
        assert_eq!(
            civil_from_days((end.unwrap() / 86_400) as i64),
            (2027, 1, 1)
        );
        assert_eq!(period_of(BudgetPeriod::Total, t), ("total".into(), None));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            days_from_civil(2000, 2, 29) + 1,
            days_from_civil(2000, 3, 1)
        );
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
            in_redis: false,
        };
        b.settle(&hold, 0);
        assert_eq!(b.spent("tenant:t", "total"), (0, 60));
        b.reserve("tenant:t", "total", 10, 70).unwrap();
        b.settle(&hold, 10);
        assert_eq!(b.spent("tenant:t", "total"), (10, 60));
    }
}
