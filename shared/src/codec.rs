//! Framing: a 4-byte big-endian payload length, then a bincode 2.0.1 payload.
//!
//! Pure and synchronous. [`take_frame`] checks the announced length against the maximum *before*
//! reserving a byte for it, and bincode decodes with a fixed memory limit, so no input can make
//! either side allocate more than [`MAX_FRAME_BYTES_CEILING`] for one frame. bincode is used only
//! here, so the payload format can be swapped without touching the rest of the crate.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frames above this are refused unless a peer negotiates a smaller maximum.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1 << 20;
/// No configuration may raise the maximum above this; it is also bincode's decode memory limit.
pub const MAX_FRAME_BYTES_CEILING: u32 = 1 << 20;
/// Length prefix size.
pub const HEADER_BYTES: usize = 4;

const DECODE_LIMIT: usize = MAX_FRAME_BYTES_CEILING as usize;

type WireConfig = Configuration<LittleEndian, Varint, Limit<DECODE_LIMIT>>;

fn wire_config() -> WireConfig {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("empty frame")]
    EmptyFrame,
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("payload has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("could not encode message: {0}")]
    Encode(String),
}

struct FrameWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for FrameWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.put_slice(bytes);
        Ok(())
    }
}

/// Appends one frame holding `message` to `out`. On error `out` is left as it was.
pub fn encode_frame<T: bincode::Encode>(
    message: &T,
    out: &mut BytesMut,
    max_frame_bytes: u32,
) -> Result<(), CodecError> {
    let start = out.len();
    out.put_u32(0);
    if let Err(err) = bincode::encode_into_writer(message, FrameWriter(out), wire_config()) {
        out.truncate(start);
        return Err(CodecError::Encode(err.to_string()));
    }
    let payload_len = out.len() - start - HEADER_BYTES;
    if payload_len as u64 > u64::from(max_frame_bytes) {
        out.truncate(start);
        return Err(CodecError::FrameTooLarge {
            len: payload_len as u64,
            max: max_frame_bytes,
        });
    }
    out[start..start + HEADER_BYTES].copy_from_slice(&(payload_len as u32).to_be_bytes());
    Ok(())
}

/// Encodes one message into a fresh frame.
pub fn frame_bytes<T: bincode::Encode>(
    message: &T,
    max_frame_bytes: u32,
) -> Result<Bytes, CodecError> {
    let mut out = BytesMut::with_capacity(64);
    encode_frame(message, &mut out, max_frame_bytes)?;
    Ok(out.freeze())
}

/// Splits one complete frame's payload off the front of `buf`.
///
/// `Ok(None)` means "not enough bytes yet" (a normal condition); `buf` then has capacity
/// reserved for the rest of the announced frame, which is never more than `max_frame_bytes`.
pub fn take_frame(buf: &mut BytesMut, max_frame_bytes: u32) -> Result<Option<Bytes>, CodecError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > max_frame_bytes.min(MAX_FRAME_BYTES_CEILING) {
        return Err(CodecError::FrameTooLarge {
            len: u64::from(len),
            max: max_frame_bytes.min(MAX_FRAME_BYTES_CEILING),
        });
    }
    if len == 0 {
        return Err(CodecError::EmptyFrame);
    }
    let total = HEADER_BYTES + len as usize;
    if buf.len() < total {
        reserve_exactly(buf, total);
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    Ok(Some(buf.split_to(len as usize).freeze()))
}

/// Makes room for `total` bytes in `buf` without `BytesMut::reserve`'s growth policy, which
/// may double an already large buffer past the frame maximum.
pub fn reserve_exactly(buf: &mut BytesMut, total: usize) {
    if buf.capacity() >= total {
        return;
    }
    let mut exact = BytesMut::with_capacity(total);
    exact.extend_from_slice(buf);
    *buf = exact;
}

/// Decodes a whole payload; every byte must belong to the message.
pub fn decode_payload<T: bincode::Decode<()>>(payload: &[u8]) -> Result<T, CodecError> {
    let (message, used) = decode_payload_prefix(payload)?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    Ok(message)
}

/// Decodes a message from the start of a payload and says how many bytes it used. Only the
/// handshake needs this, to read the version of a peer whose frames are otherwise foreign.
pub fn decode_payload_prefix<T: bincode::Decode<()>>(
    payload: &[u8],
) -> Result<(T, usize), CodecError> {
    bincode::decode_from_slice(payload, wire_config())
        .map_err(|err| CodecError::Malformed(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientFrame, Request};

    #[test]
    fn a_partial_frame_is_not_an_error() {
        let frame = frame_bytes(
            &ClientFrame::Call(crate::wire::Call {
                id: 7,
                request: Request::Ping,
            }),
            DEFAULT_MAX_FRAME_BYTES,
        )
        .unwrap();
        let mut buf = BytesMut::new();
        for byte in &frame[..frame.len() - 1] {
            buf.put_u8(*byte);
            assert_eq!(take_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES), Ok(None));
        }
        buf.put_u8(frame[frame.len() - 1]);
        let payload = take_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        assert!(buf.is_empty());
        let decoded: ClientFrame = decode_payload(&payload).unwrap();
        assert!(matches!(decoded, ClientFrame::Call(call) if call.id == 7));
    }

    #[test]
    fn an_oversized_length_is_refused_before_reserving() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let before = buf.capacity();
        assert!(matches!(
            take_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn encoding_past_the_maximum_leaves_the_buffer_unchanged() {
        let mut out = BytesMut::from(&b"xy"[..]);
        let call = ClientFrame::Call(crate::wire::Call {
            id: 1,
            request: Request::Reload {
                pool: "p".into(),
                model: "m".repeat(100),
            },
        });
        assert!(matches!(
            encode_frame(&call, &mut out, 16),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(&out[..], b"xy");
    }
}
