//! Console sessions: a signed cookie (no server-side table, so any replica that shares the
//! URL signing key honours it), a CSRF token bound to the session, and a per-address limit on
//! login attempts. Nothing secret is in the cookie: an admin token is named by a keyed
//! fingerprint of its hash, an API key by its id, and every request re-checks that the
//! credential still works (token still configured, key not revoked, disabled or expired).

use std::net::IpAddr;
use std::num::NonZeroU32;

use base64::Engine;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::ConsoleConfig;
use crate::images::UrlSigner;

type HmacSha256 = Hmac<Sha256>;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Who {
    /// An admin token of gateway.yaml: `fp` is a keyed fingerprint of its SHA-256, `name` the
    /// first 12 hex digits of that hash (the audit log's name for it).
    AdminToken {
        fp: String,
        name: String,
    },
    AdminJwt {
        sub: String,
    },
    /// A store API key of `tenant` (the portal).
    Key {
        tenant: String,
        key: String,
    },
}

impl Who {
    pub fn actor(&self) -> String {
        match self {
            Who::AdminToken { name, .. } => format!("admin:token:{name}"),
            Who::AdminJwt { sub } => format!("admin:jwt:{sub}"),
            Who::Key { key, .. } => format!("key:{key}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Random; names the session for its CSRF token and its logout.
    pub sid: String,
    /// Unix seconds.
    pub exp: u64,
    pub who: Who,
}

pub struct Console {
    key: [u8; 32],
    logins: DefaultKeyedRateLimiter<IpAddr>,
    /// Sessions logged out before they expire, until they do (this replica's).
    ended: DashMap<String, u64>,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

impl Console {
    pub fn new(signer: &UrlSigner, config: &ConsoleConfig) -> Self {
        let per_minute =
            NonZeroU32::new(config.login_attempts_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Console {
            key: signer.derive("console session v1"),
            logins: RateLimiter::keyed(Quota::per_minute(per_minute)),
            ended: DashMap::new(),
        }
    }

    fn mac(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// The fingerprint a session keeps of an admin token's SHA-256 (hex).
    pub fn token_fingerprint(&self, sha256: &str) -> String {
        hex::encode(&self.mac("admin token", sha256.as_bytes())[..16])
    }

    /// Whether another login attempt from `ip` may be tried now.
    pub fn login_allowed(&self, ip: IpAddr) -> bool {
        if self.logins.len() > 10_000 {
            self.logins.retain_recent();
        }
        self.logins.check_key(&ip).is_ok()
    }

    /// A new session's cookie value, for `site` (`/console` or `/portal`: a cookie of one
    /// never opens the other).
    pub fn issue(&self, site: &str, who: Who, exp: u64) -> (Session, String) {
        let session = Session {
            sid: b64(&rand::random::<[u8; 16]>()),
            exp,
            who,
        };
        let body = b64(&serde_json::to_vec(&session).unwrap_or_default());
        let sig = b64(&self.mac(&format!("session {site}"), body.as_bytes()));
        (session, format!("{body}.{sig}"))
    }

    /// The session a cookie value carries, if it is ours, unexpired and not logged out.
    pub fn open(&self, site: &str, cookie: &str, now: u64) -> Option<Session> {
        let (body, sig) = cookie.split_once('.')?;
        let want = self.mac(&format!("session {site}"), body.as_bytes());
        let got = B64.decode(sig).ok()?;
        if !bool::from(got.as_slice().ct_eq(&want[..])) {
            return None;
        }
        let session: Session = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        if session.exp <= now || self.ended.contains_key(&session.sid) {
            return None;
        }
        Some(session)
    }

    pub fn end(&self, session: &Session, now: u64) {
        self.ended.retain(|_, exp| *exp > now);
        self.ended.insert(session.sid.clone(), session.exp);
    }

    /// The CSRF token of a session's forms.
    pub fn csrf(&self, session: &Session) -> String {
        b64(&self.mac("csrf", session.sid.as_bytes()))
    }

    pub fn csrf_ok(&self, session: &Session, token: &str) -> bool {
        bool::from(self.csrf(session).as_bytes().ct_eq(token.as_bytes()))
    }

    /// The token of a login form, tied to the pre-login cookie `nonce`.
    pub fn login_csrf(&self, nonce: &str) -> String {
        b64(&self.mac("login", nonce.as_bytes()))
    }

    pub fn login_csrf_ok(&self, nonce: &str, token: &str) -> bool {
        !nonce.is_empty() && bool::from(self.login_csrf(nonce).as_bytes().ct_eq(token.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Console {
        Console::new(&UrlSigner::new(vec![7u8; 32]), &ConsoleConfig::default())
    }

    #[test]
    fn a_cookie_opens_only_unaltered_unexpired_and_not_ended() {
        let c = console();
        let who = Who::Key {
            tenant: "a".into(),
            key: "k1".into(),
        };
        let (s, cookie) = c.issue("/portal", who.clone(), 1_000);
        assert_eq!(c.open("/portal", &cookie, 999).map(|s| s.who), Some(who));
        assert!(c.open("/console", &cookie, 999).is_none(), "another site's");
        assert!(c.open("/portal", &cookie, 1_000).is_none(), "expired");
        // Another tenant in the same signature: refused.
        let (body, sig) = cookie.split_once('.').unwrap();
        let mut forged: Session = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        forged.who = Who::Key {
            tenant: "b".into(),
            key: "k1".into(),
        };
        let forged = format!("{}.{sig}", b64(&serde_json::to_vec(&forged).unwrap()));
        assert!(c.open("/portal", &forged, 10).is_none());
        // Another gateway's key: refused.
        let other = Console::new(&UrlSigner::new(vec![8u8; 32]), &ConsoleConfig::default());
        assert!(other.open("/portal", &cookie, 10).is_none());
        c.end(&s, 10);
        assert!(c.open("/portal", &cookie, 10).is_none(), "logged out");
    }

    #[test]
    fn csrf_tokens_are_per_session() {
        let c = console();
        let (a, _) = c.issue("/console", Who::AdminJwt { sub: "x".into() }, 100);
        let (b, _) = c.issue("/console", Who::AdminJwt { sub: "x".into() }, 100);
        assert!(c.csrf_ok(&a, &c.csrf(&a)));
        assert!(!c.csrf_ok(&a, &c.csrf(&b)));
        assert!(!c.csrf_ok(&a, ""));
        assert!(c.login_csrf_ok("n1", &c.login_csrf("n1")));
        assert!(!c.login_csrf_ok("", &c.login_csrf("")));
    }

    #[test]
    fn logins_are_limited_per_address() {
        let c = Console::new(
            &UrlSigner::new(vec![1u8; 32]),
            &ConsoleConfig {
                login_attempts_per_minute: 3,
                ..ConsoleConfig::default()
            },
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..3).all(|_| c.login_allowed(ip)));
        assert!(!c.login_allowed(ip));
        assert!(c.login_allowed("10.0.0.2".parse().unwrap()));
    }
}
