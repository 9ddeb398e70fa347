//! The last day of this replica's traffic, minute by minute, for the console's overview:
//! requests, images, spend, errors by class and a latency histogram per minute, and the
//! busiest tenants and models of the last hour. A ring of 1,440 minutes behind one mutex held
//! for a few counter bumps per request; Prometheus stays the source for dashboards and alerts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const MINUTES: usize = 1440;
/// Minutes whose tenant and model counts are kept (the overview's "last hour").
const NAMED_MINUTES: u64 = 60;
/// Names counted per minute; more fall into `(other)`, so a flood of tenants costs nothing.
const MAX_NAMES: usize = 500;
/// Upper bounds (ms) of the latency buckets; the last is everything above.
pub const LATENCY_BOUNDS_MS: [u64; 15] = [
    10,
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    20_000,
    30_000,
    60_000,
    120_000,
    u64::MAX,
];

#[derive(Default, Clone)]
struct Minute {
    /// Minutes since the Unix epoch this slot holds (0: never written).
    at: u64,
    counts: Counts,
    latency: [u32; LATENCY_BOUNDS_MS.len()],
    tenants: HashMap<Arc<str>, u32>,
    models: HashMap<Arc<str>, u32>,
}

/// What happened in a span of time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub requests: u64,
    pub images: u64,
    pub spend_micro_usd: u64,
    /// 4xx other than 429.
    pub client_errors: u64,
    pub rate_limited: u64,
    pub server_errors: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.images += o.images;
        self.spend_micro_usd += o.spend_micro_usd;
        self.client_errors += o.client_errors;
        self.rate_limited += o.rate_limited;
        self.server_errors += o.server_errors;
    }
}

/// One finished request, as the overview counts it.
pub struct Finished<'a> {
    pub status: u16,
    pub latency: Duration,
    pub tenant: Option<&'a Arc<str>>,
    pub model: Option<&'a Arc<str>>,
    pub images: u32,
    pub spend_micro_usd: u64,
}

/// The ring's slot for `minute`, emptied first if it holds an older minute; `None` if it
/// holds a newer one (the minute is a day late).
fn slot_for(ring: &mut [Minute], minute: u64) -> Option<&mut Minute> {
    let slot = &mut ring[(minute % MINUTES as u64) as usize];
    if slot.at > minute {
        return None;
    }
    if slot.at != minute {
        *slot = Minute {
            at: minute,
            ..Minute::default()
        };
    }
    Some(slot)
}

pub struct Recent {
    ring: Mutex<Vec<Minute>>,
}

/// The overview at one moment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Overview {
    /// The last 60 minutes, oldest first (index 59 is the current minute).
    pub minutes: Vec<Counts>,
    /// The last 24 hours, oldest first (index 23 holds the current hour's minutes).
    pub hours: Vec<Counts>,
    pub hour: Counts,
    pub day: Counts,
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    pub top_tenants: Vec<(String, u32)>,
    pub top_models: Vec<(String, u32)>,
}

pub fn recent() -> &'static Recent {
    static RECENT: OnceLock<Recent> = OnceLock::new();
    RECENT.get_or_init(Recent::new)
}

fn bump(map: &mut HashMap<Arc<str>, u32>, name: Option<&Arc<str>>) {
    let Some(name) = name else { return };
    if let Some(n) = map.get_mut(name) {
        *n += 1;
    } else if map.len() < MAX_NAMES {
        map.insert(name.clone(), 1);
    } else {
        *map.entry(Arc::from("(other)")).or_insert(0) += 1;
    }
}

fn top(merged: HashMap<Arc<str>, u32>, n: usize) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = merged
        .into_iter()
        .map(|(k, c)| (k.to_string(), c))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

impl Recent {
    pub fn new() -> Self {
        Recent {
            ring: Mutex::new(vec![Minute::default(); MINUTES]),
        }
    }

    pub fn record(&self, f: Finished<'_>) {
        self.record_at(crate::clock::now_unix() / 60, f);
    }

    /// Images and spend of a request recorded before they were known (a stream, charged when
    /// it ends), added to the minute they were delivered in.
    pub fn delivered_later(&self, images: u32, spend_micro_usd: u64) {
        let minute = crate::clock::now_unix() / 60;
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slot_for(&mut ring, minute) {
            slot.counts.images += u64::from(images);
            slot.counts.spend_micro_usd += spend_micro_usd;
        }
    }

    pub fn record_at(&self, minute: u64, f: Finished<'_>) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slot_for(&mut ring, minute) else {
            return;
        };
        let c = &mut slot.counts;
        c.requests += 1;
        c.images += u64::from(f.images);
        c.spend_micro_usd += f.spend_micro_usd;
        match f.status {
            429 => c.rate_limited += 1,
            400..=499 => c.client_errors += 1,
            500.. => c.server_errors += 1,
            _ => {}
        }
        let ms = f.latency.as_millis() as u64;
        let b = LATENCY_BOUNDS_MS
            .iter()
            .position(|&bound| ms <= bound)
            .unwrap_or(LATENCY_BOUNDS_MS.len() - 1);
        slot.latency[b] += 1;
        bump(&mut slot.tenants, f.tenant);
        bump(&mut slot.models, f.model);
        // The names of a minute past the last hour are dropped: memory stays bounded.
        let stale = minute.saturating_sub(NAMED_MINUTES);
        let old = &mut ring[(stale % MINUTES as u64) as usize];
        if old.at == stale && !old.tenants.is_empty() {
            old.tenants = HashMap::new();
            old.models = HashMap::new();
        }
    }

    pub fn overview(&self) -> Overview {
        self.overview_at(crate::clock::now_unix() / 60)
    }

    pub fn overview_at(&self, now_minute: u64) -> Overview {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let slot = |m: u64| {
            let s = &ring[(m % MINUTES as u64) as usize];
            (s.at == m && m != 0).then_some(s)
        };
        let mut minutes = Vec::with_capacity(60);
        let mut hour = Counts::default();
        let mut latency = [0u64; LATENCY_BOUNDS_MS.len()];
        let mut tenants: HashMap<Arc<str>, u32> = HashMap::new();
        let mut models: HashMap<Arc<str>, u32> = HashMap::new();
        for m in (now_minute.saturating_sub(59)..=now_minute).rev() {
            let c = slot(m).map(|s| s.counts).unwrap_or_default();
            minutes.push(c);
            hour.add(&c);
            if let Some(s) = slot(m) {
                for (i, n) in s.latency.iter().enumerate() {
                    latency[i] += u64::from(*n);
                }
                for (k, v) in &s.tenants {
                    *tenants.entry(k.clone()).or_insert(0) += v;
                }
                for (k, v) in &s.models {
                    *models.entry(k.clone()).or_insert(0) += v;
                }
            }
        }
        minutes.reverse();
        let mut hours = vec![Counts::default(); 24];
        let mut day = Counts::default();
        let this_hour = now_minute / 60;
        for m in now_minute.saturating_sub(MINUTES as u64 - 1)..=now_minute {
            if let Some(s) = slot(m) {
                let age = (this_hour - m / 60) as usize;
                if age < 24 {
                    hours[23 - age].add(&s.counts);
                }
                day.add(&s.counts);
            }
        }
        let total: u64 = latency.iter().sum();
        let quantile = |q: f64| -> Option<u64> {
            if total == 0 {
                return None;
            }
            let want = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in latency.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return Some(LATENCY_BOUNDS_MS[i]);
                }
            }
            None
        };
        Overview {
            minutes,
            hours,
            hour,
            day,
            p50_ms: quantile(0.50),
            p95_ms: quantile(0.95),
            top_tenants: top(tenants, 5),
            top_models: top(models, 5),
        }
    }
}

impl Default for Recent {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(status: u16, ms: u64, tenant: &Arc<str>, images: u32) -> Finished<'_> {
        Finished {
            status,
            latency: Duration::from_millis(ms),
            tenant: Some(tenant),
            model: None,
            images,
            spend_micro_usd: u64::from(images) * 40_000,
        }
    }

    #[test]
    fn minutes_hours_and_classes_add_up() {
        let r = Recent::new();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let now = 29_000_000;
        r.record_at(now, done(200, 40, &a, 2));
        r.record_at(now, done(429, 1, &a, 0));
        r.record_at(now - 1, done(500, 900, &b, 0));
        r.record_at(now - 61, done(400, 5, &b, 0));
        // A day old: outside every window.
        r.record_at(now - 1440, done(200, 5, &b, 1));
        let o = r.overview_at(now);
        assert_eq!(o.minutes[59].requests, 2);
        assert_eq!(o.minutes[59].images, 2);
        assert_eq!(o.minutes[58].server_errors, 1);
        assert_eq!(o.hour.requests, 3);
        assert_eq!(o.hour.rate_limited, 1);
        assert_eq!(o.day.requests, 4);
        assert_eq!(o.day.client_errors, 1);
        assert_eq!(o.hours.iter().map(|h| h.requests).sum::<u64>(), 4);
        assert_eq!(o.top_tenants[0], ("a".to_string(), 2));
        assert_eq!(o.p50_ms, Some(50));
        assert_eq!(o.p95_ms, Some(1_000));
    }

    #[test]
    fn a_streams_images_and_spend_land_in_the_minute_they_were_delivered() {
        let r = Recent::new();
        let now = crate::clock::now_unix() / 60;
        let t: Arc<str> = Arc::from("t");
        r.record_at(now, done(200, 40, &t, 0));
        r.delivered_later(2, 80_000);
        // Read now (the minute may have turned since `now`): the hour holds both.
        let o = r.overview();
        assert_eq!(
            (o.hour.requests, o.hour.images, o.hour.spend_micro_usd),
            (1, 2, 80_000)
        );
    }

    #[test]
    fn names_per_minute_are_bounded() {
        let r = Recent::new();
        for i in 0..(MAX_NAMES + 50) {
            let t: Arc<str> = Arc::from(format!("t{i}"));
            r.record_at(100, done(200, 1, &t, 1));
        }
        let o = r.overview_at(100);
        assert_eq!(o.top_tenants[0], ("(other)".to_string(), 50));
    }
}
