//! The audit log: every change made through the console or the admin API, with who made it
//! (`admin:token:<fingerprint>`, `admin:jwt:<sub>`, `key:<id>` in the tenant portal), what
//! (`key.revoke`, `tenant.update`, ...), on what and when. Rows are only ever added.

use serde::Serialize;
use sqlx::Row;

use super::{Database, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: String,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// What changed, as JSON (never a secret: key secrets are not in any entry).
    pub detail: String,
}

impl Database {
    /// Adds one entry, stamped now.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let at_ms = crate::clock::now_ms();
        // Sorts by time: 13 digits of milliseconds, then 8 random hex digits.
        let id = format!("{at_ms:013}{:08x}", rand::random::<u32>());
        sqlx::query(
            "INSERT INTO audit_log (id, at_ms, actor, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(at_ms)
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest entries first, older than the cursor `before` (an entry's id).
    pub async fn audit_entries(
        &self,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, actor, action, target, detail FROM audit_log \
             WHERE id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before.unwrap_or("~"))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
