//! Signed, expiring image URLs: `?expires=<unix secs>&signature=<base64url HMAC-SHA256>` over
//! the file name and the expiry. Any replica holding the same key verifies any link.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed signature")]
    Malformed,
    #[error("signature does not match")]
    Invalid,
    #[error("link expired")]
    Expired,
}

impl UrlSigner {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        UrlSigner { key: key.into() }
    }

    /// A key for another purpose (`label`), derived from this one: replicas that share the
    /// signing key share it too, and neither key reveals the other.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(b"imagegate derive\0");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The configured key, or the one kept in `data_dir/url-signing.key` (made on first use).
    pub fn load_or_create(configured: Option<&str>, data_dir: &Path) -> std::io::Result<Self> {
        if let Some(key) = configured {
            return Ok(UrlSigner::new(key.as_bytes()));
        }
        let path = data_dir.join("url-signing.key");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if let Ok(key) = hex::decode(text.trim()) {
                    if key.len() >= 32 {
                        return Ok(UrlSigner::new(key));
                    }
                }
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} does not hold a hex key of 32+ bytes", path.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let key: [u8; 32] = rand::random();
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                match opts.open(&path) {
                    Ok(mut file) => {
                        std::io::Write::write_all(&mut file, hex::encode(key).as_bytes())?;
                        Ok(UrlSigner::new(key.to_vec()))
                    }
                    // Another process made it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(None, data_dir)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn mac(&self, name: &str, expires: u64) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(name.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The query string (without `?`) of a link to `name` valid for `ttl` from `now`.
    pub fn sign(&self, name: &str, now: SystemTime, ttl: Duration) -> (String, SystemTime) {
        // Whole seconds, rounded up: a link never lives shorter than its TTL.
        let at = (now + ttl).duration_since(UNIX_EPOCH).unwrap_or_default();
        let expires = at.as_secs() + u64::from(at.subsec_nanos() > 0);
        let expires_at = UNIX_EPOCH + Duration::from_secs(expires);
        let sig = B64.encode(self.mac(name, expires).finalize().into_bytes());
        (format!("expires={expires}&signature={sig}"), expires_at)
    }

    /// Checks a link's query string; returns its expiry.
    pub fn verify(
        &self,
        name: &str,
        query: Option<&str>,
        now: SystemTime,
    ) -> Result<SystemTime, SignatureError> {
        let (mut expires, mut signature) = (None, None);
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "expires" => expires = v.parse::<u64>().ok(),
                "signature" => signature = B64.decode(v.as_bytes()).ok(),
                _ => {}
            }
        }
        let (expires, signature) = expires.zip(signature).ok_or(SignatureError::Malformed)?;
        self.mac(name, expires)
            .verify_slice(&signature)
            .map_err(|_| SignatureError::Invalid)?;
        let at = UNIX_EPOCH + Duration::from_secs(expires);
        if at <= now {
            return Err(SignatureError::Expired);
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_reject_tampering_and_expiry() {
        let s = UrlSigner::new(b"k".repeat(32));
        let now = SystemTime::now();
        let (q, _) = s.sign("abc.png", now, Duration::from_secs(60));
        assert!(s.verify("abc.png", Some(&q), now).is_ok());
        assert_eq!(
            s.verify("abd.png", Some(&q), now),
            Err(SignatureError::Invalid)
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            s.verify("abc.png", Some(&q), later),
            Err(SignatureError::Expired)
        );
        let bumped = q.replacen("expires=", "expires=9", 1);
        assert_eq!(
            s.verify("abc.png", Some(&bumped), now),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            s.verify("abc.png", None, now),
            Err(SignatureError::Malformed)
        );
        let other = UrlSigner::new(b"j".repeat(32));
        assert_eq!(
            other.verify("abc.png", Some(&q), now),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn generated_key_is_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = UrlSigner::load_or_create(None, dir.path()).unwrap();
        let b = UrlSigner::load_or_create(None, dir.path()).unwrap();
        let now = SystemTime::now();
        let (q, _) = a.sign("x.png", now, Duration::from_secs(5));
        assert!(b.verify("x.png", Some(&q), now).is_ok());
    }
}
