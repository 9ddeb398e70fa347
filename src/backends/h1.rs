//! One HTTP/1.1 exchange on a plain upstream connection: the request written whole, the answer
//! read whole.
//!
//! Why not hyper's client connection: an image request waits 5-60 s on its upstream, and
//! while it waits hyper's connection holds an 8 KiB write buffer, an 8-16 KiB read buffer, a
//! 9 KiB request channel and a task of its own (valgrind's massif, bench/README.md, "Memory
//! per request in flight"): ~30 KiB per request in flight, most of what the gateway holds for
//! one. Here a waiting exchange holds the socket and nothing else: the request is written
//! straight from its bytes, and the read buffer is allocated when the upstream's answer is
//! readable, sized from its `Content-Length`. The subset of HTTP/1.1 a JSON POST needs
//! (RFC 9112): answer heads parsed by `httparse` (hyper's own parser), 1xx heads skipped, a
//! body framed by `Transfer-Encoding: chunked`, `Content-Length` or the connection's close,
//! and keep-alive unless the answer says `Connection: close` or frames its body by closing.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head (status line and headers) read; hyper's default cap is the same order.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in an answer head.
const MAX_HEADERS: usize = 100;
/// The first read's buffer when the answer's size is not yet known.
const FIRST_READ: usize = 4096;
/// Largest chunk-size line (with extensions) or trailer section accepted.
const MAX_LINE: usize = 4096;
/// A request whose body is at most this is written in one call with its head (one segment).
const COALESCE: usize = 16 * 1024;

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Whether the connection can take another request.
    pub reusable: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// The connection broke, or the answer was not HTTP/1.x as this reads it.
    Broken(String),
    /// The answer's body is longer than the cap.
    TooLarge,
}

impl Error {
    fn io(during: &str, e: std::io::Error) -> Self {
        Error::Broken(format!("{during}: {e}"))
    }
}

/// A request's head: `POST {path} HTTP/1.1`, `headers`, and `Content-Length` for `body_len`.
pub fn request_head(path: &str, headers: &HeaderMap, body_len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(64 + path.len() + headers.len() * 48);
    head.extend_from_slice(b"POST ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"content-length: ");
    head.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// Writes `head` and `body`, then reads the answer whole; a body over `cap` bytes is refused.
pub async fn exchange(
    io: &mut TcpStream,
    head: Vec<u8>,
    body: &[u8],
    cap: usize,
) -> Result<Answer, Error> {
    if body.len() <= COALESCE {
        let mut all = head;
        all.extend_from_slice(body);
        io.write_all(&all)
            .await
            .map_err(|e| Error::io("writing the request", e))?;
    } else {
        io.write_all(&head)
            .await
            .map_err(|e| Error::io("writing the request", e))?;
        io.write_all(body)
            .await
            .map_err(|e| Error::io("writing the request", e))?;
    }
    // The upstream works for seconds: wait without a buffer.
    io.readable()
        .await
        .map_err(|e| Error::io("waiting for the answer", e))?;
    read_answer(io, cap).await
}

/// Reads one answer from `io`.
async fn read_answer<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    cap: usize,
) -> Result<Answer, Error> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let head = loop {
        match parse_head(&buf)? {
            Some(h) if (100..200).contains(&h.status) => {
                if h.status == 101 {
                    return Err(Error::Broken("the upstream switched protocols".into()));
                }
                buf.advance(h.len); // 100 Continue, 103 Early Hints: the answer follows
                continue;
            }
            Some(h) => break h,
            None if buf.len() >= MAX_HEAD => {
                return Err(Error::Broken(format!(
                    "the answer's head is over {MAX_HEAD} bytes"
                )))
            }
            None => {}
        }
        if buf.capacity() == buf.len() {
            buf.reserve(FIRST_READ);
        }
        if read_some(io, &mut buf, "reading the answer's head").await? == 0 {
            return Err(Error::Broken(if buf.is_empty() {
                "the upstream closed the connection before answering".into()
            } else {
                "the upstream closed the connection in the answer's head".into()
            }));
        }
    };
    buf.advance(head.len);
    let (body, framed) = match head.framing {
        Framing::Empty => (Bytes::new(), true),
        Framing::Length(n) => {
            if n > cap as u64 {
                return Err(Error::TooLarge);
            }
            let n = n as usize;
            if buf.len() < n {
                buf.reserve(n - buf.len());
            }
            while buf.len() < n {
                if read_some(io, &mut buf, "reading the answer's body").await? == 0 {
                    return Err(Error::Broken(format!(
                        "the upstream closed the connection after {} of {n} body bytes",
                        buf.len()
                    )));
                }
            }
            // Bytes past the answer (none is asked for): the connection is not reused.
            let exact = buf.len() == n;
            (buf.split_to(n).freeze(), exact)
        }
        Framing::Chunked => {
            let body = read_chunked(io, &mut buf, cap).await?;
            (body, buf.is_empty())
        }
        Framing::UntilClose => {
            loop {
                if buf.len() > cap {
                    return Err(Error::TooLarge);
                }
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len().clamp(FIRST_READ, 1 << 20));
                }
                if read_some(io, &mut buf, "reading the answer's body").await? == 0 {
                    break;
                }
            }
            (buf.split().freeze(), false)
        }
    };
    Ok(Answer {
        status: head.status,
        headers: head.headers,
        body,
        reusable: framed && head.keep_alive && !matches!(head.framing, Framing::UntilClose),
    })
}

async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    during: &str,
) -> Result<usize, Error> {
    io.read_buf(buf).await.map_err(|e| Error::io(during, e))
}

/// How an answer's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

struct Head {
    len: usize,
    status: u16,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// The answer head at the start of `buf`, or `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Broken(format!("invalid answer head: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let (mut length, mut chunked, mut coded, mut close, mut keep) =
        (None, false, false, false, false);
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Broken(format!("invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Error::Broken(format!("invalid value for header {name}")))?;
        if name == http::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Error::Broken("invalid Content-Length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Broken("conflicting Content-Length headers".into()));
            }
            length = Some(n);
        } else if name == http::header::TRANSFER_ENCODING {
            coded = true;
            // Chunked is the last coding applied, or the body is delimited by the close.
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == http::header::CONNECTION {
            for token in String::from_utf8_lossy(h.value).split(',') {
                close |= token.trim().eq_ignore_ascii_case("close");
                keep |= token.trim().eq_ignore_ascii_case("keep-alive");
            }
        }
        headers.append(name, value);
    }
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    // Both framings named: a smuggling shape; read it as chunked and never reuse the connection.
    let keep_alive = !close && (http11 || keep) && !(coded && length.is_some());
    Ok(Some(Head {
        len,
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// Reads a chunked body whose encoding starts at `buf` (more is read from `io` as needed);
/// leaves in `buf` whatever follows the body.
async fn read_chunked<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cap: usize,
) -> Result<Bytes, Error> {
    let mut out = BytesMut::new();
    loop {
        match decode_chunks(buf, &mut out, cap)? {
            Chunks::Done => return Ok(out.freeze()),
            Chunks::More(want) => {
                if buf.capacity() - buf.len() < want {
                    buf.reserve(want.max(FIRST_READ));
                }
                if read_some(io, buf, "reading the answer's chunked body").await? == 0 {
                    return Err(Error::Broken(
                        "the upstream closed the connection in a chunked body".into(),
                    ));
                }
            }
        }
    }
}

enum Chunks {
    /// The last chunk and the trailers were read.
    Done,
    /// More input is needed (at least this many bytes, as far as is known).
    More(usize),
}

/// Moves every whole chunk at the start of `buf` into `out`.
fn decode_chunks(buf: &mut BytesMut, out: &mut BytesMut, cap: usize) -> Result<Chunks, Error> {
    loop {
        let Some(eol) = find_crlf(buf) else {
            if buf.len() > MAX_LINE {
                return Err(Error::Broken("chunk-size line too long".into()));
            }
            return Ok(Chunks::More(1));
        };
        let line = &buf[..eol];
        let digits = line
            .split(|&b| b == b';' || b == b' ' || b == b'\t')
            .next()
            .unwrap_or_default();
        if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(Error::Broken("invalid chunk size".into()));
        }
        let size = usize::from_str_radix(std::str::from_utf8(digits).unwrap_or("x"), 16)
            .map_err(|_| Error::Broken("invalid chunk size".into()))?;
        if size == 0 {
            // The trailer section ends with an empty line.
            let rest = &buf[eol + 2..];
            let end = if rest.starts_with(b"\r\n") {
                Some(2)
            } else {
                rest.windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4)
            };
            return match end {
                Some(end) => {
                    buf.advance(eol + 2 + end);
                    Ok(Chunks::Done)
                }
                None if rest.len() > MAX_LINE => Err(Error::Broken("trailers too long".into())),
                None => Ok(Chunks::More(1)),
            };
        }
        if out.len() + size > cap {
            return Err(Error::TooLarge);
        }
        let whole = eol + 2 + size + 2;
        if buf.len() < whole {
            return Ok(Chunks::More(whole - buf.len()));
        }
        if &buf[whole - 2..whole] != b"\r\n" {
            return Err(Error::Broken("chunk not followed by CRLF".into()));
        }
        if out.is_empty() && out.capacity() < size {
            out.reserve(size);
        }
        out.put_slice(&buf[eol + 2..eol + 2 + size]);
        buf.advance(whole);
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Whether an idle connection is still open with nothing unread: a peek that would block.
/// (A closed one reads end-of-file; one with bytes waiting has been sent something unasked.)
pub fn idle_and_open(io: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(io).peek(&mut probe) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(raw: &[u8], cap: usize) -> Result<Answer, Error> {
        let mut io = raw;
        read_answer(&mut io, cap).await
    }

    #[tokio::test]
    async fn content_length_answer() {
        let a = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            100,
        )
        .await
        .unwrap();
        assert_eq!(
            (a.status, &a.body[..], a.reusable),
            (200, &b"hello"[..], true)
        );
        assert_eq!(a.headers["x-a"], "1");
    }

    #[tokio::test]
    async fn chunked_answer_with_extensions_and_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        let a = read(raw, 100).await.unwrap();
        assert_eq!(&a.body[..], b"Wikipedia");
        assert!(a.reusable);
    }

    #[tokio::test]
    async fn continue_heads_are_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
                    HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let a = read(raw, 100).await.unwrap();
        assert_eq!((a.status, &a.body[..]), (201, &b"ok"[..]));
    }

    #[tokio::test]
    async fn close_delimited_and_connection_close_answers_are_not_reused() {
        let a = read(b"HTTP/1.1 200 OK\r\n\r\nall of it", 100)
            .await
            .unwrap();
        assert_eq!((&a.body[..], a.reusable), (&b"all of it"[..], false));
        let a = read(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            100,
        )
        .await
        .unwrap();
        assert!(!a.reusable);
        let a = read(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", 100)
            .await
            .unwrap();
        assert!(!a.reusable);
        // Bytes nobody asked for after the answer.
        let a = read(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy", 100)
            .await
            .unwrap();
        assert!(!a.reusable);
    }

    #[tokio::test]
    async fn both_framings_read_as_chunked_and_never_reused() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
                    2\r\nab\r\n0\r\n\r\n";
        let a = read(raw, 100).await.unwrap();
        assert_eq!((&a.body[..], a.reusable), (&b"ab"[..], false));
    }

    #[tokio::test]
    async fn caps_and_malformed_answers() {
        assert!(matches!(
            read(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n", 100).await,
            Err(Error::TooLarge)
        ));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n";
        assert!(matches!(read(chunked, 10).await, Err(Error::TooLarge)));
        let cases: [&[u8]; 6] = [
            b"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"garbage\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                matches!(read(raw, 100).await, Err(Error::Broken(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// An answer split at every byte boundary reads the same.
    #[tokio::test]
    async fn answers_arriving_byte_by_byte() {
        let raw: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                           3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n";
        let mut io = tokio_test_reader(raw);
        let a = read_answer(&mut io, 100).await.unwrap();
        assert_eq!(&a.body[..], b"abcd");
    }

    /// A reader that yields one byte per read.
    fn tokio_test_reader(raw: &'static [u8]) -> impl tokio::io::AsyncRead + Unpin {
        let (mut w, r) = tokio::io::duplex(1);
        tokio::spawn(async move {
            let _ = w.write_all(raw).await;
        });
        r
    }

    /// Encodes `body` chunked, with chunk sizes from `sizes` (cycled; 0 ends it early).
    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let (mut at, mut i) = (0, 0);
        while at < body.len() {
            let n = sizes[i % sizes.len()].clamp(1, body.len() - at);
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&body[at..at + n]);
            out.extend_from_slice(b"\r\n");
            at += n;
            i += 1;
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    proptest::proptest! {
        /// Any bytes from an upstream: an answer or an error, never a panic, and never a body
        /// over the cap.
        #[test]
        fn any_answer_bytes_read_or_fail(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Ok(a) = run(read(&raw, 64)) {
                proptest::prop_assert!(a.body.len() <= 64);
            }
        }

        /// Heads that parse, followed by any bytes: still no panic.
        #[test]
        fn valid_heads_with_any_bodies(
            framing in 0u8..3,
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let head: &[u8] = match framing {
                0 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                1 => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
                _ => b"HTTP/1.1 200 OK\r\n\r\n",
            };
            let raw = [head, &rest].concat();
            let _ = run(read(&raw, 1000));
        }

        /// A chunked body, however it is cut into chunks, reads back whole.
        #[test]
        fn chunked_bodies_round_trip(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            sizes in proptest::collection::vec(1usize..300, 1..8),
        ) {
            let a = run(read(&chunked(&body, &sizes), 4096)).unwrap();
            proptest::prop_assert_eq!(&a.body[..], &body[..]);
            proptest::prop_assert!(a.reusable);
        }
    }

    #[test]
    fn request_head_sets_the_length_and_drops_framing_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("up:8080"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("999"));
        let head = String::from_utf8(request_head("/v1/x?a=1", &h, 12)).unwrap();
        assert_eq!(
            head,
            "POST /v1/x?a=1 HTTP/1.1\r\nhost: up:8080\r\ncontent-length: 12\r\n\r\n"
        );
    }
}
