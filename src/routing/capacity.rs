//! Per-backend capacity: a GPU node works on `max_concurrency` requests at once; up to
//! `max_queue` more wait (at most `queue_timeout`, never past the request's deadline); beyond
//! that the node is full and the request goes elsewhere or gets 503 — never an unbounded pile.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Capacity;

pub struct CapacityGate {
    name: String,
    slots: Option<Arc<Semaphore>>,
    max_queue: u32,
    queue_timeout: Duration,
    waiting: AtomicU32,
}

/// Held while the request runs on the backend.
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The wait queue is full.
    QueueFull,
    /// Waited `queue_timeout` (or until the deadline) without a slot.
    QueueTimeout,
}

struct Waiting<'a>(&'a CapacityGate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let depth = self.0.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        crate::telemetry::metrics().queue_depth(&self.0.name, depth);
    }
}

impl CapacityGate {
    pub fn new(name: &str, c: Capacity) -> Self {
        CapacityGate {
            name: name.to_string(),
            slots: c
                .max_concurrency
                .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
            max_queue: c.max_queue,
            queue_timeout: c.queue_timeout,
            waiting: AtomicU32::new(0),
        }
    }

    pub fn queue_depth(&self) -> u32 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Whether a request would run at once (no queueing).
    pub fn has_free_slot(&self) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|s| s.available_permits() > 0)
    }

    /// Takes a slot, waiting in the bounded queue if needed.
    pub async fn acquire(&self, deadline: Instant) -> Result<(Slot, Duration), Busy> {
        let Some(slots) = &self.slots else {
            return Ok((Slot { _permit: None }, Duration::ZERO));
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok((
                Slot {
                    _permit: Some(permit),
                },
                Duration::ZERO,
            ));
        }
        // Reserve a place in the queue atomically, so max_queue holds under concurrency.
        let admitted = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < self.max_queue).then_some(w + 1)
            });
        let Ok(before) = admitted else {
            return Err(Busy::QueueFull);
        };
        crate::telemetry::metrics().queue_depth(&self.name, before + 1);
        let _waiting = Waiting(self);
        let started = Instant::now();
        let until = deadline.min(started + self.queue_timeout);
        match tokio::time::timeout_at(until.into(), slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok((
                Slot {
                    _permit: Some(permit),
                },
                started.elapsed(),
            )),
            _ => Err(Busy::QueueTimeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: u32, queue: u32, timeout_ms: u64) -> Arc<CapacityGate> {
        Arc::new(CapacityGate::new(
            "test",
            Capacity {
                max_concurrency: Some(max),
                max_queue: queue,
                queue_timeout: Duration::from_millis(timeout_ms),
            },
        ))
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn queue_is_bounded_and_served_in_order() {
        let g = gate(1, 2, 10_000);
        let (first, _) = g.acquire(far()).await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..2 {
            let (g2, order) = (g.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let (slot, _) = g2.acquire(far()).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            // Let each waiter enqueue before the next.
            while g.queue_depth() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(g.acquire(far()).await.err(), Some(Busy::QueueFull));
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1]);
        assert_eq!(g.queue_depth(), 0);
    }

    #[tokio::test]
    async fn waiting_ends_at_the_queue_timeout() {
        let g = gate(1, 4, 50);
        let _held = g.acquire(far()).await.unwrap();
        assert_eq!(g.acquire(far()).await.err(), Some(Busy::QueueTimeout));
        assert_eq!(g.queue_depth(), 0);
    }
}
