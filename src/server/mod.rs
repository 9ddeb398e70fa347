//! The HTTP server: accept loop, per-connection hyper service, graceful drain.

mod admin;
mod batch_runner;
pub mod batches;
pub mod compile;
mod conn;
mod console;
mod handlers;
mod metered;
pub mod models;
mod pipeline;
mod respond;
mod state;
pub mod tls;
pub(crate) mod uploads;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use compile::{check, compile, Compiled};
pub use conn::raise_open_file_limit;
pub use state::{open_store, AppState, Runtime};

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
    let http = Arc::new(conn::Http::new(&state.runtime.load().config.server));
    let graceful = GracefulShutdown::new();
    // Tells connections still waiting for their first byte that the gateway is stopping.
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(sweep_images(state.clone()));
    let trimmer = tokio::spawn(trim_allocator());
    crate::telemetry::metrics().set_tenant_label(state.runtime.load().config.metrics.tenant_label);
    state.restart_probes();
    let reloader = tokio::spawn(watch_config(state.clone()));
    let batch_runner = tokio::spawn(batch_runner::run(state.clone()));
    let key_watch = state.db_keys.clone().map(|k| tokio::spawn(k.watch()));
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = {
            let state = state.clone();
            // Boxed: the request's future is several KiB, and hyper would otherwise copy it
            // whole into its dispatcher. So is the request's head (~250 bytes), which each
            // layer of that future would otherwise hold a slot for until the answer, long
            // after the body is read; and the portal's future, so that it never sets the size
            // of a generation's (bench/README.md, "Memory per request in flight").
            service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let state = state.clone();
                let req = Box::new(req);
                Box::pin(async move {
                    if req.uri().path().starts_with("/portal") {
                        return Ok(Box::pin(console::portal(&state, *req, peer.ip())).await);
                    }
                    handlers::handle(state, req).await
                })
            })
        };
        let http = http.clone();
        let watcher = graceful.watcher();
        match state.tls.load_full() {
            None => {
                let stop_rx = stop_rx.clone();
                tokio::spawn(async move {
                    http.serve_tcp(stream, service, Some(watcher), Some(stop_rx))
                        .await
                });
            }
            Some(acceptor) => {
                // The handshake runs in the connection's own task, never in the accept loop.
                let timeout = header_timeout;
                let mut stop_rx = stop_rx.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
                    // A handshake still pending when the gateway stops does not hold the drain.
                    let tls = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        },
                        _ = stop_rx.wait_for(|stop| *stop) => return,
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    http.serve(TokioIo::new(tls), h2, service, Some(watcher))
                        .await;
                });
            }
        }
    }

    state.draining.store(true, Ordering::SeqCst);
    let _ = stopping.send(true);
    drop(listener);
    sweeper.abort();
    trimmer.abort();
    reloader.abort();
    batch_runner.abort();
    if let Some(w) = key_watch {
        w.abort();
    }
    if let Some(keys) = &state.db_keys {
        let _ = keys.flush_last_used().await;
    }
    state.stop_probes();
    tracing::info!(timeout = ?drain_timeout, "shutting down: draining requests in flight");
    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained; bye"),
        Err(_) => tracing::warn!("drain deadline passed with requests still in flight"),
    }
    state.meter.flush().await;
    Ok(())
}

/// Reloads the config on SIGHUP and when the file, or a catalog file it lists, changes on disk
/// (checked every `server.reload_poll`; 0 turns the file check off).
async fn watch_config(state: Arc<AppState>) {
    let Some(path) = state.config_path.clone() else {
        return;
    };
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    // The config file and the catalog files of the config now serving.
    let stamps = || {
        let rt = state.runtime.load();
        std::iter::once(path.as_path())
            .chain(rt.config.catalog_files.iter().map(|p| p.as_path()))
            .map(stamp)
            .collect::<Vec<_>>()
    };
    let poll = state.runtime.load().config.server.reload_poll;
    let mut last = stamps();
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let by_signal = async {
            #[cfg(unix)]
            if let Some(h) = hup.as_mut() {
                h.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let by_poll = async {
            if poll.is_zero() {
                std::future::pending::<()>().await
            }
            tokio::time::sleep(poll).await
        };
        let reason = tokio::select! {
            () = by_signal => "SIGHUP",
            () = by_poll => {
                let now = stamps();
                if now == last {
                    continue;
                }
                "file changed"
            }
        };
        // Stamped before reading, so a change made meanwhile is seen at the next poll (a reload
        // that changes the list of catalog files reloads once more, harmlessly).
        last = stamps();
        match state.reload() {
            Ok(()) => {
                crate::telemetry::metrics().config_reload(true);
                tracing::info!(reason, path = %path.display(), "config reloaded");
            }
            Err(e) => {
                crate::telemetry::metrics().config_reload(false);
                tracing::error!(reason, path = %path.display(), error = %e, "config reload rejected; the old config keeps serving");
            }
        }
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

/// The admin listener: `GET /metrics` (Prometheus text format) and `GET /healthz`.
pub async fn serve_admin(state: Arc<AppState>, listener: TcpListener) -> std::io::Result<()> {
    let http = Arc::new(conn::Http::new(&state.runtime.load().config.server));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin_state = state.clone();
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let state = admin_state.clone();
            async move {
                if req.uri().path().starts_with("/admin/") {
                    return Ok::<_, std::convert::Infallible>(admin::handle(&state, req).await);
                }
                if req.uri().path().starts_with("/console") {
                    return Ok(console::ops(&state, req, peer.ip()).await);
                }
                let resp = match (req.method(), req.uri().path()) {
                    (&hyper::Method::GET, "/metrics") => respond::with_type(
                        hyper::StatusCode::OK,
                        bytes::Bytes::from(crate::telemetry::metrics().encode()),
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    (&hyper::Method::GET, "/healthz") => {
                        respond::json(hyper::StatusCode::OK, &serde_json::json!({"status": "ok"}))
                    }
                    (method, path) => respond::error(&crate::api::ApiError::new(
                        crate::api::ErrorKind::NotFound,
                        format!("Invalid URL ({method} {path})"),
                    )),
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let http = http.clone();
        let tls = state.admin_tls.load_full();
        tokio::spawn(async move {
            match tls {
                None => http.serve_tcp(stream, service, None, None).await,
                Some(acceptor) => {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                    {
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        http.serve(TokioIo::new(tls), h2, service, None).await;
                    }
                }
            }
        });
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

/// Gives glibc's free memory back to the OS every two seconds. Rust code allocates from
/// mimalloc, which does this itself; what still comes from glibc's heap is C code's (SQLite's
/// page cache and statements), which glibc would keep at its peak.
async fn trim_allocator() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory; it takes the allocator's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
