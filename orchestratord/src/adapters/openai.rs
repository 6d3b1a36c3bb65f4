//! The OpenAI stream dialect (`/v1/chat/completions`, `/v1/completions`): chunks with
//! `choices[0].delta.content` (chat) or `choices[0].text` (completions) and a `finish_reason` on the
//! last one; with `stream_options.include_usage`, a usage chunk with `"choices": []` before the
//! terminator `data: [DONE]`. Pure apart from the little it remembers until `[DONE]`: the finish
//! reason and the usage.
//!
//! Only the first choice's text is decoded into `token_text`; with `n` > 1 every choice's chunks still
//! pass as they are, and each chunk that carries output counts as one token.

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
    /// vLLM's name for `reasoning_content` in its newer releases.
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    /// The legacy form of a tool call.
    #[serde(default)]
    function_call: Option<IgnoredAny>,
}

impl Delta {
    /// Output other than content: reasoning or refusal text, or a tool call.
    fn has_other_output(&self) -> bool {
        [&self.reasoning_content, &self.reasoning, &self.refusal]
            .iter()
            .any(|text| text.as_deref().is_some_and(|text| !text.is_empty()))
            || self.tool_calls.is_some()
            || self.function_call.is_some()
    }
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
    usage_frame: Option<Bytes>,
}

impl OpenAiStream {
    /// Turns one event (`data` payload, whole `frame`) into an event; `None` for the usage chunk,
    /// which is kept for `Done`.
    pub(super) fn on_data(
        &mut self,
        data: Bytes,
        frame: Bytes,
    ) -> Result<Option<EngineEvent>, AdapterError> {
        if data.trim_ascii() == b"[DONE]" {
            return Ok(Some(EngineEvent::Done {
                finish_reason: self
                    .finish_reason
                    .take()
                    .unwrap_or_else(|| "stop".to_owned()),
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                usage_frame: self.usage_frame.take(),
                terminator: frame,
            }));
        }
        let chunk: Chunk =
            serde_json::from_slice(&data).map_err(|e| AdapterError::WorkerReset {
                detail: format!("malformed OpenAI stream chunk: {e}"),
            })?;
        if chunk.error.is_some() {
            return Err(super::engine_reported(&data));
        }
        let has_usage = chunk.usage.is_some();
        if let Some(usage) = chunk.usage {
            self.prompt_tokens = usage.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = usage.completion_tokens.or(self.completion_tokens);
        }
        let Some(choice) = chunk.choices.and_then(|choices| choices.into_iter().next()) else {
            if has_usage {
                // With `n` > 1 llama-server sends one usage chunk per choice: keep them all.
                self.usage_frame = Some(match self.usage_frame.take() {
                    Some(earlier) => [earlier, frame].concat().into(),
                    None => frame,
                });
                return Ok(None);
            }
            return Ok(Some(EngineEvent::Chunk {
                frame,
                data,
                token_text: None,
                tokens: 0,
                closes_choice: false,
            }));
        };
        let finishes = choice.finish_reason.is_some();
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason);
        }
        let (text, generated) = match choice.delta {
            Some(delta) => {
                let other_output = delta.has_other_output();
                (delta.content, other_output)
            }
            None => (choice.text, false),
        };
        let token_text = text.filter(|text| !text.is_empty());
        let output = token_text.is_some() || generated;
        Ok(Some(EngineEvent::Chunk {
            frame,
            data,
            tokens: u32::from(output),
            token_text,
            closes_choice: finishes && !output,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(text: &'static str) -> Bytes {
        Bytes::from(format!("data: {text}\n\n"))
    }

    fn feed(stream: &mut OpenAiStream, text: &'static str) -> Option<EngineEvent> {
        stream
            .on_data(Bytes::from_static(text.as_bytes()), frame_of(text))
            .unwrap()
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
                usage_frame: None,
                terminator: frame_of("[DONE]"),
            })
        );
    }

    fn closes_choice(event: Option<EngineEvent>) -> bool {
        match event {
            Some(EngineEvent::Chunk { closes_choice, .. }) => closes_choice,
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    #[test]
    fn only_a_finish_chunk_without_output_may_be_held_for_the_end() {
        let mut stream = OpenAiStream::default();
        let role_only = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#;
        assert!(!closes_choice(feed(&mut stream, role_only)));
        let last_token =
            r#"{"choices":[{"index":0,"delta":{"content":" end"},"finish_reason":"stop"}]}"#;
        assert!(!closes_choice(feed(&mut stream, last_token)));
        let progress = r#"{"choices":[],"prompt_progress":{"total":9,"processed":3}}"#;
        assert!(!closes_choice(feed(&mut stream, progress)));
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
        assert!(closes_choice(feed(&mut stream, finish)));
        let text_finish = r#"{"choices":[{"index":0,"text":"","finish_reason":"stop"}]}"#;
        assert!(closes_choice(feed(&mut stream, text_finish)));
    }

    #[test]
    fn reasoning_refusal_and_tool_calls_under_any_name_are_output() {
        let mut stream = OpenAiStream::default();
        for delta in [
            r#"{"reasoning_content":"hm"}"#,
            r#"{"reasoning":"hm"}"#,
            r#"{"refusal":"no"}"#,
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}"#,
            r#"{"function_call":{"arguments":"{"}}"#,
        ] {
            let text: &'static str = Box::leak(
                format!(r#"{{"choices":[{{"index":0,"delta":{delta},"finish_reason":"stop"}}]}}"#)
                    .into_boxed_str(),
            );
            let event = feed(&mut stream, text);
            assert!(!closes_choice(event.clone()), "{delta}");
            assert_eq!(chunk(event).1, 1, "{delta}");
        }
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
                usage_frame: Some(frame_of(usage)),
                terminator: frame_of("[DONE]"),
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
            usage_frame,
            ..
        }) = feed(&mut stream, "[DONE]")
        else {
            panic!("expected done");
        };
        assert_eq!((prompt_tokens, completion_tokens), (Some(1), Some(2)));
        assert_eq!(usage_frame, None);
    }

    #[test]
    fn an_error_chunk_or_bad_json_is_a_worker_reset() {
        let mut stream = OpenAiStream::default();
        assert!(matches!(
            stream.on_data(
                Bytes::from_static(br#"{"error":{"message":"boom"}}"#),
                Bytes::new()
            ),
            Err(AdapterError::WorkerReset { .. })
        ));
        assert!(matches!(
            stream.on_data(Bytes::from_static(b"{\"choices\":"), Bytes::new()),
            Err(AdapterError::WorkerReset { .. })
        ));
    }
}
