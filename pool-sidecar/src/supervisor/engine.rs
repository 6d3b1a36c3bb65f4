//! The supervisor of one managed engine: a task that owns the engine process and walks it
//! through start → ready → serve, restarting it with backoff when it dies or stops answering,
//! and carrying out the operator's drain, reload and restart. It reports every step to the
//! registry and never touches registry state itself; the only registry state it reads is the
//! published snapshot (to see a draining pool's leases reach zero).

use super::process::{EngineProcess, plan_launch, port_served_by, spawn, with_log_tail};
use super::record::{
    EngineRecord, read_record, record_path, remove_record, side_record_path, side_records,
    write_record,
};
use super::restart::{RestartDecision, RestartTracker};
use crate::config::{ManagedEngine, PoolConfig, ReloadStrategy};
use crate::engine_http::EngineHttp;
use crate::probe::{check, engine_props, unix_ms_now};
use crate::registry::{EngineReport, RegistryHandle};
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{Endpoint, PoolState};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// An operator's request, answered as soon as the supervisor has taken it on.
#[derive(Debug)]
pub enum AdminCommand {
    Drain {
        deadline: Duration,
        reply: oneshot::Sender<Result<(), IpcError>>,
        /// Set when pool-managerd itself takes the pool out (a reloaded config removes or
        /// replaces it): once the engine is stopped the pool stays Draining, never Stopped, so
        /// clients waiting for the pool's model are not turned away before its replacement
        /// appears, and this hears that the engine is gone.
        retiring: Option<oneshot::Sender<()>>,
    },
    Reload {
        model_path: String,
        reply: oneshot::Sender<Result<(), IpcError>>,
    },
    Restart {
        reply: oneshot::Sender<Result<(), IpcError>>,
    },
}

/// Why a ready-looking TCP engine is not ours: another process serves the port it was given
/// (see [`port_served_by`]). `None` for our own engine and for Unix sockets.
fn port_taken_by_another(endpoint: &Endpoint, pid: u32) -> Option<String> {
    let Endpoint::Http { authority } = endpoint else {
        return None;
    };
    let port = authority.rsplit(':').next()?.parse::<u16>().ok()?;
    match port_served_by(port, pid) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "port {port} is served by another process, not the engine; starting again on another port"
        )),
        Err(error) => {
            tracing::warn!(port, %error, "cannot check who serves the engine's port");
            None
        }
    }
}

/// Where a managed engine's files go.
#[derive(Debug, Clone)]
pub struct EnginePaths {
    pub state_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl EnginePaths {
    pub fn under(state_dir: &Path) -> EnginePaths {
        EnginePaths {
            state_dir: state_dir.to_owned(),
            socket_dir: state_dir.join("sockets"),
            log_dir: state_dir.join("logs"),
        }
    }

    pub fn log(&self, pool: &str) -> PathBuf {
        self.log_dir.join(format!("{pool}.log"))
    }
}

/// A started (or adopted) engine and where it listens.
#[derive(Debug)]
pub struct Running {
    process: EngineProcess,
    endpoint: Endpoint,
    since: Instant,
}

/// What happens next, as decided by the step that just ended.
enum Step {
    Start,
    Serve(Box<Running>),
    Failed {
        reason: String,
        ran_for: Duration,
    },
    /// Stopped or Failed: nothing runs until an operator says so.
    Parked,
    Exit,
}

/// Why a start did not end in a ready engine.
enum NotStarted {
    Failed(String),
    Interrupted(AdminCommand),
}

/// Answers a command that cannot be carried out while the pool is busy with another one.
fn refuse_busy(command: AdminCommand, pool: &str, busy_with: &str) {
    let error = IpcError::new(
        ErrorCode::NotReady,
        format!("pool {pool:?} is {busy_with}; try again when that is done"),
    );
    let reply = match command {
        AdminCommand::Drain { reply, .. }
        | AdminCommand::Reload { reply, .. }
        | AdminCommand::Restart { reply } => reply,
    };
    let _ = reply.send(Err(error));
}

/// The canonical form of everything that shapes a running engine; a recorded engine started
/// under another fingerprint is not adopted.
pub fn fingerprint(pool: &PoolConfig, engine: &ManagedEngine) -> String {
    serde_json::json!({
        "engine": engine,
        "kind": pool.engine.name(),
        "slots": pool.slots,
        "health_path": pool.health_path,
    })
    .to_string()
}

pub struct EngineSupervisor {
    pool: PoolConfig,
    engine: ManagedEngine,
    registry: RegistryHandle,
    paths: EnginePaths,
    commands: mpsc::Receiver<AdminCommand>,
    shutdown: CancellationToken,
    model_path: String,
    /// The model to go back to if a drain-first reload's new model never becomes ready.
    rollback_to: Option<String>,
    restarts: u32,
    started_once: bool,
    generation: u64,
    tracker: RestartTracker,
    retiring: JoinSet<()>,
}

impl EngineSupervisor {
    pub fn new(
        pool: PoolConfig,
        engine: ManagedEngine,
        registry: RegistryHandle,
        paths: EnginePaths,
        commands: mpsc::Receiver<AdminCommand>,
        shutdown: CancellationToken,
    ) -> EngineSupervisor {
        let tracker = RestartTracker::new(engine.restart.clone());
        EngineSupervisor {
            model_path: engine.model_path.clone(),
            pool,
            engine,
            registry,
            paths,
            commands,
            shutdown,
            rollback_to: None,
            restarts: 0,
            started_once: false,
            generation: 0,
            tracker,
            retiring: JoinSet::new(),
        }
    }

    fn report(&self, report: EngineReport) {
        self.registry.record_engine(self.pool.id.clone(), report);
    }

    fn record_file(&self) -> PathBuf {
        record_path(&self.paths.state_dir, self.pool.id.as_str())
    }

    /// Looks for an engine a previous pool-managerd left running for this pool. One that is
    /// the same process, started with the same configuration and ready is adopted; one that
    /// does not match is stopped.
    pub async fn adopt(&mut self) -> Option<Running> {
        self.stop_side_engines().await;
        let path = self.record_file();
        let record = read_record(&path)?;
        if !record.is_running() {
            tracing::info!(pool = %self.pool.id, pid = record.pid, "recorded engine is gone; starting afresh");
            remove_record(&path);
            return None;
        }
        let mut process = EngineProcess::adopted(record.pid, record.start_ticks);
        if record.fingerprint != fingerprint(&self.pool, &self.engine) {
            tracing::info!(pool = %self.pool.id, pid = record.pid, "recorded engine was started with another configuration; stopping it");
            process.stop(self.engine.stop_grace()).await;
            remove_record(&path);
            return None;
        }
        let http = EngineHttp::new(&record.endpoint);
        let probe = check(&http, &self.pool).await;
        if let Err(error) = probe.result {
            tracing::info!(pool = %self.pool.id, pid = record.pid, %error, "recorded engine does not pass its probe; stopping it");
            process.stop(self.engine.stop_grace()).await;
            remove_record(&path);
            return None;
        }
        let props = engine_props(&http, &self.pool).await;
        let Some(slots) = self.pool.slots.or(props.total_slots) else {
            process.stop(self.engine.stop_grace()).await;
            remove_record(&path);
            return None;
        };
        tracing::info!(pool = %self.pool.id, pid = record.pid, endpoint = %record.endpoint, "adopted a running engine");
        self.model_path = record.model_path;
        self.restarts = record.restarts;
        self.started_once = true;
        self.report(EngineReport::Spawned {
            endpoint: record.endpoint.clone(),
            restarts: self.restarts,
        });
        self.report(EngineReport::Ready {
            slots: Some(slots),
            engine_version: props.version,
            at_unix_ms: unix_ms_now(),
        });
        Some(Running {
            process,
            endpoint: record.endpoint,
            since: Instant::now(),
        })
    }

    pub async fn run(mut self, adopted: Option<Running>) {
        let mut step = match adopted {
            Some(running) => Step::Serve(Box::new(running)),
            None => Step::Start,
        };
        loop {
            step = match step {
                Step::Start => self.start().await,
                Step::Serve(running) => self.serve(*running).await,
                Step::Failed { reason, ran_for } => self.back_off(reason, ran_for).await,
                Step::Parked => self.parked().await,
                Step::Exit => break,
            };
        }
        while self.retiring.join_next().await.is_some() {}
        tracing::info!(pool = %self.pool.id, "supervisor stopped");
    }

    /// Launches an engine for `model_path`; `generation` 0 is the pool's main engine.
    async fn launch(&self, model_path: &str, generation: u64) -> Result<Running, String> {
        let launch = plan_launch(
            self.pool.id.as_str(),
            &self.engine,
            model_path,
            self.pool.slots,
            &self.paths.socket_dir,
            generation,
        )?;
        if let Endpoint::Unix { path } = &launch.endpoint {
            std::fs::create_dir_all(&self.paths.socket_dir).map_err(|error| {
                format!("cannot create {}: {error}", self.paths.socket_dir.display())
            })?;
            // A socket file left by an engine that died would make the new one fail to bind.
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(pool = %self.pool.id, argv = ?launch.argv, "starting engine");
        let process = spawn(
            &launch,
            &self.engine,
            &self.paths.log(self.pool.id.as_str()),
        )?;
        Ok(Running {
            process,
            endpoint: launch.endpoint,
            since: Instant::now(),
        })
    }

    fn write_record(&self, running: &Running) {
        self.write_record_at(&self.record_file(), running, &self.model_path);
    }

    fn write_record_at(&self, path: &Path, running: &Running, model_path: &str) {
        let record = EngineRecord {
            pid: running.process.pid,
            start_ticks: running.process.start_ticks,
            endpoint: running.endpoint.clone(),
            fingerprint: fingerprint(&self.pool, &self.engine),
            model_path: model_path.to_owned(),
            restarts: self.restarts,
            boot_id: super::record::current_boot_id(),
        };
        if let Err(error) = write_record(path, &record) {
            tracing::warn!(pool = %self.pool.id, %error, "cannot write the engine record; this engine cannot be adopted");
        }
    }

    /// Stops engines a crashed sidecar left running beside the main one (mid-reload).
    async fn stop_side_engines(&self) {
        for path in side_records(&self.paths.state_dir, self.pool.id.as_str()) {
            if let Some(record) = read_record(&path)
                && record.is_running()
            {
                tracing::info!(pool = %self.pool.id, pid = record.pid, "stopping an engine left over from an interrupted reload");
                EngineProcess::adopted(record.pid, record.start_ticks)
                    .stop(self.engine.stop_grace())
                    .await;
            }
            remove_record(&path);
        }
    }

    async fn start(&mut self) -> Step {
        if self.shutdown.is_cancelled() {
            return Step::Exit;
        }
        if self.started_once {
            self.restarts = self.restarts.saturating_add(1);
        }
        self.started_once = true;
        let mut running = match self.launch(&self.model_path.clone(), 0).await {
            Ok(running) => running,
            Err(reason) => return self.start_failed(reason),
        };
        self.report(EngineReport::Spawned {
            endpoint: running.endpoint.clone(),
            restarts: self.restarts,
        });
        self.write_record(&running);
        match self.wait_ready(&mut running).await {
            Ok(()) => {
                self.rollback_to = None;
                Step::Serve(Box::new(running))
            }
            Err(NotStarted::Interrupted(command)) => {
                self.stop_engine(&mut running, "interrupted by an operator while starting")
                    .await;
                self.while_stopped(Some(command)).unwrap_or(Step::Parked)
            }
            Err(NotStarted::Failed(reason)) => {
                running.process.stop(self.engine.stop_grace()).await;
                remove_record(&self.record_file());
                if self.shutdown.is_cancelled() {
                    self.report(EngineReport::Down {
                        reason: "pool-managerd is stopping".into(),
                        state: PoolState::Stopped,
                    });
                    return Step::Exit;
                }
                self.start_failed(reason)
            }
        }
    }

    fn start_failed(&mut self, reason: String) -> Step {
        if let Some(previous) = self.rollback_to.take() {
            let failed = std::mem::replace(&mut self.model_path, previous);
            self.report(EngineReport::Note {
                error: format!(
                    "reload to {failed} failed ({reason}); rolling back to {}",
                    self.model_path
                ),
            });
            return Step::Start;
        }
        Step::Failed {
            reason,
            ran_for: Duration::ZERO,
        }
    }

    /// Probes a starting engine until it is ready, exits, or runs out of time; reports Ready.
    /// An operator's command interrupts the start.
    async fn wait_ready(&mut self, running: &mut Running) -> Result<(), NotStarted> {
        let http = EngineHttp::new(&running.endpoint);
        let timeout = self.engine.startup_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let log = self.paths.log(self.pool.id.as_str());
        loop {
            let probe = tokio::select! {
                () = self.shutdown.cancelled() => {
                    return Err(NotStarted::Failed("pool-managerd is stopping".into()));
                }
                reason = running.process.wait_exit() => {
                    running.process.kill_leftovers();
                    return Err(NotStarted::Failed(with_log_tail(
                        &format!("{reason} while starting"),
                        &log,
                    )));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(NotStarted::Failed(format!("not ready within {} ms", timeout.as_millis())));
                }
                Some(command) = self.commands.recv() => return Err(NotStarted::Interrupted(command)),
                probe = check(&http, &self.pool) => probe,
            };
            if probe.result.is_ok() {
                if let Some(taken) = port_taken_by_another(&running.endpoint, running.process.pid) {
                    return Err(NotStarted::Failed(taken));
                }
                let props = engine_props(&http, &self.pool).await;
                let Some(slots) = self.pool.slots.or(props.total_slots) else {
                    return Err(NotStarted::Failed(
                        "the engine does not report total_slots; set slots in the pool's config"
                            .into(),
                    ));
                };
                tracing::info!(pool = %self.pool.id, pid = running.process.pid, slots, "engine ready");
                self.report(EngineReport::Ready {
                    slots: Some(slots),
                    engine_version: props.version,
                    at_unix_ms: unix_ms_now(),
                });
                return Ok(());
            }
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    return Err(NotStarted::Failed("pool-managerd is stopping".into()));
                }
                Some(command) = self.commands.recv() => return Err(NotStarted::Interrupted(command)),
                () = tokio::time::sleep(self.pool.probe.interval()) => {}
            }
        }
    }

    async fn serve(&mut self, mut running: Running) -> Step {
        let http = EngineHttp::new(&running.endpoint);
        let log = self.paths.log(self.pool.id.as_str());
        let mut unanswered = 0u32;
        let mut ticker = tokio::time::interval(self.pool.probe.interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    return self.stop_for_good(running, "pool-managerd is stopping").await;
                }
                reason = running.process.wait_exit() => {
                    running.process.kill_leftovers();
                    remove_record(&self.record_file());
                    tracing::warn!(pool = %self.pool.id, pid = running.process.pid, %reason, "engine died");
                    return Step::Failed {
                        reason: with_log_tail(&reason, &log),
                        ran_for: running.since.elapsed(),
                    };
                }
                _ = ticker.tick() => {
                    let probe = check(&http, &self.pool).await;
                    unanswered = if probe.alive { 0 } else { unanswered + 1 };
                    let error = probe.result.clone().err();
                    self.registry.record_probe(self.pool.id.clone(), probe);
                    if unanswered >= self.pool.probe.liveness_failure_threshold {
                        let reason = format!(
                            "no answer to {unanswered} probes in a row ({})",
                            error.unwrap_or_default()
                        );
                        tracing::warn!(pool = %self.pool.id, pid = running.process.pid, %reason, "engine hung; restarting it");
                        running.process.stop(self.engine.stop_grace()).await;
                        remove_record(&self.record_file());
                        return Step::Failed { reason, ran_for: running.since.elapsed() };
                    }
                }
                command = self.commands.recv() => {
                    let Some(command) = command else { continue };
                    match command {
                        AdminCommand::Drain {
                            deadline,
                            reply,
                            retiring,
                        } => {
                            let _ = reply.send(Ok(()));
                            return self.drain(running, deadline, retiring).await;
                        }
                        AdminCommand::Restart { reply } => {
                            let _ = reply.send(Ok(()));
                            self.tracker.reset();
                            // No lease may go to an engine that is being stopped.
                            self.report(EngineReport::Down {
                                reason: "restarted by an operator".into(),
                                state: PoolState::Starting,
                            });
                            self.stop_engine(&mut running, "restarted by an operator").await;
                            return Step::Start;
                        }
                        AdminCommand::Reload { model_path, reply } => {
                            let _ = reply.send(Ok(()));
                            match self.engine.reload.strategy {
                                ReloadStrategy::Overlap => {
                                    return self.reload_beside(running, model_path).await;
                                }
                                ReloadStrategy::DrainFirst => {
                                    return self.reload_after_drain(running, model_path).await;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    async fn stop_engine(&self, running: &mut Running, why: &str) {
        tracing::info!(pool = %self.pool.id, pid = running.process.pid, why, "stopping engine");
        running.process.stop(self.engine.stop_grace()).await;
        remove_record(&self.record_file());
    }

    async fn stop_for_good(&mut self, mut running: Running, why: &str) -> Step {
        self.stop_engine(&mut running, why).await;
        self.report(EngineReport::Down {
            reason: why.to_owned(),
            state: PoolState::Stopped,
        });
        Step::Exit
    }

    /// Waits until the pool, already reported Draining, holds no lease (or the deadline
    /// passes) while the engine runs. The snapshot must show the pool Draining before its lease
    /// count is trusted: leases granted just before the drain are published with that state.
    async fn wait_for_leases_to_end(&mut self, running: &mut Running, deadline: Duration) -> bool {
        let mut snapshots = self.registry.watch_snapshot();
        let pool = self.pool.id.clone();
        let drained = snapshots.wait_for(|snapshot| {
            snapshot.pool(&pool).is_none_or(|status| {
                status.state == PoolState::Draining && status.active_leases() == 0
            })
        });
        tokio::pin!(drained);
        let timer = tokio::time::sleep(deadline);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                _ = &mut drained => return true,
                () = &mut timer => {
                    tracing::warn!(pool = %self.pool.id, deadline_ms = deadline.as_millis() as u64, "drain deadline passed with leases still live");
                    return false;
                }
                reason = running.process.wait_exit() => {
                    tracing::warn!(pool = %self.pool.id, %reason, "engine died while draining");
                    return true;
                }
                () = self.shutdown.cancelled() => return false,
                Some(command) = self.commands.recv() => refuse_busy(command, self.pool.id.as_str(), "draining"),
            }
        }
    }

    async fn drain(
        &mut self,
        mut running: Running,
        deadline: Duration,
        retiring: Option<oneshot::Sender<()>>,
    ) -> Step {
        self.report(EngineReport::Draining);
        let clean = self.wait_for_leases_to_end(&mut running, deadline).await;
        let why = match (clean, retiring.is_some()) {
            (true, false) => "drained by an operator",
            (false, false) => "drained by an operator (deadline passed)",
            (true, true) => "taken out by a config reload",
            (false, true) => "taken out by a config reload (drain deadline passed)",
        };
        self.stop_engine(&mut running, why).await;
        if let Some(retired) = retiring {
            let _ = retired.send(());
            return Step::Parked;
        }
        self.report(EngineReport::Down {
            reason: why.to_owned(),
            state: PoolState::Stopped,
        });
        if self.shutdown.is_cancelled() {
            Step::Exit
        } else {
            Step::Parked
        }
    }

    /// Overlap reload: the new engine starts beside the old one, which keeps serving; when the
    /// new one is ready new leases go to it and the old one is retired once its leases end (or
    /// at the reload's drain deadline). If the new one never becomes ready it is stopped and
    /// the old one serves on.
    async fn reload_beside(&mut self, mut old: Running, model_path: String) -> Step {
        // Unique per reload, also across sidecar restarts: never the path a live engine uses.
        self.generation = u64::from(rand::random::<u32>()) + 1;
        let side_record = side_record_path(
            &self.paths.state_dir,
            self.pool.id.as_str(),
            self.generation,
        );
        let mut candidate = match self.launch(&model_path, self.generation).await {
            Ok(candidate) => {
                self.write_record_at(&side_record, &candidate, &model_path);
                candidate
            }
            Err(reason) => {
                self.reload_failed(&model_path, &reason);
                return Step::Serve(Box::new(old));
            }
        };
        let http = EngineHttp::new(&candidate.endpoint);
        let timeout = self.engine.startup_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let ready = loop {
            tokio::select! {
                reason = candidate.process.wait_exit() => {
                    candidate.process.kill_leftovers();
                    break Err(reason);
                }
                reason = old.process.wait_exit() => {
                    // The old engine died meanwhile: no new leases, then a restart on the new
                    // model, which rolls back to the old one if it never becomes ready.
                    self.report(EngineReport::Draining);
                    old.process.kill_leftovers();
                    tracing::warn!(pool = %self.pool.id, %reason, "old engine died during a reload");
                    candidate.process.stop(self.engine.stop_grace()).await;
                    remove_record(&side_record);
                    remove_record(&self.record_file());
                    self.rollback_to = Some(std::mem::replace(&mut self.model_path, model_path));
                    return Step::Failed { reason, ran_for: old.since.elapsed() };
                }
                Some(command) = self.commands.recv() => refuse_busy(command, self.pool.id.as_str(), "reloading"),
                () = tokio::time::sleep_until(deadline) => break Err(format!("not ready within {} ms", timeout.as_millis())),
                () = self.shutdown.cancelled() => break Err("pool-managerd is stopping".into()),
                probe = check(&http, &self.pool) => {
                    if probe.result.is_ok() {
                        break match port_taken_by_another(&candidate.endpoint, candidate.process.pid) {
                            Some(taken) => Err(taken),
                            None => Ok(()),
                        };
                    }
                    tokio::time::sleep(self.pool.probe.interval()).await;
                }
            }
        };
        if let Err(reason) = ready {
            candidate.process.stop(self.engine.stop_grace()).await;
            remove_record(&side_record);
            self.reload_failed(&model_path, &reason);
            return Step::Serve(Box::new(old));
        }
        let props = engine_props(&http, &self.pool).await;
        tracing::info!(pool = %self.pool.id, model = %model_path, pid = candidate.process.pid, "reloaded engine ready; swapping");
        self.report(EngineReport::Swapped {
            endpoint: candidate.endpoint.clone(),
            slots: self.pool.slots.or(props.total_slots),
            engine_version: props.version,
        });
        // The new engine becomes the main record; the old one's side record lives until it
        // is retired.
        let old_model = self.model_path.clone();
        self.model_path = model_path;
        self.write_record(&candidate);
        self.write_record_at(&side_record, &old, &old_model);
        self.retire(old, candidate.endpoint.clone(), side_record);
        Step::Serve(Box::new(candidate))
    }

    fn reload_failed(&self, model_path: &str, reason: &str) {
        tracing::warn!(pool = %self.pool.id, model = model_path, %reason, "reload failed; the old engine serves on");
        self.report(EngineReport::Note {
            error: format!(
                "reload to {model_path} failed ({reason}); still serving {}",
                self.model_path
            ),
        });
    }

    /// Stops a swapped-out engine once the pool's leases end, or at the reload deadline.
    fn retire(&mut self, mut old: Running, new_endpoint: Endpoint, side_record: PathBuf) {
        let registry = self.registry.clone();
        let pool = self.pool.id.clone();
        let deadline = self.engine.reload.drain_deadline();
        let grace = self.engine.stop_grace();
        let shutdown = self.shutdown.clone();
        self.retiring.spawn(async move {
            let mut snapshots = registry.watch_snapshot();
            // Counted only once the swap is published; the count includes the new engine's
            // leases, so under steady load the old engine runs until the deadline.
            let drained = snapshots.wait_for(|snapshot| {
                snapshot.pool(&pool).is_none_or(|status| {
                    status.endpoint == new_endpoint && status.active_leases() == 0
                })
            });
            tokio::select! {
                _ = drained => {}
                () = tokio::time::sleep(deadline) => {}
                () = shutdown.cancelled() => {}
                _ = old.process.wait_exit() => {}
            }
            tracing::info!(%pool, pid = old.process.pid, "retiring the engine a reload replaced");
            old.process.stop(grace).await;
            remove_record(&side_record);
        });
    }

    /// Drain-first reload: stop taking leases, let them end, stop the old engine, start the new
    /// model; if it never becomes ready, start the old model again.
    async fn reload_after_drain(&mut self, mut old: Running, model_path: String) -> Step {
        self.report(EngineReport::Draining);
        let deadline = self.engine.reload.drain_deadline();
        self.wait_for_leases_to_end(&mut old, deadline).await;
        self.stop_engine(&mut old, "reloading").await;
        self.rollback_to = Some(std::mem::replace(&mut self.model_path, model_path));
        Step::Start
    }

    async fn back_off(&mut self, reason: String, ran_for: Duration) -> Step {
        let decision = self
            .tracker
            .on_failure(Instant::now(), ran_for, rand::random::<f64>());
        match decision {
            RestartDecision::After(delay) => {
                let until_unix_ms =
                    unix_ms_now() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(pool = %self.pool.id, %reason, retry_in_ms = delay.as_millis() as u64, "engine failed; backing off");
                self.report(EngineReport::Down {
                    reason,
                    state: PoolState::BackingOff { until_unix_ms },
                });
                let wake = tokio::time::Instant::now() + delay;
                loop {
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Step::Exit,
                        () = tokio::time::sleep_until(wake) => return Step::Start,
                        command = self.commands.recv() => {
                            if let Some(step) = self.while_stopped(command) {
                                return step;
                            }
                        }
                    }
                }
            }
            RestartDecision::GiveUp { restarts_in_window } => {
                let reason = format!(
                    "{reason}; {restarts_in_window} restarts within {} s: giving up until an operator restarts the pool",
                    self.engine.restart.window_ms / 1000
                );
                tracing::error!(pool = %self.pool.id, %reason, "engine failed for good");
                self.report(EngineReport::Down {
                    reason,
                    state: PoolState::Failed,
                });
                Step::Parked
            }
        }
    }

    async fn parked(&mut self) -> Step {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Step::Exit,
                command = self.commands.recv() => {
                    if let Some(step) = self.while_stopped(command) {
                        return step;
                    }
                }
            }
        }
    }

    /// An operator's command while no engine runs (backing off, failed, stopped).
    fn while_stopped(&mut self, command: Option<AdminCommand>) -> Option<Step> {
        match command? {
            AdminCommand::Restart { reply } => {
                let _ = reply.send(Ok(()));
                self.tracker.reset();
                Some(Step::Start)
            }
            AdminCommand::Reload { model_path, reply } => {
                let _ = reply.send(Ok(()));
                self.model_path = model_path;
                self.tracker.reset();
                Some(Step::Start)
            }
            AdminCommand::Drain {
                reply,
                retiring: Some(retired),
                ..
            } => {
                let _ = reply.send(Ok(()));
                let _ = retired.send(());
                Some(Step::Parked)
            }
            AdminCommand::Drain { reply, .. } => {
                let _ = reply.send(Ok(()));
                self.report(EngineReport::Down {
                    reason: "drained by an operator".into(),
                    state: PoolState::Stopped,
                });
                Some(Step::Parked)
            }
        }
    }
}

/// The error an admin request gets when its pool's supervisor has gone away.
pub fn supervisor_gone(pool: &str) -> IpcError {
    IpcError::new(
        ErrorCode::ShuttingDown,
        format!("pool {pool:?}'s supervisor is not running"),
    )
}
