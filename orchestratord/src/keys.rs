//! API keys: the key file's format, the role each key carries, and finding the key a request
//! presented (in constant time across all keys, so the time taken does not tell which one nearly
//! matched).
//!
//! The key file has one key per line:
//!
//! ```text
//! # name     role        key
//! alice      inference   sk-alice-0123456789abcdef
//! ops        admin       sk-ops-0123456789abcdef
//! sk-legacy-0123456789abcdef
//! ```
//!
//! A line of three fields is a named key with a role: `inference` (the OpenAI, Anthropic and task
//! APIs) or `admin` (those, and the operator's: drain and reload). A line with one field is
//! today's format: an unnamed inference key. Blank lines and `#` comments are ignored; keys are at
//! least 16 characters; names are unique. Later fields are reserved for per-key limits.

use crate::config::ConfigError;
use std::path::Path;
use subtle::ConstantTimeEq;

/// What a key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The inference APIs.
    Inference,
    /// The inference APIs and the operator's (drain, reload).
    Admin,
}

/// One configured key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// `None` for a key written in the one-field format.
    pub name: Option<String>,
    pub role: Role,
    secret: String,
}

impl std::fmt::Debug for ApiKey {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
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
                    secret: secret.to_owned(),
                },
                [name, role, secret, ..] => ApiKey {
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
                    secret: secret.to_owned(),
                },
                _ => {
                    return Err(format!(
                        "line {number}: expected \"<name> <role> <key>\" or a bare key"
                    ));
                }
            };
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
                role: Role::Inference
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
                role: Role::Inference
            })
        );
        assert_eq!(ring.caller("nobody-0123456789abc"), None);
        assert_eq!(ring.caller(""), None);
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
        ] {
            let error = KeyRing::parse(text).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
