//! Per-key limits and usage: what each named key of the key file may do (`keys::KeyLimits`), and
//! what it has done. Admission asks [`Tenants::admit`] before a request is queued; the
//! [`TenantPermit`] it returns lives as long as the request, counts it as running while it does,
//! and is charged the tokens the engine reported when it completes.
//!
//! The limits, checked in this order, each refusing with 429 and a Retry-After that names it:
//! - `models`: a model the key may not use is 403 `MODEL_NOT_ALLOWED` (checked first);
//! - `tpm`: a token budget charged after the fact from the engine's usage (a request cancelled or
//!   failed mid-stream: the tokens relayed before it ended), refilled continuously
//!   at `tpm` per minute up to `tpm`. A request may take the budget below zero; the key is then
//!   refused from its next request on until the budget is positive again. This is a balance that
//!   goes negative, which a rate limiter that refuses what it cannot grant (governor's) does not
//!   model, so it is kept here;
//! - `concurrency`: requests admitted and not yet finished;
//! - `rpm`: requests per minute, with governor's GCRA (a burst of the whole minute's quota).
//!
//! Usage per key name — requests within the key's limits, prompt and generated tokens, refusals
//! by limit — is kept in counters that [`Tenants::render`] writes for the admin-keyed metrics
//! view and [`Tenants::usage`] for `GET /v2/usage`; never on the open `/metrics`, and never the
//! key itself.
//! Unnamed keys (the key file's one-field form) and keyless hosts have neither limits nor usage.
//!
//! A reloaded key file ([`Tenants::apply`]) takes effect at once: changed limits start afresh,
//! unchanged ones keep their state, and every key's usage survives (a removed key's too).

use crate::admission::Priority;
use crate::error::ApiError;
use crate::keys::{Caller, KeyLimits, KeyRing};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    key: String,
    limit: &'static str,
}

/// Every named key's limits and usage.
pub struct Tenants {
    tenants: Mutex<BTreeMap<String, Arc<Tenant>>>,
    registry: Registry,
    requests: Family<KeyLabels, Counter>,
    prompt_tokens: Family<KeyLabels, Counter>,
    completion_tokens: Family<KeyLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").finish_non_exhaustive()
    }
}

/// One named key.
struct Tenant {
    name: String,
    running: AtomicU32,
    limits: Mutex<Limiters>,
    requests: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
}

/// A key's limits and their state.
struct Limiters {
    limits: Arc<KeyLimits>,
    per_minute: Option<DefaultDirectRateLimiter>,
    tokens: Option<TokenBudget>,
}

impl Limiters {
    fn new(limits: &Arc<KeyLimits>) -> Limiters {
        Limiters {
            limits: Arc::clone(limits),
            per_minute: limits
                .requests_per_minute
                .map(|rate| RateLimiter::direct(Quota::per_minute(rate))),
            tokens: limits
                .tokens_per_minute
                .map(|rate| TokenBudget::new(rate.get(), Instant::now())),
        }
    }
}

/// Tokens per minute as a balance (module header).
#[derive(Debug)]
struct TokenBudget {
    per_minute: f64,
    balance: f64,
    at: Instant,
}

impl TokenBudget {
    fn new(per_minute: u32, now: Instant) -> TokenBudget {
        TokenBudget {
            per_minute: f64::from(per_minute),
            balance: f64::from(per_minute),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.balance = (self.balance + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// `Err(wait)` while the balance is not positive: how long until it is.
    fn admits(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.balance > 0.0 {
            return Ok(());
        }
        let seconds = (-self.balance + 1.0) * 60.0 / self.per_minute;
        Err(Duration::from_secs_f64(seconds))
    }

    fn charge(&mut self, tokens: u64, now: Instant) {
        self.refill(now);
        // Tokens beyond an hour's budget change nothing a client could observe.
        let tokens = (tokens as f64).min(self.per_minute * 60.0);
        self.balance -= tokens;
    }
}

/// A request admitted for a named key: it counts as running until dropped.
pub struct TenantPermit {
    tenant: Arc<Tenant>,
    /// The key's `class`, which the request queues in.
    pub class: Option<Priority>,
}

impl std::fmt::Debug for TenantPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantPermit")
            .field("key", &self.tenant.name)
            .finish()
    }
}

impl TenantPermit {
    /// Records a request's tokens (as the engine reported them; for a request that did not
    /// complete, the generated tokens that reached the client) and charges the key's budget.
    pub fn charge(&self, prompt_tokens: u64, completion_tokens: u64) {
        self.tenant.prompt_tokens.inc_by(prompt_tokens);
        self.tenant.completion_tokens.inc_by(completion_tokens);
        if let Some(budget) = &mut self.tenant.limiters().tokens {
            budget.charge(prompt_tokens + completion_tokens, Instant::now());
        }
    }
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        self.tenant.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tenant {
    fn limiters(&self) -> MutexGuard<'_, Limiters> {
        self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tenants {
    /// The tenants of `keys`.
    pub fn new(keys: &KeyRing) -> Tenants {
        let mut registry = Registry::with_prefix("orchestratord_key");
        let tenants = Tenants {
            tenants: Mutex::default(),
            registry: Registry::default(),
            requests: Family::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            refusals: Family::default(),
        };
        registry.register(
            "requests",
            "Requests within the key's limits (a later refusal, e.g. a full queue, still counts), by key name",
            tenants.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of completed requests as engines reported them, by key name",
            tenants.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Generated tokens of completed requests as engines reported them, by key name",
            tenants.completion_tokens.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused by a key's limit (models, tpm, concurrency, rpm), by key name",
            tenants.refusals.clone(),
        );
        let tenants = Tenants {
            registry,
            ..tenants
        };
        tenants.apply(keys);
        tenants
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Tenant>>> {
        self.tenants.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a (re)loaded key file's limits (module header).
    pub fn apply(&self, keys: &KeyRing) {
        let mut tenants = self.map();
        for (name, limits) in keys.named() {
            match tenants.get(name) {
                Some(tenant) => {
                    let mut current = tenant.limiters();
                    if current.limits != *limits {
                        *current = Limiters::new(limits);
                    }
                }
                None => {
                    let labels = KeyLabels {
                        key: name.to_owned(),
                    };
                    let tenant = Tenant {
                        name: name.to_owned(),
                        running: AtomicU32::new(0),
                        limits: Mutex::new(Limiters::new(limits)),
                        requests: self.requests.get_or_create(&labels).clone(),
                        prompt_tokens: self.prompt_tokens.get_or_create(&labels).clone(),
                        completion_tokens: self.completion_tokens.get_or_create(&labels).clone(),
                    };
                    tenants.insert(name.to_owned(), Arc::new(tenant));
                }
            }
        }
    }

    /// Admits a request of `caller` for `model`, or says which limit refuses it. `None` for a
    /// caller without a named key (nothing to limit or count).
    pub fn admit(&self, caller: &Caller, model: &str) -> Result<Option<TenantPermit>, ApiError> {
        let Some(name) = &caller.key else {
            return Ok(None);
        };
        let Some(tenant) = self.map().get(name).cloned() else {
            return Ok(None);
        };
        let refused = |limit: &'static str, error: ApiError| {
            self.refusals
                .get_or_create(&RefusalLabels {
                    key: name.clone(),
                    limit,
                })
                .inc();
            Err(error)
        };
        let over = |limit: String, retry_after: Duration| ApiError::KeyLimit {
            key: name.clone(),
            limit,
            retry_after,
        };
        let mut limiters = tenant.limiters();
        let limits = Arc::clone(&limiters.limits);
        if !limits.allows_model(model) {
            return refused(
                "models",
                ApiError::ModelNotAllowed {
                    key: name.clone(),
                    model: model.to_owned(),
                },
            );
        }
        if let (Some(budget), Some(rate)) = (&mut limiters.tokens, limits.tokens_per_minute)
            && let Err(wait) = budget.admits(Instant::now())
        {
            return refused("tpm", over(format!("{rate} tokens per minute"), wait));
        }
        if let Some(most) = limits.max_concurrent {
            let running = tenant.running.fetch_add(1, Ordering::AcqRel);
            if running >= most.get() {
                tenant.running.fetch_sub(1, Ordering::AcqRel);
                return refused(
                    "concurrency",
                    over(
                        format!("{most} concurrent requests"),
                        Duration::from_secs(1),
                    ),
                );
            }
        } else {
            tenant.running.fetch_add(1, Ordering::AcqRel);
        }
        let permit = TenantPermit {
            tenant: Arc::clone(&tenant),
            class: limits.class,
        };
        if let (Some(limiter), Some(rate)) = (&limiters.per_minute, limits.requests_per_minute)
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return refused("rpm", over(format!("{rate} requests per minute"), wait));
        }
        drop(limiters);
        tenant.requests.inc();
        Ok(Some(permit))
    }

    /// The per-key series, OpenMetrics text without `# EOF` (for the admin metrics view).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode_registry(&mut text, &self.registry)
        {
            tracing::error!(%error, "cannot encode the per-key metrics");
        }
        text
    }

    /// `GET /v2/usage`: every named key's usage and running requests.
    pub fn usage(&self) -> Value {
        let tenants = self.map();
        let keys: serde_json::Map<String, Value> = tenants
            .values()
            .map(|tenant| {
                let refusals: serde_json::Map<String, Value> =
                    ["models", "tpm", "concurrency", "rpm"]
                        .into_iter()
                        .map(|limit| {
                            let count = self
                                .refusals
                                .get_or_create(&RefusalLabels {
                                    key: tenant.name.clone(),
                                    limit,
                                })
                                .get();
                            (limit.to_owned(), json!(count))
                        })
                        .collect();
                (
                    tenant.name.clone(),
                    json!({
                        "requests": tenant.requests.get(),
                        "prompt_tokens": tenant.prompt_tokens.get(),
                        "completion_tokens": tenant.completion_tokens.get(),
                        "running": tenant.running.load(Ordering::Acquire),
                        "refusals": refusals,
                    }),
                )
            })
            .collect();
        json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_budget_goes_negative_and_refuses_until_it_refills() {
        let start = Instant::now();
        let mut budget = TokenBudget::new(60, start);
        assert_eq!(budget.admits(start), Ok(()));
        budget.charge(90, start);
        let wait = budget.admits(start).unwrap_err();
        // -30 tokens at one per second: positive after 31 s.
        assert!((30.0..32.0).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(budget.admits(start + Duration::from_secs(25)).is_err());
        assert_eq!(budget.admits(start + Duration::from_secs(32)), Ok(()));
        // Never more than a minute's worth.
        assert_eq!(budget.admits(start + Duration::from_secs(3600)), Ok(()));
        assert!((budget.balance - 60.0).abs() < 1e-9);
    }

    fn ring(text: &str) -> KeyRing {
        KeyRing::parse(text).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn each_limit_refuses_with_its_name_and_another_key_is_served() {
        let keys = ring(
            "a inference key-a-0123456789abcdef concurrency=1 models=m\n\
             b inference key-b-0123456789abcdef rpm=2\n\
             c inference key-c-0123456789abcdef\n",
        );
        let tenants = Tenants::new(&keys);
        let caller = |key: &str| keys.caller(key).unwrap_or_else(|| panic!("{key}"));
        let a = caller("key-a-0123456789abcdef");
        let held = tenants.admit(&a, "m").unwrap();
        assert!(matches!(
            tenants.admit(&a, "m"),
            Err(ApiError::KeyLimit { ref limit, .. }) if limit == "1 concurrent requests"
        ));
        assert!(matches!(
            tenants.admit(&a, "other"),
            Err(ApiError::ModelNotAllowed { .. })
        ));
        drop(held);
        assert!(tenants.admit(&a, "m").unwrap().is_some());
        let b = caller("key-b-0123456789abcdef");
        assert!(tenants.admit(&b, "m").is_ok() && tenants.admit(&b, "m").is_ok());
        let Err(ApiError::KeyLimit { retry_after, .. }) = tenants.admit(&b, "m") else {
            panic!("a third request in a minute was admitted");
        };
        assert!(retry_after > Duration::from_secs(20), "{retry_after:?}");
        let c = caller("key-c-0123456789abcdef");
        for _ in 0..10 {
            assert!(tenants.admit(&c, "anything").unwrap().is_some());
        }
        let usage = tenants.usage();
        assert_eq!(usage["keys"]["a"]["refusals"]["concurrency"], 1);
        assert_eq!(usage["keys"]["a"]["refusals"]["models"], 1);
        assert_eq!(usage["keys"]["b"]["refusals"]["rpm"], 1);
        assert_eq!(usage["keys"]["c"]["requests"], 10);
        assert_eq!(usage["keys"]["c"]["running"], 0);
    }

    #[test]
    fn a_reload_applies_new_limits_and_keeps_usage() {
        let tenants = Tenants::new(&ring("a inference key-a-0123456789abcdef concurrency=1\n"));
        let before = ring("a inference key-a-0123456789abcdef concurrency=1\n");
        let a = before
            .caller("key-a-0123456789abcdef")
            .unwrap_or_else(|| panic!("a"));
        let held = tenants.admit(&a, "m").unwrap();
        assert!(tenants.admit(&a, "m").is_err());
        let after = ring("a inference key-a-0123456789abcdef concurrency=2\n");
        tenants.apply(&after);
        let a = after
            .caller("key-a-0123456789abcdef")
            .unwrap_or_else(|| panic!("a"));
        assert!(tenants.admit(&a, "m").unwrap().is_some());
        drop(held);
        assert_eq!(tenants.usage()["keys"]["a"]["requests"], 2);
        assert!(
            tenants
                .render()
                .contains("orchestratord_key_requests_total{key=\"a\"} 2")
        );
    }
}
