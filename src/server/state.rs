//! What the request path reads: a snapshot of the compiled config (swapped atomically, so a
//! request finishes on the config it started with) and the long-lived services.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::backends::Backend;
use crate::routing::health::BackendHealth;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::compile::{compile, Compiled};
use crate::auth::{DbKeyStore, KeyStores};
use crate::config::{Config, StoreKind};
use crate::images::{BlobStore, ImageService, LocalStore, S3Store, UrlSigner};
use crate::policy::Policy;
use crate::routing::Router;

/// One config generation, compiled.
pub struct Runtime {
    pub config: Config,
    pub router: Router,
    /// Limiter state outlives reloads (a reload must not hand out a fresh minute).
    pub policy: Arc<Policy>,
    pub keys: Arc<KeyStores>,
    /// Unix time of this generation, shown as `created` in `/v1/models`.
    pub created: u64,
}

impl Runtime {
    /// A generation from its config and what the compile step built from it.
    fn new(
        config: Config,
        compiled: Compiled,
        db_keys: Option<Arc<DbKeyStore>>,
        policy: Arc<Policy>,
    ) -> Self {
        Runtime {
            router: compiled.router,
            policy,
            keys: Arc::new(KeyStores {
                config: compiled.keys,
                db: db_keys,
                jwt: compiled.jwt,
                tenants: config.tenants.clone(),
            }),
            created: crate::clock::now_unix(),
            config,
        }
    }
}

pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub images: ImageService,
    pub http: crate::backends::HttpClient,
    /// Set on SIGTERM: `/readyz` turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// Where the config came from, for reloads (`None`: built in memory, no reload).
    pub config_path: Option<PathBuf>,
    /// The main listener's TLS, swapped on reload (renewed certificates).
    pub tls: ArcSwapOption<tokio_rustls::TlsAcceptor>,
    /// Tenants and `sk-ig-` keys in SQLite/PostgreSQL (kept across reloads).
    pub db_keys: Option<Arc<DbKeyStore>>,
    /// The Batch API's store and files (`None` without a database).
    pub batches: Option<Arc<super::batches::Batches>>,
    /// The admin listener's TLS, swapped on reload too.
    pub admin_tls: ArcSwapOption<tokio_rustls::TlsAcceptor>,
    /// Budgets, the usage ledger and idempotency records.
    pub meter: Arc<crate::metering::Meter>,
    /// Bytes of uploads held at once.
    pub uploads: super::uploads::UploadGate,
    /// The console's sessions, login limiter and audit.
    pub console: super::console::Console,
    /// When and from what the running config was loaded, and the last reload refused.
    pub config_log: Mutex<ConfigLog>,
    probes: Mutex<Vec<JoinHandle<()>>>,
}

/// The running config's origin, for the console.
#[derive(Debug, Clone, Default)]
pub struct ConfigLog {
    /// The file's text as loaded (`None`: built in memory).
    pub source: Option<Arc<str>>,
    pub loaded_at: u64,
    /// When a reload was refused, and why.
    pub rejected: Option<(u64, String)>,
}

impl AppState {
    pub async fn build(config: Config) -> anyhow::Result<Arc<Self>> {
        Self::build_from(config, None).await
    }

    /// As [`AppState::build`], remembering the file the config came from for reloads.
    pub async fn build_from(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> anyhow::Result<Arc<Self>> {
        let http = crate::backends::HttpClient::new()?;
        // Everything the config describes, built once; an invalid config stops here, before
        // any file, database or socket is touched.
        let compiled = compile(&config, &http, None)?;
        let signer = UrlSigner::load_or_create(
            config.images.signing_key.as_ref().map(|k| k.expose()),
            &config.data_dir,
        )
        .map_err(|e| anyhow::anyhow!("images: cannot load the URL signing key: {e}"))?;
        let store: Arc<dyn BlobStore> =
            match (&config.images.store, &config.images.s3) {
                (StoreKind::S3, Some(s3)) => {
                    Arc::new(S3Store::new(s3).map_err(|e| anyhow::anyhow!("images.s3: {e}"))?)
                }
                _ => {
                    let dir = config.data_dir.join("images");
                    Arc::new(LocalStore::new(dir.clone()).map_err(|e| {
                        anyhow::anyhow!("images: cannot create {}: {e}", dir.display())
                    })?)
                }
            };
        let images = ImageService::new(store, signer, config.public_base(), config.images.url_ttl)?;
        let db = open_store(&config).await?;
        let batches = match &db {
            Some(db) => {
                let files: Arc<dyn BlobStore> = match (&config.images.store, &config.images.s3) {
                    (StoreKind::S3, Some(s3)) => {
                        let mut c = s3.clone();
                        c.prefix = format!("{}batch-files/", s3.prefix);
                        Arc::new(S3Store::new(&c).map_err(|e| anyhow::anyhow!("images.s3: {e}"))?)
                    }
                    _ => {
                        let dir = config.data_dir.join("files");
                        Arc::new(LocalStore::new(dir.clone()).map_err(|e| {
                            anyhow::anyhow!("batch files: cannot create {}: {e}", dir.display())
                        })?)
                    }
                };
                Some(Arc::new(super::batches::Batches {
                    store: crate::batch::BatchStore::new(db.clone()),
                    files,
                    webhooks: crate::batch::webhooks::WebhookStore::new(db.clone()),
                }))
            }
            None => None,
        };
        let db_keys = match &db {
            Some(db) => Some(DbKeyStore::new(db.clone(), config.state.key_cache_ttl).await?),
            None => None,
        };
        let redis = match &config.state.redis {
            Some(r) => Some(crate::store::redis::Redis::new(r).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let meter = crate::metering::Meter::new(
            db,
            config.state.idempotency_retention,
            &config.data_dir,
            redis.clone(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("usage ledger: {e}"))?;
        let policy = Arc::new(Policy::with_redis(
            redis.map(crate::policy::RedisLimiter::new),
        ));
        let (tls, admin_tls) = (compiled.tls.clone(), compiled.admin_tls.clone());
        let console = super::console::Console::new(images.signer(), &config.console);
        let config_log = ConfigLog {
            source: config_path
                .as_deref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(Arc::from),
            loaded_at: crate::clock::now_unix(),
            rejected: None,
        };
        let runtime = Runtime::new(config, compiled, db_keys.clone(), policy);
        Ok(Arc::new(AppState {
            console,
            config_log: Mutex::new(config_log),
            batches,
            db_keys,
            meter,
            tls: ArcSwapOption::new(tls),
            admin_tls: ArcSwapOption::new(admin_tls),
            runtime: ArcSwap::from_pointee(runtime),
            images,
            http,
            draining: AtomicBool::new(false),
            config_path,
            probes: Mutex::new(Vec::new()),
            uploads: Default::default(),
        }))
    }

    /// Re-reads the config file, validates it and swaps it in atomically: requests in flight
    /// keep the snapshot they started with. An invalid file changes nothing.
    pub fn reload(&self) -> Result<(), String> {
        let result = self.reload_file();
        let mut log = self.config_log.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(text) => {
                log.source = Some(Arc::from(text.as_str()));
                log.loaded_at = crate::clock::now_unix();
            }
            Err(why) => log.rejected = Some((crate::clock::now_unix(), why.clone())),
        }
        result.map(|_| ())
    }

    /// [`AppState::reload`]'s work: the text of the file now serving, or why it was refused.
    fn reload_file(&self) -> Result<String, String> {
        let Some(path) = &self.config_path else {
            return Err("this gateway was not started from a config file".into());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config = Config::from_yaml(&text, &|name| std::env::var(name).ok())
            .map_err(|e| e.to_string())?;
        let old = self.runtime.load_full();
        let fixed = [
            ("listen", config.listen != old.config.listen),
            (
                "public_url",
                config.public_base() != old.config.public_base(),
            ),
            ("data_dir", config.data_dir != old.config.data_dir),
            ("images", config.images != old.config.images),
            ("server", config.server != old.config.server),
        ];
        for (key, changed) in fixed {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the config file; takes effect at the next restart"
                );
            }
        }
        if config.state != old.config.state {
            tracing::warn!(
                key = "state",
                "changed in the config file; takes effect at the next restart"
            );
        }
        let compiled =
            compile(&config, &self.http, Some(&old.router)).map_err(|e| e.to_string())?;
        let (tls, admin_tls) = (compiled.tls.clone(), compiled.admin_tls.clone());
        let runtime = Runtime::new(config, compiled, self.db_keys.clone(), old.policy.clone());
        self.tls.store(tls);
        self.admin_tls.store(admin_tls);
        crate::telemetry::metrics().set_tenant_label(runtime.config.metrics.tenant_label);
        self.runtime.store(Arc::new(runtime));
        self.restart_probes();
        Ok(text)
    }

    /// (Re)starts the active health probes of the current config's backends.
    pub fn restart_probes(&self) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        for p in probes.drain(..) {
            p.abort();
        }
        for (backend, health, every) in self.runtime.load().router.probes() {
            probes.push(tokio::spawn(probe(backend, health, every)));
        }
    }

    pub fn stop_probes(&self) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        for p in probes.drain(..) {
            p.abort();
        }
    }
}

/// The configured database, connected and migrated (`None`: only gateway.yaml's keys).
pub async fn open_store(config: &Config) -> anyhow::Result<Option<crate::store::Database>> {
    use crate::config::StoreChoice;
    let db = match (config.state.store, &config.state.postgres) {
        (StoreChoice::None, _) => return Ok(None),
        (StoreChoice::Sqlite, _) => crate::store::Database::sqlite(&config.data_dir).await,
        (StoreChoice::Postgres, Some(url)) => crate::store::Database::connect(url.expose()).await,
        (StoreChoice::Postgres, None) => anyhow::bail!("state.postgres: no database URL"),
    };
    Ok(Some(db.map_err(|e| anyhow::anyhow!("state: {e}"))?))
}

/// Runs a backend's active health probe on its interval.
async fn probe(backend: Arc<dyn Backend>, health: Arc<BackendHealth>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = backend.probe().await;
        if let Err(e) = &result {
            tracing::debug!(backend = %health.name, error = %e, "probe failed");
        }
        health.set_probe(result.is_ok());
    }
}
