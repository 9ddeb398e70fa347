//! The HTTP client every remote backend shares.
//!
//! Two engines behind one call ([`HttpClient::post_json`]): plain `http://` upstreams (local
//! GPU nodes, OpenAI-compatible servers on the LAN, the benchmark's fake) go through hyper's
//! HTTP/1.1 connections directly, kept alive in our own pool ([`super::pool`]); `https://`
//! upstreams (OpenAI, Azure), URLs carrying credentials, and any upstream while a proxy is
//! configured in the environment go through reqwest, which brings TLS, the platform's roots,
//! Basic auth from the URL and proxy support. reqwest wraps the same hyper-util client, but per
//! request it clones its client and connector, converts its `Url` back into a `Uri` and runs a
//! retry layer: on one core that was ~13 µs of a ~40 µs relay (bench/README.md), a third of
//! what the gateway's hot path may spend. Both engines: no redirects (an API call that
//! redirects is a misconfiguration, and following it could leak credentials), a 5 s connect timeout,
//! idle connections kept 60 s, TCP_NODELAY, our User-Agent, one deadline over the whole
//! exchange, and a cap on the answer's size.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};

use super::pool::{Failure, Origin, Pool};
use super::BackendError;

/// Largest upstream answer we read (ten large base64 PNGs fit comfortably).
pub(crate) const MAX_ANSWER_BYTES: usize = 96 * 1024 * 1024;

const USER_AGENT: &str = concat!("imagegate/", env!("CARGO_PKG_VERSION"));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_IDLE: Duration = super::pool::IDLE;

/// Shared by all remote backends; cheap to clone (both engines are handles to one pool).
#[derive(Clone)]
pub struct HttpClient {
    reqwest: reqwest::Client,
    /// `None` while the environment names a proxy (`HTTP_PROXY`, `ALL_PROXY`): only reqwest
    /// honours those.
    plain: Option<Pool>,
}

/// An upstream URL, parsed once when the config is loaded.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: reqwest::Url,
    /// The same URL for hyper, when it is plain `http://`.
    plain: Option<PlainTarget>,
}

/// A plain `http://` URL as the direct engine sends to it.
#[derive(Debug, Clone)]
struct PlainTarget {
    origin: Origin,
    /// Path and query (origin-form), as the request line carries them.
    path: String,
    /// The `Host` header: the URL's host, and its port when it names one.
    host: HeaderValue,
}

impl PlainTarget {
    fn of(url: &reqwest::Url) -> Option<Self> {
        // `user:password@` is Basic auth, which reqwest sends.
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let connect_to = match url.host()? {
            url::Host::Domain(d) => d.to_string(),
            url::Host::Ipv4(a) => a.to_string(),
            url::Host::Ipv6(a) => a.to_string(),
        };
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str()?),
            None => url.host_str()?.to_string(),
        };
        Some(PlainTarget {
            origin: Origin {
                host: connect_to.into(),
                port: url.port_or_known_default()?,
            },
            path: url[url::Position::BeforePath..url::Position::AfterQuery].to_string(),
            host: HeaderValue::from_str(&host).ok()?,
        })
    }
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        let plain = PlainTarget::of(&parsed);
        Ok(Endpoint { url: parsed, plain })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }
}

/// A whole upstream answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpClient {
    pub fn new() -> reqwest::Result<Self> {
        let proxied = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
        Self::build(!proxied)
    }

    /// `plain: false` sends every request through reqwest.
    fn build(plain: bool) -> reqwest::Result<Self> {
        let reqwest = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE)
            .tcp_nodelay(true)
            .user_agent(USER_AGENT)
            .build()?;
        let plain = plain.then(|| Pool::new(CONNECT_TIMEOUT));
        Ok(HttpClient { reqwest, plain })
    }

    /// For the calls `post_json` does not cover (polling, uploads, event streams).
    pub fn reqwest(&self) -> &reqwest::Client {
        &self.reqwest
    }

    /// POSTs `body` (JSON) with `headers` and reads the whole answer, all within `timeout`;
    /// an answer over `cap` bytes is refused.
    pub async fn post_json(
        &self,
        endpoint: &Endpoint,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
        cap: usize,
    ) -> Result<Reply, BackendError> {
        match (&self.plain, &endpoint.plain) {
            (Some(pool), Some(target)) => {
                tokio::time::timeout(timeout, post_plain(pool, target, headers, body, cap))
                    .await
                    .map_err(|_| BackendError::Timeout)?
            }
            _ => {
                let resp = self
                    .reqwest
                    .post(endpoint.url.clone())
                    .headers(headers)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .timeout(timeout)
                    .send()
                    .await
                    .map_err(transport_error)?;
                read_reply(resp, cap).await
            }
        }
    }
}

async fn post_plain(
    pool: &Pool,
    target: &PlainTarget,
    mut headers: HeaderMap,
    body: Bytes,
    cap: usize,
) -> Result<Reply, BackendError> {
    // A `Host` the backend's configured headers name wins (an ingress routing by name).
    headers
        .entry(http::header::HOST)
        .or_insert_with(|| target.host.clone());
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if !headers.contains_key(http::header::USER_AGENT) {
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(USER_AGENT),
        );
    }
    let answer = pool
        .post(&target.origin, &target.path, headers, &body, cap)
        .await
        .map_err(|e| match e {
            Failure::Connect(why) => BackendError::Connect(why),
            Failure::Broken(message) => BackendError::Status { status: 0, message },
            Failure::TooLarge => too_large(cap),
        })?;
    Ok(Reply {
        status: answer.status,
        headers: answer.headers,
        body: answer.body,
    })
}

fn too_large(cap: usize) -> BackendError {
    BackendError::BadResponse(format!("answer larger than {cap} bytes"))
}

/// A reqwest answer's whole body, refused past `cap` bytes.
/// A whole answer: status, headers, and the body up to `cap` bytes.
pub(crate) async fn read_reply(resp: reqwest::Response, cap: usize) -> Result<Reply, BackendError> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = read_capped(resp, cap).await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Bytes, BackendError> {
    // Size the buffer once from Content-Length, so a 20 MB answer is not regrown and copied.
    let expected = resp.content_length().unwrap_or(0).min(cap as u64) as usize;
    let mut buf = BytesMut::with_capacity(expected);
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        if buf.len() + chunk.len() > cap {
            return Err(too_large(cap));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub(crate) fn transport_error(e: reqwest::Error) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout
    } else if e.is_connect() {
        BackendError::Connect(e.without_url().to_string())
    } else {
        BackendError::Status {
            status: 0,
            message: e.without_url().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-connection-at-a-time HTTP/1.1 server that answers every request with `answer`
    /// (raw bytes, written in two parts) after `delay`, and reports each request head it read.
    async fn server(
        answer: &'static [u8],
        delay: Duration,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 4096];
                        // Head, then as many body bytes as Content-Length says.
                        let (head_end, len) = loop {
                            let Ok(n) = s.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            req.extend_from_slice(&buf[..n]);
                            if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&req[..i]).to_lowercase();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                break (i + 4, len);
                            }
                        };
                        while req.len() < head_end + len {
                            let Ok(n) = s.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            req.extend_from_slice(&buf[..n]);
                        }
                        let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
                        tokio::time::sleep(delay).await;
                        let (a, b) = answer.split_at(answer.len() / 2);
                        if s.write_all(a).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        if s.write_all(b).await.is_err() {
                            return;
                        }
                        if answer.windows(17).any(|w| w == b"connection: close") {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/v1/images/generations"), rx)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-up: 1\r\ncontent-length: 11\r\n\r\n{\"data\":[]}";
    const LIMITED: &[u8] =
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n{}";

    fn engines() -> [(&'static str, HttpClient); 2] {
        [
            ("hyper", HttpClient::build(true).unwrap()),
            ("reqwest", HttpClient::build(false).unwrap()),
        ]
    }

    /// An empty POST to `ep` with the test headers.
    async fn post(
        client: &HttpClient,
        ep: &Endpoint,
        timeout: Duration,
        cap: usize,
    ) -> Result<Reply, BackendError> {
        client
            .post_json(ep, headers(), Bytes::new(), timeout, cap)
            .await
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer sk-up"));
        h
    }

    #[tokio::test]
    async fn both_engines_send_the_same_request_and_read_the_same_answer() {
        for (name, client) in engines() {
            let (url, mut seen) = server(OK, Duration::ZERO).await;
            let ep = Endpoint::parse(&url).unwrap();
            assert!(ep.plain.is_some());
            for _ in 0..2 {
                let r = client
                    .post_json(
                        &ep,
                        headers(),
                        Bytes::from_static(b"{\"prompt\":\"x\"}"),
                        Duration::from_secs(5),
                        1024,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
                assert_eq!(r.status, 200, "{name}");
                assert_eq!(&r.body[..], b"{\"data\":[]}", "{name}");
                assert_eq!(r.headers.get("x-up").unwrap(), "1", "{name}");
                let req = seen.recv().await.unwrap().to_lowercase();
                assert!(
                    req.starts_with("post /v1/images/generations http/1.1\r\n"),
                    "{name}: {req}"
                );
                for line in [
                    "authorization: bearer sk-up",
                    "content-type: application/json",
                    "content-length: 14",
                    &format!("user-agent: {}", USER_AGENT.to_lowercase()),
                ] {
                    assert!(req.contains(line), "{name}: {line:?} missing in {req}");
                }
                assert!(req.ends_with("{\"prompt\":\"x\"}"), "{name}: {req}");
            }
        }
    }

    /// `Host` is the URL's authority, unless the backend's headers name one.
    #[tokio::test]
    async fn both_engines_send_host_and_keep_a_configured_one() {
        for (name, client) in engines() {
            let (url, mut seen) = server(OK, Duration::ZERO).await;
            let authority = url.trim_start_matches("http://").split('/').next().unwrap();
            let ep = Endpoint::parse(&url).unwrap();
            post(&client, &ep, Duration::from_secs(5), 1024)
                .await
                .unwrap();
            let req = seen.recv().await.unwrap().to_lowercase();
            assert!(
                req.contains(&format!("\r\nhost: {authority}\r\n")),
                "{name}: {req}"
            );

            let mut h = headers();
            h.insert("host", HeaderValue::from_static("gpu.internal"));
            client
                .post_json(&ep, h, Bytes::new(), Duration::from_secs(5), 1024)
                .await
                .unwrap();
            let req = seen.recv().await.unwrap().to_lowercase();
            assert!(req.contains("\r\nhost: gpu.internal\r\n"), "{name}: {req}");
            assert_eq!(req.matches("\r\nhost:").count(), 1, "{name}: {req}");
        }
    }

    /// A chunked answer, and a server that closes the connection after each one (as many
    /// Python and Go servers do): every request gets a fresh connection and the whole body.
    #[tokio::test]
    async fn both_engines_read_chunked_answers_and_reconnect_after_close() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\n{\"dat\r\n6\r\na\":[]}\r\n0\r\n\r\n";
        for (name, client) in engines() {
            let (url, mut seen) = server(CHUNKED, Duration::ZERO).await;
            let ep = Endpoint::parse(&url).unwrap();
            for _ in 0..3 {
                let r = post(&client, &ep, Duration::from_secs(5), 1024)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
                assert_eq!(
                    (r.status, &r.body[..]),
                    (200, &b"{\"data\":[]}"[..]),
                    "{name}"
                );
                seen.recv().await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn both_engines_map_failures_alike() {
        for (name, client) in engines() {
            // An error status is an answer, with its headers.
            let (url, _seen) = server(LIMITED, Duration::ZERO).await;
            let ep = Endpoint::parse(&url).unwrap();
            let r = post(&client, &ep, Duration::from_secs(5), 1024)
                .await
                .unwrap();
            assert_eq!(r.status, 429, "{name}");
            assert_eq!(r.headers.get("retry-after").unwrap(), "7", "{name}");

            // Too slow: a timeout, whole exchange included.
            let (url, _seen) = server(OK, Duration::from_secs(5)).await;
            let ep = Endpoint::parse(&url).unwrap();
            let e = post(&client, &ep, Duration::from_millis(200), 1024)
                .await
                .unwrap_err();
            assert!(matches!(e, BackendError::Timeout), "{name}: {e:?}");

            // Too big.
            let (url, _seen) = server(OK, Duration::ZERO).await;
            let ep = Endpoint::parse(&url).unwrap();
            let e = post(&client, &ep, Duration::from_secs(5), 5)
                .await
                .unwrap_err();
            assert!(matches!(e, BackendError::BadResponse(_)), "{name}: {e:?}");

            // Nobody listening.
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let ep = Endpoint::parse(&format!("http://127.0.0.1:{port}/v1")).unwrap();
            let e = post(&client, &ep, Duration::from_secs(5), 1024)
                .await
                .unwrap_err();
            assert!(matches!(e, BackendError::Connect(_)), "{name}: {e:?}");
        }
    }

    #[test]
    fn only_plain_http_takes_the_direct_engine() {
        assert!(
            Endpoint::parse("http://10.0.0.7:7860/v1/images/generations")
                .unwrap()
                .plain
                .is_some()
        );
        assert!(
            Endpoint::parse("https://api.openai.com/v1/images/generations")
                .unwrap()
                .plain
                .is_none()
        );
        assert!(Endpoint::parse("http://u:p@10.0.0.7/v1")
            .unwrap()
            .plain
            .is_none());
        assert!(Endpoint::parse("not a url").is_err());
        // What the direct engine connects to, puts in the request line and in `Host`.
        for (url, host, port, path, host_header) in [
            (
                "http://10.0.0.7:7860/v1/images/generations",
                "10.0.0.7",
                7860,
                "/v1/images/generations",
                "10.0.0.7:7860",
            ),
            (
                "http://gpu-node/v1?a=b",
                "gpu-node",
                80,
                "/v1?a=b",
                "gpu-node",
            ),
            ("http://[::1]:9/x", "::1", 9, "/x", "[::1]:9"),
        ] {
            let t = Endpoint::parse(url).unwrap().plain.unwrap();
            assert_eq!((&*t.origin.host, t.origin.port), (host, port), "{url}");
            assert_eq!(t.path.to_string(), path, "{url}");
            assert_eq!(t.host, host_header, "{url}");
        }
    }
}
