//! A JSON object read only at its top level: each member's value stays the exact bytes that came,
//! so orchestratord can check the few members it needs, change one (a streaming request's
//! `stream_options`, an answer's `model`) and write the object back with every other member
//! byte-for-byte as it was, in its order. Nothing here interprets a value it is not asked about.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The top-level members of a JSON object, in order, values unparsed.
#[derive(Debug)]
pub struct TopLevel<'a> {
    members: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
}

impl<'a> TopLevel<'a> {
    /// Reads `body`, which must be one JSON object (surrounding white space allowed).
    pub fn parse(body: &'a [u8]) -> Result<TopLevel<'a>, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The raw value of member `key` (the last one, as JSON parsers that accept duplicates do).
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_ref())
    }

    /// Member `key` parsed as `T`; `None` when absent or `null`.
    pub fn parse_member<'s, T: Deserialize<'s>>(
        &'s self,
        key: &str,
    ) -> Option<Result<T, serde_json::Error>> {
        let raw = self.get(key)?;
        if raw.get() == "null" {
            return None;
        }
        Some(serde_json::from_str(raw.get()))
    }

    /// Sets member `key` to `value` (JSON text), in place when present (every copy of it), else
    /// at the end.
    pub fn set(&mut self, key: &str, value: Box<RawValue>) {
        let mut found = false;
        for (name, current) in &mut self.members {
            if name == key {
                *current = Cow::Owned(value.clone());
                found = true;
            }
        }
        if !found {
            self.members
                .push((Cow::Owned(key.to_owned()), Cow::Owned(value)));
        }
    }

    /// The object as compact JSON: the members' names re-escaped, their values as they came.
    pub fn to_vec(&self) -> Vec<u8> {
        let size = self
            .members
            .iter()
            .map(|(name, value)| name.len() + value.get().len() + 4)
            .sum::<usize>();
        let mut out = Vec::with_capacity(size + 2);
        out.push(b'{');
        for (index, (name, value)) in self.members.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            // A string always serialises.
            if let Ok(quoted) = serde_json::to_string(name.as_ref()) {
                out.extend_from_slice(quoted.as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
        out
    }
}

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;

        impl<'de> Visitor<'de> for Members {
            type Value = TopLevel<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((name, Cow::Borrowed(value)));
                }
                Ok(TopLevel { members })
            }
        }

        deserializer.deserialize_map(Members)
    }
}

/// A member name: borrowed from the body unless it had escapes to undo.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;

        impl<'de> Visitor<'de> for Name {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(name)))
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name.to_owned())))
            }

            fn visit_string<E: de::Error>(self, name: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name)))
            }
        }

        deserializer.deserialize_str(Name)
    }
}

/// `text` as a raw JSON value; `text` must be valid JSON (callers pass literals and serialiser
/// output).
pub fn raw(text: String) -> Result<Box<RawValue>, serde_json::Error> {
    RawValue::from_string(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(body: &str) -> String {
        let top = TopLevel::parse(body.as_bytes()).unwrap();
        String::from_utf8(top.to_vec()).unwrap()
    }

    #[test]
    fn values_keep_their_bytes_and_members_their_order() {
        let body = r#" {"z": 1.50, "a": {"b" : [1, 2]}, "s": "\u00e9\n", "n": null} "#;
        assert_eq!(
            round_trip(body),
            r#"{"z":1.50,"a":{"b" : [1, 2]},"s":"\u00e9\n","n":null}"#
        );
    }

    #[test]
    fn a_member_is_replaced_in_place_or_appended() {
        let mut top = TopLevel::parse(br#"{"model":"engine-alias","x":[1]}"#).unwrap();
        top.set("model", raw("\"asked\"".into()).unwrap());
        top.set(
            "stream_options",
            raw("{\"include_usage\":true}".into()).unwrap(),
        );
        assert_eq!(
            String::from_utf8(top.to_vec()).unwrap(),
            r#"{"model":"asked","x":[1],"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn members_are_read_on_demand_and_null_is_absent() {
        let top = TopLevel::parse(br#"{"model":"m","n":2,"stop":null,"k\"ey":true}"#).unwrap();
        assert_eq!(top.parse_member::<String>("model").unwrap().unwrap(), "m");
        assert_eq!(top.parse_member::<u32>("n").unwrap().unwrap(), 2);
        assert!(top.parse_member::<String>("stop").is_none());
        assert!(top.parse_member::<String>("absent").is_none());
        assert!(top.parse_member::<String>("n").unwrap().is_err());
        assert_eq!(top.get("k\"ey").map(RawValue::get), Some("true"));
    }

    #[test]
    fn anything_but_one_object_is_refused() {
        for body in ["[1]", "\"s\"", "{", "{\"a\":1} x", ""] {
            assert!(TopLevel::parse(body.as_bytes()).is_err(), "{body}");
        }
    }
}
