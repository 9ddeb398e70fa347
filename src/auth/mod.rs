//! Who is calling: bearer parsing, key hashing, the [`KeyStore`] trait and the [`Principal`]
//! a request carries once authenticated.
//!
//! Keys are looked up by the SHA-256 of the presented secret, so a store never holds (and a
//! log never shows) a secret; the key's public `id` is what logs and usage records name.

mod db_store;
mod jwt;
mod static_store;

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::api::ApiError;

pub use db_store::{principal_of, DbKeyStore};
pub use jwt::{looks_like_jwt, JwtVerifier};
pub use static_store::{key_hash, StaticKeyStore};

pub type KeyHash = [u8; 32];

pub fn hash_secret(secret: &str) -> KeyHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// The models a principal may use.
#[derive(Debug, Clone)]
pub enum ModelSet {
    All,
    Only(Arc<HashSet<String>>),
}

impl ModelSet {
    pub fn from_list(models: &[String]) -> Self {
        if models.iter().any(|m| m == "*") {
            ModelSet::All
        } else {
            ModelSet::Only(Arc::new(models.iter().cloned().collect()))
        }
    }

    pub fn contains(&self, model: &str) -> bool {
        match self {
            ModelSet::All => true,
            ModelSet::Only(set) => set.contains(model),
        }
    }

    /// Models allowed by both sets (a key narrows its tenant).
    pub fn intersect(&self, other: &ModelSet) -> ModelSet {
        match (self, other) {
            (ModelSet::All, x) | (x, ModelSet::All) => x.clone(),
            (ModelSet::Only(a), ModelSet::Only(b)) => {
                ModelSet::Only(Arc::new(a.intersection(b).cloned().collect()))
            }
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: Arc<str>,
    pub tenant: Arc<str>,
    pub models: ModelSet,
    /// The tenant's rate limits.
    pub limits: Arc<crate::config::LimitsConfig>,
    /// The key's (or token's) own limits, applied on top of the tenant's.
    pub key_limits: Option<Arc<crate::config::LimitsConfig>>,
    /// The tenant's labels and its share of a scarce pool.
    pub share: Arc<Share>,
}

/// A tenant's labels (which select route overrides) and what they say of its share of a
/// backend's queue: `weight` (default 1) and `max_share` (`50%` or `0.5`; default none).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub labels: std::collections::BTreeMap<String, String>,
    pub weight: u32,
    pub max_share: Option<f64>,
}

impl Default for Share {
    fn default() -> Self {
        Share {
            labels: Default::default(),
            weight: 1,
            max_share: None,
        }
    }
}

impl Share {
    /// From a tenant's labels (checked by the config for gateway.yaml's tenants; a store
    /// tenant's bad value falls back to the default).
    pub fn from_labels(labels: &std::collections::BTreeMap<String, String>) -> Self {
        Share {
            weight: labels
                .get("weight")
                .and_then(|w| crate::config::parse_weight(w).ok())
                .unwrap_or(1),
            max_share: labels
                .get("max_share")
                .and_then(|s| crate::config::parse_share(s).ok()),
            labels: labels.clone(),
        }
    }
}

impl Principal {
    pub fn may_use(&self, model: &str) -> bool {
        self.models.contains(model)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key")]
    Missing,
    #[error("malformed Authorization header")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("disabled API key")]
    Disabled,
    #[error("revoked API key")]
    Revoked,
    #[error("expired API key")]
    Expired,
    #[error("key store unavailable: {0}")]
    Store(String),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => ApiError::invalid_api_key(
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            ),
            AuthError::Malformed => ApiError::invalid_api_key(
                "Malformed Authorization header: expected `Authorization: Bearer YOUR_KEY`.",
            ),
            AuthError::Unknown => ApiError::invalid_api_key("Incorrect API key provided."),
            AuthError::Disabled => ApiError::invalid_api_key("This API key has been disabled."),
            AuthError::Revoked => ApiError::invalid_api_key("This API key has been revoked."),
            AuthError::Expired => ApiError::invalid_api_key("This API key has expired."),
            AuthError::Store(_) => ApiError::new(
                crate::api::ErrorKind::Unavailable,
                "The key store is temporarily unavailable; please retry.",
            )
            .retry_after(std::time::Duration::from_secs(1)),
        }
    }
}

/// Where keys live. The static store reads gateway.yaml; the database store (SQLite,
/// PostgreSQL) holds `sk-ig-` keys. Both implement the same trait.
#[async_trait]
pub trait KeyStore: Send + Sync {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError>;
}

/// gateway.yaml's keys, the database's `sk-ig-` keys, and JWTs.
pub struct KeyStores {
    pub config: StaticKeyStore,
    pub db: Option<Arc<DbKeyStore>>,
    pub jwt: Option<JwtVerifier>,
    /// Tenants of gateway.yaml, for JWTs that name one.
    pub tenants: std::collections::BTreeMap<String, crate::config::TenantConfig>,
}

impl KeyStores {
    /// A principal from a verified JWT: its tenant (gateway.yaml's, else the store's) must
    /// exist and be enabled; a models claim narrows the tenant's models.
    async fn principal_from_jwt(
        &self,
        jwt: &JwtVerifier,
        token: &str,
    ) -> Result<Principal, AuthError> {
        let claims = jwt.verify(token)?;
        let cfg = jwt.config();
        let tenant_id = claims
            .get(&cfg.tenant_claim)
            .and_then(|v| v.as_str())
            .ok_or(AuthError::Unknown)?;
        let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("-");
        let key_id: String = format!("jwt:{sub}").chars().take(80).collect();
        let mut principal = self.principal_for_tenant(tenant_id, &key_id).await?;
        let models = principal.models;
        principal.models = match claims.get(&cfg.models_claim).and_then(|v| v.as_array()) {
            Some(list) => {
                let names: Vec<String> = list
                    .iter()
                    .filter_map(|m| m.as_str().map(String::from))
                    .collect();
                models.intersect(&ModelSet::from_list(&names))
            }
            None => models,
        };
        principal.key_limits = match claims.get(&cfg.limits_claim) {
            Some(v) => Some(Arc::new(
                serde_json::from_value::<crate::config::LimitsConfig>(v.clone())
                    .map_err(|_| AuthError::Unknown)?,
            )),
            None => None,
        };
        Ok(principal)
    }

    /// A principal acting for tenant `tenant_id` (gateway.yaml's, else the store's) under the
    /// name `key_id`, with the tenant's models, limits and share: for JWTs that name a tenant
    /// and for the console's playground. The tenant must exist and be enabled.
    pub async fn principal_for_tenant(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<Principal, AuthError> {
        let (models, limits, disabled, share) = match self.tenants.get(tenant_id) {
            Some(t) => (
                ModelSet::from_list(&t.models),
                t.limits.clone(),
                t.disabled,
                Share::from_labels(&t.labels),
            ),
            None => {
                let db = self.db.as_ref().ok_or(AuthError::Unknown)?;
                let t = db.tenant(tenant_id).await?.ok_or(AuthError::Unknown)?;
                (
                    ModelSet::from_list(&t.models),
                    t.effective_limits(),
                    t.disabled,
                    Share::from_labels(&t.labels),
                )
            }
        };
        if disabled {
            return Err(AuthError::Disabled);
        }
        Ok(Principal {
            key_id: Arc::from(key_id),
            tenant: Arc::from(tenant_id),
            models,
            limits: Arc::new(limits),
            key_limits: None,
            share: Arc::new(share),
        })
    }

    /// Whether `token` is a JWT carrying the admin role.
    pub fn jwt_admin(&self, token: &str) -> bool {
        match &self.jwt {
            Some(jwt) if looks_like_jwt(token) => {
                jwt.verify(token).is_ok_and(|claims| jwt.is_admin(&claims))
            }
            _ => false,
        }
    }
}

#[async_trait]
impl KeyStore for KeyStores {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(jwt) = self.jwt.as_ref().filter(|_| looks_like_jwt(token)) {
            return self.principal_from_jwt(jwt, token).await;
        }
        match (&self.db, crate::store::keys::parse_token(token)) {
            (Some(db), Some(_)) => db.authenticate(token).await,
            _ => self.config.authenticate(token).await,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(header: Option<&http::HeaderValue>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?.trim();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer_token(Some(&h("Bearer sk-1"))).unwrap(), "sk-1");
        assert_eq!(bearer_token(Some(&h("bearer  sk-1 "))).unwrap(), "sk-1");
        assert!(matches!(bearer_token(None), Err(AuthError::Missing)));
        assert!(matches!(
            bearer_token(Some(&h("Basic abc"))),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            bearer_token(Some(&h("Bearer"))),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            bearer_token(Some(&h("sk-1"))),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn model_sets_intersect() {
        let tenant = ModelSet::from_list(&["a".into(), "b".into()]);
        let key = ModelSet::from_list(&["b".into(), "c".into()]);
        let both = tenant.intersect(&key);
        assert!(both.contains("b") && !both.contains("a") && !both.contains("c"));
        assert!(ModelSet::All.intersect(&tenant).contains("a"));
        assert!(ModelSet::from_list(&["*".into()]).contains("anything"));
    }
}
