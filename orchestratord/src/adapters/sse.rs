//! Incremental Server-Sent Events decoding of an engine's response body. Pure and synchronous:
//! bytes go in with [`SseDecoder::push`], whole events come out of [`SseDecoder::next_event`], and
//! "not enough bytes yet" is `Ok(None)`, a normal condition.
//!
//! What it accepts: `field: value` lines ending in `\n` or `\r\n`; an event ends at a blank line.
//! `data` lines are joined with `\n` (the SSE rule); llama-server's non-standard `error:` field makes
//! the event an [`SseEvent::Error`]; comments (`:` keep-alives) and other fields (`event`, `id`,
//! `retry`) are ignored. A lone `\r` line ending is not supported (no engine we target sends one).
//!
//! Each data event also carries its `frame`: the event's exact bytes as the engine sent them, up to
//! and including its blank line, so a relay can forward it (`event:` line and all) untouched.
//!
//! Invariant: an event's payload and frame are zero-copy slices of the bytes pushed whenever the
//! event did not straddle two pushes (and, for the payload, has one `data` line); nothing is ever
//! re-encoded. An event that straddles pushes is assembled in a growing buffer, so an event that
//! arrives in many small reads costs time linear in its size.
//!
//! Public so that the `sse_decoder` fuzz target drives the very decoder engine streams go through;
//! its one user in the daemon is `EngineStream`.

use bytes::{Bytes, BytesMut};

/// The largest event accepted. llama-server's native final event repeats the whole prompt, so this
/// is generous; past it the stream is treated as malformed rather than buffered without bound.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// A data event: its `data` (exact payload bytes) and the whole event as sent.
    Data { data: Bytes, frame: Bytes },
    /// An `error:` event (llama-server reports a failure mid-stream this way): its value.
    Error(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE event exceeds {MAX_EVENT_BYTES} bytes")]
    EventTooLarge,
}

#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes pushed and not yet consumed, as pushed (zero-copy); starts at the first line of the
    /// current event. Empty while `assembling` holds them.
    buf: Bytes,
    /// The unconsumed bytes once an event straddled two pushes: later pushes are appended here
    /// (amortised growth) until it is consumed.
    assembling: BytesMut,
    /// Offset in `buf` up to which lines are known complete and non-blank, so a partial event is not
    /// rescanned from its start on every push.
    scanned: usize,
}

impl SseDecoder {
    /// Appends bytes read from the body. Copies only when an event straddles two reads.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if !self.assembling.is_empty() {
            self.assembling.extend_from_slice(&chunk);
            return;
        }
        if self.buf.is_empty() {
            self.buf = chunk;
            self.scanned = 0;
            return;
        }
        self.assembling.reserve(self.buf.len() + chunk.len());
        self.assembling.extend_from_slice(&self.buf);
        self.assembling.extend_from_slice(&chunk);
        self.buf = Bytes::new();
    }

    /// Whether bytes of an unfinished event are buffered (a stream ending now was cut mid-event).
    pub fn has_partial_event(&self) -> bool {
        !self.buf.is_empty() || !self.assembling.is_empty()
    }

    /// The unconsumed bytes.
    fn pending(&self) -> &[u8] {
        if self.assembling.is_empty() {
            &self.buf
        } else {
            &self.assembling
        }
    }

    /// Consumes the first `len` unconsumed bytes.
    fn take(&mut self, len: usize) -> Bytes {
        if self.assembling.is_empty() {
            self.buf.split_to(len)
        } else {
            self.assembling.split_to(len).freeze()
        }
    }

    /// The next complete event, or `Ok(None)` until more bytes are pushed.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            let Some(blank) = self.find_blank_line() else {
                if self.pending().len() > MAX_EVENT_BYTES {
                    return Err(SseError::EventTooLarge);
                }
                return Ok(None);
            };
            let (end_of_lines, after_blank) = blank;
            let frame = self.take(after_blank);
            let event = parse_event(&frame.slice(..end_of_lines));
            self.scanned = 0;
            match event {
                Some(Parsed::Data(data)) => return Ok(Some(SseEvent::Data { data, frame })),
                Some(Parsed::Error(value)) => return Ok(Some(SseEvent::Error(value))),
                None => {}
            }
            // Comments or fields without data: nothing to hand out, look for the next event.
        }
    }

    /// Finds the first blank line at or after `scanned`: `(start of the blank line, index after it)`.
    /// Updates `scanned` past the complete non-blank lines seen.
    fn find_blank_line(&mut self) -> Option<(usize, usize)> {
        let bytes = self.pending();
        let mut line_start = self.scanned;
        let mut found = None;
        while let Some(offset) = bytes[line_start..].iter().position(|&b| b == b'\n') {
            let newline = line_start + offset;
            let line = &bytes[line_start..newline];
            if line.is_empty() || line == b"\r" {
                found = Some((line_start, newline + 1));
                break;
            }
            line_start = newline + 1;
        }
        self.scanned = line_start;
        found
    }
}

/// What the lines of one event say.
enum Parsed {
    Data(Bytes),
    Error(Bytes),
}

/// Parses the lines of one event (everything before its blank line).
fn parse_event(lines: &Bytes) -> Option<Parsed> {
    let mut data: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut error: Option<Bytes> = None;
    let mut start = 0;
    while start < lines.len() {
        let end = lines[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(lines.len(), |offset| start + offset);
        let mut line_end = end;
        if line_end > start && lines[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        let line = lines.slice(start..line_end);
        start = end + 1;
        if line.first() == Some(&b':') {
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let mut value_start = colon + 1;
                if line.get(value_start) == Some(&b' ') {
                    value_start += 1;
                }
                (line.slice(..colon), line.slice(value_start..))
            }
            None => (line.clone(), Bytes::new()),
        };
        match &name[..] {
            b"data" => match (&mut joined, &data) {
                (Some(buffer), _) => {
                    buffer.extend_from_slice(b"\n");
                    buffer.extend_from_slice(&value);
                }
                (None, Some(first)) => {
                    let mut buffer = BytesMut::with_capacity(first.len() + 1 + value.len());
                    buffer.extend_from_slice(first);
                    buffer.extend_from_slice(b"\n");
                    buffer.extend_from_slice(&value);
                    joined = Some(buffer);
                }
                (None, None) => data = Some(value),
            },
            b"error" => error = Some(value),
            _ => {}
        }
    }
    if let Some(error) = error {
        return Some(Parsed::Error(error));
    }
    joined.map(BytesMut::freeze).or(data).map(Parsed::Data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events decoded so far, data events by their payload only.
    fn decode_all(decoder: &mut SseDecoder) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = decoder.next_event().unwrap() {
            events.push(match event {
                SseEvent::Data { data, .. } => SseEvent::Data {
                    data,
                    frame: Bytes::new(),
                },
                error => error,
            });
        }
        events
    }

    fn data(text: &str) -> SseEvent {
        SseEvent::Data {
            data: Bytes::copy_from_slice(text.as_bytes()),
            frame: Bytes::new(),
        }
    }

    #[test]
    fn events_in_one_read_come_out_in_order() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from_static(b"data: {\"a\":1}\n\ndata: [DONE]\n\n"));
        assert_eq!(
            decode_all(&mut decoder),
            vec![data("{\"a\":1}"), data("[DONE]")]
        );
        assert!(!decoder.has_partial_event());
    }

    #[test]
    fn an_event_split_at_every_byte_is_reassembled() {
        let wire = b"data: {\"content\":\" fox\"}\r\n\r\n: keep-alive\n\ndata:x\n\n";
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        for byte in wire {
            decoder.push(Bytes::copy_from_slice(&[*byte]));
            events.extend(decode_all(&mut decoder));
        }
        assert_eq!(events, vec![data("{\"content\":\" fox\"}"), data("x")]);
        assert!(!decoder.has_partial_event());
    }

    #[test]
    fn a_single_line_payload_and_its_frame_are_slices_of_the_pushed_bytes() {
        let wire = Bytes::from_static(b"event: x\ndata: payload\n\n");
        let mut decoder = SseDecoder::default();
        decoder.push(wire.clone());
        let Some(SseEvent::Data { data, frame }) = decoder.next_event().unwrap() else {
            panic!("expected a data event");
        };
        assert_eq!(&data[..], b"payload");
        assert_eq!(data.as_ptr(), wire[15..].as_ptr());
        assert_eq!(frame, wire);
        assert_eq!(frame.as_ptr(), wire.as_ptr());
    }

    #[test]
    fn a_frame_is_the_event_exactly_as_sent_without_the_comments_before_it() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from_static(b": ping\n\nevent: a\r\ndata: 1\r\n\r\n"));
        let Some(SseEvent::Data { frame, .. }) = decoder.next_event().unwrap() else {
            panic!("expected a data event");
        };
        assert_eq!(&frame[..], b"event: a\r\ndata: 1\r\n\r\n");
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from_static(
            b": ping\n\nevent: message\nid: 7\nretry: 10\ndata: x\n\n",
        ));
        assert_eq!(decode_all(&mut decoder), vec![data("x")]);
    }

    #[test]
    fn several_data_lines_are_joined_with_newlines() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from_static(b"data: a\ndata: b\ndata:c\n\n"));
        assert_eq!(decode_all(&mut decoder), vec![data("a\nb\nc")]);
    }

    #[test]
    fn an_error_field_makes_an_error_event() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from_static(b"error: {\"code\":500}\n\n"));
        assert_eq!(
            decode_all(&mut decoder),
            vec![SseEvent::Error(Bytes::from_static(b"{\"code\":500}"))]
        );
    }

    #[test]
    fn an_unfinished_event_waits_for_more_bytes() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from_static(b"data: {\"a\":"));
        assert_eq!(decoder.next_event().unwrap(), None);
        assert!(decoder.has_partial_event());
        decoder.push(Bytes::from_static(b"1}\n"));
        assert_eq!(decoder.next_event().unwrap(), None);
        decoder.push(Bytes::from_static(b"\n"));
        assert_eq!(decode_all(&mut decoder), vec![data("{\"a\":1}")]);
    }

    #[test]
    fn an_event_past_the_size_limit_is_an_error() {
        let mut decoder = SseDecoder::default();
        decoder.push(Bytes::from(vec![b'x'; MAX_EVENT_BYTES + 1]));
        assert_eq!(decoder.next_event(), Err(SseError::EventTooLarge));
    }
}
