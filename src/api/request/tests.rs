use super::*;

/// A catalog entry's rules.
fn named(name: &str) -> ModelRules {
    crate::config::Catalog::builtin().rules(name).unwrap()
}

#[test]
fn the_direct_parse_and_the_value_parse_agree() {
    let bodies: &[&str] = &[
        r#"{"model":"dall-e-3","prompt":"a \"fox\"\u00e9\n","n":1,"size":"1024x1024"}"#,
        r#"{"model":"gpt-image-1.5","prompt":"p","background":"transparent","output_format":"webp","output_compression":80,"moderation":"low","safety_identifier":"s","stream":true,"partial_images":2,"complexity":"high","quality":"high","user":null}"#,
        r#"{"prompt":"p","model":"m","prompt":"second is refused"}"#,
        r#"{"model":"m","prompt":"p","n":1.0}"#,
        r#"{"model":"m","prompt":"p","n":18446744073709551615}"#,
        r#"{"model":"m","prompt":"p","n":-3}"#,
        r#"{"model":"m","prompt":7}"#,
        r#"{"model":"m","prompt":"p","stream":"yes"}"#,
        r#"{"model":"m","zeta":1,"alpha":2}"#,
        r#"{"model":"m"} trailing"#,
        r#"["model"]"#,
        r#"null"#,
        r#"{}"#,
        r#"{"model":"m","prompt":"p","size":{"w":1}}"#,
    ];
    let seen =
        |r: Result<RawRequest, ApiError>| r.map_err(|e| (e.kind, e.message, e.param, e.code));
    for body in bodies {
        assert_eq!(
            seen(parse_request(body.as_bytes())),
            seen(parse_request_values(body.as_bytes())),
            "{body}"
        );
    }
    // A repeated member is refused (I-JSON), never "the last one wins".
    let repeated = parse_request(br#"{"prompt":"p","model":"m","prompt":"q"}"#).unwrap_err();
    assert_eq!(repeated.param.as_deref(), Some("prompt"));
}
use crate::api::{GptQuality, OutputFormat};

fn validate(json: &str, rules: ModelRules) -> Result<ImageRequest, ApiError> {
    parse_request(json.as_bytes())?.validate(&rules)
}

fn param_of(json: &str, rules: ModelRules) -> Option<String> {
    validate(json, rules).unwrap_err().param
}

#[test]
fn defaults_follow_the_contract() {
    let raw = parse_request(br#"{"prompt":"a cat"}"#).unwrap();
    assert_eq!(raw.model(), "dall-e-2");
    let req = raw.validate(&ModelRules::dalle2()).unwrap();
    assert_eq!(req.n, 1);
    assert_eq!(req.size, Size::new(1024, 1024));
    assert_eq!(req.response_format, ResponseFormat::Url);
    assert_eq!(req.quality, None);
    assert_eq!(req.style, None);

    let req = validate(
        r#"{"model":"dall-e-3","prompt":"a cat"}"#,
        named("dall-e-3"),
    )
    .unwrap();
    assert_eq!(req.quality, Some(Quality::Standard));
    assert_eq!(req.style, Some(Style::Vivid));
}

#[test]
fn nulls_mean_absent() {
    let req = validate(
        r#"{"prompt":"x","n":null,"size":null,"user":null,"quality":null,"style":null}"#,
        ModelRules::dalle2(),
    )
    .unwrap();
    assert_eq!(req.n, 1);
}

#[test]
fn type_errors_name_the_field() {
    for (json, field) in [
        (r#"{"prompt":5}"#, "prompt"),
        (r#"{"prompt":"x","n":"2"}"#, "n"),
        (r#"{"prompt":"x","n":1.5}"#, "n"),
        (r#"{"prompt":"x","size":1024}"#, "size"),
        (r#"{"prompt":"x","user":{}}"#, "user"),
        (r#"{"prompt":"x","model":["a"]}"#, "model"),
        (
            r#"{"prompt":"x","response_format":true}"#,
            "response_format",
        ),
    ] {
        let err = parse_request(json.as_bytes()).unwrap_err();
        assert_eq!(err.param.as_deref(), Some(field), "{json}");
        assert_eq!(err.status(), 400);
    }
}

#[test]
fn malformed_and_non_object_bodies_are_400() {
    for body in ["", "{", "[1]", "\"prompt\"", "null"] {
        let err = parse_request(body.as_bytes()).unwrap_err();
        assert_eq!(err.status(), 400, "{body}");
        assert!(err.param.is_none());
    }
}

#[test]
fn dalle2_rules() {
    let d2 = ModelRules::dalle2;
    assert_eq!(
        param_of(r#"{"prompt":""}"#, d2()).as_deref(),
        Some("prompt")
    );
    assert_eq!(
        param_of(r#"{"prompt":"   "}"#, d2()).as_deref(),
        Some("prompt")
    );
    assert_eq!(param_of(r#"{}"#, d2()).as_deref(), Some("prompt"));
    let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(1001));
    assert_eq!(param_of(&long, d2()).as_deref(), Some("prompt"));
    let ok = format!(r#"{{"prompt":"{}"}}"#, "é".repeat(1000));
    assert!(
        validate(&ok, d2()).is_ok(),
        "limit counts characters, not bytes"
    );
    assert!(validate(r#"{"prompt":"x","n":10}"#, d2()).is_ok());
    assert_eq!(
        param_of(r#"{"prompt":"x","n":11}"#, d2()).as_deref(),
        Some("n")
    );
    assert_eq!(
        param_of(r#"{"prompt":"x","n":0}"#, d2()).as_deref(),
        Some("n")
    );
    assert_eq!(
        param_of(r#"{"prompt":"x","n":-3}"#, d2()).as_deref(),
        Some("n")
    );
    assert_eq!(
        param_of(r#"{"prompt":"x","n":18446744073709551615}"#, d2()).as_deref(),
        Some("n")
    );
    for size in ["256x256", "512x512", "1024x1024"] {
        let json = format!(r#"{{"prompt":"x","size":"{size}"}}"#);
        assert_eq!(validate(&json, d2()).unwrap().size.to_string(), size);
    }
    assert_eq!(
        param_of(r#"{"prompt":"x","size":"1792x1024"}"#, d2()).as_deref(),
        Some("size")
    );
    assert!(validate(r#"{"prompt":"x","quality":"standard"}"#, d2()).is_ok());
    assert_eq!(
        param_of(r#"{"prompt":"x","quality":"hd"}"#, d2()).as_deref(),
        Some("quality")
    );
    assert_eq!(
        param_of(r#"{"prompt":"x","style":"vivid"}"#, d2()).as_deref(),
        Some("style")
    );
}

#[test]
fn dalle3_rules() {
    let d3 = || named("dall-e-3");
    let j = |rest: &str| format!(r#"{{"model":"dall-e-3","prompt":"x"{rest}}}"#);
    assert_eq!(param_of(&j(r#","n":2"#), d3()).as_deref(), Some("n"));
    assert_eq!(
        validate(&j(r#","n":2"#), d3()).unwrap_err().message,
        "You must provide n=1 for this model."
    );
    assert_eq!(
        param_of(&j(r#","size":"512x512""#), d3()).as_deref(),
        Some("size")
    );
    let req = validate(
        &j(r#","size":"1024x1792","quality":"hd","style":"natural""#),
        d3(),
    )
    .unwrap();
    assert_eq!(
        (req.quality, req.style),
        (Some(Quality::Hd), Some(Style::Natural))
    );
    assert_eq!(
        param_of(&j(r#","quality":"ultra""#), d3()).as_deref(),
        Some("quality")
    );
    assert_eq!(
        param_of(&j(r#","style":"cartoon""#), d3()).as_deref(),
        Some("style")
    );
    assert_eq!(
        param_of(&j(r#","response_format":"png""#), d3()).as_deref(),
        Some("response_format")
    );
    let long = format!(r#"{{"model":"dall-e-3","prompt":"{}"}}"#, "a".repeat(4000));
    assert!(validate(&long, d3()).is_ok());
    let long = format!(r#"{{"model":"dall-e-3","prompt":"{}"}}"#, "a".repeat(4001));
    assert_eq!(param_of(&long, d3()).as_deref(), Some("prompt"));
}

#[test]
fn gpt_image_rules_follow_the_sdk() {
    let g = || named("gpt-image-2");
    let j = |rest: &str| format!(r#"{{"model":"gpt-image-2","prompt":"x"{rest}}}"#);
    let req = validate(&j(""), g()).unwrap();
    let gpt = req.gpt.clone().unwrap();
    assert!(gpt.size_auto);
    assert_eq!(gpt.quality, GptQuality::Auto);
    assert_eq!(gpt.output_format, OutputFormat::Png);
    assert_eq!(req.response_format, ResponseFormat::B64Json);
    assert!(validate(&j(r#","size":"1536x864","quality":"high","n":10"#), g()).is_ok());
    assert!(validate(&j(r#","size":"auto","background":"transparent","output_format":"webp","output_compression":80"#), g()).is_ok());
    assert!(validate(
        &j(r#","stream":true,"partial_images":2,"moderation":"low","safety_identifier":"u1"}"#)
            .replace("}}", "}"),
        g()
    )
    .is_ok());
    for (rest, param) in [
        (r#","response_format":"url""#, "response_format"),
        (r#","style":"vivid""#, "style"),
        (r#","size":"1000x1000""#, "size"),
        (r#","size":"3072x1008""#, "size"),
        (r#","size":"512x512""#, "size"),
        (r#","quality":"hd""#, "quality"),
        (r#","quality":"max""#, "quality"),
        (r#","output_compression":50"#, "output_compression"),
        (
            r#","output_format":"jpeg","output_compression":101"#,
            "output_compression",
        ),
        (
            r#","output_format":"jpeg","background":"transparent""#,
            "background",
        ),
        (r#","partial_images":2"#, "partial_images"),
        (r#","stream":true,"partial_images":4"#, "partial_images"),
        (r#","stream":"yes""#, "stream"),
        (r#","n":11"#, "n"),
        (r#","output_format":"gif""#, "output_format"),
    ] {
        assert_eq!(param_of(&j(rest), g()).as_deref(), Some(param), "{rest}");
    }
    assert!(validate(&j(r#","quality":"max""#), named("gpt-image-2.5-sunburst")).is_ok());
    assert_eq!(
        param_of(&j(r#","size":"1536x864""#), named("gpt-image-1.5")).as_deref(),
        Some("size")
    );
    // GPT-only fields on a DALL·E model name the field.
    let d3 = r#"{"model":"dall-e-3","prompt":"x","background":"opaque"}"#;
    assert_eq!(
        param_of(d3, named("dall-e-3")).as_deref(),
        Some("background")
    );
    let d2 = r#"{"prompt":"x","stream":true}"#;
    assert_eq!(
        param_of(d2, ModelRules::dalle2()).as_deref(),
        Some("stream")
    );
}

#[test]
fn size_error_uses_openai_wording() {
    let err = validate(r#"{"prompt":"x","size":"1024x1025"}"#, ModelRules::dalle2()).unwrap_err();
    assert_eq!(
        err.message,
        "'1024x1025' is not one of ['256x256', '512x512', '1024x1024'] - 'size'"
    );
}

#[test]
fn gif_and_svg_bring_their_own_fields() {
    let g = || named("gpt-image-2.5-flare");
    let j = |rest: &str| format!(r#"{{"model":"gpt-image-2.5-flare","prompt":"x"{rest}}}"#);
    let gif = validate(
        &j(r#","output_format":"gif","frame_count":12,"frame_duration_ms":120"#),
        g(),
    )
    .unwrap();
    let p = gif.gpt.unwrap();
    assert_eq!((p.frame_count, p.frame_duration_ms), (Some(12), Some(120)));
    let svg = validate(
        &j(r#","output_format":"svg","svg":{"model":"gpt-5","reasoning":{"effort":"low"}}"#),
        g(),
    )
    .unwrap();
    assert_eq!(svg.gpt.unwrap().svg.unwrap()["model"], "gpt-5");
    for (rest, param) in [
        (r#","frame_count":4"#, "frame_count"),
        (
            r#","output_format":"png","frame_duration_ms":100"#,
            "frame_duration_ms",
        ),
        (r#","output_format":"gif","frame_count":1"#, "frame_count"),
        (r#","output_format":"gif","frame_count":17"#, "frame_count"),
        (r#","output_format":"gif","stream":true"#, "stream"),
        (
            r#","output_format":"gif","output_compression":50"#,
            "output_compression",
        ),
        (
            r#","output_format":"gif","background":"transparent""#,
            "background",
        ),
        (r#","output_format":"svg","n":2"#, "n"),
        (r#","output_format":"svg","stream":true"#, "stream"),
        (r#","svg":{"model":"gpt-5"}"#, "svg"),
        (
            r#","output_format":"svg","svg":{"reasoning":{"effort":"low"}}"#,
            "svg",
        ),
        (
            r#","output_format":"svg","svg":{"model":"m","reasoning":{"effort":"huge"}}"#,
            "svg",
        ),
        (r#","output_format":"svg","svg":"gpt-5""#, "svg"),
    ] {
        assert_eq!(param_of(&j(rest), g()).as_deref(), Some(param), "{rest}");
    }
    // gpt-image-2 has neither format.
    assert_eq!(
        param_of(&j(r#","output_format":"gif""#), named("gpt-image-2")).as_deref(),
        Some("output_format")
    );
}

#[test]
fn unknown_fields_are_refused_or_passed_as_the_model_says() {
    let body = r#"{"model":"m","prompt":"x","prompt_rewriter":{"mode":"off"},"seed":7}"#;
    // dall-e-3 refuses, naming the field.
    assert_eq!(
        param_of(body, named("dall-e-3")).as_deref(),
        Some("prompt_rewriter")
    );
    // A GPT image family passes both through, untouched and in order.
    let req = validate(body, named("gpt-image-2")).unwrap();
    let extra = req.gpt.unwrap().extra;
    assert_eq!(
        extra.keys().collect::<Vec<_>>(),
        ["prompt_rewriter", "seed"]
    );
    assert_eq!(extra["prompt_rewriter"]["mode"], "off");
    // A known field is still checked: a typo of a known value is a 400.
    assert_eq!(
        param_of(
            r#"{"prompt":"x","quality":"ultra","seed":7}"#,
            named("gpt-image-2")
        )
        .as_deref(),
        Some("quality")
    );
}
