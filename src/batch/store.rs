//! Files, batches and batch lines in the configured database (SQLite or PostgreSQL, one set
//! of queries through sqlx's `Any` driver). Lines are shared out by lease: a claim takes
//! pending lines and lines whose lease expired, and only the lease's holder may record a
//! line's result, so a line's output is written once even if two replicas ran it (the
//! `Idempotency-Key` each line runs under makes the second run a replay, never a charge).

use sqlx::Row;

use super::input::Line;
use super::{BatchObject, FileObject, RequestCounts};
use crate::store::{Database, Kind, StoreError};

#[derive(Clone)]
pub struct BatchStore {
    db: Database,
}

/// A line taken to run.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub batch_id: String,
    pub line: i64,
    pub custom_id: String,
    pub body: String,
    /// The creating key's principal, as JSON.
    pub principal: String,
}

/// A line's outcome: its HTTP status (`None`: it never ran) and its whole output line.
pub struct LineResult {
    pub status_code: Option<u16>,
    pub output: String,
}

fn file_of(r: &sqlx::any::AnyRow) -> Result<FileObject, sqlx::Error> {
    Ok(FileObject {
        id: r.try_get("id")?,
        object: "file",
        bytes: r.try_get("bytes")?,
        created_at: r.try_get("created_at")?,
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
        status: "processed",
    })
}

fn json_col(r: &sqlx::any::AnyRow, col: &str) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let text: Option<String> = r.try_get(col)?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

fn batch_of(r: &sqlx::any::AnyRow) -> Result<BatchObject, sqlx::Error> {
    Ok(BatchObject {
        id: r.try_get("id")?,
        object: "batch",
        endpoint: r.try_get("endpoint")?,
        errors: json_col(r, "errors")?,
        input_file_id: r.try_get("input_file_id")?,
        completion_window: r.try_get("completion_window")?,
        status: r.try_get("status")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        created_at: r.try_get("created_at")?,
        in_progress_at: r.try_get("in_progress_at")?,
        expires_at: r.try_get("expires_at")?,
        finalizing_at: r.try_get("finalizing_at")?,
        completed_at: r.try_get("completed_at")?,
        failed_at: r.try_get("failed_at")?,
        expired_at: r.try_get("expired_at")?,
        cancelling_at: r.try_get("cancelling_at")?,
        cancelled_at: r.try_get("cancelled_at")?,
        request_counts: RequestCounts {
            total: r.try_get("total")?,
            completed: r.try_get("completed")?,
            failed: r.try_get("failed")?,
        },
        metadata: json_col(r, "metadata")?,
    })
}

impl BatchStore {
    pub fn new(db: Database) -> Self {
        BatchStore { db }
    }

    pub async fn insert_file(&self, tenant: &str, f: &FileObject) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO files (id, tenant, purpose, filename, bytes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&f.id)
        .bind(tenant)
        .bind(&f.purpose)
        .bind(&f.filename)
        .bind(f.bytes)
        .bind(f.created_at)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    pub async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileObject>, StoreError> {
        let row = sqlx::query("SELECT * FROM files WHERE tenant = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.as_ref().map(file_of).transpose()?)
    }

    pub async fn files(&self, tenant: &str, limit: i64) -> Result<Vec<FileObject>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM files WHERE tenant = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.iter().map(file_of).collect::<Result<_, _>>()?)
    }

    pub async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM files WHERE tenant = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A batch and its lines, in one transaction.
    pub async fn create(
        &self,
        tenant: &str,
        principal: &str,
        b: &BatchObject,
        lines: &[Line],
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO batches (id, tenant, principal, endpoint, input_file_id, \
             completion_window, status, metadata, errors, total, created_at, expires_at, \
             in_progress_at, failed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14)",
        )
        .bind(&b.id)
        .bind(tenant)
        .bind(principal)
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(&b.status)
        .bind(b.metadata.as_ref().map(|m| m.to_string()))
        .bind(b.errors.as_ref().map(|e| e.to_string()))
        .bind(b.request_counts.total)
        .bind(b.created_at)
        .bind(b.expires_at)
        .bind(b.in_progress_at)
        .bind(b.failed_at)
        .execute(&mut *tx)
        .await?;
        for l in lines {
            sqlx::query(
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, state) \
                 VALUES ($1, $2, $3, $4, 'pending')",
            )
            .bind(&b.id)
            .bind(l.number as i64)
            .bind(&l.custom_id)
            .bind(&l.body)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn batch(&self, tenant: &str, id: &str) -> Result<Option<BatchObject>, StoreError> {
        let row = sqlx::query("SELECT * FROM batches WHERE tenant = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.as_ref().map(batch_of).transpose()?)
    }

    /// Newest first; `after`: the id of the last batch of the previous page.
    pub async fn batches(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BatchObject>, StoreError> {
        let rows =
            match after {
                None => {
                    sqlx::query(
                        "SELECT * FROM batches WHERE tenant = $1 \
                     ORDER BY created_at DESC, id DESC LIMIT $2",
                    )
                    .bind(tenant)
                    .bind(limit)
                    .fetch_all(&self.db.pool)
                    .await?
                }
                Some(after) => sqlx::query(
                    "SELECT b.* FROM batches b, batches a WHERE b.tenant = $1 AND a.tenant = $1 \
                     AND a.id = $2 AND (b.created_at < a.created_at OR \
                     (b.created_at = a.created_at AND b.id < a.id)) \
                     ORDER BY b.created_at DESC, b.id DESC LIMIT $3",
                )
                .bind(tenant)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.db.pool)
                .await?,
            };
        Ok(rows.iter().map(batch_of).collect::<Result<_, _>>()?)
    }

    /// `in_progress` -> `cancelling`; lines not yet taken are cancelled. `None`: no such batch.
    pub async fn cancel(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<BatchObject>, StoreError> {
        let moved = sqlx::query(
            "UPDATE batches SET status = 'cancelling', cancelling_at = $3 \
             WHERE tenant = $1 AND id = $2 AND status IN ('validating', 'in_progress')",
        )
        .bind(tenant)
        .bind(id)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        if moved.rows_affected() == 1 {
            sqlx::query(
                "UPDATE batch_lines SET state = 'cancelled' WHERE batch_id = $1 AND state = 'pending'",
            )
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        }
        self.batch(tenant, id).await
    }

    /// Takes up to `limit` lines to run: pending ones, and leased ones whose lease expired,
    /// of batches in progress.
    pub async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        let lock = match self.db.kind {
            Kind::Postgres => " FOR UPDATE OF l SKIP LOCKED",
            Kind::Sqlite => "",
        };
        let pick = format!(
            "SELECT l.batch_id, l.line FROM batch_lines l JOIN batches b ON b.id = l.batch_id \
             WHERE b.status = 'in_progress' AND (l.state = 'pending' OR \
             (l.state = 'leased' AND l.lease_until < $3)) \
             ORDER BY b.created_at, l.line LIMIT $4{lock}"
        );
        let sql = format!(
            "UPDATE batch_lines SET state = 'leased', lease_owner = $1, lease_until = $2 \
             WHERE (batch_id, line) IN ({pick}) \
             RETURNING batch_id, line, custom_id, body"
        );
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(now + lease_secs)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let batch_id: String = r.try_get("batch_id")?;
            let principal: String = sqlx::query("SELECT principal FROM batches WHERE id = $1")
                .bind(&batch_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("principal")?;
            out.push(Claimed {
                batch_id,
                line: r.try_get("line")?,
                custom_id: r.try_get("custom_id")?,
                body: r.try_get("body")?,
                principal,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Records a line's result if `owner` still holds its lease; counts it. `false`: the lease
    /// had passed to another replica (whose result stands).
    pub async fn finish(
        &self,
        c: &Claimed,
        owner: &str,
        result: &LineResult,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE batch_lines SET state = 'done', status_code = $4, result = $5, \
             lease_until = NULL WHERE batch_id = $1 AND line = $2 AND state = 'leased' \
             AND lease_owner = $3",
        )
        .bind(&c.batch_id)
        .bind(c.line)
        .bind(owner)
        .bind(result.status_code.map(i64::from))
        .bind(&result.output)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        let column = if result.status_code.is_some_and(|s| (200..300).contains(&s)) {
            "completed"
        } else {
            "failed"
        };
        sqlx::query(&format!(
            "UPDATE batches SET {column} = {column} + 1 WHERE id = $1"
        ))
        .bind(&c.batch_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Gives a line back to the queue (its key is still held by an earlier run that may have
    /// died): it is taken again after `retry_at`.
    pub async fn release(&self, c: &Claimed, owner: &str, retry_at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batch_lines SET lease_until = $4 WHERE batch_id = $1 AND line = $2 \
             AND state = 'leased' AND lease_owner = $3",
        )
        .bind(&c.batch_id)
        .bind(c.line)
        .bind(owner)
        .bind(retry_at)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// A single process owns a SQLite file: leases left by its previous life are void.
    pub async fn release_all_leases(&self) -> Result<(), StoreError> {
        if self.db.kind == Kind::Sqlite {
            sqlx::query(
                "UPDATE batch_lines SET state = 'pending', lease_owner = NULL, \
                         lease_until = NULL WHERE state = 'leased'",
            )
            .execute(&self.db.pool)
            .await?;
        }
        Ok(())
    }

    /// Batches past their window: lines not yet run become `expired`, uncharged.
    pub async fn expire(&self, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batch_lines SET state = 'expired' WHERE state IN ('pending', 'leased') \
             AND batch_id IN (SELECT id FROM batches WHERE status = 'in_progress' \
             AND expires_at <= $1)",
        )
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Moves batches whose every line has ended to `finalizing`, each by exactly one caller;
    /// returns (id, the status it will end in) for those this caller won.
    pub async fn to_finalize(&self, now: i64) -> Result<Vec<(String, &'static str)>, StoreError> {
        let rows = sqlx::query(
            "SELECT b.id, b.status, b.expires_at FROM batches b WHERE b.status IN \
             ('in_progress', 'cancelling') AND NOT EXISTS (SELECT 1 FROM batch_lines l \
             WHERE l.batch_id = b.id AND l.state IN ('pending', 'leased'))",
        )
        .fetch_all(&self.db.pool)
        .await?;
        let mut won = Vec::new();
        for r in rows {
            let id: String = r.try_get("id")?;
            let status: String = r.try_get("status")?;
            let expires_at: i64 = r.try_get("expires_at")?;
            let end = match status.as_str() {
                "cancelling" => "cancelled",
                _ if expires_at <= now => "expired",
                _ => "completed",
            };
            let moved = sqlx::query(
                "UPDATE batches SET status = 'finalizing', finalizing_at = $3 \
                 WHERE id = $1 AND status = $2",
            )
            .bind(&id)
            .bind(&status)
            .bind(now)
            .execute(&self.db.pool)
            .await?;
            if moved.rows_affected() == 1 {
                won.push((id, end));
            }
        }
        Ok(won)
    }

    /// Every line of a batch in order: (custom_id, state, result).
    pub async fn lines(
        &self,
        batch_id: &str,
    ) -> Result<Vec<(String, String, Option<i64>, Option<String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT custom_id, state, status_code, result FROM batch_lines WHERE batch_id = $1 \
             ORDER BY line",
        )
        .bind(batch_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("custom_id")?,
                    r.try_get("state")?,
                    r.try_get("status_code")?,
                    r.try_get("result")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// The end of finalizing: the final status, its time and the files.
    pub async fn close(
        &self,
        id: &str,
        status: &str,
        now: i64,
        output_file_id: Option<&str>,
        error_file_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let at = match status {
            "cancelled" => "cancelled_at",
            "expired" => "expired_at",
            _ => "completed_at",
        };
        sqlx::query(&format!(
            "UPDATE batches SET status = $2, {at} = $3, output_file_id = $4, error_file_id = $5 \
             WHERE id = $1 AND status = 'finalizing'"
        ))
        .bind(id)
        .bind(status)
        .bind(now)
        .bind(output_file_id)
        .bind(error_file_id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The tenant a batch belongs to.
    pub async fn tenant_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT tenant FROM batches WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.map(|r| r.try_get("tenant")).transpose()?)
    }
}
