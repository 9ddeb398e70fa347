//! Downloading an image an upstream handed out as a URL, safely: only trusted hosts, never
//! loopback/private/link-local addresses unless allowed (checked on every resolved address, so
//! DNS cannot smuggle one in), no redirect to another host, a size cap and a timeout.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::ImageUrlPolicy;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    #[error("the image URL is not a valid http(s) URL")]
    BadUrl,
    #[error("the image host {0} is not trusted for this backend")]
    Untrusted(String),
    #[error("the image host {0} is a private, loopback or link-local address")]
    Private(String),
    #[error("the image download was redirected to another host")]
    Redirected,
    #[error("the image is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the image download did not finish in time")]
    Timeout,
    #[error("the image download failed: {0}")]
    Failed(String),
}

/// Addresses that must never be fetched on an upstream's say-so.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xFE00) == 0xFC00 // fc00::/7 unique local
                || (seg[0] & 0xFFC0) == 0xFE80 // fe80::/10 link local
        }
    }
}

/// A resolver that drops private addresses; a name that resolves only to such is an error.
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_private(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves only to private addresses").into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

pub struct ImageFetcher {
    guarded: reqwest::Client,
    open: reqwest::Client,
}

fn build(resolver: Option<Arc<PublicOnly>>) -> reqwest::Result<reqwest::Client> {
    let same_host = reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .first()
            .is_some_and(|first| first.host_str() == attempt.url().host_str());
        if same && attempt.previous().len() < 3 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    let mut b = reqwest::Client::builder()
        .redirect(same_host)
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")));
    if let Some(r) = resolver {
        b = b.dns_resolver(r);
    }
    b.build()
}

fn host_trusted(host: &str, trusted: &[String]) -> bool {
    let bare = |h: &str| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase()
    };
    let host = bare(host);
    trusted.iter().any(|t| {
        let t = bare(t);
        match t.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => host == t,
        }
    })
}

/// A client for calls the gateway makes to addresses a tenant chose (webhooks): every
/// resolved address must be public unless `allow_private`; redirects are not followed.
pub fn outbound_client(allow_private: bool, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")));
    if !allow_private {
        b = b.dns_resolver(Arc::new(PublicOnly));
    }
    b.build()
}

impl ImageFetcher {
    pub fn new() -> reqwest::Result<Self> {
        Ok(ImageFetcher {
            guarded: build(Some(Arc::new(PublicOnly)))?,
            open: build(None)?,
        })
    }

    /// Downloads `url` under `policy`, never past `deadline`.
    pub async fn fetch(
        &self,
        url: &str,
        policy: &ImageUrlPolicy,
        deadline: Instant,
    ) -> Result<Bytes, FetchError> {
        let parsed = url::Url::parse(url).map_err(|_| FetchError::BadUrl)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(FetchError::BadUrl);
        }
        let host = parsed.host_str().ok_or(FetchError::BadUrl)?.to_string();
        if !host_trusted(&host, &policy.trusted_hosts) {
            return Err(FetchError::Untrusted(host));
        }
        if !policy.allow_private {
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>() {
                if is_private(ip) {
                    return Err(FetchError::Private(host));
                }
            }
        }
        let timeout = policy
            .timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        if timeout.is_zero() {
            return Err(FetchError::Timeout);
        }
        let client = if policy.allow_private {
            &self.open
        } else {
            &self.guarded
        };
        let started = Instant::now();
        let mut resp = client
            .get(parsed)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| classify(e, &host))?;
        if resp.status().is_redirection() {
            return Err(FetchError::Redirected);
        }
        if !resp.status().is_success() {
            return Err(FetchError::Failed(format!(
                "HTTP {}",
                resp.status().as_u16()
            )));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > policy.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(policy.max_bytes));
        }
        let mut buf = BytesMut::with_capacity(
            resp.content_length()
                .unwrap_or(0)
                .min(policy.max_bytes as u64) as usize,
        );
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let chunk = tokio::time::timeout(left, resp.chunk())
                .await
                .map_err(|_| FetchError::Timeout)?
                .map_err(|e| classify(e, &host))?;
            let Some(chunk) = chunk else { break };
            if buf.len() + chunk.len() > policy.max_bytes {
                return Err(FetchError::TooLarge(policy.max_bytes));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

fn classify(e: reqwest::Error, host: &str) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout;
    }
    // The guarded resolver's refusal surfaces as a connect error with our message inside.
    let text = format!("{:?}", e);
    if text.contains("resolves only to private addresses") {
        return FetchError::Private(host.to_string());
    }
    FetchError::Failed(e.without_url().to_string())
}

#[async_trait::async_trait]
impl crate::backends::Download for ImageFetcher {
    async fn download(
        &self,
        url: &str,
        policy: &ImageUrlPolicy,
        deadline: Instant,
    ) -> Result<Bytes, String> {
        self.fetch(url, policy, deadline)
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "172.32.0.1"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn trusted_hosts_match_exactly_or_by_wildcard() {
        let t = vec![
            "api.example.com".to_string(),
            "*.blob.core.windows.net".to_string(),
        ];
        assert!(host_trusted("api.example.com", &t));
        assert!(host_trusted("API.example.com.", &t));
        assert!(host_trusted("x.blob.core.windows.net", &t));
        assert!(!host_trusted("blob.core.windows.net", &t));
        assert!(!host_trusted("evil.com", &t));
        assert!(!host_trusted("api.example.com.evil.com", &t));
    }
}
