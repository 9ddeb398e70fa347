//! Test harness: the real gateway on an ephemeral loopback port, and fake upstreams that
//! speak the real protocols over real HTTP.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use imagegate::config::Config;
use imagegate::server::{serve, AppState};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub mod gpt;
pub mod local_nodes;
pub mod providers;

pub const DEMO_KEY: &str = "sk-imagegate-demo";

/// A running gateway. `${PORT}` and `${DATA_DIR}` in the YAML are filled in; other
/// variables come from `vars`.
pub struct Gateway {
    pub addr: SocketAddr,
    pub base: String,
    /// The admin listener (`/metrics`).
    pub admin_base: String,
    admin: tokio::task::JoinHandle<std::io::Result<()>>,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    pub async fn start(yaml: &str) -> Gateway {
        Self::start_with(yaml, &[]).await
    }

    pub async fn start_with(yaml: &str, vars: &[(&str, String)]) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data_dir = tempfile::tempdir().unwrap();
        let mut env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        env.insert("PORT".into(), addr.port().to_string());
        env.insert("DATA_DIR".into(), data_dir.path().display().to_string());
        let config = Config::from_yaml(yaml, &|name| env.get(name).cloned())
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let state = AppState::build(config).await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_base = format!("http://{}", admin_listener.local_addr().unwrap());
        let admin = tokio::spawn(imagegate::server::serve_admin(
            state.clone(),
            admin_listener,
        ));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(state, listener, async {
            let _ = rx.await;
        }));
        Gateway {
            addr,
            base: format!("http://{addr}"),
            admin_base,
            admin,
            data_dir,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a JSON body to /v1/images/generations with the demo key.
    pub async fn generate(&self, body: serde_json::Value) -> reqwest::Response {
        self.generate_as(DEMO_KEY, body).await
    }

    pub async fn generate_as(&self, key: &str, body: serde_json::Value) -> reqwest::Response {
        client()
            .post(self.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs with the demo key and an explicit `x-request-id`.
    pub async fn client_request(
        &self,
        body: serde_json::Value,
        request_id: &str,
    ) -> reqwest::Response {
        client()
            .post(self.url("/v1/images/generations"))
            .bearer_auth(DEMO_KEY)
            .header("x-request-id", request_id)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The Prometheus text of the admin listener.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin_base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.admin.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts an OpenAI-shaped error and returns its inner object.
pub async fn expect_error(resp: reqwest::Response, status: u16) -> serde_json::Value {
    let got = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(got, status, "body: {body}");
    let err = body["error"].clone();
    assert!(err["message"].is_string(), "no message in {body}");
    assert!(
        err.get("type").is_some() && err.get("param").is_some() && err.get("code").is_some(),
        "{body}"
    );
    err
}

/// A gateway config around a sandbox backend and the demo key; `extra_models` is YAML
/// inserted under `models:`, `extra_backends` under `backends:`.
/// `GET /v1/models` with the demo key answers 200: the gateway is serving.
pub async fn models_ok(gw: &Gateway) {
    let resp = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

pub fn sandbox_config(extra_backends: &str, extra_models: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:${{PORT}}
public_url: http://127.0.0.1:${{PORT}}
data_dir: ${{DATA_DIR}}
log: {{level: warn}}
backends:
  sandbox: {{kind: sandbox}}
{extra_backends}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}
{extra_models}
tenants:
  demo: {{models: ["*"]}}
  narrow: {{models: [dall-e-2]}}
  off: {{models: ["*"], disabled: true}}
keys:
  - {{id: demo, tenant: demo, secret: {DEMO_KEY}}}
  - {{id: narrow, tenant: narrow, secret: sk-narrow-key}}
  - {{id: revoked, tenant: demo, secret: sk-revoked-key, disabled: true}}
  - {{id: off, tenant: off, secret: sk-off-tenant-key}}
  - {{id: hashed, tenant: demo, secret_sha256: {}}}
"#,
        hex::encode(imagegate::auth::hash_secret("sk-hashed-secret"))
    )
}

/// One request as the fake upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
    pub raw: Bytes,
}

/// What the fake answers.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A fake OpenAI-compatible upstream over real HTTP.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub recorded: Arc<Mutex<Vec<Recorded>>>,
    /// The most POST requests (generation calls) it ever worked on at once; health GETs
    /// run beside jobs on real nodes too, so they are not counted.
    pub max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let rec = recorded.clone();
        let max_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (max_c, cur_c) = (max_in_flight.clone(), in_flight.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (handler, rec) = (handler.clone(), rec.clone());
                let (max_c, cur_c) = (max_c.clone(), cur_c.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (handler, rec) = (handler.clone(), rec.clone());
                        let (max_c, cur_c) = (max_c.clone(), cur_c.clone());
                        async move {
                            use std::sync::atomic::Ordering::SeqCst;
                            struct Done(Arc<std::sync::atomic::AtomicUsize>);
                            impl Drop for Done {
                                fn drop(&mut self) {
                                    self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            let _done = (req.method() == http::Method::POST).then(|| {
                                let now = cur_c.fetch_add(1, SeqCst) + 1;
                                max_c.fetch_max(now, SeqCst);
                                Done(cur_c.clone())
                            });
                            let (parts, body) = req.into_parts();
                            let bytes = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let recorded = Recorded {
                                method: parts.method.to_string(),
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body: serde_json::from_slice(&bytes)
                                    .unwrap_or(serde_json::Value::Null),
                                raw: bytes.clone(),
                            };
                            let reply = handler(&recorded);
                            rec.lock().unwrap().push(recorded);
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            let mut resp = Response::new(Full::new(reply.body));
                            *resp.status_mut() = http::StatusCode::from_u16(reply.status).unwrap();
                            for (k, v) in reply.headers {
                                resp.headers_mut().append(
                                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                    v.parse().unwrap(),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream {
            addr,
            recorded,
            max_in_flight,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `imagegate serve --config <config>` as ops run it (the real binary); killed when dropped.
pub fn serve_binary(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits (up to 10 s) until `{base}/healthz` answers.
pub async fn wait_healthy(base: &str) {
    for _ in 0..200 {
        if client().get(format!("{base}/healthz")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} did not come up");
}

/// A small real PNG, as an upstream would return it.
pub fn tiny_png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// An address where nothing listens: connections are refused.
/// A service the test script starts (PostgreSQL, Redis, S3), named by an environment
/// variable: `None` (the test skips that part) outside CI, a failure in CI.
pub fn service(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) => Some(v),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("{var} must name {what} in CI (scripts/test.sh provides it)")
        }
        Err(_) => {
            eprintln!("{var} not set: the part that needs {what} is skipped (run scripts/test.sh)");
            None
        }
    }
}

pub fn pg_url() -> Option<String> {
    service("IMAGEGATE_TEST_PG", "a throwaway PostgreSQL database")
}

pub fn redis_url() -> Option<String> {
    service("IMAGEGATE_TEST_REDIS", "a Redis server")
}

/// `prefix-` and 8 random hex digits: names that do not collide across runs sharing a store.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 4]>()))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// The value of the first Prometheus text line starting with `prefix`.
pub fn line_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
