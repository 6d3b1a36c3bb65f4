//! The OpenAI Responses stream dialect (`/v1/responses`): named events whose `data` carries its own
//! `type` — `response.created`, `response.output_text.delta` (and `reasoning_text`,
//! `function_call_arguments` deltas), ..., and last `response.completed` (or `response.incomplete`,
//! `response.failed`) with `response.usage`; no `[DONE]` follows. An `error` event (or llama-server's
//! `{"error": ...}` data) ends the stream with a failure. Pure and stateless.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{AdapterError, EngineEvent, TokenUsage};

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    delta: Option<DeltaValue>,
    #[serde(default)]
    response: Option<Response>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// A delta is text for output and reasoning, JSON text for tool-call arguments.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DeltaValue {
    Text(String),
    Other(IgnoredAny),
}

#[derive(Debug, Deserialize)]
struct Response {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    usage: Option<TokenUsage>,
}

/// Turns one event (`data` payload, whole `frame`) into an event.
pub(super) fn on_data(data: Bytes, frame: Bytes) -> Result<EngineEvent, AdapterError> {
    let event: Event = serde_json::from_slice(&data).map_err(|e| AdapterError::WorkerReset {
        detail: format!("malformed Responses stream event: {e}"),
    })?;
    let kind = event.kind.as_deref().unwrap_or("");
    if kind == "error" || event.error.is_some() && kind.is_empty() {
        return Err(super::engine_reported(&data));
    }
    match kind {
        "response.completed" | "response.incomplete" | "response.failed" => {
            let response = event.response;
            let usage = response
                .as_ref()
                .and_then(|response| response.usage.as_ref());
            Ok(EngineEvent::Done {
                finish_reason: response
                    .as_ref()
                    .and_then(|response| response.status.clone())
                    .unwrap_or_else(|| kind.trim_start_matches("response.").to_owned()),
                prompt_tokens: usage.and_then(|usage| usage.input_tokens),
                completion_tokens: usage.and_then(|usage| usage.output_tokens),
                usage_frame: None,
                terminator: frame,
            })
        }
        _ => {
            let delta = match event.delta {
                Some(DeltaValue::Text(text)) if kind.ends_with(".delta") => Some(text),
                _ => None,
            };
            let generated = delta.as_deref().is_some_and(|text| !text.is_empty());
            let token_text =
                delta.filter(|text| !text.is_empty() && kind == "response.output_text.delta");
            Ok(EngineEvent::Chunk {
                frame,
                data,
                token_text,
                tokens: u32::from(generated),
                closes_choice: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(name: &str, data: &'static str) -> EngineEvent {
        let frame = Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        on_data(Bytes::from_static(data.as_bytes()), frame).unwrap()
    }

    #[test]
    fn text_and_argument_deltas_are_tokens_and_completed_carries_the_usage() {
        let created = r#"{"type":"response.created","response":{"id":"r","status":"in_progress"}}"#;
        assert!(matches!(
            feed("response.created", created),
            EngineEvent::Chunk { tokens: 0, .. }
        ));
        let text = r#"{"type":"response.output_text.delta","item_id":"m","delta":" lake"}"#;
        let EngineEvent::Chunk {
            token_text, tokens, ..
        } = feed("response.output_text.delta", text)
        else {
            panic!("expected a chunk");
        };
        assert_eq!((token_text.as_deref(), tokens), (Some(" lake"), 1));
        let arguments = r#"{"type":"response.function_call_arguments.delta","delta":"{\"x\""}"#;
        assert!(matches!(
            feed("response.function_call_arguments.delta", arguments),
            EngineEvent::Chunk {
                tokens: 1,
                token_text: None,
                ..
            }
        ));
        let completed = r#"{"type":"response.completed","response":{"status":"completed","usage":{"input_tokens":5,"output_tokens":3,"total_tokens":8}}}"#;
        let EngineEvent::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
            ..
        } = feed("response.completed", completed)
        else {
            panic!("expected done");
        };
        assert_eq!(finish_reason, "completed");
        assert_eq!((prompt_tokens, completion_tokens), (Some(5), Some(3)));
    }

    #[test]
    fn an_error_event_llama_servers_error_data_or_bad_json_is_a_worker_reset() {
        for data in [
            &br#"{"type":"error","code":"server_error","message":"boom"}"#[..],
            &br#"{"error":{"code":500,"message":"boom"}}"#[..],
            &b"{\"type\""[..],
        ] {
            assert!(matches!(
                on_data(Bytes::copy_from_slice(data), Bytes::new()),
                Err(AdapterError::WorkerReset { .. })
            ));
        }
    }
}
