//! A streamed answer (server-sent events) charged when it ends, for what went through: each
//! `image_generation.completed` / `image_edit.completed` event is an image delivered, and the
//! last one's `usage` prices a token-priced model. A stream the upstream breaks off or that
//! runs into its deadline (an `error` event, no image) is recorded as failed and charges
//! nothing; a client that leaves mid-stream pays for the images it was sent. The chunk that
//! completes the last image asked for waits until the settlement is durable, as a whole
//! answer waits for its own. The request's concurrency slots are held until the stream ends,
//! as a whole answer's are until it is sent.
//!
//! Events are read as they pass, without holding them: partial images (most of the bytes)
//! are skipped line by line once their `event:` line names them; only a completed event's
//! data is kept, to read its `usage`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;

use crate::api::ImageRequest;
use crate::metering::{Charge, Delivered, PriceTable};
use crate::policy::Permits;

/// A completed event's data is read for its `usage`; past this it is counted, not read.
const MAX_EVENT_DATA: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No `event:` line yet: the data's `type` decides.
    Unknown,
    Completed,
    Error,
    Other,
}

/// What the events that went through said, read line by line as they pass.
#[derive(Debug)]
pub(super) struct Tally {
    completed: u32,
    usage: Option<serde_json::Value>,
    errors: u32,
    kind: Kind,
    /// The current event's data lines (kept only for events that may be completed ones).
    data: Vec<u8>,
    /// The current line, up to its newline (not kept while skipping).
    line: Vec<u8>,
    /// Inside a data line of an event that is not read.
    skipping: bool,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            completed: 0,
            usage: None,
            errors: 0,
            kind: Kind::Unknown,
            data: Vec::new(),
            line: Vec::new(),
            skipping: false,
        }
    }
}

fn kind_of(name: &str) -> Kind {
    match name {
        "image_generation.completed" | "image_edit.completed" => Kind::Completed,
        "error" => Kind::Error,
        _ => Kind::Other,
    }
}

impl Tally {
    /// Reads `chunk`, the next bytes of the stream.
    pub(super) fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let newline = chunk.iter().position(|b| *b == b'\n');
            let (part, rest, ended) = match newline {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &[][..], false),
            };
            if !self.skipping {
                // A data line of an event that is not read is dropped as it passes, uncopied
                // unless its first bytes came in the previous chunk.
                if self.kind == Kind::Other && self.line.is_empty() && part.starts_with(b"data:") {
                    self.skipping = true;
                } else {
                    self.line.extend_from_slice(part);
                    if self.kind == Kind::Other && self.line.starts_with(b"data:") {
                        self.line.clear();
                        self.skipping = true;
                    }
                }
            }
            if ended {
                if !self.skipping {
                    let mut line = std::mem::take(&mut self.line);
                    self.on_line(&line);
                    line.clear();
                    // A completed image's line can be megabytes: not kept for the next one.
                    if line.capacity() <= 64 * 1024 {
                        self.line = line;
                    }
                }
                self.skipping = false;
            }
            chunk = rest;
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch();
        } else if let Some(name) = line.strip_prefix(b"event:") {
            let name = std::str::from_utf8(name).unwrap_or("").trim();
            self.kind = kind_of(name);
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.data.len() + value.len() <= MAX_EVENT_DATA {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            }
        }
    }

    /// An event ended (a blank line).
    fn dispatch(&mut self) {
        #[derive(serde::Deserialize)]
        struct Event {
            #[serde(rename = "type", default)]
            kind: Option<String>,
            #[serde(default)]
            usage: Option<serde_json::Value>,
        }
        let data = std::mem::take(&mut self.data);
        let kind = std::mem::replace(&mut self.kind, Kind::Unknown);
        if data.is_empty() && kind != Kind::Completed {
            return;
        }
        let event: Option<Event> = serde_json::from_slice(&data).ok();
        let kind = match (kind, &event) {
            (Kind::Unknown, Some(Event { kind: Some(k), .. })) => kind_of(k),
            (kind, _) => kind,
        };
        match kind {
            Kind::Completed => {
                self.completed += 1;
                // All-zero usage is what an event made from a whole answer carries when the
                // backend reported none (translate::completed_events, for the SDK's schema):
                // priced per image, not at zero tokens.
                let counted = |u: &serde_json::Value| {
                    ["input_tokens", "output_tokens"]
                        .iter()
                        .any(|k| u.get(*k).and_then(|v| v.as_u64()).unwrap_or(0) > 0)
                };
                if let Some(usage) = event.and_then(|e| e.usage).filter(counted) {
                    self.usage = Some(usage);
                }
            }
            Kind::Error => self.errors += 1,
            Kind::Unknown | Kind::Other => {}
        }
    }
}

/// What pricing and recording the end of a stream needs, taken from the request's route.
pub(super) struct Pricing {
    pub prices: PriceTable,
    pub upstream_price: Option<Arc<PriceTable>>,
    pub request: ImageRequest,
    pub backend: Option<Arc<str>>,
    pub tenant: Arc<str>,
    pub route: Arc<str>,
    pub images: prometheus_client::metrics::counter::Counter,
}

type Settling = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The event stream the client reads, charging its request when it ends or is dropped.
pub(super) struct Metered {
    inner: crate::backends::EventStream,
    tally: Tally,
    end: Option<(Charge, Pricing, Permits)>,
    /// A settlement being made durable, and the chunk that waits for it (`None`: the end of
    /// the stream).
    settling: Option<(Settling, Option<Bytes>)>,
}

impl Metered {
    pub(super) fn new(
        inner: crate::backends::EventStream,
        charge: Charge,
        pricing: Pricing,
        permits: Permits,
    ) -> Self {
        Metered {
            inner,
            tally: Tally::default(),
            end: Some((charge, pricing, permits)),
            settling: None,
        }
    }

    /// The settlement of the request for what went through (once): `ended` if the stream
    /// finished, else the client left. `None` when there is nothing to write: a client that
    /// left before any image is the charge's own 499 (its drop records it).
    fn settlement(&mut self, ended: bool) -> Option<Settling> {
        let (charge, p, permits) = self.end.take()?;
        drop(permits);
        let delivered = self.tally.completed;
        if delivered == 0 {
            // Nothing delivered: a stream that ended without an image (broken off, out of
            // time) is a failure. Nothing charged either way.
            if !ended && self.tally.errors == 0 {
                drop(charge);
                return None;
            }
            let backend = p.backend;
            return Some(Box::pin(async move {
                charge.fail(502, backend.as_deref()).await;
            }));
        }
        let usage = self.tally.usage.take();
        let cost = p.prices.cost(&p.request, delivered, usage.as_ref());
        let upstream_cost = p
            .upstream_price
            .as_ref()
            .map_or(0, |u| u.cost(&p.request, delivered, usage.as_ref()));
        p.images.inc_by(u64::from(delivered));
        crate::telemetry::metrics().spend(&p.tenant, &p.route, cost);
        crate::telemetry::recent().delivered_later(delivered, cost);
        Some(Box::pin(async move {
            let delivery = Delivered {
                backend: p.backend.as_deref(),
                images: delivered,
                cost,
                upstream_cost,
                tokens: crate::metering::usage_tokens(usage.as_ref()),
            };
            if !charge.deliver(delivery, None).await {
                tracing::error!(
                    "usage ledger unavailable: a streamed answer has no durable usage record"
                );
            }
        }))
    }

    /// The images the request asked for, while it is not settled.
    fn asked(&self) -> Option<u32> {
        self.end.as_ref().map(|(_, p, _)| p.request.n)
    }
}

/// Runs `f` on the runtime; outside one (a process stopping) it is dropped, and the charge's
/// own drop records the request.
fn spawn(f: Settling) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(f);
    }
}

impl Stream for Metered {
    type Item = Bytes;

    /// The chunk that completes the last image asked for, and the end of the stream, are
    /// passed on only once the settlement is durable: a client never holds its last image,
    /// or sees its stream end, before the ledger has the request.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        loop {
            if let Some((settling, _)) = &mut this.settling {
                if settling.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let (_, held) = this.settling.take().expect("settling");
                return match held {
                    Some(chunk) => Poll::Ready(Some(chunk)),
                    None => Poll::Ready(None),
                };
            }
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(chunk)) => {
                    let asked = this.asked();
                    this.tally.feed(&chunk);
                    if asked.is_some_and(|n| this.tally.completed >= n) {
                        if let Some(settling) = this.settlement(true) {
                            this.settling = Some((settling, Some(chunk)));
                            continue;
                        }
                    }
                    return Poll::Ready(Some(chunk));
                }
                Poll::Ready(None) => match this.settlement(true) {
                    Some(settling) => this.settling = Some((settling, None)),
                    None => return Poll::Ready(None),
                },
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // A settlement under way finishes without the client; one not begun begins.
        if let Some((settling, _)) = self.settling.take() {
            spawn(settling);
        }
        if let Some(settling) = self.settlement(false) {
            spawn(settling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally_of(stream: &[u8], cuts: &[usize]) -> Tally {
        let mut t = Tally::default();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            let c = c.min(stream.len()).max(at);
            t.feed(&stream[at..c]);
            at = c;
        }
        t
    }

    const STREAM: &str = "event: image_generation.partial_image\n\
        data: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"AAAA\",\"partial_image_index\":0}\n\n\
        event: image_generation.completed\n\
        data: {\"type\":\"image_generation.completed\",\"b64_json\":\"BBBB\",\"usage\":{\"input_tokens\":50,\"output_tokens\":272}}\n\n";

    #[test]
    fn completed_events_are_counted_with_their_usage_however_the_bytes_are_cut() {
        let s = STREAM.as_bytes();
        for cuts in [
            vec![],
            vec![1],
            vec![7, 40, 41, 120],
            (0..s.len()).collect::<Vec<_>>(),
        ] {
            let t = tally_of(s, &cuts);
            assert_eq!(t.completed, 1, "{cuts:?}");
            assert_eq!(t.errors, 0);
            assert_eq!(t.usage.as_ref().unwrap()["output_tokens"], 272);
            // The partial image's data was never kept.
            assert!(t.data.is_empty() && t.line.is_empty());
        }
    }

    #[test]
    fn events_without_an_event_line_are_read_by_their_type_and_crlf_is_fine() {
        let s = "data: {\"type\":\"image_edit.completed\",\"b64_json\":\"x\"}\r\n\r\n\
                 data: {\"type\":\"image_edit.completed\",\"b64_json\":\"y\"}\r\n\r\n\
                 : a comment\n\n";
        let t = tally_of(s.as_bytes(), &[3, 30]);
        assert_eq!(t.completed, 2);
        assert!(t.usage.is_none());
        // A placeholder usage of zeros is no usage.
        let s = "data: {\"type\":\"image_edit.completed\",\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}\n\n";
        let t = tally_of(s.as_bytes(), &[]);
        assert_eq!((t.completed, t.usage.is_none()), (1, true));
    }

    #[test]
    fn an_error_event_and_a_stream_cut_before_its_blank_line_complete_nothing() {
        let s = "event: image_generation.partial_image\ndata: {\"b64_json\":\"AAAA\"}\n\n\
                 event: error\ndata: {\"type\":\"error\",\"error\":{\"message\":\"m\"}}\n\n\
                 event: image_generation.completed\ndata: {\"b64_json\":\"cut";
        let t = tally_of(s.as_bytes(), &[10]);
        assert_eq!(t.completed, 0);
        assert_eq!(t.errors, 1);
    }
}
