//! The Redis connection shared by everything kept across replicas (rate and concurrency limits
//! in `policy`, budgets in `metering`), and its failure policy: made on first use, remade after
//! a failure, at most one attempt a second, and a rate-limited warning that says what the
//! gateway does while Redis is away.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::api::{ApiError, ErrorKind};
use crate::config::{RedisConfig, RedisFailure};

pub struct Redis {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    /// No new attempt before this (Unix ms) after a failed one.
    retry_at: AtomicU64,
    prefix: String,
    timeout: Duration,
    pub on_failure: RedisFailure,
    last_warned: AtomicU64,
}

/// Redis could not answer; the text says why (never a secret: URLs are not in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Redis unavailable: {0}")]
pub struct RedisUnavailable(pub String);

impl From<RedisUnavailable> for ApiError {
    fn from(_: RedisUnavailable) -> Self {
        ApiError::new(
            ErrorKind::Unavailable,
            "The shared limits and budgets store is unavailable; please retry.",
        )
        .retry_after(Duration::from_secs(1))
    }
}

impl Redis {
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Self>, String> {
        let client =
            redis::Client::open(cfg.url.expose()).map_err(|e| format!("state.redis.url: {e}"))?;
        Ok(Arc::new(Redis {
            client,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            retry_at: AtomicU64::new(0),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            on_failure: cfg.on_failure,
            last_warned: AtomicU64::new(0),
        }))
    }

    /// The prefix of every key the gateway writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How long one command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The connection, made on first use (the gateway starts while Redis is down and follows
    /// its failure policy until Redis is back).
    pub async fn connection(&self) -> Result<ConnectionManager, String> {
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let now = crate::clock::now_ms() as u64;
        if now < self.retry_at.load(Ordering::Acquire) {
            return Err("not connected (retrying shortly)".into());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        if !matches!(made, Ok(Ok(_))) {
            self.retry_at
                .store(crate::clock::now_ms() as u64 + 1000, Ordering::Release);
        }
        match made {
            Ok(Ok(c)) => {
                tracing::info!("connected to Redis: limits are shared by every replica");
                self.conn.store(Some(Arc::new(c.clone())));
                Ok(c)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out connecting".into()),
        }
    }

    /// Runs a Lua script (EVALSHA, loading it when Redis does not know it yet) within the
    /// configured timeout; the error says why Redis could not answer.
    pub async fn eval(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[String],
    ) -> Result<Vec<i64>, String> {
        let mut conn = self.connection().await?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(a.as_str());
        }
        match tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Says (at most every 10 s) that Redis is unreachable and what the gateway does instead.
    pub fn warn(&self, why: &str) {
        crate::telemetry::metrics().redis_failure();
        let now = crate::clock::now_unix();
        let last = self.last_warned.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            match self.on_failure {
                RedisFailure::Open => tracing::warn!(
                    error = %why,
                    "Redis unreachable: rate limits fail open (each replica applies them in process); budgets held in Redis are refused until it is back"
                ),
                RedisFailure::Closed => tracing::error!(
                    error = %why,
                    "Redis unreachable: failing closed, requests are refused with 503"
                ),
            }
        }
        // A broken connection is remade at the next check.
        if !why.starts_with("not connected") && !why.contains("timed out") {
            self.conn.store(None);
        }
    }
}
