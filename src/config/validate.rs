//! Semantic checks that serde cannot express and that need nothing but the config itself:
//! references between sections, value ranges, URL and header shapes, rule resolution. Every
//! error names its path. What needs files or other modules (TLS certificates, JWT keys, key
//! hashes, price tables, ComfyUI workflows) is checked where it is built, in the compile step
//! (`server::compile`).

use std::collections::HashSet;

use crate::api::{Quality, Size};

use super::{BackendConfig, Config, ConfigError, KeyConfig};

fn check_http_url(path: String, url: &str, errors: &mut Vec<ConfigError>) {
    match url::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
        Ok(_) => errors.push(ConfigError::new(
            path,
            format!("\"{url}\" is not an http(s) URL"),
        )),
        Err(e) => errors.push(ConfigError::new(
            path,
            format!("invalid URL \"{url}\": {e}"),
        )),
    }
}

/// The checks of one list of route targets, at `at` (`models.NAME.route.targets`).
fn check_targets(
    config: &Config,
    targets: &[super::TargetConfig],
    at: &str,
    errors: &mut Vec<ConfigError>,
) {
    for (i, target) in targets.iter().enumerate() {
        let path = format!("{at}[{i}]");
        if !config.backends.contains_key(&target.backend) {
            errors.push(ConfigError::new(
                format!("{path}.backend"),
                format!("unknown backend \"{}\"", target.backend),
            ));
        }
        if target.dialect == super::Dialect::GptImage {
            let remote = matches!(
                config.backends.get(&target.backend),
                Some(BackendConfig::Openai(_) | BackendConfig::Azure(_))
            );
            if !remote {
                errors.push(ConfigError::new(
                    format!("{path}.dialect"),
                    "the gpt-image dialect applies to openai and azure backends only",
                ));
            }
        }
        let t = &target.translation;
        for (dalle, gpt) in &t.quality {
            if Quality::parse(dalle).is_none() || crate::api::GptQuality::parse(gpt).is_none() {
                errors.push(ConfigError::new(
                    format!("{path}.translation.quality.{dalle}"),
                    "maps a DALL·E quality (standard, hd) to a GPT image one (low, medium, high, xhigh, max, auto)",
                ));
            }
        }
        if t.max_n == 0 || t.max_n > 10 {
            errors.push(ConfigError::new(
                format!("{path}.translation.max_n"),
                "must be between 1 and 10",
            ));
        }
        for (j, size) in t.sizes.iter().flatten().enumerate() {
            if size.parse::<Size>().is_err() {
                errors.push(ConfigError::new(
                    format!("{path}.translation.sizes[{j}]"),
                    format!("\"{size}\" is not a size of the form WIDTHxHEIGHT"),
                ));
            }
        }
        if target.weight == 0 {
            errors.push(ConfigError::new(
                format!("{path}.weight"),
                "must be at least 1",
            ));
        }
    }
}

pub fn validate(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();

    if let Some(url) = &config.public_url {
        check_http_url("public_url".into(), url, &mut errors);
    }
    if config.state.store == super::StoreChoice::Postgres && config.state.postgres.is_none() {
        errors.push(ConfigError::new(
            "state.postgres",
            "store: postgres needs the database URL here",
        ));
    }
    for (i, t) in config.admin.tokens_sha256.iter().enumerate() {
        if t.len() != 64 || hex::decode(t).is_err() {
            errors.push(ConfigError::new(
                format!("admin.tokens_sha256[{i}]"),
                "must be 64 hexadecimal characters (imagegate hash-key)",
            ));
        }
    }
    if config.server.max_body_bytes < 1024 {
        errors.push(ConfigError::new(
            "server.max_body_bytes",
            "must be at least 1024 bytes",
        ));
    }
    if config.server.max_upload_bytes < 1024 {
        errors.push(ConfigError::new(
            "server.max_upload_bytes",
            "must be at least 1024 bytes",
        ));
    }
    if config.server.body_timeout < std::time::Duration::from_secs(1) {
        errors.push(ConfigError::new(
            "server.body_timeout",
            "must be at least 1s",
        ));
    }
    if !(1024..=1024 * 1024).contains(&config.server.max_header_bytes) {
        errors.push(ConfigError::new(
            "server.max_header_bytes",
            "must be between 1024 bytes and 1 MiB",
        ));
    }
    if !(8..=1000).contains(&config.server.max_headers) {
        errors.push(ConfigError::new(
            "server.max_headers",
            "must be between 8 and 1000",
        ));
    }
    if config.server.max_upload_memory < config.server.max_upload_bytes {
        errors.push(ConfigError::new(
            "server.max_upload_memory",
            "must be at least server.max_upload_bytes (one upload must fit)",
        ));
    }
    if config.images.url_ttl.as_secs() < 1 {
        errors.push(ConfigError::new("images.url_ttl", "must be at least 1s"));
    }
    match (&config.images.store, &config.images.s3) {
        (super::StoreKind::S3, None) => errors.push(ConfigError::new(
            "images.s3",
            "the s3 store needs an `s3` section (bucket, endpoint, ...)",
        )),
        (super::StoreKind::S3, Some(s3)) => {
            if s3.bucket.is_empty() {
                errors.push(ConfigError::new("images.s3.bucket", "must not be empty"));
            }
            if let Some(endpoint) = &s3.endpoint {
                check_http_url("images.s3.endpoint".into(), endpoint, &mut errors);
            }
        }
        _ => {}
    }
    if let Some(key) = &config.images.signing_key {
        if key.expose().len() < 32 {
            errors.push(ConfigError::new(
                "images.signing_key",
                "must be at least 32 characters",
            ));
        }
    }

    for (name, backend) in &config.backends {
        let path = |field: &str| format!("backends.{name}.{field}");
        if backend.capacity().max_concurrency == Some(0) {
            errors.push(ConfigError::new(
                path("max_concurrency"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        let health = backend.health();
        if health.eject_after == 0 {
            errors.push(ConfigError::new(
                path("health.eject_after"),
                "must be at least 1",
            ));
        }
        if health.max_ejection < health.ejection {
            errors.push(ConfigError::new(
                path("health.max_ejection"),
                "must not be shorter than health.ejection",
            ));
        }
        match backend {
            BackendConfig::Openai(c) => {
                check_http_url(path("base_url"), &c.base_url, &mut errors);
                check_headers(&c.headers, &path("headers"), &mut errors);
            }
            BackendConfig::Azure(c) => {
                check_http_url(path("endpoint"), &c.endpoint, &mut errors);
                check_headers(&c.headers, &path("headers"), &mut errors);
            }
            BackendConfig::Sandbox(_) => {}
            BackendConfig::Automatic1111(c) => {
                check_http_url(path("base_url"), &c.base_url, &mut errors);
                if c.max_batch == 0 {
                    errors.push(ConfigError::new(path("max_batch"), "must be at least 1"));
                }
                check_denoising(
                    &path,
                    c.edit_denoising_strength,
                    c.variation_denoising_strength,
                    &mut errors,
                );
                if c.username.is_some() != c.password.is_some() {
                    errors.push(ConfigError::new(
                        path("password"),
                        "give both username and password, or neither",
                    ));
                }
            }
            BackendConfig::Gemini(c)
            | BackendConfig::Bfl(c)
            | BackendConfig::Fal(c)
            | BackendConfig::Stability(c)
            | BackendConfig::Replicate(c) => {
                if let Some(url) = &c.base_url {
                    check_http_url(path("base_url"), url, &mut errors);
                }
                let (kind, _) = backend.provider().expect("a provider kind");
                errors.extend(c.problems(kind, &format!("backends.{name}")));
            }
            BackendConfig::Comfyui(c) => {
                check_http_url(path("base_url"), &c.base_url, &mut errors);
                check_comfy_inputs(c, &path("inputs"), &mut errors);
                check_comfy_edit(c, &path, &mut errors);
            }
        }
    }

    for (name, model) in &config.models {
        if let Err(message) = model.rules.resolve(&config.catalog) {
            errors.push(ConfigError::new(format!("models.{name}.rules"), message));
        }
        if model.route.targets.is_empty() {
            errors.push(ConfigError::new(
                format!("models.{name}.route.targets"),
                "a route needs at least one target",
            ));
        }
        check_targets(
            config,
            &model.route.targets,
            &format!("models.{name}.route.targets"),
            &mut errors,
        );
        for (i, o) in model.route.overrides.iter().enumerate() {
            let path = format!("models.{name}.route.overrides[{i}]");
            if o.tenants.is_empty() && o.labels.is_empty() {
                errors.push(ConfigError::new(
                    path.clone(),
                    "an override selects its tenants by `tenants`, `labels` or both",
                ));
            }
            for (j, t) in o.tenants.iter().enumerate() {
                if !config.tenants.contains_key(t) && config.state.store == super::StoreChoice::None
                {
                    errors.push(ConfigError::new(
                        format!("{path}.tenants[{j}]"),
                        format!("unknown tenant \"{t}\""),
                    ));
                }
            }
            if o.targets.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.targets"),
                    "an override needs at least one target",
                ));
            }
            check_targets(config, &o.targets, &format!("{path}.targets"), &mut errors);
        }
        if model.route.max_attempts == Some(0) {
            errors.push(ConfigError::new(
                format!("models.{name}.route.max_attempts"),
                "must be at least 1",
            ));
        }
        if model.timeout.is_zero() {
            errors.push(ConfigError::new(
                format!("models.{name}.timeout"),
                "must be above 0",
            ));
        }
    }

    for (name, tenant) in &config.tenants {
        if let Some(w) = tenant.labels.get("weight") {
            if let Err(e) = super::parse_weight(w) {
                errors.push(ConfigError::new(format!("tenants.{name}.labels.weight"), e));
            }
        }
        if let Some(m) = tenant.labels.get("max_share") {
            if let Err(e) = super::parse_share(m) {
                errors.push(ConfigError::new(
                    format!("tenants.{name}.labels.max_share"),
                    e,
                ));
            }
        }
        check_model_refs(
            config,
            &tenant.models,
            &format!("tenants.{name}.models"),
            &mut errors,
        );
        let limits = &tenant.limits;
        for (field, value) in [
            ("requests_per_minute", limits.requests_per_minute),
            ("images_per_minute", limits.images_per_minute),
            ("burst", limits.burst),
        ] {
            if value == Some(0) {
                errors.push(ConfigError::new(
                    format!("tenants.{name}.limits.{field}"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
    }

    let mut ids = HashSet::new();
    for (i, key) in config.keys.iter().enumerate() {
        let path = format!("keys[{i}]");
        if key.id.is_empty() {
            errors.push(ConfigError::new(format!("{path}.id"), "must not be empty"));
        } else if !ids.insert(key.id.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate key id \"{}\"", key.id),
            ));
        }
        if !config.tenants.contains_key(&key.tenant) {
            errors.push(ConfigError::new(
                format!("{path}.tenant"),
                format!("unknown tenant \"{}\"", key.tenant),
            ));
        }
        if let Err(message) = check_key_secret(key) {
            errors.push(ConfigError::new(path.clone(), message));
        }
        if let Some(models) = &key.models {
            check_model_refs(config, models, &format!("{path}.models"), &mut errors);
        }
    }
    errors
}

/// A key gives its secret one way: `secret_sha256` (64 hexadecimal characters) or `secret`
/// (at least 8 characters). Whether two keys share a secret is found when the key table is
/// built (`auth::StaticKeyStore::build`), which hashes them.
fn check_key_secret(key: &KeyConfig) -> Result<(), String> {
    match (&key.secret_sha256, &key.secret) {
        (Some(_), Some(_)) => Err("give either `secret_sha256` or `secret`, not both".into()),
        (None, None) => Err("a key needs `secret_sha256` (preferred) or `secret`".into()),
        (Some(hex_hash), None) => {
            let hex_hash = hex_hash.trim();
            if hex_hash.len() == 64 && hex::decode(hex_hash).is_ok() {
                Ok(())
            } else {
                Err("secret_sha256 must be 64 hexadecimal characters".into())
            }
        }
        (None, Some(secret)) if secret.expose().len() < 8 => {
            Err("secret must be at least 8 characters".into())
        }
        (None, Some(_)) => Ok(()),
    }
}

/// Every field ComfyUI needs is mapped, and only fields we know (where each goes in the
/// workflow is checked when the workflow is read, in the compile step).
fn check_comfy_inputs(c: &super::ComfyConfig, inputs_path: &str, errors: &mut Vec<ConfigError>) {
    for field in super::COMFY_REQUIRED {
        if !c.inputs.contains_key(*field) {
            errors.push(ConfigError::new(
                inputs_path,
                format!("`{field}` must be mapped to a node input"),
            ));
        }
    }
    for field in c.inputs.keys() {
        if !super::COMFY_FIELDS.contains(&field.as_str()) {
            errors.push(ConfigError::new(
                format!("{inputs_path}.{field}"),
                format!("unknown field (known: {})", super::COMFY_FIELDS.join(", ")),
            ));
        }
    }
}

/// A local node's img2img strengths, each 0-1.
fn check_denoising(
    path: &dyn Fn(&str) -> String,
    edit: f32,
    variation: f32,
    errors: &mut Vec<ConfigError>,
) {
    for (field, v) in [
        ("edit_denoising_strength", edit),
        ("variation_denoising_strength", variation),
    ] {
        if !(0.0..=1.0).contains(&v) {
            errors.push(ConfigError::new(path(field), "must be between 0 and 1"));
        }
    }
}

/// An edit workflow maps `prompt` and `image`, and only fields we know; its inputs mean
/// nothing without it.
fn check_comfy_edit(
    c: &super::ComfyConfig,
    path: &dyn Fn(&str) -> String,
    errors: &mut Vec<ConfigError>,
) {
    check_denoising(
        path,
        c.edit_denoising_strength,
        c.variation_denoising_strength,
        errors,
    );
    if c.edit_workflow.is_none() {
        if !c.edit_inputs.is_empty() {
            errors.push(ConfigError::new(
                path("edit_inputs"),
                "edit_inputs need an edit_workflow",
            ));
        }
        return;
    }
    for field in super::COMFY_EDIT_REQUIRED {
        if !c.edit_inputs.contains_key(*field) {
            errors.push(ConfigError::new(
                path("edit_inputs"),
                format!("`{field}` must be mapped to a node input"),
            ));
        }
    }
    for field in c.edit_inputs.keys() {
        let known = super::COMFY_FIELDS.contains(&field.as_str())
            || super::COMFY_EDIT_FIELDS.contains(&field.as_str());
        if !known {
            errors.push(ConfigError::new(
                path(&format!("edit_inputs.{field}")),
                format!(
                    "unknown field (known: {}, {})",
                    super::COMFY_FIELDS.join(", "),
                    super::COMFY_EDIT_FIELDS.join(", ")
                ),
            ));
        }
    }
}

fn check_headers(
    headers: &std::collections::BTreeMap<String, super::Secret>,
    path: &str,
    errors: &mut Vec<ConfigError>,
) {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            errors.push(ConfigError::new(
                format!("{path}.{name}"),
                "invalid header name",
            ));
        }
        if http::HeaderValue::from_str(value.expose()).is_err() {
            errors.push(ConfigError::new(
                format!("{path}.{name}"),
                "invalid header value",
            ));
        }
    }
}

fn check_model_refs(config: &Config, models: &[String], path: &str, errors: &mut Vec<ConfigError>) {
    for (i, model) in models.iter().enumerate() {
        if model != "*" && !config.models.contains_key(model) {
            errors.push(ConfigError::new(
                format!("{path}[{i}]"),
                format!("unknown model \"{model}\""),
            ));
        }
    }
}
