//! Parsing and validation of `POST /v1/images/generations` bodies.
//!
//! Parsing goes through `serde_json::Value` rather than a derived struct so that every error
//! can name its field (`param`) and use OpenAI's wording, which SDK users match on.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::rules::{
    Background, Complexity, Family, GptQuality, ModelRules, Moderation, OutputFormat, Quality,
    ResponseFormat, Size, Style, UnknownFields,
};

pub const DEFAULT_MODEL: &str = "dall-e-2";

/// A body that is well-formed JSON with the right field types, not yet checked against a
/// model's rules (which needs the model resolved first: unknown model is a 404, not a 400).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub n: Option<i64>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub style: Option<String>,
    pub response_format: Option<String>,
    pub user: Option<String>,
    // GPT image fields (rejected for DALL·E models).
    pub background: Option<String>,
    pub output_format: Option<String>,
    pub output_compression: Option<i64>,
    pub moderation: Option<String>,
    pub safety_identifier: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<i64>,
    pub complexity: Option<String>,
    pub frame_count: Option<i64>,
    pub frame_duration_ms: Option<i64>,
    pub svg: Option<Value>,
    /// Members the gateway does not know, in the order given: refused or passed through,
    /// as the model's rules say.
    #[serde(skip)]
    pub extra: Map<String, Value>,
}

/// The GPT image fields of a request to a GPT image model, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct GptParams {
    /// `size: auto` (the request's `size` then holds 1024x1024 for backends that need one).
    pub size_auto: bool,
    pub quality: GptQuality,
    pub background: Background,
    pub output_format: OutputFormat,
    pub output_compression: Option<u8>,
    pub moderation: Option<Moderation>,
    pub safety_identifier: Option<String>,
    pub stream: bool,
    pub partial_images: Option<u8>,
    pub complexity: Option<Complexity>,
    /// `gif` output only.
    pub frame_count: Option<u32>,
    pub frame_duration_ms: Option<u32>,
    /// `svg` output only: `{model, reasoning?: {effort?}}`, checked for shape.
    pub svg: Option<Value>,
    /// Fields the gateway does not know, for a `gpt-image` upstream (the model's rules pass
    /// them through).
    pub extra: Map<String, Value>,
}

/// A request that satisfies its model's rules, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub model: String,
    pub prompt: String,
    pub n: u32,
    pub size: Size,
    /// Present when the client sent it or the model offers a choice (dall-e-3).
    pub quality: Option<Quality>,
    /// Present when the model accepts a style.
    pub style: Option<Style>,
    pub response_format: ResponseFormat,
    pub user: Option<String>,
    /// Present exactly when the model is a GPT image model.
    pub gpt: Option<GptParams>,
    /// The uploaded images of an edit or a variation (`None`: a generation). Shared, so a
    /// retry on another target resends the same parts without a copy.
    pub inputs: Option<std::sync::Arc<super::edit::EditInputs>>,
}

impl ImageRequest {
    pub fn family(&self) -> Family {
        if self.gpt.is_some() {
            Family::GptImage
        } else {
            Family::DallE
        }
    }

    pub fn streaming(&self) -> bool {
        self.gpt.as_ref().is_some_and(|g| g.stream)
    }

    pub fn operation(&self) -> super::edit::Operation {
        self.inputs
            .as_ref()
            .map_or(super::edit::Operation::Generation, |i| i.operation)
    }
}

/// Every member a generation request may carry (the rest are unknown: refused or passed through
/// by the model's rules).
pub const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "style",
    "response_format",
    "user",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "safety_identifier",
    "stream",
    "partial_images",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
];

/// Fields only GPT image models take.
const GPT_FIELDS: &[&str] = &[
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "safety_identifier",
    "stream",
    "partial_images",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
];

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        field,
        format!(
            "Invalid type for '{field}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
    )
}

fn take_string(obj: &mut Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
    }
}

fn take_int(obj: &mut Map<String, Value>, field: &str) -> Result<Option<i64>, ApiError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(num)) if num.is_i64() => Ok(num.as_i64()),
        // Larger than i64::MAX: an integer, and certainly above every maximum.
        Some(Value::Number(num)) if num.is_u64() => Ok(Some(i64::MAX)),
        Some(other) => Err(wrong_type(field, "an integer", &other)),
    }
}

/// Parses a JSON body into a [`RawRequest`]: malformed JSON, a non-object body, unknown
/// fields and wrong types are 400s naming the field. `null` means "not given".
pub fn parse_request(body: &[u8]) -> Result<RawRequest, ApiError> {
    // A well-formed body goes straight into its fields (no map of values, no key strings).
    // Anything else (bad JSON, an unknown field, a wrong type, a repeated field) is parsed
    // again through values, which explains the problem exactly and lets a repeat win.
    match serde_json::from_slice::<RawRequest>(body) {
        Ok(raw) => Ok(raw),
        Err(_) => parse_request_values(body),
    }
}

fn parse_request_values(body: &[u8]) -> Result<RawRequest, ApiError> {
    // A member given twice is refused (I-JSON), not "the last one wins".
    super::json::reject_duplicate_keys(body)?;
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            super::ErrorKind::InvalidRequest,
            format!(
                "We could not parse the JSON body of your request ({e}). The API expects a \
                 JSON object as the body of a POST request."
            ),
        )
    })?;
    let mut obj = match value {
        Value::Object(map) => map,
        other => {
            return Err(ApiError::new(
                super::ErrorKind::InvalidRequest,
                format!(
                    "Invalid request body: expected a JSON object, but got {} instead.",
                    type_name(&other)
                ),
            ))
        }
    };
    let unknown: Vec<String> = obj
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .cloned()
        .collect();
    let extra: Map<String, Value> = unknown
        .into_iter()
        .filter_map(|k| obj.remove_entry(&k))
        .collect();
    let svg = match obj.remove("svg") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v),
        Some(other) => return Err(wrong_type("svg", "an object", &other)),
    };
    let stream = match obj.remove("stream") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(other) => return Err(wrong_type("stream", "a boolean", &other)),
    };
    Ok(RawRequest {
        model: take_string(&mut obj, "model")?,
        prompt: take_string(&mut obj, "prompt")?,
        n: take_int(&mut obj, "n")?,
        size: take_string(&mut obj, "size")?,
        quality: take_string(&mut obj, "quality")?,
        style: take_string(&mut obj, "style")?,
        response_format: take_string(&mut obj, "response_format")?,
        user: take_string(&mut obj, "user")?,
        background: take_string(&mut obj, "background")?,
        output_format: take_string(&mut obj, "output_format")?,
        output_compression: take_int(&mut obj, "output_compression")?,
        moderation: take_string(&mut obj, "moderation")?,
        safety_identifier: take_string(&mut obj, "safety_identifier")?,
        stream,
        partial_images: take_int(&mut obj, "partial_images")?,
        complexity: take_string(&mut obj, "complexity")?,
        frame_count: take_int(&mut obj, "frame_count")?,
        frame_duration_ms: take_int(&mut obj, "frame_duration_ms")?,
        svg,
        extra,
    })
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    format!("[{}]", quoted.join(", "))
}

fn not_one_of<T: std::fmt::Display>(value: &str, allowed: &[T], field: &str) -> ApiError {
    ApiError::invalid(
        field,
        format!("'{value}' is not one of {} - '{field}'", list(allowed)),
    )
}

fn range(field: &str, value: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    if value < min {
        return Err(ApiError::invalid(
            field,
            format!("Invalid '{field}': integer below minimum value. Expected a value >= {min}, but got {value} instead."),
        ));
    }
    if value > max {
        let message = if field == "n" && max == 1 {
            "You must provide n=1 for this model.".to_string()
        } else {
            format!("Invalid '{field}': integer above maximum value. Expected a value <= {max}, but got {value} instead.")
        };
        return Err(ApiError::invalid(field, message));
    }
    Ok(value)
}

fn choice<T: Copy + std::fmt::Display>(
    value: Option<&str>,
    field: &str,
    all: &[T],
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    value
        .map(|v| parse(v).ok_or_else(|| not_one_of(v, all, field)))
        .transpose()
}

/// Checks an enum-valued field: first against the contract's values, then against what
/// this model accepts.
fn check_choice<T>(
    value: Option<&str>,
    field: &str,
    all: &[T],
    parse: fn(&str) -> Option<T>,
    allowed: &[T],
    model: &str,
) -> Result<Option<T>, ApiError>
where
    T: Copy + PartialEq + std::fmt::Display,
{
    let Some(parsed) = choice(value, field, all, parse)? else {
        return Ok(None);
    };
    if allowed.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!(
                "Invalid '{field}': the model '{model}' does not support the '{field}' parameter."
            ),
        ));
    }
    if !allowed.contains(&parsed) {
        return Err(ApiError::invalid(
            field,
            format!(
                "'{parsed}' is not supported by the model '{model}'; expected one of {} - '{field}'",
                list(allowed)
            ),
        ));
    }
    Ok(Some(parsed))
}

fn check_prompt(prompt: Option<String>, rules: &ModelRules) -> Result<String, ApiError> {
    let prompt = prompt
        .ok_or_else(|| ApiError::invalid("prompt", "Missing required parameter: 'prompt'."))?;
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
        ));
    }
    let chars = prompt.chars().count();
    if chars > rules.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "Invalid 'prompt': string too long. Expected a string with maximum length {}, but got a string with length {chars} instead.",
                rules.max_prompt_chars
            ),
        ));
    }
    Ok(prompt)
}

fn unsupported(field: &str, model: &str) -> ApiError {
    ApiError::invalid(
        field,
        format!("Invalid '{field}': the model '{model}' does not support the '{field}' parameter."),
    )
}

const SVG_EFFORTS: &[&str] = &["none", "minimal", "low", "medium", "high", "xhigh", "max"];

/// `svg: {model: string, reasoning?: {effort?: one of SVG_EFFORTS} | null}`, as the SDK types it.
fn check_svg(svg: Value) -> Result<Value, ApiError> {
    let bad = |what: String| ApiError::invalid("svg", format!("Invalid 'svg': {what}."));
    let Value::Object(obj) = &svg else {
        return Err(bad("expected an object".into()));
    };
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("model", Value::String(m)) if !m.is_empty() => {}
            ("model", _) => return Err(bad("'model' must be a non-empty string".into())),
            ("reasoning", Value::Null) => {}
            ("reasoning", Value::Object(r)) => {
                for (rk, rv) in r {
                    match (rk.as_str(), rv) {
                        ("effort", Value::Null) => {}
                        ("effort", Value::String(e)) if SVG_EFFORTS.contains(&e.as_str()) => {}
                        ("effort", other) => {
                            return Err(bad(format!(
                                "'reasoning.effort' {other} is not one of {}",
                                list(SVG_EFFORTS)
                            )))
                        }
                        (other, _) => {
                            return Err(bad(format!("unrecognized member 'reasoning.{other}'")))
                        }
                    }
                }
            }
            ("reasoning", _) => return Err(bad("'reasoning' must be an object".into())),
            (other, _) => return Err(bad(format!("unrecognized member '{other}'"))),
        }
    }
    if !obj.contains_key("model") {
        return Err(bad("missing required member 'model'".into()));
    }
    Ok(svg)
}

impl RawRequest {
    /// The model asked for, or the contract's default.
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }

    fn gpt_field_given(&self) -> Option<&'static str> {
        let given = [
            self.background.is_some(),
            self.output_format.is_some(),
            self.output_compression.is_some(),
            self.moderation.is_some(),
            self.safety_identifier.is_some(),
            self.stream.is_some(),
            self.partial_images.is_some(),
            self.complexity.is_some(),
            self.frame_count.is_some(),
            self.frame_duration_ms.is_some(),
            self.svg.is_some(),
        ];
        GPT_FIELDS
            .iter()
            .zip(given)
            .find(|(_, g)| *g)
            .map(|(f, _)| *f)
    }

    /// Applies a model's rules and fills in defaults. `model` is the public model name.
    pub fn validate(mut self, rules: &ModelRules) -> Result<ImageRequest, ApiError> {
        if rules.unknown_fields == UnknownFields::Refuse {
            if let Some(unknown) = self.extra.keys().next() {
                return Err(ApiError::invalid(
                    unknown,
                    format!("Unrecognized request argument supplied: {unknown}"),
                ));
            }
        }
        if rules.family == Family::GptImage {
            return self.validate_gpt(rules);
        }
        self.extra.clear();
        let model = self.model().to_string();
        if let Some(field) = self.gpt_field_given() {
            return Err(ApiError::invalid(
                field,
                format!("Invalid '{field}': the model '{model}' does not support it (GPT image models only)."),
            ));
        }
        let prompt = check_prompt(self.prompt, rules)?;
        let n = range("n", self.n.unwrap_or(1), 1, i64::from(rules.max_n))? as u32;
        let size = match self.size.as_deref() {
            None => rules.default_size,
            Some(s) => s
                .parse::<Size>()
                .ok()
                .filter(|size| rules.sizes.contains(size))
                .ok_or_else(|| not_one_of(s, &rules.sizes, "size"))?,
        };
        let quality = check_choice(
            self.quality.as_deref(),
            "quality",
            Quality::ALL,
            Quality::parse,
            &rules.qualities,
            &model,
        )?
        .or((rules.qualities.len() > 1).then_some(Quality::Standard));
        let style = check_choice(
            self.style.as_deref(),
            "style",
            Style::ALL,
            Style::parse,
            &rules.styles,
            &model,
        )?
        .or((!rules.styles.is_empty()).then_some(Style::Vivid));
        let response_format = choice(
            self.response_format.as_deref(),
            "response_format",
            ResponseFormat::ALL,
            ResponseFormat::parse,
        )?
        .unwrap_or(ResponseFormat::Url);
        Ok(ImageRequest {
            model,
            prompt,
            n,
            size,
            quality,
            style,
            response_format,
            user: self.user,
            gpt: None,
            inputs: None,
        })
    }

    /// The GPT image dialect, as the official SDK documents it.
    fn validate_gpt(self, rules: &ModelRules) -> Result<ImageRequest, ApiError> {
        let model = self.model().to_string();
        if self.response_format.is_some() {
            return Err(ApiError::invalid(
                "response_format",
                format!("Invalid 'response_format': not supported for GPT image models ('{model}'), which always return base64 images."),
            ));
        }
        if self.style.is_some() {
            return Err(ApiError::invalid(
                "style",
                format!("Invalid 'style': not supported for GPT image models ('{model}'); describe the style in the prompt instead."),
            ));
        }
        let prompt = check_prompt(self.prompt, rules)?;
        let n = range("n", self.n.unwrap_or(1), 1, i64::from(rules.max_n))? as u32;

        let (size, size_auto) = match self.size.as_deref() {
            None | Some("auto") if rules.auto_size => (rules.default_size, true),
            None => (rules.default_size, false),
            Some(s) => {
                let parsed = s
                    .parse::<Size>()
                    .map_err(|e| ApiError::invalid("size", format!("Invalid 'size': {e}.")))?;
                if !rules.sizes.contains(&parsed) {
                    match &rules.flexible_sizes {
                        Some(flex) => flex.check(parsed).map_err(|why| {
                            ApiError::invalid(
                                "size",
                                format!("Invalid 'size' '{s}' for the model '{model}': {why}."),
                            )
                        })?,
                        None => {
                            let mut allowed: Vec<String> =
                                rules.sizes.iter().map(Size::to_string).collect();
                            if rules.auto_size {
                                allowed.push("auto".into());
                            }
                            return Err(not_one_of(s, &allowed, "size"));
                        }
                    }
                }
                (parsed, false)
            }
        };

        let quality = match self.quality.as_deref() {
            None => GptQuality::Auto,
            Some(q) => GptQuality::parse(q)
                .filter(|q| rules.gpt_qualities.contains(q))
                .ok_or_else(|| not_one_of(q, &rules.gpt_qualities, "quality"))?,
        };
        let background = check_choice(
            self.background.as_deref(),
            "background",
            Background::ALL,
            Background::parse,
            &rules.backgrounds,
            &model,
        )?
        .unwrap_or(Background::Auto);
        let output_format = check_choice(
            self.output_format.as_deref(),
            "output_format",
            OutputFormat::ALL,
            OutputFormat::parse,
            &rules.output_formats,
            &model,
        )?
        .unwrap_or(rules.output_formats[0]);
        let compressible = matches!(output_format, OutputFormat::Jpeg | OutputFormat::Webp);
        if background == Background::Transparent
            && !matches!(output_format, OutputFormat::Png | OutputFormat::Webp)
        {
            return Err(ApiError::invalid(
                "background",
                "Invalid 'background': transparent backgrounds need output_format png or webp.",
            ));
        }
        let output_compression =
            match self.output_compression {
                None => None,
                Some(_) if !compressible => return Err(ApiError::invalid(
                    "output_compression",
                    "Invalid 'output_compression': only supported with output_format jpeg or webp.",
                )),
                Some(c) => Some(range("output_compression", c, 0, 100)? as u8),
            };
        let stream = self.stream.unwrap_or(false);
        if stream && !rules.stream {
            return Err(unsupported("stream", &model));
        }
        let partial_images = match self.partial_images {
            None => None,
            Some(_) if !stream => {
                return Err(ApiError::invalid(
                    "partial_images",
                    "Invalid 'partial_images': only supported with stream: true.",
                ))
            }
            Some(p) => Some(range("partial_images", p, 0, 3)? as u8),
        };
        let moderation = choice(
            self.moderation.as_deref(),
            "moderation",
            Moderation::ALL,
            Moderation::parse,
        )?;
        if self.complexity.is_some() && !rules.complexity {
            return Err(unsupported("complexity", &model));
        }
        let complexity = choice(
            self.complexity.as_deref(),
            "complexity",
            Complexity::ALL,
            Complexity::parse,
        )?;
        let only_with = |field: &str, format: &str| {
            ApiError::invalid(
                field,
                format!("Invalid '{field}': only supported with output_format={format}."),
            )
        };
        let (mut frame_count, mut frame_duration_ms) = (None, None);
        if output_format == OutputFormat::Gif {
            // GIF output: no streaming, partial images or compression (OpenAI's rules).
            if stream {
                return Err(ApiError::invalid(
                    "stream",
                    "Invalid 'stream': GIF output does not support streaming.",
                ));
            }
            if let Some(f) = self.frame_count {
                frame_count = Some(range("frame_count", f, 2, 16)? as u32);
            }
            if let Some(d) = self.frame_duration_ms {
                frame_duration_ms = Some(range("frame_duration_ms", d, 1, 655_350)? as u32);
            }
        } else if self.frame_count.is_some() {
            return Err(only_with("frame_count", "gif"));
        } else if self.frame_duration_ms.is_some() {
            return Err(only_with("frame_duration_ms", "gif"));
        }
        let svg = match (output_format, self.svg) {
            (OutputFormat::Svg, svg) => {
                if n != 1 {
                    return Err(ApiError::invalid(
                        "n",
                        "Invalid 'n': SVG output requires n=1.",
                    ));
                }
                if stream {
                    return Err(ApiError::invalid(
                        "stream",
                        "Invalid 'stream': SVG output does not support streaming.",
                    ));
                }
                svg.map(check_svg).transpose()?
            }
            (_, Some(_)) => return Err(only_with("svg", "svg")),
            (_, None) => None,
        };
        Ok(ImageRequest {
            model,
            prompt,
            n,
            size,
            quality: None,
            style: None,
            response_format: ResponseFormat::B64Json,
            user: self.user,
            gpt: Some(GptParams {
                size_auto,
                quality,
                background,
                output_format,
                output_compression,
                moderation,
                safety_identifier: self.safety_identifier.filter(|s| !s.is_empty()),
                stream,
                partial_images,
                complexity,
                frame_count,
                frame_duration_ms,
                svg,
                extra: self.extra,
            }),
            inputs: None,
        })
    }
}

#[cfg(test)]
mod tests;
