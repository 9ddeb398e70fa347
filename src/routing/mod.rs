//! Model name -> the backend that serves it. A model's route lists targets in priority tiers
//! (lower first) with weights; a request goes to a weighted random target of the best tier.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::api::ModelRules;
use crate::backends::Backend;
use crate::config::Config;

pub struct Target {
    pub backend_name: Arc<str>,
    pub backend: Arc<dyn Backend>,
    pub upstream_model: Option<String>,
    pub weight: u32,
    pub priority: u32,
}

pub struct ModelRoute {
    pub rules: ModelRules,
    pub timeout: Duration,
    /// Sorted by priority.
    targets: Vec<Target>,
}

impl ModelRoute {
    /// A weighted random choice among the targets of the best tier.
    pub fn pick(&self) -> &Target {
        let tier = self.targets[0].priority;
        let tier: Vec<&Target> = self
            .targets
            .iter()
            .take_while(|t| t.priority == tier)
            .collect();
        let total: u64 = tier.iter().map(|t| u64::from(t.weight)).sum();
        let mut roll = rand::rng().random_range(0..total.max(1));
        for t in &tier {
            if roll < u64::from(t.weight) {
                return t;
            }
            roll -= u64::from(t.weight);
        }
        tier[0]
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

pub struct Router {
    models: HashMap<String, ModelRoute>,
}

impl Router {
    /// Builds every model's route. The config is validated: every target names a backend
    /// and every model's rules resolve.
    pub fn from_config(config: &Config, http: &reqwest::Client) -> Result<Self, String> {
        let backends: HashMap<&str, Arc<dyn Backend>> = config
            .backends
            .iter()
            .map(|(name, c)| (name.as_str(), crate::backends::build(c, http)))
            .collect();
        let mut models = HashMap::new();
        for (name, m) in &config.models {
            let rules = m
                .rules
                .resolve()
                .map_err(|e| format!("models.{name}.rules: {e}"))?;
            let mut targets = m
                .route
                .targets
                .iter()
                .map(|t| {
                    let backend = backends.get(t.backend.as_str()).cloned().ok_or_else(|| {
                        format!("models.{name}: unknown backend \"{}\"", t.backend)
                    })?;
                    Ok(Target {
                        backend_name: Arc::from(t.backend.as_str()),
                        backend,
                        upstream_model: t.model.clone(),
                        weight: t.weight.max(1),
                        priority: t.priority,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            if targets.is_empty() {
                return Err(format!("models.{name}: no targets"));
            }
            targets.sort_by_key(|t| t.priority);
            models.insert(
                name.clone(),
                ModelRoute {
                    rules,
                    timeout: m.timeout,
                    targets,
                },
            );
        }
        Ok(Router { models })
    }

    pub fn model(&self, name: &str) -> Option<&ModelRoute> {
        self.models.get(name)
    }

    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}
