//! Passive health of one backend: consecutive failures eject it for a cool-down that doubles
//! on each repeat (capped); after the cool-down one request is let through (half-open) and
//! decides. An upstream 429 parks the backend until its `retry-after`.
//!
//! State is per backend, shared by every model routed to it: a dead account is dead for all.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::backends::BackendError;
use crate::config::HealthConfig;

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    /// Ejections in a row without a success in between (drives the doubling).
    ejections: u32,
    ejected_until: Option<Instant>,
    /// A half-open trial request is in flight.
    probing: bool,
    throttled_until: Option<Instant>,
    /// The active probe (local nodes) last failed.
    probe_failed: bool,
}

pub struct BackendHealth {
    pub name: Arc<str>,
    config: HealthConfig,
    in_flight: AtomicU32,
    /// Moving average (1/5 weight per sample) of a successful attempt's time, in
    /// microseconds; 0 until one has finished.
    latency_us: AtomicU64,
    state: Mutex<State>,
}

/// What an attempt's result means for the backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (including a 400 of its own: the backend is alive).
    Success,
    /// Connect error, timeout, 5xx, unusable answer, refused credentials.
    Failure,
    /// 429: park it for this long.
    Throttled(Option<Duration>),
}

impl Outcome {
    pub fn of(result: &Result<(), &BackendError>) -> Self {
        match result {
            Ok(()) | Err(BackendError::Rejected { .. }) => Outcome::Success,
            Err(BackendError::RateLimited { retry_after }) => Outcome::Throttled(*retry_after),
            Err(_) => Outcome::Failure,
        }
    }
}

/// A claim on a backend for one attempt; dropping it without [`Permit::record`] (the client
/// went away) releases the slot and any half-open trial without judging the backend.
pub struct Permit {
    health: Arc<BackendHealth>,
    probe: bool,
    recorded: bool,
    started: Instant,
}

/// Why a backend takes no requests right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    Ejected(Instant),
    Throttled(Instant),
    /// Half-open, and its single trial request is already in flight.
    Probing,
    /// Its active health probe fails.
    ProbeFailed,
}

impl BackendHealth {
    pub fn new(name: &str, config: HealthConfig) -> Arc<Self> {
        Arc::new(BackendHealth {
            name: Arc::from(name),
            config,
            in_flight: AtomicU32::new(0),
            latency_us: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn check(state: &State, now: Instant) -> Result<bool, Unavailable> {
        if state.probe_failed {
            return Err(Unavailable::ProbeFailed);
        }
        if let Some(until) = state.throttled_until.filter(|u| *u > now) {
            return Err(Unavailable::Throttled(until));
        }
        match state.ejected_until {
            Some(until) if until > now => Err(Unavailable::Ejected(until)),
            Some(_) if state.probing => Err(Unavailable::Probing),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// Whether a request could be sent now (a half-open backend counts as available).
    pub fn availability(&self, now: Instant) -> Result<(), Unavailable> {
        Self::check(&self.lock(), now).map(|_| ())
    }

    /// Claims the backend for one attempt, becoming its half-open trial if it is due one.
    pub fn acquire(self: &Arc<Self>, now: Instant) -> Result<Permit, Unavailable> {
        let probe = {
            let mut state = self.lock();
            let probe = Self::check(&state, now)?;
            if probe {
                state.probing = true;
            }
            probe
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            health: self.clone(),
            probe,
            recorded: false,
            started: now,
        })
    }

    fn cooldown(&self, ejections: u32) -> Duration {
        let factor = 2u32.saturating_pow(ejections.saturating_sub(1).min(20));
        self.config
            .ejection
            .saturating_mul(factor)
            .min(self.config.max_ejection)
    }

    fn apply(&self, probe: bool, outcome: Outcome, now: Instant) {
        let mut s = self.lock();
        if probe {
            s.probing = false;
        }
        match outcome {
            Outcome::Success => {
                s.consecutive_failures = 0;
                if probe || s.ejected_until.is_some_and(|u| u <= now) {
                    s.ejected_until = None;
                    s.ejections = 0;
                    tracing::info!(backend = %self.name, "backend recovered");
                }
            }
            Outcome::Throttled(after) => {
                let until = now + after.unwrap_or(self.config.throttle);
                s.throttled_until = Some(s.throttled_until.map_or(until, |t| t.max(until)));
                tracing::warn!(backend = %self.name, park = ?after.unwrap_or(self.config.throttle), "backend throttled by upstream 429");
            }
            Outcome::Failure => {
                s.consecutive_failures += 1;
                let currently_ejected = s.ejected_until.is_some_and(|u| u > now);
                if probe
                    || (!currently_ejected && s.consecutive_failures >= self.config.eject_after)
                {
                    s.ejections += 1;
                    let cooldown = self.cooldown(s.ejections);
                    s.ejected_until = Some(now + cooldown);
                    crate::telemetry::metrics().ejection(&self.name);
                    tracing::warn!(
                        backend = %self.name,
                        failures = s.consecutive_failures,
                        cooldown = ?cooldown,
                        "backend ejected"
                    );
                }
            }
        }
    }

    /// Records an active probe's result; a failing node takes no requests until it passes.
    pub fn set_probe(&self, ok: bool) {
        let mut s = self.lock();
        if s.probe_failed == ok {
            if ok {
                tracing::info!(backend = %self.name, "health probe passes again");
            } else {
                tracing::warn!(backend = %self.name, "health probe failed: no new requests");
            }
        }
        s.probe_failed = !ok;
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let s = self.lock();
        let to_wall = |t: Instant| {
            let wall = SystemTime::now() + t.saturating_duration_since(now);
            crate::clock::unix(wall)
        };
        let (state, until) = match Self::check(&s, now) {
            Ok(false) => ("healthy", None),
            Ok(true) => ("half_open", None),
            Err(Unavailable::Probing) => ("half_open", None),
            Err(Unavailable::ProbeFailed) => ("probe_failed", None),
            Err(Unavailable::Ejected(t)) => ("ejected", Some(to_wall(t))),
            Err(Unavailable::Throttled(t)) => ("throttled", Some(to_wall(t))),
        };
        HealthSnapshot {
            state,
            until,
            cooldown_ms: (s.ejections > 0).then(|| self.cooldown(s.ejections).as_millis() as u64),
            consecutive_failures: s.consecutive_failures,
            in_flight: self.in_flight(),
            recent_latency_ms: match self.latency_us.load(Ordering::Relaxed) {
                0 => None,
                us => Some(us.div_ceil(1000)),
            },
        }
    }

    fn observe_latency(&self, took: Duration) {
        let sample = (took.as_micros() as u64).max(1);
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    (old * 4 + sample) / 5
                })
            });
    }
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn record(self, outcome: Outcome) {
        self.record_at(outcome, Instant::now());
    }

    pub fn record_at(mut self, outcome: Outcome, now: Instant) {
        self.recorded = true;
        if outcome == Outcome::Success {
            self.health
                .observe_latency(now.saturating_duration_since(self.started));
        }
        self.health.apply(self.probe, outcome, now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe && !self.recorded {
            self.health.lock().probing = false;
        }
    }
}

/// One backend's state as `/readyz` (and later the admin API and metrics) shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HealthSnapshot {
    pub state: &'static str,
    /// Unix seconds when an ejection or throttle ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// The current ejection cool-down, while it is above the base one or in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub in_flight: u32,
    /// The moving average of a successful attempt's time on this backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_latency_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(eject_after: u32) -> Arc<BackendHealth> {
        BackendHealth::new(
            "b",
            HealthConfig {
                eject_after,
                ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(35),
                throttle: Duration::from_secs(1),
            },
        )
    }

    fn fail(h: &Arc<BackendHealth>, now: Instant) {
        h.acquire(now).unwrap().record_at(Outcome::Failure, now);
    }

    #[test]
    fn recent_latency_averages_successes_only() {
        let h = health(3);
        let t0 = Instant::now();
        assert_eq!(h.snapshot(t0).recent_latency_ms, None);
        h.acquire(t0)
            .unwrap()
            .record_at(Outcome::Success, t0 + Duration::from_millis(1000));
        assert_eq!(h.snapshot(t0).recent_latency_ms, Some(1000));
        // A failure after 30 s says nothing of how fast answers come.
        h.acquire(t0)
            .unwrap()
            .record_at(Outcome::Failure, t0 + Duration::from_secs(30));
        assert_eq!(h.snapshot(t0).recent_latency_ms, Some(1000));
        h.acquire(t0)
            .unwrap()
            .record_at(Outcome::Success, t0 + Duration::from_millis(2000));
        assert_eq!(h.snapshot(t0).recent_latency_ms, Some(1200));
    }

    #[test]
    fn ejects_after_n_consecutive_failures_then_half_opens_with_one_trial() {
        let h = health(3);
        let t0 = Instant::now();
        fail(&h, t0);
        fail(&h, t0);
        h.acquire(t0).unwrap().record_at(Outcome::Success, t0);
        fail(&h, t0);
        fail(&h, t0);
        assert!(h.availability(t0).is_ok(), "a success resets the count");
        fail(&h, t0);
        assert!(matches!(h.availability(t0), Err(Unavailable::Ejected(_))));

        let t1 = t0 + Duration::from_secs(10);
        let trial = h.acquire(t1).unwrap();
        assert!(trial.is_probe());
        assert_eq!(
            h.acquire(t1).err(),
            Some(Unavailable::Probing),
            "only one trial at a time"
        );
        trial.record_at(Outcome::Success, t1);
        let p = h.acquire(t1).unwrap();
        assert!(!p.is_probe());
        assert_eq!(h.snapshot(t1).state, "healthy");
    }

    #[test]
    fn cooldown_doubles_on_each_repeat_and_is_capped() {
        let h = health(1);
        let mut now = Instant::now();
        let mut seen = Vec::new();
        fail(&h, now);
        for _ in 0..4 {
            let Err(Unavailable::Ejected(until)) = h.availability(now) else {
                panic!("not ejected")
            };
            seen.push((until - now).as_secs());
            now = until;
            // The half-open trial fails: ejected again, for longer.
            fail(&h, now);
        }
        assert_eq!(seen, [10, 20, 35, 35]);
    }

    #[test]
    fn dropped_trial_releases_the_half_open_slot() {
        let h = health(1);
        let t0 = Instant::now();
        fail(&h, t0);
        let t1 = t0 + Duration::from_secs(11);
        drop(h.acquire(t1).unwrap());
        assert!(h.acquire(t1).unwrap().is_probe());
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn throttle_parks_until_retry_after() {
        let h = health(5);
        let t0 = Instant::now();
        h.acquire(t0)
            .unwrap()
            .record(Outcome::Throttled(Some(Duration::from_secs(7))));
        assert!(matches!(
            h.availability(Instant::now()),
            Err(Unavailable::Throttled(_))
        ));
        assert!(h
            .availability(Instant::now() + Duration::from_secs(8))
            .is_ok());
    }
}
