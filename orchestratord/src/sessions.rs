//! Sessions of the native API: a `session_id` groups turns that share an engine's KV cache
//! (placement keeps them on one pool), within limits the operator sets — a time to live since
//! the last turn, a number of turns, and a token budget. A session over its limits is refused
//! before anything is queued; one past its TTL is forgotten and starts afresh.
//!
//! Clients choose session ids, so the store is bounded: at most `max_sessions`, the least
//! recently used forgotten first, and no work beyond the session asked about (no scans). A
//! session belongs to the key that created it: another key can neither use, read nor delete it
//! (admin keys can); unnamed keys share one owner.

use crate::error::ApiError;
use crate::keys::{Caller, Role};
use lru::LruCache;
use serde_json::{Value, json};
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    pub ttl: Duration,
    /// 0: unlimited.
    pub max_turns: u32,
    /// Prompt plus generated tokens over the session's life; 0: unlimited.
    pub max_tokens: u64,
    /// Sessions remembered at once; the least recently used go first.
    pub max_sessions: NonZeroUsize,
}

impl Default for SessionPolicy {
    fn default() -> SessionPolicy {
        SessionPolicy {
            ttl: Duration::from_secs(1800),
            max_turns: 0,
            max_tokens: 0,
            max_sessions: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

#[derive(Debug)]
struct Session {
    /// The name of the key that created it (`None`: an unnamed key, or no keys).
    owner: Option<String>,
    created: Instant,
    last_used: Instant,
    turns: u32,
    tokens: u64,
}

impl Session {
    fn expired(&self, ttl: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.last_used) >= ttl
    }

    fn visible_to(&self, caller: &Caller) -> bool {
        caller.role == Role::Admin || self.owner == caller.key
    }
}

/// A turn that [`SessionStore::begin_turn`] let start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The turn created its session (undo with [`SessionStore::forget_new`] if the request is
    /// then refused, so refused requests leave nothing behind).
    pub created: bool,
}

#[derive(Debug)]
pub struct SessionStore {
    policy: SessionPolicy,
    sessions: Mutex<LruCache<String, Session>>,
}

impl Default for SessionStore {
    fn default() -> SessionStore {
        SessionStore::new(SessionPolicy::default())
    }
}

impl SessionStore {
    pub fn new(policy: SessionPolicy) -> SessionStore {
        SessionStore {
            sessions: Mutex::new(LruCache::new(policy.max_sessions)),
            policy,
        }
    }

    fn sessions(&self) -> MutexGuard<'_, LruCache<String, Session>> {
        // Each update leaves the map consistent, so a poisoned lock is still usable.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a turn of `caller`'s session `id` (creating it when new or expired), or refuses it.
    pub fn begin_turn(&self, id: &str, caller: &Caller, now: Instant) -> Result<Turn, ApiError> {
        let mut sessions = self.sessions();
        let live = sessions
            .get(id)
            .is_some_and(|session| !session.expired(self.policy.ttl, now));
        if !live {
            sessions.put(
                id.to_owned(),
                Session {
                    owner: caller.key.clone(),
                    created: now,
                    last_used: now,
                    turns: 0,
                    tokens: 0,
                },
            );
        }
        let Some(session) = sessions.get_mut(id) else {
            return Err(ApiError::Internal("a session vanished while in use".into()));
        };
        if !session.visible_to(caller) {
            return Err(ApiError::InvalidParams(format!(
                "session {id:?} belongs to another key"
            )));
        }
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
        Ok(Turn { created: !live })
    }

    /// Forgets a session its first turn created, when that turn's request was refused.
    pub fn forget_new(&self, id: &str, turn: Turn) {
        if turn.created {
            self.sessions().pop(id);
        }
    }

    /// Counts a finished turn's tokens.
    pub fn end_turn(&self, id: &str, tokens: u64, now: Instant) {
        if let Some(session) = self.sessions().peek_mut(id) {
            session.tokens = session.tokens.saturating_add(tokens);
            session.last_used = now;
        }
    }

    /// The session as `caller` may see it; `None` when it does not exist, has expired or is
    /// another key's.
    pub fn view(&self, id: &str, caller: &Caller, now: Instant) -> Option<Value> {
        let sessions = self.sessions();
        let session = sessions.peek(id)?;
        if session.expired(self.policy.ttl, now) || !session.visible_to(caller) {
            return None;
        }
        let idle = now.saturating_duration_since(session.last_used);
        Some(json!({
            "session_id": id,
            "turns": session.turns,
            "tokens_used": session.tokens,
            "max_turns": self.policy.max_turns,
            "max_tokens": self.policy.max_tokens,
            "age_ms": now.saturating_duration_since(session.created).as_millis() as u64,
            "expires_in_ms": (self.policy.ttl.saturating_sub(idle)).as_millis() as u64,
        }))
    }

    /// Forgets `caller`'s session `id`; `false` when there is none it may delete.
    pub fn delete(&self, id: &str, caller: &Caller) -> bool {
        let mut sessions = self.sessions();
        if sessions
            .peek(id)
            .is_some_and(|session| session.visible_to(caller))
        {
            sessions.pop(id);
            true
        } else {
            false
        }
    }

    /// How many sessions are remembered (for metrics).
    pub fn remembered(&self) -> usize {
        self.sessions().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Caller {
        Caller {
            key: Some(name.into()),
            role: Role::Inference,
        }
    }

    #[test]
    fn turns_and_tokens_are_enforced_and_ttl_starts_afresh() {
        let store = SessionStore::new(SessionPolicy {
            ttl: Duration::from_secs(10),
            max_turns: 2,
            max_tokens: 100,
            ..SessionPolicy::default()
        });
        let alice = key("alice");
        let start = Instant::now();
        assert!(store.begin_turn("s", &alice, start).unwrap().created);
        store.end_turn("s", 60, start);
        assert!(!store.begin_turn("s", &alice, start).unwrap().created);
        store.end_turn("s", 60, start);
        let refused = store.begin_turn("s", &alice, start).unwrap_err();
        assert!(refused.to_string().contains("2 turns"), "{refused}");
        assert_eq!(store.view("s", &alice, start).unwrap()["tokens_used"], 120);
        let later = start + Duration::from_secs(11);
        assert!(store.view("s", &alice, later).is_none());
        store.begin_turn("s", &alice, later).unwrap();
        assert_eq!(store.view("s", &alice, later).unwrap()["turns"], 1);
        assert!(store.delete("s", &alice));
        assert!(!store.delete("s", &alice));
    }

    #[test]
    fn a_token_budget_stops_the_next_turn() {
        let store = SessionStore::new(SessionPolicy {
            max_tokens: 10,
            ..SessionPolicy::default()
        });
        let now = Instant::now();
        let alice = key("alice");
        store.begin_turn("s", &alice, now).unwrap();
        store.end_turn("s", 10, now);
        assert!(store.begin_turn("s", &alice, now).is_err());
    }

    #[test]
    fn a_session_is_its_creators_and_an_admins_only() {
        let store = SessionStore::default();
        let now = Instant::now();
        let (alice, mallory) = (key("alice"), key("mallory"));
        store.begin_turn("s", &alice, now).unwrap();
        let refused = store.begin_turn("s", &mallory, now).unwrap_err();
        assert!(refused.to_string().contains("another key"), "{refused}");
        assert!(store.view("s", &mallory, now).is_none());
        assert!(!store.delete("s", &mallory));
        let admin = Caller {
            key: Some("ops".into()),
            role: Role::Admin,
        };
        assert!(store.view("s", &admin, now).is_some());
        assert!(store.delete("s", &admin));
    }

    #[test]
    fn client_chosen_ids_cannot_grow_the_store_past_its_bound_and_refused_turns_leave_nothing() {
        let store = SessionStore::new(SessionPolicy {
            max_sessions: NonZeroUsize::new(100).unwrap(),
            ..SessionPolicy::default()
        });
        let now = Instant::now();
        let alice = key("alice");
        for i in 0..100_000 {
            store.begin_turn(&format!("s-{i}"), &alice, now).unwrap();
        }
        assert_eq!(store.remembered(), 100);
        assert!(
            store.view("s-99999", &alice, now).is_some(),
            "the newest stay"
        );
        assert!(
            store.view("s-0", &alice, now).is_none(),
            "the oldest went first"
        );
        let turn = store.begin_turn("refused", &alice, now).unwrap();
        store.forget_new("refused", turn);
        assert!(store.view("refused", &alice, now).is_none());
    }
}
