//! The admission queue: the bounded set of tasks that were accepted but have not yet been handed a
//! slot, the order they leave it in, and the start-time predictions given to clients.
//!
//! It is a plain, synchronous value with no clock of its own: every operation that depends on time
//! takes `now`. One owner (the async admission task) mutates it; everything else asks that owner.
//!
//! Service order, evaluated at `now`:
//! 1. *starved* batch tasks — those that have waited strictly longer than
//!    [`AdmissionConfig::batch_max_wait`] — oldest first, so batch work is never stuck forever;
//! 2. interactive tasks, oldest first;
//! 3. the remaining batch tasks, oldest first.
//!
//! [`AdmissionQueue::next_eligible`] walks that order and takes the first task the caller can place
//! now, so a task whose model has no free slot does not hold back tasks for other models.
//!
//! A task is *expired* once `now >= deadline`. Expired tasks are never handed out and never count
//! towards anyone's position; they stay queued until [`AdmissionQueue::expire`] returns them, so the
//! caller can tell each client that its deadline passed. Call `expire` before `push` so dead tasks
//! do not hold places in a full queue.
//!
//! Predictions: with `s = max(1, slot hint)` slots serving the queue in parallel and `m` the average
//! service time (how long a task holds its slot), the task at `position` (0 = next) is predicted to
//! start after `ceil((position + 1) / s) × m`: one full service time per wave of `s` tasks ahead,
//! the first wave included, because a task only waits in the queue while every slot is busy. `m` is
//! an exponentially weighted moving average, `m ← m + (x − m) / 5`, starting from the first
//! observation; before any observation it is a prior of one second, never zero. A full queue's
//! `retry_after` is the predicted wait until the head leaves, `predict_start(0)`, but at least 1 s.
//!
//! Invariants a change must not break: nothing here blocks, sleeps or does I/O; the queue never
//! holds more than `capacity` tasks (memory is bounded by it, and nothing is preallocated from it);
//! an expired task is never returned by `next_eligible`; no input panics (time arithmetic saturates,
//! `Instant`s are only compared); every operation is O(capacity) at worst.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Identifies one task for its whole life; assigned by the caller, unique among queued tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Service class of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served before batch work, unless a batch task has starved.
    Interactive,
    /// Served when no interactive work waits, or once it has waited past `batch_max_wait`.
    Batch,
}

/// What a push into a full queue does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse the new task.
    #[default]
    Reject,
    /// Evict the oldest queued batch task to make room; refuse if there is none.
    DropLru,
}

/// Limits and policy of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Most tasks queued at once, both classes together; 0 refuses every push.
    pub capacity: usize,
    /// What a push into a full queue does.
    pub full_policy: FullPolicy,
    /// A batch task that has waited longer than this is served before interactive tasks.
    pub batch_max_wait: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            capacity: 256,
            full_policy: FullPolicy::Reject,
            batch_max_wait: Duration::from_secs(30),
        }
    }
}

/// A task that entered the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted<T> {
    /// Position in service order at admission; 0 = next.
    pub position: usize,
    /// Predicted wait until the task gets a slot, assuming every slot is busy now (see the module
    /// header); a caller that places the task at once should report zero instead.
    pub predicted_start: Duration,
    /// The batch task evicted to make room under [`FullPolicy::DropLru`]; its client must be told.
    pub dropped: Option<(TaskId, T)>,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The queue is full and the policy left no room (`reject`, or `drop-lru` with no batch task).
    QueueFull,
    /// The task's deadline had already passed when it was pushed.
    DeadlinePassed,
    /// A task with the same id is already queued.
    DuplicateTask,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::QueueFull => "admission queue is full",
            Self::DeadlinePassed => "deadline passed before admission",
            Self::DuplicateTask => "task id is already queued",
        })
    }
}

/// A push that was refused; the payload is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (retry after {retry_after:?})")]
pub struct Rejected {
    /// Why. Only [`RejectReason::QueueFull`] is worth retrying.
    pub reason: RejectReason,
    /// When a retry may find room: the predicted wait until the head of the queue leaves, at least
    /// one second (the granularity of `Retry-After`).
    pub retry_after: Duration,
}

struct Entry<T> {
    id: TaskId,
    deadline: Instant,
    enqueued_at: Instant,
    payload: T,
}

impl<T> Entry<T> {
    fn is_expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }
}

/// Where an entry sits: its class queue and index in it.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Interactive(usize),
    Batch(usize),
}

/// Service time assumed before the first observation; zero would promise an immediate start.
const PRIOR_SERVICE_TIME: Duration = Duration::from_secs(1);
/// Weight of each new observation in the moving average: 1 / `EWMA_DIVISOR`.
const EWMA_DIVISOR: u128 = 5;
const NANOS_PER_SEC: u128 = 1_000_000_000;
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The admission queue; see the module header for the service order and predictions.
pub struct AdmissionQueue<T> {
    config: AdmissionConfig,
    interactive: VecDeque<Entry<T>>,
    batch: VecDeque<Entry<T>>,
    /// Moving average of service times in nanoseconds; `None` until the first observation. u128
    /// so that even `Duration::MAX` observations cannot overflow.
    service_nanos: Option<u128>,
    slots: usize,
}

impl<T> fmt::Debug for AdmissionQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionQueue")
            .field("config", &self.config)
            .field("interactive", &self.interactive.len())
            .field("batch", &self.batch.len())
            .field("service_time", &self.service_time())
            .field("slots", &self.slots)
            .finish()
    }
}

impl<T> AdmissionQueue<T> {
    /// An empty queue, predicting with one slot and the one-second prior.
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            interactive: VecDeque::new(),
            batch: VecDeque::new(),
            service_nanos: None,
            slots: 1,
        }
    }

    /// The configuration this queue was built with.
    /// New limits from a reloaded configuration: they govern the next pushes; tasks already
    /// queued keep their places even when the new capacity is smaller.
    pub fn set_config(&mut self, config: AdmissionConfig) {
        self.config = config;
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// Admits a task, or refuses it (see [`Rejected`]). Under [`FullPolicy::DropLru`] a full queue
    /// evicts its oldest batch task, whichever class the new task has.
    pub fn push(
        &mut self,
        id: TaskId,
        priority: Priority,
        deadline: Instant,
        payload: T,
        now: Instant,
    ) -> Result<Admitted<T>, Rejected> {
        if now >= deadline {
            return Err(self.rejected(RejectReason::DeadlinePassed));
        }
        if self.find(id).is_some() {
            return Err(self.rejected(RejectReason::DuplicateTask));
        }
        let mut dropped = None;
        if self.len() >= self.config.capacity {
            // Capacity 0 ends here too: there is never a batch task to evict.
            let victim = match self.config.full_policy {
                FullPolicy::Reject => None,
                FullPolicy::DropLru => self.batch.pop_front(),
            };
            match victim {
                Some(entry) => dropped = Some((entry.id, entry.payload)),
                None => return Err(self.rejected(RejectReason::QueueFull)),
            }
        }
        let entry = Entry {
            id,
            deadline,
            enqueued_at: now,
            payload,
        };
        match priority {
            Priority::Interactive => self.interactive.push_back(entry),
            Priority::Batch => self.batch.push_back(entry),
        }
        // The new task is live (its deadline is ahead), so it has a position.
        let position = self.position(id, now).unwrap_or(self.len());
        Ok(Admitted {
            position,
            predicted_start: self.predict_start(position),
            dropped,
        })
    }

    /// Removes and returns the first live task in service order whose payload `eligible` accepts.
    /// `eligible` is called at most once per live task, in service order, and never on an expired
    /// one; tasks it refuses keep their place.
    pub fn next_eligible(
        &mut self,
        now: Instant,
        mut eligible: impl FnMut(&T) -> bool,
    ) -> Option<(TaskId, T)> {
        let slot = self.service_order(now).find(|&slot| {
            let entry = self.entry(slot);
            !entry.is_expired(now) && eligible(&entry.payload)
        })?;
        let entry = match slot {
            Slot::Interactive(i) => self.interactive.remove(i),
            Slot::Batch(i) => self.batch.remove(i),
        }?;
        Some((entry.id, entry.payload))
    }

    /// Every queued task's payload, in no particular order.
    pub fn payloads(&self) -> impl Iterator<Item = &T> {
        self.interactive
            .iter()
            .chain(self.batch.iter())
            .map(|entry| &entry.payload)
    }

    /// Removes a queued task (cancellation), expired or not.
    pub fn remove(&mut self, id: TaskId) -> Option<T> {
        let entry = match self.find(id)? {
            Slot::Interactive(i) => self.interactive.remove(i),
            Slot::Batch(i) => self.batch.remove(i),
        }?;
        Some(entry.payload)
    }

    /// Removes and returns every task whose payload `doomed` selects, in queue order; the others
    /// keep their places.
    pub fn remove_where(&mut self, mut doomed: impl FnMut(&T) -> bool) -> Vec<(TaskId, T)> {
        let mut removed = Vec::new();
        for queue in [&mut self.interactive, &mut self.batch] {
            for _ in 0..queue.len() {
                if let Some(entry) = queue.pop_front() {
                    if doomed(&entry.payload) {
                        removed.push((entry.id, entry.payload));
                    } else {
                        queue.push_back(entry);
                    }
                }
            }
        }
        removed
    }

    /// Removes and returns every task whose deadline has passed (`deadline <= now`), in service
    /// order at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(TaskId, T)> {
        let max_wait = self.config.batch_max_wait;
        let mut starved = Vec::new();
        let mut interactive = Vec::new();
        let mut batch = Vec::new();
        // Rotating each queue once through itself keeps the survivors' order without a second
        // buffer.
        for _ in 0..self.interactive.len() {
            if let Some(entry) = self.interactive.pop_front() {
                if entry.is_expired(now) {
                    interactive.push((entry.id, entry.payload));
                } else {
                    self.interactive.push_back(entry);
                }
            }
        }
        for _ in 0..self.batch.len() {
            if let Some(entry) = self.batch.pop_front() {
                if !entry.is_expired(now) {
                    self.batch.push_back(entry);
                } else if is_starved(&entry, now, max_wait) {
                    starved.push((entry.id, entry.payload));
                } else {
                    batch.push((entry.id, entry.payload));
                }
            }
        }
        starved.append(&mut interactive);
        starved.append(&mut batch);
        starved
    }

    /// The earliest deadline among queued tasks (possibly already past), so the owner can sleep
    /// until then and call [`expire`](Self::expire).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.interactive
            .iter()
            .chain(self.batch.iter())
            .map(|entry| entry.deadline)
            .min()
    }

    /// How many live tasks are ahead of `id` in service order at `now`; `None` if it is not queued
    /// or has expired (an expired task will never be served).
    pub fn position(&self, id: TaskId, now: Instant) -> Option<usize> {
        let mut ahead = 0;
        for slot in self.service_order(now) {
            let entry = self.entry(slot);
            if entry.id == id {
                return (!entry.is_expired(now)).then_some(ahead);
            }
            if !entry.is_expired(now) {
                ahead += 1;
            }
        }
        None
    }

    /// Queued tasks, both classes, expired ones not yet returned by `expire` included.
    pub fn len(&self) -> usize {
        self.interactive.len() + self.batch.len()
    }

    /// Whether no task is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queued tasks per class: `(interactive, batch)`.
    pub fn depth(&self) -> (usize, usize) {
        (self.interactive.len(), self.batch.len())
    }

    /// Feeds one observed service time (how long a task held its slot) into the moving average.
    pub fn record_service(&mut self, duration: Duration) {
        let observed = duration.as_nanos();
        self.service_nanos = Some(match self.service_nanos {
            None => observed,
            // avg + (x - avg) / d, written so that it never goes negative.
            Some(avg) => (avg * (EWMA_DIVISOR - 1) + observed) / EWMA_DIVISOR,
        });
    }

    /// How many slots serve this queue in parallel; 0 is taken as 1 so predictions stay finite.
    pub fn set_capacity_hint(&mut self, slots: usize) {
        self.slots = slots.max(1);
    }

    /// The service time predictions use: the moving average, or the one-second prior.
    pub fn service_time(&self) -> Duration {
        match self.service_nanos {
            None => PRIOR_SERVICE_TIME,
            Some(nanos) => duration_from_nanos(nanos),
        }
    }

    /// Predicted wait before the task at `position` (0 = next) gets a slot:
    /// `ceil((position + 1) / slots) × service_time()`, saturating. Non-decreasing in `position`.
    pub fn predict_start(&self, position: usize) -> Duration {
        // ceil((p + 1) / s) == p / s + 1.
        let waves = (position / self.slots).saturating_add(1);
        let waves = u32::try_from(waves).unwrap_or(u32::MAX);
        self.service_time().saturating_mul(waves)
    }

    fn rejected(&self, reason: RejectReason) -> Rejected {
        Rejected {
            reason,
            retry_after: self.predict_start(0).max(MIN_RETRY_AFTER),
        }
    }

    fn find(&self, id: TaskId) -> Option<Slot> {
        if let Some(i) = self.interactive.iter().position(|e| e.id == id) {
            return Some(Slot::Interactive(i));
        }
        self.batch.iter().position(|e| e.id == id).map(Slot::Batch)
    }

    /// Only called with slots produced by `service_order`/`find` on the unchanged queue.
    fn entry(&self, slot: Slot) -> &Entry<T> {
        match slot {
            Slot::Interactive(i) => &self.interactive[i],
            Slot::Batch(i) => &self.batch[i],
        }
    }

    /// Every queued task, expired ones included, in service order at `now`. Starvation is checked
    /// per task rather than assumed to be a prefix of the batch queue, so a caller whose `now`
    /// goes backwards still gets a consistent order.
    fn service_order(&self, now: Instant) -> impl Iterator<Item = Slot> + '_ {
        let max_wait = self.config.batch_max_wait;
        let starved = self
            .batch
            .iter()
            .enumerate()
            .filter(move |(_, e)| is_starved(e, now, max_wait))
            .map(|(i, _)| Slot::Batch(i));
        let interactive = (0..self.interactive.len()).map(Slot::Interactive);
        let batch = self
            .batch
            .iter()
            .enumerate()
            .filter(move |(_, e)| !is_starved(e, now, max_wait))
            .map(|(i, _)| Slot::Batch(i));
        starved.chain(interactive).chain(batch)
    }
}

fn is_starved<T>(entry: &Entry<T>, now: Instant, max_wait: Duration) -> bool {
    now.saturating_duration_since(entry.enqueued_at) > max_wait
}

/// Converts without the u64 limit of `Duration::from_nanos`; saturates at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below one billion, so it fits a u32.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn queue(capacity: usize, full_policy: FullPolicy) -> AdmissionQueue<&'static str> {
        AdmissionQueue::new(AdmissionConfig {
            capacity,
            full_policy,
            batch_max_wait: secs(30),
        })
    }

    /// Pushes with a far deadline; panics (test only) if refused.
    fn admit(
        q: &mut AdmissionQueue<&'static str>,
        id: u64,
        priority: Priority,
        payload: &'static str,
        now: Instant,
    ) -> Admitted<&'static str> {
        q.push(TaskId(id), priority, now + HOUR, payload, now)
            .expect("push should be admitted")
    }

    fn drain(q: &mut AdmissionQueue<&'static str>, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| q.next_eligible(now, |_| true))
            .map(|(id, _)| id.0)
            .collect()
    }

    #[test]
    fn interactive_overtakes_batch() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        let admitted = admit(&mut q, 2, Priority::Interactive, "i", t0 + secs(1));
        assert_eq!(admitted.position, 0);
        assert_eq!(q.position(TaskId(1), t0 + secs(1)), Some(1));
        assert_eq!(drain(&mut q, t0 + secs(2)), vec![2, 1]);
    }

    #[test]
    fn remove_where_takes_only_the_selected_tasks_and_keeps_the_order_of_the_rest() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "gone", t0);
        admit(&mut q, 2, Priority::Batch, "stays", t0);
        admit(&mut q, 3, Priority::Interactive, "gone", t0);
        admit(&mut q, 4, Priority::Interactive, "stays", t0);
        admit(&mut q, 5, Priority::Interactive, "stays", t0);
        let removed: Vec<u64> = q
            .remove_where(|payload| *payload == "gone")
            .into_iter()
            .map(|(id, _)| id.0)
            .collect();
        assert_eq!(removed, vec![3, 1]);
        assert_eq!(q.len(), 3);
        assert_eq!(drain(&mut q, t0 + secs(1)), vec![4, 5, 2]);
    }

    #[test]
    fn tasks_of_one_class_are_served_in_arrival_order() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        for (n, id) in [10, 11, 12].into_iter().enumerate() {
            admit(&mut q, id, Priority::Batch, "b", t0 + secs(n as u64));
        }
        for (n, id) in [20, 21, 22].into_iter().enumerate() {
            admit(&mut q, id, Priority::Interactive, "i", t0 + secs(n as u64));
        }
        assert_eq!(drain(&mut q, t0 + secs(5)), vec![20, 21, 22, 10, 11, 12]);
    }

    #[test]
    fn starved_batch_task_is_served_before_queued_interactive_work() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "old batch", t0);
        admit(&mut q, 2, Priority::Batch, "young batch", t0 + secs(20));
        admit(&mut q, 3, Priority::Interactive, "i", t0 + secs(25));
        let later = t0 + secs(31);
        assert_eq!(q.position(TaskId(1), later), Some(0));
        assert_eq!(q.position(TaskId(3), later), Some(1));
        assert_eq!(q.position(TaskId(2), later), Some(2));
        assert_eq!(drain(&mut q, later), vec![1, 3, 2]);
    }

    #[test]
    fn batch_task_waiting_exactly_batch_max_wait_is_not_yet_starved() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        admit(&mut q, 2, Priority::Interactive, "i", t0);
        assert_eq!(q.position(TaskId(1), t0 + secs(30)), Some(1));
        assert_eq!(
            q.position(TaskId(1), t0 + secs(30) + Duration::from_nanos(1)),
            Some(0)
        );
    }

    #[test]
    fn starved_batch_tasks_keep_their_own_arrival_order() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        admit(&mut q, 2, Priority::Batch, "b", t0 + secs(1));
        admit(&mut q, 3, Priority::Interactive, "i", t0 + secs(2));
        assert_eq!(drain(&mut q, t0 + secs(60)), vec![1, 2, 3]);
    }

    #[test]
    fn full_queue_under_reject_refuses_with_retry_after_of_at_least_one_second() {
        let t0 = Instant::now();
        let mut q = queue(2, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        admit(&mut q, 2, Priority::Interactive, "i", t0);
        q.record_service(Duration::from_millis(10));
        let err = q
            .push(TaskId(3), Priority::Interactive, t0 + HOUR, "x", t0)
            .expect_err("a full queue refuses");
        assert_eq!(err.reason, RejectReason::QueueFull);
        assert_eq!(err.retry_after, secs(1));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn retry_after_follows_observed_service_times() {
        let t0 = Instant::now();
        let mut q = queue(1, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        q.record_service(secs(7));
        let err = q
            .push(TaskId(2), Priority::Batch, t0 + HOUR, "x", t0)
            .expect_err("a full queue refuses");
        assert_eq!(err.retry_after, secs(7));
    }

    #[test]
    fn drop_lru_evicts_the_oldest_batch_task_and_returns_it() {
        let t0 = Instant::now();
        let mut q = queue(3, FullPolicy::DropLru);
        admit(&mut q, 1, Priority::Interactive, "i", t0);
        admit(&mut q, 2, Priority::Batch, "oldest batch", t0 + secs(1));
        admit(&mut q, 3, Priority::Batch, "newer batch", t0 + secs(2));
        let admitted = admit(&mut q, 4, Priority::Interactive, "new", t0 + secs(3));
        assert_eq!(admitted.dropped, Some((TaskId(2), "oldest batch")));
        assert_eq!(admitted.position, 1);
        assert_eq!(q.len(), 3);
        assert_eq!(q.depth(), (2, 1));
        assert_eq!(drain(&mut q, t0 + secs(4)), vec![1, 4, 3]);
    }

    #[test]
    fn batch_push_under_drop_lru_evicts_the_oldest_batch_task() {
        let t0 = Instant::now();
        let mut q = queue(2, FullPolicy::DropLru);
        admit(&mut q, 1, Priority::Batch, "oldest", t0);
        admit(&mut q, 2, Priority::Batch, "newer", t0 + secs(1));
        let admitted = admit(&mut q, 3, Priority::Batch, "newest", t0 + secs(2));
        assert_eq!(admitted.dropped, Some((TaskId(1), "oldest")));
        assert_eq!(admitted.position, 1);
        assert_eq!(drain(&mut q, t0 + secs(3)), vec![2, 3]);
    }

    #[test]
    fn drop_lru_with_only_interactive_tasks_rejects() {
        let t0 = Instant::now();
        let mut q = queue(2, FullPolicy::DropLru);
        admit(&mut q, 1, Priority::Interactive, "i", t0);
        admit(&mut q, 2, Priority::Interactive, "i", t0);
        for priority in [Priority::Interactive, Priority::Batch] {
            let err = q
                .push(TaskId(3), priority, t0 + HOUR, "x", t0)
                .expect_err("nothing to evict");
            assert_eq!(err.reason, RejectReason::QueueFull);
            assert!(err.retry_after >= secs(1));
        }
        assert_eq!(q.depth(), (2, 0));
    }

    #[test]
    fn push_below_capacity_drops_nothing_under_drop_lru() {
        let t0 = Instant::now();
        let mut q = queue(2, FullPolicy::DropLru);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        let admitted = admit(&mut q, 2, Priority::Batch, "b", t0);
        assert_eq!(admitted.dropped, None);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn eligibility_skips_tasks_without_head_of_line_blocking() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Interactive, "busy-model", t0);
        admit(&mut q, 2, Priority::Interactive, "free-model", t0);
        admit(&mut q, 3, Priority::Batch, "free-model", t0);
        let mut seen = Vec::new();
        let got = q.next_eligible(t0, |model| {
            seen.push(*model);
            *model == "free-model"
        });
        assert_eq!(got, Some((TaskId(2), "free-model")));
        assert_eq!(seen, vec!["busy-model", "free-model"]);
        assert_eq!(
            q.next_eligible(t0, |m| *m == "free-model"),
            Some((TaskId(3), "free-model"))
        );
        assert_eq!(q.next_eligible(t0, |m| *m == "free-model"), None);
        // The skipped task kept its place at the head.
        assert_eq!(q.position(TaskId(1), t0), Some(0));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn nothing_eligible_leaves_the_queue_untouched() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Interactive, "a", t0);
        admit(&mut q, 2, Priority::Batch, "b", t0);
        assert_eq!(q.next_eligible(t0, |_| false), None);
        assert_eq!(drain(&mut q, t0), vec![1, 2]);
    }

    #[test]
    fn removed_task_leaves_the_queue_and_frees_its_place() {
        let t0 = Instant::now();
        let mut q = queue(2, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Interactive, "i", t0);
        admit(&mut q, 2, Priority::Batch, "b", t0);
        assert_eq!(q.remove(TaskId(1)), Some("i"));
        assert_eq!(q.remove(TaskId(1)), None);
        assert_eq!(q.position(TaskId(1), t0), None);
        assert_eq!(q.position(TaskId(2), t0), Some(0));
        admit(&mut q, 3, Priority::Interactive, "i2", t0);
        assert_eq!(q.remove(TaskId(2)), Some("b"));
        assert_eq!(drain(&mut q, t0), vec![3]);
        assert!(q.is_empty());
    }

    #[test]
    fn removing_an_unknown_task_changes_nothing() {
        let t0 = Instant::now();
        let mut q = queue(2, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        assert_eq!(q.remove(TaskId(99)), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn expire_returns_only_expired_tasks_in_queue_order() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        let push = |q: &mut AdmissionQueue<&'static str>, id, priority, deadline| {
            q.push(TaskId(id), priority, t0 + deadline, "x", t0)
                .expect("admitted")
        };
        push(&mut q, 1, Priority::Batch, secs(5));
        push(&mut q, 2, Priority::Interactive, secs(10));
        push(&mut q, 3, Priority::Batch, secs(100));
        push(&mut q, 4, Priority::Interactive, secs(5));
        push(&mut q, 5, Priority::Batch, secs(10));
        assert!(q.expire(t0 + secs(4)).is_empty());
        let expired: Vec<u64> = q.expire(t0 + secs(10)).iter().map(|(id, _)| id.0).collect();
        assert_eq!(expired, vec![2, 4, 1, 5]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.position(TaskId(3), t0 + secs(10)), Some(0));
        assert!(q.expire(t0 + secs(10)).is_empty());
    }

    #[test]
    fn expire_lists_starved_batch_tasks_first_like_service_order() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        q.push(TaskId(1), Priority::Batch, t0 + secs(40), "b", t0)
            .expect("admitted");
        q.push(TaskId(2), Priority::Interactive, t0 + secs(40), "i", t0)
            .expect("admitted");
        let expired: Vec<u64> = q.expire(t0 + secs(40)).iter().map(|(id, _)| id.0).collect();
        assert_eq!(expired, vec![1, 2]);
    }

    #[test]
    fn next_eligible_never_returns_an_expired_task() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        q.push(TaskId(1), Priority::Interactive, t0 + secs(5), "i", t0)
            .expect("admitted");
        q.push(TaskId(2), Priority::Batch, t0 + secs(50), "b", t0)
            .expect("admitted");
        let mut asked = 0;
        let got = q.next_eligible(t0 + secs(5), |_| {
            asked += 1;
            true
        });
        assert_eq!(got, Some((TaskId(2), "b")));
        assert_eq!(asked, 1, "the expired task is not even offered");
        assert_eq!(q.next_eligible(t0 + secs(5), |_| true), None);
        // It waits for expire, which reports it to the caller.
        assert_eq!(q.expire(t0 + secs(5)), vec![(TaskId(1), "i")]);
        assert!(q.is_empty());
    }

    #[test]
    fn expired_tasks_do_not_count_towards_positions() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        q.push(TaskId(1), Priority::Interactive, t0 + secs(5), "i", t0)
            .expect("admitted");
        admit(&mut q, 2, Priority::Interactive, "i", t0);
        assert_eq!(q.position(TaskId(2), t0), Some(1));
        assert_eq!(q.position(TaskId(2), t0 + secs(5)), Some(0));
        assert_eq!(q.position(TaskId(1), t0 + secs(5)), None);
    }

    #[test]
    fn next_deadline_is_the_earliest_queued_deadline() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        assert_eq!(q.next_deadline(), None);
        q.push(TaskId(1), Priority::Interactive, t0 + secs(9), "i", t0)
            .expect("admitted");
        q.push(TaskId(2), Priority::Batch, t0 + secs(3), "b", t0)
            .expect("admitted");
        assert_eq!(q.next_deadline(), Some(t0 + secs(3)));
        q.remove(TaskId(2));
        assert_eq!(q.next_deadline(), Some(t0 + secs(9)));
    }

    #[test]
    fn push_with_a_passed_deadline_is_rejected() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        let err = q
            .push(TaskId(1), Priority::Interactive, t0, "i", t0)
            .expect_err("deadline already reached");
        assert_eq!(err.reason, RejectReason::DeadlinePassed);
        assert!(q.is_empty());
    }

    #[test]
    fn dead_on_arrival_task_does_not_evict_a_batch_task() {
        let t0 = Instant::now();
        let mut q = queue(1, FullPolicy::DropLru);
        admit(&mut q, 1, Priority::Batch, "b", t0);
        let err = q
            .push(TaskId(2), Priority::Interactive, t0, "i", t0 + secs(1))
            .expect_err("deadline already passed");
        assert_eq!(err.reason, RejectReason::DeadlinePassed);
        assert_eq!(q.position(TaskId(1), t0 + secs(1)), Some(0));
    }

    #[test]
    fn duplicate_task_id_is_rejected() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        admit(&mut q, 1, Priority::Interactive, "first", t0);
        let err = q
            .push(TaskId(1), Priority::Batch, t0 + HOUR, "second", t0)
            .expect_err("id is taken");
        assert_eq!(err.reason, RejectReason::DuplicateTask);
        assert_eq!(q.remove(TaskId(1)), Some("first"));
    }

    #[test]
    fn capacity_zero_rejects_every_push() {
        let t0 = Instant::now();
        for policy in [FullPolicy::Reject, FullPolicy::DropLru] {
            let mut q = queue(0, policy);
            for priority in [Priority::Interactive, Priority::Batch] {
                let err = q
                    .push(TaskId(1), priority, t0 + HOUR, "x", t0)
                    .expect_err("no room at all");
                assert_eq!(err.reason, RejectReason::QueueFull);
                assert!(err.retry_after >= secs(1));
            }
            assert!(q.is_empty());
        }
    }

    #[test]
    fn admitted_reports_position_and_predicted_start() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        q.set_capacity_hint(2);
        q.record_service(secs(4));
        let a = admit(&mut q, 1, Priority::Batch, "b", t0);
        assert_eq!((a.position, a.predicted_start), (0, secs(4)));
        let b = admit(&mut q, 2, Priority::Batch, "b", t0);
        assert_eq!((b.position, b.predicted_start), (1, secs(4)));
        let c = admit(&mut q, 3, Priority::Batch, "b", t0);
        assert_eq!((c.position, c.predicted_start), (2, secs(8)));
        let d = admit(&mut q, 4, Priority::Interactive, "i", t0);
        assert_eq!((d.position, d.predicted_start), (0, secs(4)));
    }

    #[test]
    fn predictions_grow_with_position() {
        let mut q = queue(8, FullPolicy::Reject);
        q.set_capacity_hint(3);
        let predictions: Vec<Duration> = (0..10).map(|p| q.predict_start(p)).collect();
        assert!(predictions.windows(2).all(|w| w[0] <= w[1]));
        assert!(predictions[0] < predictions[9]);
        assert_eq!(predictions[0], secs(1));
        assert_eq!(predictions[2], secs(1));
        assert_eq!(predictions[3], secs(2));
        assert_eq!(predictions[9], secs(4));
    }

    #[test]
    fn predictions_use_a_one_second_prior_before_any_observation() {
        let q = queue(8, FullPolicy::Reject);
        assert_eq!(q.service_time(), secs(1));
        assert_eq!(q.predict_start(0), secs(1));
        assert_eq!(q.predict_start(1), secs(2));
    }

    #[test]
    fn predictions_follow_observed_service_times() {
        let mut q = queue(8, FullPolicy::Reject);
        q.record_service(secs(10));
        assert_eq!(
            q.service_time(),
            secs(10),
            "first observation replaces the prior"
        );
        assert_eq!(q.predict_start(0), secs(10));
        q.record_service(secs(20));
        assert_eq!(q.service_time(), secs(12));
        for _ in 0..100 {
            q.record_service(Duration::from_millis(500));
        }
        let settled = q.service_time();
        assert!(
            settled >= Duration::from_millis(500) && settled < Duration::from_millis(501),
            "{settled:?}"
        );
        assert_eq!(q.predict_start(3), settled * 4);
    }

    #[test]
    fn more_slots_shorten_predictions() {
        let mut q = queue(8, FullPolicy::Reject);
        q.record_service(secs(2));
        let one_slot = q.predict_start(7);
        q.set_capacity_hint(4);
        assert_eq!(one_slot, secs(16));
        assert_eq!(q.predict_start(7), secs(4));
    }

    #[test]
    fn zero_slot_hint_is_taken_as_one() {
        let mut q = queue(8, FullPolicy::Reject);
        q.set_capacity_hint(0);
        assert_eq!(q.predict_start(4), secs(5));
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let t0 = Instant::now();
        let mut q: AdmissionQueue<&'static str> = AdmissionQueue::new(AdmissionConfig {
            capacity: usize::MAX,
            full_policy: FullPolicy::DropLru,
            batch_max_wait: Duration::MAX,
        });
        q.record_service(Duration::MAX);
        q.record_service(Duration::MAX);
        assert_eq!(q.service_time(), Duration::MAX);
        assert_eq!(q.predict_start(usize::MAX), Duration::MAX);
        q.record_service(Duration::ZERO);
        assert!(q.predict_start(usize::MAX) <= Duration::MAX);
        q.set_capacity_hint(usize::MAX);
        assert_eq!(q.predict_start(usize::MAX - 1), q.service_time());
        // `now` going backwards neither panics nor starves anything.
        admit(&mut q, 1, Priority::Batch, "b", t0 + secs(10));
        admit(&mut q, 2, Priority::Interactive, "i", t0);
        assert_eq!(q.position(TaskId(2), t0), Some(0));
        assert_eq!(drain(&mut q, t0), vec![2, 1]);
        assert_eq!(q.next_eligible(t0, |_| true), None);
        assert!(q.expire(t0).is_empty());
    }

    #[test]
    fn zero_batch_max_wait_serves_waiting_batch_work_first() {
        let t0 = Instant::now();
        let mut q: AdmissionQueue<&'static str> = AdmissionQueue::new(AdmissionConfig {
            batch_max_wait: Duration::ZERO,
            ..AdmissionConfig::default()
        });
        admit(&mut q, 1, Priority::Batch, "b", t0);
        admit(&mut q, 2, Priority::Interactive, "i", t0);
        assert_eq!(q.position(TaskId(1), t0), Some(1));
        assert_eq!(drain(&mut q, t0 + Duration::from_nanos(1)), vec![1, 2]);
    }

    #[test]
    fn depth_counts_each_class() {
        let t0 = Instant::now();
        let mut q = queue(8, FullPolicy::Reject);
        assert!(q.is_empty());
        admit(&mut q, 1, Priority::Interactive, "i", t0);
        admit(&mut q, 2, Priority::Batch, "b", t0);
        admit(&mut q, 3, Priority::Batch, "b", t0);
        assert_eq!(q.depth(), (1, 2));
        assert_eq!(q.len(), 3);
        assert!(!q.is_empty());
    }

    #[test]
    fn default_config_is_256_reject_30_seconds() {
        let config = AdmissionConfig::default();
        assert_eq!(config.capacity, 256);
        assert_eq!(config.full_policy, FullPolicy::Reject);
        assert_eq!(config.batch_max_wait, secs(30));
    }

    #[test]
    fn priority_and_full_policy_use_their_wire_names() {
        let names = |v: serde_json::Value| v.to_string();
        assert_eq!(
            names(serde_json::json!([Priority::Interactive, Priority::Batch])),
            r#"["interactive","batch"]"#
        );
        assert_eq!(
            names(serde_json::json!([FullPolicy::Reject, FullPolicy::DropLru])),
            r#"["reject","drop-lru"]"#
        );
        let policy: FullPolicy = serde_json::from_str(r#""drop-lru""#).expect("valid name");
        assert_eq!(policy, FullPolicy::DropLru);
        let priority: Priority = serde_json::from_str(r#""batch""#).expect("valid name");
        assert_eq!(priority, Priority::Batch);
        assert!(serde_json::from_str::<FullPolicy>(r#""drop_lru""#).is_err());
    }

    #[test]
    fn task_id_displays_as_its_number() {
        assert_eq!(TaskId(42).to_string(), "42");
        assert!(TaskId(1) < TaskId(2));
    }

    #[test]
    fn rejection_message_names_the_reason() {
        let err = Rejected {
            reason: RejectReason::QueueFull,
            retry_after: secs(2),
        };
        assert_eq!(err.to_string(), "admission queue is full (retry after 2s)");
    }
}
