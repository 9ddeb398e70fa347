//! Between the contract's DALL·E dialect and the GPT image dialect. A DALL·E request for a
//! `gpt-image` upstream: size sent as is when accepted, else generated at the smallest accepted
//! size of the same aspect and scaled to exactly what was asked; quality mapped
//! (standard -> medium, hd -> high); style as a sentence appended to the prompt; no
//! `response_format` (always base64); `output_format: png`; `user` as a hashed
//! `safety_identifier`; `n` split past the upstream's maximum. A GPT image request for a
//! DALL·E upstream or a local node is mapped back where that means something, and refused
//! with a 400 naming the field where it does not.

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use base64::Engine;

use super::{AnswerMeta, BackendError, Generation, ImagePayload};
use crate::api::{
    Background, FlexibleSizes, GptAnswerFields, GptParams, GptQuality, ImageRequest, OutputFormat,
    Quality, Size, Style,
};
use crate::config::TranslationConfig;

/// Sizes a GPT image upstream accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum SizeAccept {
    Flexible(FlexibleSizes),
    List(Vec<Size>),
}

impl SizeAccept {
    /// The size to ask the upstream for, to be scaled to `want` if different.
    pub fn upstream_size(&self, want: Size) -> Size {
        match self {
            SizeAccept::Flexible(f) if f.check(want).is_ok() => want,
            SizeAccept::Flexible(f) => f.smallest_like(want),
            SizeAccept::List(list) if list.contains(&want) => want,
            SizeAccept::List(list) => {
                let aspect = |s: &Size| f64::from(s.width) / f64::from(s.height);
                let target = aspect(&want);
                // Closest aspect first, then the smallest that is at least as large.
                list.iter()
                    .min_by(|a, b| {
                        let da = (aspect(a).ln() - target.ln()).abs();
                        let db = (aspect(b).ln() - target.ln()).abs();
                        let covers = |s: &Size| s.width >= want.width && s.height >= want.height;
                        da.total_cmp(&db)
                            .then(covers(b).cmp(&covers(a)))
                            .then((a.width * a.height).cmp(&(b.width * b.height)))
                    })
                    .copied()
                    .unwrap_or(want)
            }
        }
    }
}

/// One target's compiled translation rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub standard: GptQuality,
    pub hd: GptQuality,
    pub vivid: String,
    pub natural: String,
    pub pass_user: bool,
    pub max_n: u32,
    pub sizes: SizeAccept,
    /// The prompt of a variation sent as an edit (GPT image upstreams).
    pub variation_prompt: String,
}

impl Translation {
    /// The config is validated: qualities and sizes parse.
    pub fn from_config(c: &TranslationConfig) -> Self {
        let quality = |k: &str, d: GptQuality| {
            c.quality
                .get(k)
                .and_then(|q| GptQuality::parse(q))
                .unwrap_or(d)
        };
        Translation {
            standard: quality("standard", GptQuality::Medium),
            hd: quality("hd", GptQuality::High),
            vivid: c.style.vivid.clone(),
            natural: c.style.natural.clone(),
            pass_user: c.pass_user,
            max_n: c.max_n.clamp(1, 10),
            variation_prompt: c.variation_prompt.clone(),
            sizes: match &c.sizes {
                None => SizeAccept::Flexible(FlexibleSizes::GPT_IMAGE_2),
                Some(list) => {
                    SizeAccept::List(list.iter().filter_map(|s| s.parse().ok()).collect())
                }
            },
        }
    }
}

impl Default for Translation {
    fn default() -> Self {
        Translation::from_config(&TranslationConfig::default())
    }
}

/// `user` as it leaves the gateway: its SHA-256 unless configured to pass it through.
pub fn safety_identifier(user: &str, pass: bool) -> String {
    if pass {
        user.to_string()
    } else {
        hex::encode(Sha256::digest(user.as_bytes()))
    }
}

/// The GPT image body for a DALL·E request (without `n`), and the prompt actually sent.
pub fn gpt_body_from_dalle(
    req: &ImageRequest,
    t: &Translation,
    upstream_size: Size,
) -> (Value, String) {
    let prompt = match req.style {
        Some(Style::Vivid) => format!("{} {}", req.prompt, t.vivid),
        Some(Style::Natural) => format!("{} {}", req.prompt, t.natural),
        None => req.prompt.clone(),
    };
    let quality = match req.quality {
        Some(Quality::Hd) => t.hd,
        _ => t.standard,
    };
    let mut body = json!({
        "prompt": prompt,
        "size": upstream_size.to_string(),
        "quality": quality.as_str(),
        "output_format": "png",
    });
    if let Some(user) = &req.user {
        body["safety_identifier"] = safety_identifier(user, t.pass_user).into();
    }
    (body, prompt)
}

/// A GPT image request passed through to a GPT image upstream, every field kept.
pub fn gpt_body(req: &ImageRequest, g: &GptParams) -> Value {
    let mut body = json!({
        "prompt": req.prompt,
        "n": req.n,
        "size": if g.size_auto { "auto".to_string() } else { req.size.to_string() },
        "quality": g.quality.as_str(),
        "background": g.background.as_str(),
        "output_format": g.output_format.as_str(),
    });
    if let Some(c) = g.output_compression {
        body["output_compression"] = c.into();
    }
    if let Some(m) = g.moderation {
        body["moderation"] = m.as_str().into();
    }
    if let Some(s) = &g.safety_identifier {
        body["safety_identifier"] = s.as_str().into();
    }
    if let Some(u) = &req.user {
        body["user"] = u.as_str().into();
    }
    if g.stream {
        body["stream"] = true.into();
    }
    if let Some(p) = g.partial_images {
        body["partial_images"] = p.into();
    }
    if let Some(c) = g.complexity {
        body["complexity"] = c.as_str().into();
    }
    if let Some(f) = g.frame_count {
        body["frame_count"] = f.into();
    }
    if let Some(d) = g.frame_duration_ms {
        body["frame_duration_ms"] = d.into();
    }
    if let Some(svg) = &g.svg {
        body["svg"] = svg.clone();
    }
    // Fields the gateway does not know yet, as the client sent them (never over a known one).
    if let Value::Object(fields) = &mut body {
        for (k, v) in &g.extra {
            fields.entry(k.as_str()).or_insert_with(|| v.clone());
        }
    }
    body
}

fn unsupported(param: &str, what: &str) -> BackendError {
    BackendError::Rejected {
        message: format!(
            "Invalid '{param}': {what} is not supported by the backend serving this model."
        ),
        error_type: Some("invalid_request_error".into()),
        code: Some("unsupported_parameter".into()),
        param: Some(param.into()),
    }
}

/// What a backend that only makes opaque PNGs (DALL·E upstreams, local nodes) can honour of
/// a GPT image request.
pub fn require_plain_png(req: &ImageRequest) -> Result<(), BackendError> {
    let Some(g) = &req.gpt else { return Ok(()) };
    if g.background == Background::Transparent {
        return Err(unsupported("background", "a transparent background"));
    }
    if g.output_format != OutputFormat::Png {
        return Err(unsupported(
            "output_format",
            "an output format other than png",
        ));
    }
    if g.output_compression.is_some() {
        return Err(unsupported("output_compression", "output compression"));
    }
    if let Some(field) = g.extra.keys().next() {
        return Err(unsupported(field, "this field"));
    }
    Ok(())
}

/// GPT image quality as a DALL·E one (local presets, DALL·E upstreams).
pub fn dalle_quality(req: &ImageRequest) -> Quality {
    match (&req.gpt, req.quality) {
        (Some(g), _)
            if matches!(
                g.quality,
                GptQuality::High | GptQuality::Xhigh | GptQuality::Max
            ) =>
        {
            Quality::Hd
        }
        (_, Some(q)) => q,
        _ => Quality::Standard,
    }
}

/// A GPT image request for an upstream that speaks the DALL·E dialect.
pub fn dalle_body_from_gpt(req: &ImageRequest) -> Result<Value, BackendError> {
    require_plain_png(req)?;
    let g = req.gpt.as_ref();
    let mut body = json!({
        "prompt": req.prompt,
        "n": req.n,
        "size": req.size.to_string(),
        "quality": dalle_quality(req).as_str(),
        "response_format": "b64_json",
    });
    if let Some(user) = g
        .and_then(|g| g.safety_identifier.as_ref())
        .or(req.user.as_ref())
    {
        body["user"] = user.as_str().into();
    }
    Ok(body)
}

/// The top-level fields of a GPT image answer: the upstream's when it gave them, else what
/// was made (backends that only make opaque PNGs, DALL·E upstreams). `None` for DALL·E
/// requests, whose answers keep the contract's shape.
pub fn answer_fields(req: &ImageRequest, meta: Option<&AnswerMeta>) -> Option<GptAnswerFields> {
    let g = req.gpt.as_ref()?;
    let meta = meta.cloned().unwrap_or_default();
    let quality = match g.quality {
        GptQuality::Auto => "medium",
        q => q.as_str(),
    };
    let background = match g.background {
        Background::Transparent => "transparent",
        _ => "opaque",
    };
    Some(GptAnswerFields {
        background: meta.background.unwrap_or_else(|| background.to_string()),
        output_format: meta
            .output_format
            .unwrap_or_else(|| g.output_format.as_str().to_string()),
        quality: meta.quality.unwrap_or_else(|| quality.to_string()),
        size: meta.size.unwrap_or_else(|| req.size.to_string()),
        usage: meta.usage,
    })
}

/// One `image_generation.completed` (an edit: `image_edit.completed`) server-sent event per
/// image, for backends that cannot stream: the answer arrives whole, then goes out as the
/// events a streaming upstream sends.
pub fn completed_events(
    req: &ImageRequest,
    generation: Generation,
) -> Result<Vec<Bytes>, BackendError> {
    let fields = answer_fields(req, generation.meta.as_ref()).unwrap_or(GptAnswerFields {
        background: "opaque".into(),
        output_format: "png".into(),
        quality: "medium".into(),
        size: req.size.to_string(),
        usage: None,
    });
    let usage = fields.usage.clone().unwrap_or_else(|| {
        json!({"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
               "output_tokens": 0, "total_tokens": 0})
    });
    let created_at = crate::clock::now_unix();
    let engine = base64::engine::general_purpose::STANDARD;
    let kind = match req.operation() {
        crate::api::Operation::Generation => "image_generation.completed",
        _ => "image_edit.completed",
    };
    generation
        .images
        .into_iter()
        .map(|img| {
            let b64 = match img.payload {
                ImagePayload::Base64(b) => String::from_utf8(b.to_vec())
                    .map_err(|_| BackendError::BadResponse("invalid base64 image".into()))?,
                ImagePayload::Bytes(b) => engine.encode(&b),
                ImagePayload::Url(_) => {
                    return Err(BackendError::BadResponse(
                        "a URL answer cannot be streamed as an image event".into(),
                    ))
                }
            };
            let event = json!({
                "type": kind,
                "b64_json": b64,
                "background": fields.background,
                "created_at": created_at,
                "output_format": fields.output_format,
                "quality": fields.quality,
                "size": fields.size,
                "usage": usage,
            });
            Ok(Bytes::from(format!("event: {kind}\ndata: {event}\n\n")))
        })
        .collect()
}

/// Scales (cover, then centre crop) a decoded image to exactly `size`, as PNG.
pub fn resize_exact(bytes: &[u8], size: Size) -> Result<Bytes, BackendError> {
    let img = image::load_from_memory(bytes).map_err(|e| {
        BackendError::BadResponse(format!("cannot decode the upstream image ({e})"))
    })?;
    if (img.width(), img.height()) == (size.width, size.height) {
        return Ok(Bytes::copy_from_slice(bytes));
    }
    let scaled = img.resize_to_fill(
        size.width,
        size.height,
        image::imageops::FilterType::Lanczos3,
    );
    let mut out = std::io::Cursor::new(Vec::new());
    scaled
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| BackendError::BadResponse(format!("cannot encode the scaled image ({e})")))?;
    Ok(Bytes::from(out.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_a_gpt_image_upstream_accepts() {
        let flex = SizeAccept::Flexible(FlexibleSizes::GPT_IMAGE_2);
        for (want, up) in [
            ("1024x1024", "1024x1024"),
            ("1792x1024", "1792x1024"),
            ("1024x1792", "1024x1792"),
            ("512x512", "816x816"),
            ("256x256", "816x816"),
        ] {
            assert_eq!(
                flex.upstream_size(want.parse().unwrap()).to_string(),
                up,
                "{want}"
            );
        }
        let list = SizeAccept::List(vec![
            Size::new(1024, 1024),
            Size::new(1536, 1024),
            Size::new(1024, 1536),
        ]);
        assert_eq!(
            list.upstream_size(Size::new(256, 256)),
            Size::new(1024, 1024)
        );
        assert_eq!(
            list.upstream_size(Size::new(1792, 1024)),
            Size::new(1536, 1024)
        );
        assert_eq!(
            list.upstream_size(Size::new(1024, 1792)),
            Size::new(1024, 1536)
        );
    }

    fn gpt_request(extra: &str) -> ImageRequest {
        let json = format!(r#"{{"model":"gpt-image-2","prompt":"p","size":"1024x1536"{extra}}}"#);
        crate::api::parse_request(json.as_bytes())
            .unwrap()
            .validate(
                &crate::config::Catalog::builtin()
                    .rules("gpt-image-2")
                    .unwrap(),
            )
            .unwrap()
    }

    #[test]
    fn gpt_requests_map_back_onto_dalle_upstreams_or_are_refused() {
        let body = dalle_body_from_gpt(&gpt_request(
            r#","quality":"high","safety_identifier":"s1","n":2"#,
        ))
        .unwrap();
        assert_eq!(
            body,
            json!({"prompt": "p", "n": 2, "size": "1024x1536", "quality": "hd",
                   "response_format": "b64_json", "user": "s1"})
        );
        let body = dalle_body_from_gpt(&gpt_request(r#","quality":"low""#)).unwrap();
        assert_eq!(body["quality"], "standard");
        for (extra, param) in [
            (r#","background":"transparent""#, "background"),
            (r#","output_format":"webp""#, "output_format"),
            (
                r#","output_format":"jpeg","output_compression":50"#,
                "output_format",
            ),
        ] {
            match dalle_body_from_gpt(&gpt_request(extra)) {
                Err(BackendError::Rejected { param: p, .. }) => {
                    assert_eq!(p.as_deref(), Some(param))
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn user_is_hashed_unless_passed_through() {
        let hashed = safety_identifier("alice@example.com", false);
        assert_eq!(hashed.len(), 64);
        assert!(!hashed.contains("alice"));
        assert_eq!(safety_identifier("alice", true), "alice");
    }

    #[test]
    fn resize_gives_exactly_the_size() {
        let img = image::RgbImage::from_pixel(816, 816, image::Rgb([1, 2, 3]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let out = resize_exact(png.get_ref(), Size::new(512, 512)).unwrap();
        let back = image::load_from_memory(&out).unwrap();
        assert_eq!((back.width(), back.height()), (512, 512));
    }
}
