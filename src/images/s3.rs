//! The `s3` image store: any S3-compatible service through `object_store`, so that every
//! replica can serve every link.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use super::store::BlobStore;
use crate::config::S3Config;

pub struct S3Store {
    store: AmazonS3,
    prefix: String,
}

fn io(e: object_store::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl S3Store {
    pub fn new(c: &S3Config) -> Result<Self, object_store::Error> {
        // A request waits on the store while it is answered: a few quick retries, never
        // object_store's default of ten over three minutes.
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(5),
        };
        let options = object_store::ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(30));
        let mut b = AmazonS3Builder::new()
            .with_retry(retry)
            .with_client_options(options)
            .with_bucket_name(&c.bucket)
            .with_region(&c.region)
            .with_virtual_hosted_style_request(!c.path_style);
        if let Some(endpoint) = &c.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        match (&c.access_key_id, &c.secret_access_key) {
            (Some(id), Some(secret)) => {
                b = b
                    .with_access_key_id(id.expose())
                    .with_secret_access_key(secret.expose());
            }
            _ => b = b.with_skip_signature(c.endpoint.is_some() && c.access_key_id.is_none()),
        }
        Ok(S3Store {
            store: b.build()?,
            prefix: c.prefix.clone(),
        })
    }

    fn path(&self, name: &str) -> Path {
        Path::from(format!("{}{name}", self.prefix))
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn put(&self, name: &str, bytes: Bytes) -> std::io::Result<()> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(io)
    }

    async fn get(&self, name: &str) -> std::io::Result<Option<Bytes>> {
        match self.store.get(&self.path(name)).await {
            Ok(r) => r.bytes().await.map(Some).map_err(io),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn delete_older_than(&self, cutoff: SystemTime) -> std::io::Result<usize> {
        let cutoff = crate::clock::unix(cutoff) as i64;
        let prefix = Path::from(self.prefix.trim_end_matches('/'));
        let mut listing = self.store.list(Some(&prefix));
        let mut removed = 0;
        // Batch files live beside the images, under `{prefix}batch-files/`: never swept.
        let keep = Path::from(format!("{}batch-files", self.prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(io)?;
            if meta.location.prefix_matches(&keep) {
                continue;
            }
            if meta.last_modified.timestamp() < cutoff
                && self.store.delete(&meta.location).await.is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}
