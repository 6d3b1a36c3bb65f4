//! The supervisor of one managed engine: a task that owns the engine processes and carries out
//! what the pool's [`Machine`] decides — starting, probing and stopping engines, writing their
//! records, reporting to the registry, answering operators — and turns what happens (a process
//! exits, a probe answers, a timer fires, a command or the shutdown arrives) back into the
//! machine's inputs. It never touches registry state itself; the only registry state it reads
//! is the published snapshot (to see a draining pool's leases reach zero, and an on-demand
//! pool's leases come and go for its idle time).

use super::machine::{
    Command, Effect, EngineAt, Input, Machine, Moment, RecordFile, Settings, Which,
};
use super::process::{EngineProcess, log_tail, plan_launch, port_served_by, spawn};
use super::record::{
    EngineRecord, read_record, record_path, remove_record, side_record_path, side_records,
    write_record,
};
use super::restart::RestartTracker;
use crate::config::{ManagedEngine, PoolConfig};
use crate::engine_http::EngineHttp;
use crate::gpu_baselines::GpuMeter;
use crate::probe::{check, engine_props, unix_ms_now};
use crate::registry::{EngineReport, ProbeReport, RegistryHandle};
use crate::spans::EngineStarts;
use daemon_support::trace_export::Tracer;
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{Endpoint, PoolId, PoolState, RegistrySnapshot};
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
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
    /// Start an on-demand pool's engine (anyone's demand, not only an operator's).
    Load {
        reply: oneshot::Sender<Result<(), IpcError>>,
    },
    Unload {
        reply: oneshot::Sender<Result<(), IpcError>>,
    },
    /// Give up a load nobody waits for any more (the pools controller decides that).
    CancelLoad {
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

/// One value per engine process the supervisor may hold.
#[derive(Default)]
struct PerEngine<T> {
    main: T,
    candidate: T,
    outgoing: T,
}

impl<T> PerEngine<T> {
    fn get(&self, which: Which) -> &T {
        match which {
            Which::Main => &self.main,
            Which::Candidate => &self.candidate,
            Which::Outgoing => &self.outgoing,
        }
    }

    fn get_mut(&mut self, which: Which) -> &mut T {
        match which {
            Which::Main => &mut self.main,
            Which::Candidate => &mut self.candidate,
            Which::Outgoing => &mut self.outgoing,
        }
    }
}

/// Work under way whose completion becomes an input; `None` when there is none.
type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// What woke the supervisor.
enum Event {
    Shutdown,
    Exited(Which, String),
    Probed(Which, ProbeReport),
    Command(AdminCommand),
    CommandsClosed,
    LeasesEnded,
    Leases(bool),
    Tick,
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
    /// What an adopted engine's record says; the machine carries them on.
    model_path: String,
    restarts: u32,
    started_once: bool,
    engines: PerEngine<Option<Running>>,
    probes: PerEngine<Pending<ProbeReport>>,
    drain_watch: Pending<()>,
    /// The reply to the command being handled, and its retiring drain's signal until the
    /// command is accepted.
    reply: Option<oneshot::Sender<Result<(), IpcError>>>,
    retiring_signal: Option<oneshot::Sender<()>>,
    /// The accepted retiring drain's signal, sent once the engine is gone.
    retired: Option<oneshot::Sender<()>>,
    retiring: JoinSet<()>,
    /// A GPU pool's device meter: read just before a load starts the engine.
    gpu_meter: Option<GpuMeter>,
    /// Makes probes' spans when spans are exported.
    tracer: Option<Tracer>,
    /// The spans of engine starts (nothing without a tracer).
    starts: EngineStarts,
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
        let starts = EngineStarts::new(None, pool.id.clone());
        EngineSupervisor {
            model_path: engine.model_path.clone(),
            pool,
            engine,
            registry,
            paths,
            commands,
            shutdown,
            restarts: 0,
            started_once: false,
            engines: PerEngine::default(),
            probes: PerEngine::default(),
            drain_watch: None,
            reply: None,
            retiring_signal: None,
            retired: None,
            retiring: JoinSet::new(),
            gpu_meter: None,
            tracer: None,
            starts,
        }
    }

    /// Makes spans of this pool's probes and engine starts with `tracer`.
    pub fn with_tracer(mut self, tracer: Tracer) -> EngineSupervisor {
        self.starts = EngineStarts::new(Some(tracer.clone()), self.pool.id.clone());
        self.tracer = Some(tracer);
        self
    }

    /// Reads `meter`'s device just before each load starts the engine (GPU footprints measured
    /// by the device's growth, see `gpu_baselines`).
    pub fn with_gpu_meter(mut self, meter: GpuMeter) -> EngineSupervisor {
        self.gpu_meter = Some(meter);
        self
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
        let probe = check(&http, &self.pool, self.tracer.as_ref()).await;
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
        self.starts.adopted();
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
        let mut machine = Machine::new(
            Settings::of(&self.pool, &self.engine),
            RestartTracker::new(self.engine.restart.clone()),
            self.model_path.clone(),
            self.restarts,
            self.started_once,
        );
        let mut shutdown_seen = self.shutdown.is_cancelled();
        if shutdown_seen {
            let effects = machine.on(Input::Shutdown, moment());
            self.carry_out(&mut machine, effects).await;
        }
        let adopted = adopted.map(|running| {
            let engine = EngineAt {
                endpoint: running.endpoint.clone(),
                pid: running.process.pid,
                since: running.since,
            };
            self.engines.main = Some(running);
            engine
        });
        let effects = machine.begin(adopted, moment());
        self.carry_out(&mut machine, effects).await;
        let mut commands_open = true;
        let mut leases = self.lease_watch();
        while !machine.is_done() {
            let wake = machine.next_wake();
            let event = tokio::select! {
                () = self.shutdown.cancelled(), if !shutdown_seen => Event::Shutdown,
                status = exit_of(&mut self.engines.main) => Event::Exited(Which::Main, status),
                status = exit_of(&mut self.engines.candidate) => Event::Exited(Which::Candidate, status),
                report = completion(&mut self.probes.main) => Event::Probed(Which::Main, report),
                report = completion(&mut self.probes.candidate) => Event::Probed(Which::Candidate, report),
                () = completion(&mut self.drain_watch) => Event::LeasesEnded,
                held = lease_change(&mut leases, &self.pool.id) => Event::Leases(held),
                command = self.commands.recv(), if commands_open => match command {
                    Some(command) => Event::Command(command),
                    None => Event::CommandsClosed,
                },
                () = sleep_until(wake) => Event::Tick,
            };
            let input = match event {
                Event::Shutdown => {
                    shutdown_seen = true;
                    Input::Shutdown
                }
                Event::Exited(which, status) => self.exited(which, status),
                Event::Probed(which, report) => {
                    *self.probes.get_mut(which) = None;
                    Input::Probed { which, report }
                }
                Event::Command(command) => Input::Command(self.take_command(command)),
                Event::CommandsClosed => {
                    commands_open = false;
                    continue;
                }
                Event::LeasesEnded => {
                    self.drain_watch = None;
                    Input::LeasesEnded
                }
                Event::Leases(held) => Input::Leases { held },
                Event::Tick => Input::Tick,
            };
            let effects = machine.on(input, moment());
            self.carry_out(&mut machine, effects).await;
        }
        while self.retiring.join_next().await.is_some() {}
        tracing::info!(pool = %self.pool.id, "supervisor stopped");
    }

    /// An engine exited on its own: nothing of its process group may stay behind.
    fn exited(&mut self, which: Which, status: String) -> Input {
        *self.probes.get_mut(which) = None;
        self.starts.exited(which, &status);
        if let Some(running) = self.engines.get_mut(which).take() {
            running.process.kill_leftovers();
        }
        let log_tail = match which {
            Which::Main => log_tail(&self.paths.log(self.pool.id.as_str()), 3),
            Which::Candidate | Which::Outgoing => String::new(),
        };
        Input::Exited {
            which,
            status,
            log_tail,
        }
    }

    /// Keeps an operator's reply channels until the machine answers the command.
    fn take_command(&mut self, command: AdminCommand) -> Command {
        match command {
            AdminCommand::Drain {
                deadline,
                reply,
                retiring,
            } => {
                self.reply = Some(reply);
                let command = Command::Drain {
                    deadline,
                    retiring: retiring.is_some(),
                };
                self.retiring_signal = retiring;
                command
            }
            AdminCommand::Reload { model_path, reply } => {
                self.reply = Some(reply);
                Command::Reload { model_path }
            }
            AdminCommand::Restart { reply } => {
                self.reply = Some(reply);
                Command::Restart
            }
            AdminCommand::Load { reply } => {
                self.reply = Some(reply);
                Command::Load
            }
            AdminCommand::Unload { reply } => {
                self.reply = Some(reply);
                Command::Unload
            }
            AdminCommand::CancelLoad { reply } => {
                self.reply = Some(reply);
                Command::CancelLoad
            }
        }
    }

    /// Carries out `effects` in order, feeding the machine the answers of those answered at
    /// once (each the last of its batch) until it asks for nothing more.
    async fn carry_out(&mut self, machine: &mut Machine, effects: Vec<Effect>) {
        let mut batches = VecDeque::from([effects]);
        while let Some(effects) = batches.pop_front() {
            for effect in effects {
                if let Some(input) = self.carry_out_one(effect).await {
                    batches.push_back(machine.on(input, moment()));
                }
            }
        }
    }

    async fn carry_out_one(&mut self, effect: Effect) -> Option<Input> {
        self.starts.before(&effect);
        match effect {
            Effect::Spawn {
                which,
                model_path,
                generation,
            } => Some(match self.launch(&model_path, generation) {
                Ok(running) => {
                    self.starts.spawned(which, running.process.pid);
                    let input = Input::Spawned {
                        which,
                        endpoint: running.endpoint.clone(),
                        pid: running.process.pid,
                    };
                    *self.engines.get_mut(which) = Some(running);
                    input
                }
                Err(reason) => {
                    self.starts.spawn_failed(which, &reason);
                    Input::SpawnFailed { which, reason }
                }
            }),
            Effect::Probe(which) => {
                if let Some(running) = self.engines.get(which) {
                    let http = EngineHttp::new(&running.endpoint);
                    let pool = self.pool.clone();
                    let tracer = self.tracer.clone();
                    *self.probes.get_mut(which) = Some(Box::pin(async move {
                        check(&http, &pool, tracer.as_ref()).await
                    }));
                }
                None
            }
            Effect::Inspect(which) => {
                let running = self.engines.get(which).as_ref()?;
                let endpoint = running.endpoint.clone();
                let port_taken = port_taken_by_another(&endpoint, running.process.pid);
                let props = match port_taken {
                    Some(_) => Default::default(),
                    None => engine_props(&EngineHttp::new(&endpoint), &self.pool).await,
                };
                Some(Input::Inspected {
                    which,
                    port_taken,
                    props,
                })
            }
            Effect::Stop(which) => {
                *self.probes.get_mut(which) = None;
                if which == Which::Main {
                    self.drain_watch = None;
                }
                if let Some(mut running) = self.engines.get_mut(which).take() {
                    running.process.stop(self.engine.stop_grace()).await;
                }
                None
            }
            Effect::Promote => {
                self.probes = PerEngine::default();
                self.engines.outgoing = self.engines.main.take();
                self.engines.main = self.engines.candidate.take();
                None
            }
            Effect::Retire {
                generation,
                new_endpoint,
            } => {
                if let Some(old) = self.engines.outgoing.take() {
                    let side_record = self.record(RecordFile::Side(generation));
                    self.retire(old, new_endpoint, side_record);
                }
                None
            }
            Effect::WriteRecord {
                file,
                which,
                model_path,
                restarts,
            } => {
                let path = self.record(file);
                if let Some(running) = self.engines.get(which) {
                    self.write_record_at(&path, running, &model_path, restarts);
                }
                None
            }
            Effect::RemoveRecord(file) => {
                remove_record(&self.record(file));
                None
            }
            Effect::Report(report) => {
                // A load reports Loading just before it starts the engine.
                let loading = matches!(report, EngineReport::Loading);
                self.report(report);
                if loading && let Some(meter) = &self.gpu_meter {
                    meter.read_baseline(&self.pool.id).await;
                }
                None
            }
            Effect::RecordProbe(report) => {
                self.registry.record_probe(self.pool.id.clone(), report);
                None
            }
            Effect::WatchDrain => {
                self.drain_watch = Some(self.watch_drain());
                None
            }
            Effect::Answer(result) => {
                let accepted = result.is_ok();
                if let Some(reply) = self.reply.take() {
                    let _ = reply.send(result);
                }
                let signal = self.retiring_signal.take();
                if accepted {
                    self.retired = signal;
                }
                None
            }
            Effect::Retired => {
                if let Some(retired) = self.retired.take() {
                    let _ = retired.send(());
                }
                None
            }
            Effect::Resume => Some(Input::Resumed),
        }
    }

    fn record(&self, file: RecordFile) -> PathBuf {
        match file {
            RecordFile::Main => self.record_file(),
            RecordFile::Side(generation) => {
                side_record_path(&self.paths.state_dir, self.pool.id.as_str(), generation)
            }
        }
    }

    /// Resolves when the pool, already reported Draining, holds no lease. The snapshot must
    /// show the pool Draining before its lease count is trusted: leases granted just before the
    /// drain are published with that state.
    fn watch_drain(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut snapshots = self.registry.watch_snapshot();
        let pool = self.pool.id.clone();
        Box::pin(async move {
            let _ = snapshots
                .wait_for(|snapshot| {
                    snapshot.pool(&pool).is_none_or(|status| {
                        status.state == PoolState::Draining && status.active_leases() == 0
                    })
                })
                .await;
        })
    }

    /// For a pool unloaded when idle, the registry's snapshots, to tell the machine when the pool
    /// comes to hold leases or none; `None` for every other pool, which has no use for it.
    fn lease_watch(&self) -> Option<LeaseWatch> {
        self.pool.load.idle_unload()?;
        let mut snapshots = self.registry.watch_snapshot();
        snapshots.mark_changed();
        Some(LeaseWatch {
            snapshots,
            held: None,
        })
    }

    /// Launches an engine for `model_path`; `generation` 0 is the pool's main engine.
    fn launch(&self, model_path: &str, generation: u64) -> Result<Running, String> {
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

    /// Written in place (synced to disk on pool-managerd's one thread, a few ms at an engine's
    /// start, swap or stop), so that it lands in order with the engine's reports: whoever sees
    /// an engine reported (the pools controller measuring its footprint, a test) finds its record.
    fn write_record_at(&self, path: &Path, running: &Running, model_path: &str, restarts: u32) {
        let record = EngineRecord {
            pid: running.process.pid,
            start_ticks: running.process.start_ticks,
            endpoint: running.endpoint.clone(),
            fingerprint: fingerprint(&self.pool, &self.engine),
            model_path: model_path.to_owned(),
            restarts,
            boot_id: super::record::current_boot_id(),
        };
        if let Err(error) = write_record(path, &record) {
            tracing::warn!(pool = %self.pool.id, %error, "cannot write the engine record; this engine cannot be adopted");
        }
    }

    /// Stops engines a crashed sidecar left running beside the main one (mid-reload). Takes
    /// `&mut self`: the supervisor's pending work is `Send` but not `Sync`, and the pools
    /// controller adopts engines inside a spawned task.
    async fn stop_side_engines(&mut self) {
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
}

/// The time, the wall clock and a random number for the machine's next decision.
fn moment() -> Moment {
    Moment {
        at: tokio::time::Instant::now().into_std(),
        unix_ms: unix_ms_now(),
        random: rand::random(),
    }
}

/// Whether a pool held leases when last told, and the snapshots that say when that changes.
struct LeaseWatch {
    snapshots: watch::Receiver<Arc<RegistrySnapshot>>,
    held: Option<bool>,
}

/// The next change of whether `pool` holds leases; never, without a watch (or once the registry
/// is gone). Cancel-safe: a snapshot seen but not yet told is told on the next call.
async fn lease_change(watch: &mut Option<LeaseWatch>, pool: &PoolId) -> bool {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    loop {
        let held = watch
            .snapshots
            .borrow_and_update()
            .pool(pool)
            .is_some_and(|status| status.active_leases() > 0);
        if watch.held != Some(held) {
            watch.held = Some(held);
            return held;
        }
        if watch.snapshots.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// How the engine in `slot` exits; never, while there is none.
async fn exit_of(slot: &mut Option<Running>) -> String {
    match slot {
        Some(running) => running.process.wait_exit().await,
        None => std::future::pending().await,
    }
}

/// The result of the work in `pending`; never, while there is none.
async fn completion<T>(pending: &mut Pending<T>) -> T {
    match pending {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// The error an admin request gets when its pool's supervisor has gone away.
pub fn supervisor_gone(pool: &str) -> IpcError {
    IpcError::new(
        ErrorCode::ShuttingDown,
        format!("pool {pool:?}'s supervisor is not running"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReloadStrategy, RestartPolicy};

    /// The supervisor reads time from tokio's clock, so paused time moves the machine's
    /// deadlines and backoff without waiting for them.
    #[tokio::test(start_paused = true)]
    async fn the_machine_runs_on_tokios_clock_so_paused_time_drives_its_backoff() {
        let settings = Settings {
            pool: "a".into(),
            slots: Some(1),
            startup_timeout: Duration::from_secs(10),
            probe_interval: Duration::from_secs(1),
            liveness_failure_threshold: 3,
            reload_strategy: ReloadStrategy::Overlap,
            reload_drain_deadline: Duration::from_secs(60),
            restart_window_ms: 600_000,
            load: crate::config::LoadPolicy::Always,
        };
        let policy = RestartPolicy {
            initial_ms: 5000,
            jitter: 0.0,
            ..RestartPolicy::default()
        };
        let mut machine =
            Machine::new(settings, RestartTracker::new(policy), "/m".into(), 0, false);
        machine.begin(None, moment());
        let failed = Input::SpawnFailed {
            which: Which::Main,
            reason: "cannot start".into(),
        };
        assert_eq!(machine.on(failed, moment()), [Effect::Resume]);
        machine.on(Input::Resumed, moment());
        let before = tokio::time::Instant::now();
        sleep_until(machine.next_wake()).await;
        assert_eq!(before.elapsed(), Duration::from_secs(5));
        assert_eq!(
            machine.on(Input::Tick, moment()),
            [Effect::Spawn {
                which: Which::Main,
                model_path: "/m".into(),
                generation: 0
            }]
        );
    }
}
