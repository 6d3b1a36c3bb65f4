//! llama-server's native `POST /completion` stream dialect: each event is
//! `{"content","tokens":[ids],"stop":false,…}`; the last one has `"stop":true`, `stop_type`
//! (`limit`, `eos`, `word`), `tokens_predicted`, `tokens_evaluated` and `timings`, and no `[DONE]`
//! follows. Pure: one payload in, at most one [`EngineEvent`] out.
//!
//! In stream mode current llama-server sends an empty `content` in the final event (the text went out
//! in the partial events); older builds repeated the whole text there, so the final event's text is
//! never treated as new tokens.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{AdapterError, EngineEvent};

#[derive(Debug, Deserialize)]
struct NativeEvent {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tokens: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    stop_type: Option<String>,
    /// Builds before `stop_type` existed.
    #[serde(default)]
    stopped_limit: bool,
    #[serde(default)]
    tokens_predicted: Option<u32>,
    #[serde(default)]
    tokens_evaluated: Option<u32>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// Turns one event (`data` payload, whole `frame`) into an event. The caller stops reading after a
/// `Done`.
pub(super) fn on_data(data: Bytes, frame: Bytes) -> Result<EngineEvent, AdapterError> {
    let event: NativeEvent = serde_json::from_slice(&data).map_err(|e| malformed(&e))?;
    if event.error.is_some() {
        return Err(super::engine_reported(&data));
    }
    if event.stop {
        let finish_reason = match event.stop_type.as_deref() {
            Some("limit") => "length",
            Some("eos" | "word") => "stop",
            Some(other) => other,
            None if event.stopped_limit => "length",
            None => "stop",
        };
        return Ok(EngineEvent::Done {
            finish_reason: finish_reason.to_owned(),
            prompt_tokens: event.tokens_evaluated,
            completion_tokens: event.tokens_predicted,
            usage_frame: None,
            terminator: frame,
        });
    }
    let token_text = event.content.filter(|text| !text.is_empty());
    let listed = event.tokens.as_ref().map_or(0, Vec::len);
    let tokens = if listed > 0 {
        u32::try_from(listed).unwrap_or(u32::MAX)
    } else {
        u32::from(token_text.is_some())
    };
    Ok(EngineEvent::Chunk {
        frame,
        data,
        token_text,
        tokens,
        closes_choice: false,
    })
}

fn malformed(error: &serde_json::Error) -> AdapterError {
    AdapterError::WorkerReset {
        detail: format!("malformed native /completion event: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(text: &str) -> Bytes {
        Bytes::from(format!("data: {text}\n\n"))
    }

    fn parse(text: &'static str) -> Result<EngineEvent, AdapterError> {
        on_data(Bytes::from_static(text.as_bytes()), frame_of(text))
    }

    #[test]
    fn a_token_event_carries_its_text_and_token_count() {
        let raw = r#"{"content":" fox","tokens":[3],"stop":false,"index":0}"#;
        assert_eq!(
            parse(raw).unwrap(),
            EngineEvent::Chunk {
                frame: frame_of(raw),
                data: Bytes::from_static(raw.as_bytes()),
                token_text: Some(" fox".to_owned()),
                tokens: 1,
                closes_choice: false,
            }
        );
    }

    #[test]
    fn a_token_event_without_token_ids_counts_its_text_as_one_token() {
        let EngineEvent::Chunk { tokens, .. } = parse(r#"{"content":"a","stop":false}"#).unwrap()
        else {
            panic!("expected a chunk");
        };
        assert_eq!(tokens, 1);
    }

    #[test]
    fn stop_types_map_to_openai_finish_reasons() {
        for (stop_type, expected) in [("limit", "length"), ("eos", "stop"), ("word", "stop")] {
            let raw = format!(
                r#"{{"content":"","stop":true,"stop_type":"{stop_type}","tokens_predicted":5,"tokens_evaluated":2}}"#
            );
            let EngineEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                terminator,
                ..
            } = on_data(Bytes::from(raw.clone()), frame_of(&raw)).unwrap()
            else {
                panic!("expected done");
            };
            assert_eq!(finish_reason, expected);
            assert_eq!(prompt_tokens, Some(2));
            assert_eq!(completion_tokens, Some(5));
            assert_eq!(terminator, frame_of(&raw));
        }
    }

    #[test]
    fn an_error_event_or_bad_json_is_a_worker_reset() {
        assert!(matches!(
            parse(r#"{"error":{"code":500,"message":"boom"}}"#),
            Err(AdapterError::WorkerReset { .. })
        ));
        assert!(matches!(
            parse("{not json"),
            Err(AdapterError::WorkerReset { .. })
        ));
    }
}
