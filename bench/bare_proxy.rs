//! The floor of this stack: a bare relay built from the same parts as the gateway (hyper 1
//! server on a tokio runtime, reqwest to the upstream) and nothing else: no auth, no
//! parsing, no limits, no ledger. `bench/run.sh` measures it beside nginx and the gateway, so
//! the table separates what the HTTP stack costs from what imagegate's own work costs.
//!
//! Usage: bare_proxy --port P --upstream-port U

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn arg(name: &str, default: u16) -> u16 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port = arg("--port", 19170);
    let upstream = format!(
        "http://127.0.0.1:{}/v1/images/generations",
        arg("--upstream-port", 19101)
    );
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    eprintln!("bare proxy on 127.0.0.1:{port} -> {upstream}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
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
                    let mut resp = Response::new(Full::new(answer));
                    resp.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
