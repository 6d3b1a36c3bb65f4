//! Slots and leases against the real pool-managerd and the test engine double (a fake engine:
//! no GPU or model is needed to exercise slot accounting).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::{PoolSpec, connect_client, socket_path, wait_for_pool};
use e2e::stack::Stack;
use e2e::{Daemon, DaemonBuilder, Signal, binary, http, start_engine_double, temp_dir};
use pool_ipc::client::{ClientError, ConnectionState};
use pool_ipc::codec::{DEFAULT_MAX_FRAME_BYTES, decode_payload, frame_bytes};
use pool_ipc::error_code::ErrorCode;
use pool_ipc::framed::FrameReader;
use pool_ipc::registry::{
    AcquireTarget, ApiEndpoint, EngineKind, LeaseId, LeaseSecret, PoolId, PoolState, ReleaseOutcome,
};
use pool_ipc::wire::{
    ClientFrame, HeldLease, Hello, MAGIC, PROTOCOL_VERSION, ServerFrame, Welcome,
};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(10);

/// One pool `p` with `slots` slots, served by an engine double on a Unix socket that the test
/// started (an engine pool-managerd does not manage).
fn stack(slots: u32) -> Stack {
    stack_with(slots, "")
}

/// [`stack`] with `server_extra` lines in pool-managerd's `[server]` table.
fn stack_with(slots: u32, server_extra: &str) -> Stack {
    let dir = temp_dir();
    let engine_socket = dir.path().join("engine.sock");
    let engine = start_engine_double(&["--listen", engine_socket.to_str().unwrap()]);
    let pool = PoolSpec::new("p", engine.ready("listen"), slots).toml();
    Stack::builder()
        .without_orchestrator()
        .engine(engine)
        .sidecar_server(server_extra)
        .pool(&pool)
        .start_in(dir)
}

fn shim_status(stack: &Stack) -> serde_json::Value {
    let reply = http::get(&stack.shim(), "/pools/p/status", WAIT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_racing_for_four_slots_never_hold_more_than_four() {
    let stack = stack(4);
    let monitor = stack.client("monitor").await;
    let mut mirror = monitor.subscribe().await.unwrap();
    let max_leased_seen = Arc::new(AtomicU32::new(0));
    let watcher = {
        let mut mirror = mirror.clone();
        let max_leased_seen = Arc::clone(&max_leased_seen);
        tokio::spawn(async move {
            while mirror.changed().await.is_ok() {
                let mirror = mirror.borrow_and_update();
                if let Some(pool) = mirror.snapshot.pool(&PoolId::from("p")) {
                    assert!(pool.slots_free <= pool.slots_total, "{pool:?}");
                    max_leased_seen.fetch_max(pool.active_leases(), Ordering::SeqCst);
                }
            }
        })
    };

    let holding = Arc::new(AtomicI32::new(0));
    let max_holding = Arc::new(AtomicI32::new(0));
    let mut racers = tokio::task::JoinSet::new();
    for racer in 0..64 {
        let dir = stack.path().to_owned();
        let holding = Arc::clone(&holding);
        let max_holding = Arc::clone(&max_holding);
        racers.spawn(async move {
            let client = connect_client(&dir, &format!("racer-{racer}")).await;
            let mut granted = 0;
            let mut attempts = 0;
            while granted < 4 {
                attempts += 1;
                assert!(attempts < 20_000, "racer {racer} starved");
                match client
                    .acquire(
                        AcquireTarget::Pool(PoolId::from("p")),
                        format!("t{racer}-{attempts}"),
                        None,
                        1,
                    )
                    .await
                {
                    Ok(guard) => {
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        max_holding.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_micros(300)).await;
                        holding.fetch_sub(1, Ordering::SeqCst);
                        granted += 1;
                        if racer % 8 == 0 && granted == 2 {
                            // This client dies holding its lease: it never releases it, and its
                            // connection closes.
                            std::mem::forget(guard);
                            client.close();
                            return granted;
                        }
                        guard.release(ReleaseOutcome::Completed).await.unwrap();
                    }
                    Err(ClientError::Remote(error)) if error.code == ErrorCode::NoCapacity => {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    Err(error) => panic!("racer {racer}: unexpected error {error}"),
                }
            }
            granted
        });
    }
    let mut granted_total = 0;
    while let Some(granted) = racers.join_next().await {
        granted_total += granted.unwrap();
    }
    let settled = wait_for_pool(&mut mirror, "p", "all slots free again", |p| {
        p.slots_free == 4
    })
    .await;
    assert_eq!(settled.slots_total, 4);
    watcher.abort();
    assert!(
        granted_total > 64,
        "only {granted_total} leases were granted"
    );
    assert!(max_holding.load(Ordering::SeqCst) <= 4);
    assert!(
        (1..=4).contains(&max_leased_seen.load(Ordering::SeqCst)),
        "the registry showed {} leases at once",
        max_leased_seen.load(Ordering::SeqCst)
    );
    let status = shim_status(&stack);
    assert_eq!(status["slots_free"], 4);
    assert_eq!(status["active_leases"], 0);
}

fn lease_holder(dir: &Path) -> Daemon {
    lease_holder_of(dir, 1)
}

fn lease_holder_of(dir: &Path, slots: u32) -> Daemon {
    DaemonBuilder::new(binary("lease-holder"))
        .name("lease-holder")
        .arg("--socket")
        .arg(socket_path(dir))
        .arg("--pool")
        .arg("p")
        .arg("--slots")
        .arg(slots.to_string())
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_killed_mid_lease_give_their_slots_back() {
    let stack = stack(4);
    let monitor = stack.client("monitor").await;
    let mut mirror = monitor.subscribe().await.unwrap();
    let holders: Vec<Daemon> = (0..4).map(|_| lease_holder(stack.path())).collect();
    wait_for_pool(&mut mirror, "p", "four leases held", |p| p.slots_free == 0).await;
    let refused = monitor
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "fifth", None, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Remote(e) if e.code == ErrorCode::NoCapacity),
        "{refused}"
    );

    let mut holders = holders.into_iter();
    for holder in holders.by_ref().take(2) {
        holder.kill_with(Signal::SIGKILL);
    }
    wait_for_pool(&mut mirror, "p", "two slots back", |p| p.slots_free == 2).await;
    assert_eq!(shim_status(&stack)["active_leases"], 2);
    for holder in holders {
        holder.kill_with(Signal::SIGKILL);
    }
    wait_for_pool(&mut mirror, "p", "all slots back", |p| p.slots_free == 4).await;
    let metrics = http::get(&stack.shim(), "/metrics", WAIT).unwrap().text();
    assert!(
        metrics.contains("pool_managerd_leases_ended_total{reason=\"connection_closed\"} 4"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_dies_turns_its_pool_unhealthy_and_its_lease_holders_are_told() {
    let mut stack = stack(2);
    let engine_socket = stack.engines[0].ready("listen").to_owned();
    let holder = stack.client("holder").await;
    let mut revocations = holder.revocations();
    let mut mirror = holder.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "p", "ready", |p| p.state == PoolState::Ready).await;
    let guard = holder
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "doomed", None, 1)
        .await
        .unwrap();
    let lease = guard.lease().id;

    stack.engines[0].kill_with(Signal::SIGKILL);
    let unhealthy = wait_for_pool(&mut mirror, "p", "unhealthy", |p| {
        p.state == PoolState::Unhealthy
    })
    .await;
    assert_eq!(
        unhealthy.slots_free, 2,
        "the dead engine's lease was revoked"
    );
    assert!(unhealthy.last_error.is_some());
    let revoked = tokio::time::timeout(WAIT, revocations.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.lease, lease);
    assert!(holder.held_leases().is_empty());
    let refused = holder
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "too-early", None, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Remote(e) if e.code == ErrorCode::NotReady),
        "{refused}"
    );
    // Releasing a revoked lease is not an error: it is already gone.
    guard.release(ReleaseOutcome::Failed).await.unwrap();

    stack.engines[0] = start_engine_double(&["--listen", &engine_socket]);
    wait_for_pool(&mut mirror, "p", "ready again", |p| {
        p.state == PoolState::Ready
    })
    .await;
    let guard = holder
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "after", None, 1)
        .await
        .unwrap();
    guard.release(ReleaseOutcome::Completed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_leases_are_reasserted_after_the_sidecar_restarts() {
    let mut stack = stack(4);
    let holder = stack.client("holder").await;
    let mut state = holder.connection_state();
    let kept: Vec<_> = {
        let mut guards = Vec::new();
        for (task, slots) in [1, 1, 2].into_iter().enumerate() {
            guards.push(
                holder
                    .acquire(
                        AcquireTarget::Pool(PoolId::from("p")),
                        format!("t{task}"),
                        None,
                        slots,
                    )
                    .await
                    .unwrap(),
            );
        }
        guards
    };
    let mut kept = kept.into_iter();
    let dropped_while_down = kept.next().unwrap();
    let kept: Vec<_> = kept.collect();

    stack.sidecar.kill_with(Signal::SIGKILL);
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| !matches!(s, ConnectionState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    // Released while no sidecar runs: it must not come back with the others.
    drop(dropped_while_down);
    stack.restart_sidecar();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();

    let status = holder.pool_status(&PoolId::from("p")).await.unwrap();
    assert_eq!(
        status.slots_free, 1,
        "two re-asserted leases holding 1 and 2 slots: {status:?}"
    );
    assert_eq!(holder.held_leases().len(), 2);
    for guard in kept {
        guard.release(ReleaseOutcome::Completed).await.unwrap();
    }
    assert_eq!(
        holder
            .pool_status(&PoolId::from("p"))
            .await
            .unwrap()
            .slots_free,
        4
    );
}

fn remote_error(result: Result<pool_ipc::client::LeaseGuard, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Remote(error)) => (error.code, error.message),
        other => panic!("expected an error from pool-managerd, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_slot_lease_holds_both_slots_of_a_two_slot_pool_until_released() {
    let stack = stack(2);
    let client = stack.client("batcher").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "p", "ready", |p| p.state == PoolState::Ready).await;

    let both = client
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "n2", None, 2)
        .await
        .unwrap();
    assert_eq!(both.lease().slots, 2);
    let held = wait_for_pool(&mut mirror, "p", "both slots held", |p| p.slots_free == 0).await;
    assert_eq!(held.active_leases(), 2);
    let snapshot = client.snapshot().await.unwrap();
    assert_eq!(snapshot.pool(&PoolId::from("p")).unwrap().slots_free, 0);
    let status = shim_status(&stack);
    assert_eq!(
        (&status["slots_free"], &status["active_leases"]),
        (&serde_json::json!(0), &serde_json::json!(2)),
        "{status}"
    );
    let cli = DaemonBuilder::new(binary("pool-managerd"))
        .args(["status", "p", "--json", "--socket"])
        .arg(socket_path(stack.path()))
        .run_to_exit(WAIT);
    let cli: serde_json::Value = serde_json::from_str(&cli.stdout).unwrap();
    assert_eq!(cli["slots_free"], 0, "{cli}");

    let (code, message) = remote_error(
        client
            .acquire(AcquireTarget::Pool(PoolId::from("p")), "one-more", None, 1)
            .await,
    );
    assert_eq!(code, ErrorCode::NoCapacity, "{message}");
    let (code, message) = remote_error(
        client
            .acquire(AcquireTarget::Pool(PoolId::from("p")), "n3", None, 3)
            .await,
    );
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    assert!(
        message.contains(r#"asks for 3 slots; pool "p" has 2"#),
        "{message}"
    );
    let (code, message) = remote_error(
        client
            .acquire(AcquireTarget::Pool(PoolId::from("p")), "n0", None, 0)
            .await,
    );
    assert_eq!(code, ErrorCode::BadRequest, "{message}");

    both.release(ReleaseOutcome::Completed).await.unwrap();
    let status = client.pool_status(&PoolId::from("p")).await.unwrap();
    assert_eq!((status.slots_free, status.active_leases()), (2, 0));
    let again = client
        .acquire(AcquireTarget::Model("p-model".into()), "n2-again", None, 2)
        .await
        .unwrap();
    assert_eq!((again.lease().pool.as_str(), again.lease().slots), ("p", 2));
    again.release(ReleaseOutcome::Completed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_holding_a_two_slot_lease_gives_both_slots_back() {
    let stack = stack(3);
    let monitor = stack.client("monitor").await;
    let mut mirror = monitor.subscribe().await.unwrap();
    let holder = lease_holder_of(stack.path(), 2);
    wait_for_pool(&mut mirror, "p", "two slots held", |p| p.slots_free == 1).await;
    let metrics = http::get(&stack.shim(), "/metrics", WAIT).unwrap().text();
    assert!(
        metrics.contains("pool_managerd_leases_active 2"),
        "the gauge counts slots: {metrics}"
    );
    holder.kill_with(Signal::SIGKILL);
    wait_for_pool(&mut mirror, "p", "all slots back", |p| p.slots_free == 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_publishes_the_apis_its_config_names_and_otherwise_its_engine_kinds_defaults() {
    let dir = temp_dir();
    let engine = start_engine_double(&["--listen", dir.path().join("e.sock").to_str().unwrap()]);
    let embeddings = PoolSpec {
        endpoints: Some(vec!["embeddings"]),
        ..PoolSpec::new("emb", engine.ready("listen"), 2)
    };
    let plain = PoolSpec::new("p", engine.ready("listen"), 2);
    let stack = Stack::builder()
        .without_orchestrator()
        .pool(&embeddings.toml())
        .pool(&plain.toml())
        .engine(engine)
        .start_in(dir);
    let client = stack.client("router").await;
    let snapshot = client.snapshot().await.unwrap();
    let emb = snapshot.pool(&PoolId("emb".into())).unwrap();
    assert_eq!(emb.api_endpoints, vec![ApiEndpoint::Embeddings]);
    assert!(emb.serves(ApiEndpoint::Embeddings));
    assert!(!emb.serves(ApiEndpoint::ChatCompletions));
    let plain = snapshot.pool(&PoolId::from("p")).unwrap();
    assert_eq!(
        plain.api_endpoints,
        ApiEndpoint::defaults(EngineKind::Llamacpp)
    );
    assert!(!plain.serves(ApiEndpoint::Embeddings));

    // Every published form carries it: the pushed mirror, and the shim's JSON.
    let mut mirror = client.subscribe().await.unwrap();
    let pushed = wait_for_pool(&mut mirror, "emb", "ready", |p| p.state == PoolState::Ready).await;
    assert_eq!(pushed.api_endpoints, vec![ApiEndpoint::Embeddings]);
    let reply = http::get(&stack.shim(), "/pools/emb/status", WAIT).unwrap();
    assert_eq!(
        reply.json()["api_endpoints"],
        serde_json::json!(["embeddings"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pools_and_models_are_typed_errors_everywhere() {
    let stack = stack(1);
    let client = stack.client("asker").await;
    let unknown = PoolId("nope".into());
    for error in [
        client.can_dispatch(&unknown).await.unwrap_err(),
        client.pool_status(&unknown).await.unwrap_err(),
        client
            .acquire(AcquireTarget::Pool(unknown.clone()), "t", None, 1)
            .await
            .unwrap_err(),
        client
            .acquire(AcquireTarget::Model("no-such-model".into()), "t", None, 1)
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(&error, ClientError::Remote(e) if e.code == ErrorCode::NotFound),
            "{error}"
        );
    }
    let check = client.can_dispatch(&PoolId::from("p")).await.unwrap();
    assert!(check.dispatchable);
    assert_eq!(check.slots_free, 1);

    let reply = http::get(&stack.shim(), "/pools/nope/status", WAIT).unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "not_found");

    let cli = DaemonBuilder::new(binary("pool-managerd"))
        .args(["status", "nope", "--socket"])
        .arg(socket_path(stack.path()))
        .run_to_exit(WAIT);
    assert_eq!(cli.status.code(), Some(1), "{}", cli.stderr);
    assert!(
        cli.stderr.contains("unknown pool \"nope\""),
        "{}",
        cli.stderr
    );

    let table = DaemonBuilder::new(binary("pool-managerd"))
        .args(["status", "--socket"])
        .arg(socket_path(stack.path()))
        .run_to_exit(WAIT);
    assert_eq!(table.status.code(), Some(0), "{}", table.stderr);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("p ") && l.contains("ready")),
        "{}",
        table.stdout
    );
    let json = DaemonBuilder::new(binary("pool-managerd"))
        .args(["status", "--json", "--socket"])
        .arg(socket_path(stack.path()))
        .run_to_exit(WAIT);
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(parsed["pools"][0]["pool_id"], "p");
    assert_eq!(
        parsed["pools"][0]["engine_version"],
        shim_status(&stack)["engine_version"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_cannot_take_more_than_its_cap_however_many_connections_it_opens() {
    let stack = stack_with(4, "max_leased_slots_per_uid = 2");
    let monitor = stack.client("monitor").await;
    let mut mirror = monitor.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "p", "ready", |p| p.state == PoolState::Ready).await;
    // One uid, three connections: the cap counts the uid, not the connection.
    let first = stack.client("hostile-1").await;
    let second = stack.client("hostile-2").await;
    let third = stack.client("hostile-3").await;
    let held = first
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "a", None, 1)
        .await
        .unwrap();
    let _also_held = second
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "b", None, 1)
        .await
        .unwrap();
    for (who, slots) in [(&second, 1), (&third, 1), (&third, 2)] {
        let (code, message) = remote_error(
            who.acquire(AcquireTarget::Pool(PoolId::from("p")), "over", None, slots)
                .await,
        );
        assert_eq!(code, ErrorCode::LeaseCapReached, "{message}");
        assert!(message.contains("at most 2"), "{message}");
    }
    let (code, _) = remote_error(
        third
            .acquire(AcquireTarget::Model("p-model".into()), "by-model", None, 1)
            .await,
    );
    assert_eq!(code, ErrorCode::LeaseCapReached);
    let status = monitor.pool_status(&PoolId::from("p")).await.unwrap();
    assert_eq!(status.slots_free, 2, "nothing changed: {status:?}");
    // Nor can it claim more leases in a Hello than its cap has slots (each holds at least one).
    let claims = (0..3)
        .map(|n| HeldLease {
            lease: LeaseId(n),
            pool: PoolId::from("p"),
            slots: 1,
            secret: LeaseSecret([0; 16]),
        })
        .collect();
    match raw_hello(&socket_path(stack.path()), claims).await.0 {
        ServerFrame::Refused(error) => {
            assert_eq!(error.code, ErrorCode::BadRequest, "{error}");
            assert!(error.message.contains("at most 2"), "{error}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    held.release(ReleaseOutcome::Completed).await.unwrap();
    let again = third
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "after", None, 1)
        .await
        .unwrap();
    assert_eq!(again.lease().slots, 1);
}

/// A peer speaking the protocol by hand, so it can claim whatever it likes in its `Hello`.
struct RawPeer {
    _reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    _writer: tokio::net::unix::OwnedWriteHalf,
}

/// Connects, re-asserts `held` in the `Hello`, and returns the server's answer with the
/// connection (kept open, so whatever it was given stays its own).
async fn raw_hello(socket: &Path, held: Vec<HeldLease>) -> (ServerFrame, RawPeer) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read, mut writer) = stream.into_split();
    let hello = ClientFrame::Hello(Hello {
        magic: MAGIC,
        protocol_version: PROTOCOL_VERSION,
        client_name: "thief".into(),
        held_leases: held,
    });
    writer
        .write_all(&frame_bytes(&hello, DEFAULT_MAX_FRAME_BYTES).unwrap())
        .await
        .unwrap();
    let mut reader = FrameReader::new(read, DEFAULT_MAX_FRAME_BYTES);
    let payload = tokio::time::timeout(WAIT, reader.read_frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let peer = RawPeer {
        _reader: reader,
        _writer: writer,
    };
    (decode_payload::<ServerFrame>(&payload).unwrap(), peer)
}

fn welcome(frame: ServerFrame) -> Welcome {
    match frame {
        ServerFrame::Welcome(welcome) => welcome,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_take_over_a_lease_by_its_id() {
    let stack = stack(2);
    let monitor = stack.client("monitor").await;
    let mut mirror = monitor.subscribe().await.unwrap();
    let victim = lease_holder(stack.path());
    // Lease ids are no secret: they are in the logs, and this one in the victim's READY line.
    let id = LeaseId(u64::from_str_radix(victim.ready("lease"), 16).unwrap());
    wait_for_pool(&mut mirror, "p", "the victim holds a slot", |p| {
        p.slots_free == 1
    })
    .await;
    let claims = || {
        vec![
            HeldLease {
                lease: id,
                pool: PoolId::from("p"),
                slots: 1,
                secret: LeaseSecret([0; 16]),
            },
            HeldLease {
                lease: id,
                pool: PoolId::from("p"),
                slots: 1,
                secret: LeaseSecret(*b"guessed a secret"),
            },
            // A lease nobody was ever granted.
            HeldLease {
                lease: LeaseId(id.0 + 1000),
                pool: PoolId::from("p"),
                slots: 1,
                secret: LeaseSecret([7; 16]),
            },
        ]
    };
    let refused_all = |welcome: &Welcome| {
        assert!(
            welcome.reasserted.is_empty(),
            "leases taken over by id alone: {:?}",
            welcome.reasserted
        );
        assert_eq!(welcome.rejected.len(), 3, "{:?}", welcome.rejected);
        for (lease, error) in &welcome.rejected {
            assert_eq!(error.code, ErrorCode::Unauthorized, "{lease}: {error}");
        }
    };

    // While the victim holds it, and after the victim died (its lease orphaned, free to come
    // back to whoever proves it is theirs): the thief proves nothing and gets nothing.
    let (answer, _while_held) = raw_hello(&socket_path(stack.path()), claims()).await;
    refused_all(&welcome(answer));
    victim.kill_with(Signal::SIGKILL);
    wait_for_pool(&mut mirror, "p", "the victim's slot back", |p| {
        p.slots_free == 2
    })
    .await;
    let (answer, _after_death) = raw_hello(&socket_path(stack.path()), claims()).await;
    refused_all(&welcome(answer));
    let status = monitor.pool_status(&PoolId::from("p")).await.unwrap();
    assert_eq!(status.slots_free, 2, "{status:?}");
    assert!(
        stack
            .sidecar
            .wait_for_stderr("re-asserted leases refused", WAIT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_lease_holder_loses_its_lease_after_the_ttl_while_a_live_one_keeps_its_own() {
    const TTL: Duration = Duration::from_millis(1000);
    let stack = stack_with(4, &format!("lease_ttl_ms = {}", TTL.as_millis()));
    let monitor = stack.client("monitor").await;
    let mut mirror = monitor.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "p", "ready", |p| p.state == PoolState::Ready).await;
    let live = stack.client("live").await;
    let mut live_revocations = live.revocations();
    let kept = live
        .acquire(AcquireTarget::Pool(PoolId::from("p")), "kept", None, 1)
        .await
        .unwrap();
    // The lease holder uses the same client as orchestratord; SIGSTOP freezes it whole, with its
    // connection left open.
    let mut frozen = lease_holder(stack.path());
    wait_for_pool(&mut mirror, "p", "both leases held", |p| p.slots_free == 2).await;
    frozen.kill_with(Signal::SIGSTOP);
    let stopped = Instant::now();
    wait_for_pool(&mut mirror, "p", "the frozen holder's slot back", |p| {
        p.slots_free == 3
    })
    .await;
    assert!(
        stopped.elapsed() >= TTL / 4,
        "expired {:?} after the freeze: sooner than the TTL allows",
        stopped.elapsed()
    );
    let metrics = http::get(&stack.shim(), "/metrics", WAIT).unwrap().text();
    assert!(
        metrics.contains("pool_managerd_leases_ended_total{reason=\"expired\"} 1"),
        "{metrics}"
    );

    // Time passing is what is tested here: two more TTLs, in which only renewals keep a lease.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(live.held_leases(), vec![kept.lease().id]);
    assert!(
        live_revocations.try_recv().is_err(),
        "the live client's lease was revoked"
    );
    let status = live.pool_status(&PoolId::from("p")).await.unwrap();
    assert_eq!(
        status.slots_free, 3,
        "the live lease is still held: {status:?}"
    );

    frozen.kill_with(Signal::SIGCONT);
    frozen.kill_with(Signal::SIGKILL);
    frozen.wait_exit(WAIT);
    kept.release(ReleaseOutcome::Completed).await.unwrap();
    assert_eq!(
        live.pool_status(&PoolId::from("p"))
            .await
            .unwrap()
            .slots_free,
        4
    );
}
