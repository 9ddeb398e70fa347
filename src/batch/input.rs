//! A batch's input file, checked whole before anything runs: every line a JSON object with a
//! unique `custom_id`, `method: POST`, the batch's `url`, and a `body` the model accepts.

use serde_json::Value;

/// OpenAI's cap on lines per batch.
pub const MAX_LINES: usize = 50_000;

/// One checked line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based, as an editor shows it.
    pub number: usize,
    pub custom_id: String,
    /// The body as JSON text, as the line gave it.
    pub body: String,
}

/// One problem, as OpenAI's batch `errors.data[]` writes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<usize>,
}

impl LineError {
    fn at(line: usize, code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        LineError {
            code: code.into(),
            message: message.into(),
            param: param.map(str::to_string),
            line: Some(line),
        }
    }
}

/// Checks every line; `body_ok` checks a body against its model (`Err`: param and message).
/// Returns the lines, or every problem found (at most 100 listed).
pub fn check(
    text: &[u8],
    endpoint: &str,
    body_ok: impl Fn(&[u8]) -> Result<(), (Option<String>, String)>,
) -> Result<Vec<Line>, Vec<LineError>> {
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let Ok(text) = std::str::from_utf8(text) else {
        return Err(vec![LineError {
            code: "invalid_file".into(),
            message: "The file is not UTF-8 text.".into(),
            param: None,
            line: None,
        }]);
    };
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if errors.len() >= 100 {
            break;
        }
        let v: Value = match serde_json::from_str(raw) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                errors.push(LineError::at(
                    number,
                    "invalid_json_line",
                    "This line is not a JSON object.",
                    None,
                ));
                continue;
            }
        };
        let custom_id = match v["custom_id"].as_str() {
            Some(c) if !c.is_empty() && c.len() <= 512 => c.to_string(),
            _ => {
                errors.push(LineError::at(
                    number,
                    "missing_required_parameter",
                    "The line needs a non-empty string `custom_id`.",
                    Some("custom_id"),
                ));
                continue;
            }
        };
        if !seen.insert(custom_id.clone()) {
            errors.push(LineError::at(
                number,
                "duplicate_custom_id",
                format!("The custom_id `{custom_id}` appears more than once in the file."),
                Some("custom_id"),
            ));
            continue;
        }
        if v["method"] != "POST" {
            errors.push(LineError::at(
                number,
                "invalid_method",
                "`method` must be POST.",
                Some("method"),
            ));
            continue;
        }
        if v["url"] != endpoint {
            errors.push(LineError::at(
                number,
                "mismatched_url",
                format!("`url` must be the batch's endpoint, {endpoint}."),
                Some("url"),
            ));
            continue;
        }
        let Some(body) = v.get("body").filter(|b| b.is_object()) else {
            errors.push(LineError::at(
                number,
                "invalid_request",
                "`body` must be a JSON object.",
                Some("body"),
            ));
            continue;
        };
        // A batch writes each answer to its output file: there is nobody to stream to.
        if body
            .get("stream")
            .is_some_and(|s| s != &Value::Bool(false) && !s.is_null())
        {
            errors.push(LineError::at(
                number,
                "invalid_request",
                "`stream` is not supported in a batch: each answer goes to the output file.",
                Some("body.stream"),
            ));
            continue;
        }
        let body = body.to_string();
        if let Err((param, message)) = body_ok(body.as_bytes()) {
            errors.push(LineError {
                code: "invalid_request".into(),
                message,
                param: Some(param.map_or("body".to_string(), |p| format!("body.{p}"))),
                line: Some(number),
            });
            continue;
        }
        lines.push(Line {
            number,
            custom_id,
            body,
        });
    }
    if lines.len() > MAX_LINES {
        errors.push(LineError {
            code: "too_many_requests".into(),
            message: format!("A batch takes at most {MAX_LINES} requests."),
            param: None,
            line: None,
        });
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "The file has no requests.".into(),
            param: None,
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "/v1/images/generations";

    #[test]
    fn every_bad_line_is_named_by_number() {
        let file = [
            r#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"x"}}"#,
            r#"not json"#,
            r#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"y"}}"#,
            r#"{"custom_id":"b","method":"GET","url":"/v1/images/generations","body":{}}"#,
            r#"{"custom_id":"c","method":"POST","url":"/v1/chat/completions","body":{}}"#,
            "",
            r#"{"custom_id":"d","method":"POST","url":"/v1/images/generations","body":{"prompt":""}}"#,
            r#"{"custom_id":"e","method":"POST","url":"/v1/images/generations","body":{"prompt":"z","stream":true}}"#,
            r#"{"custom_id":"f","method":"POST","url":"/v1/images/generations","body":{"prompt":"z","stream":false}}"#,
        ]
        .join("\n");
        let errors = check(file.as_bytes(), URL, |b| {
            let v: Value = serde_json::from_slice(b).unwrap();
            if v["prompt"] == "" {
                Err((Some("prompt".into()), "empty prompt".into()))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        let got: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.code.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(2), "invalid_json_line"),
                (Some(3), "duplicate_custom_id"),
                (Some(4), "invalid_method"),
                (Some(5), "mismatched_url"),
                (Some(7), "invalid_request"),
                (Some(8), "invalid_request"),
            ]
        );
        assert_eq!(errors[4].param.as_deref(), Some("body.prompt"));
        assert_eq!(errors[5].param.as_deref(), Some("body.stream"));
        let ok = check(
            br#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"x"}}"#,
            URL,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!((ok[0].number, ok[0].custom_id.as_str()), (1, "a"));
    }
}
