//! `Idempotency-Key` (IETF httpapi draft): the first request with a key runs and its answer is
//! kept; a repeat with the same key and body gets that answer back, a repeat while the first
//! runs gets 409, the same key with another body 422. Records live in the shared store (so
//! every replica sees them) or, without one, in this process.

use std::time::Duration;

use dashmap::DashMap;
use sha2::{Digest, Sha256};

use super::ledger::IdemOutcome;
use crate::api::{ApiError, ErrorKind};
use crate::store::{Database, StoreError};

/// What a key's record says about a new request carrying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request is the first (or the key had expired): run it.
    Run,
    /// The first request finished: here is its answer.
    Replay(String),
    /// The first request is still running.
    InFlight,
    /// The key was used with another body.
    Mismatch,
}

impl Claim {
    /// The client's error for a repeat that cannot run.
    pub fn error(&self) -> Option<ApiError> {
        match self {
            Claim::InFlight => Some(
                ApiError::new(
                    ErrorKind::Conflict,
                    "A request with this Idempotency-Key is still being processed; retry once it has finished.",
                )
                .code("idempotency_key_in_use")
                .param("Idempotency-Key"),
            ),
            Claim::Mismatch => Some(
                ApiError::new(
                    ErrorKind::Unprocessable,
                    "This Idempotency-Key was already used with a different request body.",
                )
                .code("idempotency_key_reused")
                .param("Idempotency-Key")
                .should_retry(false),
            ),
            _ => None,
        }
    }
}

pub fn fingerprint(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Checks the header's value: 1-255 visible ASCII characters.
pub fn check_key(value: &http::HeaderValue) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorKind::InvalidRequest,
            "The Idempotency-Key header must be 1 to 255 visible ASCII characters.",
        )
        .param("Idempotency-Key")
    };
    let s = value.to_str().map_err(|_| bad())?.trim();
    let s = s.trim_matches('"');
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(s.to_string())
}

struct MemoryRecord {
    fingerprint: String,
    response: Option<String>,
    locked_until: u64,
    created_at: u64,
}

/// Records kept in this process (`state.store: none`).
#[derive(Default)]
pub struct MemoryIdempotency {
    map: DashMap<(String, String), MemoryRecord>,
}

impl MemoryIdempotency {
    pub fn claim(
        &self,
        tenant: &str,
        key: &str,
        fp: &str,
        lock_for: Duration,
        retention: Duration,
        now_ms: u64,
    ) -> Claim {
        let fresh = || MemoryRecord {
            fingerprint: fp.to_string(),
            response: None,
            locked_until: now_ms + lock_for.as_millis() as u64,
            created_at: now_ms,
        };
        let mut entry = self
            .map
            .entry((tenant.to_string(), key.to_string()))
            .or_insert_with(|| MemoryRecord {
                created_at: u64::MAX,
                ..fresh()
            });
        let r = entry.value_mut();
        if r.created_at == u64::MAX
            || r.created_at + retention.as_millis() as u64 <= now_ms
            || (r.response.is_none() && r.locked_until <= now_ms)
        {
            *r = fresh();
            return Claim::Run;
        }
        if r.fingerprint != fp {
            Claim::Mismatch
        } else if let Some(resp) = &r.response {
            Claim::Replay(resp.clone())
        } else {
            Claim::InFlight
        }
    }

    pub fn complete(&self, tenant: &str, key: &str, response: String) {
        if let Some(mut r) = self.map.get_mut(&(tenant.to_string(), key.to_string())) {
            r.response = Some(response);
        }
    }

    pub fn release(&self, tenant: &str, key: &str) {
        self.map.remove(&(tenant.to_string(), key.to_string()));
    }

    /// Ends a record the way the ledger's transaction ends one in the database.
    pub fn finish(&self, outcome: Option<IdemOutcome>) {
        match outcome {
            Some(IdemOutcome::Complete {
                tenant,
                key,
                response,
            }) => self.complete(&tenant, &key, response),
            Some(IdemOutcome::Release { tenant, key }) => self.release(&tenant, &key),
            None => {}
        }
    }

    pub fn sweep(&self, retention: Duration, now_ms: u64) {
        let keep = retention.as_millis() as u64;
        self.map.retain(|_, r| r.created_at + keep > now_ms);
    }
}

/// Claims a key in the SQL store: an INSERT that only the first request wins, else a look at
/// the record (taking over an expired one, or one whose runner died, with a compare-and-set).
pub async fn sql_claim(
    db: &Database,
    tenant: &str,
    key: &str,
    fp: &str,
    lock_for: Duration,
    retention: Duration,
    now_ms: i64,
) -> Result<Claim, StoreError> {
    let locked_until = now_ms + lock_for.as_millis() as i64;
    let inserted = sqlx::query(
        "INSERT INTO idempotency (tenant, idem_key, fingerprint, state, response, locked_until, created_at) \
         VALUES ($1, $2, $3, 'running', NULL, $4, $5) ON CONFLICT (tenant, idem_key) DO NOTHING",
    )
    .bind(tenant)
    .bind(key)
    .bind(fp)
    .bind(locked_until)
    .bind(now_ms)
    .execute(&db.pool)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Claim::Run);
    }
    let row: Option<(String, String, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT fingerprint, state, response, locked_until, created_at FROM idempotency \
         WHERE tenant = $1 AND idem_key = $2",
    )
    .bind(tenant)
    .bind(key)
    .fetch_optional(&db.pool)
    .await?;
    let Some((old_fp, state, response, old_lock, created)) = row else {
        // Deleted between the two statements (its request failed): try once more.
        return Box::pin(sql_claim(db, tenant, key, fp, lock_for, retention, now_ms)).await;
    };
    let expired = created + retention.as_millis() as i64 <= now_ms;
    let abandoned = state == "running" && old_lock <= now_ms;
    if expired || abandoned {
        let taken = sqlx::query(
            "UPDATE idempotency SET fingerprint = $3, state = 'running', response = NULL, \
             locked_until = $4, created_at = $5 \
             WHERE tenant = $1 AND idem_key = $2 AND created_at = $6 AND locked_until = $7",
        )
        .bind(tenant)
        .bind(key)
        .bind(fp)
        .bind(locked_until)
        .bind(now_ms)
        .bind(created)
        .bind(old_lock)
        .execute(&db.pool)
        .await?
        .rows_affected();
        return Ok(if taken == 1 {
            Claim::Run
        } else {
            Claim::InFlight
        });
    }
    Ok(if old_fp != fp {
        Claim::Mismatch
    } else if state == "done" {
        Claim::Replay(response.unwrap_or_default())
    } else {
        Claim::InFlight
    })
}

/// Forgets a key outside the ledger (a request refused before it was relayed).
pub async fn sql_release(db: &Database, tenant: &str, key: &str) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM idempotency WHERE tenant = $1 AND idem_key = $2 AND state = 'running'",
    )
    .bind(tenant)
    .bind(key)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Drops records past their retention.
pub async fn sql_sweep(db: &Database, retention: Duration, now_ms: i64) -> Result<u64, StoreError> {
    let before = now_ms - retention.as_millis() as i64;
    Ok(
        sqlx::query("DELETE FROM idempotency WHERE created_at < $1 AND state = 'done'")
            .bind(before)
            .execute(&db.pool)
            .await?
            .rows_affected(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_records_follow_the_draft() {
        let m = MemoryIdempotency::default();
        let lock = Duration::from_secs(60);
        let keep = Duration::from_secs(3600);
        assert_eq!(m.claim("t", "k", "a", lock, keep, 1000), Claim::Run);
        assert_eq!(m.claim("t", "k", "a", lock, keep, 1001), Claim::InFlight);
        assert_eq!(m.claim("t", "k", "b", lock, keep, 1001), Claim::Mismatch);
        assert_eq!(
            m.claim("u", "k", "b", lock, keep, 1001),
            Claim::Run,
            "per tenant"
        );
        m.complete("t", "k", "answer".into());
        assert_eq!(
            m.claim("t", "k", "a", lock, keep, 2000),
            Claim::Replay("answer".into())
        );
        assert_eq!(
            m.claim("t", "k", "a", lock, keep, 1000 + 3_600_000),
            Claim::Run,
            "expired"
        );
        m.release("t", "k");
        assert_eq!(m.claim("t", "k", "b", lock, keep, 5000), Claim::Run);
        // A runner that died: its lock runs out and the key can be taken.
        assert_eq!(
            m.claim("t", "k", "b", lock, keep, 5000 + 60_001),
            Claim::Run
        );
    }
}
