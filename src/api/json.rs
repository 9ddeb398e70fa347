//! I-JSON (RFC 7493) for request bodies: an object that names a member twice is refused. A
//! parser that keeps the first value and one that keeps the last would read such a body
//! differently, so a filter in front of the gateway could check one prompt while another is
//! generated and billed.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::error::ApiError;

/// `Err` naming the first member given twice in any object of `body` (by its path, such as
/// `prompt` or `svg.model`); `Ok` for valid JSON without one, and for invalid JSON (the
/// caller's parser explains that).
pub fn reject_duplicate_keys(body: &[u8]) -> Result<(), ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match (Check {
        path: String::new(),
    })
    .deserialize(&mut de)
    {
        Ok(()) => Ok(()),
        Err(e) => match e.to_string().split_once("\u{0}") {
            Some((_, path)) => {
                let path = path.split(" at line ").next().unwrap_or(path);
                Err(ApiError::invalid(
                    path,
                    format!(
                        "Invalid JSON body: '{path}' is given more than once; each member may appear once."
                    ),
                ))
            }
            None => Ok(()),
        },
    }
}

/// Walks a value, failing on the first repeated member (the error text carries its path after
/// a NUL, which no JSON member name written by serde_json's error can hold unescaped).
struct Check {
    path: String,
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !seen.insert(key) {
                return Err(de::Error::custom(format!("duplicate\u{0}{path}")));
            }
            map.next_value_seed(Check { path })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(Check {
                path: format!("{}[{i}]", self.path),
            })?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_given_twice_is_named_at_any_depth() {
        let err = reject_duplicate_keys(br#"{"prompt":"a","n":1,"prompt":"b"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
        let err = reject_duplicate_keys(br#"{"svg":{"model":"x","model":"y"}}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("svg.model"));
        let err = reject_duplicate_keys(br#"{"a":[{"k":1},{"k":1,"k":2}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("a[1].k"));
    }

    #[test]
    fn bodies_without_repeats_pass_and_bad_json_is_left_to_the_parser() {
        for ok in [
            &br#"{"prompt":"a","n":1,"svg":{"model":"x"},"list":[{"k":1},{"k":1}]}"#[..],
            br#"[]"#,
            br#"{"a":null,"b":true,"c":-1.5,"d":18446744073709551615}"#,
            br#"{"prompt":"a", "#,
            b"not json",
        ] {
            assert!(
                reject_duplicate_keys(ok).is_ok(),
                "{}",
                String::from_utf8_lossy(ok)
            );
        }
    }
}
