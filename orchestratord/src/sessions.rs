//! Sessions of the native API: a `session_id` groups turns that share an engine's KV cache
//! (placement keeps them on one pool), within limits the operator sets — a time to live since
//! the last turn, a number of turns, and a token budget. A session over its limits is refused
//! before anything is queued; one past its TTL is forgotten and starts afresh.

use crate::error::ApiError;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    pub ttl: Duration,
    /// 0: unlimited.
    pub max_turns: u32,
    /// Prompt plus generated tokens over the session's life; 0: unlimited.
    pub max_tokens: u64,
}

impl Default for SessionPolicy {
    fn default() -> SessionPolicy {
        SessionPolicy {
            ttl: Duration::from_secs(1800),
            max_turns: 0,
            max_tokens: 0,
        }
    }
}

#[derive(Debug)]
struct Session {
    created: Instant,
    last_used: Instant,
    turns: u32,
    tokens: u64,
}

#[derive(Debug, Default)]
pub struct SessionStore {
    policy: SessionPolicy,
    sessions: Mutex<HashMap<String, Session>>,
}

impl SessionStore {
    pub fn new(policy: SessionPolicy) -> SessionStore {
        SessionStore {
            policy,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        // Each update leaves the map consistent, so a poisoned lock is still usable.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a turn (creating the session when new or expired), or refuses it.
    pub fn begin_turn(&self, id: &str, now: Instant) -> Result<(), ApiError> {
        let mut sessions = self.sessions();
        sessions.retain(|_, session| {
            now.saturating_duration_since(session.last_used) < self.policy.ttl
        });
        let session = sessions.entry(id.to_owned()).or_insert(Session {
            created: now,
            last_used: now,
            turns: 0,
            tokens: 0,
        });
        if self.policy.max_turns > 0 && session.turns >= self.policy.max_turns {
            return Err(ApiError::SessionBudget(format!(
                "session {id:?} has used its {} turns",
                self.policy.max_turns
            )));
        }
        if self.policy.max_tokens > 0 && session.tokens >= self.policy.max_tokens {
            return Err(ApiError::SessionBudget(format!(
                "session {id:?} has used its budget of {} tokens",
                self.policy.max_tokens
            )));
        }
        session.turns += 1;
        session.last_used = now;
        Ok(())
    }

    /// Counts a finished turn's tokens.
    pub fn end_turn(&self, id: &str, tokens: u64, now: Instant) {
        if let Some(session) = self.sessions().get_mut(id) {
            session.tokens = session.tokens.saturating_add(tokens);
            session.last_used = now;
        }
    }

    pub fn view(&self, id: &str, now: Instant) -> Option<Value> {
        let sessions = self.sessions();
        let session = sessions.get(id)?;
        let idle = now.saturating_duration_since(session.last_used);
        if idle >= self.policy.ttl {
            return None;
        }
        Some(json!({
            "session_id": id,
            "turns": session.turns,
            "tokens_used": session.tokens,
            "max_turns": self.policy.max_turns,
            "max_tokens": self.policy.max_tokens,
            "age_ms": now.saturating_duration_since(session.created).as_millis() as u64,
            "expires_in_ms": (self.policy.ttl - idle).as_millis() as u64,
        }))
    }

    pub fn delete(&self, id: &str) -> bool {
        self.sessions().remove(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_and_tokens_are_enforced_and_ttl_starts_afresh() {
        let store = SessionStore::new(SessionPolicy {
            ttl: Duration::from_secs(10),
            max_turns: 2,
            max_tokens: 100,
        });
        let start = Instant::now();
        store.begin_turn("s", start).unwrap();
        store.end_turn("s", 60, start);
        store.begin_turn("s", start).unwrap();
        store.end_turn("s", 60, start);
        let refused = store.begin_turn("s", start).unwrap_err();
        assert!(refused.to_string().contains("2 turns"), "{refused}");
        assert_eq!(store.view("s", start).unwrap()["tokens_used"], 120);
        let later = start + Duration::from_secs(11);
        assert!(store.view("s", later).is_none());
        store.begin_turn("s", later).unwrap();
        assert_eq!(store.view("s", later).unwrap()["turns"], 1);
        assert!(store.delete("s"));
        assert!(!store.delete("s"));
    }

    #[test]
    fn a_token_budget_stops_the_next_turn() {
        let store = SessionStore::new(SessionPolicy {
            max_tokens: 10,
            ..SessionPolicy::default()
        });
        let now = Instant::now();
        store.begin_turn("s", now).unwrap();
        store.end_turn("s", 10, now);
        assert!(store.begin_turn("s", now).is_err());
    }
}
