//! HTTP/2 abuse on the wire, in hand-written frames (a client library would refuse to send
//! them): rapid reset (streams opened and cancelled at once, CVE-2023-44487) and stream floods
//! (more streams than the connection allows). Each ends in refused streams or a GOAWAY, and the
//! gateway goes on serving other clients.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK "literal header field without indexing", the name from the static table.
fn literal(name_index: u8, value: &str) -> Vec<u8> {
    let mut out = if name_index < 15 {
        vec![name_index]
    } else {
        vec![0x0f, name_index - 15]
    };
    assert!(value.len() < 127);
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

/// A POST of a generation whose body is still to come (the stream stays open).
fn generation_head() -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(literal(4, "/v1/images/generations")); // :path
    block.extend(literal(1, "gw")); // :authority
    block.extend(literal(31, "application/json")); // content-type
    block.extend(literal(23, &format!("Bearer {DEMO_KEY}"))); // authorization
    block
}

struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Opens an HTTP/2 connection: preface, our empty SETTINGS, the server's SETTINGS read and
/// acknowledged. Returns the connection and the server's SETTINGS_MAX_CONCURRENT_STREAMS.
async fn connect(gw: &Gateway) -> (TcpStream, Option<u32>) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let mut buf = Vec::new();
    let settings = loop {
        let f = next_frame(&mut s, &mut buf).await.expect("server SETTINGS");
        if f.kind == SETTINGS {
            break f;
        }
    };
    let max_streams = settings.payload.chunks(6).find_map(|c| {
        (u16::from_be_bytes([c[0], c[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
    });
    s.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
    (s, max_streams)
}

/// The next frame, or `None` when the connection closed or stayed silent for 5 s.
async fn next_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Frame> {
    loop {
        if buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() >= 9 + len {
                let f = Frame {
                    kind: buf[3],
                    stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    payload: buf[9..9 + len].to_vec(),
                };
                buf.drain(..9 + len);
                return Some(f);
            }
        }
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

fn code(f: &Frame) -> u32 {
    let at = if f.kind == GOAWAY { 4 } else { 0 };
    u32::from_be_bytes([
        f.payload[at],
        f.payload[at + 1],
        f.payload[at + 2],
        f.payload[at + 3],
    ])
}

async fn served_over_http2(gw: &Gateway) {
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .get(gw.url("/v1/models"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn rapid_reset_gets_goaway_and_others_are_served() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let (mut s, _) = connect(&gw).await;
    // 1,000 streams, each opened and cancelled in the same write: the attack's shape.
    let head = generation_head();
    let mut burst = Vec::new();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, id, &head));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    // The server may close before it has read it all.
    let _ = s.write_all(&burst).await;
    let mut buf = Vec::new();
    let mut goaway = None;
    while let Some(f) = next_frame(&mut s, &mut buf).await {
        if f.kind == GOAWAY {
            goaway = Some(code(&f));
            break;
        }
    }
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "a rapid reset flood must end in GOAWAY(ENHANCE_YOUR_CALM)"
    );
    served_over_http2(&gw).await;
    models_ok(&gw).await;
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_and_others_are_served() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let (mut s, max) = connect(&gw).await;
    let max = max.expect("the server announces SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(max, 128);
    // 600 generations whose bodies never come: each stream stays open, waiting.
    let head = generation_head();
    let mut flood = Vec::new();
    let streams = 600u32;
    for i in 0..streams {
        flood.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &head));
    }
    s.write_all(&flood).await.unwrap();
    let mut buf = Vec::new();
    let (mut refused, mut other_resets, mut goaway) = (0u32, 0u32, None);
    while let Some(f) = next_frame(&mut s, &mut buf).await {
        match f.kind {
            RST_STREAM if code(&f) == REFUSED_STREAM => {
                assert!(
                    f.stream % 2 == 1 && f.stream < 2 * streams,
                    "a stream we opened"
                );
                refused += 1
            }
            RST_STREAM => other_resets += 1,
            GOAWAY => {
                goaway = Some(code(&f));
                break;
            }
            _ => {}
        }
        if refused + other_resets >= streams - max {
            break;
        }
    }
    // Either every stream past the limit is refused, or the connection is ended.
    assert!(
        refused >= streams - max || goaway.is_some(),
        "refused {refused}, other resets {other_resets}, goaway {goaway:?}"
    );
    // The open streams are not closing the door on anyone else.
    served_over_http2(&gw).await;
    models_ok(&gw).await;
}
