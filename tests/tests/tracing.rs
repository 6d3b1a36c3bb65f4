//! Tracing end to end: both daemons export spans over OTLP/HTTP to a minimal collector in this
//! test (a sink that decodes `ExportTraceServiceRequest` with the published protobuf
//! definitions), and one streamed chat request sent with a client's `traceparent` comes out as
//! one trace: orchestratord's spans under the client's span, pool-managerd's Acquire under
//! orchestratord's, and the engine asked with orchestratord's span as its parent. Without an
//! `otlp_endpoint` nothing is exported (not even to the standard `OTEL_EXPORTER_OTLP_ENDPOINT`)
//! and the engine gets the client's `traceparent`, as before.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use e2e::Signal;
use e2e::http;
use e2e::stack::{Stack, double_pool};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One span as the sink received it.
#[derive(Debug, Clone)]
struct SeenSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    events: Vec<String>,
}

#[derive(Debug, Default)]
struct Received {
    spans: Mutex<Vec<SeenSpan>>,
    /// Every POST to /v1/traces, decodable or not.
    posts: AtomicUsize,
}

/// A minimal OTLP/HTTP collector: POST /v1/traces with an `application/x-protobuf`
/// `ExportTraceServiceRequest`, answered with an empty `ExportTraceServiceResponse`.
struct Sink {
    address: SocketAddr,
    received: Arc<Received>,
    _runtime: tokio::runtime::Runtime,
}

impl Sink {
    fn start() -> Sink {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Received::default());
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(Arc::clone(&received));
        runtime.spawn(async move { axum::serve(listener, app).await });
        Sink {
            address,
            received,
            _runtime: runtime,
        }
    }

    /// `otlp_endpoint = "http://…"`, as both daemons' configs spell it.
    fn endpoint_line(&self) -> String {
        format!("otlp_endpoint = \"http://{}\"", self.address)
    }

    fn spans(&self) -> Vec<SeenSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    fn posts(&self) -> usize {
        self.received.posts.load(Ordering::SeqCst)
    }

    /// Waits until `done` holds for the spans received; panics after [`WAIT`].
    fn wait_for(&self, what: &str, done: impl Fn(&[SeenSpan]) -> bool) -> Vec<SeenSpan> {
        let deadline = Instant::now() + WAIT;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

async fn receive(
    State(received): State<Arc<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    received.posts.fetch_add(1, Ordering::SeqCst);
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value == "application/x-protobuf");
    if !protobuf {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut spans = received.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|resource| attributes(resource.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                spans.push(SeenSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(span.attributes),
                    events: span.events.into_iter().map(|event| event.name).collect(),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn attributes(pairs: Vec<KeyValue>) -> HashMap<String, String> {
    pairs
        .into_iter()
        .map(|pair| (pair.key, pair.value.map(text).unwrap_or_default()))
        .collect()
}

fn text(value: AnyValue) -> String {
    match value.value {
        Some(any_value::Value::StringValue(text)) => text,
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Sends one streamed chat request with `headers` and reads it to `[DONE]`.
fn streamed_chat(stack: &Stack, headers: &[(&str, &str)]) {
    let body = json!({
        "model": "double",
        "messages": [{"role": "user", "content": "say something nice"}],
        "max_tokens": 3,
        "stream": true,
    })
    .to_string();
    let (mut reader, status, head) = http::open(
        &stack.api(),
        "POST",
        "/v1/chat/completions",
        headers,
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap();
    assert_eq!(status, 200, "{head}");
    let mut chunks = 0;
    loop {
        let data = http::next_sse_data(&mut reader).expect("the stream ended before [DONE]");
        if data == "[DONE]" {
            break;
        }
        chunks += 1;
    }
    assert!(chunks > 0, "no chunk before [DONE]");
}

/// The `traceparent` the engine double got with its last request.
fn engine_traceparent(stack: &Stack) -> String {
    let engine = stack.endpoint("p");
    let last: Value = http::get(&engine, "/control/last-request", WAIT)
        .unwrap()
        .json();
    last["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the engine got no traceparent: {last}"))
        .to_owned()
}

/// Stops both daemons as systemd would (SIGTERM), which exports the spans still queued.
fn stop(stack: &mut Stack) {
    stack.orchestrator_mut().kill_with(Signal::SIGTERM);
    assert!(stack.orchestrator_mut().wait_exit(WAIT).is_some());
    stack.sidecar.kill_with(Signal::SIGTERM);
    assert!(stack.sidecar.wait_exit(WAIT).is_some());
}

#[test]
fn one_requests_spans_share_the_clients_trace_and_nest_across_both_daemons_and_the_engine() {
    let sink = Sink::start();
    let mut stack = Stack::builder()
        .pool(&double_pool("p", "double", 1, &[]))
        .orchestrator(&sink.endpoint_line())
        .sidecar_server(&sink.endpoint_line())
        .start();
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    streamed_chat(
        &stack,
        &[
            ("traceparent", &traceparent),
            ("X-Correlation-Id", "traced-request"),
        ],
    );
    // The engine's parent is orchestratord's span, in the client's trace.
    let sent = engine_traceparent(&stack);
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(parts[1], CLIENT_TRACE, "the engine's traceparent: {sent}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "the engine got the client's span as its parent"
    );
    let engine_parent = parts[2].to_owned();

    stop(&mut stack);
    let spans = sink.wait_for("both daemons' spans of the request", |spans| {
        let of = |service: &str, name: &str| {
            spans.iter().any(|span| {
                span.service == service
                    && span.name == name
                    && span.attributes.get("correlation_id").map(String::as_str)
                        == Some("traced-request")
            })
        };
        of("orchestratord", "request") && of("pool-managerd", "acquire")
    });
    let trace: Vec<&SeenSpan> = spans
        .iter()
        .filter(|span| span.trace_id == CLIENT_TRACE)
        .collect();
    let by_id: HashMap<&str, &SeenSpan> = trace
        .iter()
        .map(|span| (span.span_id.as_str(), *span))
        .collect();
    let find = |service: &str, name: &str| -> &SeenSpan {
        let found: Vec<&&SeenSpan> = trace
            .iter()
            .filter(|span| span.service == service && span.name == name)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {service} {name} span in the client's trace: {trace:#?}"
        );
        found[0]
    };
    // Every span that carries the request's correlation id is in the client's trace.
    for span in &spans {
        if span.attributes.get("correlation_id").map(String::as_str) == Some("traced-request") {
            assert_eq!(span.trace_id, CLIENT_TRACE, "{span:#?}");
        }
    }
    let request = find("orchestratord", "request");
    assert_eq!(
        request.parent_span_id, CLIENT_SPAN,
        "orchestratord's request span is the client's span's child"
    );
    assert_eq!(
        request
            .attributes
            .get("orchestratord.outcome")
            .map(String::as_str),
        Some("completed"),
        "{request:#?}"
    );
    // Each of orchestratord's spans descends from its request span; pool-managerd's Acquire too,
    // through orchestratord's acquire and queue spans.
    let ancestry = |span: &SeenSpan| -> Vec<String> {
        let mut chain = Vec::new();
        let mut parent = span.parent_span_id.as_str();
        while let Some(up) = by_id.get(parent) {
            chain.push(format!("{}:{}", up.service, up.name));
            parent = up.parent_span_id.as_str();
        }
        chain
    };
    for name in ["admission", "queue", "acquire", "engine"] {
        let span = find("orchestratord", name);
        assert!(
            ancestry(span).last().map(String::as_str) == Some("orchestratord:request"),
            "{name} does not descend from the request span: {:?}",
            ancestry(span)
        );
    }
    let acquire = find("pool-managerd", "acquire");
    assert_eq!(
        ancestry(acquire),
        [
            "orchestratord:acquire",
            "orchestratord:queue",
            "orchestratord:request"
        ],
        "pool-managerd's acquire span: {acquire:#?}"
    );
    assert!(
        acquire.attributes.contains_key("pool_managerd.lease"),
        "{acquire:#?}"
    );
    // The engine's parent is orchestratord's engine span, which saw the head and a first token.
    let engine = find("orchestratord", "engine");
    assert_eq!(engine.span_id, engine_parent, "{engine:#?}");
    for event in ["response_head", "first_token"] {
        assert!(
            engine.events.iter().any(|seen| seen == event),
            "{event}: {engine:#?}"
        );
    }
}

#[test]
fn without_an_otlp_endpoint_nothing_is_exported_and_the_engine_gets_the_clients_traceparent() {
    let sink = Sink::start();
    // The standard variable does not switch tracing on: only the config does.
    let mut stack = Stack::builder()
        .pool(&double_pool("p", "double", 1, &[]))
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{}", sink.address),
        )
        .start();
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    streamed_chat(&stack, &[("traceparent", &traceparent)]);
    assert_eq!(engine_traceparent(&stack), traceparent);
    stop(&mut stack);
    assert_eq!(sink.posts(), 0, "spans were exported: {:#?}", sink.spans());
}
