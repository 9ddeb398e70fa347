//! Keys from the database, behind an in-process cache. The hot path never waits on the
//! database for a key it has seen within `ttl`, and never at all for an id that does not
//! exist: every key id is held in memory (refreshed when the store changes), so a flood of
//! random keys costs a hash lookup. Every replica polls the store's revision counter twice a
//! second and drops its cache when it moved, so a revoked key stops working everywhere within
//! a second.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use dashmap::DashMap;

use super::{AuthError, KeyStore, ModelSet, Principal};
use crate::store::keys::{now, parse_token, KeyRecord, TenantRecord};
use crate::store::{Database, StoreError};

struct Cached {
    loaded: Instant,
    entry: Option<Arc<(KeyRecord, TenantRecord)>>,
}

pub struct DbKeyStore {
    db: Database,
    ttl: Duration,
    cache: DashMap<String, Cached>,
    known: ArcSwap<HashSet<String>>,
    revision: AtomicI64,
    touched: DashMap<String, i64>,
    lookups: AtomicU64,
    tenants: DashMap<String, (Instant, Option<TenantRecord>)>,
}

impl DbKeyStore {
    pub async fn new(db: Database, ttl: Duration) -> Result<Arc<Self>, StoreError> {
        let store = Arc::new(DbKeyStore {
            revision: AtomicI64::new(db.revision().await?),
            known: ArcSwap::from_pointee(db.key_ids().await?.into_iter().collect()),
            db,
            ttl,
            cache: DashMap::new(),
            touched: DashMap::new(),
            lookups: AtomicU64::new(0),
            tenants: DashMap::new(),
        });
        Ok(store)
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Database lookups made so far (cache misses for known ids).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Drops the cache if the store changed since the last look.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        let rev = self.db.revision().await?;
        if rev == self.revision.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let ids: HashSet<String> = self.db.key_ids().await?.into_iter().collect();
        self.known.store(Arc::new(ids));
        self.cache.clear();
        self.tenants.clear();
        self.revision.store(rev, Ordering::SeqCst);
        Ok(true)
    }

    /// Writes batched last-used times.
    pub async fn flush_last_used(&self) -> Result<(), StoreError> {
        let uses: Vec<(String, i64)> = self
            .touched
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        for (id, _) in &uses {
            self.touched.remove(id);
        }
        self.db.touch_keys(&uses).await
    }

    /// Keeps the cache in step with the store; runs until aborted.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flushed = Instant::now();
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "key store refresh failed");
            }
            if flushed.elapsed() >= Duration::from_secs(10) {
                flushed = Instant::now();
                if let Err(e) = self.flush_last_used().await {
                    tracing::warn!(error = %e, "could not record key use times");
                }
            }
        }
    }

    /// A store tenant, cached like keys (for JWTs that name one).
    pub async fn tenant(&self, id: &str) -> Result<Option<TenantRecord>, AuthError> {
        if let Some(t) = self.tenants.get(id) {
            if t.0.elapsed() < self.ttl {
                return Ok(t.1.clone());
            }
        }
        let t = self
            .db
            .get_tenant(id)
            .await
            .map_err(|e| AuthError::Store(e.to_string()))?;
        // Bounded: one entry per tenant the JWTs name; unknown names are not kept.
        if t.is_some() {
            self.tenants
                .insert(id.to_string(), (Instant::now(), t.clone()));
        }
        Ok(t)
    }

    async fn load(&self, id: &str) -> Result<Option<Arc<(KeyRecord, TenantRecord)>>, AuthError> {
        if let Some(c) = self.cache.get(id) {
            if c.loaded.elapsed() < self.ttl {
                return Ok(c.entry.clone());
            }
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let store = |e: StoreError| AuthError::Store(e.to_string());
        let entry = match self.db.get_key(id).await.map_err(store)? {
            None => None,
            Some(key) => self
                .db
                .get_tenant(&key.tenant)
                .await
                .map_err(store)?
                .map(|t| Arc::new((key, t))),
        };
        self.cache.insert(
            id.to_string(),
            Cached {
                loaded: Instant::now(),
                entry: entry.clone(),
            },
        );
        Ok(entry)
    }
}

#[async_trait]
impl KeyStore for DbKeyStore {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let (id, secret) = parse_token(token).ok_or(AuthError::Unknown)?;
        if !self.known.load().contains(id) {
            return Err(AuthError::Unknown);
        }
        let entry = self.load(id).await?.ok_or(AuthError::Unknown)?;
        let (key, tenant) = (&entry.0, &entry.1);
        let at = now();
        if !key.secret_matches(secret, at) {
            return Err(AuthError::Unknown);
        }
        if key.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if key.expires_at.is_some_and(|e| e <= at) {
            return Err(AuthError::Expired);
        }
        if key.disabled || tenant.disabled {
            return Err(AuthError::Disabled);
        }
        self.touched.insert(key.id.clone(), at);
        Ok(principal_of(key, tenant))
    }
}

/// What a store key may do: its tenant's models (narrowed by the key's), limits and share.
pub fn principal_of(key: &KeyRecord, tenant: &TenantRecord) -> Principal {
    let mut models = ModelSet::from_list(&tenant.models);
    if let Some(narrow) = &key.models {
        models = models.intersect(&ModelSet::from_list(narrow));
    }
    Principal {
        key_id: Arc::from(key.id.as_str()),
        tenant: Arc::from(tenant.id.as_str()),
        models,
        limits: Arc::new(tenant.effective_limits()),
        key_limits: key.limits.clone().map(Arc::new),
        share: Arc::new(super::Share::from_labels(&tenant.labels)),
    }
}
