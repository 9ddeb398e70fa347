use bytes::Bytes;
use serde::Serialize;

/// `{created, data: [...]}` exactly as the contract. Written by [`ImagesResponse::to_chunks`]
/// rather than serde so that base64 images (megabytes each) go out as the very buffers they
/// arrived in, never copied into a second JSON string.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
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
        let mut text = format!("{{\"created\":{},\"data\":[", self.created);
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
        }
        .to_chunks()
        .concat();
        assert_eq!(empty, br#"{"created":1,"data":[]}"#);
    }
}
