use std::sync::Arc;

use async_trait::async_trait;

use super::{AuthError, KeyHash, KeyStore, ModelSet, Principal};
use crate::config::Config;

/// Keys and tenants from gateway.yaml, indexed by secret hash.
pub struct StaticKeyStore {
    keys: crate::FastMap<KeyHash, Entry>,
}

struct Entry {
    principal: Principal,
    disabled: bool,
}

impl StaticKeyStore {
    /// Builds the index. The config is already validated, so every key has a hash and a tenant.
    pub fn from_config(config: &Config) -> Self {
        let mut keys = crate::FastMap::default();
        for key in &config.keys {
            let Ok(hash) = crate::config::key_hash(key) else {
                continue;
            };
            let Some(tenant) = config.tenants.get(&key.tenant) else {
                continue;
            };
            let mut models = ModelSet::from_list(&tenant.models);
            if let Some(narrow) = &key.models {
                models = models.intersect(&ModelSet::from_list(narrow));
            }
            keys.insert(
                hash,
                Entry {
                    principal: Principal {
                        key_id: Arc::from(key.id.as_str()),
                        tenant: Arc::from(key.tenant.as_str()),
                        models,
                        limits: Arc::new(tenant.limits.clone()),
                        key_limits: key.limits.clone().map(Arc::new),
                    },
                    disabled: key.disabled || tenant.disabled,
                },
            );
        }
        StaticKeyStore { keys }
    }

    /// Ids of keys configured with a plaintext `secret`, for the start-up warning.
    pub fn plaintext_key_ids(config: &Config) -> Vec<&str> {
        config
            .keys
            .iter()
            .filter(|k| k.secret.is_some())
            .map(|k| k.id.as_str())
            .collect()
    }
}

#[async_trait]
impl KeyStore for StaticKeyStore {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        match self.keys.get(&super::hash_secret(token)) {
            None => Err(AuthError::Unknown),
            Some(e) if e.disabled => Err(AuthError::Disabled),
            Some(e) => Ok(e.principal.clone()),
        }
    }
}
