//! pool-managerd's OpenTelemetry spans (docs/operations.md, "Tracing"), made only when
//! `server.otlp_endpoint` is configured: every caller holds `Option<Tracer>` and, when it is
//! `None`, makes nothing.
//!
//! - `acquire` (server): one Acquire on the socket, a child of the caller's span when the
//!   Acquire carries its `traceparent` (orchestratord's `acquire` span), else a root;
//! - `release` (server): one Release, a root (a Release carries no trace context);
//! - `probe`: one health probe of an engine, a root;
//! - `start`, `restart`, `load`, `reload`: one start of a managed engine, from its spawn until it
//!   is ready (or the start failed, or it was stopped first), a root; [`EngineStarts`] keeps them
//!   for one pool's supervisor.
//!
//! Spans end in the batch exporter's queue (`daemon_support::trace_export`): nothing here waits
//! for the collector, and nothing runs inside the registry's actor.

use crate::registry::{EngineReport, ProbeReport};
use crate::supervisor::machine::{Effect, Which};
use daemon_support::trace_export::{self, Tracer};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use pool_ipc::error_code::IpcError;
use pool_ipc::registry::{AcquireTarget, Lease, LeaseId, PoolId, ReleaseOutcome};

/// The span of one Acquire, a child of `trace_parent`'s span when it names one.
pub fn acquire(
    tracer: &Tracer,
    trace_parent: Option<&str>,
    target: &AcquireTarget,
    slots: u32,
    task_id: &str,
) -> Context {
    let parent = trace_parent
        .and_then(trace_export::parent_from_traceparent)
        .unwrap_or_default();
    let (kind, name) = match target {
        AcquireTarget::Pool(pool) => ("pool", pool.as_str()),
        AcquireTarget::Model(model) => ("model", model.as_str()),
    };
    let span = tracer
        .span_builder("acquire")
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("pool_managerd.target", format!("{kind}:{name}")),
            KeyValue::new("pool_managerd.slots", i64::from(slots)),
            KeyValue::new("correlation_id", task_id.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    parent.with_span(span)
}

/// Ends an Acquire's span with the registry's answer.
pub fn acquired(span: Context, result: &Result<Lease, IpcError>) {
    if let Ok(lease) = result {
        span.span().set_attributes([
            KeyValue::new("pool_managerd.lease", lease.id.to_string()),
            KeyValue::new("pool_managerd.pool", lease.pool.as_str().to_owned()),
        ]);
    }
    end_with(span, result.as_ref().err());
}

/// The span of one Release.
pub fn release(tracer: &Tracer, lease: LeaseId, outcome: ReleaseOutcome) -> Context {
    let span = tracer
        .span_builder("release")
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("pool_managerd.lease", lease.to_string()),
            KeyValue::new("pool_managerd.outcome", outcome.name()),
        ])
        .start(tracer);
    Context::new().with_span(span)
}

/// Ends a Release's span with the registry's answer.
pub fn released(span: Context, result: &Result<(), IpcError>) {
    end_with(span, result.as_ref().err());
}

fn end_with(span: Context, error: Option<&IpcError>) {
    let span = span.span();
    if let Some(error) = error {
        span.set_attribute(KeyValue::new("error.type", error.code.name()));
        span.set_status(Status::error(error.message.clone()));
    }
    span.end();
}

/// The span of one health probe of `pool`'s engine.
pub fn probe(tracer: &Tracer, pool: &PoolId, path: &str) -> Context {
    let span = tracer
        .span_builder("probe")
        .with_kind(SpanKind::Client)
        .with_attributes([
            KeyValue::new("pool_managerd.pool", pool.as_str().to_owned()),
            KeyValue::new("url.path", path.to_owned()),
        ])
        .start(tracer);
    Context::new().with_span(span)
}

/// Ends a probe's span with what it found.
pub fn probed(span: Context, report: &ProbeReport) {
    let span = span.span();
    span.set_attributes([
        KeyValue::new("pool_managerd.alive", report.alive),
        KeyValue::new("pool_managerd.ready", report.result.is_ok()),
    ]);
    if let Err(error) = &report.result {
        span.set_status(Status::error(error.clone()));
    }
    span.end();
}

/// The spans of one pool's engine starts, kept by its supervisor: each from the spawn of an
/// engine until the engine is ready, its start failed, or it was stopped first. Named by what
/// the start is: `start` (the supervisor's first), `load` (an on-demand pool's), `reload` (a
/// reload's new engine beside the old one), `restart` (any later start of the main engine: after
/// an exit, failed probes, an operator's restart or a drain-first reload).
#[derive(Debug)]
pub struct EngineStarts {
    tracer: Option<Tracer>,
    pool: PoolId,
    main: Option<Context>,
    candidate: Option<Context>,
    /// The machine reported Loading: the next main spawn is a load.
    loading: bool,
    /// A main engine ran before (or was adopted): the next main spawn is not the first start.
    started_before: bool,
}

impl EngineStarts {
    pub fn new(tracer: Option<Tracer>, pool: PoolId) -> EngineStarts {
        EngineStarts {
            tracer,
            pool,
            main: None,
            candidate: None,
            loading: false,
            started_before: false,
        }
    }

    /// An adopted engine ran before: the next start of the main engine is a restart.
    pub fn adopted(&mut self) {
        self.started_before = true;
    }

    /// Follows the supervisor's `effect`, before it is carried out.
    pub fn before(&mut self, effect: &Effect) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        match effect {
            Effect::Report(EngineReport::Loading) => self.loading = true,
            Effect::Spawn {
                which, model_path, ..
            } => {
                let name = match which {
                    Which::Candidate => "reload",
                    _ if self.loading => "load",
                    _ if self.started_before => "restart",
                    _ => "start",
                };
                let span = tracer
                    .span_builder(name)
                    .with_attributes([
                        KeyValue::new("pool_managerd.pool", self.pool.as_str().to_owned()),
                        KeyValue::new("pool_managerd.model_path", model_path.clone()),
                    ])
                    .start(tracer);
                let span = Context::new().with_span(span);
                if let Some(previous) = self.slot(*which).and_then(|slot| slot.replace(span)) {
                    end(previous, "superseded", None);
                }
                if *which == Which::Main {
                    self.loading = false;
                    self.started_before = true;
                }
            }
            Effect::Report(EngineReport::Spawned { restarts, .. }) => {
                if let Some(main) = &self.main {
                    main.span().set_attribute(KeyValue::new(
                        "pool_managerd.restarts",
                        i64::from(*restarts),
                    ));
                }
            }
            Effect::Report(EngineReport::Ready { .. }) => self.finish(Which::Main, "ready", None),
            Effect::Report(EngineReport::Swapped { .. }) => {
                self.finish(Which::Candidate, "ready", None);
            }
            Effect::Report(EngineReport::Down { reason, .. }) => {
                self.finish(Which::Main, "down", Some(reason));
            }
            Effect::Stop(which) => self.finish(*which, "stopped", None),
            Effect::Promote => {
                if let Some(candidate) = self.candidate.take()
                    && let Some(previous) = self.main.replace(candidate)
                {
                    end(previous, "superseded", None);
                }
            }
            _ => {}
        }
    }

    /// The engine `which` was spawned as `pid`.
    pub fn spawned(&mut self, which: Which, pid: u32) {
        if let Some(Some(span)) = self.slot(which) {
            span.span()
                .set_attribute(KeyValue::new("pool_managerd.pid", i64::from(pid)));
        }
    }

    /// The engine `which` could not be spawned.
    pub fn spawn_failed(&mut self, which: Which, reason: &str) {
        self.finish(which, "spawn_failed", Some(reason));
    }

    /// The engine `which` exited before it was ready.
    pub fn exited(&mut self, which: Which, status: &str) {
        self.finish(which, "exited", Some(status));
    }

    fn finish(&mut self, which: Which, outcome: &'static str, error: Option<&str>) {
        if let Some(span) = self.slot(which).and_then(Option::take) {
            end(span, outcome, error);
        }
    }

    /// Where the start span of `which` is kept; an outgoing engine's start is long over.
    fn slot(&mut self, which: Which) -> Option<&mut Option<Context>> {
        match which {
            Which::Main => Some(&mut self.main),
            Which::Candidate => Some(&mut self.candidate),
            Which::Outgoing => None,
        }
    }
}

fn end(span: Context, outcome: &'static str, error: Option<&str>) {
    let span = span.span();
    span.set_attribute(KeyValue::new("pool_managerd.outcome", outcome));
    if let Some(error) = error {
        span.set_status(Status::error(error.to_owned()));
    }
    span.end();
}
