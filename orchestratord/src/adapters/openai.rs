//! The OpenAI stream dialect (`/v1/chat/completions`, `/v1/completions`): chunks with
//! `choices[0].delta.content` (chat) or `choices[0].text` (completions) and a `finish_reason` on the
//! last one; with `stream_options.include_usage`, a usage chunk with `"choices": []` before the
//! terminator `data: [DONE]`. Pure apart from the little it remembers until `[DONE]`: the finish
//! reason and the usage.
//!
//! Only the first choice is read: callers send one choice (`n` = 1).

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{AdapterError, EngineEvent};

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
}

/// What an OpenAI stream has said so far that [`EngineEvent::Done`] reports.
#[derive(Debug, Default)]
pub(super) struct OpenAiStream {
    finish_reason: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    raw_usage: Option<Bytes>,
}

impl OpenAiStream {
    /// Turns one `data:` payload into an event; `None` for the usage chunk, which is kept for `Done`.
    pub(super) fn on_data(&mut self, raw: Bytes) -> Result<Option<EngineEvent>, AdapterError> {
        if raw.trim_ascii() == b"[DONE]" {
            return Ok(Some(EngineEvent::Done {
                finish_reason: self
                    .finish_reason
                    .take()
                    .unwrap_or_else(|| "stop".to_owned()),
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                raw_usage: self.raw_usage.take(),
            }));
        }
        let chunk: Chunk = serde_json::from_slice(&raw).map_err(|e| AdapterError::WorkerReset {
            detail: format!("malformed OpenAI stream chunk: {e}"),
        })?;
        if chunk.error.is_some() {
            return Err(super::engine_reported(&raw));
        }
        let has_usage = chunk.usage.is_some();
        if let Some(usage) = chunk.usage {
            self.prompt_tokens = usage.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = usage.completion_tokens.or(self.completion_tokens);
        }
        let Some(choice) = chunk.choices.and_then(|choices| choices.into_iter().next()) else {
            if has_usage {
                self.raw_usage = Some(raw);
                return Ok(None);
            }
            return Ok(Some(EngineEvent::Chunk {
                raw,
                token_text: None,
                tokens: 0,
            }));
        };
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason);
        }
        let (text, generated) = match choice.delta {
            Some(delta) => {
                let other_output = delta
                    .reasoning_content
                    .as_deref()
                    .is_some_and(|text| !text.is_empty())
                    || delta.tool_calls.is_some();
                (delta.content, other_output)
            }
            None => (choice.text, false),
        };
        let token_text = text.filter(|text| !text.is_empty());
        Ok(Some(EngineEvent::Chunk {
            raw,
            tokens: u32::from(token_text.is_some() || generated),
            token_text,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stream: &mut OpenAiStream, text: &'static str) -> Option<EngineEvent> {
        stream.on_data(Bytes::from_static(text.as_bytes())).unwrap()
    }

    fn chunk(event: Option<EngineEvent>) -> (Option<String>, u32) {
        match event {
            Some(EngineEvent::Chunk {
                token_text, tokens, ..
            }) => (token_text, tokens),
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    #[test]
    fn chat_deltas_are_tokens_and_the_finish_chunk_is_not() {
        let mut stream = OpenAiStream::default();
        let first = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":" the"},"finish_reason":null}]}"#;
        assert_eq!(
            chunk(feed(&mut stream, first)),
            (Some(" the".to_owned()), 1)
        );
        let role_only = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#;
        assert_eq!(chunk(feed(&mut stream, role_only)), (None, 0));
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
        assert_eq!(chunk(feed(&mut stream, last)), (None, 0));
        assert_eq!(
            feed(&mut stream, "[DONE]"),
            Some(EngineEvent::Done {
                finish_reason: "length".to_owned(),
                prompt_tokens: None,
                completion_tokens: None,
                raw_usage: None,
            })
        );
    }

    #[test]
    fn completion_text_is_a_token() {
        let mut stream = OpenAiStream::default();
        let text = r#"{"choices":[{"index":0,"text":" fox","finish_reason":null}]}"#;
        assert_eq!(chunk(feed(&mut stream, text)), (Some(" fox".to_owned()), 1));
    }

    #[test]
    fn the_usage_chunk_is_kept_for_done_and_not_yielded() {
        let mut stream = OpenAiStream::default();
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(feed(&mut stream, usage), None);
        assert_eq!(
            feed(&mut stream, "[DONE]"),
            Some(EngineEvent::Done {
                finish_reason: "stop".to_owned(),
                prompt_tokens: Some(3),
                completion_tokens: Some(4),
                raw_usage: Some(Bytes::from_static(usage.as_bytes())),
            })
        );
    }

    #[test]
    fn usage_on_a_chunk_with_choices_is_counted_but_that_chunk_is_still_yielded() {
        let mut stream = OpenAiStream::default();
        let last = r#"{"choices":[{"text":"","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(chunk(feed(&mut stream, last)), (None, 0));
        let Some(EngineEvent::Done {
            prompt_tokens,
            completion_tokens,
            raw_usage,
            ..
        }) = feed(&mut stream, "[DONE]")
        else {
            panic!("expected done");
        };
        assert_eq!((prompt_tokens, completion_tokens), (Some(1), Some(2)));
        assert_eq!(raw_usage, None);
    }

    #[test]
    fn an_error_chunk_or_bad_json_is_a_worker_reset() {
        let mut stream = OpenAiStream::default();
        assert!(matches!(
            stream.on_data(Bytes::from_static(br#"{"error":{"message":"boom"}}"#)),
            Err(AdapterError::WorkerReset { .. })
        ));
        assert!(matches!(
            stream.on_data(Bytes::from_static(b"{\"choices\":")),
            Err(AdapterError::WorkerReset { .. })
        ));
    }
}
