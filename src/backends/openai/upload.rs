//! Edits and variations on OpenAI-compatible upstreams: the request's fields, built as for a
//! generation in the target's dialect, go out as a multipart form with the uploaded files
//! (streamed from the buffers they arrived in: no copy). A variation goes to
//! `images/variations` in the DALL·E dialect; a GPT image upstream has no variations (OpenAI has
//! served no model for them since dall-e-2 was retired), so there it is an edit of the image
//! with the target's `translation.variation_prompt`.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use super::{Flavor, OpenAiBackend};
use crate::api::{EditInputs, InputImage, Operation};
use crate::backends::{BackendError, UpstreamCall};
use crate::config::Dialect;

/// Fields a DALL·E variation takes (the rest of a generation's body is dropped).
const VARIATION_FIELDS: &[&str] = &["model", "n", "size", "response_format", "user"];

impl OpenAiBackend {
    /// Where this call's upload goes, and whether it is sent as a variation.
    fn upload_target(&self, call: &UpstreamCall<'_>) -> Result<(reqwest::Url, bool), String> {
        let variation =
            call.request.operation() == Operation::Variation && call.dialect == Dialect::DallE;
        let leaf = if variation { "variations" } else { "edits" };
        let generations = self.endpoint(call)?.url().clone();
        let mut url = generations.clone();
        url.path_segments_mut()
            .map_err(|_| format!("{generations} cannot take a path"))?
            .pop()
            .push(leaf);
        if let Flavor::Azure { .. } = self.flavor {
            url.set_query(generations.query());
        }
        Ok((url, variation))
    }

    /// The request for an edit or variation: `body` (the generation body of the call's
    /// dialect, `model` set) as form fields, then the files.
    pub(super) fn upload_request(
        &self,
        call: &UpstreamCall<'_>,
        mut body: Value,
        inputs: &EditInputs,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let (url, variation) = self.upload_target(call).map_err(BackendError::Connect)?;
        if inputs.operation == Operation::Variation && !variation {
            body["prompt"] = call.translation.variation_prompt.as_str().into();
        }
        let mut form = Form::new();
        if let Value::Object(fields) = &body {
            for (name, value) in fields {
                if variation && !VARIATION_FIELDS.contains(&name.as_str()) {
                    continue;
                }
                form = add_field(form, name, value);
            }
        }
        if let Some(f) = &inputs.input_fidelity {
            form = form.text("input_fidelity", f.clone());
        }
        let name = if inputs.images.len() == 1 {
            "image"
        } else {
            "image[]"
        };
        for image in &inputs.images {
            form = form.part(name, file(image)?);
        }
        if let Some(mask) = &inputs.mask {
            form = form.part("mask", file(mask)?);
        }
        if let Some(markup) = &inputs.markup {
            form = form.part("markup", file(markup)?);
        }
        Ok(self
            .http
            .reqwest()
            .post(url)
            .headers(self.request_headers(call))
            .multipart(form))
    }
}

/// One JSON value as form fields: scalars as text, an object one level down as `name[key]`
/// (the SDK's form encoding), `null` left out.
fn add_field(form: Form, name: &str, value: &Value) -> Form {
    match value {
        Value::Null => form,
        Value::String(s) => form.text(name.to_string(), s.clone()),
        Value::Object(inner) => inner.iter().fold(form, |form, (k, v)| {
            add_field(form, &format!("{name}[{k}]"), v)
        }),
        other => form.text(name.to_string(), other.to_string()),
    }
}

fn file(image: &InputImage) -> Result<Part, BackendError> {
    let len = image.bytes.len() as u64;
    Part::stream_with_length(reqwest::Body::from(image.bytes.clone()), len)
        .file_name(image.filename.clone())
        .mime_str(image.format.content_type())
        .map_err(|e| BackendError::BadResponse(format!("cannot build the upload: {e}")))
}
