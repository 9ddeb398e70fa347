//! The model catalog: per public model name, its rules, operations, prices, lifecycle and
//! provider, as data. The built-in one (`catalog/models.yaml`, embedded at build time) is
//! merged with the files gateway.yaml lists under `catalog:`, in order, each entry of a later
//! file replacing the entry of the same name; `extends` starts an entry from another (in a
//! later file, the one before it of the same name too). Dated snapshots resolve to their
//! family's entry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::api::{
    Background, Family, FlexibleSizes, GptQuality, InputFidelity, ModelRules, Operation,
    OutputFormat, Quality, Size, Style, UnknownFields,
};

use super::{ConfigError, CustomRules, PriceConfig, RulesConfig};

/// The catalog shipped with the binary.
pub const BUILTIN: &str = include_str!("../../catalog/models.yaml");

/// One catalog file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    pub models: BTreeMap<String, EntryConfig>,
}

/// One model as a catalog file writes it; every field but `extends` falls back to the entry
/// it extends.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryConfig {
    #[serde(default)]
    pub extends: Option<String>,
    /// Who serves it upstream (`openai`, `google`, `bfl`, ..., or `local`).
    #[serde(default)]
    pub provider: Option<String>,
    /// Dated names that resolve to this entry (`gpt-image-2-2026-04-21`).
    #[serde(default)]
    pub snapshots: Vec<String>,
    #[serde(default)]
    pub rules: Option<CustomRules>,
    #[serde(default)]
    pub price: Option<PriceConfig>,
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// `YYYY-MM-DD`.
    #[serde(default)]
    pub released: Option<String>,
    /// `YYYY-MM-DD`: from this day the provider no longer serves the model.
    #[serde(default)]
    pub shutdown_date: Option<String>,
    /// What to use instead, named in the 404 of a request for a shut-down model.
    #[serde(default)]
    pub replacement: Option<String>,
}

/// A resolved entry.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// The family name (a snapshot's entry is its family's).
    pub name: String,
    pub provider: String,
    pub snapshots: Vec<String>,
    pub rules: ModelRules,
    pub price: Option<PriceConfig>,
    pub lifecycle: LifecycleConfig,
}

impl CatalogEntry {
    /// Shut down on or before `today` (`YYYY-MM-DD`).
    pub fn is_shut_down(&self, today: &str) -> bool {
        self.lifecycle
            .shutdown_date
            .as_deref()
            .is_some_and(|d| d <= today)
    }
}

/// Every entry by name, snapshots included.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Catalog {
    entries: BTreeMap<String, Arc<CatalogEntry>>,
}

impl Catalog {
    /// The built-in catalog alone (parsed once per process).
    pub fn builtin() -> Arc<Catalog> {
        static BUILT: OnceLock<Arc<Catalog>> = OnceLock::new();
        BUILT
            .get_or_init(|| {
                let mut catalog = Catalog::default();
                let errors = catalog.add_text(BUILTIN, "catalog(built-in)");
                assert!(
                    errors.is_empty(),
                    "the built-in catalog is invalid: {errors:?}"
                );
                Arc::new(catalog)
            })
            .clone()
    }

    /// The built-in catalog with `files` merged over it, every problem at its path
    /// (`catalog[1].models.NAME.rules`).
    pub fn load(files: &[PathBuf]) -> Result<Arc<Catalog>, Vec<ConfigError>> {
        if files.is_empty() {
            return Ok(Self::builtin());
        }
        let mut catalog = (*Self::builtin()).clone();
        let mut errors = Vec::new();
        for (i, path) in files.iter().enumerate() {
            let at = format!("catalog[{i}]");
            match std::fs::read_to_string(path) {
                Ok(text) => errors.extend(catalog.add_text(&text, &at)),
                Err(e) => errors.push(ConfigError::new(
                    at,
                    format!("cannot read {}: {e}", path.display()),
                )),
            }
        }
        if errors.is_empty() {
            Ok(Arc::new(catalog))
        } else {
            Err(errors)
        }
    }

    /// Merges one file's entries; returns what is wrong with them (nothing is added then).
    fn add_text(&mut self, text: &str, at: &str) -> Vec<ConfigError> {
        let file: CatalogFile = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                serde_path_to_error::deserialize(v).map_err(|e| {
                    let path = e.path().to_string();
                    format!("{path}: {}", e.into_inner())
                })
            }) {
            Ok(f) => f,
            Err(e) => return vec![ConfigError::new(at, e)],
        };
        let below = self.clone();
        let mut errors = Vec::new();
        let mut done: BTreeMap<String, Arc<CatalogEntry>> = BTreeMap::new();
        for name in file.models.keys() {
            resolve(
                name,
                &file,
                &below,
                &mut done,
                &mut Vec::new(),
                at,
                &mut errors,
            );
        }
        // Names are unique across the merged catalog: a snapshot may not shadow another entry.
        for entry in done.values() {
            for snap in &entry.snapshots {
                if file.models.contains_key(snap) {
                    errors.push(ConfigError::new(
                        format!("{at}.models.{}.snapshots", entry.name),
                        format!("\"{snap}\" is also an entry of its own"),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return errors;
        }
        for (name, entry) in done {
            // A replaced family's old snapshots go with it.
            if let Some(old) = self.entries.get(&name).cloned() {
                for snap in &old.snapshots {
                    self.entries.remove(snap);
                }
            }
            for snap in &entry.snapshots {
                self.entries.insert(snap.clone(), entry.clone());
            }
            self.entries.insert(name, entry);
        }
        errors
    }

    pub fn get(&self, name: &str) -> Option<&Arc<CatalogEntry>> {
        self.entries.get(name)
    }

    /// Every name (families and snapshots), sorted.
    pub fn names(&self) -> impl Iterator<Item = (&str, &Arc<CatalogEntry>)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The rules of a catalog name, for `rules: NAME` and `rules: {preset: NAME, ...}`.
    pub fn rules(&self, name: &str) -> Result<ModelRules, String> {
        self.get(name).map(|e| e.rules.clone()).ok_or_else(|| {
            let families: Vec<&str> = self
                .entries
                .iter()
                .filter(|(k, e)| **k == e.name)
                .map(|(k, _)| k.as_str())
                .collect();
            format!(
                "\"{name}\" is not in the model catalog (its models: {}); write custom rules \
                 or add an entry with a `catalog:` file",
                families.join(", ")
            )
        })
    }
}

/// Resolves `name` of `file` (and what it extends) into `done`.
fn resolve(
    name: &str,
    file: &CatalogFile,
    below: &Catalog,
    done: &mut BTreeMap<String, Arc<CatalogEntry>>,
    visiting: &mut Vec<String>,
    at: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<CatalogEntry>> {
    if let Some(e) = done.get(name) {
        return Some(e.clone());
    }
    let path = format!("{at}.models.{name}");
    if visiting.iter().any(|v| v == name) {
        errors.push(ConfigError::new(
            format!("{path}.extends"),
            format!("extends itself through {}", visiting.join(" -> ")),
        ));
        return None;
    }
    let cfg = &file.models[name];
    let parent = match cfg.extends.as_deref() {
        None => None,
        // An entry extending its own name starts from the catalog below this file.
        Some(p) if p != name && file.models.contains_key(p) => {
            visiting.push(name.to_string());
            let got = resolve(p, file, below, done, visiting, at, errors);
            visiting.pop();
            Some(got?)
        }
        Some(p) => match below.get(p) {
            Some(e) => Some(e.clone()),
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.extends"),
                    format!("\"{p}\" is not in the catalog"),
                ));
                return None;
            }
        },
    };
    let base = match (
        &parent,
        cfg.rules.as_ref().and_then(|r| r.family.as_deref()),
    ) {
        (_, Some(f)) => match Family::parse(f) {
            Some(f) if parent.as_ref().is_some_and(|p| p.rules.family == f) => {
                parent.as_ref().map(|p| p.rules.clone())
            }
            Some(f) => Some(ModelRules::base(f)),
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.rules.family"),
                    format!("unknown family \"{f}\" (dall-e or gpt-image)"),
                ));
                return None;
            }
        },
        (Some(p), None) => Some(p.rules.clone()),
        (None, None) => None,
    };
    let Some(base) = base else {
        errors.push(ConfigError::new(
            format!("{path}.rules.family"),
            "an entry that extends nothing names its family (dall-e or gpt-image)",
        ));
        return None;
    };
    let rules = match &cfg.rules {
        Some(custom) => match custom.apply(base, below) {
            Ok(r) => r,
            Err(e) => {
                errors.push(ConfigError::new(format!("{path}.rules"), e));
                return None;
            }
        },
        None => base,
    };
    let mut ok = true;
    for e in rules.contradictions() {
        errors.push(ConfigError::new(format!("{path}.rules"), e));
        ok = false;
    }
    let price = cfg
        .price
        .clone()
        .or_else(|| parent.as_ref().and_then(|p| p.price.clone()));
    if let Some(price) = &price {
        for e in price.problems(&rules) {
            errors.push(ConfigError::new(format!("{path}.price"), e));
            ok = false;
        }
    }
    // A lifecycle is the model's own, unless an override file extends the entry it replaces.
    let inherited = match (&parent, cfg.extends.as_deref()) {
        (Some(p), Some(e)) if e == name => p.lifecycle.clone(),
        _ => LifecycleConfig::default(),
    };
    let lifecycle = LifecycleConfig {
        released: cfg.lifecycle.released.clone().or(inherited.released),
        shutdown_date: cfg
            .lifecycle
            .shutdown_date
            .clone()
            .or(inherited.shutdown_date),
        replacement: cfg.lifecycle.replacement.clone().or(inherited.replacement),
    };
    for (field, date) in [
        ("released", &lifecycle.released),
        ("shutdown_date", &lifecycle.shutdown_date),
    ] {
        if let Some(d) = date {
            if !is_date(d) {
                errors.push(ConfigError::new(
                    format!("{path}.lifecycle.{field}"),
                    format!("\"{d}\" is not a date (YYYY-MM-DD)"),
                ));
                ok = false;
            }
        }
    }
    if let (Some(r), Some(s)) = (&lifecycle.released, &lifecycle.shutdown_date) {
        if s < r {
            errors.push(ConfigError::new(
                format!("{path}.lifecycle.shutdown_date"),
                format!("{s} is before the release ({r})"),
            ));
            ok = false;
        }
    }
    if lifecycle.replacement.as_deref() == Some(name) {
        errors.push(ConfigError::new(
            format!("{path}.lifecycle.replacement"),
            "a model cannot replace itself",
        ));
        ok = false;
    }
    let provider = cfg
        .provider
        .clone()
        .or_else(|| parent.as_ref().map(|p| p.provider.clone()));
    let Some(provider) = provider else {
        errors.push(ConfigError::new(
            format!("{path}.provider"),
            "name the provider (openai, google, bfl, fal, stability, replicate, local, ...)",
        ));
        return None;
    };
    if !ok {
        return None;
    }
    let entry = Arc::new(CatalogEntry {
        name: name.to_string(),
        provider,
        snapshots: cfg.snapshots.clone(),
        rules,
        price,
        lifecycle,
    });
    done.insert(name.to_string(), entry.clone());
    Some(entry)
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' || !digits(0..4) {
        return false;
    }
    if !digits(5..7) || !digits(8..10) {
        return false;
    }
    let (m, d): (u32, u32) = (s[5..7].parse().unwrap_or(0), s[8..10].parse().unwrap_or(0));
    (1..=12).contains(&m) && (1..=31).contains(&d)
}

impl RulesConfig {
    /// The effective rules of a model: a catalog name's, or custom rules (over a catalog
    /// name's when they name a `preset`).
    pub fn resolve(&self, catalog: &Catalog) -> Result<ModelRules, String> {
        let custom = match self {
            RulesConfig::Preset(name) => return catalog.rules(name),
            RulesConfig::Custom(custom) => custom,
        };
        let base = match custom.family.as_deref() {
            Some(f) => {
                ModelRules::base(Family::parse(f).ok_or_else(|| format!("unknown family \"{f}\""))?)
            }
            None => ModelRules::base(Family::DallE),
        };
        let rules = custom.apply(base, catalog)?;
        match rules.contradictions().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(rules),
        }
    }

    /// The catalog entry the rules come from, if any.
    pub fn entry<'c>(&self, catalog: &'c Catalog) -> Option<&'c Arc<CatalogEntry>> {
        match self {
            RulesConfig::Preset(name) => catalog.get(name),
            RulesConfig::Custom(c) => c.preset.as_deref().and_then(|n| catalog.get(n)),
        }
    }
}

impl CustomRules {
    /// These rules over `base` (a family's start, or a catalog entry's rules); a `preset`
    /// inside a catalog file is taken from `catalog`.
    pub fn apply(&self, mut rules: ModelRules, catalog: &Catalog) -> Result<ModelRules, String> {
        if let (Some(name), None) = (&self.preset, &self.family) {
            rules = catalog.rules(name)?;
        }
        if let Some(sizes) = &self.sizes {
            rules.sizes = sizes
                .iter()
                .map(|s| s.parse::<Size>())
                .collect::<Result<_, _>>()?;
            if rules.sizes.is_empty() && !matches!(self.size_grid, Some(Some(_))) {
                return Err("`sizes` must list at least one size".into());
            }
        }
        if let Some(None) = &self.size_grid {
            rules.flexible_sizes = None;
        }
        if let Some(Some(g)) = &self.size_grid {
            if g.multiple == 0 || g.max_aspect == 0 || g.min_pixels > g.max_pixels {
                return Err("size_grid: multiple and max_aspect must be at least 1 and \
                            min_pixels at most max_pixels"
                    .into());
            }
            rules.flexible_sizes = Some(FlexibleSizes {
                multiple: g.multiple,
                max_aspect: g.max_aspect,
                max_edge: g.max_edge,
                min_pixels: g.min_pixels,
                max_pixels: g.max_pixels,
            });
        }
        match &self.default_size {
            Some(s) => rules.default_size = s.parse::<Size>()?,
            None if !rules.sizes.contains(&rules.default_size) && !rules.sizes.is_empty() => {
                rules.default_size = rules.sizes[0];
            }
            None => {}
        }
        if let Some(a) = self.auto_size {
            rules.auto_size = a;
        }
        if let Some(n) = self.max_n {
            if !(1..=10).contains(&n) {
                return Err(format!("max_n must be between 1 and 10, got {n}"));
            }
            rules.max_n = n;
        }
        if let Some(chars) = self.max_prompt_chars {
            if chars == 0 {
                return Err("max_prompt_chars must be at least 1".into());
            }
            rules.max_prompt_chars = chars;
        }
        if let Some(q) = &self.quality {
            if rules.family == Family::GptImage {
                rules.gpt_qualities = choices(q, GptQuality::parse, "quality")?;
            } else {
                rules.qualities = choices(q, Quality::parse, "quality")?;
            }
        }
        if let Some(s) = &self.style {
            rules.styles = choices(s, Style::parse, "style")?;
        }
        if let Some(r) = self.revised_prompt {
            rules.revised_prompt = r;
        }
        if let Some(f) = &self.output_format {
            rules.output_formats = choices(f, OutputFormat::parse, "output_format")?;
        }
        if let Some(b) = &self.background {
            rules.backgrounds = choices(b, Background::parse, "background")?;
        }
        if let Some(f) = &self.input_fidelity {
            rules.input_fidelity = choices(f, InputFidelity::parse, "input_fidelity")?;
        }
        if let Some(m) = self.markup {
            rules.markup = m;
        }
        if let Some(c) = self.complexity {
            rules.complexity = c;
        }
        if let Some(s) = self.stream {
            rules.stream = s;
        }
        if let Some(u) = &self.unknown_fields {
            rules.unknown_fields = UnknownFields::parse(u)
                .ok_or_else(|| format!("unknown_fields must be refuse or pass, not \"{u}\""))?;
        }
        if let Some(ops) = &self.operations {
            rules.operations = choices(ops, Operation::parse, "operation")?;
        }
        Ok(rules)
    }
}

fn choices<T: Copy>(
    values: &[String],
    parse: fn(&str) -> Option<T>,
    field: &str,
) -> Result<Vec<T>, String> {
    values
        .iter()
        .map(|v| parse(v).ok_or_else(|| format!("unknown {field} value \"{v}\"")))
        .collect()
}
