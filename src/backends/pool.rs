//! Keep-alive HTTP/1.1 connections to plain `http://` upstreams, kept per origin.
//!
//! An upstream connection here is a bare `TcpStream` in a short list per origin; the
//! exchange on it is [`super::h1`] (no buffer and no task while the upstream works: that is
//! what an image request does for seconds). A request takes the most recently used
//! connection, and hands it back once its answer was read whole and the answer allows
//! another. What this keeps of hyper-util's pooled client, which it replaced:
//! - a connection the upstream closed while idle is dropped when it is next taken (a
//!   non-blocking peek reads its end-of-file), so a request is not sent on it;
//! - a request written on a connection is never sent again, whatever became of it (an image
//!   costs money): the caller gets the failure;
//! - idle connections are closed after [`IDLE`] (swept every [`SWEEP`]);
//! - TCP_NODELAY, and a connect timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::HeaderMap;
use tokio::net::TcpStream;

use super::h1;

/// How long a connection may sit idle before it is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// How often idle connections are looked over.
const SWEEP: Duration = Duration::from_secs(15);

/// Where a plain upstream listens, parsed once: `host` as `connect` takes it (an IPv6
/// address without its brackets) and the origin it is pooled under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub host: Arc<str>,
    pub port: u16,
}

struct Idle {
    stream: TcpStream,
    since: Instant,
}

#[derive(Default)]
struct Shelves {
    /// One shelf per origin (a handful at most: a linear search beats hashing).
    by_origin: Vec<(Origin, VecDeque<Idle>)>,
    sweeping: bool,
}

/// The idle connections of every plain upstream; cheap to clone (a handle).
#[derive(Clone)]
pub struct Pool {
    shelves: Arc<Mutex<Shelves>>,
    connect_timeout: Duration,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made: nothing was sent.
    Connect(String),
    /// The connection broke or the upstream's answer could not be read.
    Broken(String),
    /// The answer's body is over the cap.
    TooLarge,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Pool {
            shelves: Arc::default(),
            connect_timeout,
        }
    }

    /// POSTs `body` to `path` with `headers` on an idle connection to `origin`, or a new one,
    /// and reads the answer whole (a body over `cap` bytes is refused). The connection goes
    /// back to the pool when the answer allows.
    pub async fn post(
        &self,
        origin: &Origin,
        path: &str,
        headers: HeaderMap,
        body: &[u8],
        cap: usize,
    ) -> Result<h1::Answer, Failure> {
        // Written out and dropped before the wait (it is ~800 bytes of heap).
        let head = h1::request_head(path, &headers, body.len());
        drop(headers);
        let mut stream = match self.take(origin) {
            Some(s) => s,
            None => self.connect(origin).await?,
        };
        let answer = h1::exchange(&mut stream, head, body, cap)
            .await
            .map_err(|e| match e {
                h1::Error::Broken(why) => Failure::Broken(why),
                h1::Error::TooLarge => Failure::TooLarge,
            })?;
        if answer.reusable {
            self.put(origin, stream);
        }
        Ok(answer)
    }

    fn put(&self, origin: &Origin, stream: TcpStream) {
        let idle = Idle {
            stream,
            since: Instant::now(),
        };
        let mut shelves = self.lock();
        match shelves.by_origin.iter_mut().find(|(o, _)| o == origin) {
            Some((_, shelf)) => shelf.push_back(idle),
            None => shelves
                .by_origin
                .push((origin.clone(), VecDeque::from([idle]))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shelves> {
        self.shelves.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection to `origin` that is still open.
    fn take(&self, origin: &Origin) -> Option<TcpStream> {
        let mut shelves = self.lock();
        let (_, shelf) = shelves.by_origin.iter_mut().find(|(o, _)| o == origin)?;
        while let Some(idle) = shelf.pop_back() {
            if idle.since.elapsed() < IDLE && h1::idle_and_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    async fn connect(&self, origin: &Origin) -> Result<TcpStream, Failure> {
        self.start_sweeping();
        let host = &*origin.host;
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((host, origin.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::Connect(format!("tcp connect error: {e}"))),
            Err(_) => {
                return Err(Failure::Connect(format!(
                    "tcp connect timed out after {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Starts the task that closes connections idle for [`IDLE`] or closed by the upstream;
    /// it ends with the pool.
    fn start_sweeping(&self) {
        {
            let mut shelves = self.lock();
            if std::mem::replace(&mut shelves.sweeping, true) {
                return;
            }
        }
        let weak: Weak<Mutex<Shelves>> = Arc::downgrade(&self.shelves);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shelves) = weak.upgrade() else {
                    return;
                };
                let mut s = shelves.lock().unwrap_or_else(|e| e.into_inner());
                for (_, shelf) in &mut s.by_origin {
                    shelf.retain(|i| i.since.elapsed() < IDLE && h1::idle_and_open(&i.stream));
                }
            }
        });
    }

    /// Idle connections to `origin` (tests).
    #[cfg(test)]
    pub fn idle(&self, origin: &Origin) -> usize {
        self.lock()
            .by_origin
            .iter()
            .find(|(o, _)| o == origin)
            .map_or(0, |(_, s)| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What the upstream does after reading a request.
    #[derive(Clone, Copy)]
    enum Then {
        /// Answers and keeps the connection.
        Answer,
        /// Answers, then closes the connection 20 ms later without saying so (an idle
        /// timeout shorter than ours).
        AnswerThenDrop,
        /// Closes without answering.
        Hangup,
    }

    /// A raw HTTP/1.1 upstream; counts connections and requests read.
    async fn upstream(then: Then) -> (Origin, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (conns, reqs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), reqs.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        // Requests here have no body: a head ends the request.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        r.fetch_add(1, Ordering::SeqCst);
                        if let Then::Hangup = then {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        if let Then::AnswerThenDrop = then {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            return;
                        }
                    }
                });
            }
        });
        let origin = Origin {
            host: "127.0.0.1".into(),
            port,
        };
        (origin, conns, reqs)
    }

    /// One exchange, answer read whole.
    async fn exchange(pool: &Pool, origin: &Origin) -> Result<Bytes, String> {
        let mut headers = HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_static("upstream"));
        let answer = pool
            .post(origin, "/", headers, b"", 1024)
            .await
            .map_err(|e| match e {
                Failure::Connect(why) => format!("connect: {why}"),
                Failure::Broken(why) => format!("broken: {why}"),
                Failure::TooLarge => "too large".into(),
            })?;
        Ok(answer.body)
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (origin, conns, reqs) = upstream(Then::Answer).await;
        let pool = Pool::new(Duration::from_secs(5));
        for _ in 0..5 {
            assert_eq!(&exchange(&pool, &origin).await.unwrap()[..], b"ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(reqs.load(Ordering::SeqCst), 5);
        assert_eq!(pool.idle(&origin), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_keep_them() {
        let (origin, conns, _) = upstream(Then::Answer).await;
        let pool = Pool::new(Duration::from_secs(5));
        let all = (0..4).map(|_| exchange(&pool, &origin));
        for r in futures_util::future::join_all(all).await {
            assert_eq!(&r.unwrap()[..], b"ok");
        }
        let opened = conns.load(Ordering::SeqCst);
        assert_eq!(pool.idle(&origin), opened);
        // The next round reuses them.
        let all = (0..opened).map(|_| exchange(&pool, &origin));
        for r in futures_util::future::join_all(all).await {
            r.unwrap();
        }
        assert_eq!(conns.load(Ordering::SeqCst), opened);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced_and_nothing_is_sent_twice() {
        let (origin, conns, reqs) = upstream(Then::AnswerThenDrop).await;
        let pool = Pool::new(Duration::from_secs(5));
        for _ in 0..3 {
            assert_eq!(&exchange(&pool, &origin).await.unwrap()[..], b"ok");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert_eq!(reqs.load(Ordering::SeqCst), 3);
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_request_sent_and_not_answered_is_not_repeated() {
        let (origin, conns, reqs) = upstream(Then::Hangup).await;
        let pool = Pool::new(Duration::from_secs(5));
        let e = exchange(&pool, &origin).await.unwrap_err();
        assert!(e.starts_with("broken"), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(reqs.load(Ordering::SeqCst), 1);
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(&origin), 0);
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_failure() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let origin = Origin {
            host: "127.0.0.1".into(),
            port,
        };
        let e = exchange(&Pool::new(Duration::from_secs(5)), &origin)
            .await
            .unwrap_err();
        assert!(e.starts_with("connect: tcp connect error"), "{e}");
    }
}
