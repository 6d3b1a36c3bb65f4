//! Fuzz target: the frame decoder both daemons read a peer's bytes with (`codec::take_frame`, as
//! `FrameReader` drives it) and the payload decoders behind it (`decode_payload` of `ClientFrame`
//! and `ServerFrame`, `decode_payload_prefix`).
//!
//! Input: byte 0 picks the frame maximum (the default, or a small one), byte 1 seeds how the rest
//! is cut into reads. Properties:
//! - the decoder never claims more bytes than it was given: each frame consumes exactly its header
//!   and payload from the buffer, and a payload is never empty nor over the maximum;
//! - "not enough bytes yet" leaves the buffered bytes as they were and reserves no more than one
//!   frame's worth;
//! - the frames (and the error that ends them) are the same however the stream is cut into reads;
//! - a payload that decodes re-encodes, canonically (never longer), to a frame that decodes to the
//!   same value; a prefix decode never uses more bytes than the payload has.

#![no_main]

mod split;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pool_ipc::codec::{
    CodecError, HEADER_BYTES, decode_payload, decode_payload_prefix, frame_bytes, take_frame,
};
use pool_ipc::{ClientFrame, DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_BYTES_CEILING, ServerFrame};

/// What reading a stream to its end gave: the payloads, then the error or the bytes left over.
#[derive(Debug, PartialEq)]
struct Outcome {
    payloads: Vec<Bytes>,
    end: Result<usize, CodecError>,
}

/// Takes every complete frame out of `buf`, checking each call's effect on the buffer.
fn drain(buf: &mut BytesMut, max: u32, payloads: &mut Vec<Bytes>) -> Result<(), CodecError> {
    let limit = max.min(MAX_FRAME_BYTES_CEILING) as usize;
    loop {
        let before = buf.clone();
        let capacity_before = buf.capacity();
        match take_frame(buf, max)? {
            Some(payload) => {
                assert!(!payload.is_empty() && payload.len() <= limit);
                assert_eq!(buf.len() + HEADER_BYTES + payload.len(), before.len());
                assert_eq!(
                    &before[HEADER_BYTES..HEADER_BYTES + payload.len()],
                    &payload[..]
                );
                assert_eq!(&before[HEADER_BYTES + payload.len()..], &buf[..]);
                payloads.push(payload);
            }
            None => {
                assert_eq!(&before[..], &buf[..]);
                assert!(buf.capacity() <= capacity_before.max(HEADER_BYTES + limit));
                return Ok(());
            }
        }
    }
}

fn read(reads: &[&[u8]], max: u32) -> Outcome {
    let mut buf = BytesMut::new();
    let mut payloads = Vec::new();
    for chunk in reads {
        buf.extend_from_slice(chunk);
        if let Err(error) = drain(&mut buf, max, &mut payloads) {
            return Outcome {
                payloads,
                end: Err(error),
            };
        }
    }
    Outcome {
        payloads,
        end: Ok(buf.len()),
    }
}

/// A decoded payload re-encodes canonically and decodes back to the same value.
fn round_trips<T>(payload: &[u8])
where
    T: bincode::Decode<()> + bincode::Encode + PartialEq + std::fmt::Debug,
{
    if let Ok((_, used)) = decode_payload_prefix::<T>(payload) {
        assert!(used <= payload.len());
    }
    let Ok(message) = decode_payload::<T>(payload) else {
        return;
    };
    let frame = frame_bytes(&message, MAX_FRAME_BYTES_CEILING).expect("a decoded message encodes");
    assert!(frame.len() - HEADER_BYTES <= payload.len());
    let mut buf = BytesMut::from(&frame[..]);
    let again = take_frame(&mut buf, MAX_FRAME_BYTES_CEILING)
        .expect("a fresh frame is well formed")
        .expect("a fresh frame is complete");
    assert!(buf.is_empty());
    assert_eq!(decode_payload::<T>(&again), Ok(message));
}

fuzz_target!(|data: &[u8]| {
    let [pick, seed, stream @ ..] = data else {
        return;
    };
    let max = if pick & 0x80 == 0 {
        DEFAULT_MAX_FRAME_BYTES
    } else {
        u32::from(pick & 0x7f)
    };
    let whole = read(&[stream], max);
    let split = read(&split::chunks(stream, *seed), max);
    assert_eq!(whole, split);
    for payload in &whole.payloads {
        round_trips::<ClientFrame>(payload);
        round_trips::<ServerFrame>(payload);
    }
});
