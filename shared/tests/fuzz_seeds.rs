//! Writes the seed corpus of the `frame_decoder` and `hello_handshake` fuzz targets (`fuzz/`)
//! from frames this crate really encodes. Ignored by default; regenerate after a wire change with
//! `cargo test -p pool-ipc --test fuzz_seeds -- --ignored`. Deterministic: the same messages and
//! file names every run, so an unchanged protocol leaves the committed corpus as it is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod strategies;

use pool_ipc::codec::{HEADER_BYTES, frame_bytes};
use pool_ipc::{
    Call, ClientFrame, DEFAULT_MAX_FRAME_BYTES, HeldLease, Hello, LeaseId, LeaseSecret, MAGIC,
    PROTOCOL_VERSION, PoolId, Request,
};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use std::path::{Path, PathBuf};
use strategies::{client_frame, server_frame};

/// Seeds larger than this are skipped: small seeds keep the fuzzer fast.
const MAX_SEED_BYTES: usize = 2048;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn frame<T: bincode::Encode>(message: &T) -> Vec<u8> {
    frame_bytes(message, DEFAULT_MAX_FRAME_BYTES)
        .unwrap()
        .to_vec()
}

fn hello(magic: [u8; 4], protocol_version: u32, held_leases: Vec<HeldLease>) -> ClientFrame {
    ClientFrame::Hello(Hello {
        magic,
        protocol_version,
        client_name: "orchestratord".into(),
        held_leases,
    })
}

#[test]
#[ignore = "writes fuzz/corpus; run with --ignored after a wire change"]
fn write_the_fuzz_seed_corpus() {
    let held = vec![HeldLease {
        lease: LeaseId(42),
        pool: PoolId::from("pool-a"),
        slots: 2,
        secret: LeaseSecret([7; 16]),
    }];
    let ping = ClientFrame::Call(Call {
        id: 1,
        request: Request::Ping,
    });
    let hellos = [
        ("hello", hello(MAGIC, PROTOCOL_VERSION, Vec::new())),
        (
            "hello_held_leases",
            hello(MAGIC, PROTOCOL_VERSION, held.clone()),
        ),
        ("hello_version_1", hello(MAGIC, 1, Vec::new())),
        (
            "hello_next_version",
            hello(MAGIC, PROTOCOL_VERSION + 1, held),
        ),
        (
            "hello_bad_magic",
            hello(*b"HTTP", PROTOCOL_VERSION, Vec::new()),
        ),
        ("call_first", ping.clone()),
    ];
    let dir = corpus("hello_handshake");
    for (name, message) in &hellos {
        std::fs::write(dir.join(name), &frame(message)[HEADER_BYTES..]).unwrap();
    }

    // frame_decoder: byte 0 picks the maximum (0: the default), byte 1 seeds the read cuts.
    let dir = corpus("frame_decoder");
    let mut handshake = vec![0, 7];
    handshake.extend(frame(&hellos[1].1));
    handshake.extend(frame(&ping));
    std::fs::write(dir.join("hello_then_ping"), handshake).unwrap();
    let mut runner = TestRunner::deterministic();
    let (clients, servers) = (client_frame(), server_frame());
    let mut written = 0;
    for index in 0..64u8 {
        if written == 16 {
            break;
        }
        let mut stream = vec![0, index];
        for _ in 0..1 + index % 3 {
            if index % 2 == 0 {
                stream.extend(frame(&clients.new_tree(&mut runner).unwrap().current()));
            } else {
                stream.extend(frame(&servers.new_tree(&mut runner).unwrap().current()));
            }
        }
        if stream.len() <= MAX_SEED_BYTES {
            let side = if index % 2 == 0 { "client" } else { "server" };
            std::fs::write(dir.join(format!("{side}_frames_{index:02}")), stream).unwrap();
            written += 1;
        }
    }
}
