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
    let mut backends = BTreeMap::new();
    for (name, c) in &config.backends {
        match crate::backends::build(name, c, http) {
            Ok(b) => {
                backends.insert(name.clone(), b);
            }
            Err(e) => errors.extend(e),
        }
    }
    let mut prices = HashMap::new();
    for (name, m) in &config.models {
        let mut table = |field: &str, price| {
            PriceTable::for_model(price, &m.rules)
                .map_err(|e| errors.push(ConfigError::new(format!("models.{name}.{field}"), e)))
                .unwrap_or_default()
        };
        let charged = table("price", m.price.as_ref());
        let upstream = match &m.upstream_price {
            Some(p) => table("upstream_price", Some(p)),
            None => PriceTable::default(),
        };
        prices.insert(name.clone(), ModelPrices { charged, upstream });
    }
    let (Some(keys), true) = (keys, errors.is_empty()) else {
        return Err(ConfigErrors(errors));
    };
    let router =
        Router::build(config, RouterParts { backends, prices }, previous).map_err(ConfigErrors)?;
    Ok(Compiled {
        tls,
        admin_tls,
        jwt,
        keys,
        router,
    })
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
