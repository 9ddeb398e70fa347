use super::*;

/// Base64 answers are sliced out of the answer's buffer, not copied; an escaped one (some
/// encoders write `\/`) is decoded into a copy.
#[test]
fn base64_answers_are_borrowed_from_the_body() {
    let body = Bytes::from_static(
        br#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo=","revised_prompt":"r"},{"b64_json":"ab\/cd=="}]}"#,
    );
    let generation = parse_answer(&body).unwrap();
    let payloads: Vec<&Bytes> = generation
        .images
        .iter()
        .map(|i| match &i.payload {
            ImagePayload::Base64(b) => b,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(payloads[0].as_ref(), b"iVBORw0KGgo=");
    let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    assert!(
        range.contains(&(payloads[0].as_ptr() as usize)),
        "a slice of the body"
    );
    assert_eq!(payloads[1].as_ref(), b"ab/cd==");
    assert!(
        !range.contains(&(payloads[1].as_ptr() as usize)),
        "decoded: a copy"
    );
    assert_eq!(generation.images[0].revised_prompt.as_deref(), Some("r"));
}

#[test]
fn dalle_body_carries_exactly_the_requests_fields() {
    let parse = |preset: &str, body: &str| {
        crate::api::parse_request(body.as_bytes())
            .unwrap()
            .validate(&crate::config::Catalog::builtin().rules(preset).unwrap())
            .unwrap()
    };
    let hd = parse(
        "dall-e-3",
        r#"{"model":"dall-e-3","prompt":"a \"quoted\" fox\n","size":"1792x1024","quality":"hd","style":"natural","user":"u-1"}"#,
    );
    let json = |b: &DalleBody<'_>| serde_json::to_value(b).unwrap();
    assert_eq!(
        json(&DalleBody::new(&hd, Some("dall-e-3-up"))),
        json!({"model": "dall-e-3-up", "prompt": "a \"quoted\" fox\n", "n": 1,
               "size": "1792x1024", "response_format": "url", "quality": "hd",
               "style": "natural", "user": "u-1"})
    );
    let plain = parse(
        "dall-e-2",
        r#"{"model":"dall-e-2","prompt":"p","n":3,"response_format":"b64_json"}"#,
    );
    // Azure: no model in the body; absent options are left out, not null.
    assert_eq!(
        json(&DalleBody::new(&plain, None)),
        json!({"prompt": "p", "n": 3, "size": "1024x1024", "response_format": "b64_json"})
    );
}

#[test]
fn azure_content_filter_becomes_openai_code() {
    let body = br#"{"error":{"code":"contentFilter","message":"Your task failed as a result of our safety system."}}"#;
    match map_error(400, &Default::default(), body) {
        BackendError::Rejected {
            code, error_type, ..
        } => {
            assert_eq!(code.as_deref(), Some("content_policy_violation"));
            assert_eq!(error_type.as_deref(), Some("invalid_request_error"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn retry_after_prefers_milliseconds() {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("retry-after", "7".parse().unwrap());
    assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    h.insert("retry-after-ms", "1500".parse().unwrap());
    assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
}

#[test]
fn openai_reset_headers_stand_in_for_retry_after() {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
    h.insert("x-ratelimit-reset-requests", "6m0s".parse().unwrap());
    h.insert("x-ratelimit-remaining-tokens", "100".parse().unwrap());
    h.insert("x-ratelimit-reset-tokens", "12ms".parse().unwrap());
    assert_eq!(retry_after(&h), Some(Duration::from_secs(360)));
    assert_eq!(go_duration("2m3.5s"), Some(Duration::from_secs_f64(123.5)));
    assert_eq!(go_duration("2h"), Some(Duration::from_secs(3600)), "capped");
    assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
    assert_eq!(go_duration("soon"), None);
}

#[test]
fn numeric_error_codes_are_kept_as_strings() {
    let body = br#"{"error":{"code":429,"message":"slow down"}}"#;
    assert!(matches!(
        map_error(429, &Default::default(), body),
        BackendError::RateLimited { .. }
    ));
    let body = br#"{"error":{"code":500,"message":"boom"}}"#;
    assert!(matches!(
        map_error(500, &Default::default(), body),
        BackendError::Status { status: 500, .. }
    ));
}
