//! The floor of this stack: a bare relay built from the same parts as the gateway (hyper 1
//! server on a tokio runtime, reqwest to the upstream) and nothing else: no auth, no
//! parsing, no limits, no ledger. `bench/run.sh` measures it beside nginx and the gateway, so
//! the table separates what the HTTP stack costs from what imagegate's own work costs.
//!
//! Usage: bare_proxy --port P --upstream-port U (single-threaded runtime, like the gateway on
//! one CPU)

#[path = "common.rs"]
mod common;

use common::arg;
use hyper::Request;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port = arg("--port", 19170) as u16;
    let upstream = format!(
        "http://127.0.0.1:{}/v1/images/generations",
        arg("--upstream-port", 19101)
    );
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    eprintln!("bare proxy on 127.0.0.1:{port} -> {upstream}");
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
}
