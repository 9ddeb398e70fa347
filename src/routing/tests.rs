use super::*;
use crate::backends::SandboxBackend;
use crate::config::Strategy;
use crate::config::{HealthConfig, SandboxConfig};
use health::Outcome;
use std::collections::HashSet;

fn route(strategy: Strategy, targets: &[(&str, u32, u32)]) -> Pool {
    let mut targets: Vec<Target> = targets
        .iter()
        .map(|&(name, weight, priority)| Target {
            series: crate::telemetry::metrics().backend_series(&Arc::from(name)),
            backend_name: Arc::from(name),
            backend: Arc::new(SandboxBackend::new(&SandboxConfig::default())),
            health: BackendHealth::new(
                name,
                HealthConfig {
                    eject_after: 1,
                    ..HealthConfig::default()
                },
            ),
            capacity: Arc::new(capacity::CapacityGate::new(
                name,
                crate::config::BackendConfig::Sandbox(SandboxConfig::default()).capacity(),
            )),
            url_policy: Arc::new(
                crate::config::BackendConfig::Sandbox(SandboxConfig::default()).image_url_policy(),
            ),
            upstream_price: Default::default(),
            upstream_model: None,
            dialect: crate::config::Dialect::DallE,
            translation: Arc::new(crate::backends::translate::Translation::default()),
            weight,
            priority,
        })
        .collect();
    targets.sort_by_key(|t| t.priority);
    Pool {
        strategy,
        max_attempts: 3,
        retry_on: HashSet::new(),
        targets,
    }
}

fn pick(r: &Pool) -> &str {
    let mut tried = vec![false; r.targets.len()];
    let (i, _permit) = r.select(&mut tried, Instant::now()).unwrap();
    &r.targets[i].backend_name
}

#[test]
fn weights_3_to_1_split_4000_picks_within_a_few_percent() {
    let r = route(Strategy::Weighted, &[("a", 3, 0), ("b", 1, 0)]);
    let a = (0..4000).filter(|_| pick(&r) == "a").count();
    let share = a as f64 / 4000.0;
    assert!((share - 0.75).abs() < 0.03, "a got {share}");
}

#[test]
fn least_outstanding_avoids_the_busy_target_and_respects_weights() {
    let r = route(
        Strategy::LeastOutstanding,
        &[("busy", 1, 0), ("idle", 1, 0)],
    );
    // Hold ten requests in flight on "busy".
    let _held: Vec<_> = (0..10)
        .map(|_| r.targets[0].health.acquire(Instant::now()).unwrap())
        .collect();
    let busy = (0..1000).filter(|_| pick(&r) == "busy").count();
    // Two distinct candidates are always compared: the busy one never wins.
    assert_eq!(busy, 0, "busy got {busy}/1000");

    let r = route(Strategy::LeastOutstanding, &[("a", 3, 0), ("b", 1, 0)]);
    let a = (0..4000).filter(|_| pick(&r) == "a").count();
    assert!(a > 2800, "weights still count when idle: a got {a}/4000");
}

#[test]
fn lower_tier_only_while_the_upper_tier_is_unavailable() {
    let r = route(Strategy::Weighted, &[("backup", 1, 1), ("main", 1, 0)]);
    assert!((0..200).all(|_| pick(&r) == "main"));
    r.targets[0]
        .health
        .acquire(Instant::now())
        .unwrap()
        .record(Outcome::Failure);
    assert!((0..200).all(|_| pick(&r) == "backup"));
    // Untried-target rule: a request that already tried main moves on to backup.
    let r = route(Strategy::Weighted, &[("backup", 1, 1), ("main", 1, 0)]);
    let mut tried = vec![true, false];
    let (i, _) = r.select(&mut tried, Instant::now()).unwrap();
    assert_eq!(&*r.targets[i].backend_name, "backup");
}

#[test]
fn nothing_available_reports_the_earliest_recovery() {
    let r = route(Strategy::Weighted, &[("a", 1, 0)]);
    r.targets[0]
        .health
        .acquire(Instant::now())
        .unwrap()
        .record(Outcome::Throttled(Some(Duration::from_secs(9))));
    let mut tried = vec![false];
    let err = r.select(&mut tried, Instant::now()).err().unwrap();
    let wait = err.unwrap().saturating_duration_since(Instant::now());
    assert!(wait > Duration::from_secs(8) && wait <= Duration::from_secs(9));
}
