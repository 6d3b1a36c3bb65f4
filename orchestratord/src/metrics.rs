//! orchestratord's Prometheus metrics (prefix `orchestratord_`, base units, `_total` counters),
//! kept with `prometheus-client`. Labels come from fixed sets only (class, reason).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub queue_depth: Family<ClassLabels, Gauge>,
    pub queue_wait: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub request_duration: Histogram,
    pub dispatch: Histogram,
    pub rejections: Family<ReasonLabels, Counter>,
    pub cancellations: Counter,
    pub engine_retries: Family<ReasonLabels, Counter>,
    pub in_flight: Gauge,
    pub tokens_in: Counter,
    pub tokens_out: Counter,
    pub sidecar_connected: Gauge,
    pub sessions: Gauge,
}

/// 100 µs to ~100 s in 16 doubling steps.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("orchestratord");
        let metrics = Metrics {
            registry: Registry::default(),
            queue_depth: Family::default(),
            queue_wait: seconds_histogram(),
            time_to_first_token: seconds_histogram(),
            inter_token: seconds_histogram(),
            request_duration: seconds_histogram(),
            dispatch: seconds_histogram(),
            rejections: Family::default(),
            cancellations: Counter::default(),
            engine_retries: Family::default(),
            in_flight: Gauge::default(),
            tokens_in: Counter::default(),
            tokens_out: Counter::default(),
            sidecar_connected: Gauge::default(),
            sessions: Gauge::default(),
        };
        registry.register(
            "queue_depth",
            "Requests waiting for a slot, by class",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from admission to a granted slot",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to first token relayed",
            metrics.time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between relayed tokens",
            metrics.inter_token.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to its last byte",
            metrics.request_duration.clone(),
        );
        registry.register(
            "dispatch_seconds",
            "Acquire round trips to pool-managerd",
            metrics.dispatch.clone(),
        );
        registry.register(
            "rejections",
            "Requests refused, by reason",
            metrics.rejections.clone(),
        );
        registry.register(
            "cancellations",
            "Requests whose client went away or cancelled",
            metrics.cancellations.clone(),
        );
        registry.register(
            "engine_retries",
            "Requests placed again on another pool after their engine failed before answering, by the failure",
            metrics.engine_retries.clone(),
        );
        registry.register(
            "in_flight",
            "Requests holding a slot",
            metrics.in_flight.clone(),
        );
        registry.register(
            "tokens_in",
            "Prompt tokens of completed requests",
            metrics.tokens_in.clone(),
        );
        registry.register(
            "tokens_out",
            "Tokens generated for completed requests",
            metrics.tokens_out.clone(),
        );
        registry.register(
            "sidecar_connected",
            "1 while connected to pool-managerd",
            metrics.sidecar_connected.clone(),
        );
        registry.register(
            "sessions",
            "Native sessions remembered (bounded by sessions.max_sessions)",
            metrics.sessions.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn set_queue_depth(&self, interactive: usize, batch: usize) {
        for (class, depth) in [("interactive", interactive), ("batch", batch)] {
            self.queue_depth
                .get_or_create(&ClassLabels { class })
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
    }

    pub fn observe(histogram: &Histogram, elapsed: Duration) {
        histogram.observe(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "cannot encode metrics");
        }
        text
    }
}
