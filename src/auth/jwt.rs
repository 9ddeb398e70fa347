//! JWT bearer auth for enterprises that issue their own tokens: HS256 with a shared secret, or
//! RS256/ES256 with public keys (PEM files or a JWKS file, matched by `kid`). `iss` and `aud`
//! are required, `exp`/`nbf` checked with a leeway. Which algorithms are accepted follows from
//! the keys configured: HS256 only with a secret and only against that secret, so a token
//! "signed" with a public key as an HMAC secret (alg confusion) never verifies; `alg: none`
//! never parses.

use std::collections::HashSet;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::AuthError;
use crate::config::JwtConfig;

struct KeyEntry {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

pub struct JwtVerifier {
    config: JwtConfig,
    hs256: Option<DecodingKey>,
    keys: Vec<KeyEntry>,
}

/// Whether a bearer token looks like a JWT rather than an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

fn family(kty_rsa: bool) -> Algorithm {
    if kty_rsa {
        Algorithm::RS256
    } else {
        Algorithm::ES256
    }
}

impl JwtVerifier {
    /// Loads the keys; errors name the file.
    pub fn new(config: &JwtConfig) -> Result<Self, String> {
        let mut keys = Vec::new();
        for path in &config.public_keys {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let text = String::from_utf8_lossy(&pem);
            let (alg, key) = if text.contains("BEGIN EC") || is_ec_public(&text) {
                (Algorithm::ES256, DecodingKey::from_ec_pem(&pem))
            } else {
                (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem))
            };
            let key =
                key.map_err(|e| format!("{}: not an RSA or EC public key ({e})", path.display()))?;
            keys.push(KeyEntry {
                kid: None,
                alg,
                key,
            });
        }
        if let Some(path) = &config.jwks_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a JWKS ({e})", path.display()))?;
            for jwk in &set.keys {
                let key =
                    DecodingKey::from_jwk(jwk).map_err(|e| format!("{}: {e}", path.display()))?;
                let rsa = matches!(
                    jwk.algorithm,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
                );
                keys.push(KeyEntry {
                    kid: jwk.common.key_id.clone(),
                    alg: family(rsa),
                    key,
                });
            }
        }
        let hs256 = config
            .hs256_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.expose().as_bytes()));
        if hs256.is_none() && keys.is_empty() {
            return Err("jwt needs hs256_secret, public_keys or jwks_file".into());
        }
        Ok(JwtVerifier {
            config: config.clone(),
            hs256,
            keys,
        })
    }

    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    /// The token's claims, if it is genuine, current and meant for us.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Unknown)?;
        let candidates: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.hs256.iter().collect(),
            alg @ (Algorithm::RS256 | Algorithm::ES256) => match &header.kid {
                Some(kid) => self
                    .keys
                    .iter()
                    .filter(|k| k.alg == alg && k.kid.as_deref() == Some(kid.as_str()))
                    .map(|k| &k.key)
                    .collect(),
                None => self
                    .keys
                    .iter()
                    .filter(|k| k.alg == alg)
                    .map(|k| &k.key)
                    .collect(),
            },
            _ => Vec::new(),
        };
        if candidates.is_empty() {
            return Err(AuthError::Unknown);
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".into(), "iss".into(), "aud".into()]);
        for key in candidates {
            if let Ok(data) = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                return Ok(data.claims);
            }
        }
        Err(AuthError::Unknown)
    }

    /// Whether the claims carry the configured admin role.
    pub fn is_admin(&self, claims: &Map<String, Value>) -> bool {
        let (Some(claim), Some(value)) = (&self.config.admin_claim, &self.config.admin_value)
        else {
            return false;
        };
        match claims.get(claim) {
            Some(Value::String(s)) => s == value,
            Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(value)),
            _ => false,
        }
    }
}

/// Whether a `BEGIN PUBLIC KEY` (SubjectPublicKeyInfo) PEM holds an EC key: its algorithm is
/// the id-ecPublicKey OID 1.2.840.10045.2.1.
fn is_ec_public(pem: &str) -> bool {
    use base64::Engine;
    const EC_OID: &[u8] = &[0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .is_ok_and(|der| der.windows(EC_OID.len()).any(|w| w == EC_OID))
}
