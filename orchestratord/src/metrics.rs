//! orchestratord's Prometheus metrics (prefix `orchestratord_`, base units, `_total` counters),
//! kept with `prometheus-client`, and the per-model load signals a fleet's endpoint picker scrapes
//! (vLLM's names, computed at scrape time from the queue and the leases). Labels come from fixed
//! sets only (class, reason, and the configured models).

use daemon_support::exposition::Format;
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

    /// Every metric in `format`: orchestratord's own, then the model-server signals of `models`.
    pub fn render(&self, format: Format, models: &[ModelLoad]) -> String {
        let mut text = String::new();
        let signals = model_server_signals(models);
        for registry in [&self.registry, &signals] {
            if let Err(error) =
                prometheus_client::encoding::text::encode_registry(&mut text, registry)
            {
                tracing::error!(%error, "cannot encode metrics");
            }
        }
        format.render(&text)
    }
}

/// One model's load on this host, as a fleet's endpoint picker reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLoad {
    pub model: String,
    /// Requests in orchestratord's queue for the model.
    pub waiting: u64,
    /// Slots held by leases on the model's pools (every client of pool-managerd).
    pub running: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model_name: String,
}

/// `text` escaped for a label value, which prometheus-client writes as it is given (a model id
/// with a quote or a backslash would otherwise break the whole exposition).
fn label_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The gauges of the Gateway API Inference Extension's model-server protocol
/// (`docs/proposals/003-model-server-protocol` at its release v1.6.0, whose endpoint picker reads
/// vLLM's names by default), one series per model, labelled `model_name` as vLLM labels them.
/// KV-cache utilisation (`vllm:kv_cache_usage_perc`) is left out: llama-server reports no KV
/// gauge in the build used here, and slot occupancy is not KV use.
fn model_server_signals(models: &[ModelLoad]) -> Registry {
    let mut registry = Registry::default();
    let waiting = Family::<ModelLabels, Gauge>::default();
    let running = Family::<ModelLabels, Gauge>::default();
    for load in models {
        let labels = ModelLabels {
            model_name: label_value(&load.model),
        };
        waiting
            .get_or_create(&labels)
            .set(i64::try_from(load.waiting).unwrap_or(i64::MAX));
        running
            .get_or_create(&labels)
            .set(i64::try_from(load.running).unwrap_or(i64::MAX));
    }
    registry.register(
        "vllm:num_requests_waiting",
        "Requests waiting in orchestratord's queue for the model (model-server protocol: TotalQueuedRequests)",
        waiting,
    );
    registry.register(
        "vllm:num_requests_running",
        "Slots held by leases on the model's pools (model-server protocol: TotalRunningRequests)",
        running,
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_id_with_quotes_and_backslashes_stays_one_valid_label_value() {
        let text = Metrics::new().render(
            Format::PrometheusText,
            &[ModelLoad {
                model: "a\"b\\c".into(),
                waiting: 6,
                running: 4,
            }],
        );
        assert!(
            text.contains("vllm:num_requests_waiting{model_name=\"a\\\"b\\\\c\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("vllm:num_requests_running{model_name=\"a\\\"b\\\\c\"} 4"),
            "{text}"
        );
    }
}
