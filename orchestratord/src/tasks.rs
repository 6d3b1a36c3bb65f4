//! Native tasks (`/v2/tasks`): a task runs on its own once admitted, whether or not anyone
//! reads its events; its events are kept (bounded by the tokens it may generate) so a client
//! that connects to the event stream late, or twice, sees all of them in order. The store
//! forgets finished tasks after a while: each task joins a queue in the order tasks finish, and a
//! sweep pops only those whose time is up (no scan of the store).
//!
//! Event order is fixed: `queued`? → `started` → `token`* → `metrics`? → (`end` | `error`), and
//! nothing after `end` or `error`.
//!
//! A task nobody reads is not left to run for ever: the runner is told when no reader has been
//! attached for a grace period ([`TaskHandle::unattended_for`]) and cancels it.

use crate::error::ApiError;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How long a finished task stays visible.
pub const FINISHED_TASK_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

/// One server-sent event of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub name: &'static str,
    pub data: Value,
}

#[derive(Debug)]
struct TaskRecord {
    state: TaskState,
    events: Vec<TaskEvent>,
    finished_at: Option<Instant>,
    model: String,
    tokens_out: u32,
}

/// Finished tasks (when, id), in the order they finished: the store's expiry queue.
type Finished = Mutex<VecDeque<(Instant, String)>>;

/// A task as the store keeps it; the runner appends, readers follow.
#[derive(Debug)]
pub struct TaskHandle {
    id: String,
    record: Mutex<TaskRecord>,
    /// The store's expiry queue, which the task joins when it ends.
    finished: Arc<Finished>,
    changed: Notify,
    pub cancel: CancellationToken,
    /// How many clients are reading the task's events right now.
    readers: watch::Sender<usize>,
}

/// A client reading a task's events; dropping it (the client left) detaches it.
#[derive(Debug)]
pub struct Reader(Arc<TaskHandle>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0
            .readers
            .send_modify(|readers| *readers = readers.saturating_sub(1));
    }
}

fn lock(handle: &TaskHandle) -> MutexGuard<'_, TaskRecord> {
    // Every update leaves the record consistent, so a poisoned lock is still usable.
    handle
        .record
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TaskHandle {
    /// Appends an event unless the task already ended; `end` and `error` end it.
    pub fn push(&self, name: &'static str, data: Value) {
        let ended = {
            let mut record = lock(self);
            if record.finished_at.is_some() {
                return;
            }
            match name {
                "started" => record.state = TaskState::Running,
                "token" => record.tokens_out += 1,
                "end" => {
                    record.state = TaskState::Done;
                    record.finished_at = Some(Instant::now());
                }
                "error" => {
                    record.state = if data["code"] == "CANCELLED" {
                        TaskState::Cancelled
                    } else {
                        TaskState::Failed
                    };
                    record.finished_at = Some(Instant::now());
                }
                _ => {}
            }
            record.events.push(TaskEvent { name, data });
            record.finished_at
        };
        if let Some(at) = ended {
            // Tasks ending at the same moment may join a few microseconds out of order: one is
            // then forgotten that much later, never earlier.
            lock_finished(&self.finished).push_back((at, self.id.clone()));
        }
        self.changed.notify_waiters();
    }

    pub fn fail(&self, error: &ApiError) {
        self.push("error", error.envelope());
    }

    /// Counts a client reading the events until the returned [`Reader`] is dropped.
    pub fn attach(self: &Arc<Self>) -> Reader {
        self.readers.send_modify(|readers| *readers += 1);
        Reader(Arc::clone(self))
    }

    /// Completes once no reader has been attached for `grace` in a row (from now, or from when
    /// the last one left).
    pub async fn unattended_for(&self, grace: Duration) {
        let mut readers = self.readers.subscribe();
        loop {
            if *readers.borrow_and_update() == 0 {
                tokio::select! {
                    () = tokio::time::sleep(grace) => return,
                    changed = readers.changed() => if changed.is_err() { return },
                }
            } else if readers.changed().await.is_err() {
                return;
            }
        }
    }

    /// The events from `from` on, and whether the task has ended; waits for news when there
    /// is none yet.
    pub async fn events_from(&self, from: usize) -> (Vec<TaskEvent>, bool) {
        loop {
            let notified = self.changed.notified();
            {
                let record = lock(self);
                if record.events.len() > from || record.finished_at.is_some() {
                    let events = record.events.get(from..).unwrap_or_default().to_vec();
                    return (events, record.finished_at.is_some());
                }
            }
            notified.await;
        }
    }

    pub fn status(&self, id: &str) -> Value {
        let record = lock(self);
        json!({
            "task_id": id,
            "state": record.state,
            "model": record.model,
            "tokens_out": record.tokens_out,
        })
    }
}

fn lock_finished(finished: &Finished) -> MutexGuard<'_, VecDeque<(Instant, String)>> {
    // Pushes and pops leave the queue consistent, so a poisoned lock is still usable.
    finished
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every live or recently finished task, by id, and the finished ones in the order they
/// finished.
#[derive(Debug, Default)]
pub struct TaskStore {
    tasks: Mutex<HashMap<String, Arc<TaskHandle>>>,
    finished: Arc<Finished>,
}

impl TaskStore {
    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Arc<TaskHandle>>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn create(&self, id: &str, model: &str) -> Arc<TaskHandle> {
        let handle = Arc::new(TaskHandle {
            id: id.to_owned(),
            finished: Arc::clone(&self.finished),
            record: Mutex::new(TaskRecord {
                state: TaskState::Queued,
                events: Vec::new(),
                finished_at: None,
                model: model.to_owned(),
                tokens_out: 0,
            }),
            changed: Notify::new(),
            cancel: CancellationToken::new(),
            readers: watch::Sender::new(0),
        });
        self.tasks().insert(id.to_owned(), Arc::clone(&handle));
        handle
    }

    pub fn get(&self, id: &str) -> Option<Arc<TaskHandle>> {
        self.tasks().get(id).cloned()
    }

    /// Forgets tasks that finished [`FINISHED_TASK_TTL`] or longer before `now`, popping them
    /// off the expiry queue: the work is the number forgotten, whatever the store holds. Returns
    /// that number.
    pub fn sweep(&self, now: Instant) -> usize {
        let due: Vec<(Instant, String)> = {
            let mut finished = lock_finished(&self.finished);
            let mut due = Vec::new();
            while let Some((at, _)) = finished.front()
                && now.saturating_duration_since(*at) >= FINISHED_TASK_TTL
            {
                due.extend(finished.pop_front());
            }
            due
        };
        if due.is_empty() {
            return 0;
        }
        let mut tasks = self.tasks();
        for (at, id) in &due {
            // Only the task that finished then: ids are random, but a new task may take one.
            if tasks
                .get(id)
                .is_some_and(|handle| lock(handle).finished_at == Some(*at))
            {
                tasks.remove(id);
            }
        }
        due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_follows_end_or_error_and_late_readers_see_everything() {
        let store = TaskStore::default();
        let task = store.create("t1", "m");
        task.push("started", json!({}));
        task.push("token", json!({"t": "a", "i": 0}));
        task.push("end", json!({"tokens_out": 1}));
        task.push("token", json!({"t": "late", "i": 1}));
        task.fail(&ApiError::Cancelled);
        let (events, ended) = task.events_from(0).await;
        assert!(ended);
        let names: Vec<&str> = events.iter().map(|e| e.name).collect();
        assert_eq!(names, ["started", "token", "end"]);
        assert_eq!(task.status("t1")["state"], "done");
        assert_eq!(task.status("t1")["tokens_out"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_is_unattended_only_after_the_grace_with_no_reader() {
        let store = TaskStore::default();
        let task = store.create("t3", "m");
        let grace = Duration::from_secs(30);
        let reader = task.attach();
        let waiting = {
            let task = Arc::clone(&task);
            tokio::spawn(async move { task.unattended_for(grace).await })
        };
        tokio::time::sleep(grace * 2).await;
        assert!(!waiting.is_finished(), "a reader is attached");
        drop(reader);
        tokio::time::sleep(grace / 2).await;
        assert!(!waiting.is_finished(), "the grace has not passed");
        tokio::time::sleep(grace).await;
        waiting.await.unwrap();
    }

    #[test]
    fn a_sweep_forgets_only_tasks_finished_a_ttl_ago_and_looks_at_nothing_else() {
        let store = TaskStore::default();
        for i in 0..10_000 {
            store
                .create(&format!("running-{i}"), "m")
                .push("started", json!({}));
        }
        store.create("done", "m").push("end", json!({}));
        store.create("failed", "m").fail(&ApiError::Cancelled);
        store.create("dropped", "m").push("end", json!({}));
        store.tasks().remove("dropped");
        let between = Instant::now();
        while Instant::now() == between {
            std::hint::spin_loop();
        }
        store.create("later", "m").push("end", json!({}));
        assert_eq!(store.tasks().len(), 10_003);

        assert_eq!(store.sweep(between), 0, "nothing is due yet");
        assert_eq!(store.sweep(between + FINISHED_TASK_TTL / 2), 0);
        // Due: the three that finished by `between` (one already gone), and only they were
        // looked at; neither the 10,000 running tasks nor the one that finished later.
        assert_eq!(store.sweep(between + FINISHED_TASK_TTL), 3);
        assert!(store.get("done").is_none());
        assert!(store.get("failed").is_none());
        assert!(store.get("later").is_some());
        assert!(store.get("running-0").is_some());
        assert_eq!(store.tasks().len(), 10_001);
        assert_eq!(
            store.sweep(between + FINISHED_TASK_TTL),
            0,
            "each goes once"
        );

        // A running task joins the queue when it ends.
        let now = Instant::now();
        let running = store.get("running-7").unwrap();
        running.push("end", json!({}));
        assert_eq!(store.sweep(now + FINISHED_TASK_TTL * 2), 2);
        assert!(store.get("running-7").is_none());
        assert!(store.get("later").is_none());
        assert_eq!(store.tasks().len(), 9_999);
        assert!(lock_finished(&store.finished).is_empty());
    }

    #[tokio::test]
    async fn a_reader_waits_for_the_next_event() {
        let store = TaskStore::default();
        let task = store.create("t2", "m");
        let reader = {
            let task = Arc::clone(&task);
            tokio::spawn(async move { task.events_from(0).await })
        };
        tokio::task::yield_now().await;
        task.push("started", json!({}));
        let (events, ended) = reader.await.unwrap();
        assert_eq!(events.len(), 1);
        assert!(!ended);
    }
}
