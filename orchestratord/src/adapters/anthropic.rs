//! The Anthropic Messages stream dialect (`/v1/messages`): named events whose `data` carries its own
//! `type` — `message_start` (with `message.usage.input_tokens`), `content_block_start`,
//! `content_block_delta` (`text_delta`, `input_json_delta`, `thinking_delta`), `content_block_stop`,
//! `message_delta` (`delta.stop_reason`, `usage.output_tokens`), `ping`, and last `message_stop`;
//! no `[DONE]` follows. An `error` event ends the stream with a failure. Pure apart from what it
//! remembers until `message_stop`: the usage and the stop reason.

use bytes::Bytes;
use serde::Deserialize;

use super::{AdapterError, EngineEvent, TokenUsage};

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    usage: Option<TokenUsage>,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    usage: Option<TokenUsage>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
}

/// What a Messages stream has said so far that [`EngineEvent::Done`] reports.
#[derive(Debug, Default)]
pub(super) struct AnthropicStream {
    stop_reason: Option<String>,
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
}

impl AnthropicStream {
    /// Turns one event (`data` payload, whole `frame`) into an event.
    pub(super) fn on_data(
        &mut self,
        data: Bytes,
        frame: Bytes,
    ) -> Result<EngineEvent, AdapterError> {
        let event: Event =
            serde_json::from_slice(&data).map_err(|e| AdapterError::WorkerReset {
                detail: format!("malformed Anthropic stream event: {e}"),
            })?;
        let mut usage = event.usage;
        if let Some(message) = event.message {
            usage = usage.or(message.usage);
        }
        if let Some(usage) = usage {
            self.input_tokens = usage.input_tokens.or(self.input_tokens);
            self.output_tokens = usage.output_tokens.or(self.output_tokens);
        }
        let mut token_text = None;
        let mut tokens = 0;
        match event.kind.as_str() {
            "error" => return Err(super::engine_reported(&data)),
            "message_stop" => {
                return Ok(EngineEvent::Done {
                    finish_reason: self
                        .stop_reason
                        .take()
                        .unwrap_or_else(|| "end_turn".to_owned()),
                    prompt_tokens: self.input_tokens,
                    completion_tokens: self.output_tokens,
                    usage_frame: None,
                    terminator: frame,
                });
            }
            "content_block_delta" => {
                if let Some(delta) = event.delta {
                    let other = delta.partial_json.is_some_and(|json| !json.is_empty())
                        || delta.thinking.is_some_and(|text| !text.is_empty());
                    token_text = delta.text.filter(|text| !text.is_empty());
                    tokens = u32::from(token_text.is_some() || other);
                }
            }
            "message_delta" => {
                if let Some(reason) = event.delta.and_then(|delta| delta.stop_reason) {
                    self.stop_reason = Some(reason);
                }
            }
            _ => {}
        }
        Ok(EngineEvent::Chunk {
            frame,
            data,
            token_text,
            tokens,
            closes_choice: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stream: &mut AnthropicStream, name: &str, data: &'static str) -> EngineEvent {
        let frame = Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        stream
            .on_data(Bytes::from_static(data.as_bytes()), frame)
            .unwrap()
    }

    #[test]
    fn text_deltas_are_tokens_and_message_stop_ends_with_the_usage_and_stop_reason() {
        let mut stream = AnthropicStream::default();
        let start = r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":9,"output_tokens":0}}}"#;
        assert!(matches!(
            feed(&mut stream, "message_start", start),
            EngineEvent::Chunk { tokens: 0, .. }
        ));
        let delta = r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" river"}}"#;
        let EngineEvent::Chunk {
            token_text, tokens, ..
        } = feed(&mut stream, "content_block_delta", delta)
        else {
            panic!("expected a chunk");
        };
        assert_eq!((token_text.as_deref(), tokens), (Some(" river"), 1));
        let tool = r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\""}}"#;
        assert!(matches!(
            feed(&mut stream, "content_block_delta", tool),
            EngineEvent::Chunk { tokens: 1, .. }
        ));
        let end = r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":4}}"#;
        feed(&mut stream, "message_delta", end);
        let stop = r#"{"type":"message_stop"}"#;
        let EngineEvent::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
            terminator,
            ..
        } = feed(&mut stream, "message_stop", stop)
        else {
            panic!("expected done");
        };
        assert_eq!(finish_reason, "max_tokens");
        assert_eq!((prompt_tokens, completion_tokens), (Some(9), Some(4)));
        assert_eq!(
            &terminator[..],
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
    }

    #[test]
    fn an_error_event_or_bad_json_is_a_worker_reset() {
        let mut stream = AnthropicStream::default();
        let error = br#"{"type":"error","error":{"type":"api_error","message":"boom"}}"#;
        assert!(matches!(
            stream.on_data(Bytes::from_static(error), Bytes::new()),
            Err(AdapterError::WorkerReset { .. })
        ));
        assert!(matches!(
            stream.on_data(Bytes::from_static(b"{\"type\""), Bytes::new()),
            Err(AdapterError::WorkerReset { .. })
        ));
    }
}
