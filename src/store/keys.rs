//! Tenants and API keys in the database. Keys look like `sk-ig-<id>-<secret>`: the id names
//! the key everywhere (logs, admin API, usage); only the SHA-256 of the secret is stored, and
//! the secret is shown once, when the key is created or rotated.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Database, StoreError};
use crate::config::LimitsConfig;

pub const KEY_PREFIX: &str = "sk-ig-";
const ID_LEN: usize = 12;
const SECRET_LEN: usize = 40;

pub fn now() -> i64 {
    crate::clock::now_unix() as i64
}

fn random_alnum(len: usize, lower_only: bool) -> String {
    const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    const ALL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let set = if lower_only { LOWER } else { ALL };
    let mut rng = rand::rng();
    (0..len)
        .map(|_| set[rng.random_range(0..set.len())] as char)
        .collect()
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// `sk-ig-<id>-<secret>` -> (id, secret).
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    let ok = id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && secret.len() == SECRET_LEN
        && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then_some((id, secret))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    pub models: Vec<String>,
    pub limits: LimitsConfig,
    /// Used by metering; stored as given.
    pub budget: Option<serde_json::Value>,
    pub labels: BTreeMap<String, String>,
    pub disabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A tenant as created or updated through the CLI or the admin API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantInput {
    /// Required when creating; optional in an update (the path names the tenant).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub budget: Option<serde_json::Value>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    #[serde(skip)]
    pub secret_sha256: String,
    #[serde(skip)]
    pub prev_secret_sha256: Option<String>,
    /// Until when the previous secret still works after a rotation.
    pub prev_valid_until: Option<i64>,
    pub models: Option<Vec<String>>,
    pub limits: Option<LimitsConfig>,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub disabled: bool,
    pub revoked_at: Option<i64>,
    /// Whether the key may create, rotate and revoke its tenant's keys in the tenant portal.
    pub manage_keys: bool,
}

impl TenantInput {
    fn check_budget(&self) -> Result<(), StoreError> {
        match &self.budget {
            Some(b) => serde_json::from_value::<crate::config::BudgetConfig>(b.clone())
                .map(|_| ())
                .map_err(|e| {
                    StoreError::Invalid(format!(
                        "budget: {e} (expected {{\"micro_usd\": N, \"period\": \"daily|monthly|total\"}})"
                    ))
                }),
            None => Ok(()),
        }
    }
}

impl TenantRecord {
    /// The tenant's limits, with a budget given in the `budget` field when `limits` has none.
    pub fn effective_limits(&self) -> LimitsConfig {
        let mut limits = self.limits.clone();
        if limits.budget.is_none() {
            limits.budget = self
                .budget
                .as_ref()
                .and_then(|b| serde_json::from_value(b.clone()).ok());
        }
        limits
    }
}

impl KeyRecord {
    /// Whether `secret` opens this key now (current secret, or the previous one in its grace).
    pub fn secret_matches(&self, secret: &str, at: i64) -> bool {
        use subtle::ConstantTimeEq;
        let h = hash_secret(secret);
        if bool::from(h.as_bytes().ct_eq(self.secret_sha256.as_bytes())) {
            return true;
        }
        match (&self.prev_secret_sha256, self.prev_valid_until) {
            (Some(prev), Some(until)) if at < until => {
                bool::from(h.as_bytes().ct_eq(prev.as_bytes()))
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyInput {
    pub tenant: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// May manage its tenant's keys in the tenant portal.
    #[serde(default)]
    pub manage_keys: bool,
}

/// A key with its secret, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub key: KeyRecord,
    pub secret: String,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("stored JSON: {e}")))
}

fn tenant_row(r: &AnyRow) -> Result<TenantRecord, StoreError> {
    let budget: Option<String> = r.try_get("budget")?;
    Ok(TenantRecord {
        id: r.try_get("id")?,
        models: parse(&r.try_get::<String, _>("models")?)?,
        limits: parse(&r.try_get::<String, _>("limits")?)?,
        budget: budget.as_deref().map(parse).transpose()?,
        labels: parse(&r.try_get::<String, _>("labels")?)?,
        disabled: r.try_get::<i64, _>("disabled")? != 0,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn key_row(r: &AnyRow) -> Result<KeyRecord, StoreError> {
    let models: Option<String> = r.try_get("models")?;
    let limits: Option<String> = r.try_get("limits")?;
    Ok(KeyRecord {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        secret_sha256: r.try_get("secret_sha256")?,
        prev_secret_sha256: r.try_get("prev_secret_sha256")?,
        prev_valid_until: r.try_get("prev_valid_until")?,
        models: models.as_deref().map(parse).transpose()?,
        limits: limits.as_deref().map(parse).transpose()?,
        expires_at: r.try_get("expires_at")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        disabled: r.try_get::<i64, _>("disabled")? != 0,
        revoked_at: r.try_get("revoked_at")?,
        manage_keys: r.try_get::<i64, _>("manage_keys")? != 0,
    })
}

/// `%text%` with `text`'s own `%`, `_` and `\` taken literally (`ESCAPE '\'`).
fn like_pattern(search: Option<&str>) -> String {
    let mut p = String::from("%");
    for c in search.unwrap_or("").chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn check_id(id: &str, what: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid {what} id \"{id}\": 1-64 of [A-Za-z0-9._-]"
        )))
    }
}

const KEY_COLUMNS: &str =
    "id, tenant_id, name, secret_sha256, prev_secret_sha256, prev_valid_until, \
     models, limits, expires_at, created_at, last_used_at, disabled, revoked_at, manage_keys";

impl Database {
    async fn bump(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), StoreError> {
        sqlx::query("UPDATE store_revision SET n = n + 1 WHERE id = 1")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn create_tenant(&self, t: &TenantInput) -> Result<TenantRecord, StoreError> {
        t.check_budget()?;
        check_id(&t.id, "tenant")?;
        if self.get_tenant(&t.id).await?.is_some() {
            return Err(StoreError::Conflict(format!("tenant \"{}\"", t.id)));
        }
        let at = now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenants (id, models, limits, budget, labels, disabled, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(json(&t.models))
        .bind(json(&t.limits))
        .bind(t.budget.as_ref().map(json))
        .bind(json(&t.labels))
        .bind(i64::from(t.disabled))
        .bind(at)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        self.bump(&mut tx).await?;
        tx.commit().await?;
        self.get_tenant(&t.id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("tenant \"{}\"", t.id)))
    }

    /// Replaces a tenant's settings (all but its id and creation time).
    pub async fn update_tenant(&self, t: &TenantInput) -> Result<TenantRecord, StoreError> {
        t.check_budget()?;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE tenants SET models = $2, limits = $3, budget = $4, labels = $5, disabled = $6, \
             updated_at = $7 WHERE id = $1",
        )
        .bind(&t.id)
        .bind(json(&t.models))
        .bind(json(&t.limits))
        .bind(t.budget.as_ref().map(json))
        .bind(json(&t.labels))
        .bind(i64::from(t.disabled))
        .bind(now())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("tenant \"{}\"", t.id)));
        }
        self.bump(&mut tx).await?;
        tx.commit().await?;
        self.get_tenant(&t.id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("tenant \"{}\"", t.id)))
    }

    pub async fn set_tenant_disabled(&self, id: &str, disabled: bool) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE tenants SET disabled = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(i64::from(disabled))
            .bind(now())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("tenant \"{id}\"")));
        }
        self.bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes a tenant that has no keys left.
    pub async fn delete_tenant(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE tenant_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if keys > 0 {
            return Err(StoreError::Conflict(format!(
                "tenant \"{id}\" still has {keys} keys; revoke them and disable the tenant instead"
            )));
        }
        let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("tenant \"{id}\"")));
        }
        self.bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_tenant(&self, id: &str) -> Result<Option<TenantRecord>, StoreError> {
        sqlx::query("SELECT * FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(tenant_row)
            .transpose()
    }

    /// Tenants ordered by id, after the cursor `after`, whose id contains `search` if given.
    pub async fn list_tenants(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM tenants WHERE id > $1 AND id LIKE $2 ESCAPE '\\' ORDER BY id LIMIT $3",
        )
        .bind(after.unwrap_or(""))
        .bind(like_pattern(search))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(tenant_row)
        .collect()
    }

    pub async fn create_key(&self, k: &KeyInput) -> Result<NewKey, StoreError> {
        if self.get_tenant(&k.tenant).await?.is_none() {
            return Err(StoreError::NotFound(format!("tenant \"{}\"", k.tenant)));
        }
        let id = random_alnum(ID_LEN, true);
        let secret = random_alnum(SECRET_LEN, false);
        let at = now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, secret_sha256, models, limits, expires_at, \
             created_at, disabled, manage_keys) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9)",
        )
        .bind(&id)
        .bind(&k.tenant)
        .bind(&k.name)
        .bind(hash_secret(&secret))
        .bind(k.models.as_ref().map(json))
        .bind(k.limits.as_ref().map(json))
        .bind(k.expires_at)
        .bind(at)
        .bind(i64::from(k.manage_keys))
        .execute(&mut *tx)
        .await?;
        self.bump(&mut tx).await?;
        tx.commit().await?;
        let key = self
            .get_key(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key \"{id}\"")))?;
        Ok(NewKey {
            key,
            secret: format!("{KEY_PREFIX}{id}-{secret}"),
        })
    }

    pub async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(key_row)
            .transpose()
    }

    /// Keys ordered by id, optionally of one tenant, after the cursor `after`, whose id or
    /// name contains `search` if given.
    pub async fn list_keys(
        &self,
        tenant: Option<&str>,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let tenant_cond = if tenant.is_some() {
            "tenant_id = $4"
        } else {
            "$4 = ''"
        };
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id > $1 AND {tenant_cond} \
             AND (id LIKE $2 ESCAPE '\\' OR name LIKE $2 ESCAPE '\\') ORDER BY id LIMIT $3"
        ))
        .bind(after.unwrap_or(""))
        .bind(like_pattern(search))
        .bind(limit)
        .bind(tenant.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(key_row)
        .collect()
    }

    async fn update_key(
        &self,
        id: &str,
        sql: &str,
        binds: Vec<Option<i64>>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut q = sqlx::query(sql).bind(id);
        for b in binds {
            q = q.bind(b);
        }
        let done = q.execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("key \"{id}\"")));
        }
        self.bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_key_disabled(&self, id: &str, disabled: bool) -> Result<(), StoreError> {
        self.update_key(
            id,
            "UPDATE api_keys SET disabled = $2 WHERE id = $1",
            vec![Some(i64::from(disabled))],
        )
        .await
    }

    /// Revocation is final: the key and any grace secret stop working.
    pub async fn revoke_key(&self, id: &str) -> Result<(), StoreError> {
        self.update_key(
            id,
            "UPDATE api_keys SET revoked_at = $2, prev_secret_sha256 = NULL, prev_valid_until = NULL \
             WHERE id = $1 AND revoked_at IS NULL",
            vec![Some(now())],
        )
        .await
    }

    /// A new secret for the key; the old one keeps working for `grace` (none when zero).
    pub async fn rotate_key(&self, id: &str, grace: Duration) -> Result<NewKey, StoreError> {
        let current = self
            .get_key(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key \"{id}\"")))?;
        if current.revoked_at.is_some() {
            return Err(StoreError::Conflict(format!("key \"{id}\" is revoked")));
        }
        let secret = random_alnum(SECRET_LEN, false);
        let until = (!grace.is_zero()).then(|| now() + grace.as_secs() as i64);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE api_keys SET secret_sha256 = $2, prev_secret_sha256 = $3, prev_valid_until = $4 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(hash_secret(&secret))
        .bind(until.map(|_| current.secret_sha256.clone()))
        .bind(until)
        .execute(&mut *tx)
        .await?;
        self.bump(&mut tx).await?;
        tx.commit().await?;
        let key = self
            .get_key(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key \"{id}\"")))?;
        Ok(NewKey {
            key,
            secret: format!("{KEY_PREFIX}{id}-{secret}"),
        })
    }

    /// Records when keys were last used (batched by the caller; does not bump the revision).
    pub async fn touch_keys(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        for (id, at) in uses {
            sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
                .bind(id)
                .bind(*at)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Every key id, for the in-process filter that keeps unknown ids off the database.
    pub async fn key_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM api_keys")
            .fetch_all(&self.pool)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly() {
        let secret = "A".repeat(SECRET_LEN);
        let token = format!("sk-ig-abcdef012345-{secret}");
        assert_eq!(parse_token(&token), Some(("abcdef012345", secret.as_str())));
        assert!(parse_token("sk-ig-ABCDEF012345-x").is_none());
        assert!(parse_token("sk-imagegate-demo").is_none());
        assert!(parse_token(&format!("sk-ig-abcdef01234-{secret}")).is_none());
        assert!(parse_token(&format!("sk-ig-abcdef012345-{secret}!")).is_none());
    }
}
