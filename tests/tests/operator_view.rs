//! What an operator sees of a running host, end to end: an engine's log, read by `pool-managerd
//! logs` and by the shim's `/pools/{id}/logs`, including lines the engine writes while it is
//! being followed. pool-managerd supervises an engine double (a fake llama-server) whose log lines
//! the test chooses.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::state_dir;
use e2e::stack::{Stack, double_pool};
use e2e::{DaemonBuilder, binary, http};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "shim-token-0123456789abcdef";

/// One pool `p` (an engine double); the shim with [`TOKEN`] when `token`.
fn stack(token: bool) -> Stack {
    let dir = e2e::temp_dir();
    let mut tables = double_pool("p", "double", 1, &[]);
    if token {
        let token_file = dir.path().join("shim.token");
        std::fs::write(&token_file, TOKEN).unwrap();
        tables.push_str(&format!(
            "[debug_http]\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ));
    }
    Stack::builder()
        .pool(&tables)
        .without_orchestrator()
        .start_in(dir)
}

/// Makes the engine write `line` to its log.
fn engine_logs(stack: &Stack, line: &str) {
    let reply = http::request(
        &stack.endpoint("p"),
        "POST",
        "/control/log",
        Some(("text/plain", line.as_bytes())),
        WAIT,
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn logs_follow_shows_a_line_the_engine_writes_after_it_started_following() {
    let stack = stack(false);
    stack.wait_for("pool p ready", || {
        stack.pool_status("p")["state"] == "ready"
    });
    engine_logs(&stack, "written-before-following");
    let follower = DaemonBuilder::new(binary("pool-managerd"))
        .name("pool-managerd logs")
        .args(["logs", "p", "-f", "-n", "50", "--state-dir"])
        .arg(state_dir(stack.path()))
        .start_unannounced();
    // Following has begun once the last lines are out.
    assert!(
        follower.wait_for_stdout("written-before-following", WAIT),
        "the last lines never came: {}",
        follower.stderr()
    );
    engine_logs(&stack, "written-while-following");
    assert!(
        follower.wait_for_stdout("written-while-following", WAIT),
        "a line written while following never came: {}{}",
        follower.stdout(),
        follower.stderr()
    );
    assert_eq!(
        follower
            .stdout()
            .matches("written-before-following")
            .count(),
        1,
        "a line came twice"
    );
}

#[test]
fn the_shims_log_endpoint_streams_new_lines_and_only_with_its_token() {
    let tokenless = stack(false);
    let shim = tokenless.sidecar.ready("debug_http").to_owned();
    assert_eq!(
        http::get(&shim, "/pools/p/logs", WAIT).unwrap().status,
        403,
        "a shim without a token showed an engine log"
    );
    drop(tokenless);

    let stack = stack(true);
    stack.wait_for("pool p ready", || {
        stack.pool_status_with(TOKEN, "p")["state"] == "ready"
    });
    let shim = stack.sidecar.ready("debug_http").to_owned();
    let auth = format!("Bearer {TOKEN}");
    let headers = [("Authorization", auth.as_str())];
    assert_eq!(http::get(&shim, "/pools/p/logs", WAIT).unwrap().status, 401);
    let unknown =
        http::request_with_headers(&shim, "GET", "/pools/nope/logs", &headers, None, WAIT).unwrap();
    assert_eq!(unknown.status, 404);
    let bad =
        http::request_with_headers(&shim, "GET", "/pools/p/logs?lines=x", &headers, None, WAIT)
            .unwrap();
    assert_eq!(bad.status, 400);

    engine_logs(&stack, "line-one");
    let text =
        http::request_with_headers(&shim, "GET", "/pools/p/logs?lines=5", &headers, None, WAIT)
            .unwrap();
    assert_eq!(text.status, 200);
    assert!(text.text().contains("line-one"), "{}", text.text());
    assert!(text.text().lines().count() <= 5, "{}", text.text());

    let (mut reader, status, head) = http::open(
        &shim,
        "GET",
        "/pools/p/logs?lines=1&follow=1",
        &headers,
        None,
        WAIT,
    )
    .unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let first = http::next_sse_data(&mut reader).unwrap();
    assert!(first.contains("line-one"), "{first}");
    engine_logs(&stack, "line-two");
    let next = http::next_sse_data(&mut reader).unwrap();
    assert!(next.contains("line-two"), "{next}");
}
