//! `POST /v1/images/edits` and `POST /v1/images/variations`: multipart forms, parsed as they
//! stream (multer: each part is held once, the whole body bounded), text fields into a
//! [`RawRequest`] validated by the same rules as a generation, and each file checked from its
//! own bytes (magic number and header dimensions), never from its name or declared type.

use std::sync::Arc;

use bytes::Bytes;
use futures_core::Stream;
use sha2::{Digest, Sha256};

use super::error::{ApiError, ErrorKind};
use super::format::ImageFormat;
use super::request::{ImageRequest, RawRequest, DEFAULT_MODEL};
use super::rules::{Family, InputFidelity, ModelRules, OutputFormat, Size};

/// What a request asks of its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Operation {
    #[default]
    Generation,
    Edit,
    Variation,
}

impl Operation {
    pub const ALL: &'static [Operation] =
        &[Operation::Generation, Operation::Edit, Operation::Variation];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|o| o.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Generation => "generation",
            Operation::Edit => "edit",
            Operation::Variation => "variation",
        }
    }
}

/// An uploaded image, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    pub bytes: Bytes,
    pub format: ImageFormat,
    pub size: Size,
    /// The client's file name (passed on upstream; never trusted for the format).
    pub filename: String,
}

/// The files of an edit or a variation.
#[derive(Debug, Clone, PartialEq)]
pub struct EditInputs {
    pub operation: Operation,
    /// At least one; the first is the one a mask applies to.
    pub images: Vec<InputImage>,
    /// Alpha 0 marks where to edit.
    pub mask: Option<InputImage>,
    /// A transparent PNG drawn over the first image (GPT image models; never with a mask).
    pub markup: Option<InputImage>,
    /// `high` or `low` (GPT image models).
    pub input_fidelity: Option<String>,
}

/// A multipart form as read: its text fields as a generation's raw request, its files
/// unchecked, and a fingerprint of every part (for `Idempotency-Key`: the same parts give the
/// same fingerprint whatever boundary the client's library chose).
#[derive(Debug, Default)]
pub struct Form {
    pub raw: RawRequest,
    images: Vec<(Bytes, String)>,
    mask: Option<(Bytes, String)>,
    markup: Option<(Bytes, String)>,
    input_fidelity: Option<String>,
    fingerprint: Vec<u8>,
    /// Text fields given, to refuse those an operation does not take.
    given: Vec<String>,
}

/// A form's text fields: a generation's (`api::request`'s list, less `style`, which edits do
/// not take, and `svg`, which arrives as `svg[model]` and `svg[reasoning][effort]`) and
/// `input_fidelity`.
fn is_text_field(name: &str) -> bool {
    matches!(
        name,
        "input_fidelity" | "svg[model]" | "svg[reasoning][effort]"
    ) || (name != "style" && name != "svg" && super::request::FIELDS.contains(&name))
}

/// What a variation takes besides its image (the dall-e-2 contract).
const VARIATION_FIELDS: &[&str] = &["model", "n", "size", "response_format", "user"];

/// dall-e-2's limit on an image and on a mask, and GPT image models' on a mask.
const SMALL_FILE: usize = 4 * 1024 * 1024;
/// GPT image models' limit on each input image.
const LARGE_FILE: usize = 50 * 1024 * 1024;
/// GPT image models take at most this many input images.
const MAX_IMAGES: usize = 16;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(field, message)
}

/// The `boundary` of a `multipart/form-data` content type; a 400 otherwise.
pub fn boundary(content_type: Option<&str>) -> Result<String, ApiError> {
    let shown = content_type.unwrap_or("none");
    content_type
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "Invalid Content-Type header ({shown}): this endpoint expects multipart/form-data with a boundary."
                ),
            )
        })
}

/// 413 for a multipart upload over `limit` bytes (edits, variations, batch files).
pub fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("The request body exceeds the maximum upload size of {limit} bytes."),
    )
    .code("request_too_large")
}

fn unreadable(e: multer::Error, limit: u64) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            too_large(limit)
        }
        other => ApiError::new(
            ErrorKind::InvalidRequest,
            format!("The multipart body could not be read: {other}."),
        ),
    }
}

/// Reads a multipart body as it arrives, at most `limit` bytes in all.
pub async fn read_form<S, E>(stream: S, boundary: &str, limit: u64) -> Result<Form, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut form = Form::default();
    let mut hash = Sha256::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| unreadable(e, limit))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|e| unreadable(e, limit))?;
        form.add_part(&mut hash, &name, filename, data)?;
    }
    form.fingerprint = hash.finalize().to_vec();
    Ok(form)
}

/// A form from parts already read (the console's playground reads its own form first).
pub fn form_from_parts(parts: Vec<(String, Option<String>, Bytes)>) -> Result<Form, ApiError> {
    let mut form = Form::default();
    let mut hash = Sha256::new();
    for (name, filename, data) in parts {
        form.add_part(&mut hash, &name, filename, data)?;
    }
    form.fingerprint = hash.finalize().to_vec();
    Ok(form)
}

impl Form {
    /// One part, folded into the form and into its fingerprint.
    fn add_part(
        &mut self,
        hash: &mut Sha256,
        name: &str,
        filename: Option<String>,
        data: Bytes,
    ) -> Result<(), ApiError> {
        for piece in [
            name.as_bytes(),
            filename.as_deref().unwrap_or("").as_bytes(),
        ] {
            hash.update((piece.len() as u64).to_le_bytes());
            hash.update(piece);
        }
        hash.update((data.len() as u64).to_le_bytes());
        hash.update(&data);
        self.take(name, filename, data)
    }

    fn take(&mut self, name: &str, filename: Option<String>, data: Bytes) -> Result<(), ApiError> {
        let file = |data: Bytes, filename: Option<String>| {
            (data, filename.unwrap_or_else(|| "image".to_string()))
        };
        match name {
            "image" | "image[]" => self.images.push(file(data, filename)),
            "mask" | "markup" => {
                let slot = if name == "mask" {
                    &mut self.mask
                } else {
                    &mut self.markup
                };
                if slot.is_some() {
                    return Err(invalid(name, format!("'{name}' was given more than once.")));
                }
                *slot = Some(file(data, filename));
            }
            _ if is_text_field(name) => {
                if self.given.iter().any(|g| g == name) {
                    return Err(invalid(name, format!("'{name}' was given more than once.")));
                }
                self.given.push(name.to_string());
                let text = String::from_utf8(data.to_vec())
                    .map_err(|_| invalid(name, format!("Invalid '{name}': not UTF-8 text.")))?;
                self.set_text(name, text)?;
            }
            "" => return Err(invalid("", "A multipart part has no name.")),
            // A text field the gateway does not know: the model's rules refuse it or pass it
            // through to a GPT image upstream.
            other if filename.is_none() && !self.raw.extra.contains_key(other) => {
                let text = String::from_utf8(data.to_vec())
                    .map_err(|_| invalid(other, format!("Invalid '{other}': not UTF-8 text.")))?;
                self.raw.extra.insert(other.to_string(), text.into());
            }
            other => {
                return Err(invalid(
                    other,
                    format!("Unrecognized request argument supplied: {other}"),
                ))
            }
        }
        Ok(())
    }

    fn set_text(&mut self, name: &str, text: String) -> Result<(), ApiError> {
        let int = |text: &str| {
            text.trim().parse::<i64>().map_err(|_| {
                invalid(
                    name,
                    format!(
                        "Invalid type for '{name}': expected an integer, but got '{text}' instead."
                    ),
                )
            })
        };
        let r = &mut self.raw;
        match name {
            "model" => r.model = Some(text),
            "prompt" => r.prompt = Some(text),
            "n" => r.n = Some(int(&text)?),
            "size" => r.size = Some(text),
            "quality" => r.quality = Some(text),
            "response_format" => r.response_format = Some(text),
            "user" => r.user = Some(text),
            "background" => r.background = Some(text),
            "output_format" => r.output_format = Some(text),
            "output_compression" => r.output_compression = Some(int(&text)?),
            "moderation" => r.moderation = Some(text),
            "safety_identifier" => r.safety_identifier = Some(text),
            "partial_images" => r.partial_images = Some(int(&text)?),
            "complexity" => r.complexity = Some(text),
            "frame_count" => r.frame_count = Some(int(&text)?),
            "frame_duration_ms" => r.frame_duration_ms = Some(int(&text)?),
            "svg[model]" | "svg[reasoning][effort]" => {
                let svg = r.svg.get_or_insert_with(|| serde_json::json!({}));
                if name == "svg[model]" {
                    svg["model"] = text.into();
                } else {
                    svg["reasoning"] = serde_json::json!({ "effort": text });
                }
            }
            "input_fidelity" => self.input_fidelity = Some(text),
            "stream" => {
                r.stream = Some(match text.trim() {
                    "true" | "True" | "1" => true,
                    "false" | "False" | "0" => false,
                    _ => {
                        return Err(invalid(
                            "stream",
                            format!(
                        "Invalid type for 'stream': expected a boolean, but got '{text}' instead."
                    ),
                        ))
                    }
                })
            }
            _ => {}
        }
        Ok(())
    }

    /// The model asked for, or the contract's default.
    pub fn model(&self) -> &str {
        self.raw.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }

    /// A digest of every part, in order (names, file names and contents).
    pub fn fingerprint(&self) -> &[u8] {
        &self.fingerprint
    }

    /// An edit for a model with these rules.
    pub fn into_edit(mut self, rules: &ModelRules) -> Result<ImageRequest, ApiError> {
        let images = std::mem::take(&mut self.images);
        if images.is_empty() {
            return Err(invalid("image", "Missing required parameter: 'image'."));
        }
        let gpt = rules.family == Family::GptImage;
        let (max_images, max_bytes) = if gpt {
            (MAX_IMAGES, LARGE_FILE)
        } else {
            (1, SMALL_FILE)
        };
        if images.len() > max_images {
            return Err(invalid(
                "image",
                format!(
                    "Invalid 'image': {} images given; the model '{}' takes at most {max_images}.",
                    images.len(),
                    self.model()
                ),
            ));
        }
        let images = images
            .into_iter()
            .map(|(bytes, name)| {
                let image = check_image("image", bytes, name, max_bytes)?;
                if !gpt {
                    require_square_png("image", &image)?;
                }
                Ok(image)
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let mask = self
            .mask
            .take()
            .map(|(bytes, name)| {
                let mask = check_image("mask", bytes, name, SMALL_FILE)?;
                if mask.format != ImageFormat::Png {
                    return Err(invalid("mask", "Invalid 'mask': must be a PNG image."));
                }
                if mask.size != images[0].size {
                    return Err(invalid(
                        "mask",
                        format!(
                            "Invalid 'mask': it is {} and the image is {}; they must be the same size.",
                            mask.size, images[0].size
                        ),
                    ));
                }
                Ok(mask)
            })
            .transpose()?;
        let markup = match self.markup.take() {
            None => None,
            Some(_) if !rules.markup => {
                return Err(invalid(
                    "markup",
                    format!(
                        "Invalid 'markup': the model '{}' does not support the 'markup' parameter.",
                        self.model()
                    ),
                ))
            }
            Some(_) if mask.is_some() => {
                return Err(invalid(
                    "markup",
                    "Invalid 'markup': give a mask or a markup, not both.",
                ))
            }
            Some((bytes, name)) => {
                let markup = check_image("markup", bytes, name, SMALL_FILE)?;
                if markup.format != ImageFormat::Png {
                    return Err(invalid("markup", "Invalid 'markup': must be a PNG image."));
                }
                Some(markup)
            }
        };
        let input_fidelity = match self.input_fidelity.take() {
            None => None,
            Some(_) if rules.input_fidelity.is_empty() => {
                return Err(invalid(
                    "input_fidelity",
                    format!("Invalid 'input_fidelity': the model '{}' does not support the 'input_fidelity' parameter.", self.model()),
                ))
            }
            Some(f) => match InputFidelity::parse(&f) {
                Some(v) if rules.input_fidelity.contains(&v) => Some(f),
                _ => {
                    let allowed: Vec<&str> =
                        rules.input_fidelity.iter().map(|v| v.as_str()).collect();
                    return Err(invalid(
                        "input_fidelity",
                        format!("'{f}' is not one of {allowed:?} - 'input_fidelity'"),
                    ));
                }
            },
        };
        let mut request = self.raw.validate(rules)?;
        if mask.is_some()
            && request
                .gpt
                .as_ref()
                .is_some_and(|g| g.output_format == OutputFormat::Gif)
        {
            return Err(invalid(
                "mask",
                "Invalid 'mask': GIF output does not support masks.",
            ));
        }
        request.inputs = Some(Arc::new(EditInputs {
            operation: Operation::Edit,
            images,
            mask,
            markup,
            input_fidelity,
        }));
        Ok(request)
    }

    /// A variation: the dall-e-2 contract (one square PNG under 4 MB, `n` 1-10, sizes
    /// 256x256, 512x512 and 1024x1024, `response_format`, `user`), whatever model serves it.
    pub fn into_variation(mut self) -> Result<ImageRequest, ApiError> {
        if let Some(field) = self
            .given
            .iter()
            .find(|g| !VARIATION_FIELDS.contains(&g.as_str()))
        {
            return Err(invalid(
                field,
                format!("Unrecognized request argument supplied: {field}"),
            ));
        }
        for (name, given) in [
            ("mask", self.mask.is_some()),
            ("markup", self.markup.is_some()),
        ] {
            if given {
                return Err(invalid(
                    name,
                    format!("Unrecognized request argument supplied: {name}"),
                ));
            }
        }
        let mut images = std::mem::take(&mut self.images);
        if images.len() > 1 {
            return Err(invalid(
                "image",
                "Invalid 'image': a variation takes exactly one image.",
            ));
        }
        let Some((bytes, name)) = images.pop() else {
            return Err(invalid("image", "Missing required parameter: 'image'."));
        };
        let image = check_image("image", bytes, name, SMALL_FILE)?;
        require_square_png("image", &image)?;
        // The contract's own checks of n, size and response_format, on dall-e-2's rules.
        let rules = ModelRules::dalle2();
        let model = self.model().to_string();
        let raw = RawRequest {
            model: Some(model.clone()),
            prompt: Some("variation".into()),
            ..std::mem::take(&mut self.raw)
        };
        let checked = raw.validate(&rules)?;
        Ok(ImageRequest {
            model,
            prompt: String::new(),
            response_format: checked.response_format,
            inputs: Some(Arc::new(EditInputs {
                operation: Operation::Variation,
                images: vec![image],
                mask: None,
                markup: None,
                input_fidelity: None,
            })),
            ..checked
        })
    }
}

/// Format and dimensions from the file's own bytes; a 400 naming `field` otherwise.
fn check_image(
    field: &str,
    bytes: Bytes,
    filename: String,
    max_bytes: usize,
) -> Result<InputImage, ApiError> {
    if bytes.len() > max_bytes {
        return Err(invalid(
            field,
            format!(
                "Invalid '{field}': the file is {} bytes; at most {max_bytes} are allowed.",
                bytes.len()
            ),
        ));
    }
    let format = ImageFormat::sniff(&bytes).ok_or_else(|| {
        invalid(
            field,
            format!("Invalid '{field}': '{filename}' is not a PNG, JPEG or WebP image."),
        )
    })?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]));
    reader.set_format(format.image_format());
    let (width, height) = reader.into_dimensions().map_err(|_| {
        invalid(
            field,
            format!(
                "Invalid '{field}': '{filename}' is not a readable {} image.",
                format.extension()
            ),
        )
    })?;
    if width == 0 || height == 0 {
        return Err(invalid(
            field,
            format!("Invalid '{field}': the image is empty."),
        ));
    }
    Ok(InputImage {
        bytes,
        format,
        size: Size::new(width, height),
        filename,
    })
}

fn require_square_png(field: &str, image: &InputImage) -> Result<(), ApiError> {
    if image.format != ImageFormat::Png {
        return Err(invalid(
            field,
            format!("Invalid '{field}': must be a PNG image."),
        ));
    }
    if image.size.width != image.size.height {
        return Err(invalid(
            field,
            format!(
                "Invalid '{field}': must be square, but it is {}.",
                image.size
            ),
        ));
    }
    Ok(())
}
