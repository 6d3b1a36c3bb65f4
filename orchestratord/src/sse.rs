//! Server-sent events on the wire: the response that carries them and the frames they are made
//! of. Frames are built once as bytes and written as they are; the relay never re-serialises an
//! engine's payload.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::Stream;
use std::convert::Infallible;

/// The comment sent while a stream has nothing to say, so proxies and clients keep it open.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// How the events of a relayed stream are framed, which decides how orchestratord frames its own
/// final error event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// OpenAI chat and text completions: `data:` chunks, then `data: [DONE]`.
    OpenAiChunks,
    /// Anthropic Messages: named events, ending with `message_stop`.
    AnthropicEvents,
    /// OpenAI Responses: named events, ending with `response.completed`.
    ResponsesEvents,
}

/// A 200 `text/event-stream` response whose body is `frames`.
pub fn response(
    frames: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `data: <payload>\n\n`.
pub fn data(payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// `event: <name>\ndata: <payload>\n\n`.
pub fn named(name: &str, payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(name.len() + payload.len() + 16);
    frame.extend_from_slice(b"event: ");
    frame.extend_from_slice(name.as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// `event: <name>\ndata: <payload>\n\n`, appended to `out`.
pub fn push_named(out: &mut String, name: &str, payload: &str) {
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    out.push_str(payload);
    out.push_str("\n\n");
}
