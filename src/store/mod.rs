//! The persistent store: SQLite (one machine, file under data_dir) or PostgreSQL (many
//! replicas), through sqlx's `Any` driver so one set of queries serves both. Migrations run on
//! start; on PostgreSQL sqlx takes an advisory lock, so replicas starting together are safe.

pub mod audit;
pub mod keys;
pub mod redis;

use std::path::{Path, PathBuf};

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use crate::api::{ApiError, ErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Database {
    pub pool: AnyPool,
    pub kind: Kind,
    /// The SQLite file (the usage ledger opens its own connection to it).
    pub sqlite_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
}

/// The admin API's answer to a store error (metering maps its own failures through
/// `metering::MeterError`, with wording of its own).
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                ApiError::new(ErrorKind::NotFound, format!("{what} not found"))
            }
            StoreError::Conflict(what) => ApiError::new(
                ErrorKind::Conflict,
                format!("{what} already exists or conflicts"),
            ),
            StoreError::Invalid(why) => ApiError::new(ErrorKind::InvalidRequest, why),
            other => {
                tracing::error!(error = %other, "key store error");
                ApiError::new(ErrorKind::Unavailable, "The key store is unavailable.")
            }
        }
    }
}

impl Database {
    /// The SQLite file under `data_dir`, created if missing.
    pub async fn sqlite(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Invalid(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("imagegate.db").display()
        );
        Self::connect(&url).await
    }

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            Kind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Kind::Postgres
        } else {
            return Err(StoreError::Invalid(format!(
                "unsupported database URL (sqlite:// or postgres://): {}",
                url.split('@').next_back().unwrap_or("")
            )));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if kind == Kind::Sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == Kind::Sqlite {
                        use sqlx::Executor;
                        conn.execute("PRAGMA journal_mode=WAL").await?;
                        conn.execute("PRAGMA busy_timeout=5000").await?;
                        // WAL + NORMAL: a commit survives the process dying (kill -9); only
                        // a power cut can lose the last commits, and the usage ledger's
                        // journal covers its own rows. Temporary b-trees (the ledger's
                        // batched INSERT ... SELECT) stay in memory.
                        conn.execute("PRAGMA synchronous=NORMAL").await?;
                        conn.execute("PRAGMA temp_store=MEMORY").await?;
                        conn.execute("PRAGMA foreign_keys=ON").await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let db = Database {
            pool,
            kind,
            sqlite_file: (kind == Kind::Sqlite).then(|| sqlite_file(url)).flatten(),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// One set of migrations, in the SQL both databases speak.
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// The change counter every write bumps.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT n FROM store_revision WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}

/// The file of a `sqlite://PATH?options` (or `sqlite:PATH`) URL; none for an in-memory one.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sqlite_urls_name_their_file() {
        use super::sqlite_file;
        use std::path::PathBuf;
        assert_eq!(
            sqlite_file("sqlite:///var/lib/ig/imagegate.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/ig/imagegate.db"))
        );
        assert_eq!(
            sqlite_file("sqlite:data/imagegate.db"),
            Some(PathBuf::from("data/imagegate.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://u@h/db"), None);
    }
}
