//! Runs batch lines on whatever capacity interactive traffic leaves: each replica claims a few
//! lines at a time under a lease, runs each through the same pipeline as an interactive
//! request (limits, budget hold, routing, ledger) in the batch class of the backend queues,
//! under the `Idempotency-Key` `batch:{batch}:{custom_id}` (so a line a dead replica had run
//! is a replay, never a second charge), and records its output line once. Batches whose lines
//! have all ended are finalized into output and error files by exactly one replica.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use super::batches::{principal_from, Batches};
use super::handlers::AccessLog;
use super::pipeline::run as run_request;
use super::state::AppState;
use crate::api::{self, ApiError};
use crate::batch::{self, Claimed, FileObject, LineResult};

/// Lines one replica runs at once.
const CONCURRENCY: usize = 8;
/// How often an idle runner looks for work.
const IDLE_POLL: Duration = Duration::from_millis(250);

pub async fn run(state: Arc<AppState>) {
    let Some(b) = state.batches.clone() else {
        return;
    };
    let owner = batch::new_id("runner_");
    if let Err(e) = b.store.release_all_leases().await {
        tracing::warn!(error = %e, "cannot release the batch leases of a previous run");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut last_housekeeping = std::time::Instant::now()
        .checked_sub(IDLE_POLL)
        .unwrap_or_else(std::time::Instant::now);
    loop {
        if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let now = crate::clock::now_unix() as i64;
        if last_housekeeping.elapsed() >= IDLE_POLL {
            last_housekeeping = std::time::Instant::now();
            if let Err(e) = housekeeping(&state, &b, now).await {
                tracing::warn!(error = %e, "batch housekeeping failed");
            }
        }
        if slots.available_permits() == 0 {
            // Every slot busy: wake when a line ends, not after a fixed sleep.
            match slots.clone().acquire_owned().await {
                Ok(permit) => drop(permit),
                Err(_) => return,
            }
        }
        let free = slots.available_permits();
        let claimed = if free == 0 {
            Vec::new()
        } else {
            // A lease outlives the longest model timeout, so a live runner keeps its lines.
            let lease = state
                .runtime
                .load()
                .config
                .models
                .values()
                .map(|m| m.timeout.as_secs() as i64)
                .max()
                .unwrap_or(120)
                + 10;
            b.store
                .claim(&owner, now, lease, free as i64)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot claim batch lines");
                    Vec::new()
                })
        };
        if claimed.is_empty() {
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        for line in claimed {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (state, b, owner) = (state.clone(), b.clone(), owner.clone());
            tokio::spawn(async move {
                let Some(result) = run_line(&state, &line).await else {
                    // Its key is held by a run that died with its replica: try again once
                    // that run's lock has lapsed.
                    let retry_at = crate::clock::now_unix() as i64 + 5;
                    if let Err(e) = b.store.release(&line, &owner, retry_at).await {
                        tracing::warn!(error = %e, "cannot release a batch line");
                    }
                    drop(permit);
                    return;
                };
                match b.store.finish(&line, &owner, &result).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(batch = %line.batch_id, line = line.line, "batch line's lease had passed to another runner")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, batch = %line.batch_id, "cannot record a batch line")
                    }
                }
                drop(permit);
            });
        }
    }
}

/// Expires batches past their window, finalizes those whose lines have all ended, and sends
/// the webhook deliveries that are due.
async fn housekeeping(
    state: &Arc<AppState>,
    b: &Arc<Batches>,
    now: i64,
) -> Result<(), crate::store::StoreError> {
    b.store.expire(now).await?;
    for (id, end) in b.store.to_finalize(now).await? {
        finalize(b, &id, end, now).await?;
    }
    let allow_private = state.runtime.load().config.webhooks.allow_private_hosts;
    for d in b.webhooks.due(now, 60, 16).await? {
        let b = b.clone();
        tokio::spawn(async move {
            let (ok, error) = deliver(&d, allow_private).await;
            let now = crate::clock::now_unix() as i64;
            if let Err(e) = b.webhooks.attempted(&d, ok, error.as_deref(), now).await {
                tracing::warn!(error = %e, "cannot record a webhook delivery");
            }
        });
    }
    Ok(())
}

/// One attempt at a webhook delivery, signed as Standard Webhooks.
async fn deliver(d: &crate::batch::webhooks::Due, allow_private: bool) -> (bool, Option<String>) {
    let client = match crate::images::outbound_client(allow_private, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => return (false, Some(e.to_string())),
    };
    let id = serde_json::from_str::<Value>(&d.payload)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| d.id.clone());
    let ts = crate::clock::now_unix() as i64;
    let signature = crate::batch::webhooks::sign(&d.secret, &id, ts, &d.payload);
    let sent = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(d.payload.clone())
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => (true, None),
        Ok(r) => (false, Some(format!("HTTP {}", r.status().as_u16()))),
        Err(e) => (false, Some(e.without_url().to_string())),
    }
}

/// Writes the output file (2xx answers) and the error file (the rest: refused lines, and
/// lines cancelled or expired before they ran), then closes the batch.
async fn finalize(
    b: &Batches,
    id: &str,
    end: &str,
    now: i64,
) -> Result<(), crate::store::StoreError> {
    let Some(tenant) = b.store.tenant_of(id).await? else {
        return Ok(());
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for (custom_id, state, status, result) in b.store.lines(id).await? {
        match (state.as_str(), status, result) {
            ("done", Some(s), Some(line)) if (200..300).contains(&s) => out.push(line),
            ("done", _, Some(line)) => err.push(line),
            (other, _, _) => {
                let code = if other == "expired" {
                    "batch_expired"
                } else {
                    "batch_cancelled"
                };
                err.push(
                    json!({"id": batch::new_id("batch_req_"), "custom_id": custom_id, "response": null,
                           "error": {"code": code, "message": format!("This line was not run: the batch was {}.", if other == "expired" { "expired" } else { "cancelled" })}})
                    .to_string(),
                );
            }
        }
    }
    let output = write_file(b, &tenant, out, format!("{id}_output.jsonl"), now).await?;
    let errors = write_file(b, &tenant, err, format!("{id}_error.jsonl"), now).await?;
    b.store
        .close(id, end, now, output.as_deref(), errors.as_deref())
        .await?;
    b.webhooks
        .enqueue(&tenant, &super::batches::event(end, id, now), now)
        .await?;
    crate::telemetry::metrics().batch_finished(end);
    tracing::info!(batch = %id, status = end, "batch finalized");
    Ok(())
}

/// A batch output file of `lines` (none: no file).
async fn write_file(
    b: &Batches,
    tenant: &str,
    lines: Vec<String>,
    filename: String,
    now: i64,
) -> Result<Option<String>, crate::store::StoreError> {
    if lines.is_empty() {
        return Ok(None);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    let f = FileObject {
        id: batch::new_id("file-"),
        object: "file",
        bytes: text.len() as i64,
        created_at: now,
        filename,
        purpose: "batch_output".into(),
        status: "processed",
    };
    b.files
        .put(&batch::blob_name(&f.id), Bytes::from(text))
        .await
        .map_err(|e| {
            crate::store::StoreError::Invalid(format!("cannot store a batch file: {e}"))
        })?;
    b.store.insert_file(tenant, &f).await?;
    Ok(Some(f.id))
}

/// One line through the interactive pipeline; its output line whatever happens, or `None`
/// when an earlier run still holds the line's key (it is tried again later).
async fn run_line(state: &Arc<AppState>, c: &Claimed) -> Option<LineResult> {
    let request_id = format!("req_{}", hex::encode(rand::random::<[u8; 12]>()));
    let started = std::time::Instant::now();
    let mut log = AccessLog {
        batch: Some(c.batch_id.clone()),
        ..AccessLog::default()
    };
    let answer = execute(state, c, &request_id, &mut log).await;
    let (status, body) = match answer {
        Err(e) if e.code.as_deref() == Some("idempotency_key_in_use") => return None,
        Ok((status, body)) => (status, body),
        Err(e) => (
            e.status().as_u16(),
            serde_json::from_slice(&e.to_json()).unwrap_or(Value::Null),
        ),
    };
    crate::telemetry::metrics().batch_line(if (200..300).contains(&status) {
        "completed"
    } else {
        "failed"
    });
    tracing::info!(
        target: "imagegate::access",
        request_id = %request_id,
        method = "POST",
        path = "/v1/images/generations",
        status,
        latency_ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0,
        batch = %c.batch_id,
        custom_id = %c.custom_id,
        "batch line"
    );
    Some(LineResult {
        status_code: Some(status),
        output: json!({
            "id": batch::new_id("batch_req_"),
            "custom_id": c.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": null,
        })
        .to_string(),
    })
}

async fn execute(
    state: &Arc<AppState>,
    c: &Claimed,
    request_id: &str,
    log: &mut AccessLog,
) -> Result<(u16, Value), ApiError> {
    let principal = principal_from(&c.principal)
        .ok_or_else(|| ApiError::internal("the batch's key record is unreadable"))?;
    let rt = state.runtime.load_full();
    let raw = api::parse_request(c.body.as_bytes())?;
    let model = raw.model().to_string();
    let route = super::handlers::model_route(&rt, &principal, &model, log)?;
    let request = raw.validate(&route.rules)?;
    let key = format!("batch:{}:{}", c.batch_id, c.custom_id);
    let resp = run_request(
        state,
        &rt,
        &principal,
        route,
        request,
        Some((&key, c.body.as_bytes())),
        request_id,
        log,
    )
    .await?;
    let status = resp.status().as_u16();
    Ok((status, super::respond::json_of(resp).await))
}
