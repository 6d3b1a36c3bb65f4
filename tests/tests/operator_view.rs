//! What an operator sees of a running host, end to end: the status page in a real headless
//! browser (Debian's chromium, driven by `tests/python/status_page_check.py`), and an engine's
//! log, read by `pool-managerd logs` and by the shim's `/pools/{id}/logs`, including lines the
//! engine writes while it is being followed. pool-managerd supervises engine doubles (fake
//! llama-servers); orchestratord runs for real where the page needs its figures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::{python, repo_root};
use e2e::sidecar::state_dir;
use e2e::stack::{Stack, double_pool};
use e2e::{DaemonBuilder, binary, http};
use serde_json::Value;
use std::process::Command;
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

/// A loopback address free right now, for a daemon the other must know before it starts.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn the_status_page_shows_both_pools_and_its_live_figures_change_without_a_reload() {
    let orchestrator = free_address();
    let stack = Stack::builder()
        .pool(&double_pool("a", "double", 2, &[]))
        .pool(&double_pool("b", "other", 3, &[]))
        .pool(&format!(
            "[debug_http]\norchestrator_metrics_url = \"http://{orchestrator}/metrics\"\n"
        ))
        .listen(&orchestrator)
        .start();
    let shim = format!("http://{}", stack.sidecar.ready("debug_http"));
    let script = repo_root().join("tests/python/status_page_check.py");
    let output = Command::new(python())
        .arg(&script)
        .args([
            shim.as_str(),
            &format!("http://{orchestrator}"),
            "double",
            "a",
            "b",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the browser check failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        stack.sidecar.stderr()
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["status"], 200, "{seen}");
    assert_eq!(
        seen["first_paint_rows"], 2,
        "no server-rendered rows: {seen}"
    );
    assert_eq!(seen["a"]["state"], "ready", "{seen}");
    assert_eq!(seen["a"]["slots"], "0 / 2", "{seen}");
    assert_eq!(seen["b"]["state"], "ready", "{seen}");
    assert_eq!(seen["b"]["slots"], "0 / 3", "{seen}");
    assert_eq!(seen["chat_status"], 200, "{seen}");
    assert!(
        seen["requests_after"].as_u64() > seen["requests_before"].as_u64(),
        "{seen}"
    );
    assert_eq!(
        seen["reloaded"], false,
        "the figures changed by a reload: {seen}"
    );
}

#[test]
fn with_a_token_the_status_page_and_the_logs_refuse_a_request_without_it() {
    let stack = stack(true);
    let shim = stack.sidecar.ready("debug_http").to_owned();
    for path in ["/status", "/status/events", "/pools/p/logs"] {
        assert_eq!(
            http::get(&shim, path, WAIT).unwrap().status,
            401,
            "{path} without the token"
        );
    }
    let auth = format!("Bearer {TOKEN}");
    let page = http::request_with_headers(
        &shim,
        "GET",
        "/status",
        &[("Authorization", auth.as_str())],
        None,
        WAIT,
    )
    .unwrap();
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("data-id=\"p\""), "{html}");
    assert!(
        !html.contains(&stack.endpoint("p")),
        "the page shows the engine's address"
    );
}

#[test]
fn the_status_page_never_shows_an_engines_last_output() {
    let stack = Stack::builder()
        .pool(&double_pool("p", "double", 1, &["--exit-after-ms", "300"]))
        .without_orchestrator()
        .start();
    stack.wait_for("the engine's crash with its last output", || {
        e2e::sidecar::operator_status(stack.path(), "p")
            .ok()
            .and_then(|status| status["last_error"].as_str().map(str::to_owned))
            .is_some_and(|error| error.contains("injected crash"))
    });
    let shim = stack.sidecar.ready("debug_http").to_owned();
    let page = http::get(&shim, "/status", WAIT).unwrap().text();
    assert!(!page.contains("injected crash"), "{page}");
    let (mut reader, status, _) =
        http::open(&shim, "GET", "/status/events", &[], None, WAIT).unwrap();
    assert_eq!(status, 200);
    let view = http::next_sse_data(&mut reader).unwrap();
    assert!(!view.contains("injected crash"), "{view}");
    assert!(
        view.contains("engine output: `pool-managerd status`"),
        "{view}"
    );
}
