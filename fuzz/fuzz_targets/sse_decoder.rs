//! Fuzz target: the SSE decoder every engine stream goes through (`adapters::sse::SseDecoder`).
//!
//! Input: byte 0 seeds how the rest is cut into body reads. Properties:
//! - the events, and whether an unfinished event is left buffered, are the same whether the bytes
//!   come in one read or cut into many (data, error and frame bytes alike);
//! - each data event's frame is the event exactly as sent: the input's bytes, in order, never
//!   overlapping, ending with a blank line;
//! - a single-line payload holds no line break.

#![no_main]

mod split;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use orchestratord::adapters::sse::{SseDecoder, SseEvent};

/// Pushes the reads one by one, taking every complete event after each, as `EngineStream` does.
fn decode(reads: &[&[u8]]) -> (Vec<SseEvent>, bool) {
    let mut decoder = SseDecoder::default();
    let mut events = Vec::new();
    for read in reads {
        decoder.push(Bytes::copy_from_slice(read));
        while let Some(event) = decoder
            .next_event()
            .expect("a small event is never too large")
        {
            events.push(event);
        }
    }
    (events, decoder.has_partial_event())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// How many lines of an event are `data` fields.
fn data_lines(frame: &[u8]) -> usize {
    frame
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| *line == b"data" || line.starts_with(b"data:"))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let [seed, stream @ ..] = data else {
        return;
    };
    let whole = decode(&[stream]);
    let split = decode(&split::chunks(stream, *seed));
    assert_eq!(whole, split);

    let mut cursor = 0;
    for event in &whole.0 {
        let SseEvent::Data { data, frame } = event else {
            continue;
        };
        let at = cursor + find(&stream[cursor..], frame).expect("a frame is bytes that were sent");
        cursor = at + frame.len();
        assert!(frame.ends_with(b"\n\n") || frame.ends_with(b"\n\r\n"));
        if data_lines(frame) == 1 {
            assert!(!data.contains(&b'\n'));
        }
    }
});
