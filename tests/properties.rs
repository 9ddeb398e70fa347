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
