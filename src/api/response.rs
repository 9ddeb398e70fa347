use bytes::Bytes;
use serde::Serialize;

/// `{created, data: [...]}` exactly as the contract. Written by [`ImagesResponse::to_chunks`]
/// rather than serde so that base64 images (megabytes each) go out as the very buffers they
/// arrived in, never copied into a second JSON string.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
    /// GPT image answers only: `background`, `output_format`, `quality`, `size`, `usage`.
    /// DALL·E answers stay exactly the contract's shape.
    pub gpt: Option<GptAnswerFields>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GptAnswerFields {
    pub background: String,
    pub output_format: String,
    pub quality: String,
    pub size: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageData {
    pub url: Option<String>,
    /// Base64 text (standard alphabet, padded): JSON-safe as is.
    pub b64_json: Option<Bytes>,
    pub revised_prompt: Option<String>,
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

impl ImagesResponse {
    /// The JSON body as a list of buffers to send in order.
    pub fn to_chunks(&self) -> Vec<Bytes> {
        let mut chunks = Vec::with_capacity(2 + self.data.len() * 2);
        let mut text = format!("{{\"created\":{},", self.created);
        if let Some(gpt) = &self.gpt {
            // The fields of a flat object, spliced in before `data`.
            let fields = serde_json::to_string(gpt).unwrap_or_else(|_| "{}".into());
            let inner = fields
                .strip_prefix('{')
                .and_then(|f| f.strip_suffix('}'))
                .unwrap_or("");
            if !inner.is_empty() {
                text.push_str(inner);
                text.push(',');
            }
        }
        text.push_str("\"data\":[");
        for (i, item) in self.data.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('{');
            let mut first = true;
            let mut field = |text: &mut String, name: &str| {
                if !first {
                    text.push(',');
                }
                first = false;
                text.push('"');
                text.push_str(name);
                text.push_str("\":");
            };
            if let Some(url) = &item.url {
                field(&mut text, "url");
                text.push_str(&json_string(url));
            }
            if let Some(b64) = &item.b64_json {
                field(&mut text, "b64_json");
                text.push('"');
                chunks.push(Bytes::from(std::mem::take(&mut text)));
                chunks.push(b64.clone());
                text.push('"');
            }
            if let Some(revised) = &item.revised_prompt {
                field(&mut text, "revised_prompt");
                text.push_str(&json_string(revised));
            }
            text.push('}');
        }
        text.push_str("]}");
        chunks.push(Bytes::from(text));
        chunks
    }
}

/// `GET /v1/models` in OpenAI's list shape.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    /// The catalog's shutdown date for this name upstream (`YYYY-MM-DD`), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_date: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_form_the_contract_json() {
        let b64 = Bytes::from_static(b"iVBORw0KGgo=");
        let resp = ImagesResponse {
            created: 7,
            data: vec![
                ImageData {
                    url: Some("http://x/a.png?s=\"q\"".into()),
                    b64_json: None,
                    revised_prompt: Some("a \"cat\"\n".into()),
                },
                ImageData {
                    url: None,
                    b64_json: Some(b64.clone()),
                    revised_prompt: None,
                },
            ],
            gpt: None,
        };
        let chunks = resp.to_chunks();
        assert!(
            chunks.iter().any(|c| c.as_ptr() == b64.as_ptr()),
            "the image buffer is not copied"
        );
        let joined: Vec<u8> = chunks.concat();
        let v: serde_json::Value = serde_json::from_slice(&joined).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"created": 7, "data": [
                {"url": "http://x/a.png?s=\"q\"", "revised_prompt": "a \"cat\"\n"},
                {"b64_json": "iVBORw0KGgo="}
            ]})
        );
        let empty = ImagesResponse {
            created: 1,
            data: vec![],
            gpt: None,
        }
        .to_chunks()
        .concat();
        assert_eq!(empty, br#"{"created":1,"data":[]}"#);
        let gpt = ImagesResponse {
            created: 2,
            data: vec![],
            gpt: Some(GptAnswerFields {
                background: "opaque".into(),
                output_format: "png".into(),
                quality: "medium".into(),
                size: "1024x1024".into(),
                usage: Some(serde_json::json!({"total_tokens": 5})),
            }),
        };
        let v: serde_json::Value = serde_json::from_slice(&gpt.to_chunks().concat()).unwrap();
        assert_eq!(v["background"], "opaque");
        assert_eq!(v["usage"]["total_tokens"], 5);
        assert_eq!(v["data"], serde_json::json!([]));
    }
}
