//! The wire protocol against the real pool-managerd, from the outside: hostile and broken
//! peers, version mismatches in both directions, pipelining. A raw Unix socket plays the peer
//! where the real client would refuse to misbehave.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use bytes::BytesMut;
use e2e::sidecar::{PoolSpec, socket_path, start_sidecar, write_config};
use e2e::{Daemon, start_engine_double, temp_dir};
use pool_ipc::client::{ClientConfig, ClientError, PoolClient};
use pool_ipc::codec::{DEFAULT_MAX_FRAME_BYTES, decode_payload, encode_frame, frame_bytes};
use pool_ipc::error_code::ErrorCode;
use pool_ipc::framed::FrameReader;
use pool_ipc::wire::{
    Call, ClientFrame, Hello, MAGIC, PROTOCOL_VERSION, Request, Response, ServerFrame, Welcome,
};
use proptest::prelude::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(10);

struct Sidecar {
    daemon: e2e::sidecar::Sidecar,
    _engine: Daemon,
    /// Last: dropped after the daemons, whose cleanup reads the state directory inside it.
    dir: TempDir,
}

impl Sidecar {
    fn socket(&self) -> PathBuf {
        socket_path(self.dir.path())
    }
}

fn sidecar() -> Sidecar {
    let dir = temp_dir();
    let engine = start_engine_double::<&str>(&[]);
    let config = write_config(
        dir.path(),
        "",
        &[PoolSpec::new("p", engine.ready("listen"), 2)],
    );
    let daemon = start_sidecar(dir.path(), &config);
    Sidecar {
        dir,
        _engine: engine,
        daemon,
    }
}

fn raw(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

fn hello(version: u32) -> Vec<u8> {
    frame_bytes(
        &ClientFrame::Hello(Hello {
            magic: MAGIC,
            protocol_version: version,
            client_name: "raw-test".into(),
            held_leases: Vec::new(),
        }),
        DEFAULT_MAX_FRAME_BYTES,
    )
    .unwrap()
    .to_vec()
}

/// Reads frames until the server closes; returns them. Panics if it never closes.
fn frames_until_close(stream: &mut UnixStream) -> Vec<ServerFrame> {
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the server must close the connection, not leave it hanging");
    let mut buf = BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    while let Some(payload) =
        pool_ipc::codec::take_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES).unwrap()
    {
        frames.push(decode_payload::<ServerFrame>(&payload).unwrap());
    }
    assert!(buf.is_empty(), "a partial frame before close");
    frames
}

fn refusal(frames: &[ServerFrame]) -> &pool_ipc::error_code::IpcError {
    match frames.last() {
        Some(ServerFrame::Refused(error)) => error,
        other => panic!("expected a Refused frame last, got {other:?}"),
    }
}

async fn still_serves(socket: &Path) {
    let client = PoolClient::connect(ClientConfig::new(socket, "after"))
        .await
        .unwrap();
    client.ping().await.unwrap();
}

#[tokio::test]
async fn a_client_of_another_protocol_version_is_refused_with_a_clear_error() {
    let sidecar = sidecar();
    let mut stream = raw(&sidecar.socket());
    stream.write_all(&hello(PROTOCOL_VERSION + 98)).unwrap();
    let frames = frames_until_close(&mut stream);
    let error = refusal(&frames);
    assert_eq!(error.code, ErrorCode::VersionMismatch);
    assert!(
        error.message.contains(&format!(
            "speaks protocol version {PROTOCOL_VERSION}, the client speaks version {}",
            PROTOCOL_VERSION + 98
        )),
        "{error}"
    );
    assert!(
        sidecar
            .daemon
            .wait_for_stderr("another protocol version", WAIT)
    );

    // A future Hello with more fields than this version knows is still recognised as such.
    let mut future = hello(PROTOCOL_VERSION + 1);
    future.extend_from_slice(&[7, 7, 7]);
    let len = u32::try_from(future.len() - 4).unwrap();
    future[..4].copy_from_slice(&len.to_be_bytes());
    let mut stream = raw(&sidecar.socket());
    stream.write_all(&future).unwrap();
    assert_eq!(
        refusal(&frames_until_close(&mut stream)).code,
        ErrorCode::VersionMismatch
    );
    still_serves(&sidecar.socket()).await;
}

#[tokio::test]
async fn clients_of_versions_1_and_2_re_asserting_a_lease_are_refused_and_no_slot_is_taken() {
    let sidecar = sidecar();
    // What a version 1 orchestratord sent after a sidecar restart (its HeldLease had no slots),
    // and what a version 2 one sends (its HeldLease has no secret: no proof the lease is its own).
    let v1_hello: &[u8] = &[
        0, b'P', b'M', b'G', b'R', 1, // Hello, magic, protocol_version 1
        3, b'o', b'l', b'd', // client_name "old"
        1, 7, 1, b'p', // held_leases: lease 7 on pool "p"
    ];
    let v2_hello: &[u8] = &[
        0, b'P', b'M', b'G', b'R', 2, // Hello, magic, protocol_version 2
        3, b'o', b'l', b'd', // client_name "old"
        1, 7, 1, b'p', 1, // held_leases: lease 7 on pool "p", 1 slot
    ];
    for (version, hello) in [(1, v1_hello), (2, v2_hello)] {
        let mut frame = u32::try_from(hello.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(hello);
        let mut stream = raw(&sidecar.socket());
        stream.write_all(&frame).unwrap();
        let error = refusal(&frames_until_close(&mut stream)).clone();
        assert_eq!(error.code, ErrorCode::VersionMismatch, "{error}");
        assert!(
            error.message.contains(&format!(
                "speaks protocol version {PROTOCOL_VERSION}, the client speaks version {version}"
            )),
            "{error}"
        );
    }
    let client = PoolClient::connect(ClientConfig::new(sidecar.socket(), "after"))
        .await
        .unwrap();
    let status = client.pool_status(&"p".into()).await.unwrap();
    assert_eq!(status.slots_free, status.slots_total, "{status:?}");
}

#[tokio::test]
async fn a_server_of_another_protocol_version_gives_the_client_a_clear_error() {
    let dir = temp_dir();
    let socket = dir.path().join("future.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        stream.read_exact(&mut payload).unwrap();
        let welcome = ServerFrame::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION + 1,
            server_version: "future".into(),
            registry_epoch: 0,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            reasserted: Vec::new(),
            rejected: Vec::new(),
            lease_ttl_ms: 0,
        });
        stream
            .write_all(&frame_bytes(&welcome, DEFAULT_MAX_FRAME_BYTES).unwrap())
            .unwrap();
    });
    let error = PoolClient::connect(ClientConfig::new(&socket, "old-client"))
        .await
        .err()
        .expect("the client must refuse a server of another version");
    server.join().unwrap();
    assert!(
        matches!(error, ClientError::VersionMismatch { client, server } if client == PROTOCOL_VERSION && server == PROTOCOL_VERSION + 1),
        "{error}"
    );
    assert!(error.to_string().contains("protocol version mismatch"));
}

#[tokio::test]
async fn an_oversized_length_is_refused_without_reading_it_and_the_daemon_serves_on() {
    let sidecar = sidecar();
    let mut stream = raw(&sidecar.socket());
    stream.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let frames = frames_until_close(&mut stream);
    assert!(matches!(frames[0], ServerFrame::Welcome(_)));
    let error = refusal(&frames);
    assert_eq!(error.code, ErrorCode::BadRequest);
    assert!(error.message.contains("exceeds the maximum"), "{error}");
    still_serves(&sidecar.socket()).await;
}

#[tokio::test]
async fn a_truncated_frame_or_a_call_before_hello_closes_only_that_connection() {
    let sidecar = sidecar();
    let mut truncated = raw(&sidecar.socket());
    let frame = hello(PROTOCOL_VERSION);
    truncated.write_all(&frame[..frame.len() - 3]).unwrap();
    truncated.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(frames_until_close(&mut truncated).is_empty());

    let mut early = raw(&sidecar.socket());
    let call = frame_bytes(
        &ClientFrame::Call(Call {
            id: 1,
            request: Request::Ping,
        }),
        DEFAULT_MAX_FRAME_BYTES,
    )
    .unwrap();
    early.write_all(&call).unwrap();
    let error = refusal(&frames_until_close(&mut early)).clone();
    assert_eq!(error.code, ErrorCode::BadRequest);
    assert!(error.message.contains("first frame must be Hello"));
    still_serves(&sidecar.socket()).await;
}

#[tokio::test]
async fn pipelined_calls_in_one_write_are_answered_by_id() {
    let sidecar = sidecar();
    let stream = tokio::net::UnixStream::connect(sidecar.socket())
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut burst = BytesMut::new();
    encode_frame(
        &ClientFrame::Hello(Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            client_name: "pipeliner".into(),
            held_leases: Vec::new(),
        }),
        &mut burst,
        DEFAULT_MAX_FRAME_BYTES,
    )
    .unwrap();
    let ids: Vec<u64> = (100..164).collect();
    for id in &ids {
        let request = if id % 2 == 0 {
            Request::Ping
        } else {
            Request::CanDispatch { pool: "p".into() }
        };
        encode_frame(
            &ClientFrame::Call(Call { id: *id, request }),
            &mut burst,
            DEFAULT_MAX_FRAME_BYTES,
        )
        .unwrap();
    }
    tokio::io::AsyncWriteExt::write_all(&mut write, &burst)
        .await
        .unwrap();
    let mut reader = FrameReader::new(read, DEFAULT_MAX_FRAME_BYTES);
    let welcome = reader.read_frame().await.unwrap().unwrap();
    assert!(matches!(
        decode_payload::<ServerFrame>(&welcome).unwrap(),
        ServerFrame::Welcome(_)
    ));
    let mut answered = Vec::new();
    while answered.len() < ids.len() {
        let payload = tokio::time::timeout(WAIT, reader.read_frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match decode_payload::<ServerFrame>(&payload).unwrap() {
            ServerFrame::Reply(reply) => {
                match (reply.id % 2, reply.result) {
                    (0, Ok(Response::Pong)) => {}
                    (1, Ok(Response::CanDispatch(check))) => assert!(check.dispatchable),
                    (_, other) => panic!("reply {} is {other:?}", reply.id),
                }
                answered.push(reply.id);
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(answered, ids);
}

/// Whatever bytes a peer sends, before or after a valid Hello, the daemon answers with at most
/// a typed refusal and a close, never a crash or a hang, and keeps serving others.
#[test]
fn arbitrary_bytes_never_break_the_daemon() {
    let sidecar = sidecar();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(sidecar.daemon.pid()).unwrap());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let peers = (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 1..2048),
    );
    let outcome = runner.run(&peers, |(after_hello, garbage)| {
        let mut stream = raw(&sidecar.socket());
        if after_hello {
            stream.write_all(&hello(PROTOCOL_VERSION)).unwrap();
        }
        // The server may close before all bytes are written; that is an allowed answer.
        let _ = stream.write_all(&garbage);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut bytes = Vec::new();
        prop_assert!(
            stream.read_to_end(&mut bytes).is_ok(),
            "the daemon left the connection hanging"
        );
        let mut buf = BytesMut::from(&bytes[..]);
        while let Some(payload) =
            pool_ipc::codec::take_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES).unwrap()
        {
            let frame = decode_payload::<ServerFrame>(&payload).unwrap();
            prop_assert!(
                matches!(
                    frame,
                    ServerFrame::Welcome(_) | ServerFrame::Reply(_) | ServerFrame::Refused(_)
                ),
                "unexpected {frame:?}"
            );
        }
        prop_assert!(
            nix::sys::signal::kill(pid, None).is_ok(),
            "pool-managerd died: {}",
            sidecar.daemon.stderr()
        );
        let mut ping = raw(&sidecar.socket());
        ping.write_all(&hello(PROTOCOL_VERSION)).unwrap();
        let mut header = [0u8; 4];
        ping.read_exact(&mut header).unwrap();
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}
