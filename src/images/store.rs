//! Where generated images live between generation and download. `local` keeps files under
//! `data_dir/images`; an S3-compatible store implements the same trait for many replicas.

use std::path::PathBuf;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

#[async_trait]
pub trait BlobStore: Send + Sync {
    async fn put(&self, name: &str, bytes: Bytes) -> std::io::Result<()>;
    async fn get(&self, name: &str) -> std::io::Result<Option<Bytes>>;
    /// Deletes objects written before `cutoff`; returns how many.
    async fn delete_older_than(&self, cutoff: SystemTime) -> std::io::Result<usize>;
}

pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(LocalStore { dir })
    }
}

#[async_trait]
impl BlobStore for LocalStore {
    async fn put(&self, name: &str, bytes: Bytes) -> std::io::Result<()> {
        // Write then rename, so a reader never sees half a file.
        // One blocking task for both, handing over the buffer (tokio::fs::write would copy it).
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let dest = self.dir.join(name);
        tokio::task::spawn_blocking(move || {
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, dest)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn get(&self, name: &str) -> std::io::Result<Option<Bytes>> {
        match tokio::fs::read(self.dir.join(name)).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete_older_than(&self, cutoff: SystemTime) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            if meta.is_file()
                && meta.modified().is_ok_and(|m| m < cutoff)
                && tokio::fs::remove_file(entry.path()).await.is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}
