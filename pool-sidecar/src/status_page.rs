//! The status page the debug shim serves at `/status`: pools (state, model, footprint, slots,
//! restarts, last error), GPUs (memory, the pools on each) and, when
//! `debug_http.orchestrator_metrics_url` names orchestratord's `/metrics`, its live figures
//! (tokens/s, requests in flight, queue depth, TTFT p50 over the last minute of streams, requests
//! answered). One HTML file embedded in the binary, rendered on the server for the first paint
//! (useful without script), then kept current by its inline script from `/status/events` (SSE,
//! one whole view a second). It shows what the shim's open views show — never engine addresses or
//! log lines — and follows the shim's token rules.
//!
//! orchestratord's figures come from a [`OrchestratorFeed`] that scrapes its `/metrics` every
//! second and keeps a minute of samples, so rates and the TTFT percentile are over a window
//! rather than since its start.

use crate::engine_http::EngineHttp;
use crate::status_view::PoolStatusView;
use pool_ipc::registry::{Endpoint, GpuInventory, MemoryReport, RegistrySnapshot};
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TEMPLATE: &str = include_str!("status_page.html");

/// How often the feed scrapes and the page is sent a new view.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The window of the TTFT percentile.
const TTFT_WINDOW: Duration = Duration::from_secs(60);

/// The window of the token rate.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// orchestratord's `/metrics`, as `debug_http.orchestrator_metrics_url` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsUrl {
    pub authority: String,
    pub path: String,
}

impl MetricsUrl {
    /// An `http://host:port/path` URL (the path defaults to `/metrics`).
    pub fn parse(text: &str) -> Result<MetricsUrl, String> {
        let bad = || {
            format!(
                "debug_http.orchestrator_metrics_url {text:?} is not an http://host:port/path URL"
            )
        };
        let uri: hyper::Uri = text.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") || uri.query().is_some() {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.port().is_none() {
            return Err(bad());
        }
        let path = match uri.path() {
            "" | "/" => "/metrics".to_owned(),
            path => path.to_owned(),
        };
        Ok(MetricsUrl {
            authority: authority.as_str().to_owned(),
            path,
        })
    }
}

/// orchestratord's figures as the page shows them; `None`: not known (yet).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveFigures {
    pub tokens_per_second: Option<f64>,
    pub in_flight: Option<f64>,
    pub queue_depth: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    /// Requests orchestratord ended (completed or failed) since it started.
    pub requests_total: Option<f64>,
    /// Why the last scrape failed.
    pub error: Option<String>,
}

/// One scrape of orchestratord's `/metrics`: what the figures are computed from.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    at: Instant,
    tokens_out: f64,
    in_flight: f64,
    queue_depth: f64,
    /// TTFT histogram: cumulative counts by upper bound, ascending.
    ttft_buckets: Vec<(f64, f64)>,
    /// Requests ended (completed or failed: the request-duration histogram's count).
    answered: f64,
}

impl Sample {
    /// The figures of interest in a Prometheus text exposition; `None` when it has none of them.
    fn parse(text: &str, at: Instant) -> Option<Sample> {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).ok()?;
        let mut sample = Sample {
            at,
            tokens_out: 0.0,
            in_flight: 0.0,
            queue_depth: 0.0,
            ttft_buckets: Vec::new(),
            answered: 0.0,
        };
        let mut seen = false;
        for metric in scrape.samples {
            use prometheus_parse::Value;
            match (metric.metric.as_str(), metric.value) {
                (
                    "orchestratord_tokens_out_total",
                    Value::Counter(value) | Value::Untyped(value),
                ) => {
                    sample.tokens_out = value;
                    seen = true;
                }
                ("orchestratord_in_flight", Value::Gauge(value) | Value::Untyped(value)) => {
                    sample.in_flight = value;
                }
                ("orchestratord_queue_depth", Value::Gauge(value) | Value::Untyped(value)) => {
                    sample.queue_depth += value;
                }
                ("orchestratord_time_to_first_token_seconds", Value::Histogram(buckets)) => {
                    let mut buckets: Vec<(f64, f64)> = buckets
                        .into_iter()
                        .map(|bucket| (bucket.less_than, bucket.count))
                        .collect();
                    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    sample.ttft_buckets = buckets;
                }
                ("orchestratord_request_duration_seconds", Value::Histogram(buckets)) => {
                    sample.answered = buckets
                        .iter()
                        .map(|bucket| bucket.count)
                        .fold(0.0, f64::max);
                }
                _ => {}
            }
        }
        seen.then_some(sample)
    }
}

/// The median of the observations between two cumulative histograms, interpolated within its
/// bucket as Prometheus's `histogram_quantile` does; `None` without observations.
fn median_between(older: &[(f64, f64)], newer: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = newer
        .iter()
        .map(|&(bound, count)| {
            let before = older
                .iter()
                .find(|(old_bound, _)| *old_bound == bound)
                .map_or(0.0, |(_, old)| *old);
            (bound, (count - before).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = total / 2.0;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (bound, count) in delta {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let in_bucket = count - lower_count;
            let fraction = if in_bucket > 0.0 {
                (rank - lower_count) / in_bucket
            } else {
                0.0
            };
            return Some(lower_bound + (bound - lower_bound) * fraction);
        }
        lower_bound = bound;
        lower_count = count;
    }
    None
}

/// Scrapes orchestratord's `/metrics` (see the module header).
pub struct OrchestratorFeed {
    url: MetricsUrl,
    http: EngineHttp,
    state: Mutex<FeedState>,
}

#[derive(Default)]
struct FeedState {
    samples: VecDeque<Sample>,
    error: Option<String>,
}

impl OrchestratorFeed {
    pub fn new(url: MetricsUrl) -> OrchestratorFeed {
        let http = EngineHttp::new(&Endpoint::Http {
            authority: url.authority.clone(),
        });
        OrchestratorFeed {
            url,
            http,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Scrapes every [`REFRESH`] until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.scrape().await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESH) => {}
            }
        }
    }

    async fn scrape(&self) {
        let answer = self.http.get(&self.url.path, REFRESH).await;
        let now = Instant::now();
        let outcome = match answer {
            Ok((status, body)) if status.is_success() => {
                Sample::parse(&String::from_utf8_lossy(&body), now)
                    .ok_or_else(|| format!("{} has no orchestratord metrics", self.url.path))
            }
            Ok((status, _)) => Err(format!("{} answered {status}", self.url.path)),
            Err(error) => Err(error),
        };
        let mut state = self.state();
        match outcome {
            Ok(sample) => {
                state.error = None;
                state.samples.push_back(sample);
                while state
                    .samples
                    .front()
                    .is_some_and(|oldest| now.duration_since(oldest.at) > TTFT_WINDOW + REFRESH)
                {
                    state.samples.pop_front();
                }
            }
            Err(error) => state.error = Some(error),
        }
    }

    /// The figures from the samples kept.
    pub fn figures(&self) -> LiveFigures {
        let state = self.state();
        let Some(latest) = state.samples.back() else {
            return LiveFigures {
                error: state.error.clone(),
                ..LiveFigures::default()
            };
        };
        let within = |window: Duration| {
            state
                .samples
                .iter()
                .find(|sample| latest.at.duration_since(sample.at) <= window)
        };
        let tokens_per_second = within(RATE_WINDOW)
            .filter(|earlier| earlier.at < latest.at)
            .map(|earlier| {
                (latest.tokens_out - earlier.tokens_out).max(0.0)
                    / latest.at.duration_since(earlier.at).as_secs_f64()
            });
        let ttft_p50_ms = within(TTFT_WINDOW).and_then(|earlier| {
            let older = if earlier.at < latest.at {
                earlier.ttft_buckets.as_slice()
            } else {
                &[]
            };
            median_between(older, &latest.ttft_buckets).map(|seconds| seconds * 1000.0)
        });
        LiveFigures {
            tokens_per_second,
            in_flight: Some(latest.in_flight),
            queue_depth: Some(latest.queue_depth),
            ttft_p50_ms,
            requests_total: Some(latest.answered),
            error: state.error.clone(),
        }
    }
}

/// One pool as the page shows it.
#[derive(Debug, Clone, Serialize)]
struct PoolRow {
    pool: String,
    model: String,
    state: &'static str,
    device: Option<String>,
    footprint_bytes: Option<u64>,
    measured: bool,
    slots_total: u32,
    slots_free: u32,
    restarts: u32,
    last_error: Option<String>,
}

/// One GPU as the page shows it.
#[derive(Debug, Clone, Serialize)]
struct GpuRow {
    index: u32,
    name: String,
    memory_used_bytes: u64,
    memory_total_bytes: u64,
    pools: Vec<String>,
}

/// Everything the page shows at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    epoch: u64,
    pools: Vec<PoolRow>,
    gpus: Vec<GpuRow>,
    /// `None`: orchestratord's figures are not configured.
    live: Option<LiveFigures>,
}

impl StatusView {
    pub fn new(
        snapshot: &RegistrySnapshot,
        memory: &MemoryReport,
        gpus: &GpuInventory,
        live: Option<LiveFigures>,
    ) -> StatusView {
        let pools = snapshot
            .pools
            .iter()
            .map(|pool| {
                let footprint = memory
                    .pools
                    .iter()
                    .find(|footprint| footprint.pool == pool.pool_id);
                PoolRow {
                    pool: pool.pool_id.to_string(),
                    model: pool.model.clone(),
                    state: pool.state.name(),
                    device: footprint.map(|footprint| footprint.device.clone()),
                    footprint_bytes: footprint.and_then(|footprint| footprint.footprint_bytes),
                    measured: footprint.is_some_and(|footprint| footprint.measured),
                    slots_total: pool.slots_total,
                    slots_free: pool.slots_free,
                    restarts: pool.restarts,
                    // Without the engine's last output: log lines are for the token only.
                    last_error: PoolStatusView::from(pool)
                        .without_engine_details()
                        .last_error,
                }
            })
            .collect();
        let gpus = gpus
            .gpus
            .iter()
            .map(|gpu| {
                let device = format!("gpu{}", gpu.index);
                GpuRow {
                    index: gpu.index,
                    name: gpu.name.clone(),
                    memory_used_bytes: gpu.memory_used_bytes,
                    memory_total_bytes: gpu.memory_total_bytes,
                    pools: memory
                        .pools
                        .iter()
                        .filter(|footprint| footprint.device == device)
                        .map(|footprint| footprint.pool.to_string())
                        .collect(),
                }
            })
            .collect();
        StatusView {
            epoch: snapshot.epoch,
            pools,
            gpus,
            live,
        }
    }

    /// The page with this view rendered in (the first paint).
    pub fn html(&self) -> String {
        let mut pools = String::new();
        for pool in &self.pools {
            let footprint = match pool.footprint_bytes {
                None => "–".to_owned(),
                Some(bytes) => format!(
                    "{}{} on {}",
                    mib(Some(bytes)),
                    if pool.measured { "" } else { " (est.)" },
                    pool.device.as_deref().unwrap_or("?")
                ),
            };
            let _ = write!(
                pools,
                "<tr data-id=\"{id}\"><td>{id}</td><td>{model}</td><td class=\"state-{state}\">{state}</td><td>{footprint}</td><td>{used} / {total}</td><td>{restarts}</td><td class=\"error\">{error}</td></tr>",
                id = escape(&pool.pool),
                model = escape(&pool.model),
                state = pool.state,
                footprint = escape(&footprint),
                used = pool.slots_total.saturating_sub(pool.slots_free),
                total = pool.slots_total,
                restarts = pool.restarts,
                error = escape(pool.last_error.as_deref().unwrap_or("")),
            );
        }
        let mut gpus = String::new();
        for gpu in &self.gpus {
            let _ = write!(
                gpus,
                "<tr data-id=\"gpu{index}\"><td>gpu{index}</td><td>{name}</td><td>{used} / {total}</td><td>{pools}</td></tr>",
                index = gpu.index,
                name = escape(&gpu.name),
                used = mib(Some(gpu.memory_used_bytes)),
                total = mib(Some(gpu.memory_total_bytes)),
                pools = escape(&gpu.pools.join(", ")),
            );
        }
        let live = match &self.live {
            None => {
                "orchestratord's figures are not configured (debug_http.orchestrator_metrics_url)."
                    .to_owned()
            }
            Some(live) => {
                let number = |value: Option<f64>, digits: usize| {
                    value.map_or_else(|| "–".to_owned(), |value| format!("{value:.digits$}"))
                };
                let mut html = format!(
                    "<div class=\"figures\"><div class=\"figure\" id=\"tokens-per-second\"><b>{}</b>tokens/s</div><div class=\"figure\" id=\"in-flight\"><b>{}</b>requests in flight</div><div class=\"figure\" id=\"queue-depth\"><b>{}</b>queued</div><div class=\"figure\" id=\"ttft-p50\"><b>{}</b>TTFT p50, last minute (ms)</div><div class=\"figure\" id=\"requests\"><b>{}</b>requests answered</div></div>",
                    number(live.tokens_per_second, 1),
                    number(live.in_flight, 0),
                    number(live.queue_depth, 0),
                    number(live.ttft_p50_ms, 1),
                    number(live.requests_total, 0),
                );
                if let Some(error) = &live.error {
                    let _ = write!(
                        html,
                        "<p class=\"error\">orchestratord: {}</p>",
                        escape(error)
                    );
                }
                html
            }
        };
        TEMPLATE
            .replace("{{epoch}}", &self.epoch.to_string())
            .replace("{{live}}", &live)
            .replace("{{pools}}", &pools)
            .replace("{{gpus}}", &gpus)
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "?".to_owned(),
        |bytes| format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    )
}

/// Text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# TYPE orchestratord_tokens_out_total counter
orchestratord_tokens_out_total 100
# TYPE orchestratord_in_flight gauge
orchestratord_in_flight 2
# TYPE orchestratord_queue_depth gauge
orchestratord_queue_depth{class=\"batch\"} 1
orchestratord_queue_depth{class=\"interactive\"} 3
# TYPE orchestratord_time_to_first_token_seconds histogram
orchestratord_time_to_first_token_seconds_sum 1.0
orchestratord_time_to_first_token_seconds_count 4
orchestratord_time_to_first_token_seconds_bucket{le=\"0.01\"} 1
orchestratord_time_to_first_token_seconds_bucket{le=\"0.1\"} 3
orchestratord_time_to_first_token_seconds_bucket{le=\"+Inf\"} 4
# TYPE orchestratord_request_duration_seconds histogram
orchestratord_request_duration_seconds_sum 3.0
orchestratord_request_duration_seconds_count 6
orchestratord_request_duration_seconds_bucket{le=\"1.0\"} 5
orchestratord_request_duration_seconds_bucket{le=\"+Inf\"} 6
";

    #[test]
    fn figures_come_from_orchestratords_metrics_over_their_windows() {
        let start = Instant::now();
        let first = Sample::parse(METRICS, start).unwrap_or_else(|| panic!("no sample"));
        assert_eq!(
            (first.tokens_out, first.in_flight, first.queue_depth),
            (100.0, 2.0, 4.0)
        );
        assert_eq!(first.answered, 6.0);
        // Four observations: the median, the second, lies in (0.01, 0.1].
        let median = median_between(&[], &first.ttft_buckets).unwrap_or_default();
        assert!((0.01..=0.1).contains(&median), "{median}");
        let later_text = METRICS
            .replace("tokens_out_total 100", "tokens_out_total 150")
            .replace("bucket{le=\"0.01\"} 1", "bucket{le=\"0.01\"} 5")
            .replace("bucket{le=\"0.1\"} 3", "bucket{le=\"0.1\"} 7")
            .replace("bucket{le=\"+Inf\"} 4", "bucket{le=\"+Inf\"} 8")
            .replace("bucket{le=\"+Inf\"} 6", "bucket{le=\"+Inf\"} 9");
        let later = Sample::parse(&later_text, start + Duration::from_secs(2))
            .unwrap_or_else(|| panic!("no sample"));
        // Between the two: four new observations, all at most 10 ms.
        let median = median_between(&first.ttft_buckets, &later.ttft_buckets).unwrap_or_default();
        assert!(median <= 0.01, "{median}");
        let feed = OrchestratorFeed::new(MetricsUrl {
            authority: "127.0.0.1:1".into(),
            path: "/metrics".into(),
        });
        feed.state().samples.extend([first, later]);
        let figures = feed.figures();
        assert_eq!(figures.tokens_per_second, Some(25.0));
        assert_eq!(figures.requests_total, Some(9.0));
        assert!(figures.ttft_p50_ms.is_some_and(|ms| ms <= 10.0));
        assert_eq!(Sample::parse("# nothing here\n", start), None);
    }

    #[test]
    fn only_http_urls_with_a_port_are_taken() {
        assert_eq!(
            MetricsUrl::parse("http://127.0.0.1:8080"),
            Ok(MetricsUrl {
                authority: "127.0.0.1:8080".into(),
                path: "/metrics".into()
            })
        );
        assert_eq!(
            MetricsUrl::parse("http://127.0.0.1:8080/custom").map(|url| url.path),
            Ok("/custom".into())
        );
        for bad in [
            "https://h:1/metrics",
            "h:1",
            "http://h/metrics",
            "http://h:1/m?x=1",
            "",
        ] {
            assert!(MetricsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_from_the_config_are_escaped_in_the_first_paint() {
        assert_eq!(
            escape("<b a=\"x\">&'"),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
