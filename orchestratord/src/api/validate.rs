//! Reading a client's JSON body: the few top-level members orchestratord needs (the model, whether
//! it streams, how many sequences it runs) are checked for their types; everything else is left to
//! the engine, byte for byte. Every failure is an `InvalidParams` naming the member.

use crate::error::ApiError;
use crate::json_object::TopLevel;
use serde_json::value::RawValue;

pub fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidParams(message.into())
}

/// The body's top level; anything but one JSON object is refused.
pub fn object(body: &[u8]) -> Result<TopLevel<'_>, ApiError> {
    TopLevel::parse(body).map_err(|error| {
        if error.is_data() {
            invalid("the request body must be a JSON object")
        } else {
            invalid(format!("invalid JSON: {error}"))
        }
    })
}

/// `model`: a non-empty string, required.
pub fn model(top: &TopLevel<'_>) -> Result<String, ApiError> {
    match top.parse_member::<String>("model") {
        Some(Ok(model)) if !model.is_empty() => Ok(model),
        Some(_) => Err(invalid("'model' must be a non-empty string")),
        None => Err(invalid("'model' is required")),
    }
}

/// `stream`: a boolean; absent or null is false.
pub fn stream(top: &TopLevel<'_>) -> Result<bool, ApiError> {
    boolean(top, "stream").map(|stream| stream.unwrap_or(false))
}

/// An optional boolean member.
pub fn boolean(top: &TopLevel<'_>, field: &str) -> Result<Option<bool>, ApiError> {
    top.parse_member::<bool>(field)
        .transpose()
        .map_err(|_| invalid(format!("'{field}' must be a boolean")))
}

/// An optional positive integer member.
pub fn positive(top: &TopLevel<'_>, field: &str) -> Result<Option<u32>, ApiError> {
    match top.parse_member::<u32>(field) {
        None => Ok(None),
        Some(Ok(value)) if value >= 1 => Ok(Some(value)),
        Some(_) => Err(invalid(format!("'{field}' must be a positive integer"))),
    }
}

/// Optional integer members (e.g. a token limit, where an engine may take -1 for "no limit").
pub fn integers(top: &TopLevel<'_>, fields: &[&str]) -> Result<(), ApiError> {
    for field in fields {
        if let Some(Err(_)) = top.parse_member::<i64>(field) {
            return Err(invalid(format!("'{field}' must be an integer")));
        }
    }
    Ok(())
}

/// A required non-empty array whose entries are all objects; returns its length.
pub fn objects(top: &TopLevel<'_>, field: &str) -> Result<u32, ApiError> {
    let entries = array(top, field)?;
    if entries.iter().any(|entry| !entry.get().starts_with('{')) {
        return Err(invalid(format!(
            "every entry of '{field}' must be an object"
        )));
    }
    Ok(count(&entries))
}

/// A required member that is a non-empty string or a non-empty array; returns how many inputs it
/// holds: 1 for a string or a flat array of token ids, else the array's length (strings, or arrays
/// of token ids). `what` names what the entries may be in errors.
pub fn inputs(top: &TopLevel<'_>, field: &str, what: &str) -> Result<u32, ApiError> {
    let Some(raw) = top.get(field).filter(|raw| raw.get() != "null") else {
        return Err(invalid(format!("'{field}' is required")));
    };
    let text = raw.get();
    if text.starts_with('"') {
        return Ok(1);
    }
    let entries: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|_| invalid(format!("'{field}' must be {what}")))?;
    if entries.is_empty() {
        return Err(invalid(format!("'{field}' must not be empty")));
    }
    let ids = |entry: &&RawValue| serde_json::from_str::<u64>(entry.get()).is_ok();
    if entries.iter().all(ids) {
        return Ok(1);
    }
    let valid = entries.iter().all(|entry| {
        let text = entry.get();
        if text.starts_with('"') {
            return true;
        }
        serde_json::from_str::<Vec<u64>>(text).is_ok_and(|tokens| !tokens.is_empty())
    });
    if !valid {
        return Err(invalid(format!("'{field}' must be {what}")));
    }
    Ok(count(&entries))
}

/// A required non-empty array of strings; returns its length.
pub fn strings(top: &TopLevel<'_>, field: &str) -> Result<u32, ApiError> {
    let entries = array(top, field)?;
    if entries.iter().any(|entry| !entry.get().starts_with('"')) {
        return Err(invalid(format!(
            "every entry of '{field}' must be a string"
        )));
    }
    Ok(count(&entries))
}

/// A required string member.
pub fn string(top: &TopLevel<'_>, field: &str) -> Result<(), ApiError> {
    match top.parse_member::<String>(field) {
        Some(Ok(_)) => Ok(()),
        Some(Err(_)) => Err(invalid(format!("'{field}' must be a string"))),
        None => Err(invalid(format!("'{field}' is required"))),
    }
}

/// A member that, when present, is an object.
pub fn optional_object(top: &TopLevel<'_>, field: &str) -> Result<(), ApiError> {
    match top.get(field).map(RawValue::get) {
        None | Some("null") => Ok(()),
        Some(text) if text.starts_with('{') => Ok(()),
        Some(_) => Err(invalid(format!("'{field}' must be an object"))),
    }
}

fn array<'t>(top: &'t TopLevel<'_>, field: &str) -> Result<Vec<&'t RawValue>, ApiError> {
    let entries: Vec<&RawValue> = match top.parse_member(field) {
        Some(Ok(entries)) => entries,
        Some(Err(_)) => return Err(invalid(format!("'{field}' must be a non-empty array"))),
        None => return Err(invalid(format!("'{field}' is required"))),
    };
    if entries.is_empty() {
        return Err(invalid(format!("'{field}' must be a non-empty array")));
    }
    Ok(entries)
}

fn count<T>(entries: &[T]) -> u32 {
    u32::try_from(entries.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(body: &str) -> TopLevel<'_> {
        object(body.as_bytes()).unwrap()
    }

    #[test]
    fn inputs_count_strings_and_token_arrays_but_a_flat_token_array_is_one() {
        let what = "a string or an array";
        assert_eq!(inputs(&top(r#"{"p":"hi"}"#), "p", what).unwrap(), 1);
        assert_eq!(inputs(&top(r#"{"p":[1,2,3]}"#), "p", what).unwrap(), 1);
        assert_eq!(inputs(&top(r#"{"p":["a","b"]}"#), "p", what).unwrap(), 2);
        assert_eq!(
            inputs(&top(r#"{"p":[[1],[2,3],"c"]}"#), "p", what).unwrap(),
            3
        );
        for bad in [
            r#"{"p":7}"#,
            r#"{"p":[]}"#,
            r#"{"p":[{}]}"#,
            r#"{"p":[[]]}"#,
            r#"{}"#,
        ] {
            assert!(inputs(&top(bad), "p", what).is_err(), "{bad}");
        }
    }

    #[test]
    fn members_are_checked_for_their_types_only() {
        assert_eq!(model(&top(r#"{"model":"m"}"#)).unwrap(), "m");
        assert!(model(&top(r#"{"model":""}"#)).is_err());
        assert!(model(&top(r#"{"model":3}"#)).is_err());
        assert!(stream(&top(r#"{"stream":"yes"}"#)).is_err());
        assert!(!stream(&top(r#"{"stream":null}"#)).unwrap());
        assert_eq!(positive(&top(r#"{"n":2}"#), "n").unwrap(), Some(2));
        assert!(positive(&top(r#"{"n":0}"#), "n").is_err());
        assert!(integers(&top(r#"{"max_tokens":-1}"#), &["max_tokens"]).is_ok());
        assert!(integers(&top(r#"{"max_tokens":"ten"}"#), &["max_tokens"]).is_err());
        assert_eq!(objects(&top(r#"{"m":[{},{}]}"#), "m").unwrap(), 2);
        assert!(objects(&top(r#"{"m":[1]}"#), "m").is_err());
        assert_eq!(strings(&top(r#"{"d":["a"]}"#), "d").unwrap(), 1);
        assert!(strings(&top(r#"{"d":[1]}"#), "d").is_err());
        assert!(
            object(b"[]")
                .unwrap_err()
                .to_string()
                .contains("JSON object")
        );
        assert!(
            object(b"{")
                .unwrap_err()
                .to_string()
                .contains("invalid JSON")
        );
    }
}
