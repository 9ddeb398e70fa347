//! The floor of this stack: a bare relay built from the same parts as the gateway (hyper 1
//! server on a tokio runtime, an HTTP client to the upstream) and nothing else: no auth, no
//! parsing, no limits, no ledger. `bench/run.sh` measures it beside nginx and the gateway, so
//! the table separates what the HTTP stack costs from what imagegate's own work costs.
//!
//! Usage: bare_proxy --port P --upstream-port U [--reqwest 1] (single-threaded runtime, like
//! the gateway on one CPU). The client is hyper-util's pooled client (the gateway's
//! plain-HTTP upstreams used it until its own pool, `src/backends/pool.rs`, replaced it: kept
//! here as the stock floor); `--reqwest 1` relays through reqwest instead.

#[path = "common.rs"]
mod common;

use common::arg;
use http_body_util::{BodyExt, Full};
use hyper::Request;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port = arg("--port", 19170) as u16;
    let upstream = format!(
        "http://127.0.0.1:{}/v1/images/generations",
        arg("--upstream-port", 19101)
    );
    eprintln!("bare proxy on 127.0.0.1:{port} -> {upstream}");
    if arg("--reqwest", 0) == 1 {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .expect("client");
        common::serve(port, move |req: Request<hyper::body::Incoming>| {
            let (client, upstream) = (client.clone(), upstream.clone());
            async move {
                let body = common::body(req).await;
                let answer = match client
                    .post(upstream)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => r.bytes().await.unwrap_or_default(),
                    Err(_) => Default::default(),
                };
                common::json(answer)
            }
        })
        .await;
        return;
    }
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<bytes::Bytes>>(connector);
    let uri: hyper::Uri = upstream.parse().expect("uri");
    common::serve(port, move |req: Request<hyper::body::Incoming>| {
        let (client, uri) = (client.clone(), uri.clone());
        async move {
            let body = common::body(req).await;
            let up = Request::post(uri)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("request");
            let answer = match client.request(up).await {
                Ok(r) => r
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default(),
                Err(_) => Default::default(),
            };
            common::json(answer)
        }
    })
    .await;
}
