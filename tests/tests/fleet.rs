//! A host as one endpoint of a fleet, end to end: the load signals a fleet's endpoint picker
//! scrapes from /metrics (in both exposition formats, read with the Prometheus reference parsers
//! and promtool), the operator's drain of the whole host, and access lines that name the key,
//! the correlation id and the client a trusted balancer forwarded for. pool-managerd supervises
//! engine doubles (fake llama-servers); orchestratord runs for real.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::{promtool, python};
use e2e::stack::{Stack, double_pool};
use e2e::{http, temp_dir};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

const INFERENCE_KEY: &str = "sk-alice-0123456789abcdef";
const ADMIN_KEY: &str = "sk-ops-0123456789abcdef01";

/// orchestratord's key file: `alice` (inference) and `ops` (admin).
fn key_file(dir: &std::path::Path) -> String {
    let path = dir.join("keys");
    std::fs::write(
        &path,
        format!("alice inference {INFERENCE_KEY}\nops admin {ADMIN_KEY}\n"),
    )
    .unwrap();
    format!("api_keys_file = {:?}\n", path.display().to_string())
}

fn bearer(key: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {key}"))
}

fn chat(max_tokens: u32) -> Value {
    json!({
        "model": "double",
        "messages": [{"role": "user", "content": "say something nice"}],
        "max_tokens": max_tokens,
        "stream": true,
    })
}

/// Opens a streamed chat; the connection after the head, the status and the head.
fn open_chat(
    addr: &str,
    key: &str,
    max_tokens: u32,
    more: &[(&str, &str)],
) -> (BufReader<http::Stream>, u16, String) {
    let (name, value) = bearer(key);
    let mut headers = vec![(name, value.as_str())];
    headers.extend_from_slice(more);
    let body = chat(max_tokens).to_string();
    http::open(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap()
}

/// An admin POST with an empty JSON body; status and JSON answer.
fn admin_post(addr: &str, key: &str, path: &str, body: &str) -> (u16, Value) {
    let (name, value) = bearer(key);
    let reply = http::request_with_headers(
        addr,
        "POST",
        path,
        &[(name, value.as_str())],
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap();
    (reply.status, reply.json())
}

#[test]
fn draining_the_host_turns_readyz_away_at_once_refuses_new_requests_and_lets_running_streams_finish()
 {
    let keys = temp_dir();
    let stack = Stack::builder()
        .pool(&double_pool("p", "double", 2, &["--token-delay-ms", "20"]))
        .orchestrator(&key_file(keys.path()))
        .start();
    let addr = stack.api();
    let (status, answer) = admin_post(&addr, INFERENCE_KEY, "/v2/admin/drain", "");
    assert_eq!(status, 403, "an inference key drained the host: {answer}");
    assert_eq!(http::get(&addr, "/readyz", WAIT).unwrap().status, 200);

    let (reader, status, _) = open_chat(&addr, INFERENCE_KEY, 40, &[]);
    assert_eq!(status, 200);
    let running = std::thread::spawn(move || http::read_chat_stream(reader));
    stack.wait_for_leases("p", 1);

    let (status, answer) = admin_post(&addr, ADMIN_KEY, "/v2/admin/drain", "{}");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["host"], "drained", "{answer}");
    assert_eq!(answer["before"], "serving", "{answer}");
    assert_eq!(answer["in_flight"], 1, "{answer}");
    let ready = http::get(&addr, "/readyz", WAIT).unwrap();
    assert_eq!(ready.status, 503, "readyz still 200 right after the drain");
    assert_eq!(ready.json()["host"], "drained");
    let (name, value) = bearer(ADMIN_KEY);
    let pools = http::request_with_headers(
        &addr,
        "GET",
        "/v2/pools",
        &[(name, value.as_str())],
        None,
        WAIT,
    )
    .unwrap()
    .json();
    assert_eq!(pools["host"], "drained", "{pools}");

    let (mut refused, status, head) = open_chat(&addr, INFERENCE_KEY, 4, &[]);
    assert_eq!(status, 503, "a drained host admitted a request: {head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "no Retry-After: {head}"
    );
    let mut body = String::new();
    std::io::Read::read_to_string(&mut refused, &mut body).unwrap();
    assert!(body.contains("host_draining"), "{body}");

    assert_eq!(
        running.join().unwrap(),
        (40, true),
        "the stream running at the drain was cut off"
    );
    let (status, answer) = admin_post(&addr, ADMIN_KEY, "/v2/admin/drain", "{\"now\": true}");
    assert_eq!(status, 400, "a drain with unknown parameters: {answer}");

    let (status, answer) = admin_post(&addr, ADMIN_KEY, "/v2/admin/undrain", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["host"], &answer["before"]),
        (&json!("serving"), &json!("drained"))
    );
    assert_eq!(http::get(&addr, "/readyz", WAIT).unwrap().status, 200);
    let (reader, status, _) = open_chat(&addr, INFERENCE_KEY, 3, &[]);
    assert_eq!(status, 200);
    assert_eq!(http::read_chat_stream(reader), (3, true));
}

/// The samples of one exposition `text`, as the Prometheus Python client's reference parser for
/// `format` (`text` 0.0.4 or `openmetrics`) reads them: `{sample name: [[labels, value]…]}`.
fn parse_exposition(format: &str, text: &str) -> Value {
    let program = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as text_parser
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parser
parse = om_parser if sys.argv[1] == "openmetrics" else text_parser
samples = {}
for family in parse(sys.stdin.read()):
    for sample in family.samples:
        samples.setdefault(sample.name, []).append([sample.labels, sample.value])
print(json.dumps(samples))
"#;
    let mut child = Command::new(python())
        .args(["-c", program, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the {format} parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A sample's value for `model_name="double"`.
fn model_value(samples: &Value, name: &str) -> Option<f64> {
    samples[name]
        .as_array()?
        .iter()
        .find(|sample| sample[0]["model_name"] == "double")
        .and_then(|sample| sample[1].as_f64())
}

/// `/metrics` asked for as Prometheus asks (OpenMetrics preferred) or as curl does.
fn scrape(addr: &str, accept: &str) -> http::Reply {
    http::request_with_headers(addr, "GET", "/metrics", &[("Accept", accept)], None, WAIT).unwrap()
}

const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
                                 text/plain;version=0.0.4;q=0.4,*/*;q=0.1";

#[test]
fn model_server_signals_count_waiting_and_running_requests_in_both_exposition_formats() {
    let stack = Stack::builder()
        .pool(&double_pool("p", "double", 4, &[]))
        .start();
    let addr = stack.api();
    // The engine holds every generation until released: the four running streams and the six
    // queued behind them stay so while the test looks.
    let engine = stack.endpoint("p");
    let hold = http::request(&engine, "POST", "/control/hold", None, WAIT).unwrap();
    assert_eq!(hold.status, 200, "{}", hold.text());
    let streams: Vec<_> = (0..10)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = chat(40).to_string();
                let (reader, status, _) = http::open(
                    &addr,
                    "POST",
                    "/v1/chat/completions",
                    &[],
                    Some(("application/json", body.as_bytes())),
                    Duration::from_secs(60),
                )
                .unwrap();
                assert_eq!(status, 200);
                http::read_chat_stream(reader)
            })
        })
        .collect();
    let mut loaded = None;
    stack.wait_for("6 waiting and 4 running in the text form", || {
        let reply = scrape(&addr, "*/*");
        let samples = parse_exposition("text", &reply.text());
        let counts = (
            model_value(&samples, "vllm:num_requests_waiting"),
            model_value(&samples, "vllm:num_requests_running"),
        );
        let done = counts == (Some(6.0), Some(4.0));
        if done {
            loaded = Some(reply);
        }
        done
    });
    let text = loaded.unwrap();
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let openmetrics = scrape(&addr, PROMETHEUS_ACCEPT);
    assert_eq!(
        openmetrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let samples = parse_exposition("openmetrics", &openmetrics.text());
    assert_eq!(
        (
            model_value(&samples, "vllm:num_requests_waiting"),
            model_value(&samples, "vllm:num_requests_running"),
        ),
        (Some(6.0), Some(4.0)),
        "the OpenMetrics form disagrees: {}",
        openmetrics.text()
    );
    // orchestratord's own series read the same in both forms.
    for (form, samples) in [
        ("text", parse_exposition("text", &text.text())),
        ("openmetrics", samples),
    ] {
        assert_eq!(
            samples["orchestratord_sidecar_connected"][0][1].as_f64(),
            Some(1.0),
            "{form}"
        );
        assert_eq!(
            samples["orchestratord_in_flight"][0][1].as_f64(),
            Some(4.0),
            "{form}"
        );
    }

    let lint = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.text().as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let complaints =
        String::from_utf8_lossy(&lint.stderr).to_string() + &String::from_utf8_lossy(&lint.stdout);
    let unexpected: Vec<&str> = complaints
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with("vllm:"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics: {complaints}\n{}",
        text.text()
    );

    let release = http::request(&engine, "POST", "/control/release", None, WAIT).unwrap();
    assert_eq!(release.status, 200, "{}", release.text());
    for stream in streams {
        assert_eq!(stream.join().unwrap(), (40, true));
    }
    let samples = parse_exposition("text", &scrape(&addr, "*/*").text());
    assert_eq!(
        (
            model_value(&samples, "vllm:num_requests_waiting"),
            model_value(&samples, "vllm:num_requests_running"),
        ),
        (Some(0.0), Some(0.0))
    );
}

/// orchestratord's JSON access lines (target `access`) so far.
fn access_lines(stack: &Stack) -> Vec<Value> {
    stack
        .orchestrator()
        .stderr()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .map(|line| line["fields"].clone())
        .collect()
}

#[test]
fn access_lines_name_the_key_the_correlation_id_and_the_client_a_trusted_balancer_forwarded_for() {
    for trusted in [true, false] {
        let keys = temp_dir();
        let mut toml = key_file(keys.path());
        if trusted {
            toml.push_str("trusted_proxies = [\"127.0.0.0/8\"]\n");
        }
        let stack = Stack::builder()
            .pool(&double_pool("p", "double", 1, &[]))
            .orchestrator(&toml)
            .orchestrator_args(&["--log-format", "json"])
            .start();
        let (reader, status, _) = open_chat(
            &stack.api(),
            INFERENCE_KEY,
            2,
            &[
                ("X-Forwarded-For", "198.51.100.7, 203.0.113.9"),
                ("X-Correlation-Id", "fleet-corr-1"),
            ],
        );
        assert_eq!(status, 200);
        assert_eq!(http::read_chat_stream(reader), (2, true));
        let (reader, status, _) = open_chat(&stack.api(), "sk-nobody-0123456789abcdef", 2, &[]);
        assert_eq!(status, 401);
        drop(reader);
        let mut lines = Vec::new();
        stack.wait_for("two access lines", || {
            lines = access_lines(&stack);
            lines.len() >= 2
        });
        let served = lines
            .iter()
            .find(|line| line["correlation_id"] == "fleet-corr-1")
            .unwrap_or_else(|| panic!("no access line for the request: {lines:?}"));
        assert_eq!(served["key"], "alice", "{served}");
        assert_eq!(served["status"], 200, "{served}");
        assert_eq!(served["method"], "POST", "{served}");
        assert_eq!(served["path"], "/v1/chat/completions", "{served}");
        let client = if trusted { "203.0.113.9" } else { "127.0.0.1" };
        assert_eq!(
            served["client"], client,
            "trusted balancer {trusted}: {served}"
        );
        let refused = lines
            .iter()
            .find(|line| line["status"] == 401)
            .unwrap_or_else(|| panic!("no access line for the refusal: {lines:?}"));
        assert_eq!(refused["key"], "-", "{refused}");
    }
}

/// HAProxy's executable (Debian installs it in /usr/sbin, which a user's PATH may lack).
fn haproxy_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file());
    let binary = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    assert!(
        binary.is_file(),
        "haproxy is not installed (scripts/debian-packages.sh --tests installs it)"
    );
    binary
}

/// Three hosts (pool-managerd and orchestratord, on 127.0.0.2, .3 and .4) behind HAProxy running
/// deploy/haproxy/haproxy.cfg as it is.
struct Fleet {
    hosts: Vec<Stack>,
    /// Where clients connect.
    front: String,
    stats: PathBuf,
    haproxy: e2e::Daemon,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start() -> Fleet {
        let hosts: Vec<Stack> = (2..=4)
            .map(|octet| {
                Stack::builder()
                    .pool(&double_pool("p", "double", 16, &["--token-delay-ms", "20"]))
                    .listen(&format!("127.0.0.{octet}:0"))
                    .orchestrator("trusted_proxies = [\"127.0.0.1\"]\n")
                    .start()
            })
            .collect();
        let dir = temp_dir();
        let stats = dir.path().join("haproxy.sock");
        let front = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .unwrap()
                .port()
        );
        let config = e2e::real_engine::repo_root().join("deploy/haproxy/haproxy.cfg");
        let mut builder = e2e::DaemonBuilder::new(haproxy_binary())
            .name("haproxy")
            .args(["-db", "-f"])
            .arg(&config)
            .env("FLEET_LISTEN", &front)
            .env("FLEET_STATS_SOCKET", &stats);
        for (index, host) in hosts.iter().enumerate() {
            builder = builder.env(format!("FLEET_HOST{}", index + 1), host.api());
        }
        let haproxy = builder.start_unannounced();
        let fleet = Fleet {
            hosts,
            front,
            stats,
            haproxy,
            _dir: dir,
        };
        let started = Instant::now();
        while fleet
            .states()
            .values()
            .filter(|state| *state == "UP")
            .count()
            < 3
        {
            assert!(
                started.elapsed() < WAIT,
                "HAProxy never saw three hosts up: {:?}\n{}",
                fleet.states(),
                fleet.haproxy.stdout()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fleet
    }

    /// Each server's status (`UP`, `DOWN`, ...) from HAProxy's runtime API (`show stat`).
    fn states(&self) -> HashMap<String, String> {
        let Ok(mut socket) = UnixStream::connect(&self.stats) else {
            return HashMap::new();
        };
        let mut csv = String::new();
        if socket.write_all(b"show stat\n").is_err() || socket.read_to_string(&mut csv).is_err() {
            return HashMap::new();
        }
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|field| *field == name);
        let (Some(proxy), Some(server), Some(status)) =
            (column("pxname"), column("svname"), column("status"))
        else {
            return HashMap::new();
        };
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|fields| fields.get(proxy) == Some(&"orchestrators"))
            .filter_map(|fields| {
                let name = fields.get(server)?;
                let state = fields.get(status)?;
                name.starts_with("host")
                    .then(|| ((*name).to_owned(), (*state).to_owned()))
            })
            .collect()
    }

    /// How long until HAProxy shows `host` (`host1`..) DOWN.
    fn time_until_down(&self, host: &str, since: Instant) -> Duration {
        loop {
            if self.states().get(host).map(String::as_str) == Some("DOWN") {
                return since.elapsed();
            }
            assert!(since.elapsed() < WAIT, "HAProxy never took {host} out");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Which host's orchestratord answered the request with correlation id `id` with a 200 (from
    /// its access lines; a draining host's 503 that HAProxy retried elsewhere does not count).
    fn host_of(&self, id: &str) -> Option<usize> {
        let needle = format!("correlation_id={id} ");
        self.hosts.iter().position(|host| {
            host.orchestrator()
                .stderr()
                .lines()
                .any(|line| line.contains(&needle) && line.contains(" status=200 "))
        })
    }

    /// How many times host `index` refused the request with correlation id `id`.
    fn refusals(&self, index: usize, id: &str) -> usize {
        let needle = format!("correlation_id={id} ");
        self.hosts[index]
            .orchestrator()
            .stderr()
            .lines()
            .filter(|line| line.contains(&needle) && line.contains(" status=503 "))
            .count()
    }

    /// A streamed chat through HAProxy, read to its end on a thread: its status, content chunks
    /// and whether `[DONE]` came.
    fn stream(&self, id: &str, tokens: u32) -> std::thread::JoinHandle<(u16, usize, bool)> {
        let front = self.front.clone();
        let id = id.to_owned();
        std::thread::spawn(move || {
            let body = chat(tokens).to_string();
            let (reader, status, _) = http::open(
                &front,
                "POST",
                "/v1/chat/completions",
                &[("X-Correlation-Id", id.as_str())],
                Some(("application/json", body.as_bytes())),
                Duration::from_secs(60),
            )
            .unwrap();
            if status != 200 {
                return (status, 0, false);
            }
            let (chunks, done) = http::read_chat_stream(reader);
            (status, chunks, done)
        })
    }
}

/// Waits until a stream runs on `host`.
fn busy(host: &Stack) {
    host.wait_for("a stream running on the host", || {
        host.pool_status("p")["active_leases"].as_u64() >= Some(1)
    });
}

#[test]
fn haproxy_spreads_streams_over_three_hosts_drains_one_without_an_error_and_loses_only_a_killed_hosts_streams()
 {
    let mut fleet = Fleet::start();

    // Load spreads.
    let spread: Vec<_> = (0..30)
        .map(|index| {
            (
                format!("spread-{index}"),
                fleet.stream(&format!("spread-{index}"), 25),
            )
        })
        .collect();
    let mut per_host = [0usize; 3];
    for (id, stream) in spread {
        assert_eq!(stream.join().unwrap(), (200, 25, true), "{id}");
        per_host[fleet
            .host_of(&id)
            .unwrap_or_else(|| panic!("no host served {id}"))] += 1;
    }
    println!("fleet: 30 streams through HAProxy (leastconn) per host: {per_host:?}");
    assert!(per_host.iter().all(|served| *served >= 5), "{per_host:?}");

    // Draining host1 moves new requests to the others while its running streams finish.
    let long: Vec<_> = (0..6)
        .map(|index| {
            (
                format!("drain-long-{index}"),
                fleet.stream(&format!("drain-long-{index}"), 150),
            )
        })
        .collect();
    busy(&fleet.hosts[0]);
    let drained_at = Instant::now();
    let (status, answer) = admin_post(&fleet.hosts[0].api(), ADMIN_KEY, "/v2/admin/drain", "");
    assert_eq!(status, 200, "{answer}");
    let during: Vec<_> = (0..10)
        .map(|index| {
            std::thread::sleep(Duration::from_millis(150));
            (
                format!("drain-new-{index}"),
                fleet.stream(&format!("drain-new-{index}"), 5),
            )
        })
        .collect();
    let drain_noticed = fleet.time_until_down("host1", drained_at);
    let mut retried = 0;
    for (id, stream) in during {
        assert_eq!(
            stream.join().unwrap(),
            (200, 5, true),
            "{id} during the drain"
        );
        assert_ne!(
            fleet.host_of(&id),
            Some(0),
            "{id} was served by the drained host"
        );
        retried += fleet.refusals(0, &id);
    }
    let mut finished_on_drained = 0;
    for (id, stream) in long {
        assert_eq!(
            stream.join().unwrap(),
            (200, 150, true),
            "{id} was cut by the drain"
        );
        finished_on_drained += usize::from(fleet.host_of(&id) == Some(0));
    }
    println!(
        "fleet: drain of host1 seen by HAProxy after {drain_noticed:?} (inter 1 s x fall 2); \
         {finished_on_drained} streams running there finished whole; 10 requests sent meanwhile \
         all served by the other hosts ({retried} of them after host1's 503, retried by HAProxy)"
    );
    assert!(finished_on_drained >= 1);
    // inter x fall = 2 s, plus a check's timeout and a busy machine's slack.
    assert!(drain_noticed < Duration::from_secs(5), "{drain_noticed:?}");

    // Killing host2's orchestratord costs only its own streams.
    let running: Vec<_> = (0..8)
        .map(|index| {
            (
                format!("kill-{index}"),
                fleet.stream(&format!("kill-{index}"), 150),
            )
        })
        .collect();
    busy(&fleet.hosts[1]);
    fleet.hosts[1].wait_for("every stream to have started somewhere", || {
        running.iter().all(|(id, _)| fleet.host_of(id).is_some())
    });
    let on_victim: Vec<String> = running
        .iter()
        .filter(|(id, _)| fleet.host_of(id) == Some(1))
        .map(|(id, _)| id.clone())
        .collect();
    let killed_at = Instant::now();
    fleet.hosts[1]
        .orchestrator_mut()
        .kill_with(e2e::Signal::SIGKILL);
    let after: Vec<_> = (0..6)
        .map(|index| {
            std::thread::sleep(Duration::from_millis(100));
            (
                format!("kill-new-{index}"),
                fleet.stream(&format!("kill-new-{index}"), 5),
            )
        })
        .collect();
    let kill_noticed = fleet.time_until_down("host2", killed_at);
    let mut lost = Vec::new();
    for (id, stream) in running {
        let outcome = stream.join().unwrap();
        if outcome != (200, 150, true) {
            lost.push(id.clone());
        }
    }
    for (id, stream) in after {
        assert_eq!(
            stream.join().unwrap(),
            (200, 5, true),
            "{id} after the kill"
        );
    }
    println!(
        "fleet: host2's orchestratord killed with {} streams on it: {} streams failed ({lost:?}), \
         the other {} finished; HAProxy took host2 out after {kill_noticed:?}; 6 requests sent \
         meanwhile all served",
        on_victim.len(),
        lost.len(),
        8 - lost.len()
    );
    assert!(!on_victim.is_empty(), "no stream ran on host2");
    lost.sort();
    let mut expected = on_victim.clone();
    expected.sort();
    assert_eq!(
        lost, expected,
        "failures beyond the killed host's own streams"
    );
    assert!(kill_noticed < Duration::from_secs(5), "{kill_noticed:?}");
}
