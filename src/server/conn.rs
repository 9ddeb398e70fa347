//! How a client connection is served: HTTP/1.1 or HTTP/2, straight on hyper's own builders.
//!
//! hyper-util's auto builder chose the version before. It reads the first 24 bytes of every
//! connection to look for HTTP/2's preface and hands them to hyper's HTTP/1 reader, whose
//! buffer, asked for 8 KiB more with 24 bytes already in it, then grows to 16 KiB on every
//! connection (massif, bench/README.md, "Memory per request in flight"); and it offers no cap
//! on an HTTP/1 request head's size. Here a plain connection's first bytes are peeked, not
//! read (the preface, or anything else: HTTP/1.1), and a TLS connection's version is the one
//! ALPN agreed. Both versions cap the request head at `server.max_header_bytes` and
//! `server.max_headers` (431), and give a client `server.header_timeout` to send it.

use std::error::Error as StdError;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{ServerConfig, DEFAULT_MAX_HEADERS};

/// Raises this process's open-file limit to its hard limit (as Go's runtime and nginx's
/// `worker_rlimit_nofile` do): every client connection, upstream connection and open file is
/// a descriptor, and many systems start processes at a soft limit of 1,024. Returns the
/// limit now in force, and what it was.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, u32 on some targets
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur as u64;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((lim.rlim_cur as u64, before))
}

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type BoxError = Box<dyn StdError + Send + Sync>;

/// A service a connection task can run: cloneable, its futures sent between threads.
pub trait Serves<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}
impl<S, B> Serves<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + 'static
{
}

/// A response body a connection task can send.
pub trait SendBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}
impl<B> SendBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// The two protocol builders, set up once per listener.
/// HTTP/2 streams open at once per connection (hyper's default is 200).
pub const H2_MAX_STREAMS: u32 = 128;
/// Streams reset by the client before they were accepted, at once per connection.
const H2_MAX_PENDING_RESETS: usize = 20;

#[derive(Clone)]
pub struct Http {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_timeout: Duration,
}

impl Http {
    pub fn new(server: &ServerConfig) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(server.header_timeout)
            .max_header_size(server.max_header_bytes);
        // Setting it at all moves hyper's header slots from the stack to the heap.
        if server.max_headers != DEFAULT_MAX_HEADERS {
            h1.max_headers(server.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
            // Streams a client may hold open on one connection; more are refused
            // (REFUSED_STREAM), so one connection cannot hold thousands of requests.
            .max_concurrent_streams(H2_MAX_STREAMS)
            // Rapid reset (CVE-2023-44487): streams the client opens and cancels before they
            // are served; past this many at once the connection gets GOAWAY(ENHANCE_YOUR_CALM).
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            // Streams the gateway itself had to reset for a client's protocol errors.
            .max_local_error_reset_streams(Some(1024));
        Http {
            h1,
            h2,
            header_timeout: server.header_timeout,
        }
    }

    /// Serves a plain TCP connection until it ends (or, with `watcher`, drains on shutdown).
    /// `stopping` turns true when the gateway stops: a connection that has sent nothing yet
    /// is closed then instead of holding the drain up until its header timeout.
    pub async fn serve_tcp<S, B>(
        &self,
        stream: TcpStream,
        service: S,
        watcher: Option<Watcher>,
        mut stopping: Option<watch::Receiver<bool>>,
    ) where
        S: Serves<B>,
        B: SendBody,
    {
        let stop = async {
            match stopping.as_mut() {
                Some(rx) => drop(rx.wait_for(|stop| *stop).await),
                None => std::future::pending().await,
            }
        };
        let h2 = tokio::select! {
            sniffed = tokio::time::timeout(self.header_timeout, is_http2(&stream)) => match sniffed {
                Ok(Ok(h2)) => h2,
                // Nothing sent in time, or the connection failed: nothing to answer.
                _ => return,
            },
            () = stop => return,
        };
        self.serve(TokioIo::new(stream), h2, service, watcher).await;
    }

    /// Serves a connection whose version is known (`h2`: ALPN agreed on HTTP/2).
    pub async fn serve<I, S, B>(&self, io: I, h2: bool, service: S, watcher: Option<Watcher>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: Serves<B>,
        B: SendBody,
    {
        // HTTP/2's connection future is boxed: it is more than twice HTTP/1's, and every
        // connection's task would otherwise be allocated at its size (bench/README.md,
        // "Memory per request in flight").
        let ended = if h2 {
            let conn = self.h2.serve_connection(io, service);
            match watcher {
                Some(w) => Box::pin(w.watch(conn)).await,
                None => Box::pin(conn).await,
            }
        } else {
            let conn = self.h1.serve_connection(io, service);
            match watcher {
                Some(w) => w.watch(conn).await,
                None => conn.await,
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Whether the connection opens with HTTP/2's preface, read without taking it off the socket.
async fn is_http2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 || first[..n] != PREFACE[..n] {
            return Ok(false); // HTTP/1.x (or end of stream, which hyper's HTTP/1 reader ends)
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // A preface split across segments: a peek would return the same bytes at once.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn the_preface_is_peeked_whole_or_in_parts_and_anything_else_is_http1() {
        let (mut c, s) = pair().await;
        c.write_all(PREFACE).await.unwrap();
        assert!(is_http2(&s).await.unwrap());

        let (mut c, s) = pair().await;
        c.write_all(&PREFACE[..5]).await.unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            c.write_all(&PREFACE[5..]).await.unwrap();
            c
        });
        assert!(is_http2(&s).await.unwrap());
        drop(later.await);

        let (mut c, s) = pair().await;
        c.write_all(b"POST /v1/images/generations HTTP/1.1\r\n")
            .await
            .unwrap();
        assert!(!is_http2(&s).await.unwrap());
        // Peeked, not read: the bytes are still there for hyper.
        let mut again = [0u8; 4];
        s.peek(&mut again).await.unwrap();
        assert_eq!(&again, b"POST");

        let (c, s) = pair().await;
        drop(c);
        assert!(!is_http2(&s).await.unwrap());
    }
}
