//! What the request path reads: a snapshot of the compiled config (swapped atomically, so a
//! request finishes on the config it started with) and the long-lived services.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::auth::{KeyStore, StaticKeyStore};
use crate::config::{Config, StoreKind};
use crate::images::{BlobStore, ImageService, LocalStore, S3Store, UrlSigner};
use crate::policy::Policy;
use crate::routing::Router;

/// One config generation, compiled.
pub struct Runtime {
    pub config: Config,
    pub router: Router,
    pub policy: Policy,
    pub keys: Arc<dyn KeyStore>,
    /// Unix time of this generation, shown as `created` in `/v1/models`.
    pub created: u64,
}

impl Runtime {
    pub fn build(config: Config, http: &reqwest::Client) -> anyhow::Result<Self> {
        let router = Router::from_config(&config, http).map_err(anyhow::Error::msg)?;
        Ok(Runtime {
            router,
            policy: Policy::from_config(&config),
            keys: Arc::new(StaticKeyStore::from_config(&config)),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            config,
        })
    }
}

pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub images: ImageService,
    pub http: reqwest::Client,
    /// Set on SIGTERM: `/readyz` turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
}

impl AppState {
    pub fn build(config: Config) -> anyhow::Result<Arc<Self>> {
        let http = crate::backends::http_client()?;
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
        let runtime = Runtime::build(config, &http)?;
        Ok(Arc::new(AppState {
            runtime: ArcSwap::from_pointee(runtime),
            images,
            http,
            draining: AtomicBool::new(false),
        }))
    }
}
