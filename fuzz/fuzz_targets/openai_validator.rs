//! Fuzz target: the OpenAI request validator (`api::openai::check`, what every `/v1` handler runs
//! on a body before queueing it, built on `api::validate` and `json_object::TopLevel`).
//!
//! Input: byte 0 picks the route, the rest is the body. Properties:
//! - it never panics, and a refusal is always `InvalidParams` (the client's fault, with a reason),
//!   never an internal error;
//! - an accepted body is one JSON object whose `model` is the non-empty string accepted;
//! - slots: the token counters take none; every other route at least one sequence, and at least
//!   as many in all as at once;
//! - a non-streaming request, and a Responses stream, go to the engine byte for byte as they came;
//!   a chat or completion stream goes as one JSON object with `stream_options.include_usage` set
//!   and every other member byte for byte as it came.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use orchestratord::api::openai::{Route, check};
use orchestratord::app::Inbound;
use orchestratord::error::ApiError;
use orchestratord::json_object::TopLevel;
use orchestratord::keys::Caller;
use orchestratord::lifecycle::{EngineCall, Reply};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

const ROUTES: [Route; 8] = [
    Route::ChatCompletions,
    Route::Completions,
    Route::Embeddings,
    Route::Rerank,
    Route::Reranking,
    Route::Responses,
    Route::ResponsesInputTokens,
    Route::ChatInputTokens,
];

/// The top-level members by name (the last of duplicates, as `TopLevel::get` reads them).
fn members(body: &[u8]) -> BTreeMap<String, &RawValue> {
    serde_json::from_slice(body).expect("an accepted body is one JSON object")
}

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else {
        return;
    };
    let route = ROUTES[usize::from(*pick) % ROUTES.len()];
    let inbound = Inbound {
        body: Bytes::copy_from_slice(body),
        correlation_id: "fuzz".into(),
        forward: http::HeaderMap::new(),
        caller: Caller::HOST,
    };
    let request = match check(route, inbound, Duration::from_secs(1)) {
        Ok(request) => request,
        Err(ApiError::InvalidParams(reason)) => {
            assert!(!reason.is_empty());
            return;
        }
        Err(error) => panic!("{route:?} refused a body with {error:?}"),
    };

    let sent = members(body);
    let exchange = &request.exchange;
    assert!(!exchange.model.is_empty());
    let model: String = serde_json::from_str(sent["model"].get()).expect("model is a string");
    assert_eq!(model, exchange.model);

    match (route, exchange.slots) {
        (Route::ResponsesInputTokens | Route::ChatInputTokens, slots) => assert_eq!(slots, None),
        (_, Some(slots)) => assert!(slots.parallel >= 1 && slots.total >= slots.parallel),
        (_, None) => panic!("{route:?} accepted a request that takes no slot"),
    }

    match (&exchange.call, &request.reply) {
        (EngineCall::Whole { body: engine, .. }, Reply::Whole) => assert_eq!(&engine[..], body),
        (EngineCall::Stream { body: engine, .. }, Reply::Stream { include_usage, .. }) => {
            if route == Route::Responses {
                assert_eq!(&engine[..], body);
                return;
            }
            assert!(matches!(route, Route::ChatCompletions | Route::Completions));
            let forwarded = members(engine);
            assert_eq!(
                forwarded.len(),
                sent.len() + usize::from(!sent.contains_key("stream_options"))
            );
            for (name, value) in &sent {
                if name != "stream_options" {
                    assert_eq!(forwarded[name].get(), value.get(), "member {name:?}");
                }
            }
            let options = TopLevel::parse(forwarded["stream_options"].get().as_bytes())
                .expect("stream_options is an object");
            assert_eq!(
                options.get("include_usage").map(RawValue::get),
                Some("true")
            );
            let asked = sent
                .get("stream_options")
                .and_then(|raw| TopLevel::parse(raw.get().as_bytes()).ok())
                .and_then(|options| options.parse_member::<bool>("include_usage"))
                .and_then(Result::ok)
                .unwrap_or(false);
            assert_eq!(*include_usage, asked);
        }
        (call, reply) => panic!("{route:?} paired {call:?} with {reply:?}"),
    }
});
