//! Per-backend capacity: a GPU node works on `max_concurrency` requests at once; up to
//! `max_queue` more wait (at most `queue_timeout`, never past the request's deadline); beyond
//! that the node is full and the request goes elsewhere or gets 503 — never an unbounded pile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::fair::{Caller, Class, Scheduler};
use crate::config::Capacity;

/// How the queue picks its next waiter, and whether hopeless requests are refused early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Weighted fair queuing by tenant (else one FIFO per class).
    pub fair: bool,
    /// Refuse at once a request whose expected wait plus job time passes its deadline.
    pub shed: bool,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        QueuePolicy {
            fair: true,
            shed: true,
        }
    }
}

pub struct CapacityGate {
    name: String,
    max: Option<u32>,
    max_queue: u32,
    queue_timeout: Duration,
    policy: QueuePolicy,
    state: Mutex<State>,
    /// Mirrors the queue's length for lock-free reads (metrics, /readyz).
    waiting: AtomicU32,
}

struct State {
    in_use: u32,
    per_tenant: HashMap<Arc<str>, u32>,
    /// Each waiting tenant's cap on slots held (from its `max_share`).
    caps: HashMap<Arc<str>, u32>,
    queue: Scheduler<oneshot::Sender<Slot>>,
    next_id: u64,
    /// Moving average of how long a job holds a slot, in seconds (`None` until one finished).
    job_secs: Option<f64>,
}

/// Held while the request runs on the backend; dropping it gives the slot to the next waiter.
pub struct Slot {
    gate: Option<(Arc<CapacityGate>, Arc<str>)>,
    since: Instant,
    /// The holder's deadline: a job cut short by it says nothing of the job time.
    deadline: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The wait queue is full.
    QueueFull,
    /// Waited `queue_timeout` (or until the deadline) without a slot.
    QueueTimeout,
    /// The expected wait plus one job would pass the deadline (or a higher class needed the
    /// place in the queue): refused at once.
    Shed { retry_after: Duration },
}

/// The weight of one new job time in the moving average.
const EWMA_ALPHA: f64 = 0.2;

impl Drop for Slot {
    fn drop(&mut self) {
        let Some((gate, tenant)) = self.gate.take() else {
            return;
        };
        let held = self.since.elapsed().as_secs_f64();
        let mut st = gate.lock();
        st.in_use -= 1;
        if let Some(n) = st.per_tenant.get_mut(&tenant) {
            *n -= 1;
            if *n == 0 {
                st.per_tenant.remove(&tenant);
            }
        }
        let cut_short = self
            .deadline
            .is_some_and(|d| Instant::now() + Duration::from_millis(5) >= d);
        if !cut_short {
            st.job_secs = Some(match st.job_secs {
                None => held,
                Some(avg) => avg + EWMA_ALPHA * (held - avg),
            });
        }
        gate.dispatch(&mut st);
    }
}

/// Takes a waiter out of the queue if its request gives up (timeout, client gone).
struct Queued<'a> {
    gate: &'a CapacityGate,
    caller: &'a Caller,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        if st.queue.remove(self.caller, self.id).is_some() {
            self.gate.publish(&st);
        }
    }
}

impl CapacityGate {
    pub fn new(name: &str, c: Capacity) -> Self {
        Self::with_policy(name, c, QueuePolicy::default())
    }

    pub fn with_policy(name: &str, c: Capacity, policy: QueuePolicy) -> Self {
        CapacityGate {
            name: name.to_string(),
            max: c.max_concurrency.map(|n| n.max(1)),
            max_queue: c.max_queue,
            queue_timeout: c.queue_timeout,
            policy,
            state: Mutex::new(State {
                in_use: 0,
                per_tenant: HashMap::new(),
                caps: HashMap::new(),
                queue: Scheduler::default(),
                next_id: 0,
                job_secs: None,
            }),
            waiting: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn queue_depth(&self) -> u32 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Waiting requests by tenant (`/readyz`).
    pub fn queued_by_tenant(&self) -> std::collections::BTreeMap<String, usize> {
        self.lock().queue.by_tenant()
    }

    /// The moving average job time, once a job has finished.
    pub fn job_time(&self) -> Option<Duration> {
        self.lock().job_secs.map(Duration::from_secs_f64)
    }

    /// Whether a request would run at once (no queueing).
    pub fn has_free_slot(&self) -> bool {
        match self.max {
            None => true,
            Some(max) => {
                let st = self.lock();
                st.in_use < max && st.queue.is_empty()
            }
        }
    }

    fn publish(&self, st: &State) {
        let depth = st.queue.len() as u32;
        self.waiting.store(depth, Ordering::SeqCst);
        let m = crate::telemetry::metrics();
        m.queue_depth(&self.name, depth);
        for class in [Class::Interactive, Class::Batch] {
            m.queue_depth_of_class(&self.name, class.as_str(), st.queue.len_of(class));
        }
    }

    /// Hands free slots to waiters in the scheduler's order, skipping tenants at their cap.
    fn dispatch(self: &Arc<Self>, st: &mut State) {
        let Some(max) = self.max else { return };
        while st.in_use < max {
            // The batch class never takes a pool's last free slot (unless it has only one):
            // an interactive request arriving finds it free instead of waiting out a batch job.
            let lowest = if st.in_use + 1 < max || max == 1 {
                Class::Batch
            } else {
                Class::Interactive
            };
            let State {
                queue,
                per_tenant,
                caps,
                ..
            } = &mut *st;
            let Some((tenant, tx)) = queue.pop_up_to(lowest, |t| {
                per_tenant.get(t).copied().unwrap_or(0) < caps.get(t).copied().unwrap_or(max)
            }) else {
                break;
            };
            let slot = Slot {
                gate: Some((self.clone(), tenant.clone())),
                since: Instant::now(),
                deadline: None,
            };
            match tx.send(slot) {
                Ok(()) => {
                    st.in_use += 1;
                    *st.per_tenant.entry(tenant).or_insert(0) += 1;
                }
                // The waiter is gone: the slot was never counted, so it must not be released.
                Err(mut slot) => slot.gate = None,
            }
        }
        self.publish(st);
    }

    /// Takes a slot for `caller`, waiting in the bounded queue if needed (served by class, then
    /// by tenant weight), or refuses at once when the wait cannot end before `deadline`.
    pub async fn acquire(
        self: &Arc<Self>,
        caller: &Caller,
        deadline: Instant,
    ) -> Result<(Slot, Duration), Busy> {
        let started = Instant::now();
        let Some(max) = self.max else {
            return Ok((
                Slot {
                    gate: None,
                    since: started,
                    deadline: None,
                },
                Duration::ZERO,
            ));
        };
        let fifo;
        let caller = if self.policy.fair {
            caller
        } else {
            fifo = Caller {
                class: caller.class,
                ..Caller::anonymous()
            };
            &fifo
        };
        let (id, mut rx) = {
            let mut st = self.lock();
            let cap = caller
                .max_share
                .map_or(max, |s| ((f64::from(max) * s).ceil() as u32).clamp(1, max));
            let held = st.per_tenant.get(&caller.tenant).copied().unwrap_or(0);
            let room = match caller.class {
                Class::Interactive => st.in_use < max,
                Class::Batch => st.in_use + 1 < max || (max == 1 && st.in_use == 0),
            };
            if room && st.queue.is_empty() && held < cap {
                st.in_use += 1;
                *st.per_tenant.entry(caller.tenant.clone()).or_insert(0) += 1;
                let slot = Slot {
                    gate: Some((self.clone(), caller.tenant.clone())),
                    since: started,
                    deadline: Some(deadline),
                };
                return Ok((slot, Duration::ZERO));
            }
            if let (true, Some(job)) = (self.policy.shed, st.job_secs) {
                let ahead = st.queue.ahead_of(caller);
                let free = max.saturating_sub(st.in_use) as usize;
                let turns = (ahead + 1).saturating_sub(free).div_ceil(max as usize);
                let wait = Duration::from_secs_f64(turns as f64 * job);
                // One job of margin: tenants that arrive later may be served first (round
                // robin), and a job is not always average.
                if started + wait + Duration::from_secs_f64(2.0 * job) > deadline {
                    crate::telemetry::metrics().queue_shed(
                        &self.name,
                        &caller.tenant,
                        caller.class.as_str(),
                    );
                    return Err(Busy::Shed {
                        retry_after: wait.max(Duration::from_secs(1)),
                    });
                }
            }
            if st.queue.len() >= self.max_queue as usize {
                // A full queue sheds its lowest class first.
                if st.queue.evict_below(caller.class).is_none() {
                    return Err(Busy::QueueFull);
                }
            }
            st.caps.insert(caller.tenant.clone(), cap);
            let id = st.next_id;
            st.next_id += 1;
            let (tx, rx) = oneshot::channel();
            st.queue.push(caller, id, tx);
            self.dispatch(&mut st);
            (id, rx)
        };
        let queued = Queued {
            gate: self,
            caller,
            id,
        };
        let until = deadline.min(started + self.queue_timeout);
        let outcome = tokio::time::timeout_at(until.into(), &mut rx).await;
        drop(queued);
        let waited = started.elapsed();
        crate::telemetry::metrics().queue_wait(
            &self.name,
            &caller.tenant,
            caller.class.as_str(),
            waited,
        );
        match outcome {
            Ok(Ok(mut slot)) => {
                slot.deadline = Some(deadline);
                Ok((slot, waited))
            }
            Ok(Err(_)) => Err(Busy::Shed {
                retry_after: Duration::from_secs(1),
            }),
            // A slot granted just as the wait ended is taken, not lost.
            Err(_) => rx
                .try_recv()
                .map(|s| (s, started.elapsed()))
                .map_err(|_| Busy::QueueTimeout),
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
        let (first, _) = g.acquire(&Caller::anonymous(), far()).await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..2 {
            let (g2, order) = (g.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let (slot, _) = g2.acquire(&Caller::anonymous(), far()).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            // Let each waiter enqueue before the next.
            while g.queue_depth() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(
            g.acquire(&Caller::anonymous(), far()).await.err(),
            Some(Busy::QueueFull)
        );
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
        let _held = g.acquire(&Caller::anonymous(), far()).await.unwrap();
        assert_eq!(
            g.acquire(&Caller::anonymous(), far()).await.err(),
            Some(Busy::QueueTimeout)
        );
        assert_eq!(g.queue_depth(), 0);
    }

    /// Two tenants weighted 3:1 saturating a one-slot gate: 3:1 of the slots over 200 grants,
    /// each tenant's requests in their arrival order.
    #[tokio::test]
    async fn weights_share_a_saturated_gate() {
        let g = gate(1, 1000, 60_000);
        let (first, _) = g.acquire(&Caller::anonymous(), far()).await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..150u32 {
            for (tenant, weight) in [("a", 3), ("b", 1)] {
                let (g2, order) = (g.clone(), order.clone());
                let caller = Caller {
                    tenant: Arc::from(tenant),
                    weight,
                    class: super::super::fair::Class::Interactive,
                    max_share: None,
                };
                waiters.push(tokio::spawn(async move {
                    let (slot, _) = g2.acquire(&caller, far()).await.unwrap();
                    order.lock().unwrap().push((tenant, i));
                    drop(slot);
                }));
                while g.queue_depth() < (2 * i + if tenant == "a" { 1 } else { 2 }) {
                    tokio::task::yield_now().await;
                }
            }
        }
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let a = order[..200].iter().filter(|(t, _)| *t == "a").count();
        assert!((145..=155).contains(&a), "a got {a} of the first 200");
        let a_seq: Vec<u32> = order
            .iter()
            .filter(|(t, _)| *t == "a")
            .map(|(_, i)| *i)
            .collect();
        assert!(a_seq.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(g.queue_depth(), 0);
    }

    /// Batch requests leave a pool's last slot to interactive ones: an interactive request
    /// arriving while batch work waits starts at once.
    #[tokio::test]
    async fn batch_work_leaves_the_last_slot_free() {
        let g = gate(2, 10, 60_000);
        let batch = Caller {
            class: Class::Batch,
            ..Caller::anonymous()
        };
        let (first, waited) = g.acquire(&batch, far()).await.unwrap();
        assert_eq!(waited, Duration::ZERO);
        let g2 = g.clone();
        let second = tokio::spawn(async move { g2.acquire(&batch, far()).await.map(|s| s.0) });
        while g.queue_depth() < 1 {
            tokio::task::yield_now().await;
        }
        let (interactive, _) = tokio::time::timeout(
            Duration::from_secs(5),
            g.acquire(&Caller::anonymous(), far()),
        )
        .await
        .expect("the interactive request got the free slot at once")
        .unwrap();
        drop(interactive);
        // Still one batch job running: the second batch request waits for the first to end.
        assert_eq!(g.queue_depth(), 1);
        drop(first);
        second.await.unwrap().unwrap();
    }
}
