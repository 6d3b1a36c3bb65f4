//! Health probing of engines the sidecar does not start (DESIGN.md §5, issue 2's scope): one
//! task per pool GETs the engine's health endpoint every interval and reports what it found to
//! the registry, which decides the state (thresholds live there, not here). Probes never send a
//! generation. For llama.cpp engines the version comes from `/props` (`build_info`).

use crate::config::PoolConfig;
use crate::engine_http::EngineHttp;
use crate::registry::{ProbeReport, RegistryHandle};
use pool_ipc::registry::EngineKind;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Probes one pool until `shutdown`.
pub async fn probe_pool(pool: PoolConfig, registry: RegistryHandle, shutdown: CancellationToken) {
    let engine = EngineHttp::new(&pool.endpoint);
    let mut version_known = false;
    loop {
        let mut report = probe_once(&engine, &pool).await;
        if report.result.is_ok() && !version_known && pool.engine == EngineKind::Llamacpp {
            report.engine_version = engine_version(&engine, &pool).await;
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

async fn probe_once(engine: &EngineHttp, pool: &PoolConfig) -> ProbeReport {
    let result = match engine.get(&pool.health_path, pool.probe.timeout()).await {
        Ok((status, _)) if status.is_success() => Ok(()),
        Ok((status, _)) => Err(format!("{} answered HTTP {status}", pool.health_path)),
        Err(error) => Err(format!("{}: {error}", pool.health_path)),
    };
    ProbeReport {
        at_unix_ms: unix_ms_now(),
        result,
        engine_version: None,
    }
}

/// llama-server's `/props` carries `build_info` (e.g. "b6423-0c1e570").
async fn engine_version(engine: &EngineHttp, pool: &PoolConfig) -> Option<String> {
    let (status, body) = engine.get("/props", pool.probe.timeout()).await.ok()?;
    if !status.is_success() {
        return None;
    }
    let props: serde_json::Value = serde_json::from_slice(&body).ok()?;
    props
        .get("build_info")
        .and_then(|value| value.as_str())
        .map(str::to_owned)
}
