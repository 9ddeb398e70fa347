//! The OpenAI Images wire contract: request parsing and validation, model rule presets,
//! the response body and the error body. Nothing here knows about backends or the server;
//! everything else converts into these types at the edge.

pub mod edit;
mod error;
mod format;
pub mod json;
mod request;
mod response;
mod rules;

pub use error::{ApiError, ErrorKind};

/// `x-request-id`, on answers and on upstream calls. A `HeaderName` constant: inserting it
/// allocates nothing (a `&str` name is copied into a new `HeaderName` on every insert).
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
pub use edit::{EditInputs, InputImage, Operation};
pub use format::ImageFormat;
pub use request::GptParams;
pub use request::{parse_request, ImageRequest, RawRequest, FIELDS as REQUEST_FIELDS};
pub use response::{GptAnswerFields, ImageData, ImagesResponse, ModelList, ModelObject};
pub use rules::{
    Background, Complexity, Family, FlexibleSizes, GptQuality, InputFidelity, ModelRules,
    Moderation, OutputFormat, Quality, ResponseFormat, Size, Style, UnknownFields,
};
