//! gateway.yaml: the typed configuration, `${ENV}` interpolation and validation.
//!
//! Loading is three steps: YAML -> `serde_yaml_ng::Value`, interpolate variables in strings,
//! then deserialize into [`Config`] through `serde_path_to_error` (so a typo names its path)
//! and run the semantic checks of [`validate`]. A `Config` that exists is valid; the hot path
//! never re-parses anything.

mod backends;
mod catalog;
mod interpolate;
mod models;
mod providers;
mod types;
mod validate;

use std::fmt;
use std::path::Path;

pub use backends::*;
pub use catalog::*;
pub use interpolate::expand;
pub use models::*;
pub use providers::*;
pub use types::*;

/// One problem in the configuration, at a dotted path such as
/// `models.dall-e-3.route.targets[0].backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found, one per line when displayed.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl Config {
    /// Reads and validates a config file, taking variables from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        Config::from_yaml(&text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML text with an explicit variable lookup (tests use this).
    pub fn from_yaml(
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::new("", format!("invalid YAML: {e}")))?;
        if doc.is_null() {
            doc = serde_yaml_ng::Value::Mapping(Default::default());
        }
        let mut errors = Vec::new();
        interpolate::interpolate(&mut doc, &mut Vec::new(), lookup, &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let mut config: Config = serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(path, e.into_inner().to_string())
        })?;
        config.catalog = Catalog::load(&config.catalog_files).map_err(ConfigErrors)?;
        let errors = validate::validate(&config);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests;
