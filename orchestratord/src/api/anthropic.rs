//! Anthropic's Messages API: `POST /v1/messages` (streaming and not) and `POST
//! /v1/messages/count_tokens`, routed by `model` to pools whose engine serves them (llama-server
//! does). The body goes to the engine as it came; a stream's events are relayed as the engine sends
//! them; errors, including an engine's own, are in Anthropic's shape. Anthropic's SDKs send their
//! key as `x-api-key`, which `app` accepts like a bearer token.

use crate::adapters::EngineRoute;
use crate::api::validate;
use crate::app::{AppState, Inbound};
use crate::error::{ApiError, ErrorShape};
use crate::lifecycle::{self, EngineCall, Exchange, Reply};
use crate::placement::SlotNeed;
use crate::sse::StreamFormat;
use axum::extract::State;
use axum::response::Response;
use pool_ipc::registry::ApiEndpoint;
use std::time::Duration;

fn exchange(
    inbound: &Inbound,
    queue_deadline: Duration,
    counting: bool,
) -> Result<(Exchange, Reply), ApiError> {
    let top = validate::object(&inbound.body)?;
    let model = validate::model(&top)?;
    validate::objects(&top, "messages")?;
    validate::positive(&top, "max_tokens")?;
    let stream = validate::stream(&top)?;
    let body = inbound.body.clone();
    let (api, call, slots, reply) = if counting {
        let api = ApiEndpoint::MessagesCountTokens;
        let call = EngineCall::Whole {
            path: api.path(),
            body,
        };
        (api, call, None, Reply::Whole)
    } else if stream {
        let call = EngineCall::Stream {
            route: EngineRoute::Messages,
            body,
        };
        let reply = Reply::Stream {
            format: StreamFormat::AnthropicEvents,
            include_usage: true,
        };
        (ApiEndpoint::Messages, call, Some(SlotNeed::ONE), reply)
    } else {
        let api = ApiEndpoint::Messages;
        let call = EngineCall::Whole {
            path: api.path(),
            body,
        };
        (api, call, Some(SlotNeed::ONE), Reply::Whole)
    };
    let exchange = Exchange::interactive(inbound, queue_deadline, model, api, call, slots);
    Ok((exchange, reply))
}

async fn serve(state: AppState, inbound: Inbound, counting: bool) -> Response {
    let deadline = state.config.get().queue_deadline;
    match exchange(&inbound, deadline, counting) {
        Ok((exchange, reply)) => {
            lifecycle::serve(&state, exchange, ErrorShape::Anthropic, reply).await
        }
        Err(error) => error.response(ErrorShape::Anthropic),
    }
}

pub async fn messages(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, false).await
}

pub async fn count_tokens(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, true).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::http::HeaderMap;

    fn inbound(body: &str) -> Inbound {
        Inbound {
            body: Bytes::copy_from_slice(body.as_bytes()),
            correlation_id: "c".into(),
            forward: HeaderMap::new(),
            caller: crate::keys::Caller::HOST,
        }
    }

    #[test]
    fn a_message_stream_is_relayed_as_anthropic_events_and_its_body_is_untouched() {
        let body = r#"{"model":"m","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let (exchange, reply) = exchange(&inbound(body), Duration::from_secs(1), false).unwrap();
        let EngineCall::Stream { route, body: sent } = &exchange.call else {
            panic!("expected a stream");
        };
        assert_eq!(*route, EngineRoute::Messages);
        assert_eq!(&sent[..], body.as_bytes());
        assert!(matches!(
            reply,
            Reply::Stream {
                format: StreamFormat::AnthropicEvents,
                ..
            }
        ));
    }

    #[test]
    fn counting_takes_no_slot_and_bad_input_is_named() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let (counted, _) = exchange(&inbound(body), Duration::from_secs(1), true).unwrap();
        assert_eq!(counted.slots, None);
        assert_eq!(counted.api, ApiEndpoint::MessagesCountTokens);
        for (bad, needle) in [
            (r#"{"messages":[{}]}"#, "'model'"),
            (r#"{"model":"m","messages":"hi"}"#, "'messages'"),
            (
                r#"{"model":"m","messages":[{}],"max_tokens":"8"}"#,
                "'max_tokens'",
            ),
        ] {
            let error = exchange(&inbound(bad), Duration::from_secs(1), false).unwrap_err();
            assert!(error.to_string().contains(needle), "{bad}: {error}");
        }
    }
}
