//! Who waits next for a backend's capacity: classes in strict order (interactive before
//! batch), and within a class deficit round robin over tenants (Shreedhar and Varghese,
//! 1995) with each job costing one unit and a tenant's quantum its weight: a tenant of
//! weight 3 is served three jobs per round to a weight-1 tenant's one, and within a tenant
//! requests keep their arrival order. Choosing the next waiter is O(1) amortized (a tenant
//! is looked at once per round); cancelling a waiter is O(its tenant's queue).
//!
//! The scheduler holds opaque waiters; `capacity.rs` puts oneshot senders in it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Requests of a lower class wait while any of a higher class does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Interactive = 0,
    Batch = 1,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Batch => "batch",
        }
    }
}

/// Who is asking for capacity.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: Arc<str>,
    /// Its share relative to other tenants waiting in the same class (at least 1).
    pub weight: u32,
    pub class: Class,
    /// At most this fraction of a pool's slots, even when the rest are idle.
    pub max_share: Option<f64>,
}

impl Caller {
    /// Equal weight, interactive, no cap (tests, internal calls).
    pub fn anonymous() -> Self {
        Caller {
            tenant: Arc::from(""),
            weight: 1,
            class: Class::Interactive,
            max_share: None,
        }
    }
}

struct TenantQueue<W> {
    waiters: VecDeque<(u64, W)>,
    weight: u32,
    /// Jobs it may still be served in the current round.
    deficit: u32,
}

struct ClassQueue<W> {
    tenants: HashMap<Arc<str>, TenantQueue<W>>,
    /// Tenants with waiters, in round-robin order.
    active: VecDeque<Arc<str>>,
}

impl<W> Default for ClassQueue<W> {
    fn default() -> Self {
        ClassQueue {
            tenants: HashMap::new(),
            active: VecDeque::new(),
        }
    }
}

pub struct Scheduler<W> {
    classes: [ClassQueue<W>; 2],
    len: usize,
}

impl<W> Default for Scheduler<W> {
    fn default() -> Self {
        Scheduler {
            classes: [ClassQueue::default(), ClassQueue::default()],
            len: 0,
        }
    }
}

impl<W> Scheduler<W> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waiters of `class`.
    pub fn len_of(&self, class: Class) -> usize {
        self.classes[class as usize]
            .tenants
            .values()
            .map(|t| t.waiters.len())
            .sum()
    }

    /// Waiters by tenant, across classes.
    pub fn by_tenant(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for class in &self.classes {
            for (tenant, q) in &class.tenants {
                *out.entry(tenant.to_string()).or_insert(0) += q.waiters.len();
            }
        }
        out
    }

    pub fn push(&mut self, caller: &Caller, id: u64, waiter: W) {
        let class = &mut self.classes[caller.class as usize];
        let queue = class
            .tenants
            .entry(caller.tenant.clone())
            .or_insert_with(|| TenantQueue {
                waiters: VecDeque::new(),
                weight: caller.weight.max(1),
                deficit: 0,
            });
        if queue.waiters.is_empty() {
            // A tenant that had nothing waiting starts its round at once, ahead of backlogged
            // tenants (which keep their deficit): its request waits for at most the jobs
            // running, never behind another tenant's backlog.
            class.active.push_front(caller.tenant.clone());
        }
        queue.weight = caller.weight.max(1);
        queue.waiters.push_back((id, waiter));
        self.len += 1;
    }

    /// Takes waiter `id` out (it gave up); `None` if it is no longer queued.
    pub fn remove(&mut self, caller: &Caller, id: u64) -> Option<W> {
        let class = &mut self.classes[caller.class as usize];
        let queue = class.tenants.get_mut(&caller.tenant)?;
        let at = queue.waiters.iter().position(|(i, _)| *i == id)?;
        let (_, waiter) = queue.waiters.remove(at)?;
        if queue.waiters.is_empty() {
            class.tenants.remove(&caller.tenant);
            class.active.retain(|t| *t != caller.tenant);
        }
        self.len -= 1;
        Some(waiter)
    }

    /// The next waiter whose tenant `eligible` allows (a tenant at its share cap is skipped
    /// and keeps its place), highest class first.
    pub fn pop(&mut self, eligible: impl Fn(&str) -> bool) -> Option<(Arc<str>, W)> {
        self.pop_up_to(Class::Batch, eligible)
    }

    /// As [`Scheduler::pop`], taking no class below `lowest`.
    pub fn pop_up_to(
        &mut self,
        lowest: Class,
        eligible: impl Fn(&str) -> bool,
    ) -> Option<(Arc<str>, W)> {
        for class in &mut self.classes[..=lowest as usize] {
            let mut skipped = 0;
            while skipped < class.active.len() {
                let Some(tenant) = class.active.front().cloned() else {
                    break;
                };
                if !eligible(&tenant) {
                    class.active.rotate_left(1);
                    skipped += 1;
                    continue;
                }
                // Every active tenant has a non-empty queue (push and remove keep it so).
                let Some(queue) = class.tenants.get_mut(&tenant) else {
                    class.active.pop_front();
                    continue;
                };
                if queue.deficit == 0 {
                    queue.deficit = queue.weight;
                }
                let Some((_, waiter)) = queue.waiters.pop_front() else {
                    class.tenants.remove(&tenant);
                    class.active.pop_front();
                    continue;
                };
                queue.deficit -= 1;
                if queue.waiters.is_empty() {
                    class.tenants.remove(&tenant);
                    class.active.pop_front();
                } else if queue.deficit == 0 {
                    class.active.rotate_left(1);
                }
                self.len -= 1;
                return Some((tenant, waiter));
            }
        }
        None
    }

    /// The newest waiter of the lowest class below `class`, to make room for `class`.
    pub fn evict_below(&mut self, class: Class) -> Option<W> {
        for lower in (class as usize + 1..self.classes.len()).rev() {
            let queue = &mut self.classes[lower];
            let Some(tenant) = queue.active.back().cloned() else {
                continue;
            };
            let Some(tq) = queue.tenants.get_mut(&tenant) else {
                continue;
            };
            let Some((_, waiter)) = tq.waiters.pop_back() else {
                continue;
            };
            if tq.waiters.is_empty() {
                queue.tenants.remove(&tenant);
                queue.active.pop_back();
            }
            self.len -= 1;
            return Some(waiter);
        }
        None
    }

    /// About how many queued jobs would be served before a new request of `caller`: every
    /// waiter of a higher class, its own tenant's queue, and of each other tenant as many as
    /// round robin serves in the rounds the caller's queue needs (none when the caller has
    /// nothing queued: it starts its round at once).
    pub fn ahead_of(&self, caller: &Caller) -> usize {
        let mut ahead: usize = self.classes[..caller.class as usize]
            .iter()
            .flat_map(|c| c.tenants.values())
            .map(|t| t.waiters.len())
            .sum();
        let class = &self.classes[caller.class as usize];
        let own = class
            .tenants
            .get(&caller.tenant)
            .map_or(0, |t| t.waiters.len());
        if own == 0 {
            return ahead;
        }
        let weight = caller.weight.max(1) as usize;
        let rounds = (own + 1).div_ceil(weight);
        ahead += own;
        for (tenant, queue) in &class.tenants {
            if *tenant != caller.tenant {
                ahead += queue.waiters.len().min(rounds * queue.weight as usize);
            }
        }
        ahead
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(tenant: &str, weight: u32, class: Class) -> Caller {
        Caller {
            tenant: Arc::from(tenant),
            weight,
            class,
            max_share: None,
        }
    }

    #[test]
    fn weights_share_the_service_and_arrival_order_holds_within_a_tenant() {
        let mut s = Scheduler::default();
        let (a, b) = (
            caller("a", 3, Class::Interactive),
            caller("b", 1, Class::Interactive),
        );
        for i in 0..300 {
            s.push(&a, i, ("a", i));
            s.push(&b, 1000 + i, ("b", i));
        }
        let mut served = Vec::new();
        for _ in 0..200 {
            served.push(s.pop(|_| true).unwrap().1);
        }
        let from_a = served.iter().filter(|(t, _)| *t == "a").count();
        assert_eq!(from_a, 150, "3:1 of 200");
        let a_order: Vec<u64> = served
            .iter()
            .filter(|(t, _)| *t == "a")
            .map(|(_, i)| *i)
            .collect();
        assert!(a_order.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_flooding_tenant_does_not_hold_back_a_newcomer() {
        let mut s = Scheduler::default();
        let flood = caller("flood", 1, Class::Interactive);
        for i in 0..50 {
            s.push(&flood, i, "flood");
        }
        s.pop(|_| true);
        let newcomer = caller("new", 1, Class::Interactive);
        assert_eq!(s.ahead_of(&newcomer), 0);
        s.push(&newcomer, 99, "new");
        assert_eq!(
            s.pop(|_| true).unwrap().1,
            "new",
            "served next, before the backlog"
        );
        // A second request of the same tenant waits its turn in the round.
        s.push(&newcomer, 100, "new");
        s.push(&newcomer, 101, "new");
        // Its own two, and one of the flood per round for the three rounds it needs.
        assert_eq!(s.ahead_of(&newcomer), 2 + 3);
    }

    #[test]
    fn classes_are_strict_caps_skip_and_removal_works() {
        let mut s = Scheduler::default();
        let batch = caller("t", 1, Class::Batch);
        let inter = caller("u", 1, Class::Interactive);
        s.push(&batch, 1, "batch");
        s.push(&inter, 2, "interactive");
        assert_eq!(s.pop(|_| true).unwrap().1, "interactive");
        s.push(&inter, 3, "capped");
        assert_eq!(s.pop(|t| t != "u").unwrap().1, "batch");
        assert_eq!(s.pop(|t| t != "u"), None);
        assert_eq!(s.remove(&inter, 3), Some("capped"));
        assert!(s.is_empty());
        s.push(&batch, 4, "old");
        s.push(&batch, 5, "newest");
        assert_eq!(s.evict_below(Class::Interactive), Some("newest"));
        assert_eq!(s.len_of(Class::Batch), 1);
    }
}
