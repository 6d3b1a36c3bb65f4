//! Every wire value survives `encode_frame` → `take_frame` → `decode_payload` unchanged: alone, with
//! several frames in one buffer, and when the bytes arrive in arbitrary chunks (where `take_frame`
//! must answer `Ok(None)` until a frame is complete and never split one early).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod strategies;

use bytes::BytesMut;
use pool_ipc::codec::{HEADER_BYTES, decode_payload, encode_frame, take_frame};
use pool_ipc::{ClientFrame, DEFAULT_MAX_FRAME_BYTES, ServerFrame};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use std::collections::BTreeSet;
use std::fmt::Debug;
use strategies::*;

const MAX: u32 = DEFAULT_MAX_FRAME_BYTES;

/// Encodes each message as one frame, all into one buffer; returns the buffer and where each frame
/// ends in it.
fn encode_all<T: bincode::Encode>(messages: &[T]) -> (BytesMut, Vec<usize>) {
    let mut buf = BytesMut::new();
    let mut ends = Vec::new();
    for message in messages {
        encode_frame(message, &mut buf, MAX).unwrap();
        ends.push(buf.len());
    }
    (buf, ends)
}

fn round_trip_one<T>(message: &T) -> Result<(), TestCaseError>
where
    T: bincode::Encode + bincode::Decode<()> + PartialEq + Debug,
{
    let mut buf = BytesMut::new();
    encode_frame(message, &mut buf, MAX).unwrap();
    let announced = u32::from_be_bytes(buf[..HEADER_BYTES].try_into().unwrap()) as usize;
    prop_assert_eq!(announced, buf.len() - HEADER_BYTES);
    let payload = take_frame(&mut buf, MAX).unwrap().expect("a whole frame");
    prop_assert!(buf.is_empty());
    prop_assert_eq!(&decode_payload::<T>(&payload).unwrap(), message);
    Ok(())
}

fn round_trip_concatenated<T>(messages: &[T]) -> Result<(), TestCaseError>
where
    T: bincode::Encode + bincode::Decode<()> + PartialEq + Debug,
{
    let (mut buf, _) = encode_all(messages);
    let mut decoded = Vec::new();
    while let Some(payload) = take_frame(&mut buf, MAX).unwrap() {
        decoded.push(decode_payload::<T>(&payload).unwrap());
    }
    prop_assert!(buf.is_empty());
    prop_assert_eq!(decoded.as_slice(), messages);
    Ok(())
}

/// Feeds the encoded frames in chunks of the given sizes (cycled). After every chunk, exactly the
/// frames wholly received so far must have come out, and `take_frame` must then say `Ok(None)`.
fn round_trip_chunked<T>(messages: &[T], chunk_sizes: &[usize]) -> Result<(), TestCaseError>
where
    T: bincode::Encode + bincode::Decode<()> + PartialEq + Debug,
{
    let (wire, ends) = encode_all(messages);
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    let mut fed = 0;
    for &size in chunk_sizes.iter().cycle() {
        if fed == wire.len() {
            break;
        }
        let next = (fed + size).min(wire.len());
        buf.extend_from_slice(&wire[fed..next]);
        fed = next;
        while let Some(payload) = take_frame(&mut buf, MAX).unwrap() {
            decoded.push(decode_payload::<T>(&payload).unwrap());
        }
        let complete = ends.iter().filter(|&&end| end <= fed).count();
        prop_assert_eq!(
            decoded.len(),
            complete,
            "after {} of {} bytes",
            fed,
            wire.len()
        );
        let start_of_partial = if complete == 0 { 0 } else { ends[complete - 1] };
        prop_assert_eq!(buf.len(), fed - start_of_partial);
    }
    prop_assert!(buf.is_empty());
    prop_assert_eq!(decoded.as_slice(), messages);
    Ok(())
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    // Mostly tiny chunks (splitting headers and varints), sometimes big ones (several frames).
    vec(prop_oneof![4 => 1usize..8, 1 => 8usize..512], 1..16)
}

proptest! {
    #[test]
    fn a_client_frame_round_trips(frame in client_frame()) {
        round_trip_one(&frame)?;
    }

    #[test]
    fn a_server_frame_round_trips(frame in server_frame()) {
        round_trip_one(&frame)?;
    }

    #[test]
    fn concatenated_client_frames_round_trip_in_order(frames in vec(client_frame(), 0..8)) {
        round_trip_concatenated(&frames)?;
    }

    #[test]
    fn concatenated_server_frames_round_trip_in_order(frames in vec(server_frame(), 0..8)) {
        round_trip_concatenated(&frames)?;
    }

    #[test]
    fn client_frames_fed_in_random_chunks_round_trip(
        frames in vec(client_frame(), 1..6),
        sizes in chunk_sizes(),
    ) {
        round_trip_chunked(&frames, &sizes)?;
    }

    #[test]
    fn server_frames_fed_in_random_chunks_round_trip(
        frames in vec(server_frame(), 1..6),
        sizes in chunk_sizes(),
    ) {
        round_trip_chunked(&frames, &sizes)?;
    }

    #[test]
    fn server_frames_fed_one_byte_at_a_time_round_trip(frames in vec(server_frame(), 1..4)) {
        round_trip_chunked(&frames, &[1])?;
    }
}

/// Draws `samples` values from `strategy` and returns the set of variant names seen.
fn variants_seen<S: Strategy>(
    strategy: S,
    name: impl Fn(&S::Value) -> &'static str,
    samples: usize,
) -> BTreeSet<&'static str> {
    let mut runner = TestRunner::deterministic();
    (0..samples)
        .map(|_| name(&strategy.new_tree(&mut runner).unwrap().current()))
        .collect()
}

fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

/// The properties above only prove something for the variants the strategies produce; this pins
/// that they produce every one (the `*_variant` matches are exhaustive, so a new variant must be
/// named there before this compiles, and then added here and to the strategy).
#[test]
fn strategies_generate_every_variant() {
    const N: usize = 2_000;
    assert_eq!(
        variants_seen(client_frame(), client_frame_variant, N),
        set(&["hello", "call"])
    );
    assert_eq!(
        variants_seen(request(), request_variant, N),
        set(&[
            "ping",
            "snapshot",
            "pool_status",
            "can_dispatch",
            "acquire",
            "release",
            "subscribe",
            "drain",
            "reload",
            "restart",
            "gpus",
            "renew",
            "load",
            "unload",
            "cancel_load",
            "memory",
        ])
    );
    assert_eq!(
        variants_seen(acquire_target(), acquire_target_variant, N),
        set(&["pool", "model"])
    );
    assert_eq!(
        variants_seen(release_outcome(), release_outcome_variant, N),
        set(&["completed", "cancelled", "failed"])
    );
    assert_eq!(
        variants_seen(server_frame(), server_frame_variant, N),
        set(&["welcome", "reply_ok", "reply_err", "event", "refused"])
    );
    assert_eq!(
        variants_seen(response(), response_variant, N),
        set(&[
            "pong",
            "snapshot",
            "pool_status",
            "can_dispatch",
            "acquired",
            "released",
            "subscribed",
            "accepted",
            "gpus",
            "renewed",
            "memory",
        ])
    );
    assert_eq!(
        variants_seen(change(), change_variant, N),
        set(&["pool_updated", "pool_removed", "leases_revoked", "resync"])
    );
    assert_eq!(
        variants_seen(error_code(), error_code_variant, N),
        set(&[
            "not_found",
            "not_ready",
            "draining",
            "no_capacity",
            "unauthorized",
            "bad_request",
            "version_mismatch",
            "internal",
            "unsupported",
            "shutting_down",
            "lease_cap_reached",
        ])
    );
    assert_eq!(
        variants_seen(pool_state(), pool_state_variant, N),
        set(&[
            "starting",
            "ready",
            "unhealthy",
            "draining",
            "stopped",
            "backing_off",
            "failed",
            "unloaded",
            "loading",
        ])
    );
    assert_eq!(
        variants_seen(engine_kind(), engine_kind_variant, N),
        set(&["llamacpp", "openai"])
    );
    assert_eq!(
        variants_seen(endpoint(), endpoint_variant, N),
        set(&["http", "unix"])
    );
    assert_eq!(
        variants_seen(api_endpoint(), api_endpoint_variant, N),
        set(&[
            "chat_completions",
            "completions",
            "embeddings",
            "rerank",
            "messages",
            "messages_count_tokens",
            "responses",
            "responses_input_tokens",
            "chat_completions_input_tokens",
            "models",
        ])
    );
}

/// The reply-level strategies reach the nested enums too (a pool snapshot inside a reply carries
/// every state and every API), not only the per-enum strategies on their own.
#[test]
fn server_frames_carry_every_pool_state_api_and_error_code() {
    let mut runner = TestRunner::deterministic();
    let strategy = server_frame();
    let mut states = BTreeSet::new();
    let mut apis = BTreeSet::new();
    let mut codes = BTreeSet::new();
    for _ in 0..5_000 {
        match strategy.new_tree(&mut runner).unwrap().current() {
            ServerFrame::Reply(reply) => match reply.result {
                Ok(pool_ipc::Response::PoolStatus(pool)) => {
                    states.insert(pool_state_variant(&pool.state));
                    apis.extend(pool.api_endpoints.iter().map(api_endpoint_variant));
                }
                Err(error) => {
                    codes.insert(error_code_variant(&error.code));
                }
                Ok(_) => {}
            },
            ServerFrame::Refused(error) => {
                codes.insert(error_code_variant(&error.code));
            }
            ServerFrame::Welcome(_) | ServerFrame::Event(_) => {}
        }
    }
    assert_eq!(states.len(), 9, "{states:?}");
    assert_eq!(apis.len(), 10, "{apis:?}");
    assert_eq!(codes.len(), pool_ipc::ErrorCode::ALL.len(), "{codes:?}");
}

#[test]
fn a_frame_fed_byte_by_byte_is_none_until_its_last_byte() {
    let frame = ClientFrame::Call(pool_ipc::Call {
        id: u64::MAX,
        request: pool_ipc::Request::Reload {
            pool: "pool-a".into(),
            model: "ünïcode-model".into(),
        },
    });
    let (wire, _) = encode_all(std::slice::from_ref(&frame));
    let mut buf = BytesMut::new();
    for (i, byte) in wire.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let taken = take_frame(&mut buf, MAX).unwrap();
        if i + 1 < wire.len() {
            assert_eq!(
                taken,
                None,
                "complete after only {} of {} bytes",
                i + 1,
                wire.len()
            );
        } else {
            let payload = taken.expect("complete at the last byte");
            assert_eq!(decode_payload::<ClientFrame>(&payload).unwrap(), frame);
        }
    }
    assert!(buf.is_empty());
}
