//! Usage reports for the admin API (`GET /admin/v1/usage`) and the CLI (`imagegate usage`):
//! ledger rows or totals per day, model, key or tenant, as JSON or CSV. Reads only: the ledger
//! (`metering::ledger`) is what writes the table.

use serde::Serialize;

use super::ledger::sql::COLUMNS;
use super::ledger::UsageRow;
use crate::clock::{civil_from_days, days_from_civil};
use crate::store::{Database, StoreError};

/// How `GET /admin/v1/usage` and `imagegate usage` group rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Model,
    Key,
    Tenant,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" => GroupBy::Day,
            "model" => GroupBy::Model,
            "key" => GroupBy::Key,
            "tenant" => GroupBy::Tenant,
            _ => return None,
        })
    }

    fn column(self) -> &'static str {
        match self {
            GroupBy::Day => "CAST(ts_ms / 86400000 AS BIGINT)",
            GroupBy::Model => "model",
            GroupBy::Key => "key_id",
            GroupBy::Tenant => "tenant",
        }
    }
}

/// Filters of a usage query; times in Unix milliseconds, `to` exclusive.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub model: Option<String>,
    /// `generation`, `edit` or `variation`.
    pub operation: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub limit: i64,
}

/// Totals of one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageGroup {
    pub group: String,
    pub requests: i64,
    pub images: i64,
    pub cost_micro_usd: i64,
    pub upstream_cost_micro_usd: i64,
    pub margin_micro_usd: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl UsageQuery {
    fn where_clause(&self) -> (String, Vec<Param>) {
        let mut conds = Vec::new();
        let mut params = Vec::new();
        let mut push = |cond: &str, p: Param| {
            params.push(p);
            conds.push(format!("{cond} ${}", params.len()));
        };
        if let Some(t) = &self.tenant {
            push("tenant =", Param::Text(t.clone()));
        }
        if let Some(k) = &self.key {
            push("key_id =", Param::Text(k.clone()));
        }
        if let Some(m) = &self.model {
            push("model =", Param::Text(m.clone()));
        }
        if let Some(o) = &self.operation {
            push("operation =", Param::Text(o.clone()));
        }
        if let Some(f) = self.from_ms {
            push("ts_ms >=", Param::Int(f));
        }
        if let Some(t) = self.to_ms {
            push("ts_ms <", Param::Int(t));
        }
        let clause = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        (clause, params)
    }
}

enum Param {
    Text(String),
    Int(i64),
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    params: &'q [Param],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for p in params {
        q = match p {
            Param::Text(s) => q.bind(s.as_str()),
            Param::Int(i) => q.bind(*i),
        };
    }
    q
}

/// Ledger rows, newest first.
pub async fn rows(db: &Database, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
    use sqlx::Row;
    let (clause, params) = q.where_clause();
    let sql = format!(
        "SELECT {COLUMNS} FROM usage_ledger{clause} ORDER BY ts_ms DESC, id LIMIT {}",
        q.limit.max(1)
    );
    let found = bind_all(sqlx::query(&sql), &params)
        .fetch_all(&db.pool)
        .await?;
    let n = |r: &sqlx::any::AnyRow, c: &str| -> Result<i64, sqlx::Error> { r.try_get::<i64, _>(c) };
    found
        .iter()
        .map(|r| {
            Ok(UsageRow {
                id: r.try_get("id")?,
                request_id: r.try_get("request_id")?,
                ts_ms: n(r, "ts_ms")?,
                tenant: r.try_get("tenant")?,
                key_id: r.try_get("key_id")?,
                model: r.try_get("model")?,
                backend: r.try_get("backend")?,
                size: r.try_get("size")?,
                quality: r.try_get("quality")?,
                n_requested: n(r, "n_requested")? as u32,
                n_delivered: n(r, "n_delivered")? as u32,
                reserved_micro_usd: n(r, "reserved_micro_usd")? as u64,
                cost_micro_usd: n(r, "cost_micro_usd")? as u64,
                upstream_cost_micro_usd: n(r, "upstream_cost_micro_usd")? as u64,
                input_tokens: r.try_get("input_tokens")?,
                output_tokens: r.try_get("output_tokens")?,
                status: n(r, "status")? as u16,
                latency_ms: n(r, "latency_ms")? as u64,
                idempotency_key: r.try_get("idempotency_key")?,
                operation: std::borrow::Cow::Owned(r.try_get("operation")?),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Totals per day, model, key or tenant.
pub async fn groups(
    db: &Database,
    q: &UsageQuery,
    by: GroupBy,
) -> Result<Vec<UsageGroup>, StoreError> {
    use sqlx::Row;
    let (clause, params) = q.where_clause();
    let col = by.column();
    let sql = format!(
        "SELECT {col} AS g, COUNT(*) AS requests, \
         CAST(COALESCE(SUM(n_delivered), 0) AS BIGINT) AS images, \
         CAST(COALESCE(SUM(cost_micro_usd), 0) AS BIGINT) AS cost, \
         CAST(COALESCE(SUM(upstream_cost_micro_usd), 0) AS BIGINT) AS upstream, \
         CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
         CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens \
         FROM usage_ledger{clause} GROUP BY {col} ORDER BY {col}"
    );
    let found = bind_all(sqlx::query(&sql), &params)
        .fetch_all(&db.pool)
        .await?;
    found
        .iter()
        .map(|r| {
            let group = match by {
                GroupBy::Day => {
                    let (y, m, d) = civil_from_days(r.try_get::<i64, _>("g")?);
                    format!("{y:04}-{m:02}-{d:02}")
                }
                _ => r.try_get::<String, _>("g")?,
            };
            let cost: i64 = r.try_get("cost")?;
            let upstream: i64 = r.try_get("upstream")?;
            Ok(UsageGroup {
                group,
                requests: r.try_get("requests")?,
                images: r.try_get("images")?,
                cost_micro_usd: cost,
                upstream_cost_micro_usd: upstream,
                margin_micro_usd: cost - upstream,
                input_tokens: r.try_get("input_tokens")?,
                output_tokens: r.try_get("output_tokens")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// CSV with a header line; fields quoted when they need it.
pub fn to_csv<T: Serialize>(items: &[T]) -> String {
    let mut out = String::new();
    let mut header_done = false;
    for item in items {
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(item) else {
            continue;
        };
        if !header_done {
            out.push_str(&map.keys().cloned().collect::<Vec<_>>().join(","));
            out.push('\n');
            header_done = true;
        }
        let fields: Vec<String> = map
            .values()
            .map(|v| match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => csv_field(s),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A usage report as asked for by `GET /admin/v1/usage` or `imagegate usage`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub query: UsageQuery,
    pub group_by: Option<GroupBy>,
    pub csv: bool,
}

/// Unix milliseconds of `1795564800` (seconds), `2026-11-25` or `2026-11-25T16:00:00Z`.
pub fn parse_time(s: &str) -> Option<i64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok().map(|secs| secs * 1000);
    }
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u32 = d.next()?.parse().ok().filter(|m| (1..=12).contains(m))?;
    let day: u32 = d.next()?.parse().ok().filter(|d| (1..=31).contains(d))?;
    let mut secs = days_from_civil(y, m, day) * 86_400;
    if let Some(t) = time {
        let mut parts = t.splitn(3, ':');
        let h: i64 = parts.next()?.parse().ok().filter(|h| (0..24).contains(h))?;
        let mi: i64 = parts
            .next()
            .unwrap_or("0")
            .parse()
            .ok()
            .filter(|m| (0..60).contains(m))?;
        let sec: f64 = parts.next().unwrap_or("0").parse().ok()?;
        secs += h * 3600 + mi * 60 + sec as i64;
    }
    Some(secs * 1000)
}

impl Report {
    /// From query pairs (`tenant`, `key`, `model`, `from`, `to`, `group_by`, `format`,
    /// `limit`); the error names the bad parameter.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, (String, String)> {
        let mut r = Report {
            query: UsageQuery {
                limit: 1000,
                ..UsageQuery::default()
            },
            ..Report::default()
        };
        let bad = |k: &str, why: &str| Err((k.to_string(), why.to_string()));
        for (k, v) in pairs {
            match k {
                "tenant" => r.query.tenant = Some(v.to_string()),
                "key" => r.query.key = Some(v.to_string()),
                "model" => r.query.model = Some(v.to_string()),
                "operation" => match v {
                    "generation" | "edit" | "variation" => r.query.operation = Some(v.to_string()),
                    _ => return bad(k, "expected generation, edit or variation"),
                },
                "from" | "to" => {
                    let Some(t) = parse_time(v) else {
                        return bad(
                            k,
                            "expected unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ",
                        );
                    };
                    if k == "from" {
                        r.query.from_ms = Some(t);
                    } else {
                        r.query.to_ms = Some(t);
                    }
                }
                "group_by" => match GroupBy::parse(v) {
                    Some(g) => r.group_by = Some(g),
                    None => return bad(k, "expected day, model, key or tenant"),
                },
                "format" => match v {
                    "json" => r.csv = false,
                    "csv" => r.csv = true,
                    _ => return bad(k, "expected json or csv"),
                },
                "limit" => match v.parse::<i64>() {
                    Ok(n) if (1..=100_000).contains(&n) => r.query.limit = n,
                    _ => return bad(k, "expected 1 to 100000"),
                },
                other => return bad(other, "unknown parameter"),
            }
        }
        Ok(r)
    }

    /// The report's body and whether it is CSV.
    pub async fn render(&self, db: &Database) -> Result<String, StoreError> {
        Ok(match (self.group_by, self.csv) {
            (Some(by), true) => to_csv(&groups(db, &self.query, by).await?),
            (Some(by), false) => serde_json::json!({
                "object": "list",
                "group_by": format!("{by:?}").to_lowercase(),
                "data": groups(db, &self.query, by).await?,
            })
            .to_string(),
            (None, true) => to_csv(&rows(db, &self.query).await?),
            (None, false) => {
                let data = rows(db, &self.query).await?;
                serde_json::json!({
                    "object": "list",
                    "has_more": data.len() as i64 == self.query.limit,
                    "data": data,
                })
                .to_string()
            }
        })
    }
}
