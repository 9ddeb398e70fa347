//! The part of a request that costs money, whatever its endpoint ([`run`]): its idempotency
//! record, limits, budget hold, the relay to a backend, and its settlement (a whole answer's
//! before it is sent, a stream's when it ends: [`super::metered`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::handlers::AccessLog;
use super::respond::{self, Body};
use super::state::{AppState, Runtime};
use crate::api::{self, ApiError, ErrorKind, ImagesResponse};
use crate::auth::Principal;
use crate::backends::translate;
use crate::metering::{Begun, Delivered, IdempotencyKey, RequestFacts};
use crate::routing::Output;

/// A validated request's life from here on, whatever its endpoint: its idempotency record,
/// limits, budget, relay and settlement. `idempotency`: the key and what must match on a
/// repeat (the body, or a digest of a form's parts).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    state: &Arc<AppState>,
    rt: &Runtime,
    principal: &Principal,
    route: &crate::routing::ModelRoute,
    request: api::ImageRequest,
    idempotency: Option<(&str, &[u8])>,
    request_id: &str,
    log: &mut AccessLog,
) -> Result<Response<Body>, ApiError> {
    log.operation = Some(request.operation());
    // How long a request may hold a concurrency slot or an idempotency key before another
    // replica may assume it died.
    let lease = route.timeout + Duration::from_secs(30);

    // A repeat of a finished request is answered from its record: no limit, no charge.
    if idempotency.is_some() && request.streaming() {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "Idempotency-Key is not supported with stream=true.",
        )
        .param("Idempotency-Key"));
    }
    let idempotency = idempotency.map(|(key, body)| IdempotencyKey {
        key,
        body,
        lock_for: lease,
        retention: rt.config.state.idempotency_retention,
    });
    let facts = RequestFacts::of(request_id, &request);
    let mut charge = match state.meter.begin(principal, facts, idempotency).await? {
        Begun::Charge(charge) => charge,
        Begun::Replay(answer) => {
            let mut resp =
                respond::with_type(StatusCode::OK, Bytes::from(answer), "application/json");
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(resp);
        }
    };
    // Batch lines are limited apart from the tenant's interactive traffic (`limits.batch`).
    let batch_view;
    let limited = if log.batch.is_some() {
        batch_view = Principal {
            tenant: Arc::from(format!("{}#batch", principal.tenant)),
            limits: Arc::new(
                principal
                    .limits
                    .batch
                    .as_deref()
                    .cloned()
                    .unwrap_or_default(),
            ),
            key_limits: None,
            ..principal.clone()
        };
        &batch_view
    } else {
        principal
    };
    let _permits = rt
        .policy
        .admit_request(limited, request.n, charge.id(), lease, &mut log.rate)
        .await?;
    let reserved = route.prices.estimate(&request, request.n);
    charge.reserve(principal, reserved, lease).await?;
    charge.relayed();

    let relayed = match relay(state, principal, route, &request, request_id, log).await {
        Ok(r) => r,
        Err(e) => {
            // Boxed, as the settlement below: a ledger write's future (~2 KiB) would
            // otherwise set the size of this one, which is held during the upstream wait.
            Box::pin(charge.fail(e.kind.status().as_u16(), log.backend.as_deref())).await;
            return Err(e);
        }
    };
    let (delivered, usage, resp, stored, upstream_price) = match relayed {
        Relayed::Events(events, upstream_price) => {
            // Relayed as the events arrive and charged when the stream ends, for the images
            // that went through (server/metered.rs); the concurrency slots go with it.
            let pricing = super::metered::Pricing {
                prices: route.prices.clone(),
                upstream_price,
                request,
                backend: log.backend.clone(),
                tenant: principal.tenant.clone(),
                route: route.name.clone(),
                images: route.images.clone(),
            };
            let metered = super::metered::Metered::new(events, charge, pricing, _permits);
            let mut resp = respond::with_type(
                StatusCode::OK,
                Body::stream(Box::pin(metered)),
                "text/event-stream",
            );
            resp.headers_mut().insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            );
            return Ok(resp);
        }
        Relayed::Images {
            response,
            usage,
            upstream_price,
        } => {
            let chunks = response.to_chunks();
            let stored = charge
                .has_idempotency_key()
                .then(|| String::from_utf8_lossy(&chunks.concat()).into_owned());
            let resp = respond::with_type(StatusCode::OK, Body::chunks(chunks), "application/json");
            (
                response.data.len() as u32,
                usage,
                resp,
                stored,
                upstream_price,
            )
        }
    };
    let tokens = crate::metering::usage_tokens(usage.as_ref());
    let cost = route.prices.cost(&request, delivered, usage.as_ref());
    let upstream_cost = upstream_price.map_or(0, |p| p.cost(&request, delivered, usage.as_ref()));
    log.cost = Some(cost);
    log.images = delivered;
    log.usage = usage;
    route.images.inc_by(delivered as u64);
    crate::telemetry::metrics().spend(&principal.tenant, &route.name, cost);
    let delivery = Delivered {
        backend: log.backend.as_deref(),
        images: delivered,
        cost,
        upstream_cost,
        tokens,
    };
    // Boxed, as the image delivery in `relay`: neither is held during the upstream wait.
    if !Box::pin(charge.deliver(delivery, stored)).await {
        tracing::error!(
            request_id,
            "usage ledger unavailable: answering without a durable usage record"
        );
    }
    Ok(resp)
}

/// What the upstream gave, ready for the client.
enum Relayed {
    Events(
        crate::backends::EventStream,
        Option<Arc<crate::metering::PriceTable>>,
    ),
    Images {
        response: ImagesResponse,
        usage: Option<serde_json::Value>,
        upstream_price: Option<Arc<crate::metering::PriceTable>>,
    },
}

/// Route -> backend -> images: the part of a request that costs money.
async fn relay(
    state: &Arc<AppState>,
    principal: &Principal,
    route: &crate::routing::ModelRoute,
    request: &api::ImageRequest,
    request_id: &str,
    log: &mut AccessLog,
) -> Result<Relayed, ApiError> {
    let deadline = Instant::now() + route.timeout;
    let caller = crate::routing::Caller {
        tenant: principal.tenant.clone(),
        weight: principal.share.weight,
        class: if log.batch.is_some() {
            crate::routing::Class::Batch
        } else {
            crate::routing::Class::Interactive
        },
        max_share: principal.share.max_share,
    };
    let dispatch = route
        .dispatch(
            request,
            &caller,
            &principal.share.labels,
            request_id,
            deadline,
            request.streaming(),
        )
        .await;
    log.backend = dispatch.backend;
    log.attempts = dispatch.attempts;
    log.upstream_time = dispatch.upstream_time;
    let generation = match dispatch.result? {
        Output::Images(generation) => generation,
        Output::Events(events) => {
            // Server-sent events, relayed as they arrive; the client going away drops the
            // stream and with it the upstream connection.
            return Ok(Relayed::Events(events, dispatch.upstream_price));
        }
    };
    let url_policy = dispatch
        .url_policy
        .ok_or_else(|| ApiError::internal("no image URL policy for the answering backend"))?;

    let gpt_fields = translate::answer_fields(request, generation.meta.as_ref());
    let usage = generation.meta.as_ref().and_then(|m| m.usage.clone());
    let fallback_revised = route
        .rules
        .revised_prompt
        .then_some(request.prompt.as_str());
    let data = Box::pin(state.images.deliver(
        generation,
        request.response_format,
        fallback_revised,
        &url_policy,
        deadline,
    ))
    .await?;
    Ok(Relayed::Images {
        response: ImagesResponse {
            created: crate::clock::now_unix(),
            data,
            gpt: gpt_fields,
        },
        usage,
        upstream_price: dispatch.upstream_price,
    })
}
