use std::sync::Arc;

use async_trait::async_trait;

use super::{AuthError, KeyHash, KeyStore, ModelSet, Principal};
use crate::config::{Config, ConfigError, KeyConfig};

/// Keys and tenants from gateway.yaml, indexed by secret hash.
pub struct StaticKeyStore {
    keys: crate::FastMap<KeyHash, Entry>,
}

struct Entry {
    principal: Principal,
    disabled: bool,
}

impl StaticKeyStore {
    /// Builds the index from a checked config (every key has a tenant and one well-formed
    /// secret); two keys with the same secret are an error at `keys[i]`.
    pub fn build(config: &Config) -> Result<Self, Vec<ConfigError>> {
        let mut keys = crate::FastMap::default();
        let mut errors = Vec::new();
        for (i, key) in config.keys.iter().enumerate() {
            let hash = match key_hash(key) {
                Ok(hash) => hash,
                Err(message) => {
                    errors.push(ConfigError::new(format!("keys[{i}]"), message));
                    continue;
                }
            };
            if keys.contains_key(&hash) {
                errors.push(ConfigError::new(
                    format!("keys[{i}]"),
                    "two keys have the same secret",
                ));
                continue;
            }
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
                        share: Arc::new(super::Share::from_labels(&tenant.labels)),
                    },
                    disabled: key.disabled || tenant.disabled,
                },
            );
        }
        if errors.is_empty() {
            Ok(StaticKeyStore { keys })
        } else {
            Err(errors)
        }
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

/// The SHA-256 of a configured key's secret, from `secret_sha256` or `secret`.
pub fn key_hash(key: &KeyConfig) -> Result<KeyHash, String> {
    match (&key.secret_sha256, &key.secret) {
        (Some(_), Some(_)) => Err("give either `secret_sha256` or `secret`, not both".into()),
        (None, None) => Err("a key needs `secret_sha256` (preferred) or `secret`".into()),
        (Some(hex_hash), None) => {
            let bytes = hex::decode(hex_hash.trim())
                .map_err(|_| "secret_sha256 must be 64 hexadecimal characters".to_string())?;
            bytes
                .try_into()
                .map_err(|_| "secret_sha256 must be 64 hexadecimal characters".to_string())
        }
        (None, Some(secret)) => Ok(super::hash_secret(secret.expose())),
    }
}
