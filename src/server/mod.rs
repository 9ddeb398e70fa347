//! The HTTP server: accept loop, per-connection hyper service, graceful drain.

mod handlers;
mod respond;
mod state;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use state::{AppState, Runtime};

/// Serves on `listener` until `shutdown` resolves, then stops accepting and waits up to
/// `server.shutdown_timeout` for requests in flight.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (header_timeout, drain_timeout) = {
        let rt = state.runtime.load();
        (
            rt.config.server.header_timeout,
            rt.config.server.shutdown_timeout,
        )
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let sweeper = tokio::spawn(sweep_images(state.clone()));
    let probes: Vec<_> = state
        .runtime
        .load()
        .router
        .probes()
        .into_iter()
        .map(|(backend, health, every)| tokio::spawn(probe(backend, health, every)))
        .collect();
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, _peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| handlers::handle(state.clone(), req));
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }

    state.draining.store(true, Ordering::SeqCst);
    drop(listener);
    sweeper.abort();
    for p in probes {
        p.abort();
    }
    tracing::info!(timeout = ?drain_timeout, "shutting down: draining requests in flight");
    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained; bye"),
        Err(_) => tracing::warn!("drain deadline passed with requests still in flight"),
    }
    Ok(())
}

/// Runs a backend's active health probe on its interval.
async fn probe(
    backend: Arc<dyn crate::backends::Backend>,
    health: Arc<crate::routing::health::BackendHealth>,
    every: Duration,
) {
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

/// Deletes expired hosted images in the background.
async fn sweep_images(state: Arc<AppState>) {
    let every = (state.images.ttl() / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.images.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "swept expired images"),
            Err(e) => tracing::warn!(error = %e, "image sweep failed"),
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            () = term => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
