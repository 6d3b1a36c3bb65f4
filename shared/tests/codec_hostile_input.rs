//! What a hostile or broken peer can send: arbitrary bytes, cut frames, flipped bytes, absurd
//! length prefixes, and bincode length prefixes that claim enormous strings and vectors. None may
//! panic, each must end in a typed [`CodecError`] (or `Ok(None)` while a frame is incomplete), and
//! none may make the process allocate more than one frame's worth of memory in one go.
//!
//! The binary installs a counting global allocator to check that last point: it records the
//! largest single allocation request made *on the current thread* while a test has tracking on,
//! so tests running in parallel on other threads do not disturb each other's measurement.

// The counting allocator must `unsafe impl GlobalAlloc`; this is the only unsafe code, it only
// forwards to `System`, and it lives in a test binary, not in the crate.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod strategies;

use bytes::{BufMut, BytesMut};
use pool_ipc::codec::{HEADER_BYTES, decode_payload, decode_payload_prefix, take_frame};
use pool_ipc::framed::{FrameReader, ReadError};
use pool_ipc::{
    ClientFrame, CodecError, DEFAULT_MAX_FRAME_BYTES, HelloPreamble, MAX_FRAME_BYTES_CEILING,
    ServerFrame,
};
use proptest::collection::vec;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use strategies::{client_frame, server_frame};
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------------
// Counting allocator
// ---------------------------------------------------------------------------------------------

struct CountingAllocator;

thread_local! {
    // `const` initialisers and `Cell`s without destructors: reading them never allocates and never
    // registers a TLS destructor, so the allocator can use them without recursing.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    // `try_with`: an allocation during thread teardown must not panic inside the allocator.
    let _ = TRACKING.try_with(|tracking| {
        if tracking.get() {
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; `record` only
// touches thread-local `Cell`s and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded verbatim; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded verbatim; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded verbatim; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded verbatim; `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Turns tracking off again even if the measured code panics.
struct TrackingOn;

impl Drop for TrackingOn {
    fn drop(&mut self) {
        TRACKING.with(|tracking| tracking.set(false));
    }
}

/// Runs `f` and returns its result with the largest single allocation request it made on this
/// thread (0 if it allocated nothing).
fn largest_allocation_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|largest| largest.set(0));
    TRACKING.with(|tracking| tracking.set(true));
    let guard = TrackingOn;
    let result = f();
    drop(guard);
    (result, LARGEST.with(Cell::get))
}

/// Allowance above one frame for bookkeeping (error messages and the like).
const SLACK: usize = 4 * 1024;
const ALLOCATION_BOUND: usize = MAX_FRAME_BYTES_CEILING as usize + SLACK;
const MAX: u32 = DEFAULT_MAX_FRAME_BYTES;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn frame_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

fn encode<T: bincode::Encode>(message: &T) -> Vec<u8> {
    let mut buf = BytesMut::new();
    pool_ipc::codec::encode_frame(message, &mut buf, MAX).unwrap();
    buf.to_vec()
}

/// bincode 2 standard-config varint, as the wire uses for every integer and length.
fn varint(value: u64) -> Vec<u8> {
    match value {
        0..=250 => vec![value as u8],
        251..=0xFFFF => [&[251u8][..], &(value as u16).to_le_bytes()].concat(),
        0x1_0000..=0xFFFF_FFFF => [&[252u8][..], &(value as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &value.to_le_bytes()].concat(),
    }
}

fn is_decode_error(err: &CodecError) -> bool {
    matches!(err, CodecError::Malformed(_) | CodecError::TrailingBytes(_))
}

/// Decodes `payload` as every top-level message type (and the handshake preamble) and checks each
/// outcome is a value or a decode error, never another kind of error.
fn decode_every_way(payload: &[u8]) -> Result<(), TestCaseError> {
    if let Err(err) = decode_payload::<ClientFrame>(payload) {
        prop_assert!(is_decode_error(&err), "{err:?}");
    }
    if let Err(err) = decode_payload::<ServerFrame>(payload) {
        prop_assert!(is_decode_error(&err), "{err:?}");
    }
    if let Err(err) = decode_payload_prefix::<HelloPreamble>(payload) {
        prop_assert!(matches!(err, CodecError::Malformed(_)), "{err:?}");
    }
    Ok(())
}

/// Takes every frame out of `bytes` and decodes each; returns how taking ended.
fn take_and_decode_all(bytes: &[u8], max: u32) -> Result<Result<(), CodecError>, TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    loop {
        match take_frame(&mut buf, max) {
            Ok(Some(payload)) => {
                prop_assert!(!payload.is_empty());
                prop_assert!(payload.len() <= max.min(MAX_FRAME_BYTES_CEILING) as usize);
                decode_every_way(&payload)?;
            }
            Ok(None) => return Ok(Ok(())),
            Err(err) => {
                prop_assert!(
                    matches!(
                        err,
                        CodecError::FrameTooLarge { .. } | CodecError::EmptyFrame
                    ),
                    "{err:?}"
                );
                return Ok(Err(err));
            }
        }
    }
}

fn any_frame_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        client_frame().prop_map(|frame| encode(&frame)),
        server_frame().prop_map(|frame| encode(&frame)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Arbitrary, truncated and corrupted input
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn arbitrary_bytes_give_frames_or_typed_errors(
        bytes in vec(any::<u8>(), 0..256),
        max in prop_oneof![Just(MAX), 0u32..64, any::<u32>()],
    ) {
        let _ = take_and_decode_all(&bytes, max)?;
    }

    #[test]
    fn arbitrary_payloads_in_well_formed_frames_give_values_or_typed_errors(
        payloads in vec(vec(any::<u8>(), 1..128), 1..4),
    ) {
        let bytes: Vec<u8> = payloads.iter().flat_map(|p| frame_with_payload(p)).collect();
        prop_assert_eq!(take_and_decode_all(&bytes, MAX)?, Ok(()));
    }

    #[test]
    fn arbitrary_payloads_decode_to_values_or_typed_errors(payload in vec(any::<u8>(), 0..256)) {
        decode_every_way(&payload)?;
    }

    /// A frame cut at every length is "not yet" while framed, and a payload cut short is never
    /// mistaken for a shorter message (bincode's encoding of one type is prefix-free).
    #[test]
    fn a_frame_cut_anywhere_is_incomplete_and_its_cut_payload_is_malformed(
        frame in any_frame_bytes(),
    ) {
        let payload = &frame[HEADER_BYTES..];
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            prop_assert_eq!(take_frame(&mut buf, MAX), Ok(None), "cut at {}", cut);
            prop_assert_eq!(buf.len(), cut);
        }
        for cut in 0..payload.len() {
            let client = decode_payload::<ClientFrame>(&payload[..cut]);
            let server = decode_payload::<ServerFrame>(&payload[..cut]);
            // Which type the frame was is not known here; cut short, it fails to decode as that
            // type, so at least one of the two is malformed (the other may even decode).
            prop_assert!(
                matches!(client, Err(CodecError::Malformed(_)))
                    || matches!(server, Err(CodecError::Malformed(_))),
                "cut at {}: {:?} / {:?}", cut, client, server
            );
            // Re-framed at its cut length, it is a complete frame that fails to decode (or an
            // empty frame, refused before decoding).
            let mut buf = BytesMut::from(&frame_with_payload(&payload[..cut])[..]);
            match take_frame(&mut buf, MAX) {
                Ok(Some(cut_payload)) => decode_every_way(&cut_payload)?,
                Err(CodecError::EmptyFrame) => prop_assert_eq!(cut, 0),
                other => prop_assert!(false, "cut at {}: {:?}", cut, other),
            }
        }
    }

    #[test]
    fn a_corrupted_payload_byte_gives_a_value_or_a_typed_error(
        frame in any_frame_bytes(),
        index in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut frame = frame;
        let at = HEADER_BYTES + index.index(frame.len() - HEADER_BYTES);
        frame[at] ^= flip;
        prop_assert_eq!(take_and_decode_all(&frame, MAX)?, Ok(()));
    }

    #[test]
    fn a_corrupted_length_prefix_never_panics(
        frame in any_frame_bytes(),
        index in 0..HEADER_BYTES,
        flip in 1u8..=255,
    ) {
        let mut frame = frame;
        frame[index] ^= flip;
        let _ = take_and_decode_all(&frame, MAX)?;
    }
}

#[test]
fn a_cut_payload_of_its_own_type_is_always_malformed() {
    // The property above cannot know which type a random frame was; here it is fixed.
    let frame = pool_ipc::ClientFrame::Call(pool_ipc::Call {
        id: 300,
        request: pool_ipc::Request::Acquire {
            target: pool_ipc::AcquireTarget::Model("m".into()),
            task_id: "task".into(),
            session: Some("s".into()),
            slots: 300,
            trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        },
    });
    let bytes = encode(&frame);
    let payload = &bytes[HEADER_BYTES..];
    for cut in 0..payload.len() {
        assert!(
            matches!(
                decode_payload::<ClientFrame>(&payload[..cut]),
                Err(CodecError::Malformed(_))
            ),
            "cut at {cut}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Length prefixes
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn a_length_above_the_maximum_is_refused_before_reserving(
        max in prop_oneof![Just(MAX), 0u32..=4096, any::<u32>()],
        excess in prop_oneof![1u32..=16, any::<u32>()],
        tail in vec(any::<u8>(), 0..64),
    ) {
        let effective = max.min(MAX_FRAME_BYTES_CEILING);
        let len = effective.saturating_add(excess);
        prop_assume!(len > effective);
        let mut buf = BytesMut::with_capacity(HEADER_BYTES + tail.len());
        buf.put_u32(len);
        buf.put_slice(&tail);
        let (capacity, len_before) = (buf.capacity(), buf.len());
        let (result, largest) = largest_allocation_during(|| take_frame(&mut buf, max));
        prop_assert_eq!(
            result,
            Err(CodecError::FrameTooLarge { len: u64::from(len), max: effective })
        );
        prop_assert_eq!(largest, 0, "allocated before refusing");
        prop_assert_eq!(buf.capacity(), capacity);
        prop_assert_eq!(buf.len(), len_before);
    }

    #[test]
    fn a_zero_length_is_refused_without_allocating(
        max in any::<u32>(),
        tail in vec(any::<u8>(), 0..64),
    ) {
        let mut buf = BytesMut::with_capacity(HEADER_BYTES + tail.len());
        buf.put_u32(0);
        buf.put_slice(&tail);
        let capacity = buf.capacity();
        let (result, largest) = largest_allocation_during(|| take_frame(&mut buf, max));
        prop_assert_eq!(result, Err(CodecError::EmptyFrame));
        prop_assert_eq!(largest, 0);
        prop_assert_eq!(buf.capacity(), capacity);
        prop_assert_eq!(buf.len(), HEADER_BYTES + tail.len());
    }

    /// An incomplete frame reserves room for the rest of itself, and no more than that, starting
    /// from a buffer that holds at most half of the frame.
    #[test]
    fn an_incomplete_frame_reserves_only_its_announced_length(
        len in prop_oneof![4u32..=4096, 4u32..=MAX],
        have in any::<prop::sample::Index>(),
    ) {
        let total = HEADER_BYTES + len as usize;
        let have = have.index(total);
        let mut buf = BytesMut::with_capacity(HEADER_BYTES.max(have));
        buf.put_u32(len);
        buf.resize(have.max(HEADER_BYTES), 0xAB);
        let (result, largest) = largest_allocation_during(|| take_frame(&mut buf, MAX));
        prop_assert_eq!(result, Ok(None));
        prop_assert!(buf.capacity() >= total, "{} < {}", buf.capacity(), total);
        prop_assert!(largest <= total, "allocated {} for a {}-byte frame", largest, total);
    }
}

/// `BytesMut::reserve` grows amortised (at least doubling), which would grow a buffer already
/// holding most of an announced frame past the frame maximum; `take_frame` must not.
#[test]
fn a_mostly_received_frame_reserves_only_its_announced_length() {
    let len = MAX_FRAME_BYTES_CEILING;
    let total = HEADER_BYTES + len as usize;
    let have = total * 9 / 10;
    let mut buf = BytesMut::with_capacity(have);
    buf.put_u32(len);
    buf.resize(have, 0);
    let (result, largest) = largest_allocation_during(|| take_frame(&mut buf, MAX));
    assert_eq!(result, Ok(None));
    assert!(buf.capacity() >= total);
    assert!(
        largest <= total,
        "one allocation of {largest} bytes for a frame of {total} (ceiling {MAX_FRAME_BYTES_CEILING})"
    );
}

/// The same through a socket: after a 900 KiB frame the reader's buffer is reused at 900 KiB, and
/// the next frame (1 MiB, within the maximum) must not double it.
#[tokio::test]
async fn frame_reader_never_allocates_more_than_a_frame_for_the_next_frame() {
    let first_len = 900 * 1024;
    let second_len = MAX_FRAME_BYTES_CEILING as usize;
    let (mut writer, reader) = tokio::io::duplex(4 << 20);
    writer
        .write_all(&frame_with_payload(&vec![0; first_len]))
        .await
        .unwrap();
    writer
        .write_all(&frame_with_payload(&vec![0; second_len]))
        .await
        .unwrap();
    drop(writer);
    let mut frames = FrameReader::new(reader, MAX);
    let first = frames.read_frame().await.unwrap().expect("first frame");
    assert_eq!(first.len(), first_len);
    drop(first);
    // Everything is already in the duplex, so this poll completes without yielding; the
    // allocations it makes are this thread's.
    let mut read = std::pin::pin!(frames.read_frame());
    let (second, largest) = largest_allocation_during(|| {
        let waker = std::task::Waker::noop();
        read.as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
    });
    let second = match second {
        std::task::Poll::Ready(result) => result.unwrap().expect("second frame"),
        std::task::Poll::Pending => panic!("the second frame was not ready"),
    };
    assert_eq!(second.len(), second_len);
    assert!(
        largest <= HEADER_BYTES + second_len + SLACK,
        "one allocation of {largest} bytes to read a {second_len}-byte frame"
    );
}

// ---------------------------------------------------------------------------------------------
// Allocation bound while decoding
// ---------------------------------------------------------------------------------------------

/// Frames and decodes `bytes` every way with tracking on; returns the largest single allocation.
fn largest_allocation_decoding(bytes: &[u8]) -> usize {
    let mut buf = BytesMut::from(bytes);
    let ((), largest) = largest_allocation_during(|| {
        while let Ok(Some(payload)) = take_frame(&mut buf, MAX) {
            let _ = decode_payload::<ClientFrame>(&payload);
            let _ = decode_payload::<ServerFrame>(&payload);
            let _ = decode_payload_prefix::<HelloPreamble>(&payload);
        }
    });
    largest
}

/// Lengths a hostile peer might claim for a string or vector.
const CLAIMED_LENGTHS: [u64; 12] = [
    u64::MAX,
    1 << 63,
    1 << 40,
    1 << 32,
    u32::MAX as u64,
    (MAX_FRAME_BYTES_CEILING as u64) * 2,
    MAX_FRAME_BYTES_CEILING as u64 + 1,
    MAX_FRAME_BYTES_CEILING as u64,
    MAX_FRAME_BYTES_CEILING as u64 - 1,
    MAX_FRAME_BYTES_CEILING as u64 - 64,
    (MAX_FRAME_BYTES_CEILING as u64) / 2,
    1 << 16,
];

/// Which top-level type a crafted payload is written as.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// Payloads whose one container length prefix is `claimed`, each followed by a few real bytes.
/// Byte comments give the field each byte encodes (bincode 2 standard config: varints, LE).
fn payloads_claiming(claimed: u64) -> Vec<(&'static str, Side, Vec<u8>)> {
    let n = varint(claimed);
    let tail = [0x61u8; 8];
    let with = |prefix: &[u8]| [prefix, &n[..], &tail[..]].concat();
    vec![
        // ClientFrame::Call(1), id 0, Request::Reload(8), pool "p", model: <claimed> bytes.
        ("reload.model", Side::Client, with(&[1, 0, 8, 1, b'p'])),
        // ClientFrame::Call, id 0, Request::PoolStatus(2), pool: <claimed> bytes.
        ("pool_status.pool", Side::Client, with(&[1, 0, 2])),
        // ClientFrame::Call, id 0, Request::Acquire(4), target Model(1): <claimed> bytes.
        ("acquire.target", Side::Client, with(&[1, 0, 4, 1])),
        // ... target Model("m"), task_id "", session None, slots 1, trace_parent Some: <claimed>
        // bytes.
        (
            "acquire.trace_parent",
            Side::Client,
            with(&[1, 0, 4, 1, 1, b'm', 0, 0, 1, 1]),
        ),
        // ClientFrame::Hello(0), magic, version 1, client_name: <claimed> bytes.
        (
            "hello.client_name",
            Side::Client,
            with(&[0, b'P', b'M', b'G', b'R', 1]),
        ),
        // ... client_name "", held_leases: <claimed> entries.
        (
            "hello.held_leases",
            Side::Client,
            with(&[0, b'P', b'M', b'G', b'R', 1, 0]),
        ),
        // ServerFrame::Welcome(0), version 1, server_version: <claimed> bytes.
        ("welcome.server_version", Side::Server, with(&[0, 1])),
        // ... server_version "", epoch 0, max 0, reasserted: <claimed> lease ids.
        ("welcome.reasserted", Side::Server, with(&[0, 1, 0, 0, 0])),
        // ... reasserted [], rejected: <claimed> (LeaseId, IpcError) pairs.
        ("welcome.rejected", Side::Server, with(&[0, 1, 0, 0, 0, 0])),
        // ServerFrame::Reply(1), id 0, Ok(0), Response::Snapshot(1), epoch 0, pools: <claimed>.
        ("reply.snapshot.pools", Side::Server, with(&[1, 0, 0, 1, 0])),
        // ... Response::Subscribed(6), epoch 0, pools: <claimed>.
        (
            "reply.subscribed.pools",
            Side::Server,
            with(&[1, 0, 0, 6, 0]),
        ),
        // Reply, id 0, Err(1), code NotFound (1), message: <claimed> bytes.
        ("reply.err.message", Side::Server, with(&[1, 0, 1, 1])),
        // ServerFrame::Event(2), epoch 0, Change::LeasesRevoked(2), pool "", leases: <claimed>.
        (
            "event.leases_revoked.leases",
            Side::Server,
            with(&[2, 0, 2, 0]),
        ),
        // ServerFrame::Refused(3), code Internal (8), message: <claimed> bytes.
        ("refused.message", Side::Server, with(&[3, 8])),
    ]
}

#[test]
fn claimed_huge_lengths_never_allocate_more_than_a_frame() {
    let mut largest_seen = 0;
    for claimed in CLAIMED_LENGTHS {
        for (what, side, payload) in payloads_claiming(claimed) {
            let frame = frame_with_payload(&payload);
            let largest = largest_allocation_decoding(&frame);
            largest_seen = largest_seen.max(largest);
            assert!(
                largest <= ALLOCATION_BOUND,
                "{what} claiming {claimed}: one allocation of {largest} bytes"
            );
            // Read as the type it was written as, it is refused as malformed (the claimed
            // length is either over the decode limit or longer than the payload).
            let own = match side {
                Side::Client => decode_payload::<ClientFrame>(&payload).err(),
                Side::Server => decode_payload::<ServerFrame>(&payload).err(),
            };
            assert!(
                matches!(own, Some(CodecError::Malformed(_))),
                "{what} claiming {claimed}: {own:?}"
            );
        }
    }
    // Claims just under the decode limit do make bincode allocate about a frame up front (before
    // finding the payload too short); seeing that proves the allocator is really measuring.
    assert!(
        largest_seen > MAX_FRAME_BYTES_CEILING as usize / 2,
        "largest allocation seen was only {largest_seen} bytes"
    );
}

#[test]
fn a_reload_claiming_a_u64_max_model_is_malformed_without_a_big_allocation() {
    let payload = [&[1u8, 0, 8, 1, b'p'][..], &varint(u64::MAX)].concat();
    let frame = frame_with_payload(&payload);
    assert!(largest_allocation_decoding(&frame) <= SLACK);
    assert!(matches!(
        decode_payload::<ClientFrame>(&payload),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn a_reload_claiming_a_2_pow_40_model_is_malformed_without_a_big_allocation() {
    let payload = [&[1u8, 0, 8, 1, b'p'][..], &varint(1 << 40)].concat();
    let frame = frame_with_payload(&payload);
    assert!(largest_allocation_decoding(&frame) <= SLACK);
    assert!(matches!(
        decode_payload::<ClientFrame>(&payload),
        Err(CodecError::Malformed(_))
    ));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_allocate_more_than_a_frame(bytes in vec(any::<u8>(), 0..512)) {
        let largest = largest_allocation_decoding(&bytes);
        prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {}", largest);
    }

    #[test]
    fn arbitrary_payloads_never_allocate_more_than_a_frame(payload in vec(any::<u8>(), 1..512)) {
        let largest = largest_allocation_decoding(&frame_with_payload(&payload));
        prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {}", largest);
    }

    /// A valid frame with random bytes replaced by a random claimed length: a length prefix can
    /// sit anywhere, so splice one in at a random offset.
    #[test]
    fn spliced_length_claims_never_allocate_more_than_a_frame(
        frame in any_frame_bytes(),
        at in any::<prop::sample::Index>(),
        claimed in prop_oneof![any::<u64>(), 0u64..=(2 * MAX_FRAME_BYTES_CEILING as u64)],
    ) {
        let payload = &frame[HEADER_BYTES..];
        let at = at.index(payload.len());
        let spliced = [&payload[..at], &varint(claimed)[..], &payload[at..]].concat();
        let largest = largest_allocation_decoding(&frame_with_payload(&spliced));
        prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {}", largest);
    }
}

// ---------------------------------------------------------------------------------------------
// FrameReader over a stream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn frame_reader_returns_none_on_a_clean_eof_between_frames() {
    let (mut writer, reader) = tokio::io::duplex(64);
    let first = encode(&ClientFrame::Call(pool_ipc::Call {
        id: 1,
        request: pool_ipc::Request::Ping,
    }));
    let second = encode(&ServerFrame::Refused(pool_ipc::IpcError::new(
        pool_ipc::ErrorCode::ShuttingDown,
        "bye",
    )));
    let write = async move {
        writer.write_all(&first).await.unwrap();
        writer.write_all(&second).await.unwrap();
        // Dropping the writer is the clean end of stream.
    };
    let read = async {
        let mut frames = FrameReader::new(reader, MAX);
        let a = frames.read_frame().await.unwrap().expect("first frame");
        let b = frames.read_frame().await.unwrap().expect("second frame");
        let end = frames.read_frame().await.unwrap();
        (a, b, end)
    };
    let ((), (a, b, end)) = tokio::join!(write, read);
    assert!(matches!(
        decode_payload::<ClientFrame>(&a),
        Ok(ClientFrame::Call(_))
    ));
    assert!(matches!(
        decode_payload::<ServerFrame>(&b),
        Ok(ServerFrame::Refused(_))
    ));
    assert_eq!(end, None);
}

#[tokio::test]
async fn frame_reader_returns_none_on_eof_before_any_frame() {
    let (writer, reader) = tokio::io::duplex(64);
    drop(writer);
    let mut frames = FrameReader::new(reader, MAX);
    assert_eq!(frames.read_frame().await.unwrap(), None);
}

#[tokio::test]
async fn frame_reader_reports_eof_in_the_middle_of_a_frame_as_truncated() {
    let frame = encode(&ClientFrame::Call(pool_ipc::Call {
        id: 2,
        request: pool_ipc::Request::Reload {
            pool: "pool".into(),
            model: "model".into(),
        },
    }));
    // Cut inside the header, right after it, and inside the payload.
    for cut in [1, HEADER_BYTES - 1, HEADER_BYTES, frame.len() - 1] {
        let (mut writer, reader) = tokio::io::duplex(1024);
        writer.write_all(&frame).await.unwrap(); // one whole frame first
        writer.write_all(&frame[..cut]).await.unwrap();
        drop(writer);
        let mut frames = FrameReader::new(reader, MAX);
        assert!(frames.read_frame().await.unwrap().is_some());
        let err = frames.read_frame().await.unwrap_err();
        assert!(
            matches!(err, ReadError::TruncatedFrame),
            "cut at {cut}: {err:?}"
        );
    }
}

#[tokio::test]
async fn frame_reader_refuses_an_oversized_length_with_a_codec_error() {
    let (mut writer, reader) = tokio::io::duplex(64);
    writer.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let mut frames = FrameReader::new(reader, MAX);
    let err = frames.read_frame().await.unwrap_err();
    assert!(
        matches!(err, ReadError::Codec(CodecError::FrameTooLarge { .. })),
        "{err:?}"
    );
}
