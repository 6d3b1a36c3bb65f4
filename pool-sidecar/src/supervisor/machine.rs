//! What one engine's supervisor decides, apart from what it does: a plain state machine that
//! takes an [`Input`] (a probe answered, the engine exited, a timer fired, an operator's
//! command, pool-managerd stopping) at a [`Moment`] and returns the [`Effect`]s to carry out, in
//! order. It starts no process, sends no request, touches no file and reads no clock; the
//! supervisor task in [`engine`](super::engine) does all of that and feeds the results back.
//!
//! Invariants a change must keep:
//! - Every effect that is answered at once ([`Effect::Spawn`], [`Effect::Inspect`],
//!   [`Effect::Resume`]) is the last of its batch: its answer is the next input.
//! - Every [`Input::Command`] gets exactly one [`Effect::Answer`].
//! - The registry hears every state change as an [`EngineReport`]; the machine never reads
//!   registry state (a drain learns that the leases ended through [`Input::LeasesEnded`]).
//! - Input that belongs to an earlier phase (a probe answered after the engine was stopped) is
//!   ignored.
//! - An unload, for idleness or an operator, is a drain: the registry refuses new leases before
//!   the engine stops, so a lease granted while the machine decided is never cut short by it
//!   (the idle time is read from [`Input::Leases`], which may be late; the drain is not).
//!
//! On-demand pools (`load = "on-demand"`) begin Unloaded unless an engine was adopted; a
//! [`Command::Load`] starts the engine (the registry shows Loading until it is ready), and a
//! serving engine with no lease for `idle_unload` is unloaded again.

use super::process::LOG_TAIL_MARKER;
use super::restart::{RestartDecision, RestartTracker};
use crate::config::{LoadPolicy, ManagedEngine, PoolConfig, ReloadStrategy};
use crate::probe::EngineProps;
use crate::registry::{EngineReport, ProbeReport, UnloadReason};
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{Endpoint, PoolState};
use std::time::{Duration, Instant};

/// What the machine decides by, from the pool's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pool: String,
    /// The configured slots; otherwise the engine must report them.
    pub slots: Option<u32>,
    pub startup_timeout: Duration,
    pub probe_interval: Duration,
    pub liveness_failure_threshold: u32,
    pub reload_strategy: ReloadStrategy,
    pub reload_drain_deadline: Duration,
    /// The restart policy's window, for the circuit breaker's message.
    pub restart_window_ms: u64,
    pub load: LoadPolicy,
}

impl Settings {
    pub fn of(pool: &PoolConfig, engine: &ManagedEngine) -> Settings {
        Settings {
            pool: pool.id.to_string(),
            slots: pool.slots,
            startup_timeout: engine.startup_timeout(),
            probe_interval: pool.probe.interval(),
            liveness_failure_threshold: pool.probe.liveness_failure_threshold,
            reload_strategy: engine.reload.strategy,
            reload_drain_deadline: engine.reload.drain_deadline(),
            restart_window_ms: engine.restart.window_ms,
            load: pool.load,
        }
    }
}

/// When an input arrives: the monotonic time decisions are made by, the wall clock for what the
/// registry shows, and a random number for backoff jitter and reload generations.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub at: Instant,
    pub unix_ms: u64,
    pub random: u64,
}

impl Moment {
    /// The random number as a fraction in [0, 1).
    fn fraction(&self) -> f64 {
        (self.random >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Which of the pool's engine processes an input or effect is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The engine the pool serves from.
    Main,
    /// A reload's new engine while it starts beside the main one.
    Candidate,
    /// The engine a reload swapped out, until it is retired.
    Outgoing,
}

/// Which engine record file an effect is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFile {
    Main,
    /// The side record of a reload's generation.
    Side(u64),
}

/// An operator's command, without its reply channels (the runner keeps those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Drain {
        deadline: Duration,
        retiring: bool,
    },
    Reload {
        model_path: String,
    },
    Restart,
    /// Start an Unloaded pool's engine; a no-op where one runs or is on its way.
    Load,
    /// Drain an on-demand pool and stop its engine, leaving it Unloaded.
    Unload,
    /// Give up a load still under way (its engine starting or backing off after a failed
    /// start), leaving the pool Unloaded; a no-op once the engine serves.
    CancelLoad,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// pool-managerd is stopping.
    Shutdown,
    Command(Command),
    /// The answer to [`Effect::Spawn`]: the process runs.
    Spawned {
        which: Which,
        endpoint: Endpoint,
        pid: u32,
    },
    /// The answer to [`Effect::Spawn`]: no process.
    SpawnFailed {
        which: Which,
        reason: String,
    },
    /// The answer to [`Effect::Probe`].
    Probed {
        which: Which,
        report: ProbeReport,
    },
    /// The answer to [`Effect::Inspect`]: whether another process serves the engine's port, and
    /// what the engine says about itself (empty when the port is taken).
    Inspected {
        which: Which,
        port_taken: Option<String>,
        props: EngineProps,
    },
    /// The process exited on its own; `log_tail` is the end of its log (main engine only).
    Exited {
        which: Which,
        status: String,
        log_tail: String,
    },
    /// The draining pool holds no lease any more.
    LeasesEnded,
    /// Whether the pool holds leases now (on-demand pools with an idle time only; sent when it
    /// changes).
    Leases {
        held: bool,
    },
    /// [`Machine::next_wake`] came.
    Tick,
    /// The answer to [`Effect::Resume`].
    Resumed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start an engine process for `model_path`; answered by `Spawned` or `SpawnFailed`.
    Spawn {
        which: Which,
        model_path: String,
        generation: u64,
    },
    /// Probe the engine's health endpoint; answered by `Probed` whenever it completes.
    Probe(Which),
    /// Check who serves the engine's port and ask for its props; answered by `Inspected`.
    Inspect(Which),
    /// SIGTERM, grace, SIGKILL; then forget the process (a no-op for one that exited).
    Stop(Which),
    /// The candidate becomes the main engine, and the main engine the outgoing one.
    Promote,
    /// Stop the outgoing engine once no lease is left on the pool at `new_endpoint` (or at the
    /// reload's drain deadline, or at shutdown), then remove its side record; meanwhile the
    /// machine goes on.
    Retire {
        generation: u64,
        new_endpoint: Endpoint,
    },
    WriteRecord {
        file: RecordFile,
        which: Which,
        model_path: String,
        restarts: u32,
    },
    RemoveRecord(RecordFile),
    Report(EngineReport),
    RecordProbe(ProbeReport),
    /// Watch for the pool to show Draining with no lease; answered by `LeasesEnded`.
    WatchDrain,
    /// The reply to the command being handled.
    Answer(Result<(), IpcError>),
    /// Tell whoever took the pool out (a retiring drain) that its engine is gone.
    Retired,
    /// Answered at once by `Resumed`, with a fresh moment: what comes next depends on the time
    /// after the effects before it (a stop may take its whole grace).
    Resume,
}

/// A started engine as the machine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineAt {
    pub endpoint: Endpoint,
    pub pid: u32,
    pub since: Instant,
}

/// When the next probe is due; `None` while one is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProbeClock {
    due: Option<Instant>,
    sent: Instant,
}

impl ProbeClock {
    fn out_now(now: Instant) -> ProbeClock {
        ProbeClock {
            due: None,
            sent: now,
        }
    }

    fn due_at(at: Instant) -> ProbeClock {
        ProbeClock {
            due: Some(at),
            sent: at,
        }
    }

    /// Sends a probe if one is due.
    fn poll(&mut self, now: Instant) -> bool {
        if self.due.is_some_and(|due| due <= now) {
            *self = ProbeClock::out_now(now);
            return true;
        }
        false
    }
}

/// An operator's command that changes a running pool (loads and unloads are decided apart).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Operator {
    Drain { deadline: Duration, retiring: bool },
    Reload { model_path: String },
    Restart,
}

/// What a drain ends in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterDrain {
    /// The engine stops; `retiring` when pool-managerd takes the pool out.
    Stop { retiring: bool },
    /// A drain-first reload: the engine stops and `model_path` starts.
    Reload { model_path: String },
    /// The engine stops and the pool is Unloaded; unless a load came meanwhile
    /// (`load_again`), then it starts afresh.
    Unload {
        reason: UnloadReason,
        load_again: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Before [`Machine::begin`].
    Idle,
    /// The main engine is being launched.
    Spawning,
    /// The main engine runs and is probed until it is ready or `deadline` passes.
    Starting {
        deadline: Instant,
        probe: ProbeClock,
    },
    /// The main engine is ready; it is probed for liveness.
    Serving { probe: ProbeClock, unanswered: u32 },
    /// No new leases; the engine stops when the leases end or at `deadline`, `allowed` after
    /// the drain began.
    Draining {
        deadline: Instant,
        allowed: Duration,
        then: AfterDrain,
    },
    /// An overlap reload: the candidate starts beside the main engine, which serves on.
    Reloading {
        generation: u64,
        model_path: String,
        candidate: Option<EngineAt>,
        deadline: Instant,
        probe: ProbeClock,
    },
    /// The engine failed and is stopped; the next input decides the backoff.
    Failing {
        reason: String,
        since: Option<Instant>,
    },
    /// Waiting to start again after `reason`.
    BackingOff {
        until: Instant,
        until_unix_ms: u64,
        reason: String,
    },
    /// Stopped or Failed: nothing runs until an operator says so.
    Parked,
    /// An on-demand pool without an engine, until a load.
    Unloaded,
    /// The supervisor is done (pool-managerd is stopping).
    Done,
}

/// The state of one pool's supervisor.
#[derive(Debug)]
pub struct Machine {
    settings: Settings,
    phase: Phase,
    model_path: String,
    /// The model to go back to if a drain-first reload's new model never becomes ready.
    rollback_to: Option<String>,
    restarts: u32,
    started_once: bool,
    shutting_down: bool,
    tracker: RestartTracker,
    main: Option<EngineAt>,
    /// A load is under way: every start reports Loading first, until the engine is ready.
    loading: bool,
    /// Whether the pool holds leases, and since when it holds none (or serves, if later).
    leases_held: bool,
    idle_since: Option<Instant>,
    /// The backoff of a failed load that was then cancelled (`BackingOff` as it was): a load
    /// before it ends waits for it, so demand alone never loads faster than the restart policy.
    cancelled_backoff: Option<Phase>,
    /// The load under way came from demand (`Load`), not from an operator's restart, so it may
    /// be cancelled.
    load_cancellable: bool,
}

impl Machine {
    /// `restarts` and `started_once` carry over from an adopted engine's record.
    pub fn new(
        settings: Settings,
        tracker: RestartTracker,
        model_path: String,
        restarts: u32,
        started_once: bool,
    ) -> Machine {
        Machine {
            settings,
            phase: Phase::Idle,
            model_path,
            rollback_to: None,
            restarts,
            started_once,
            shutting_down: false,
            tracker,
            main: None,
            loading: false,
            leases_held: false,
            idle_since: None,
            cancelled_backoff: None,
            load_cancellable: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Serves an adopted engine, or starts one (an on-demand pool waits Unloaded for a load;
    /// the registry already shows it so).
    pub fn begin(&mut self, adopted: Option<EngineAt>, now: Moment) -> Vec<Effect> {
        let mut effects = Vec::new();
        match adopted {
            Some(engine) => {
                self.main = Some(engine);
                self.serve(now, &mut effects);
            }
            None if self.on_demand() => self.phase = Phase::Unloaded,
            None => self.start(&mut effects),
        }
        effects
    }

    fn on_demand(&self) -> bool {
        matches!(self.settings.load, LoadPolicy::OnDemand { .. })
    }

    /// When a serving on-demand pool without leases is unloaded for idleness.
    fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.settings.load.idle_unload()?;
        if self.leases_held {
            return None;
        }
        self.idle_since.map(|since| since + idle)
    }

    /// When the machine wants a [`Input::Tick`], if it waits for time at all.
    pub fn next_wake(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Starting { deadline, probe }
            | Phase::Reloading {
                deadline, probe, ..
            } => Some(probe.due.map_or(*deadline, |due| due.min(*deadline))),
            Phase::Serving { probe, .. } => match (probe.due, self.idle_deadline()) {
                (Some(due), Some(idle)) => Some(due.min(idle)),
                (due, idle) => due.or(idle),
            },
            Phase::Draining { deadline, .. } => Some(*deadline),
            Phase::BackingOff { until, .. } => Some(*until),
            Phase::Idle
            | Phase::Spawning
            | Phase::Failing { .. }
            | Phase::Parked
            | Phase::Unloaded
            | Phase::Done => None,
        }
    }

    pub fn on(&mut self, input: Input, now: Moment) -> Vec<Effect> {
        let mut effects = Vec::new();
        match input {
            Input::Shutdown => self.on_shutdown(now, &mut effects),
            Input::Command(command) => self.on_command(command, now, &mut effects),
            Input::Spawned {
                which,
                endpoint,
                pid,
            } => self.on_spawned(which, endpoint, pid, now, &mut effects),
            Input::SpawnFailed { which, reason } => match (which, &self.phase) {
                (Which::Main, Phase::Spawning) => self.start_failed(reason, &mut effects),
                (Which::Candidate, Phase::Reloading { .. }) => {
                    self.reload_failed(&reason, now, &mut effects);
                }
                _ => {}
            },
            Input::Probed { which, report } => self.on_probed(which, report, now, &mut effects),
            Input::Inspected {
                which,
                port_taken,
                props,
            } => self.on_inspected(which, port_taken, props, now, &mut effects),
            Input::Exited {
                which,
                status,
                log_tail,
            } => self.on_exited(which, status, log_tail, now, &mut effects),
            Input::LeasesEnded => {
                if matches!(self.phase, Phase::Draining { .. }) {
                    self.finish_drain(true, &mut effects);
                }
            }
            Input::Leases { held } => {
                if self.leases_held && !held {
                    self.idle_since = Some(now.at);
                }
                self.leases_held = held;
            }
            Input::Tick => self.on_tick(now, &mut effects),
            Input::Resumed => {
                if let Phase::Failing { reason, since } = &self.phase {
                    let ran_for = since.map_or(Duration::ZERO, |since| {
                        now.at.saturating_duration_since(since)
                    });
                    let reason = reason.clone();
                    self.back_off(reason, ran_for, now, &mut effects);
                }
            }
        }
        effects
    }

    fn pid(&self) -> u32 {
        self.main.as_ref().map_or(0, |engine| engine.pid)
    }

    fn start(&mut self, effects: &mut Vec<Effect>) {
        if self.shutting_down {
            self.phase = Phase::Done;
            return;
        }
        if self.started_once {
            self.restarts = self.restarts.saturating_add(1);
        }
        self.started_once = true;
        self.phase = Phase::Spawning;
        if self.loading {
            effects.push(Effect::Report(EngineReport::Loading));
        }
        effects.push(Effect::Spawn {
            which: Which::Main,
            model_path: self.model_path.clone(),
            generation: 0,
        });
    }

    fn on_spawned(
        &mut self,
        which: Which,
        endpoint: Endpoint,
        pid: u32,
        now: Moment,
        effects: &mut Vec<Effect>,
    ) {
        let engine = EngineAt {
            endpoint: endpoint.clone(),
            pid,
            since: now.at,
        };
        match (which, &mut self.phase) {
            (Which::Main, Phase::Spawning) => {
                self.main = Some(engine);
                effects.push(Effect::Report(EngineReport::Spawned {
                    endpoint,
                    restarts: self.restarts,
                }));
                effects.push(Effect::WriteRecord {
                    file: RecordFile::Main,
                    which: Which::Main,
                    model_path: self.model_path.clone(),
                    restarts: self.restarts,
                });
                self.phase = Phase::Starting {
                    deadline: now.at + self.settings.startup_timeout,
                    probe: ProbeClock::out_now(now.at),
                };
                effects.push(Effect::Probe(Which::Main));
            }
            (
                Which::Candidate,
                Phase::Reloading {
                    generation,
                    model_path,
                    candidate,
                    deadline,
                    probe,
                },
            ) => {
                *candidate = Some(engine);
                *deadline = now.at + self.settings.startup_timeout;
                *probe = ProbeClock::out_now(now.at);
                effects.push(Effect::WriteRecord {
                    file: RecordFile::Side(*generation),
                    which: Which::Candidate,
                    model_path: model_path.clone(),
                    restarts: self.restarts,
                });
                effects.push(Effect::Probe(Which::Candidate));
            }
            _ => {}
        }
    }

    fn on_probed(
        &mut self,
        which: Which,
        report: ProbeReport,
        now: Moment,
        effects: &mut Vec<Effect>,
    ) {
        let interval = self.settings.probe_interval;
        match (which, &mut self.phase) {
            (Which::Main, Phase::Starting { probe, .. }) if probe.due.is_none() => {
                if report.result.is_ok() {
                    effects.push(Effect::Inspect(Which::Main));
                } else {
                    *probe = ProbeClock::due_at(now.at + interval);
                }
            }
            (Which::Candidate, Phase::Reloading { probe, .. }) if probe.due.is_none() => {
                if report.result.is_ok() {
                    effects.push(Effect::Inspect(Which::Candidate));
                } else {
                    *probe = ProbeClock::due_at(now.at + interval);
                }
            }
            (Which::Main, Phase::Serving { probe, unanswered }) if probe.due.is_none() => {
                // As an interval ticker that delays missed ticks: every `interval` from the
                // last probe sent, at once when a probe took longer than that.
                *probe = ProbeClock::due_at((probe.sent + interval).max(now.at));
                *unanswered = if report.alive { 0 } else { *unanswered + 1 };
                let unanswered = *unanswered;
                let error = report.result.clone().err();
                effects.push(Effect::RecordProbe(report));
                if unanswered >= self.settings.liveness_failure_threshold {
                    let reason = format!(
                        "no answer to {unanswered} probes in a row ({})",
                        error.unwrap_or_default()
                    );
                    tracing::warn!(pool = %self.settings.pool, pid = self.pid(), %reason, "engine hung; restarting it");
                    effects.push(Effect::Stop(Which::Main));
                    effects.push(Effect::RemoveRecord(RecordFile::Main));
                    let since = self.main.take().map(|engine| engine.since);
                    self.fail(reason, since, effects);
                }
            }
            _ => {}
        }
    }

    fn on_inspected(
        &mut self,
        which: Which,
        port_taken: Option<String>,
        props: EngineProps,
        now: Moment,
        effects: &mut Vec<Effect>,
    ) {
        match (which, &self.phase) {
            (Which::Main, Phase::Starting { .. }) => {
                if let Some(taken) = port_taken {
                    return self.not_ready(taken, effects);
                }
                let Some(slots) = self.settings.slots.or(props.total_slots) else {
                    return self.not_ready(
                        "the engine does not report total_slots; set slots in the pool's config"
                            .into(),
                        effects,
                    );
                };
                tracing::info!(pool = %self.settings.pool, pid = self.pid(), slots, "engine ready");
                effects.push(Effect::Report(EngineReport::Ready {
                    slots: Some(slots),
                    engine_version: props.version,
                    at_unix_ms: now.unix_ms,
                }));
                self.rollback_to = None;
                self.loading = false;
                self.serve(now, effects);
            }
            (Which::Candidate, Phase::Reloading { .. }) => {
                if let Some(taken) = port_taken {
                    return self.candidate_failed(taken, now, effects);
                }
                let Phase::Reloading {
                    generation,
                    model_path,
                    candidate: Some(candidate),
                    ..
                } = &self.phase
                else {
                    return;
                };
                let (generation, model_path, candidate) =
                    (*generation, model_path.clone(), candidate.clone());
                tracing::info!(pool = %self.settings.pool, model = %model_path, pid = candidate.pid, "reloaded engine ready; swapping");
                effects.push(Effect::Report(EngineReport::Swapped {
                    endpoint: candidate.endpoint.clone(),
                    slots: self.settings.slots.or(props.total_slots),
                    engine_version: props.version,
                }));
                // The new engine becomes the main record; the old one's side record lives
                // until it is retired.
                let old_model = std::mem::replace(&mut self.model_path, model_path);
                effects.push(Effect::Promote);
                effects.push(Effect::WriteRecord {
                    file: RecordFile::Main,
                    which: Which::Main,
                    model_path: self.model_path.clone(),
                    restarts: self.restarts,
                });
                effects.push(Effect::WriteRecord {
                    file: RecordFile::Side(generation),
                    which: Which::Outgoing,
                    model_path: old_model,
                    restarts: self.restarts,
                });
                effects.push(Effect::Retire {
                    generation,
                    new_endpoint: candidate.endpoint.clone(),
                });
                self.main = Some(candidate);
                self.serve(now, effects);
            }
            _ => {}
        }
    }

    fn on_exited(
        &mut self,
        which: Which,
        status: String,
        log_tail: String,
        now: Moment,
        effects: &mut Vec<Effect>,
    ) {
        match (which, &self.phase) {
            (Which::Main, Phase::Starting { .. }) => {
                let reason = format!("{status} while starting{LOG_TAIL_MARKER}{log_tail}");
                self.not_ready(reason, effects);
            }
            (Which::Main, Phase::Serving { .. }) => {
                effects.push(Effect::RemoveRecord(RecordFile::Main));
                tracing::warn!(pool = %self.settings.pool, pid = self.pid(), reason = %status, "engine died");
                let since = self.main.take().map(|engine| engine.since);
                self.fail(
                    format!("{status}{LOG_TAIL_MARKER}{log_tail}"),
                    since,
                    effects,
                );
            }
            (Which::Main, Phase::Draining { .. }) => {
                tracing::warn!(pool = %self.settings.pool, reason = %status, "engine died while draining");
                self.finish_drain(true, effects);
            }
            (Which::Main, Phase::Reloading { .. }) => {
                let Phase::Reloading {
                    generation,
                    model_path,
                    ..
                } = &self.phase
                else {
                    return;
                };
                let (generation, model_path) = (*generation, model_path.clone());
                // The old engine died meanwhile: no new leases, then a restart on the new
                // model, which rolls back to the old one if it never becomes ready.
                effects.push(Effect::Report(EngineReport::Draining));
                tracing::warn!(pool = %self.settings.pool, reason = %status, "old engine died during a reload");
                effects.push(Effect::Stop(Which::Candidate));
                effects.push(Effect::RemoveRecord(RecordFile::Side(generation)));
                effects.push(Effect::RemoveRecord(RecordFile::Main));
                self.rollback_to = Some(std::mem::replace(&mut self.model_path, model_path));
                let since = self.main.take().map(|engine| engine.since);
                self.fail(status, since, effects);
            }
            (Which::Candidate, Phase::Reloading { .. }) => {
                self.candidate_failed(status, now, effects);
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Moment, effects: &mut Vec<Effect>) {
        let timeout_ms = self.settings.startup_timeout.as_millis();
        match &mut self.phase {
            Phase::Starting { deadline, probe } => {
                if now.at >= *deadline {
                    self.not_ready(format!("not ready within {timeout_ms} ms"), effects);
                } else if probe.poll(now.at) {
                    effects.push(Effect::Probe(Which::Main));
                }
            }
            Phase::Reloading {
                deadline, probe, ..
            } => {
                if now.at >= *deadline {
                    self.candidate_failed(
                        format!("not ready within {timeout_ms} ms"),
                        now,
                        effects,
                    );
                } else if probe.poll(now.at) {
                    effects.push(Effect::Probe(Which::Candidate));
                }
            }
            Phase::Serving { probe, .. } => {
                if probe.poll(now.at) {
                    effects.push(Effect::Probe(Which::Main));
                }
                if self.idle_deadline().is_some_and(|idle| idle <= now.at) {
                    tracing::info!(pool = %self.settings.pool, "no lease for the idle time; unloading");
                    self.unload(UnloadReason::Idle, now, effects);
                }
            }
            Phase::Draining {
                deadline, allowed, ..
            } => {
                if now.at >= *deadline {
                    tracing::warn!(pool = %self.settings.pool, deadline_ms = allowed.as_millis() as u64, "drain deadline passed with leases still live");
                    self.finish_drain(false, effects);
                }
            }
            Phase::BackingOff { until, .. } => {
                if now.at >= *until {
                    self.start(effects);
                }
            }
            Phase::Idle
            | Phase::Spawning
            | Phase::Failing { .. }
            | Phase::Parked
            | Phase::Unloaded
            | Phase::Done => {}
        }
    }

    fn on_shutdown(&mut self, now: Moment, effects: &mut Vec<Effect>) {
        self.shutting_down = true;
        match &self.phase {
            Phase::Starting { .. } => self.not_ready("pool-managerd is stopping".into(), effects),
            Phase::Serving { .. } => self.stop_for_good(effects),
            Phase::Draining { .. } => self.finish_drain(false, effects),
            Phase::Reloading { .. } => {
                self.candidate_failed("pool-managerd is stopping".into(), now, effects);
            }
            Phase::BackingOff { .. } | Phase::Parked | Phase::Unloaded => self.phase = Phase::Done,
            Phase::Idle | Phase::Spawning | Phase::Failing { .. } | Phase::Done => {}
        }
    }

    fn on_command(&mut self, command: Command, now: Moment, effects: &mut Vec<Effect>) {
        let command = match command {
            Command::Load => return self.on_load(now, effects),
            Command::Unload => return self.on_unload(now, effects),
            Command::CancelLoad => return self.on_cancel_load(effects),
            Command::Drain { deadline, retiring } => Operator::Drain { deadline, retiring },
            Command::Reload { model_path } => Operator::Reload { model_path },
            Command::Restart => Operator::Restart,
        };
        if self.phase == Phase::Unloaded {
            return self.while_unloaded(command, effects);
        }
        match &self.phase {
            Phase::Starting { .. } => {
                self.stop_main("interrupted by an operator while starting", effects);
                self.while_stopped(command, effects);
            }
            Phase::Serving { .. } => self.while_serving(command, now, effects),
            Phase::Draining { .. } => effects.push(Effect::Answer(Err(self.busy("draining")))),
            Phase::Reloading { .. } => effects.push(Effect::Answer(Err(self.busy("reloading")))),
            Phase::BackingOff { .. } | Phase::Parked => self.while_stopped(command, effects),
            Phase::Idle
            | Phase::Spawning
            | Phase::Failing { .. }
            | Phase::Unloaded
            | Phase::Done => {
                effects.push(Effect::Answer(Err(super::engine::supervisor_gone(
                    &self.settings.pool,
                ))));
            }
        }
    }

    /// A load: an Unloaded pool starts its engine; one that serves, starts or backs off (its
    /// retry is the load) has nothing to do; a stopped or failed pool waits for an operator,
    /// so demand alone cannot undo a drain or defeat the circuit breaker.
    fn on_load(&mut self, now: Moment, effects: &mut Vec<Effect>) {
        let answer = match &mut self.phase {
            Phase::Unloaded => {
                effects.push(Effect::Answer(Ok(())));
                self.load_cancellable = true;
                if let Some(Phase::BackingOff {
                    until,
                    until_unix_ms,
                    reason,
                }) = self.cancelled_backoff.take()
                    && until > now.at
                {
                    tracing::info!(pool = %self.settings.pool, "the last load failed; this one waits for its backoff");
                    self.loading = true;
                    effects.push(Effect::Report(EngineReport::Down {
                        reason: reason.clone(),
                        state: PoolState::BackingOff { until_unix_ms },
                    }));
                    self.phase = Phase::BackingOff {
                        until,
                        until_unix_ms,
                        reason,
                    };
                    return;
                }
                return self.load(effects);
            }
            Phase::Draining {
                then: AfterDrain::Unload { load_again, .. },
                ..
            } => {
                *load_again = true;
                self.load_cancellable = true;
                Ok(())
            }
            Phase::Spawning
            | Phase::Starting { .. }
            | Phase::Serving { .. }
            | Phase::Reloading { .. }
            | Phase::BackingOff { .. } => Ok(()),
            Phase::Draining { .. } => Err(self.busy("draining")),
            Phase::Parked => Err(IpcError::new(
                ErrorCode::NotReady,
                format!(
                    "pool {:?} is stopped or failed; `pool-managerd restart` brings it back",
                    self.settings.pool
                ),
            )),
            Phase::Idle | Phase::Failing { .. } | Phase::Done => {
                Err(super::engine::supervisor_gone(&self.settings.pool))
            }
        };
        effects.push(Effect::Answer(answer));
    }

    /// An operator's unload: a serving engine is drained first, one still starting or backing
    /// off is given up at once.
    fn on_unload(&mut self, now: Moment, effects: &mut Vec<Effect>) {
        if !self.on_demand() {
            return effects.push(Effect::Answer(Err(IpcError::new(
                ErrorCode::Unsupported,
                format!(
                    "pool {:?} is load = \"always\" and is never unloaded; drain it to stop it",
                    self.settings.pool
                ),
            ))));
        }
        match &self.phase {
            Phase::Serving { .. } => {
                effects.push(Effect::Answer(Ok(())));
                self.unload(UnloadReason::Operator, now, effects);
            }
            Phase::Starting { .. } => {
                effects.push(Effect::Answer(Ok(())));
                self.stop_main("unloaded by an operator while loading", effects);
                self.unloaded(UnloadReason::Operator, effects);
            }
            Phase::BackingOff { .. } | Phase::Parked => {
                effects.push(Effect::Answer(Ok(())));
                self.unloaded(UnloadReason::Operator, effects);
            }
            Phase::Unloaded
            | Phase::Draining {
                then: AfterDrain::Unload { .. },
                ..
            } => effects.push(Effect::Answer(Ok(()))),
            Phase::Draining { .. } => effects.push(Effect::Answer(Err(self.busy("draining")))),
            Phase::Reloading { .. } => {
                effects.push(Effect::Answer(Err(self.busy("reloading"))));
            }
            Phase::Idle | Phase::Spawning | Phase::Failing { .. } | Phase::Done => {
                effects.push(Effect::Answer(Err(super::engine::supervisor_gone(
                    &self.settings.pool,
                ))));
            }
        }
    }

    /// A load nobody waits for any more: an engine still starting is stopped, a retry after a
    /// failed start is not made (its backoff still holds for the next load), a load asked for
    /// while the pool was unloading is not made; an engine that serves (the load is done) is
    /// left alone, as is an operator's restart of an unloaded pool.
    fn on_cancel_load(&mut self, effects: &mut Vec<Effect>) {
        effects.push(Effect::Answer(Ok(())));
        if let Phase::Draining {
            then: AfterDrain::Unload { load_again, .. },
            ..
        } = &mut self.phase
        {
            // A load asked for while the pool was unloading: not any more.
            *load_again = false;
            return;
        }
        if !self.loading || !self.load_cancellable {
            return;
        }
        match self.phase {
            Phase::Starting { .. } => {
                self.stop_main("load cancelled: nobody waits for it", effects);
                self.unloaded(UnloadReason::Cancelled, effects);
            }
            Phase::BackingOff { .. } => {
                self.cancelled_backoff = Some(self.phase.clone());
                self.unloaded(UnloadReason::Cancelled, effects);
            }
            _ => {}
        }
    }

    /// An operator's drain, reload or restart while Unloaded: a restart loads, a reload
    /// changes the model the next load starts, a drain stops the pool (or retires it).
    fn while_unloaded(&mut self, command: Operator, effects: &mut Vec<Effect>) {
        match command {
            Operator::Restart => {
                effects.push(Effect::Answer(Ok(())));
                self.cancelled_backoff = None;
                self.load_cancellable = false;
                self.load(effects);
            }
            Operator::Reload { model_path } => {
                effects.push(Effect::Answer(Ok(())));
                // Another model: the last one's failed load says nothing about it.
                self.cancelled_backoff = None;
                self.model_path = model_path;
            }
            command => self.while_stopped(command, effects),
        }
    }

    /// Starts the engine of an Unloaded pool.
    fn load(&mut self, effects: &mut Vec<Effect>) {
        tracing::info!(pool = %self.settings.pool, model = %self.model_path, "loading");
        self.loading = true;
        self.start(effects);
    }

    /// Drains the serving engine, then stops it and leaves the pool Unloaded.
    fn unload(&mut self, reason: UnloadReason, now: Moment, effects: &mut Vec<Effect>) {
        let deadline = self.settings.reload_drain_deadline;
        let then = AfterDrain::Unload {
            reason,
            load_again: false,
        };
        self.drain(deadline, then, now, effects);
    }

    /// No engine runs any more: the pool is Unloaded, and its next start is a load, not a
    /// restart.
    fn unloaded(&mut self, reason: UnloadReason, effects: &mut Vec<Effect>) {
        self.loading = false;
        self.started_once = false;
        if self.shutting_down {
            effects.push(Effect::Report(EngineReport::Down {
                reason: "pool-managerd is stopping".into(),
                state: PoolState::Stopped,
            }));
            self.phase = Phase::Done;
            return;
        }
        tracing::info!(pool = %self.settings.pool, reason = reason.name(), "unloaded");
        effects.push(Effect::Report(EngineReport::Unloaded { reason }));
        self.phase = Phase::Unloaded;
    }

    /// The error for a command that cannot be carried out while the pool is busy with another.
    fn busy(&self, busy_with: &str) -> IpcError {
        IpcError::new(
            ErrorCode::NotReady,
            format!(
                "pool {:?} is {busy_with}; try again when that is done",
                self.settings.pool
            ),
        )
    }

    fn while_serving(&mut self, command: Operator, now: Moment, effects: &mut Vec<Effect>) {
        effects.push(Effect::Answer(Ok(())));
        match command {
            Operator::Drain { deadline, retiring } => {
                self.drain(deadline, AfterDrain::Stop { retiring }, now, effects);
            }
            Operator::Restart => {
                self.tracker.reset();
                // No lease may go to an engine that is being stopped.
                effects.push(Effect::Report(EngineReport::Down {
                    reason: "restarted by an operator".into(),
                    state: PoolState::Starting,
                }));
                self.stop_main("restarted by an operator", effects);
                self.start(effects);
            }
            Operator::Reload { model_path } => match self.settings.reload_strategy {
                ReloadStrategy::Overlap => {
                    // Unique per reload, also across sidecar restarts: never the path a live
                    // engine uses.
                    let generation = (now.random & u64::from(u32::MAX)) + 1;
                    self.phase = Phase::Reloading {
                        generation,
                        model_path: model_path.clone(),
                        candidate: None,
                        deadline: now.at + self.settings.startup_timeout,
                        probe: ProbeClock::out_now(now.at),
                    };
                    effects.push(Effect::Spawn {
                        which: Which::Candidate,
                        model_path,
                        generation,
                    });
                }
                ReloadStrategy::DrainFirst => {
                    let deadline = self.settings.reload_drain_deadline;
                    self.drain(deadline, AfterDrain::Reload { model_path }, now, effects);
                }
            },
        }
    }

    /// An operator's command while no engine runs (backing off, failed, stopped).
    fn while_stopped(&mut self, command: Operator, effects: &mut Vec<Effect>) {
        effects.push(Effect::Answer(Ok(())));
        match command {
            Operator::Restart => {
                self.tracker.reset();
                self.start(effects);
            }
            Operator::Reload { model_path } => {
                self.model_path = model_path;
                self.tracker.reset();
                self.start(effects);
            }
            Operator::Drain { retiring: true, .. } => {
                effects.push(Effect::Retired);
                self.park();
            }
            Operator::Drain { .. } => {
                effects.push(Effect::Report(EngineReport::Down {
                    reason: "drained by an operator".into(),
                    state: PoolState::Stopped,
                }));
                self.park();
            }
        }
    }

    fn park(&mut self) {
        self.loading = false;
        self.phase = if self.shutting_down {
            Phase::Done
        } else {
            Phase::Parked
        };
    }

    /// Serves the main engine; its first probe is an interval away.
    fn serve(&mut self, now: Moment, effects: &mut Vec<Effect>) {
        if self.shutting_down {
            return self.stop_for_good(effects);
        }
        self.phase = Phase::Serving {
            probe: ProbeClock::due_at(now.at + self.settings.probe_interval),
            unanswered: 0,
        };
        self.idle_since = Some(now.at);
    }

    /// Stops the main engine and removes its record.
    fn stop_main(&mut self, why: &str, effects: &mut Vec<Effect>) {
        tracing::info!(pool = %self.settings.pool, pid = self.pid(), why, "stopping engine");
        effects.push(Effect::Stop(Which::Main));
        effects.push(Effect::RemoveRecord(RecordFile::Main));
        self.main = None;
    }

    fn stop_for_good(&mut self, effects: &mut Vec<Effect>) {
        let why = "pool-managerd is stopping";
        self.stop_main(why, effects);
        effects.push(Effect::Report(EngineReport::Down {
            reason: why.to_owned(),
            state: PoolState::Stopped,
        }));
        self.phase = Phase::Done;
    }

    /// A starting main engine will not become ready: it is stopped, and started again (or
    /// rolled back, or backed off).
    fn not_ready(&mut self, reason: String, effects: &mut Vec<Effect>) {
        effects.push(Effect::Stop(Which::Main));
        effects.push(Effect::RemoveRecord(RecordFile::Main));
        self.main = None;
        if self.shutting_down {
            effects.push(Effect::Report(EngineReport::Down {
                reason: "pool-managerd is stopping".into(),
                state: PoolState::Stopped,
            }));
            self.phase = Phase::Done;
            return;
        }
        self.start_failed(reason, effects);
    }

    fn start_failed(&mut self, reason: String, effects: &mut Vec<Effect>) {
        if let Some(previous) = self.rollback_to.take() {
            let failed = std::mem::replace(&mut self.model_path, previous);
            effects.push(Effect::Report(EngineReport::Note {
                error: format!(
                    "reload to {failed} failed ({reason}); rolling back to {}",
                    self.model_path
                ),
            }));
            return self.start(effects);
        }
        self.fail(reason, None, effects);
    }

    /// The engine that started at `since` (never, for `None`) failed; once the effects so far
    /// are carried out, the backoff is decided.
    fn fail(&mut self, reason: String, since: Option<Instant>, effects: &mut Vec<Effect>) {
        self.phase = Phase::Failing { reason, since };
        effects.push(Effect::Resume);
    }

    fn back_off(
        &mut self,
        reason: String,
        ran_for: Duration,
        now: Moment,
        effects: &mut Vec<Effect>,
    ) {
        match self.tracker.on_failure(now.at, ran_for, now.fraction()) {
            RestartDecision::After(delay) => {
                let until_unix_ms =
                    now.unix_ms + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(pool = %self.settings.pool, %reason, retry_in_ms = delay.as_millis() as u64, "engine failed; backing off");
                effects.push(Effect::Report(EngineReport::Down {
                    reason: reason.clone(),
                    state: PoolState::BackingOff { until_unix_ms },
                }));
                self.phase = if self.shutting_down {
                    Phase::Done
                } else {
                    Phase::BackingOff {
                        until: now.at + delay,
                        until_unix_ms,
                        reason,
                    }
                };
            }
            RestartDecision::GiveUp { restarts_in_window } => {
                let reason = format!(
                    "{reason}; {restarts_in_window} restarts within {} s: giving up until an operator restarts the pool",
                    self.settings.restart_window_ms / 1000
                );
                tracing::error!(pool = %self.settings.pool, %reason, "engine failed for good");
                effects.push(Effect::Report(EngineReport::Down {
                    reason,
                    state: PoolState::Failed,
                }));
                self.park();
            }
        }
    }

    fn drain(
        &mut self,
        allowed: Duration,
        then: AfterDrain,
        now: Moment,
        effects: &mut Vec<Effect>,
    ) {
        effects.push(Effect::Report(EngineReport::Draining));
        effects.push(Effect::WatchDrain);
        self.phase = Phase::Draining {
            deadline: now.at + allowed,
            allowed,
            then,
        };
    }

    /// The drain is over: `clean` when the leases ended (or the engine died) before the
    /// deadline.
    fn finish_drain(&mut self, clean: bool, effects: &mut Vec<Effect>) {
        let Phase::Draining { then, .. } = &self.phase else {
            return;
        };
        match then.clone() {
            AfterDrain::Stop { retiring } => {
                let why = match (clean, retiring) {
                    (true, false) => "drained by an operator",
                    (false, false) => "drained by an operator (deadline passed)",
                    (true, true) => "taken out by a config reload",
                    (false, true) => "taken out by a config reload (drain deadline passed)",
                };
                self.stop_main(why, effects);
                if retiring {
                    effects.push(Effect::Retired);
                } else {
                    effects.push(Effect::Report(EngineReport::Down {
                        reason: why.to_owned(),
                        state: PoolState::Stopped,
                    }));
                }
                self.park();
            }
            AfterDrain::Reload { model_path } => {
                self.stop_main("reloading", effects);
                self.rollback_to = Some(std::mem::replace(&mut self.model_path, model_path));
                self.start(effects);
            }
            AfterDrain::Unload { reason, load_again } => {
                let why = match (reason, clean) {
                    (UnloadReason::Idle, _) => "idle",
                    (UnloadReason::Cancelled, _) => "load cancelled",
                    (UnloadReason::Operator, true) => "unloaded by an operator",
                    (UnloadReason::Operator, false) => {
                        "unloaded by an operator (drain deadline passed)"
                    }
                };
                self.stop_main(why, effects);
                if load_again && !self.shutting_down {
                    self.started_once = false;
                    self.load(effects);
                } else {
                    self.unloaded(reason, effects);
                }
            }
        }
    }

    /// An overlap reload's candidate will not serve: it is stopped and the main engine serves
    /// on.
    fn candidate_failed(&mut self, reason: String, now: Moment, effects: &mut Vec<Effect>) {
        let Phase::Reloading { generation, .. } = self.phase else {
            return;
        };
        effects.push(Effect::Stop(Which::Candidate));
        effects.push(Effect::RemoveRecord(RecordFile::Side(generation)));
        self.reload_failed(&reason, now, effects);
    }

    fn reload_failed(&mut self, reason: &str, now: Moment, effects: &mut Vec<Effect>) {
        let Phase::Reloading { model_path, .. } = &self.phase else {
            return;
        };
        tracing::warn!(pool = %self.settings.pool, model = %model_path, %reason, "reload failed; the old engine serves on");
        effects.push(Effect::Report(EngineReport::Note {
            error: format!(
                "reload to {model_path} failed ({reason}); still serving {}",
                self.model_path
            ),
        }));
        self.serve(now, effects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AbandonedLoad, RestartPolicy};

    const M1: &str = "/m/one.gguf";
    const M2: &str = "/m/two.gguf";

    fn settings() -> Settings {
        Settings {
            pool: "a".into(),
            slots: Some(2),
            startup_timeout: Duration::from_secs(10),
            probe_interval: Duration::from_secs(1),
            liveness_failure_threshold: 3,
            reload_strategy: ReloadStrategy::Overlap,
            reload_drain_deadline: Duration::from_secs(60),
            restart_window_ms: 600_000,
            load: LoadPolicy::Always,
        }
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial_ms: 1000,
            max_ms: 8000,
            multiplier: 2.0,
            jitter: 0.0,
            reset_after_ms: 60_000,
            max_restarts: 3,
            window_ms: 600_000,
        }
    }

    /// A machine and a clock that only moves when a test says so.
    struct Rig {
        machine: Machine,
        start: Instant,
        now_ms: u64,
        random: u64,
    }

    impl Rig {
        fn new() -> Rig {
            Rig::with(settings(), policy())
        }

        fn with(settings: Settings, policy: RestartPolicy) -> Rig {
            Rig {
                machine: Machine::new(settings, RestartTracker::new(policy), M1.into(), 0, false),
                start: Instant::now(),
                now_ms: 0,
                random: 1 << 63,
            }
        }

        fn moment(&self) -> Moment {
            Moment {
                at: self.at(self.now_ms),
                unix_ms: 1_000_000 + self.now_ms,
                random: self.random,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.start + Duration::from_millis(ms)
        }

        fn advance_to(&mut self, ms: u64) {
            self.now_ms = ms;
        }

        fn on(&mut self, input: Input) -> Vec<Effect> {
            let now = self.moment();
            self.machine.on(input, now)
        }

        fn begin(&mut self) -> Vec<Effect> {
            let now = self.moment();
            self.machine.begin(None, now)
        }

        /// Moves the clock to the machine's next wake and ticks.
        fn wake(&mut self) -> Vec<Effect> {
            let wake = self
                .machine
                .next_wake()
                .expect("the machine waits for a time");
            self.now_ms = u64::try_from((wake - self.start).as_millis()).unwrap();
            self.on(Input::Tick)
        }

        fn spawned(&mut self, which: Which, n: u32) -> Vec<Effect> {
            self.on(Input::Spawned {
                which,
                endpoint: endpoint(n),
                pid: 100 + n,
            })
        }

        fn probed(&mut self, which: Which, report: ProbeReport) -> Vec<Effect> {
            self.on(Input::Probed { which, report })
        }

        fn inspected(&mut self, which: Which) -> Vec<Effect> {
            self.on(Input::Inspected {
                which,
                port_taken: None,
                props: EngineProps {
                    total_slots: Some(4),
                    version: Some("b1".into()),
                },
            })
        }

        fn exited(&mut self, which: Which, status: &str) -> Vec<Effect> {
            self.on(Input::Exited {
                which,
                status: status.into(),
                log_tail: "load failed | bye".into(),
            })
        }

        fn command(&mut self, command: Command) -> Vec<Effect> {
            self.on(Input::Command(command))
        }

        /// Starts the main engine (endpoint 1) and has it pass its first probe.
        fn serving(&mut self) {
            assert_eq!(
                self.begin(),
                [spawn(Which::Main, M1, 0)],
                "a fresh pool starts its engine"
            );
            self.spawned(Which::Main, 1);
            assert_eq!(
                self.probed(Which::Main, ready()),
                [Effect::Inspect(Which::Main)]
            );
            self.inspected(Which::Main);
            assert!(matches!(self.machine.phase, Phase::Serving { .. }));
        }
    }

    fn endpoint(n: u32) -> Endpoint {
        Endpoint::Unix {
            path: format!("/run/e{n}.sock"),
        }
    }

    fn spawn(which: Which, model_path: &str, generation: u64) -> Effect {
        Effect::Spawn {
            which,
            model_path: model_path.into(),
            generation,
        }
    }

    fn report(alive: bool, ready: bool) -> ProbeReport {
        ProbeReport {
            at_unix_ms: 5,
            result: if ready {
                Ok(())
            } else {
                Err("/health: connection refused".into())
            },
            alive,
            engine_version: None,
        }
    }

    fn ready() -> ProbeReport {
        report(true, true)
    }

    fn loading() -> ProbeReport {
        report(true, false)
    }

    fn silent() -> ProbeReport {
        report(false, false)
    }

    fn down(reason: &str, state: PoolState) -> Effect {
        Effect::Report(EngineReport::Down {
            reason: reason.into(),
            state,
        })
    }

    fn backing_off(reason: &str, until_unix_ms: u64) -> Effect {
        down(reason, PoolState::BackingOff { until_unix_ms })
    }

    fn note(error: &str) -> Effect {
        Effect::Report(EngineReport::Note {
            error: error.into(),
        })
    }

    fn stopped_main() -> [Effect; 2] {
        [
            Effect::Stop(Which::Main),
            Effect::RemoveRecord(RecordFile::Main),
        ]
    }

    fn concat<const N: usize>(parts: [&[Effect]; N]) -> Vec<Effect> {
        parts.concat()
    }

    #[test]
    fn a_started_engine_is_probed_until_ready_then_reported_ready_and_probed_every_interval() {
        let mut rig = Rig::new();
        assert_eq!(rig.begin(), [spawn(Which::Main, M1, 0)]);
        assert_eq!(
            rig.spawned(Which::Main, 1),
            [
                Effect::Report(EngineReport::Spawned {
                    endpoint: endpoint(1),
                    restarts: 0
                }),
                Effect::WriteRecord {
                    file: RecordFile::Main,
                    which: Which::Main,
                    model_path: M1.into(),
                    restarts: 0
                },
                Effect::Probe(Which::Main),
            ]
        );
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(10_000)),
            "the deadline"
        );
        rig.advance_to(300);
        assert_eq!(rig.probed(Which::Main, loading()), []);
        assert_eq!(rig.machine.next_wake(), Some(rig.at(1300)));
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        assert_eq!(
            rig.probed(Which::Main, ready()),
            [Effect::Inspect(Which::Main)]
        );
        assert_eq!(
            rig.inspected(Which::Main),
            [Effect::Report(EngineReport::Ready {
                slots: Some(2),
                engine_version: Some("b1".into()),
                at_unix_ms: 1_001_300,
            })],
            "the configured slots win over the engine's"
        );
        assert_eq!(rig.machine.next_wake(), Some(rig.at(2300)));
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        rig.advance_to(2400);
        assert_eq!(
            rig.probed(Which::Main, ready()),
            [Effect::RecordProbe(ready())]
        );
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(3300)),
            "every interval from the last probe sent"
        );
    }

    #[test]
    fn an_engine_that_reports_no_slots_where_none_are_configured_never_becomes_ready() {
        let mut rig = Rig::with(
            Settings {
                slots: None,
                ..settings()
            },
            policy(),
        );
        rig.begin();
        rig.spawned(Which::Main, 1);
        rig.probed(Which::Main, ready());
        let effects = rig.on(Input::Inspected {
            which: Which::Main,
            port_taken: None,
            props: EngineProps::default(),
        });
        assert_eq!(effects, concat([&stopped_main(), &[Effect::Resume]]));
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off(
                "the engine does not report total_slots; set slots in the pool's config",
                1_001_000
            )]
        );
    }

    #[test]
    fn an_engine_whose_port_another_process_serves_is_started_again() {
        let mut rig = Rig::new();
        rig.begin();
        rig.spawned(Which::Main, 1);
        rig.probed(Which::Main, ready());
        let taken = "port 4000 is served by another process, not the engine; starting again on another port";
        let effects = rig.on(Input::Inspected {
            which: Which::Main,
            port_taken: Some(taken.into()),
            props: EngineProps::default(),
        });
        assert_eq!(effects, concat([&stopped_main(), &[Effect::Resume]]));
        assert_eq!(rig.on(Input::Resumed), [backing_off(taken, 1_001_000)]);
    }

    #[test]
    fn a_start_that_is_not_ready_by_its_deadline_is_stopped_and_backed_off() {
        let mut rig = Rig::new();
        rig.begin();
        rig.spawned(Which::Main, 1);
        for _ in 0..9 {
            rig.probed(Which::Main, loading());
            assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        }
        rig.advance_to(9_500);
        rig.probed(Which::Main, loading());
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(10_000)),
            "the deadline comes before the next probe"
        );
        assert_eq!(rig.wake(), concat([&stopped_main(), &[Effect::Resume]]));
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off("not ready within 10000 ms", 1_011_000)]
        );
    }

    #[test]
    fn serving_probes_reach_the_registry_and_unanswered_ones_in_a_row_restart_the_engine() {
        let mut rig = Rig::new();
        rig.serving();
        for _ in 0..2 {
            assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
            assert_eq!(
                rig.probed(Which::Main, silent()),
                [Effect::RecordProbe(silent())]
            );
        }
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        assert_eq!(
            rig.probed(Which::Main, silent()),
            concat([
                &[Effect::RecordProbe(silent())],
                &stopped_main(),
                &[Effect::Resume]
            ])
        );
        rig.advance_to(3_200);
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off(
                "no answer to 3 probes in a row (/health: connection refused)",
                1_004_200
            )]
        );
        assert_eq!(rig.wake(), [spawn(Which::Main, M1, 0)]);
        assert!(matches!(
            rig.spawned(Which::Main, 2)[0],
            Effect::Report(EngineReport::Spawned { restarts: 1, .. })
        ));
    }

    #[test]
    fn an_answer_of_any_status_proves_the_engine_alive() {
        let mut rig = Rig::new();
        rig.serving();
        for report in [silent(), silent(), loading(), silent(), silent()] {
            rig.wake();
            assert_eq!(
                rig.probed(Which::Main, report.clone()),
                [Effect::RecordProbe(report)],
                "a 503 resets the count of unanswered probes"
            );
        }
    }

    #[test]
    fn an_engine_that_keeps_exiting_while_starting_backs_off_with_doubling_delays_then_fails_for_good()
     {
        let mut rig = Rig::new();
        rig.begin();
        let reason = "exited with status 3 while starting; last output: load failed | bye";
        for (restarts, delay_ms) in [(0, 1000), (1, 2000), (2, 4000)] {
            assert!(matches!(
                rig.spawned(Which::Main, 1)[0],
                Effect::Report(EngineReport::Spawned { restarts: r, .. }) if r == restarts
            ));
            assert_eq!(
                rig.exited(Which::Main, "exited with status 3"),
                concat([&stopped_main(), &[Effect::Resume]])
            );
            let now = rig.now_ms;
            assert_eq!(
                rig.on(Input::Resumed),
                [backing_off(reason, 1_000_000 + now + delay_ms)]
            );
            assert_eq!(rig.machine.next_wake(), Some(rig.at(now + delay_ms)));
            assert_eq!(rig.wake(), [spawn(Which::Main, M1, 0)]);
        }
        rig.spawned(Which::Main, 1);
        rig.exited(Which::Main, "exited with status 3");
        assert_eq!(
            rig.on(Input::Resumed),
            [down(
                &format!(
                    "{reason}; 3 restarts within 600 s: giving up until an operator restarts the pool"
                ),
                PoolState::Failed
            )]
        );
        assert_eq!(
            rig.machine.next_wake(),
            None,
            "Failed waits for an operator"
        );
        assert_eq!(
            rig.command(Command::Restart),
            [Effect::Answer(Ok(())), spawn(Which::Main, M1, 0)]
        );
        rig.spawned(Which::Main, 1);
        rig.exited(Which::Main, "exited with status 3");
        let now = rig.now_ms;
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off(reason, 1_000_000 + now + 1000)],
            "an operator's restart forgets the history"
        );
    }

    #[test]
    fn jitter_spreads_the_backoff_within_its_bounds() {
        let jittery = RestartPolicy {
            jitter: 0.2,
            ..policy()
        };
        for (random, low, high) in [(0, 800, 800), (u64::MAX, 1199, 1200), (1 << 63, 1000, 1000)] {
            let mut rig = Rig::with(settings(), jittery.clone());
            rig.random = random;
            rig.begin();
            rig.spawned(Which::Main, 1);
            rig.exited(Which::Main, "exited with status 1");
            rig.on(Input::Resumed);
            let wake = rig.machine.next_wake().unwrap() - rig.start;
            assert!(
                (low..=high).contains(&wake.as_millis()),
                "{random}: {wake:?} not within {low}..={high} ms"
            );
        }
    }

    #[test]
    fn a_long_healthy_run_resets_the_backoff_delay() {
        let mut rig = Rig::new();
        rig.begin();
        rig.spawned(Which::Main, 1);
        rig.exited(Which::Main, "exited with status 1");
        rig.on(Input::Resumed);
        rig.wake();
        rig.spawned(Which::Main, 1);
        rig.exited(Which::Main, "exited with status 1");
        rig.on(Input::Resumed);
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(rig.now_ms + 2000)),
            "the second failure in a row waits twice as long"
        );
        rig.wake();
        rig.spawned(Which::Main, 1);
        rig.probed(Which::Main, ready());
        rig.inspected(Which::Main);
        rig.advance_to(rig.now_ms + 61_000);
        assert_eq!(
            rig.exited(Which::Main, "killed by signal SIGSEGV"),
            [Effect::RemoveRecord(RecordFile::Main), Effect::Resume]
        );
        let now = rig.now_ms;
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off(
                "killed by signal SIGSEGV; last output: load failed | bye",
                1_000_000 + now + 1000
            )]
        );
    }

    #[test]
    fn a_drain_waits_for_the_leases_to_end_then_stops_the_engine() {
        let mut rig = Rig::new();
        rig.serving();
        let drain = Command::Drain {
            deadline: Duration::from_secs(30),
            retiring: false,
        };
        assert_eq!(
            rig.command(drain.clone()),
            [
                Effect::Answer(Ok(())),
                Effect::Report(EngineReport::Draining),
                Effect::WatchDrain
            ]
        );
        assert_eq!(rig.machine.next_wake(), Some(rig.at(30_000)));
        assert_eq!(
            rig.command(Command::Restart),
            [Effect::Answer(Err(IpcError::new(
                ErrorCode::NotReady,
                "pool \"a\" is draining; try again when that is done"
            )))]
        );
        assert_eq!(
            rig.probed(Which::Main, silent()),
            [],
            "a probe sent before the drain is stale"
        );
        rig.advance_to(12_000);
        assert_eq!(
            rig.on(Input::LeasesEnded),
            concat([
                &stopped_main(),
                &[down("drained by an operator", PoolState::Stopped)]
            ])
        );
        assert_eq!(rig.machine.phase, Phase::Parked);
        assert_eq!(
            rig.command(drain),
            [
                Effect::Answer(Ok(())),
                down("drained by an operator", PoolState::Stopped)
            ],
            "draining a stopped pool is done at once"
        );
    }

    #[test]
    fn a_drain_whose_deadline_passes_stops_the_engine_anyway() {
        let mut rig = Rig::new();
        rig.serving();
        rig.command(Command::Drain {
            deadline: Duration::from_secs(30),
            retiring: false,
        });
        assert_eq!(
            rig.wake(),
            concat([
                &stopped_main(),
                &[down(
                    "drained by an operator (deadline passed)",
                    PoolState::Stopped
                )]
            ])
        );
        assert_eq!(rig.now_ms, 30_000);
    }

    #[test]
    fn a_retiring_drain_leaves_the_pool_draining_and_says_when_the_engine_is_gone() {
        let mut rig = Rig::new();
        rig.serving();
        rig.command(Command::Drain {
            deadline: Duration::from_secs(30),
            retiring: true,
        });
        assert_eq!(
            rig.exited(Which::Main, "exited with status 0"),
            concat([&stopped_main(), &[Effect::Retired]]),
            "an engine that dies while draining has drained"
        );
        assert_eq!(rig.machine.phase, Phase::Parked);
    }

    #[test]
    fn an_overlap_reload_swaps_to_the_new_engine_once_it_is_ready() {
        let mut rig = Rig::new();
        rig.serving();
        rig.random = 41;
        assert_eq!(
            rig.command(Command::Reload {
                model_path: M2.into()
            }),
            [Effect::Answer(Ok(())), spawn(Which::Candidate, M2, 42)]
        );
        assert_eq!(
            rig.spawned(Which::Candidate, 2),
            [
                Effect::WriteRecord {
                    file: RecordFile::Side(42),
                    which: Which::Candidate,
                    model_path: M2.into(),
                    restarts: 0
                },
                Effect::Probe(Which::Candidate)
            ]
        );
        assert_eq!(
            rig.command(Command::Restart),
            [Effect::Answer(Err(IpcError::new(
                ErrorCode::NotReady,
                "pool \"a\" is reloading; try again when that is done"
            )))]
        );
        rig.probed(Which::Candidate, loading());
        assert_eq!(rig.wake(), [Effect::Probe(Which::Candidate)]);
        assert_eq!(
            rig.probed(Which::Candidate, ready()),
            [Effect::Inspect(Which::Candidate)]
        );
        assert_eq!(
            rig.inspected(Which::Candidate),
            [
                Effect::Report(EngineReport::Swapped {
                    endpoint: endpoint(2),
                    slots: Some(2),
                    engine_version: Some("b1".into())
                }),
                Effect::Promote,
                Effect::WriteRecord {
                    file: RecordFile::Main,
                    which: Which::Main,
                    model_path: M2.into(),
                    restarts: 0
                },
                Effect::WriteRecord {
                    file: RecordFile::Side(42),
                    which: Which::Outgoing,
                    model_path: M1.into(),
                    restarts: 0
                },
                Effect::Retire {
                    generation: 42,
                    new_endpoint: endpoint(2)
                },
            ]
        );
        assert_eq!(rig.machine.model_path, M2);
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        assert_eq!(rig.machine.pid(), 102, "the new engine is the main one");
    }

    #[test]
    fn an_overlap_reload_whose_engine_never_becomes_ready_is_rolled_back_and_the_old_one_serves_on()
    {
        let mut rig = Rig::new();
        rig.serving();
        rig.random = 6;
        rig.command(Command::Reload {
            model_path: M2.into(),
        });
        rig.spawned(Which::Candidate, 2);
        rig.probed(Which::Candidate, loading());
        assert_eq!(rig.wake(), [Effect::Probe(Which::Candidate)]);
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(10_000)),
            "a probe is out: the deadline"
        );
        assert_eq!(
            rig.wake(),
            [
                Effect::Stop(Which::Candidate),
                Effect::RemoveRecord(RecordFile::Side(7)),
                note(&format!(
                    "reload to {M2} failed (not ready within 10000 ms); still serving {M1}"
                )),
            ]
        );
        assert!(matches!(rig.machine.phase, Phase::Serving { .. }));
        assert_eq!(rig.machine.model_path, M1);
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);

        rig.command(Command::Reload {
            model_path: M2.into(),
        });
        rig.spawned(Which::Candidate, 3);
        assert_eq!(
            rig.exited(Which::Candidate, "exited with status 1"),
            [
                Effect::Stop(Which::Candidate),
                Effect::RemoveRecord(RecordFile::Side(7)),
                note(&format!(
                    "reload to {M2} failed (exited with status 1); still serving {M1}"
                )),
            ],
            "a candidate that exits is no reason to restart the old engine"
        );
    }

    #[test]
    fn the_old_engine_dying_during_an_overlap_reload_starts_the_new_model_and_rolls_back_if_it_fails()
     {
        let mut rig = Rig::new();
        rig.serving();
        rig.random = 6;
        rig.command(Command::Reload {
            model_path: M2.into(),
        });
        rig.spawned(Which::Candidate, 2);
        assert_eq!(
            rig.exited(Which::Main, "killed by signal SIGKILL"),
            [
                Effect::Report(EngineReport::Draining),
                Effect::Stop(Which::Candidate),
                Effect::RemoveRecord(RecordFile::Side(7)),
                Effect::RemoveRecord(RecordFile::Main),
                Effect::Resume
            ]
        );
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off("killed by signal SIGKILL", 1_001_000)]
        );
        assert_eq!(rig.wake(), [spawn(Which::Main, M2, 0)]);
        rig.spawned(Which::Main, 3);
        assert_eq!(
            rig.exited(Which::Main, "exited with status 2"),
            concat([
                &stopped_main(),
                &[
                    note(&format!(
                        "reload to {M2} failed (exited with status 2 while starting; last output: load failed | bye); rolling back to {M1}"
                    )),
                    spawn(Which::Main, M1, 0)
                ]
            ])
        );
    }

    #[test]
    fn a_drain_first_reload_stops_the_old_engine_first_and_rolls_back_if_the_new_one_never_gets_ready()
     {
        let mut rig = Rig::with(
            Settings {
                reload_strategy: ReloadStrategy::DrainFirst,
                ..settings()
            },
            policy(),
        );
        rig.serving();
        assert_eq!(
            rig.command(Command::Reload {
                model_path: M2.into()
            }),
            [
                Effect::Answer(Ok(())),
                Effect::Report(EngineReport::Draining),
                Effect::WatchDrain
            ]
        );
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(60_000)),
            "the reload's drain deadline"
        );
        assert_eq!(
            rig.on(Input::LeasesEnded),
            concat([&stopped_main(), &[spawn(Which::Main, M2, 0)]])
        );
        rig.spawned(Which::Main, 2);
        rig.advance_to(10_000);
        assert_eq!(
            rig.on(Input::Tick),
            concat([
                &stopped_main(),
                &[
                    note(&format!(
                        "reload to {M2} failed (not ready within 10000 ms); rolling back to {M1}"
                    )),
                    spawn(Which::Main, M1, 0)
                ]
            ])
        );
        rig.spawned(Which::Main, 3);
        rig.probed(Which::Main, ready());
        rig.inspected(Which::Main);
        assert_eq!(rig.machine.model_path, M1);
        assert_eq!(rig.machine.rollback_to, None);
    }

    #[test]
    fn an_operator_command_while_starting_interrupts_the_start() {
        let mut rig = Rig::new();
        rig.begin();
        rig.spawned(Which::Main, 1);
        assert_eq!(
            rig.command(Command::Restart),
            concat([
                &stopped_main(),
                &[Effect::Answer(Ok(())), spawn(Which::Main, M1, 0)]
            ])
        );
        rig.spawned(Which::Main, 2);
        assert_eq!(
            rig.command(Command::Drain {
                deadline: Duration::from_secs(5),
                retiring: false
            }),
            concat([
                &stopped_main(),
                &[
                    Effect::Answer(Ok(())),
                    down("drained by an operator", PoolState::Stopped)
                ]
            ])
        );
        assert_eq!(
            rig.command(Command::Reload {
                model_path: M2.into()
            }),
            [Effect::Answer(Ok(())), spawn(Which::Main, M2, 0)],
            "a reload of a stopped pool starts the new model"
        );
    }

    #[test]
    fn an_operator_restart_of_a_serving_engine_takes_its_leases_away_before_stopping_it() {
        let mut rig = Rig::new();
        rig.serving();
        assert_eq!(
            rig.command(Command::Restart),
            concat([
                &[
                    Effect::Answer(Ok(())),
                    down("restarted by an operator", PoolState::Starting)
                ],
                &stopped_main(),
                &[spawn(Which::Main, M1, 0)]
            ])
        );
    }

    #[test]
    fn an_engine_that_cannot_be_launched_backs_off() {
        let mut rig = Rig::new();
        rig.begin();
        assert_eq!(
            rig.on(Input::SpawnFailed {
                which: Which::Main,
                reason: "cannot start \"nope\": No such file or directory".into()
            }),
            [Effect::Resume]
        );
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off(
                "cannot start \"nope\": No such file or directory",
                1_001_000
            )]
        );
    }

    #[test]
    fn shutdown_while_starting_stops_the_engine_and_shows_the_pool_stopped() {
        let mut rig = Rig::new();
        rig.begin();
        rig.spawned(Which::Main, 1);
        assert_eq!(
            rig.on(Input::Shutdown),
            concat([
                &stopped_main(),
                &[down("pool-managerd is stopping", PoolState::Stopped)]
            ])
        );
        assert!(rig.machine.is_done());
    }

    #[test]
    fn shutdown_while_serving_stops_the_engine_and_shows_the_pool_stopped() {
        let mut rig = Rig::new();
        rig.serving();
        assert_eq!(
            rig.on(Input::Shutdown),
            concat([
                &stopped_main(),
                &[down("pool-managerd is stopping", PoolState::Stopped)]
            ])
        );
        assert!(rig.machine.is_done());
    }

    #[test]
    fn shutdown_while_draining_ends_the_drain_at_once() {
        let mut rig = Rig::new();
        rig.serving();
        rig.command(Command::Drain {
            deadline: Duration::from_secs(30),
            retiring: false,
        });
        assert_eq!(
            rig.on(Input::Shutdown),
            concat([
                &stopped_main(),
                &[down(
                    "drained by an operator (deadline passed)",
                    PoolState::Stopped
                )]
            ])
        );
        assert!(rig.machine.is_done());
    }

    #[test]
    fn shutdown_during_a_drain_first_reload_starts_nothing() {
        let mut rig = Rig::with(
            Settings {
                reload_strategy: ReloadStrategy::DrainFirst,
                ..settings()
            },
            policy(),
        );
        rig.serving();
        rig.command(Command::Reload {
            model_path: M2.into(),
        });
        assert_eq!(rig.on(Input::Shutdown), stopped_main());
        assert!(rig.machine.is_done());
    }

    #[test]
    fn shutdown_while_reloading_stops_both_engines() {
        let mut rig = Rig::new();
        rig.serving();
        rig.random = 6;
        rig.command(Command::Reload {
            model_path: M2.into(),
        });
        rig.spawned(Which::Candidate, 2);
        assert_eq!(
            rig.on(Input::Shutdown),
            concat([
                &[
                    Effect::Stop(Which::Candidate),
                    Effect::RemoveRecord(RecordFile::Side(7)),
                    note(&format!(
                        "reload to {M2} failed (pool-managerd is stopping); still serving {M1}"
                    ))
                ],
                &stopped_main(),
                &[down("pool-managerd is stopping", PoolState::Stopped)]
            ])
        );
        assert!(rig.machine.is_done());
    }

    #[test]
    fn shutdown_while_backing_off_or_parked_has_nothing_to_stop() {
        let mut rig = Rig::new();
        rig.begin();
        rig.spawned(Which::Main, 1);
        rig.exited(Which::Main, "exited with status 1");
        rig.on(Input::Resumed);
        assert_eq!(rig.on(Input::Shutdown), []);
        assert!(rig.machine.is_done());

        let mut rig = Rig::new();
        rig.serving();
        rig.command(Command::Drain {
            deadline: Duration::ZERO,
            retiring: false,
        });
        rig.on(Input::LeasesEnded);
        assert_eq!(rig.on(Input::Shutdown), []);
        assert!(rig.machine.is_done());
    }

    #[test]
    fn shutdown_before_the_start_starts_nothing_but_stops_an_adopted_engine() {
        let mut rig = Rig::new();
        assert_eq!(rig.on(Input::Shutdown), []);
        assert_eq!(rig.begin(), []);
        assert!(rig.machine.is_done());

        let mut rig = Rig::new();
        rig.on(Input::Shutdown);
        let adopted = EngineAt {
            endpoint: endpoint(1),
            pid: 7,
            since: rig.start,
        };
        let now = rig.moment();
        assert_eq!(
            rig.machine.begin(Some(adopted), now),
            concat([
                &stopped_main(),
                &[down("pool-managerd is stopping", PoolState::Stopped)]
            ])
        );
    }

    #[test]
    fn an_adopted_engine_is_served_and_probed_an_interval_later() {
        let mut rig = Rig::new();
        let adopted = EngineAt {
            endpoint: endpoint(1),
            pid: 7,
            since: rig.start,
        };
        let now = rig.moment();
        assert_eq!(rig.machine.begin(Some(adopted), now), []);
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        assert_eq!(rig.now_ms, 1000);
    }

    // -- On-demand pools ----------------------------------------------------------------------

    const IDLE_MS: u64 = 300;

    fn on_demand_rig() -> Rig {
        Rig::with(
            Settings {
                load: LoadPolicy::OnDemand {
                    idle_unload: Some(Duration::from_millis(IDLE_MS)),
                    abandoned: AbandonedLoad::Cancel,
                },
                ..settings()
            },
            policy(),
        )
    }

    fn unloaded(reason: UnloadReason) -> Effect {
        Effect::Report(EngineReport::Unloaded { reason })
    }

    fn loading_report() -> Effect {
        Effect::Report(EngineReport::Loading)
    }

    fn draining() -> [Effect; 2] {
        [Effect::Report(EngineReport::Draining), Effect::WatchDrain]
    }

    impl Rig {
        /// Loads an Unloaded on-demand pool (endpoint `n`) until it serves.
        fn loaded(&mut self, n: u32) {
            assert_eq!(
                self.command(Command::Load),
                [
                    Effect::Answer(Ok(())),
                    loading_report(),
                    spawn(Which::Main, M1, 0)
                ]
            );
            let spawned = self.spawned(Which::Main, n);
            assert!(
                matches!(
                    spawned[0],
                    Effect::Report(EngineReport::Spawned { restarts: 0, .. })
                ),
                "a load is not a restart: {spawned:?}"
            );
            self.probed(Which::Main, ready());
            assert!(matches!(
                self.inspected(Which::Main)[..],
                [Effect::Report(EngineReport::Ready { .. })]
            ));
            assert!(matches!(self.machine.phase, Phase::Serving { .. }));
        }
    }

    #[test]
    fn an_on_demand_pool_begins_unloaded_and_starts_nothing_until_a_load() {
        let mut rig = on_demand_rig();
        assert_eq!(rig.begin(), []);
        assert_eq!(rig.machine.phase, Phase::Unloaded);
        assert_eq!(rig.machine.next_wake(), None, "nothing to wait for");
        rig.loaded(1);
    }

    #[test]
    fn an_adopted_engine_of_an_on_demand_pool_serves_at_once() {
        let mut rig = on_demand_rig();
        let now = rig.moment();
        let adopted = EngineAt {
            endpoint: endpoint(1),
            pid: 101,
            since: now.at,
        };
        assert_eq!(rig.machine.begin(Some(adopted), now), []);
        assert!(matches!(rig.machine.phase, Phase::Serving { .. }));
    }

    #[test]
    fn a_load_of_a_pool_that_serves_or_is_loading_is_answered_and_changes_nothing() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.spawned(Which::Main, 1);
        assert_eq!(rig.command(Command::Load), [Effect::Answer(Ok(()))]);
        assert!(matches!(rig.machine.phase, Phase::Starting { .. }));
        rig.probed(Which::Main, ready());
        rig.inspected(Which::Main);
        assert_eq!(rig.command(Command::Load), [Effect::Answer(Ok(()))]);
        assert!(matches!(rig.machine.phase, Phase::Serving { .. }));
    }

    #[test]
    fn a_serving_on_demand_pool_without_leases_is_drained_then_unloaded_after_its_idle_time() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.loaded(1);
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(IDLE_MS)),
            "the idle time ends before the first probe"
        );
        assert_eq!(rig.wake(), draining(), "no new lease once it is decided");
        assert_eq!(
            rig.on(Input::LeasesEnded),
            concat([&stopped_main(), &[unloaded(UnloadReason::Idle)]])
        );
        assert_eq!(rig.machine.phase, Phase::Unloaded);
        rig.loaded(2);
    }

    #[test]
    fn held_leases_keep_an_on_demand_pool_loaded_and_the_idle_time_counts_from_the_last_release() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.loaded(1);
        rig.advance_to(100);
        assert_eq!(rig.on(Input::Leases { held: true }), []);
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(1_000)),
            "only the probe is due while leases are held"
        );
        assert_eq!(rig.wake(), [Effect::Probe(Which::Main)]);
        rig.advance_to(1_500);
        assert_eq!(rig.on(Input::Leases { held: false }), []);
        assert_eq!(rig.machine.next_wake(), Some(rig.at(1_500 + IDLE_MS)));
        assert_eq!(rig.wake(), draining());
    }

    #[test]
    fn an_on_demand_pool_with_no_idle_time_is_never_unloaded_for_idleness() {
        let mut rig = Rig::with(
            Settings {
                load: LoadPolicy::OnDemand {
                    idle_unload: None,
                    abandoned: AbandonedLoad::Cancel,
                },
                ..settings()
            },
            policy(),
        );
        rig.begin();
        rig.loaded(1);
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(1_000)),
            "the probe only"
        );
    }

    #[test]
    fn an_operators_unload_waits_for_the_leases_to_end_then_stops_the_engine() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.loaded(1);
        rig.on(Input::Leases { held: true });
        assert_eq!(
            rig.command(Command::Unload),
            concat([&[Effect::Answer(Ok(()))], &draining()])
        );
        assert_eq!(
            rig.command(Command::Unload),
            [Effect::Answer(Ok(()))],
            "a second unload joins the first"
        );
        assert_eq!(
            rig.machine.next_wake(),
            Some(rig.at(60_000)),
            "the drain deadline"
        );
        assert_eq!(
            rig.on(Input::LeasesEnded),
            concat([&stopped_main(), &[unloaded(UnloadReason::Operator)]])
        );
        assert_eq!(rig.machine.phase, Phase::Unloaded);
    }

    #[test]
    fn an_unload_whose_leases_outlive_the_drain_deadline_stops_the_engine_anyway() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.loaded(1);
        rig.command(Command::Unload);
        assert_eq!(
            rig.wake(),
            concat([&stopped_main(), &[unloaded(UnloadReason::Operator)]])
        );
    }

    #[test]
    fn a_load_during_an_unloads_drain_loads_again_once_the_engine_is_stopped() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.loaded(1);
        rig.wake();
        assert_eq!(rig.command(Command::Load), [Effect::Answer(Ok(()))]);
        assert_eq!(
            rig.on(Input::LeasesEnded),
            concat([
                &stopped_main(),
                &[loading_report(), spawn(Which::Main, M1, 0)]
            ])
        );
    }

    #[test]
    fn a_load_asked_for_during_an_unload_and_then_cancelled_is_not_made() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.loaded(1);
        rig.wake();
        rig.command(Command::Load);
        assert_eq!(rig.command(Command::CancelLoad), [Effect::Answer(Ok(()))]);
        assert_eq!(
            rig.on(Input::LeasesEnded),
            concat([&stopped_main(), &[unloaded(UnloadReason::Idle)]])
        );
    }

    #[test]
    fn an_operators_restart_of_an_unloaded_pool_is_not_cancelled_by_a_withdrawn_demand() {
        let mut rig = on_demand_rig();
        rig.begin();
        assert_eq!(
            rig.command(Command::Restart),
            [
                Effect::Answer(Ok(())),
                loading_report(),
                spawn(Which::Main, M1, 0)
            ]
        );
        rig.spawned(Which::Main, 1);
        assert_eq!(rig.command(Command::CancelLoad), [Effect::Answer(Ok(()))]);
        assert!(matches!(rig.machine.phase, Phase::Starting { .. }));
    }

    #[test]
    fn a_reload_while_unloaded_forgets_the_last_models_failed_load() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.on(Input::SpawnFailed {
            which: Which::Main,
            reason: "no such file".into(),
        });
        rig.on(Input::Resumed);
        rig.command(Command::CancelLoad);
        rig.command(Command::Reload {
            model_path: "/m2".into(),
        });
        let effects = rig.command(Command::Load);
        assert!(
            matches!(
                &effects[..],
                [
                    Effect::Answer(Ok(())),
                    Effect::Report(EngineReport::Loading),
                    Effect::Spawn { model_path, .. }
                ] if model_path == "/m2"
            ),
            "another model loads at once: {effects:?}"
        );
    }

    #[test]
    fn an_unload_while_loading_stops_the_engine_at_once() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.spawned(Which::Main, 1);
        assert_eq!(
            rig.command(Command::Unload),
            concat([
                &[Effect::Answer(Ok(()))],
                &stopped_main(),
                &[unloaded(UnloadReason::Operator)]
            ])
        );
        assert_eq!(rig.machine.phase, Phase::Unloaded);
    }

    #[test]
    fn a_cancelled_load_stops_the_starting_engine_and_a_finished_one_is_left_alone() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.spawned(Which::Main, 1);
        assert_eq!(
            rig.command(Command::CancelLoad),
            concat([
                &[Effect::Answer(Ok(()))],
                &stopped_main(),
                &[unloaded(UnloadReason::Cancelled)]
            ])
        );
        assert_eq!(rig.machine.phase, Phase::Unloaded);
        assert_eq!(
            rig.command(Command::CancelLoad),
            [Effect::Answer(Ok(()))],
            "nothing to cancel while Unloaded"
        );

        rig.loaded(2);
        assert_eq!(
            rig.command(Command::CancelLoad),
            [Effect::Answer(Ok(()))],
            "a load that is done is not undone"
        );
        assert!(matches!(rig.machine.phase, Phase::Serving { .. }));
    }

    #[test]
    fn a_cancelled_load_backing_off_is_not_retried_but_the_next_load_waits_out_its_backoff() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.on(Input::SpawnFailed {
            which: Which::Main,
            reason: "no such file".into(),
        });
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off("no such file", 1_001_000)]
        );
        assert_eq!(
            rig.command(Command::CancelLoad),
            [Effect::Answer(Ok(())), unloaded(UnloadReason::Cancelled)]
        );
        assert_eq!(rig.machine.next_wake(), None, "no retry");

        assert_eq!(
            rig.command(Command::Load),
            [
                Effect::Answer(Ok(())),
                backing_off("no such file", 1_001_000)
            ],
            "demand alone does not load faster than the restart policy"
        );
        assert_eq!(rig.wake(), [loading_report(), spawn(Which::Main, M1, 0)]);
    }

    #[test]
    fn a_load_after_a_cancelled_backoff_has_passed_starts_at_once() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.on(Input::SpawnFailed {
            which: Which::Main,
            reason: "no such file".into(),
        });
        rig.on(Input::Resumed);
        rig.command(Command::CancelLoad);
        rig.now_ms += 5_000;
        assert_eq!(
            rig.command(Command::Load),
            [
                Effect::Answer(Ok(())),
                loading_report(),
                spawn(Which::Main, M1, 0)
            ]
        );
    }

    #[test]
    fn a_failed_load_backs_off_like_a_restart_and_its_retry_is_still_a_load() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        let failed = Input::SpawnFailed {
            which: Which::Main,
            reason: "no such file".into(),
        };
        assert_eq!(rig.on(failed), [Effect::Resume]);
        assert_eq!(
            rig.on(Input::Resumed),
            [backing_off("no such file", 1_001_000)]
        );
        assert_eq!(
            rig.command(Command::Load),
            [Effect::Answer(Ok(()))],
            "a demand does not cut the backoff short"
        );
        assert_eq!(rig.wake(), [loading_report(), spawn(Which::Main, M1, 0)]);
    }

    #[test]
    fn an_unload_while_backing_off_gives_the_load_up() {
        let mut rig = on_demand_rig();
        rig.begin();
        rig.command(Command::Load);
        rig.on(Input::SpawnFailed {
            which: Which::Main,
            reason: "no such file".into(),
        });
        rig.on(Input::Resumed);
        assert_eq!(
            rig.command(Command::Unload),
            [Effect::Answer(Ok(())), unloaded(UnloadReason::Operator)]
        );
        assert_eq!(rig.machine.next_wake(), None);
    }

    #[test]
    fn an_always_pool_refuses_an_unload_and_a_stopped_pool_refuses_a_load() {
        let mut rig = Rig::new();
        rig.serving();
        let effects = rig.command(Command::Unload);
        assert!(
            matches!(&effects[..], [Effect::Answer(Err(error))] if error.code == ErrorCode::Unsupported),
            "{effects:?}"
        );
        assert_eq!(rig.command(Command::Load), [Effect::Answer(Ok(()))]);
        rig.command(Command::Drain {
            deadline: Duration::from_secs(1),
            retiring: false,
        });
        rig.on(Input::LeasesEnded);
        let effects = rig.command(Command::Load);
        assert!(
            matches!(&effects[..], [Effect::Answer(Err(error))] if error.code == ErrorCode::NotReady),
            "a demand does not undo an operator's drain: {effects:?}"
        );
    }

    #[test]
    fn an_unloaded_pool_takes_a_reload_as_the_model_of_its_next_load() {
        let mut rig = on_demand_rig();
        rig.begin();
        assert_eq!(
            rig.command(Command::Reload {
                model_path: M2.into()
            }),
            [Effect::Answer(Ok(()))]
        );
        assert_eq!(
            rig.command(Command::Load),
            [
                Effect::Answer(Ok(())),
                loading_report(),
                spawn(Which::Main, M2, 0)
            ]
        );
    }

    #[test]
    fn pool_managerd_stopping_ends_an_unloaded_pools_supervisor() {
        let mut rig = on_demand_rig();
        rig.begin();
        assert_eq!(rig.on(Input::Shutdown), []);
        assert!(rig.machine.is_done());
    }
}
