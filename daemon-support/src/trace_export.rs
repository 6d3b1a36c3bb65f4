//! Spans to an OpenTelemetry collector (docs/operations.md, "Tracing"). When a daemon's
//! `otlp_endpoint` is configured, [`TraceExport::start`] makes its [`Tracer`]; every span it ends
//! goes into the SDK's batch processor, whose own thread exports batches over OTLP/HTTP
//! (protobuf), so a request never waits for the collector (a full queue drops spans, it never
//! blocks). [`TraceExport::shutdown`] exports what is still queued. Without an endpoint there is
//! no tracer at all: the daemons hold `Option<Tracer>`, check it once per unit of work (a request,
//! an Acquire, a probe) and make no span, context or header when it is `None`.
//!
//! The export's HTTP client is hyper-util's, already the daemons' own, over plain http (a
//! collector on this host or network; no TLS stack is linked for it). It runs on the daemon's
//! tokio runtime: the batch thread hands each export over and waits for it.
//!
//! Also here: the W3C Trace Context conversions both daemons need, between a span's context and
//! the `traceparent` (and `tracestate`) that carries it in HTTP headers and in an Acquire.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{HeaderMap, Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use std::time::Duration;

pub use opentelemetry_sdk::trace::SdkTracer as Tracer;

/// One export may take this long (connecting included) before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`TraceExport::shutdown`] waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A collector's answer is a small protobuf message; anything larger is not read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The spans' path under the endpoint (OTLP/HTTP's default for traces).
const TRACES_PATH: &str = "/v1/traces";

#[derive(Debug, thiserror::Error)]
pub enum TraceExportError {
    #[error(
        "{value:?} is not usable: {why} (give the base URL of an OTLP/HTTP collector, e.g. \"http://127.0.0.1:4318\"; spans go to its {TRACES_PATH})"
    )]
    Endpoint { value: String, why: &'static str },
    #[error("cannot set up the OTLP span exporter: {0}")]
    Exporter(String),
}

/// Where spans go: the `http://` base URL of an OTLP/HTTP collector, as configured; spans are
/// posted to its `/v1/traces`, as OpenTelemetry's `OTEL_EXPORTER_OTLP_ENDPOINT` would have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    configured: String,
    traces: Uri,
}

impl OtlpEndpoint {
    pub fn parse(text: &str) -> Result<OtlpEndpoint, TraceExportError> {
        let invalid = |why| TraceExportError::Endpoint {
            value: text.to_owned(),
            why,
        };
        let uri: Uri = text.trim().parse().map_err(|_| invalid("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https is not supported: export over plain http to a collector on this host or network",
                ));
            }
            _ => return Err(invalid("not an http:// URL")),
        }
        let Some(authority) = uri.authority() else {
            return Err(invalid("no host"));
        };
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(invalid("a query is not supported"));
        }
        let base = uri.path().trim_end_matches('/');
        let traces = format!("http://{authority}{base}{TRACES_PATH}")
            .parse()
            .map_err(|_| invalid("not a URL"))?;
        Ok(OtlpEndpoint {
            configured: text.trim().to_owned(),
            traces,
        })
    }

    /// Where the spans are posted.
    pub fn traces_url(&self) -> &Uri {
        &self.traces
    }
}

impl std::fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.configured)
    }
}

/// A running export; [`shutdown`](Self::shutdown) flushes it.
#[derive(Debug)]
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Starts exporting the spans of `service` (its `service.name`) to `endpoint` and returns
    /// the tracer that makes them. Call on the tokio runtime that is to carry the exports.
    pub fn start(
        endpoint: &OtlpEndpoint,
        service: &'static str,
    ) -> Result<(TraceExport, Tracer), TraceExportError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|error| TraceExportError::Exporter(error.to_string()))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(ExportClient::new(runtime))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.traces_url().to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|error| TraceExportError::Exporter(error.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        let tracer = provider.tracer(service);
        tracing::info!(%endpoint, traces = %endpoint.traces_url(), "exporting spans over OTLP");
        Ok((TraceExport { provider }, tracer))
    }

    /// Exports the spans still queued, then stops: spans ended later are dropped. Waits on a
    /// blocking thread, since the exports it waits for run on the runtime.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let stopped =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match stopped {
            Ok(Ok(())) => tracing::debug!("span export flushed"),
            Ok(Err(error)) => tracing::warn!(%error, "span export did not flush cleanly"),
            Err(error) => tracing::warn!(%error, "span export shutdown failed"),
        }
    }
}

/// Posts an export with hyper-util on the daemon's runtime; the batch processor's thread waits
/// for the answer.
#[derive(Debug)]
struct ExportClient {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl ExportClient {
    fn new(runtime: tokio::runtime::Handle) -> ExportClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        ExportClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            runtime,
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (head, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(head, body))
        };
        // The timer is made inside the task: this thread (the batch processor's) has no runtime.
        let bounded = async move { tokio::time::timeout(EXPORT_TIMEOUT, exchange).await };
        match self.runtime.spawn(bounded).await? {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}").into()),
        }
    }
}

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// A context whose parent is the remote span that the W3C Trace Context `headers`
/// (`traceparent`, `tracestate`) name; `None` when they name none (absent or malformed).
pub fn parent_from_headers(headers: &HeaderMap) -> Option<Context> {
    remote_parent(&HeaderCarrier(headers))
}

/// Sets `traceparent` (and `tracestate`) in `headers` to name `context`'s span as the parent,
/// replacing what they said; leaves them as they are when `context` has no valid span.
pub fn inject_headers(context: &Context, headers: &mut HeaderMap) {
    if !context.span().span_context().is_valid() {
        return;
    }
    headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
}

/// A context whose parent is the remote span a `traceparent` value names; `None` when it is
/// malformed.
pub fn parent_from_traceparent(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    remote_parent(&carrier)
}

/// The `traceparent` value naming `context`'s span; `None` when it has no valid span.
pub fn traceparent_of(context: &Context) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

fn remote_parent(carrier: &dyn Extractor) -> Option<Context> {
    let context = TraceContextPropagator::new().extract(carrier);
    context.span().span_context().is_valid().then_some(context)
}

struct HeaderCarrier<'a>(&'a HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(hyper::header::HeaderName::as_str)
            .collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::try_from(key),
            hyper::header::HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const CLIENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn an_endpoint_is_an_http_base_url_and_spans_go_to_its_v1_traces() {
        for (configured, traces) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            (
                " http://[::1]:4318/otlp ",
                "http://[::1]:4318/otlp/v1/traces",
            ),
        ] {
            let endpoint = OtlpEndpoint::parse(configured).unwrap();
            assert_eq!(endpoint.traces_url().to_string(), traces);
        }
        for bad in [
            "",
            "127.0.0.1:4318",
            "https://collector:4318",
            "grpc://collector:4317",
            "http://user:secret@collector:4318",
            "http://collector:4318/?x=1",
            "not a url",
        ] {
            let error = OtlpEndpoint::parse(bad).unwrap_err().to_string();
            assert!(error.contains("OTLP/HTTP collector"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_traceparent_survives_the_round_trip_and_a_malformed_one_names_no_parent() {
        let parent = parent_from_traceparent(CLIENT).unwrap();
        let span = parent.span();
        let context = span.span_context();
        assert!(context.is_remote());
        assert_eq!(
            context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(traceparent_of(&parent).as_deref(), Some(CLIENT));
        for bad in ["", "00-xyz-b7ad6b7169203331-01", "00-0af7-01"] {
            assert!(parent_from_traceparent(bad).is_none(), "{bad}");
        }
        assert_eq!(traceparent_of(&Context::new()), None);
    }

    #[test]
    fn injected_headers_replace_the_clients_trace_context() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, CLIENT.parse().unwrap());
        headers.insert(TRACESTATE, "vendor=client".parse().unwrap());
        assert!(parent_from_headers(&headers).is_some());
        let ours = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        inject_headers(&Context::new().with_remote_span_context(ours), &mut headers);
        assert_eq!(
            headers[TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
        );
        assert!(headers.get(TRACESTATE).is_none());
        let mut untouched = HeaderMap::new();
        untouched.insert(TRACEPARENT, CLIENT.parse().unwrap());
        inject_headers(&Context::new(), &mut untouched);
        assert_eq!(untouched[TRACEPARENT], CLIENT);
    }
}
