//! API keys: the key file's format, the role and limits each key carries, and finding the key a
//! request presented (in constant time across all keys, so the time taken does not tell which one
//! nearly matched).
//!
//! The key file has one key per line:
//!
//! ```text
//! # name     role        key                        limits (optional)
//! alice      inference   sk-alice-0123456789abcdef  class=interactive concurrency=4 rpm=60 tpm=20000 models=llama,qwen
//! etl        inference   sk-etl-0123456789abcdef    class=batch
//! ops        admin       sk-ops-0123456789abcdef
//! sk-legacy-0123456789abcdef
//! ```
//!
//! A line of three fields or more is a named key with a role: `inference` (the OpenAI, Anthropic
//! and task APIs) or `admin` (those, and the operator's: drain, reload, usage), then its limits
//! (see [`KeyLimits`]; `tenants` enforces them). A line with one field is the older format: an
//! unnamed inference key without limits. Blank lines and `#` comments are ignored; keys are at
//! least 16 characters; names are unique and made of letters, digits, `.`, `_` and `-`.

use crate::admission::Priority;
use crate::config::ConfigError;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What a key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The inference APIs.
    Inference,
    /// The inference APIs and the operator's (drain, reload).
    Admin,
}

/// What a named key may do, from its `setting=value` fields; `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// `class=interactive|batch`: the queue class of the key's requests (a batch key's requests
    /// never queue as interactive).
    pub class: Option<Priority>,
    /// `concurrency=N`: requests admitted and not yet finished.
    pub max_concurrent: Option<NonZeroU32>,
    /// `rpm=N`: requests admitted per minute.
    pub requests_per_minute: Option<NonZeroU32>,
    /// `tpm=N`: prompt and generated tokens per minute, as the engine reported them.
    pub tokens_per_minute: Option<NonZeroU32>,
    /// `models=a,b`: the only models the key may use.
    pub models: Option<Vec<String>>,
}

impl KeyLimits {
    /// Parses the `setting=value` fields after a key (module header).
    fn parse(fields: &[&str]) -> Result<KeyLimits, String> {
        let mut limits = KeyLimits::default();
        for field in fields {
            let Some((setting, value)) = field.split_once('=') else {
                return Err(format!("{field:?} is not setting=value"));
            };
            let count = |what: &str| {
                value
                    .parse::<NonZeroU32>()
                    .map_err(|_| format!("{what} must be a positive whole number, got {value:?}"))
            };
            let duplicate = match setting {
                "class" => limits
                    .class
                    .replace(match value {
                        "interactive" => Priority::Interactive,
                        "batch" => Priority::Batch,
                        other => {
                            return Err(format!(
                                "class {other:?} is neither interactive nor batch"
                            ));
                        }
                    })
                    .is_some(),
                "concurrency" => limits.max_concurrent.replace(count(setting)?).is_some(),
                "rpm" => limits
                    .requests_per_minute
                    .replace(count(setting)?)
                    .is_some(),
                "tpm" => limits.tokens_per_minute.replace(count(setting)?).is_some(),
                "models" => {
                    let models: Vec<String> = value
                        .split(',')
                        .filter(|model| !model.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if models.is_empty() {
                        return Err("models names no model".to_owned());
                    }
                    limits.models.replace(models).is_some()
                }
                other => {
                    return Err(format!(
                        "unknown setting {other:?} (class, concurrency, rpm, tpm, models)"
                    ));
                }
            };
            if duplicate {
                return Err(format!("{setting} is set twice"));
            }
        }
        Ok(limits)
    }

    /// Whether the key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|allowed| allowed == model))
    }
}

/// One configured key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// `None` for a key written in the one-field format.
    pub name: Option<String>,
    pub role: Role,
    pub limits: Arc<KeyLimits>,
    secret: String,
}

impl std::fmt::Debug for ApiKey {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Who is calling, as the request's key says; the key check puts it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (`None`: an unnamed key, or no keys configured).
    pub key: Option<String>,
    pub role: Role,
}

impl Caller {
    /// The caller when no keys are configured: only a loopback listener is allowed then, so
    /// whoever reaches it is on this host, the operator's side.
    pub const HOST: Caller = Caller {
        key: None,
        role: Role::Admin,
    };
}

/// Every configured key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRing {
    keys: Vec<ApiKey>,
}

const MIN_KEY_LEN: usize = 16;

impl KeyRing {
    /// Reads and checks the key file at `path`.
    pub fn read(path: &Path) -> Result<KeyRing, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "API key file",
            path: path.to_owned(),
            source,
        })?;
        KeyRing::parse(&text).map_err(|message| {
            ConfigError::Invalid(format!("API key file {}: {message}", path.display()))
        })
    }

    /// Parses key file text (module header).
    pub fn parse(text: &str) -> Result<KeyRing, String> {
        let mut keys: Vec<ApiKey> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let number = index + 1;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let key = match fields[..] {
                [secret] => ApiKey {
                    name: None,
                    role: Role::Inference,
                    limits: Arc::default(),
                    secret: secret.to_owned(),
                },
                [name, role, secret, ref settings @ ..] => ApiKey {
                    name: Some(name.to_owned()),
                    role: match role {
                        "inference" => Role::Inference,
                        "admin" => Role::Admin,
                        other => {
                            return Err(format!(
                                "line {number}: role {other:?} is neither inference nor admin"
                            ));
                        }
                    },
                    limits: Arc::new(
                        KeyLimits::parse(settings)
                            .map_err(|message| format!("line {number}: {message}"))?,
                    ),
                    secret: secret.to_owned(),
                },
                _ => {
                    return Err(format!(
                        "line {number}: expected \"<name> <role> <key>\" or a bare key"
                    ));
                }
            };
            if let Some(name) = &key.name
                && !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                // Names label metrics and access lines.
                return Err(format!(
                    "line {number}: the name {name:?} may hold only letters, digits, '.', '_' and '-'"
                ));
            }
            if key.secret.len() < MIN_KEY_LEN {
                return Err(format!(
                    "line {number}: keys must be at least {MIN_KEY_LEN} characters (this one is {})",
                    key.secret.len()
                ));
            }
            if key.name.is_some() && keys.iter().any(|other| other.name == key.name) {
                return Err(format!(
                    "line {number}: the name {:?} is used twice",
                    key.name
                ));
            }
            keys.push(key);
        }
        Ok(KeyRing { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller whose key is `presented`, comparing against every key in constant time.
    pub fn caller(&self, presented: &str) -> Option<Caller> {
        let mut found = None;
        for key in &self.keys {
            if bool::from(presented.as_bytes().ct_eq(key.secret.as_bytes())) {
                found = Some(key);
            }
        }
        found.map(|key| Caller {
            key: key.name.clone(),
            role: key.role,
        })
    }

    /// Every named key's name and limits, in file order.
    pub fn named(&self) -> impl Iterator<Item = (&str, &Arc<KeyLimits>)> {
        self.keys
            .iter()
            .filter_map(|key| Some((key.name.as_deref()?, &key.limits)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_keys_carry_roles_and_bare_keys_are_unnamed_inference_keys() {
        let ring = KeyRing::parse(
            "# operators\nalice inference alice-key-0123456789\n\nops admin ops-key-0123456789ab\nlegacy-key-0123456789\n",
        )
        .unwrap();
        assert_eq!(
            ring.caller("alice-key-0123456789"),
            Some(Caller {
                key: Some("alice".into()),
                role: Role::Inference,
            })
        );
        assert_eq!(
            ring.caller("ops-key-0123456789ab")
                .map(|caller| caller.role),
            Some(Role::Admin)
        );
        assert_eq!(
            ring.caller("legacy-key-0123456789"),
            Some(Caller {
                key: None,
                role: Role::Inference,
            })
        );
        assert_eq!(ring.caller("nobody-0123456789abc"), None);
        assert_eq!(ring.caller(""), None);
    }

    #[test]
    fn limits_follow_the_key_and_the_old_forms_still_load() {
        let ring = KeyRing::parse(
            "alice inference alice-key-0123456789 class=batch concurrency=2 rpm=60 tpm=5000 models=m1,m2\n\
             ops admin ops-key-0123456789ab\n\
             legacy-key-0123456789\n",
        )
        .unwrap();
        let named: Vec<(&str, &Arc<KeyLimits>)> = ring.named().collect();
        let limits = named[0].1;
        assert_eq!(limits.class, Some(Priority::Batch));
        assert_eq!(limits.max_concurrent, NonZeroU32::new(2));
        assert_eq!(limits.requests_per_minute, NonZeroU32::new(60));
        assert_eq!(limits.tokens_per_minute, NonZeroU32::new(5000));
        assert!(limits.allows_model("m2") && !limits.allows_model("m3"));
        let ops = named[1].1;
        assert_eq!(**ops, KeyLimits::default());
        assert!(ops.allows_model("anything"));
        assert_eq!(
            named.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            ["alice", "ops"]
        );
        assert!(ring.caller("legacy-key-0123456789").is_some());
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, needle) in [
            ("short", "at least 16"),
            ("a root key-0123456789abcdef", "neither inference nor admin"),
            ("a b", "expected"),
            (
                "a admin key-0123456789abcdef\na admin other-0123456789abcd",
                "used twice",
            ),
            (
                "a inference key-0123456789abcdef rpm=0",
                "positive whole number",
            ),
            ("a inference key-0123456789abcdef rpm=5 rpm=6", "set twice"),
            (
                "a inference key-0123456789abcdef class=urgent",
                "neither interactive nor batch",
            ),
            (
                "a inference key-0123456789abcdef burst=3",
                "unknown setting",
            ),
            ("a inference key-0123456789abcdef tpm", "not setting=value"),
            ("a inference key-0123456789abcdef models=", "names no model"),
            ("bob\"x inference key-0123456789abcdef", "only letters"),
        ] {
            let error = KeyRing::parse(text).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
