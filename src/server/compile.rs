//! The compile step: turns a checked [`Config`] into the objects one config generation runs
//! on (TLS acceptors, the JWT verifier, the key table, backends with their workflows, price
//! tables, the router), each built once, and collects every error with its config path.
//! Start-up, reload and `imagegate check` all go through [`compile`]; `check` is load plus
//! compile, without binding a socket.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::auth::{JwtVerifier, StaticKeyStore};
use crate::backends::HttpClient;
use crate::config::{Config, ConfigError, ConfigErrors, TlsConfig};
use crate::metering::PriceTable;
use crate::routing::{ModelPrices, Router, RouterParts};

/// One config generation's running objects.
pub struct Compiled {
    /// The main listener's TLS (`None`: plain HTTP).
    pub tls: Option<Arc<TlsAcceptor>>,
    /// The admin listener's TLS.
    pub admin_tls: Option<Arc<TlsAcceptor>>,
    pub jwt: Option<JwtVerifier>,
    /// gateway.yaml's keys, indexed by secret hash.
    pub keys: StaticKeyStore,
    pub router: Router,
}

/// Builds everything `config` describes. `previous` (on reload) lends the health and capacity
/// state of backends whose config is unchanged. Every problem found is returned, each at its
/// path, so one run of `check` names them all.
pub fn compile(
    config: &Config,
    http: &HttpClient,
    previous: Option<&Router>,
) -> Result<Compiled, ConfigErrors> {
    let mut errors = Vec::new();
    let tls = tls_at("tls", config.tls.as_ref(), &mut errors);
    let admin_tls = tls_at("admin.tls", config.admin.tls.as_ref(), &mut errors);
    let jwt = config.jwt.as_ref().and_then(|j| {
        JwtVerifier::new(j)
            .map_err(|e| errors.push(ConfigError::new("jwt", e)))
            .ok()
    });
    let keys = StaticKeyStore::build(config)
        .map_err(|e| errors.extend(e))
        .ok();
    let downloader = downloader();
    let mut backends = BTreeMap::new();
    for (name, c) in &config.backends {
        match crate::backends::build(name, c, http, &downloader) {
            Ok(b) => {
                backends.insert(name.clone(), b);
            }
            Err(e) => errors.extend(e),
        }
    }
    let mut prices = HashMap::new();
    for (name, m) in &config.models {
        let mut problem = |field: &str, e: String| {
            errors.push(ConfigError::new(format!("models.{name}.{field}"), e))
        };
        let charged = PriceTable::for_model(m.price.as_ref(), &m.rules, &config.catalog)
            .map_err(|e| problem("price", e))
            .unwrap_or_default();
        let upstream = m.upstream_price.as_ref().map(|p| {
            PriceTable::explicit(p, &config.catalog)
                .map_err(|e| problem("upstream_price", e))
                .unwrap_or_default()
        });
        prices.insert(name.clone(), ModelPrices { charged, upstream });
    }
    let (Some(keys), true) = (keys, errors.is_empty()) else {
        return Err(ConfigErrors(errors));
    };
    let router =
        Router::build(config, RouterParts { backends, prices }, previous).map_err(ConfigErrors)?;
    for warning in super::models::shutdown_warnings(config, &crate::clock::today()) {
        tracing::warn!("{warning}");
    }
    Ok(Compiled {
        tls,
        admin_tls,
        jwt,
        keys,
        router,
    })
}

/// The SSRF-guarded image fetcher the provider backends download their outputs with (one per
/// process: its clients pool connections across reloads).
fn downloader() -> std::sync::Arc<dyn crate::backends::Download> {
    static FETCHER: std::sync::OnceLock<std::sync::Arc<crate::images::ImageFetcher>> =
        std::sync::OnceLock::new();
    FETCHER
        .get_or_init(|| {
            std::sync::Arc::new(
                crate::images::ImageFetcher::new().expect("the image fetcher's HTTP client"),
            )
        })
        .clone()
}

/// Load + compile without serving: what `imagegate check` runs on a loaded config.
pub fn check(config: &Config) -> Result<(), ConfigErrors> {
    let http = HttpClient::new()
        .map_err(|e| ConfigError::new("", format!("cannot build the HTTP client: {e}")))?;
    compile(config, &http, None).map(|_| ())
}

fn tls_at(
    path: &str,
    tls: Option<&TlsConfig>,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<TlsAcceptor>> {
    match super::tls::acceptor(tls?) {
        Ok(a) => Some(Arc::new(a)),
        Err(e) => {
            errors.push(ConfigError::new(path, e));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml, &|_| None).unwrap_or_else(|e| panic!("config: {e}"))
    }

    fn paths(errors: &ConfigErrors) -> Vec<&str> {
        errors.0.iter().map(|e| e.path.as_str()).collect()
    }

    /// A config whose every section is fine by itself but names files and values that only
    /// building can check: every problem comes back at once, each at its path.
    #[tokio::test]
    async fn errors_of_every_section_come_back_together_with_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let workflow = dir.path().join("workflow.json");
        std::fs::write(&workflow, "{ not json").unwrap();
        let yaml = format!(
            r#"
tls: {{cert: {m}/cert.pem, key: {m}/key.pem}}
jwt: {{issuer: i, audience: a, public_keys: [{m}/jwt.pem]}}
backends:
  sandbox: {{kind: sandbox}}
  comfy:
    kind: comfyui
    base_url: http://127.0.0.1:8188
    workflow: {w}
    inputs: {{prompt: 6.inputs.text, width: 5.inputs.width, height: 5.inputs.height, batch_size: 5.inputs.batch_size}}
models:
  dall-e-2:
    rules: dall-e-2
    route: {{targets: [{{backend: sandbox}}]}}
    price: {{per_image: [{{size: big, micro_usd: 1}}]}}
    upstream_price: {{per_image: [{{size: 256x256, quality: ultra, micro_usd: 1}}]}}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: a, tenant: t, secret: sk-same-secret}}
  - {{id: b, tenant: t, secret: sk-same-secret}}
"#,
            m = missing.display(),
            w = workflow.display(),
        );
        let http = HttpClient::new().unwrap();
        let Err(errors) = compile(&config(&yaml), &http, None) else {
            panic!("compiled a config with six errors");
        };
        let found = paths(&errors);
        for want in [
            "tls",
            "jwt",
            "backends.comfy.workflow",
            "models.dall-e-2.price",
            "models.dall-e-2.upstream_price",
            "keys[1]",
        ] {
            assert!(found.contains(&want), "{want} missing from {found:?}");
        }
        assert_eq!(found.len(), 6, "{errors}");
        let text = errors.to_string();
        assert!(
            text.contains("keys[1]: two keys have the same secret"),
            "{text}"
        );
        assert!(text.contains("unknown quality \"ultra\""), "{text}");
    }

    /// A workflow that cannot be used is named by its file, and each mapped input the
    /// workflow lacks by its own path.
    #[tokio::test]
    async fn a_bad_workflow_file_is_named_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let workflow = dir.path().join("graph.json");
        let yaml = |w: &std::path::Path| {
            format!(
                r#"
backends:
  comfy:
    kind: comfyui
    base_url: http://127.0.0.1:8188
    workflow: {}
    inputs: {{prompt: 6.inputs.text, width: 5.inputs.width, height: 5.inputs.height, batch_size: 5.inputs.batch_size}}
models:
  sdxl: {{rules: dall-e-2, route: {{targets: [{{backend: comfy}}]}}}}
"#,
                w.display()
            )
        };
        let http = HttpClient::new().unwrap();
        let shown = workflow.display().to_string();

        let missing = compile(&config(&yaml(&workflow)), &http, None)
            .err()
            .unwrap();
        assert_eq!(paths(&missing), ["backends.comfy.workflow"]);
        assert!(missing.0[0].message.contains(&shown), "{missing}");

        std::fs::write(&workflow, r#"{"a": 1}"#).unwrap();
        let not_api = compile(&config(&yaml(&workflow)), &http, None)
            .err()
            .unwrap();
        assert_eq!(paths(&not_api), ["backends.comfy.workflow"]);
        assert!(not_api.0[0].message.contains("API-format"), "{not_api}");

        // Node 5 exists and has the sizes; node 6 is missing.
        std::fs::write(
            &workflow,
            r#"{"5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1, "height": 1, "batch_size": 1}}}"#,
        )
        .unwrap();
        let no_node = compile(&config(&yaml(&workflow)), &http, None)
            .err()
            .unwrap();
        assert_eq!(paths(&no_node), ["backends.comfy.inputs.prompt"]);
        assert!(no_node.0[0].message.contains("no node \"6\""), "{no_node}");

        // The edit workflow is read and checked the same way, at its own paths.
        let with_edit = yaml(&workflow).replace(
            "    inputs:",
            &format!(
                "    edit_workflow: {}\n    edit_inputs: {{prompt: 6.inputs.text, image: 1.inputs.image}}\n    inputs:",
                dir.path().join("edit.json").display()
            ),
        );
        let missing_edit = compile(&config(&with_edit), &http, None).err().unwrap();
        let found = paths(&missing_edit);
        assert!(
            found.contains(&"backends.comfy.edit_workflow"),
            "{missing_edit}"
        );
        assert!(
            found.contains(&"backends.comfy.inputs.prompt"),
            "both workflows' errors together: {missing_edit}"
        );
    }

    /// A reload keeps the health and capacity state of backends whose config did not change,
    /// and starts afresh those whose config did.
    #[tokio::test]
    async fn a_recompile_keeps_the_state_of_unchanged_backends() {
        let yaml = |max: u32| {
            format!(
                r#"
backends:
  a: {{kind: sandbox, max_concurrency: 4}}
  b: {{kind: sandbox, max_concurrency: {max}}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: a}}, {{backend: b}}]}}}}
"#
            )
        };
        let http = HttpClient::new().unwrap();
        let first = compile(&config(&yaml(2)), &http, None).ok().unwrap();
        let same = compile(&config(&yaml(3)), &http, Some(&first.router))
            .ok()
            .unwrap();
        let route = |c: &Compiled| {
            c.router
                .model("dall-e-2")
                .unwrap()
                .targets()
                .iter()
                .map(|t| (t.backend_name.to_string(), t.health.clone()))
                .collect::<Vec<_>>()
        };
        let (before, after) = (route(&first), route(&same));
        for ((name, h0), (_, h1)) in before.iter().zip(&after) {
            assert_eq!(Arc::ptr_eq(h0, h1), name == "a", "backend {name}");
        }
    }
}
