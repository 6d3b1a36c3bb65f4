//! Fuzz target: how pool-managerd judges a connection's first frame (`judge_first_frame`, the
//! function its handshake calls), reached through the frame layer as a peer would reach it.
//!
//! Input: the first frame's payload. Properties:
//! - any payload travels intact through a length prefix and `take_frame`, and is judged without
//!   panicking;
//! - an accepted Hello has the magic and this protocol version, and its canonical re-encoding
//!   (never longer than what came) is accepted as the same Hello;
//! - a version mismatch names a version other than this one, and a Hello of that version (whatever
//!   its leases) is refused as the same mismatch, naming the same client when its name was read;
//! - anything else is refused with a reason.

#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use pool_ipc::codec::{HEADER_BYTES, frame_bytes, take_frame};
use pool_ipc::{ClientFrame, DEFAULT_MAX_FRAME_BYTES, Hello, MAGIC, PROTOCOL_VERSION};
use pool_sidecar::ipc::connection::{FirstFrameError, judge_first_frame};

fn payload_of(hello: Hello) -> Vec<u8> {
    let frame = frame_bytes(&ClientFrame::Hello(hello), DEFAULT_MAX_FRAME_BYTES)
        .expect("a Hello fits in a frame");
    frame[HEADER_BYTES..].to_vec()
}

fuzz_target!(|payload: &[u8]| {
    if payload.is_empty() || payload.len() > DEFAULT_MAX_FRAME_BYTES as usize {
        return;
    }
    let mut buf = BytesMut::with_capacity(HEADER_BYTES + payload.len());
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    let first = take_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES)
        .expect("a frame within the maximum is well formed")
        .expect("a whole frame is complete");
    assert_eq!(&first[..], payload);
    assert!(buf.is_empty());

    match judge_first_frame(&first) {
        Ok(hello) => {
            assert_eq!(hello.magic, MAGIC);
            assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
            let again = payload_of(hello.clone());
            assert!(again.len() <= payload.len());
            assert_eq!(judge_first_frame(&again), Ok(hello));
        }
        Err(FirstFrameError::VersionMismatch {
            client_version,
            client_name,
        }) => {
            assert_ne!(client_version, PROTOCOL_VERSION);
            let name_known = client_name != "?";
            let other = payload_of(Hello {
                magic: MAGIC,
                protocol_version: client_version,
                client_name: client_name.clone(),
                held_leases: Vec::new(),
            });
            match judge_first_frame(&other) {
                Err(FirstFrameError::VersionMismatch {
                    client_version: version,
                    client_name: name,
                }) => {
                    assert_eq!(version, client_version);
                    if name_known {
                        assert_eq!(name, client_name);
                    }
                }
                judged => panic!("a Hello of version {client_version} judged {judged:?}"),
            }
        }
        Err(FirstFrameError::NotHello(reason)) => assert!(!reason.is_empty()),
    }
});
