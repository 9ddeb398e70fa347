//! `${VAR}` and `${VAR:-default}` in gateway.yaml string values. `$$` is a literal `$`.
//! An unset variable without a default is an error naming the config path.

use serde_yaml_ng::Value;

use super::ConfigError;

/// Replaces variables in every string of the document, in place.
pub fn interpolate(
    value: &mut Value,
    path: &mut Vec<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    match value {
        Value::String(s) if s.contains('$') => match expand(s, lookup) {
            Ok(expanded) => *s = expanded,
            Err(message) => errors.push(ConfigError::new(join(path), message)),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                interpolate(item, path, lookup, errors);
                path.pop();
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let name = match key {
                    Value::String(s) => s.clone(),
                    other => serde_yaml_ng::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                path.push(name);
                interpolate(item, path, lookup, errors);
                path.pop();
            }
        }
        Value::Tagged(tagged) => interpolate(&mut tagged.value, path, lookup, errors),
        _ => {}
    }
}

fn join(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if !out.is_empty() && !part.starts_with('[') {
            out.push('.');
        }
        out.push_str(part);
    }
    out
}

/// Expands one string.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated variable reference in \"{input}\""))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let valid = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(format!(
                    "invalid variable name \"{name}\" in \"${{{inner}}}\""
                ));
            }
            match (lookup(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (give a default with ${{{name}:-value}})"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.org".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(
            expand("https://${HOST}/v1", &env).unwrap(),
            "https://example.org/v1"
        );
        assert_eq!(expand("${MISSING:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand("${EMPTY:-fallback}", &env).unwrap(), "");
        assert_eq!(expand("cost $$5 and $x", &env).unwrap(), "cost $5 and $x");
        assert!(expand("${MISSING}", &env)
            .unwrap_err()
            .contains("MISSING is not set"));
        assert!(expand("${HOST", &env).is_err());
        assert!(expand("${1BAD}", &env).is_err());
    }

    #[test]
    fn errors_name_the_path() {
        let mut doc: Value = serde_yaml_ng::from_str(
            "backends:\n  openai:\n    api_key: ${NOPE}\nlist: [a, '${NOPE2}']",
        )
        .unwrap();
        let mut errors = Vec::new();
        interpolate(&mut doc, &mut Vec::new(), &env, &mut errors);
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["backends.openai.api_key", "list[1]"]);
    }
}
