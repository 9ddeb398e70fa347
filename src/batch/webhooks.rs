//! Tenants' webhook endpoints and their deliveries, in the store. Events are signed as
//! Standard Webhooks (the scheme OpenAI uses, so `openai`'s `webhooks.unwrap` verifies them):
//! `webhook-id`, `webhook-timestamp`, and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">` keyed by the secret after its `whsec_` prefix, base64-decoded.

use base64::Engine;
use hmac::{Hmac, Mac};
use sqlx::Row;

use crate::store::{Database, Kind, StoreError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// How long a delivery is retried before it is given up.
pub const RETRY_FOR_SECS: i64 = 24 * 3600;

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub tenant: String,
    pub url: String,
    /// Shown once, when created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: i64,
}

/// A delivery due now.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub payload: String,
    pub attempts: i64,
    pub give_up_at: i64,
}

/// `whsec_` and 32 random bytes, base64.
pub fn new_secret() -> String {
    format!("whsec_{}", B64.encode(rand::random::<[u8; 32]>()))
}

/// The `webhook-signature` header value for a body.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => B64
            .decode(b64)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

#[derive(Clone)]
pub struct WebhookStore {
    db: Database,
}

impl WebhookStore {
    pub fn new(db: Database) -> Self {
        WebhookStore { db }
    }

    pub async fn add(&self, tenant: &str, url: &str, now: i64) -> Result<Webhook, StoreError> {
        let w = Webhook {
            id: super::new_id("wh_"),
            tenant: tenant.to_string(),
            url: url.to_string(),
            secret: Some(new_secret()),
            created_at: now,
        };
        sqlx::query("INSERT INTO webhooks (id, tenant, url, secret, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&w.id)
            .bind(tenant)
            .bind(url)
            .bind(w.secret.as_deref())
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        Ok(w)
    }

    pub async fn list(&self, tenant: &str) -> Result<Vec<Webhook>, StoreError> {
        let rows = sqlx::query("SELECT id, tenant, url, created_at FROM webhooks WHERE tenant = $1 ORDER BY created_at")
            .bind(tenant)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Webhook {
                    id: r.try_get("id")?,
                    tenant: r.try_get("tenant")?,
                    url: r.try_get("url")?,
                    secret: None,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM webhooks WHERE tenant = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Queues `event` (a JSON object with its own `id`) for every endpoint of `tenant`.
    pub async fn enqueue(
        &self,
        tenant: &str,
        event: &serde_json::Value,
        now: i64,
    ) -> Result<(), StoreError> {
        let payload = event.to_string();
        let hooks = sqlx::query("SELECT id FROM webhooks WHERE tenant = $1")
            .bind(tenant)
            .fetch_all(&self.db.pool)
            .await?;
        for h in hooks {
            let hook: String = h.try_get("id")?;
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, webhook_id, payload, state, next_at, \
                 give_up_at, created_at) VALUES ($1, $2, $3, 'pending', $4, $5, $4)",
            )
            .bind(super::new_id("whd_"))
            .bind(&hook)
            .bind(&payload)
            .bind(now)
            .bind(now + RETRY_FOR_SECS)
            .execute(&self.db.pool)
            .await?;
        }
        Ok(())
    }

    /// Deliveries due now, each taken for `lease` seconds (another replica skips them).
    pub async fn due(&self, now: i64, lease: i64, limit: i64) -> Result<Vec<Due>, StoreError> {
        let lock = match self.db.kind {
            Kind::Postgres => " FOR UPDATE OF d SKIP LOCKED",
            Kind::Sqlite => "",
        };
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT d.id, w.url, w.secret, d.payload, d.attempts, d.give_up_at \
             FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.state = 'pending' AND d.next_at <= $1 ORDER BY d.next_at LIMIT $2{lock}"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let d = Due {
                id: r.try_get("id")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get("attempts")?,
                give_up_at: r.try_get("give_up_at")?,
            };
            sqlx::query("UPDATE webhook_deliveries SET next_at = $2 WHERE id = $1")
                .bind(&d.id)
                .bind(now + lease)
                .execute(&mut *tx)
                .await?;
            out.push(d);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Records an attempt: delivered, retried at `next_at`, or given up.
    pub async fn attempted(
        &self,
        d: &Due,
        ok: bool,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let attempts = d.attempts + 1;
        let backoff = (5i64 << attempts.min(10)).min(3600);
        let state = if ok {
            "delivered"
        } else if now + backoff > d.give_up_at {
            "failed"
        } else {
            "pending"
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $2, attempts = $3, next_at = $4, last_error = $5 \
             WHERE id = $1",
        )
        .bind(&d.id)
        .bind(state)
        .bind(attempts)
        .bind(now + backoff)
        .bind(error)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The Standard Webhooks specification's own example.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
