//! A request's charge: opened by [`Meter::begin`](super::Meter::begin), reserved before the
//! request is relayed, and ended exactly once, by [`Charge::deliver`], [`Charge::fail`] or,
//! when the request is dropped (the client went away), by `Drop`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ledger::{IdemOutcome, Settlement, UsageRow};
use super::{Hold, Meter};
use crate::api::{ApiError, ImageRequest, Operation, Quality, Size};
use crate::auth::Principal;

/// What metering keeps of a request: its identity and what was asked for.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub request_id: &'a str,
    pub model: &'a str,
    pub size: Size,
    pub quality: Option<Quality>,
    /// Images asked for.
    pub n: u32,
    pub operation: Operation,
}

impl<'a> RequestFacts<'a> {
    pub fn of(request_id: &'a str, request: &'a ImageRequest) -> Self {
        RequestFacts {
            request_id,
            model: &request.model,
            size: request.size,
            quality: request.quality,
            n: request.n,
            operation: request.operation(),
        }
    }
}

/// A request's `Idempotency-Key`, with what its record needs.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyKey<'a> {
    /// The header's checked value ([`super::idempotency::check_key`]).
    pub key: &'a str,
    /// The request body: a repeat must carry the same one.
    pub body: &'a [u8],
    /// How long the first request may run before a repeat may take the key over.
    pub lock_for: Duration,
    /// How long a finished request's answer is kept.
    pub retention: Duration,
}

/// What [`Meter::begin`](super::Meter::begin) gives.
// Returned once a request and matched at once: boxing the charge would cost every request an
// allocation to save a move of ~400 bytes.
#[allow(clippy::large_enum_variant)]
pub enum Begun {
    /// Run the request on this charge.
    Charge(Charge),
    /// A repeat of a finished request: its answer, to send as it is.
    Replay(String),
}

/// The idempotency key a running request holds.
pub(super) struct IdemClaim {
    pub tenant: String,
    pub key: String,
}

/// What a successful request delivered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivered<'a> {
    /// The backend that answered.
    pub backend: Option<&'a str>,
    pub images: u32,
    /// Micro-dollars charged to the tenant.
    pub cost: u64,
    /// Micro-dollars the upstream charges us.
    pub upstream_cost: u64,
    /// Input and output tokens, when the upstream reported them.
    pub tokens: (Option<i64>, Option<i64>),
}

/// A request's claim on budgets and on its `Idempotency-Key`, ended exactly once: by
/// [`Charge::deliver`] or [`Charge::fail`], or, when the request is dropped (the client went
/// away), by `Drop`, which releases everything (and records the request as abandoned if it
/// was relayed).
pub struct Charge {
    meter: Arc<Meter>,
    row: UsageRow,
    holds: Vec<Hold>,
    idem: Option<IdemClaim>,
    relayed: bool,
    started: Instant,
    done: bool,
}

impl Charge {
    pub(super) fn open(
        meter: Arc<Meter>,
        principal: &Principal,
        facts: RequestFacts<'_>,
        idem: Option<IdemClaim>,
    ) -> Self {
        // One clock read for the row's time and its id.
        let ts_ms = crate::clock::now_ms();
        let row = UsageRow {
            id: super::new_id_at(ts_ms),
            request_id: facts.request_id.to_string(),
            ts_ms,
            tenant: principal.tenant.to_string(),
            key_id: principal.key_id.to_string(),
            model: facts.model.to_string(),
            size: facts.size.text(),
            quality: facts.quality.map(|q| q.as_str().to_string()),
            n_requested: facts.n,
            idempotency_key: idem.as_ref().map(|c| c.key.clone()),
            operation: std::borrow::Cow::Borrowed(facts.operation.as_str()),
            ..UsageRow::default()
        };
        Charge {
            meter,
            row,
            holds: Vec::new(),
            idem,
            relayed: false,
            started: Instant::now(),
            done: false,
        }
    }

    /// The ledger row's id: it names the request's budget holds and concurrency slots.
    pub fn id(&self) -> &str {
        &self.row.id
    }

    /// Reserves the request's cost in the tenant's and the key's budgets; refuses with 429
    /// `insufficient_quota` (holding nothing) when either would be exceeded.
    pub async fn reserve(
        &mut self,
        principal: &Principal,
        cost: u64,
        lease: Duration,
    ) -> Result<(), ApiError> {
        self.holds = self
            .meter
            .reserve(principal, cost, &self.row.id, lease)
            .await?;
        self.row.reserved_micro_usd = cost;
        Ok(())
    }

    pub fn has_idempotency_key(&self) -> bool {
        self.idem.is_some()
    }

    /// From here on the request counts in the ledger.
    pub fn relayed(&mut self) {
        self.relayed = true;
    }

    /// Ends a relayed request that failed with `status`: recorded, nothing charged.
    pub async fn fail(mut self, status: u16, backend: Option<&str>) -> bool {
        self.row.backend = backend.map(String::from);
        self.finish(status, None).await
    }

    /// Ends a request that succeeded: charged `delivered.cost`; `response` (the answer's
    /// body) is kept for the idempotency key. False if the record could not be made durable.
    pub async fn deliver(mut self, delivered: Delivered<'_>, response: Option<String>) -> bool {
        let row = &mut self.row;
        row.backend = delivered.backend.map(String::from);
        row.n_delivered = delivered.images;
        row.cost_micro_usd = delivered.cost;
        row.upstream_cost_micro_usd = delivered.upstream_cost;
        (row.input_tokens, row.output_tokens) = delivered.tokens;
        self.finish(200, response).await
    }

    /// Settles at `row.cost_micro_usd` with the row as filled in.
    async fn finish(mut self, status: u16, response: Option<String>) -> bool {
        self.done = true;
        self.row.status = status;
        self.row.latency_ms = self.started.elapsed().as_millis() as u64;
        if status != 200 {
            self.row.cost_micro_usd = 0;
            self.row.n_delivered = 0;
        }
        let idem = self.idem.take().map(|c| match response {
            Some(response) if status == 200 => IdemOutcome::Complete {
                tenant: c.tenant,
                key: c.key,
                response,
            },
            _ => IdemOutcome::Release {
                tenant: c.tenant,
                key: c.key,
            },
        });
        let settlement = Settlement {
            row: std::mem::take(&mut self.row),
            holds: std::mem::take(&mut self.holds),
            idem,
        };
        self.meter.settle(Box::new(settlement)).await
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let holds = std::mem::take(&mut self.holds);
        let idem = self.idem.take();
        if self.relayed {
            // The client went away mid-request: nothing delivered, nothing charged.
            self.row.status = 499;
            self.row.cost_micro_usd = 0;
            self.row.n_delivered = 0;
            self.row.latency_ms = self.started.elapsed().as_millis() as u64;
            self.meter.settle_later(Settlement {
                row: std::mem::take(&mut self.row),
                holds,
                idem: idem.map(|c| IdemOutcome::Release {
                    tenant: c.tenant,
                    key: c.key,
                }),
            });
        } else if !holds.is_empty() || idem.is_some() {
            let meter = self.meter.clone();
            let member = self.row.id.clone();
            tokio::spawn(async move { meter.abandon(holds, &member, idem).await });
        }
    }
}
