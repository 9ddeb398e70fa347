//! Property tests: the parsers that take hostile input never panic and answer as the contract
//! says, and what is signed verifies while any change to it does not. Case counts: 256 by
//! default; `PROPTEST_CASES=20000 cargo test --release --test properties` is the soak.

use std::time::{Duration, SystemTime};

use imagegate::api::{parse_request, ModelRules};
use imagegate::images::{SignatureError, UrlSigner};
use proptest::prelude::*;

fn rules() -> Vec<ModelRules> {
    vec![
        ModelRules::base(imagegate::api::Family::DallE),
        ModelRules::base(imagegate::api::Family::GptImage),
    ]
}

/// A JSON value of the shapes a request field might take, hostile ones included.
fn field_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "256x256",
            "1024x1024",
            "1792x1024",
            "auto",
            "0x0",
            "1024x",
            "99999999999x1",
            "b64_json",
            "url",
            "hd",
            "standard",
            "vivid",
            "png",
            "webp",
            "gif",
            "svg",
            "transparent",
            "high",
            "low",
        ])
        .prop_map(serde_json::Value::from),
    ]
}

fn request_object() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
    // Every member the contract knows, and a few it does not.
    let mut all: Vec<&'static str> = imagegate::api::REQUEST_FIELDS.to_vec();
    all.extend(["unknown_field", "", "PROMPT"]);
    let names = prop::sample::select(all);
    prop::collection::btree_map(names, field_value(), 0..8)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

proptest! {
    /// Any bytes: a parsed request or a 400, never a panic or a 5xx.
    #[test]
    fn any_bytes_parse_or_get_a_400(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = parse_request(&body) {
            prop_assert_eq!(e.status().as_u16(), 400);
        }
    }

    /// Any object of request-like fields: validated against each family's rules, it is a
    /// request or a 400 that names a field (or the body), and a valid request keeps the
    /// contract's bounds.
    #[test]
    fn request_like_objects_validate_or_name_a_field(obj in request_object()) {
        let body = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
        let raw = match parse_request(&body) {
            Ok(raw) => raw,
            Err(e) => {
                prop_assert_eq!(e.status().as_u16(), 400);
                return Ok(());
            }
        };
        for r in rules() {
            match raw.clone().validate(&r) {
                Ok(req) => {
                    prop_assert!(req.n >= 1 && req.n <= r.max_n, "n {} of {}", req.n, r.max_n);
                    prop_assert!(!req.prompt.is_empty());
                }
                Err(e) => {
                    prop_assert_eq!(e.status().as_u16(), 400);
                    prop_assert!(e.param.is_some() || !e.message.is_empty());
                }
            }
        }
    }

    /// A signed link verifies until it expires; any other name, expiry or signature does not.
    #[test]
    fn signed_links_verify_and_any_change_does_not(
        key in prop::collection::vec(any::<u8>(), 32..64),
        name in "[a-f0-9]{32}\\.(png|jpeg|webp)",
        other in "[a-f0-9]{32}\\.(png|jpeg|webp)",
        ttl in 1u64..86_400,
        flip in 0usize..64,
    ) {
        let s = UrlSigner::new(key);
        let now = SystemTime::now();
        let (query, _) = s.sign(&name, now, Duration::from_secs(ttl));
        prop_assert!(s.verify(&name, Some(&query), now).is_ok());
        if other != name {
            prop_assert_eq!(s.verify(&other, Some(&query), now), Err(SignatureError::Invalid));
        }
        prop_assert_eq!(
            s.verify(&name, Some(&query), now + Duration::from_secs(ttl + 1)),
            Err(SignatureError::Expired)
        );
        // One character of the signature changed (still valid base64 of the same length).
        let sig_at = query.find("signature=").unwrap() + "signature=".len();
        let mut bytes = query.clone().into_bytes();
        let i = sig_at + flip % (bytes.len() - sig_at - 1);
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        if tampered != query {
            prop_assert!(s.verify(&name, Some(&tampered), now).is_err());
        }
    }
}

/// `WIDTHxHEIGHT` as the size grammar has it: one to five digits each side, neither zero.
fn is_size(s: &str) -> bool {
    let Some((w, h)) = s.split_once('x') else {
        return false;
    };
    let side = |v: &str| {
        !v.is_empty()
            && v.len() <= 5
            && v.bytes().all(|b| b.is_ascii_digit())
            && v.bytes().any(|b| b != b'0')
    };
    side(w) && side(h)
}

/// A multipart body of `parts` (name, filename, bytes) with `boundary`, as the SDKs send it.
fn multipart(boundary: &str, parts: &[(String, Option<String>, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = filename {
            body.extend_from_slice(
                format!("; filename=\"{f}\"\r\ncontent-type: image/png").as_bytes(),
            );
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// `body` cut at `cuts` (fractions of its length) and read as a multipart form.
fn read_in_pieces(
    body: &[u8],
    cuts: &[u16],
    limit: u64,
) -> Result<imagegate::api::edit::Form, imagegate::api::ApiError> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| body.len() * *c as usize / u16::MAX as usize)
        .collect();
    at.push(0);
    at.push(body.len());
    at.sort_unstable();
    at.dedup();
    let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = at
        .windows(2)
        .map(|w| Ok(bytes::Bytes::copy_from_slice(&body[w[0]..w[1]])))
        .collect();
    let stream = futures_util::stream::iter(pieces);
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(imagegate::api::edit::read_form(
            stream,
            "XyZ-boundary",
            limit,
        ))
}

fn form_part() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    let name = prop_oneof![
        Just("prompt".to_string()),
        Just("model".to_string()),
        Just("n".to_string()),
        Just("size".to_string()),
        Just("response_format".to_string()),
        Just("image".to_string()),
        Just("image[]".to_string()),
        Just("mask".to_string()),
        "[a-z_]{1,12}",
    ];
    (
        name,
        prop::option::of("[a-z]{1,8}\\.png"),
        prop_oneof![
            "[ -~]{0,40}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..300),
        ],
    )
}

proptest! {
    /// Any string: a size exactly when it is `WIDTHxHEIGHT` (1-5 digits, neither zero), and a
    /// size's text parses back to itself.
    #[test]
    fn the_size_grammar_accepts_exactly_width_x_height(s in prop_oneof!["[0-9x]{0,13}", ".{0,16}", "[0-9]{1,6}x[0-9]{1,6}"]) {
        let parsed = s.parse::<imagegate::api::Size>();
        prop_assert_eq!(parsed.is_ok(), is_size(&s), "{:?}", s);
        if let Ok(size) = parsed {
            prop_assert_eq!(size.text().parse::<imagegate::api::Size>(), Ok(size));
            prop_assert!(size.width >= 1 && size.width <= 99_999);
        }
    }

    /// Any bytes as a multipart body, in any pieces: a form, a 400 or a 413, never a panic;
    /// a form read then becomes an edit, a variation or a 400 naming a field.
    #[test]
    fn any_bytes_as_a_multipart_body_are_a_form_or_a_4xx(
        body in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<u16>(), 0..6),
    ) {
        match read_in_pieces(&body, &cuts, 400) {
            Err(e) => prop_assert!(matches!(e.status().as_u16(), 400 | 413), "{}", e.status()),
            Ok(form) => {
                if let Err(e) = form.into_variation() {
                    prop_assert_eq!(e.status().as_u16(), 400);
                }
            }
        }
    }

    /// A well-formed form, cut into pieces anywhere: read the same (one fingerprint) however it
    /// arrives; it becomes an edit or a 400 naming a field; over the size limit it is a 413.
    #[test]
    fn a_form_reads_the_same_however_it_is_cut(
        parts in prop::collection::vec(form_part(), 1..6),
        cuts in prop::collection::vec(any::<u16>(), 0..8),
    ) {
        let body = multipart("XyZ-boundary", &parts);
        let whole = read_in_pieces(&body, &[], 1 << 20);
        let cut = read_in_pieces(&body, &cuts, 1 << 20);
        match (whole, cut) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a.fingerprint(), b.fingerprint());
                for r in rules() {
                    let form = imagegate::api::edit::form_from_parts(
                        parts.iter().map(|(n, f, d)| (n.clone(), f.clone(), bytes::Bytes::from(d.clone()))).collect(),
                    );
                    match form.and_then(|f| f.into_edit(&r)) {
                        Ok(req) => prop_assert!(!req.prompt.is_empty()),
                        Err(e) => {
                            prop_assert_eq!(e.status().as_u16(), 400);
                            prop_assert!(e.param.is_some(), "{}", e.message);
                        }
                    }
                }
            }
            (Err(a), Err(b)) => prop_assert_eq!(a.status(), b.status()),
            (a, b) => prop_assert!(false, "whole {:?} vs cut {:?}", a.map(|f| f.fingerprint().to_vec()), b.map(|f| f.fingerprint().to_vec())),
        }
        if body.len() > 64 {
            let small = read_in_pieces(&body, &cuts, 64);
            prop_assert_eq!(small.err().map(|e| e.status().as_u16()), Some(413));
        }
    }
}
