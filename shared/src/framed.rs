//! Buffered reading of whole frames from any async byte stream (a Unix socket in production, an
//! in-memory duplex in tests).
//!
//! [`FrameReader::read_frame`] is cancel-safe: its only await is `read_buf`, and partial frames
//! stay in the reader's buffer, so it can sit in a `select!` beside other work.

use crate::codec::{CodecError, reserve_exactly, take_frame};

/// Room made for a read when the buffer is full (only while a frame header is incomplete).
const READ_CHUNK: usize = 8 * 1024;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

pub struct FrameReader<R> {
    stream: R,
    buf: BytesMut,
    max_frame_bytes: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(stream: R, max_frame_bytes: u32) -> FrameReader<R> {
        FrameReader {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_frame_bytes,
        }
    }

    /// The next frame's payload; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(payload) = take_frame(&mut self.buf, self.max_frame_bytes)? {
                return Ok(Some(payload));
            }
            if self.buf.capacity() == self.buf.len() {
                let wanted = self.buf.len() + READ_CHUNK;
                reserve_exactly(&mut self.buf, wanted);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::TruncatedFrame)
                };
            }
        }
    }

    /// A frame that is already complete in the buffer, without reading (used to handle a burst
    /// of pipelined calls before writing their replies in one go).
    pub fn buffered_frame(&mut self) -> Result<Option<Bytes>, CodecError> {
        take_frame(&mut self.buf, self.max_frame_bytes)
    }

    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u32) {
        self.max_frame_bytes = max_frame_bytes;
    }
}
