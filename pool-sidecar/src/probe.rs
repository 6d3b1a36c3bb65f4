//! Health probes: one GET of the engine's health endpoint, judged twice — any answer means
//! alive, a 2xx means ready — and reported to the registry, which applies the thresholds. Probes
//! never send a generation. External engines get a probing task here; managed engines are probed
//! by their supervisor with the same [`check`], which makes each probe's span when spans are
//! exported. llama.cpp's `/props` gives slots and version.

use crate::config::PoolConfig;
use crate::engine_http::EngineHttp;
use crate::registry::{ProbeReport, RegistryHandle};
use crate::spans;
use daemon_support::trace_export::Tracer;
use pool_ipc::registry::{Endpoint, EngineKind};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Probes one externally run engine until `shutdown`.
pub async fn probe_pool(
    pool: PoolConfig,
    endpoint: Endpoint,
    registry: RegistryHandle,
    tracer: Option<Tracer>,
    shutdown: CancellationToken,
) {
    let engine = EngineHttp::new(&endpoint);
    let mut version_known = false;
    loop {
        let mut report = check(&engine, &pool, tracer.as_ref()).await;
        if report.result.is_ok() && !version_known {
            report.engine_version = engine_props(&engine, &pool).await.version;
            version_known = report.engine_version.is_some();
        }
        if let Err(error) = &report.result {
            tracing::debug!(pool = %pool.id, %error, "probe failed");
        }
        registry.record_probe(pool.id.clone(), report);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pool.probe.interval()) => {}
        }
    }
}

/// One probe of the health endpoint: any answer proves the engine alive; a 2xx, ready. Its span
/// is made with `tracer`, when there is one.
pub async fn check(engine: &EngineHttp, pool: &PoolConfig, tracer: Option<&Tracer>) -> ProbeReport {
    let span = tracer.map(|tracer| spans::probe(tracer, &pool.id, &pool.health_path));
    let (alive, result) = match engine.get(&pool.health_path, pool.probe.timeout()).await {
        Ok((status, _)) if status.is_success() => (true, Ok(())),
        Ok((status, _)) => (
            true,
            Err(format!("{} answered HTTP {status}", pool.health_path)),
        ),
        Err(error) => (false, Err(format!("{}: {error}", pool.health_path))),
    };
    let report = ProbeReport {
        at_unix_ms: unix_ms_now(),
        result,
        alive,
        engine_version: None,
    };
    if let Some(span) = span {
        spans::probed(span, &report);
    }
    report
}

/// What a llama.cpp engine says about itself in `/props`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EngineProps {
    pub total_slots: Option<u32>,
    /// `build_info`, e.g. "b6423-0c1e570".
    pub version: Option<String>,
}

pub async fn engine_props(engine: &EngineHttp, pool: &PoolConfig) -> EngineProps {
    if pool.engine != EngineKind::Llamacpp {
        return EngineProps::default();
    }
    let Ok((status, body)) = engine.get("/props", pool.probe.timeout()).await else {
        return EngineProps::default();
    };
    if !status.is_success() {
        return EngineProps::default();
    }
    let Ok(props) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return EngineProps::default();
    };
    EngineProps {
        total_slots: props
            .get("total_slots")
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok()),
        version: props
            .get("build_info")
            .and_then(|value| value.as_str())
            .map(str::to_owned),
    }
}
