//! When to restart a failed engine: exponential backoff with jitter, reset after a healthy
//! run, and a circuit breaker (more than `max_restarts` restarts within `window_ms` → Failed
//! until an operator restarts the pool). Pure: time and randomness come in as arguments.

use crate::config::RestartPolicy;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RestartDecision {
    /// Start again after this delay.
    After(Duration),
    /// Too many restarts in the window: stop trying.
    GiveUp { restarts_in_window: usize },
}

#[derive(Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    /// Failures since the last healthy stretch: the exponent of the delay.
    consecutive: u32,
    recent: VecDeque<Instant>,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> RestartTracker {
        RestartTracker {
            policy,
            consecutive: 0,
            recent: VecDeque::new(),
        }
    }

    /// The engine failed at `now` after running for `ran_for`; `random` is uniform in [0, 1).
    pub fn on_failure(&mut self, now: Instant, ran_for: Duration, random: f64) -> RestartDecision {
        if ran_for >= Duration::from_millis(self.policy.reset_after_ms) {
            self.consecutive = 0;
        }
        let window = Duration::from_millis(self.policy.window_ms);
        while self
            .recent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.max_restarts as usize {
            return RestartDecision::GiveUp {
                restarts_in_window: self.recent.len(),
            };
        }
        self.recent.push_back(now);
        let base =
            self.policy.initial_ms as f64 * self.policy.multiplier.powi(self.consecutive as i32);
        let capped = base.min(self.policy.max_ms as f64);
        let spread = 1.0 + self.policy.jitter * (2.0 * random - 1.0);
        self.consecutive = self.consecutive.saturating_add(1);
        RestartDecision::After(Duration::from_millis((capped * spread).max(1.0) as u64))
    }

    /// An operator restart: forget the history.
    pub fn reset(&mut self) {
        self.consecutive = 0;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial_ms: 1000,
            max_ms: 8000,
            multiplier: 2.0,
            jitter: 0.0,
            reset_after_ms: 60_000,
            max_restarts: 5,
            window_ms: 600_000,
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_then_the_breaker_trips() {
        let mut tracker = RestartTracker::new(policy());
        let start = Instant::now();
        let delays: Vec<RestartDecision> = (0..6)
            .map(|i| tracker.on_failure(start + Duration::from_secs(i), Duration::ZERO, 0.5))
            .collect();
        let ms = |d: &RestartDecision| match d {
            RestartDecision::After(delay) => delay.as_millis(),
            RestartDecision::GiveUp { .. } => 0,
        };
        assert_eq!(
            delays[..5].iter().map(ms).collect::<Vec<_>>(),
            vec![1000, 2000, 4000, 8000, 8000]
        );
        assert_eq!(
            delays[5],
            RestartDecision::GiveUp {
                restarts_in_window: 5
            }
        );
        tracker.reset();
        assert_eq!(
            tracker.on_failure(start + Duration::from_secs(7), Duration::ZERO, 0.5),
            RestartDecision::After(Duration::from_millis(1000))
        );
    }

    #[test]
    fn a_long_healthy_run_resets_the_delay_and_old_restarts_leave_the_window() {
        let mut tracker = RestartTracker::new(policy());
        let start = Instant::now();
        for i in 0..3 {
            tracker.on_failure(start + Duration::from_secs(i), Duration::ZERO, 0.5);
        }
        let later = start + Duration::from_secs(700);
        assert_eq!(
            tracker.on_failure(later, Duration::from_secs(120), 0.5),
            RestartDecision::After(Duration::from_millis(1000))
        );
    }

    #[test]
    fn jitter_spreads_the_delay_both_ways() {
        let mut policy = policy();
        policy.jitter = 0.2;
        let now = Instant::now();
        let low = RestartTracker::new(policy.clone()).on_failure(now, Duration::ZERO, 0.0);
        let high = RestartTracker::new(policy).on_failure(now, Duration::ZERO, 0.999_999);
        assert_eq!(low, RestartDecision::After(Duration::from_millis(800)));
        assert!(matches!(high, RestartDecision::After(d) if d.as_millis() >= 1199));
    }
}
