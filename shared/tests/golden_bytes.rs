//! Golden bytes: the exact encoding of one value per variant of every wire enum.
//!
//! THESE BYTES ARE THE PROTOCOL. A failing test here means the wire format changed: a peer built
//! from the previous commit can no longer talk to this one. Do not edit an expectation to make it
//! pass. Either undo the change (append variants and fields instead of reordering, renaming types
//! is fine, renumbering error codes is not), or make the break deliberate: bump
//! `PROTOCOL_VERSION` in `shared/src/wire.rs` and only then record the new bytes.
//!
//! Reading the hex (bincode 2.0.1 standard config: little-endian, variable-length integers):
//! - every integer (enum variant index as `u32`, lengths as `u64`, fields) is a varint: a value
//!   below 251 is one byte; otherwise a marker `fb` (u16), `fc` (u32) or `fd` (u64) followed by
//!   the value little-endian;
//! - a `String`/`Vec` is its length as a varint, then its bytes/elements; `[u8; 4]` is 4 raw bytes;
//! - `bool` and the `Option`/`Result` tags are one byte (`None` 00, `Some` 01; `Ok` 00, `Err` 01);
//! - a struct is its fields in declaration order, with nothing between them;
//! - an `ErrorCode` is its fixed wire number (a `u16` varint), not its variant index.
//!
//! Each expectation below is annotated field by field; each was derived by hand from those rules
//! and then confirmed against the encoder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bincode::{Decode, Encode};
use bytes::BytesMut;
use pool_ipc::codec::{
    HEADER_BYTES, decode_payload, decode_payload_prefix, encode_frame, frame_bytes, take_frame,
};
use pool_ipc::registry::{
    ApiEndpoint, DeviceMemory, Endpoint, EngineKind, GpuInfo, GpuInventory, MemoryReport,
    PoolFootprint,
};
use pool_ipc::{
    AcquireTarget, Call, Change, ClientFrame, CodecError, DEFAULT_MAX_FRAME_BYTES, DispatchCheck,
    ErrorCode, Event, HeldLease, Hello, HelloPreamble, IpcError, Lease, LeaseId, LeaseSecret,
    MAGIC, PROTOCOL_VERSION, PoolId, PoolSnapshot, PoolState, RegistrySnapshot, ReleaseOutcome,
    Reply, Request, Response, ServerFrame, Welcome,
};
use std::fmt::Debug;

const MAX: u32 = DEFAULT_MAX_FRAME_BYTES;

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn from_hex(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits in {hex:?}");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// The payload `value` encodes to (the frame's length prefix checked and stripped).
fn payload_of<T: Encode>(value: &T) -> Vec<u8> {
    let frame = frame_bytes(value, MAX).unwrap();
    let announced = u32::from_be_bytes(frame[..HEADER_BYTES].try_into().unwrap());
    assert_eq!(announced as usize, frame.len() - HEADER_BYTES);
    frame[HEADER_BYTES..].to_vec()
}

/// `value` encodes to exactly `expected` (hex, whitespace ignored), and `expected` decodes back to
/// exactly `value`: both directions of the wire are pinned.
#[track_caller]
fn assert_golden<T>(value: &T, expected: &str)
where
    T: Encode + Decode<()> + PartialEq + Debug,
{
    let expected_bytes = from_hex(expected);
    assert_eq!(
        to_hex(&payload_of(value)),
        to_hex(&expected_bytes),
        "WIRE BREAK: the encoding of {value:?} changed (see this file's header)"
    );
    assert_eq!(
        &decode_payload::<T>(&expected_bytes).unwrap(),
        value,
        "WIRE BREAK: the pinned bytes no longer decode to the same value"
    );
}

fn pool_snapshot() -> PoolSnapshot {
    PoolSnapshot {
        pool_id: PoolId::from("a"),
        model: "m".into(),
        engine: EngineKind::Llamacpp,
        endpoint: Endpoint::Http {
            authority: "h:1".into(),
        },
        state: PoolState::BackingOff {
            until_unix_ms: 1000,
        },
        live: true,
        slots_total: 4,
        slots_free: 1,
        engine_version: Some("b1".into()),
        last_error: None,
        restarts: 2,
        last_probe_unix_ms: Some(5),
        api_endpoints: vec![
            ApiEndpoint::Completions,
            ApiEndpoint::Embeddings,
            ApiEndpoint::Models,
        ],
    }
}

/// The bytes of [`pool_snapshot`], annotated.
const POOL_SNAPSHOT: &str = "
    01 61          # pool_id \"a\"
    01 6d          # model \"m\"
    00             # engine Llamacpp
    00 03 68 3a 31 # endpoint Http { authority \"h:1\" }
    05 fb e8 03    # state BackingOff { until_unix_ms: 1000 }
    01             # live true
    04             # slots_total 4
    01             # slots_free 1
    01 02 62 31    # engine_version Some(\"b1\")
    00             # last_error None
    02             # restarts 2
    01 05          # last_probe_unix_ms Some(5)
    03 01 02 09    # api_endpoints [Completions, Embeddings, Models]
";

/// A lease secret whose bytes read as their own positions: 00 01 … 0f.
fn secret() -> LeaseSecret {
    LeaseSecret(std::array::from_fn(|i| i as u8))
}

/// The bytes of [`secret`]: a fixed-size array is its bytes, with no length before them.
const SECRET: &str = "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f";

/// Strips `# comments` so expectations can be annotated.
fn hex(annotated: &str) -> String {
    annotated
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_frame_is_a_big_endian_u32_length_then_the_payload() {
    let call = ClientFrame::Call(Call {
        id: 300,
        request: Request::Ping,
    });
    let frame = frame_bytes(&call, MAX).unwrap();
    assert_eq!(
        to_hex(&frame),
        to_hex(&from_hex(&hex("
            00 00 00 05 # payload length 5, big-endian
            01          # ClientFrame::Call
            fb 2c 01    # id 300 (u16 marker, little-endian)
            00          # Request::Ping
        ")))
    );
    let mut buf = BytesMut::from(&frame[..]);
    let payload = take_frame(&mut buf, MAX).unwrap().unwrap();
    assert_eq!(decode_payload::<ClientFrame>(&payload).unwrap(), call);
}

#[test]
fn the_magic_and_version_are_pinned() {
    assert_eq!(&MAGIC, b"PMGR");
    // Changing this without changing the golden bytes is a sign the bump was not deliberate; when
    // you bump it, update this line together with the expectations that changed.
    assert_eq!(PROTOCOL_VERSION, 5);
}

// ---------------------------------------------------------------------------------------------
// ClientFrame and Request
// ---------------------------------------------------------------------------------------------

#[test]
fn client_frame_hello_is_pinned() {
    let hello = ClientFrame::Hello(Hello {
        magic: MAGIC,
        protocol_version: PROTOCOL_VERSION,
        client_name: "orch".into(),
        held_leases: vec![HeldLease {
            lease: LeaseId(258),
            pool: PoolId::from("p"),
            slots: 3,
            secret: secret(),
        }],
    });
    assert_golden(
        &hello,
        &hex(&format!(
            "
            00             # ClientFrame::Hello
            50 4d 47 52    # magic \"PMGR\" (raw, no length)
            05             # protocol_version 5
            04 6f 72 63 68 # client_name \"orch\"
            01             # held_leases: 1 entry
            fb 02 01       #   lease 258
            01 70          #   pool \"p\"
            03             #   slots 3
            {SECRET}       #   secret (16 raw bytes)
        "
        )),
    );
}

#[test]
fn held_lease_is_pinned() {
    assert_golden(
        &HeldLease {
            lease: LeaseId(1),
            pool: PoolId::from("a"),
            slots: 300,
            secret: secret(),
        },
        &hex(&format!(
            "
            01       # lease 1
            01 61    # pool \"a\"
            fb 2c 01 # slots 300
            {SECRET} # secret
        "
        )),
    );
}

#[test]
fn client_frame_call_is_pinned() {
    let call = ClientFrame::Call(Call {
        id: 7,
        request: Request::Subscribe,
    });
    assert_golden(
        &call,
        &hex("
            01 # ClientFrame::Call
            07 # id 7
            06 # Request::Subscribe
        "),
    );
}

#[test]
fn request_ping_is_pinned() {
    assert_golden(&Request::Ping, "00");
}

#[test]
fn request_snapshot_is_pinned() {
    assert_golden(&Request::Snapshot, "01");
}

#[test]
fn request_pool_status_is_pinned() {
    assert_golden(
        &Request::PoolStatus { pool: "a".into() },
        &hex("02 # PoolStatus
              01 61 # pool \"a\""),
    );
}

#[test]
fn request_can_dispatch_is_pinned() {
    assert_golden(
        &Request::CanDispatch { pool: "a".into() },
        &hex("03 # CanDispatch
              01 61 # pool \"a\""),
    );
}

#[test]
fn request_acquire_is_pinned_for_both_targets() {
    assert_golden(
        &Request::Acquire {
            target: AcquireTarget::Pool("a".into()),
            task_id: "t".into(),
            session: Some("s".into()),
            slots: 2,
            trace_parent: Some("00-01-02-01".into()),
        },
        &hex("
            04       # Acquire
            00 01 61 # target Pool(\"a\")
            01 74    # task_id \"t\"
            01 01 73 # session Some(\"s\")
            02       # slots 2
            01 0b 30 30 2d 30 31 2d 30 32 2d 30 31
                     # trace_parent Some(\"00-01-02-01\"): a string, never parsed by the codec
        "),
    );
    assert_golden(
        &Request::Acquire {
            target: AcquireTarget::Model("m".into()),
            task_id: String::new(),
            session: None,
            slots: 1,
            trace_parent: None,
        },
        &hex("
            04       # Acquire
            01 01 6d # target Model(\"m\")
            00       # task_id \"\"
            00       # session None
            01       # slots 1
            00       # trace_parent None
        "),
    );
}

#[test]
fn request_release_is_pinned() {
    assert_golden(
        &Request::Release {
            lease: LeaseId(251),
            outcome: ReleaseOutcome::Cancelled,
        },
        &hex("
            05       # Release
            fb fb 00 # lease 251 (the first value that needs the u16 marker)
            01       # outcome Cancelled
        "),
    );
}

#[test]
fn request_subscribe_is_pinned() {
    assert_golden(&Request::Subscribe, "06");
}

#[test]
fn request_drain_is_pinned() {
    assert_golden(
        &Request::Drain {
            pool: "a".into(),
            deadline_ms: 30_000,
        },
        &hex("
            07       # Drain
            01 61    # pool \"a\"
            fb 30 75 # deadline_ms 30000
        "),
    );
}

#[test]
fn request_reload_is_pinned() {
    assert_golden(
        &Request::Reload {
            pool: "a".into(),
            model: "m".into(),
        },
        &hex("
            08    # Reload
            01 61 # pool \"a\"
            01 6d # model \"m\"
        "),
    );
}

#[test]
fn request_restart_is_pinned() {
    assert_golden(
        &Request::Restart { pool: "a".into() },
        &hex("09 # Restart
              01 61 # pool \"a\""),
    );
}

#[test]
fn acquire_target_variants_are_pinned() {
    assert_golden(&AcquireTarget::Pool("a".into()), "00 01 61");
    assert_golden(&AcquireTarget::Model("m".into()), "01 01 6d");
}

#[test]
fn release_outcome_variants_are_pinned() {
    assert_golden(&ReleaseOutcome::Completed, "00");
    assert_golden(&ReleaseOutcome::Cancelled, "01");
    assert_golden(&ReleaseOutcome::Failed, "02");
}

// ---------------------------------------------------------------------------------------------
// ServerFrame and Response
// ---------------------------------------------------------------------------------------------

#[test]
fn server_frame_welcome_is_pinned() {
    let welcome = ServerFrame::Welcome(Welcome {
        protocol_version: 1,
        server_version: "0.1".into(),
        registry_epoch: 70_000,
        max_frame_bytes: 1 << 20,
        reasserted: vec![LeaseId(1)],
        rejected: vec![(LeaseId(2), IpcError::new(ErrorCode::NotFound, "x"))],
        lease_ttl_ms: 30_000,
    });
    assert_golden(
        &welcome,
        &hex("
            00             # ServerFrame::Welcome
            01             # protocol_version 1
            03 30 2e 31    # server_version \"0.1\"
            fc 70 11 01 00 # registry_epoch 70000 (u32 marker)
            fc 00 00 10 00 # max_frame_bytes 1048576
            01 01          # reasserted [1]
            01             # rejected: 1 entry
            02             #   lease 2
            01 01 78       #   IpcError { code NotFound (1), message \"x\" }
            fb 30 75       # lease_ttl_ms 30000
        "),
    );
}

#[test]
fn server_frame_reply_ok_is_pinned() {
    let reply = ServerFrame::Reply(Reply {
        id: 9,
        result: Ok(Response::Pong),
    });
    assert_golden(
        &reply,
        &hex("
            01 # ServerFrame::Reply
            09 # id 9
            00 # Ok
            00 # Response::Pong
        "),
    );
}

#[test]
fn server_frame_reply_err_is_pinned() {
    let reply = ServerFrame::Reply(Reply {
        id: 9,
        result: Err(IpcError::new(ErrorCode::NoCapacity, "full")),
    });
    assert_golden(
        &reply,
        &hex("
            01             # ServerFrame::Reply
            09             # id 9
            01             # Err
            04             # code NoCapacity (4)
            04 66 75 6c 6c # message \"full\"
        "),
    );
}

#[test]
fn server_frame_event_is_pinned() {
    let event = ServerFrame::Event(Event {
        epoch: 5,
        change: Change::PoolRemoved("a".into()),
    });
    assert_golden(
        &event,
        &hex("
            02    # ServerFrame::Event
            05    # epoch 5
            01    # Change::PoolRemoved
            01 61 # pool \"a\"
        "),
    );
}

#[test]
fn server_frame_refused_is_pinned() {
    let refused = ServerFrame::Refused(IpcError::new(ErrorCode::VersionMismatch, "v"));
    assert_golden(
        &refused,
        &hex("
            03    # ServerFrame::Refused
            07    # code VersionMismatch (7)
            01 76 # message \"v\"
        "),
    );
}

#[test]
fn response_pong_is_pinned() {
    assert_golden(&Response::Pong, "00");
}

#[test]
fn response_snapshot_is_pinned() {
    let snapshot = Response::Snapshot(RegistrySnapshot {
        epoch: 3,
        pools: vec![pool_snapshot()],
    });
    assert_golden(
        &snapshot,
        &hex(&format!(
            "01 # Response::Snapshot
             03 # epoch 3
             01 # pools: 1 entry
             {POOL_SNAPSHOT}"
        )),
    );
}

#[test]
fn response_pool_status_is_pinned() {
    assert_golden(
        &Response::PoolStatus(pool_snapshot()),
        &hex(&format!("02 # Response::PoolStatus\n{POOL_SNAPSHOT}")),
    );
}

#[test]
fn response_can_dispatch_is_pinned() {
    let check = Response::CanDispatch(DispatchCheck {
        dispatchable: true,
        state: PoolState::Ready,
        slots_free: 2,
    });
    assert_golden(
        &check,
        &hex("
            03 # Response::CanDispatch
            01 # dispatchable true
            01 # state Ready
            02 # slots_free 2
        "),
    );
}

#[test]
fn response_acquired_is_pinned() {
    let lease = Response::Acquired(Lease {
        id: LeaseId(u64::MAX),
        pool: "a".into(),
        model: "m".into(),
        engine: EngineKind::Openai,
        endpoint: Endpoint::Unix { path: "/s".into() },
        slots: 4,
        secret: secret(),
        registry_epoch: 7,
    });
    assert_golden(
        &lease,
        &hex(&format!(
            "
            04                         # Response::Acquired
            fd ff ff ff ff ff ff ff ff # id u64::MAX (u64 marker)
            01 61                      # pool \"a\"
            01 6d                      # model \"m\"
            01                         # engine Openai
            01 02 2f 73                # endpoint Unix {{ path \"/s\" }}
            04                         # slots 4
            {SECRET}                   # secret
            07                         # registry_epoch 7
        "
        )),
    );
}

#[test]
fn response_released_is_pinned() {
    assert_golden(&Response::Released, "05");
}

#[test]
fn response_subscribed_is_pinned() {
    let subscribed = Response::Subscribed(RegistrySnapshot {
        epoch: 0,
        pools: Vec::new(),
    });
    assert_golden(
        &subscribed,
        &hex("
            06 # Response::Subscribed
            00 # epoch 0
            00 # pools: empty
        "),
    );
}

#[test]
fn response_accepted_is_pinned() {
    assert_golden(&Response::Accepted, "07");
}

#[test]
fn request_gpus_is_pinned() {
    assert_golden(&Request::Gpus, "0a");
}

#[test]
fn request_renew_is_pinned() {
    assert_golden(&Request::Renew, "0b");
}

#[test]
fn request_load_and_unload_are_pinned() {
    assert_golden(
        &Request::Load {
            pool: "a".into(),
            for_waiting_requests: true,
        },
        &hex("0c # Load
              01 61 # pool \"a\"
              01 # for_waiting_requests"),
    );
    assert_golden(
        &Request::Unload { pool: "a".into() },
        &hex("0d # Unload
              01 61 # pool \"a\""),
    );
    assert_golden(
        &Request::CancelLoad { pool: "a".into() },
        &hex("0e # CancelLoad
              01 61 # pool \"a\""),
    );
    assert_golden(&Request::Memory, "0f");
}

#[test]
fn response_memory_is_pinned() {
    let report = MemoryReport {
        devices: vec![DeviceMemory {
            device: "host".into(),
            budget_bytes: 300,
            held_bytes: 2,
        }],
        pools: vec![PoolFootprint {
            pool: "a".into(),
            device: "host".into(),
            footprint_bytes: Some(2),
            measured: true,
        }],
    };
    assert_golden(
        &Response::Memory(report),
        &hex("
            0a # Response::Memory
            01 # one device
            04 68 6f 73 74 # device \"host\"
            fb 2c 01 # budget_bytes 300
            02 # held_bytes 2
            01 # one pool
            01 61 # pool \"a\"
            04 68 6f 73 74 # device \"host\"
            01 02 # footprint_bytes Some(2)
            01 # measured
        "),
    );
}

#[test]
fn response_renewed_is_pinned() {
    assert_golden(
        &Response::Renewed { leases: 3 },
        &hex("
            09 # Response::Renewed
            03 # leases 3
        "),
    );
}

#[test]
fn response_gpus_is_pinned() {
    let inventory = GpuInventory {
        driver: Some("5".into()),
        gpus: vec![GpuInfo {
            index: 0,
            name: "H".into(),
            uuid: "U".into(),
            memory_total_bytes: 300,
            memory_used_bytes: 2,
        }],
    };
    assert_golden(
        &Response::Gpus(inventory),
        &hex("
            08 # Response::Gpus
            01 01 35 # driver Some(\"5\")
            01 # one GPU
            00 # index 0
            01 48 # name \"H\"
            01 55 # uuid \"U\"
            fb 2c 01 # memory_total_bytes 300 (u16 varint, little-endian)
            02 # memory_used_bytes 2
        "),
    );
}

// ---------------------------------------------------------------------------------------------
// Change, PoolState, ErrorCode and the registry enums
// ---------------------------------------------------------------------------------------------

#[test]
fn change_pool_updated_is_pinned() {
    assert_golden(
        &Change::PoolUpdated(pool_snapshot()),
        &hex(&format!("00 # Change::PoolUpdated\n{POOL_SNAPSHOT}")),
    );
}

#[test]
fn change_pool_removed_is_pinned() {
    assert_golden(&Change::PoolRemoved("a".into()), "01 01 61");
}

#[test]
fn change_leases_revoked_is_pinned() {
    let revoked = Change::LeasesRevoked {
        pool: "a".into(),
        leases: vec![LeaseId(1), LeaseId(2)],
        reason: "gone".into(),
    };
    assert_golden(
        &revoked,
        &hex("
            02             # Change::LeasesRevoked
            01 61          # pool \"a\"
            02 01 02       # leases [1, 2]
            04 67 6f 6e 65 # reason \"gone\"
        "),
    );
}

#[test]
fn change_resync_is_pinned() {
    let resync = Change::Resync(RegistrySnapshot {
        epoch: 1,
        pools: Vec::new(),
    });
    assert_golden(
        &resync,
        &hex("
            03 # Change::Resync
            01 # epoch 1
            00 # pools: empty
        "),
    );
}

#[test]
fn pool_state_variants_are_pinned() {
    assert_golden(&PoolState::Starting, "00");
    assert_golden(&PoolState::Ready, "01");
    assert_golden(&PoolState::Unhealthy, "02");
    assert_golden(&PoolState::Draining, "03");
    assert_golden(&PoolState::Stopped, "04");
    assert_golden(
        &PoolState::BackingOff {
            until_unix_ms: 1_700_000_000_000,
        },
        &hex("
            05                         # BackingOff
            fd 00 68 e5 cf 8b 01 00 00 # until_unix_ms 1_700_000_000_000 (u64 marker)
        "),
    );
    assert_golden(&PoolState::Failed, "06");
    assert_golden(&PoolState::Unloaded, "07");
    assert_golden(&PoolState::Loading, "08");
}

#[test]
fn error_codes_are_encoded_as_their_fixed_numbers() {
    let pinned = [
        (ErrorCode::NotFound, "01"),
        (ErrorCode::NotReady, "02"),
        (ErrorCode::Draining, "03"),
        (ErrorCode::NoCapacity, "04"),
        (ErrorCode::Unauthorized, "05"),
        (ErrorCode::BadRequest, "06"),
        (ErrorCode::VersionMismatch, "07"),
        (ErrorCode::Internal, "08"),
        (ErrorCode::Unsupported, "09"),
        (ErrorCode::ShuttingDown, "0a"),
        (ErrorCode::LeaseCapReached, "0b"),
    ];
    assert_eq!(pinned.len(), ErrorCode::ALL.len(), "pin the new code here");
    for (code, expected) in pinned {
        assert_golden(&code, expected);
    }
}

#[test]
fn an_unknown_error_code_number_is_malformed() {
    // 0 and 12 are not codes; 12 would be the next one appended.
    for unknown in ["00", "0c", "fb 2c 01"] {
        assert!(matches!(
            decode_payload::<ErrorCode>(&from_hex(unknown)),
            Err(CodecError::Malformed(_))
        ));
    }
}

#[test]
fn api_endpoint_variants_are_pinned() {
    let pinned = [
        (ApiEndpoint::ChatCompletions, "00"),
        (ApiEndpoint::Completions, "01"),
        (ApiEndpoint::Embeddings, "02"),
        (ApiEndpoint::Rerank, "03"),
        (ApiEndpoint::Messages, "04"),
        (ApiEndpoint::MessagesCountTokens, "05"),
        (ApiEndpoint::Responses, "06"),
        (ApiEndpoint::ResponsesInputTokens, "07"),
        (ApiEndpoint::ChatCompletionsInputTokens, "08"),
        (ApiEndpoint::Models, "09"),
    ];
    assert_eq!(pinned.len(), ApiEndpoint::ALL.len(), "pin the new API here");
    for (api, expected) in pinned {
        assert_golden(&api, expected);
    }
}

#[test]
fn a_pool_snapshot_with_every_api_or_none_is_pinned() {
    let mut every = pool_snapshot();
    every.api_endpoints = ApiEndpoint::ALL.to_vec();
    let mut none = pool_snapshot();
    none.api_endpoints = Vec::new();
    let prefix = POOL_SNAPSHOT
        .rsplit_once("03 01 02 09")
        .map(|(before, _)| before)
        .unwrap();
    assert_golden(
        &every,
        &hex(&format!(
            "{prefix} 0a 00 01 02 03 04 05 06 07 08 09 # api_endpoints: all 10, in wire order"
        )),
    );
    assert_golden(&none, &hex(&format!("{prefix} 00 # api_endpoints: empty")));
}

#[test]
fn engine_kind_and_endpoint_variants_are_pinned() {
    assert_golden(&EngineKind::Llamacpp, "00");
    assert_golden(&EngineKind::Openai, "01");
    assert_golden(
        &Endpoint::Http {
            authority: "h:1".into(),
        },
        "00 03 68 3a 31",
    );
    assert_golden(&Endpoint::Unix { path: "/s".into() }, "01 02 2f 73");
}

// ---------------------------------------------------------------------------------------------
// Handshake across versions
// ---------------------------------------------------------------------------------------------

/// A `Hello` as a hypothetical future version might send it: the same first fields, more after.
#[derive(Encode)]
enum FutureClientFrame {
    Hello(FutureHello),
}

#[derive(Encode)]
struct FutureHello {
    magic: [u8; 4],
    protocol_version: u32,
    client_name: String,
    held_leases: Vec<(u64, String)>,
    // Fields this version has never heard of.
    capabilities: Vec<String>,
    tenant: Option<String>,
    build_id: u128,
}

/// A future version that also changed what follows the version entirely.
#[derive(Encode)]
enum RadicallyFutureClientFrame {
    Hello {
        magic: [u8; 4],
        protocol_version: u32,
        session_key: [u8; 3],
        flags: u64,
    },
}

#[test]
fn a_future_hello_with_extra_fields_still_yields_its_version() {
    let future = FutureClientFrame::Hello(FutureHello {
        magic: MAGIC,
        protocol_version: 300,
        client_name: "orchestratord".into(),
        held_leases: vec![(7, "pool-a".into())],
        capabilities: vec!["streaming-leases".into()],
        tenant: Some("t".into()),
        build_id: u128::MAX,
    });
    let payload = payload_of(&future);

    // Today's decoder reads it as a Hello with bytes left over: not a valid frame of this version.
    assert!(matches!(
        decode_payload::<ClientFrame>(&payload),
        Err(CodecError::TrailingBytes(_))
    ));

    // The preamble still tells the server who this is, so it can answer VersionMismatch.
    let (preamble, used) = decode_payload_prefix::<HelloPreamble>(&payload).unwrap();
    assert_eq!(
        preamble,
        HelloPreamble {
            frame_variant: 0,
            magic: MAGIC,
            protocol_version: 300,
        }
    );
    assert_eq!(used, 1 + 4 + 3, "variant, magic, version 300 as fb 2c 01");
}

#[test]
fn a_future_hello_with_different_later_fields_still_yields_its_version() {
    let future = RadicallyFutureClientFrame::Hello {
        magic: MAGIC,
        protocol_version: 4,
        // 0xff is a length no real `client_name` could have in a 3-byte field: the rest does not
        // parse as today's Hello at all.
        session_key: [0xff, 0xff, 0xff],
        flags: u64::MAX,
    };
    let payload = payload_of(&future);
    assert!(matches!(
        decode_payload::<ClientFrame>(&payload),
        Err(CodecError::Malformed(_))
    ));
    let (preamble, _) = decode_payload_prefix::<HelloPreamble>(&payload).unwrap();
    assert_eq!(preamble.frame_variant, 0);
    assert_eq!(preamble.magic, MAGIC);
    assert_eq!(preamble.protocol_version, 4);
}

#[test]
fn a_version_1_hello_re_asserting_a_lease_is_refused_as_version_1() {
    // The bytes a version 1 client sent (its HeldLease had no `slots`): they do not decode as
    // today's Hello, yet the preamble still names version 1, so the server answers
    // VersionMismatch instead of re-creating the lease at a guessed size.
    let v1 = from_hex(&hex("
        00             # ClientFrame::Hello
        50 4d 47 52    # magic
        01             # protocol_version 1
        04 6f 72 63 68 # client_name \"orch\"
        01             # held_leases: 1 entry
        fb 02 01       #   lease 258
        01 70          #   pool \"p\"
    "));
    assert!(matches!(
        decode_payload::<ClientFrame>(&v1),
        Err(CodecError::Malformed(_))
    ));
    let (preamble, _) = decode_payload_prefix::<HelloPreamble>(&v1).unwrap();
    assert_eq!(
        preamble,
        HelloPreamble {
            frame_variant: 0,
            magic: MAGIC,
            protocol_version: 1,
        }
    );
}

#[test]
fn a_version_2_hello_re_asserting_a_lease_without_a_secret_is_refused_as_version_2() {
    // The bytes a version 2 client sends after a reconnect: its HeldLease has no `secret`. They
    // do not decode as today's Hello (the secret is missing), yet the preamble names version 2,
    // so the server answers VersionMismatch instead of re-creating a lease nobody proved.
    let v2 = from_hex(&hex("
        00             # ClientFrame::Hello
        50 4d 47 52    # magic
        02             # protocol_version 2
        04 6f 72 63 68 # client_name \"orch\"
        01             # held_leases: 1 entry
        fb 02 01       #   lease 258
        01 70          #   pool \"p\"
        03             #   slots 3
    "));
    assert!(matches!(
        decode_payload::<ClientFrame>(&v2),
        Err(CodecError::Malformed(_))
    ));
    let (preamble, _) = decode_payload_prefix::<HelloPreamble>(&v2).unwrap();
    assert_eq!(
        preamble,
        HelloPreamble {
            frame_variant: 0,
            magic: MAGIC,
            protocol_version: 2,
        }
    );
}

#[test]
fn todays_hello_yields_its_preamble() {
    let hello = ClientFrame::Hello(Hello {
        magic: MAGIC,
        protocol_version: PROTOCOL_VERSION,
        client_name: "x".into(),
        held_leases: Vec::new(),
    });
    let (preamble, used) = decode_payload_prefix::<HelloPreamble>(&payload_of(&hello)).unwrap();
    assert_eq!(
        preamble,
        HelloPreamble {
            frame_variant: 0,
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
        }
    );
    assert_eq!(used, 6);
}

#[test]
fn a_call_is_not_mistaken_for_a_hello_preamble() {
    // A server reading a first frame that is a Call sees variant 1, not a Hello of some version.
    let mut out = BytesMut::new();
    encode_frame(
        &ClientFrame::Call(Call {
            id: 0,
            request: Request::Ping,
        }),
        &mut out,
        MAX,
    )
    .unwrap();
    match decode_payload_prefix::<HelloPreamble>(&out[HEADER_BYTES..]) {
        Ok((preamble, _)) => assert_eq!(preamble.frame_variant, 1),
        Err(err) => assert!(matches!(err, CodecError::Malformed(_))),
    }
}
