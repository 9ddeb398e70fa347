//! `imagegate models`: what a config serves (rules, operations, prices, lifecycle), the
//! catalog itself, and the warnings about routes whose upstream model is shut down.

use serde_json::{json, Value};

use crate::api::{Family, ModelRules};
use crate::config::{BackendConfig, CatalogEntry, Config, PriceConfig};
use crate::metering::PriceTable;

/// One warning per target that sends a provider a model name the catalog says is shut down
/// (on or before `today`): the request would fail upstream.
pub fn shutdown_warnings(config: &Config, today: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (name, m) in &config.models {
        for (i, t) in m.route.targets.iter().enumerate() {
            let remote = matches!(
                config.backends.get(&t.backend),
                Some(BackendConfig::Openai(_) | BackendConfig::Azure(_))
            );
            let upstream = t.model.as_deref().unwrap_or(name);
            let Some(entry) = config.catalog.get(upstream) else {
                continue;
            };
            if !remote || !entry.is_shut_down(today) {
                continue;
            }
            let date = entry.lifecycle.shutdown_date.as_deref().unwrap_or_default();
            let instead = entry
                .lifecycle
                .replacement
                .as_deref()
                .map(|r| format!("; route it to `{r}` instead"))
                .unwrap_or_default();
            out.push(format!(
                "models.{name}.route.targets[{i}]: the upstream model `{upstream}` was shut down \
                 on {date}{instead}"
            ));
        }
    }
    out
}

fn rules_json(r: &ModelRules) -> Value {
    let strs = |v: Vec<&str>| Value::from(v);
    let mut sizes: Vec<String> = r.sizes.iter().map(|s| s.to_string()).collect();
    if r.auto_size {
        sizes.push("auto".into());
    }
    let mut out = json!({
        "family": r.family.as_str(),
        "operations": strs(r.operations.iter().map(|o| o.as_str()).collect()),
        "max_prompt_chars": r.max_prompt_chars,
        "max_n": r.max_n,
        "sizes": sizes,
        "unknown_fields": r.unknown_fields.as_str(),
    });
    if let Some(g) = &r.flexible_sizes {
        out["size_grid"] = json!({"multiple": g.multiple, "max_aspect": g.max_aspect,
            "max_edge": g.max_edge, "min_pixels": g.min_pixels, "max_pixels": g.max_pixels});
    }
    match r.family {
        Family::DallE => {
            out["quality"] = strs(r.qualities.iter().map(|q| q.as_str()).collect());
            out["style"] = strs(r.styles.iter().map(|q| q.as_str()).collect());
        }
        Family::GptImage => {
            out["quality"] = strs(r.gpt_qualities.iter().map(|q| q.as_str()).collect());
            out["output_format"] = strs(r.output_formats.iter().map(|q| q.as_str()).collect());
            out["background"] = strs(r.backgrounds.iter().map(|q| q.as_str()).collect());
            out["input_fidelity"] = strs(r.input_fidelity.iter().map(|q| q.as_str()).collect());
            out["markup"] = r.markup.into();
            out["complexity"] = r.complexity.into();
            out["stream"] = r.stream.into();
        }
    }
    out
}

fn price_json(price: Option<&PriceConfig>) -> Value {
    match price {
        None => Value::Null,
        Some(PriceConfig::Preset(p)) => Value::from(p.as_str()),
        Some(PriceConfig::Table(t)) => serde_json::to_value(t).unwrap_or(Value::Null),
    }
}

fn entry_json(name: &str, e: &CatalogEntry) -> Value {
    json!({
        "name": name,
        "family_entry": e.name,
        "provider": e.provider,
        "snapshots": e.snapshots,
        "rules": rules_json(&e.rules),
        "price": price_json(e.price.as_ref()),
        "released": e.lifecycle.released,
        "shutdown_date": e.lifecycle.shutdown_date,
        "replacement": e.lifecycle.replacement,
    })
}

/// Every catalog name (snapshots included), one JSON object each.
pub fn catalog_json(config: &Config) -> Vec<Value> {
    config
        .catalog
        .names()
        .map(|(name, e)| entry_json(name, e))
        .collect()
}

/// Each model the config serves: its rules, the price it is charged at, the catalog entry its
/// rules come from (with its lifecycle) and its targets.
pub fn served_json(config: &Config) -> Vec<Value> {
    config
        .models
        .iter()
        .map(|(name, m)| {
            let rules = m.rules.resolve(&config.catalog).ok();
            let entry = m.rules.entry(&config.catalog);
            let price = PriceTable::for_model(m.price.as_ref(), &m.rules, &config.catalog);
            let per_1024 = |q: &'static str| {
                price
                    .as_ref()
                    .ok()
                    .map(|p| p.per_image(crate::api::Size::new(1024, 1024), Some(q)))
            };
            json!({
                "model": name,
                "rules": rules.as_ref().map(rules_json),
                "catalog_entry": entry.map(|e| e.name.clone()),
                "price": match &m.price { Some(p) => price_json(Some(p)),
                    None => price_json(entry.and_then(|e| e.price.as_ref())) },
                "per_image_1024x1024": {
                    "standard": per_1024("standard"), "medium": per_1024("medium"),
                    "high": per_1024("high"),
                },
                "token_rates_per_million": price.as_ref().ok().and_then(|p| p.token_rates()).map(|r| json!({
                    "text_input": r.text_input, "image_input": r.image_input,
                    "text_output": r.text_output, "image_output": r.image_output,
                })),
                "released": entry.and_then(|e| e.lifecycle.released.clone()),
                "shutdown_date": entry.and_then(|e| e.lifecycle.shutdown_date.clone()),
                "targets": m.route.targets.iter().map(|t| json!({
                    "backend": t.backend,
                    "model": t.model.as_deref().unwrap_or(name),
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// The table `imagegate models` prints.
pub fn served_text(config: &Config) -> String {
    let mut out = String::new();
    for m in served_json(config) {
        let r = &m["rules"];
        let list = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let money = |v: &Value| {
            v.as_u64()
                .map(crate::metering::dollars)
                .unwrap_or_else(|| "-".into())
        };
        let p = &m["per_image_1024x1024"];
        let per_image = if r["family"] == "gpt-image" {
            format!(
                "1024x1024 medium {} high {}",
                money(&p["medium"]),
                money(&p["high"])
            )
        } else {
            format!("1024x1024 standard {}", money(&p["standard"]))
        };
        let tokens = match &m["token_rates_per_million"] {
            Value::Object(t) => format!(
                "; per 1M tokens: text in {} image in {} text out {} image out {}",
                money(&t["text_input"]),
                money(&t["image_input"]),
                money(&t["text_output"]),
                money(&t["image_output"])
            ),
            _ => String::new(),
        };
        let grid = if r["size_grid"].is_object() {
            " + WxH grid"
        } else {
            ""
        };
        out.push_str(&format!(
            "{}  [{}; {}]  sizes {}{grid}; n<={}; quality {}\n    price: {per_image}{tokens}\n    \
             catalog: {}; released {}; shutdown {}\n",
            m["model"].as_str().unwrap_or_default(),
            r["family"].as_str().unwrap_or("?"),
            list(&r["operations"]),
            list(&r["sizes"]),
            r["max_n"],
            list(&r["quality"]),
            m["catalog_entry"].as_str().unwrap_or("(custom rules)"),
            m["released"].as_str().unwrap_or("-"),
            m["shutdown_date"].as_str().unwrap_or("-"),
        ));
    }
    out
}
