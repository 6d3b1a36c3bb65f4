//! The deployment files in `systemd/`: every unit passes `systemd-analyze verify`, the units wire
//! the sockets to the daemons by the names the daemons look for, the sysusers.d and tmpfiles.d
//! snippets create the users, groups and directories the units name, and the example orchestratord
//! config is accepted by orchestratord.
//!
//! `systemd-analyze` (and `systemd-sysusers`, `systemd-tmpfiles`) come with Debian's `systemd`
//! package, which `.ci/run` installs when it is missing. These tests fail, rather than skip, when it
//! is not installed: a skipped check would let a broken unit through.
//!
//! Why the units are verified from a copy: `systemd-analyze verify` reports an error for an
//! `ExecStart=` whose binary does not exist, and the units name the installed paths
//! (`/usr/local/bin/pool-managerd`, `/usr/local/bin/orchestratord`). The test copies every unit into
//! a temporary directory, points those paths at the binaries this workspace built
//! ([`e2e::binary`]), and verifies the copies; nothing else in them changes. `verify` also loads the
//! units a file refers to (`Service=`, `Sockets=`, `Requires=`) from the directory of the file, so
//! the copies are verified together with each other. `verify` exits 0 on warnings such as an
//! unknown or unparsable directive ("Unknown key 'X' … ignoring"), so any message that names one of
//! the units fails the test too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::{DaemonBuilder, binary, temp_dir};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
/// The installed path of each daemon, as the units name it, and the workspace binary that stands in
/// for it during verification.
const INSTALLED_BINARIES: &[(&str, &str)] = &[
    ("/usr/local/bin/pool-managerd", "pool-managerd"),
    ("/usr/local/bin/orchestratord", "orchestratord"),
];

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("systemd")
}

/// Every unit file in `systemd/` (`*.service`, `*.socket`), sorted by name.
fn unit_files() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(systemd_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            matches!(
                path.extension().and_then(OsStr::to_str),
                Some("service" | "socket")
            )
        })
        .collect();
    units.sort();
    units
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The path of systemd's tool `name`, or a failure that says how to get it.
fn systemd_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .chain(["/usr/bin".into(), "/bin".into()])
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed. It comes with Debian's `systemd` package: \
             `apt-get install -y systemd` (.ci/run installs it when `systemd-analyze` is missing)"
        )
    })
}

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

fn run(program: &Path, args: &[&OsStr]) -> Run {
    let output = Command::new(program)
        .args(args)
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Copies the units into `dir`, pointing the installed binary paths at the workspace's binaries.
fn copy_units_with_built_binaries(units: &[PathBuf], dir: &Path) -> Vec<PathBuf> {
    units
        .iter()
        .map(|unit| {
            let mut text = std::fs::read_to_string(unit).unwrap();
            for (installed, name) in INSTALLED_BINARIES {
                text = text.replace(installed, binary(name).to_str().unwrap());
            }
            assert!(
                !text.contains("/usr/local/bin/"),
                "{}: a /usr/local/bin path the test does not know how to stand in for",
                unit.display()
            );
            let copy = dir.join(unit.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            copy
        })
        .collect()
}

/// `systemd-analyze verify` on one unit: the problems it reports about any of `unit_names`
/// (errors make it exit non-zero; warnings only show in its output).
fn verify(analyze: &Path, unit: &Path, unit_names: &[String]) -> Vec<String> {
    let run = run(
        analyze,
        &["verify".as_ref(), "--man=no".as_ref(), unit.as_os_str()],
    );
    let mut problems: Vec<String> = run
        .stderr
        .lines()
        .chain(run.stdout.lines())
        .filter(|line| unit_names.iter().any(|name| line.contains(name.as_str())))
        .map(str::to_owned)
        .collect();
    if !run.success {
        problems.push(format!(
            "systemd-analyze verify exited with an error; its output:\n{}{}",
            run.stdout, run.stderr
        ));
    }
    problems
}

#[test]
fn every_unit_file_passes_systemd_analyze_verify_with_the_built_binaries_in_place() {
    let analyze = systemd_tool("systemd-analyze");
    let units = unit_files();
    let names: Vec<String> = units.iter().map(|unit| file_name(unit)).collect();
    for expected in [
        "pool-managerd.socket",
        "pool-managerd-debug.socket",
        "pool-managerd.service",
        "orchestratord.service",
        "orchestratord.socket",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "systemd/{expected} is missing (found {names:?})"
        );
    }
    let dir = temp_dir();
    let copies = copy_units_with_built_binaries(&units, dir.path());
    let mut failures = Vec::new();
    for copy in &copies {
        let problems = verify(&analyze, copy, &names);
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", file_name(copy), problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "systemd-analyze verify found problems:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_verify_check_catches_a_misspelled_directive_and_a_missing_binary() {
    // The check above passes only if it can fail: a directive systemd ignores with a warning, and
    // an ExecStart= whose binary is absent (what the test's copy avoids), are both reported.
    let analyze = systemd_tool("systemd-analyze");
    let dir = temp_dir();
    let service = dir.path().join("broken-example.service");
    std::fs::write(
        &service,
        format!(
            "[Service]\nType=notify\nExecStart={}\nKillMode=proces\n",
            binary("orchestratord").display()
        ),
    )
    .unwrap();
    let names = vec![file_name(&service)];
    let problems = verify(&analyze, &service, &names);
    assert!(
        problems.iter().any(|line| line.contains("proces")),
        "a misspelled KillMode= went unnoticed: {problems:?}"
    );
    std::fs::write(
        &service,
        "[Service]\nType=notify\nExecStart=/usr/local/bin/no-such-daemon-here\n",
    )
    .unwrap();
    let problems = verify(&analyze, &service, &names);
    assert!(
        problems
            .iter()
            .any(|line| line.contains("no-such-daemon-here")),
        "a missing ExecStart binary went unnoticed: {problems:?}"
    );
}

/// A unit file as `section -> key -> values` (a key may repeat; comments and blank lines dropped).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(path: &Path) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not key=value: {line}", path.display()));
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    unit
}

fn load(name: &str) -> Unit {
    parse_unit(&systemd_dir().join(name))
}

/// The values of `key` in `section`, each split on whitespace (for list settings like After=).
fn words(unit: &Unit, section: &str, key: &str) -> Vec<String> {
    unit.get(section)
        .and_then(|keys| keys.get(key))
        .map(|values| {
            values
                .iter()
                .flat_map(|v| v.split_whitespace().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The single value of `key` in `section`.
fn one(unit: &Unit, section: &str, key: &str) -> String {
    let values = unit
        .get(section)
        .and_then(|keys| keys.get(key))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        values.len(),
        1,
        "[{section}] {key}= should be set exactly once"
    );
    values[0].clone()
}

#[test]
fn the_units_hand_each_daemon_its_sockets_by_the_names_it_looks_for() {
    // One FileDescriptorName= per socket unit names all of that unit's sockets alike, so each
    // listener a daemon tells apart by name needs a unit of its own.
    let sockets = [
        (
            "pool-managerd.socket",
            "/run/pool-managerd/pool.sock",
            "ipc",
            "pool-managerd.service",
        ),
        (
            "pool-managerd-debug.socket",
            "127.0.0.1:9200",
            "debug-http",
            "pool-managerd.service",
        ),
        (
            "orchestratord.socket",
            "127.0.0.1:8080",
            "http",
            "orchestratord.service",
        ),
    ];
    for (file, listen, fd_name, service) in sockets {
        let unit = load(file);
        assert_eq!(one(&unit, "Socket", "ListenStream"), listen, "{file}");
        assert_eq!(
            one(&unit, "Socket", "FileDescriptorName"),
            fd_name,
            "{file}"
        );
        assert_eq!(one(&unit, "Socket", "Service"), service, "{file}");
    }
    let ipc = load("pool-managerd.socket");
    assert_eq!(one(&ipc, "Socket", "SocketMode"), "0660");
    assert_eq!(one(&ipc, "Socket", "SocketGroup"), "pool-clients");

    let pool = load("pool-managerd.service");
    assert_eq!(one(&pool, "Service", "Type"), "notify");
    assert_eq!(one(&pool, "Service", "KillMode"), "process");
    assert_eq!(one(&pool, "Service", "Restart"), "on-failure");
    assert!(!one(&pool, "Service", "WatchdogSec").is_empty());
    let inherited: BTreeSet<String> = words(&pool, "Service", "Sockets").into_iter().collect();
    assert_eq!(
        inherited,
        BTreeSet::from([
            "pool-managerd.socket".to_owned(),
            "pool-managerd-debug.socket".to_owned()
        ])
    );
    assert!(one(&pool, "Service", "ExecStart").starts_with("/usr/local/bin/pool-managerd "));
    // Both daemons reload on SIGHUP (systemd 252 has no Type=notify-reload to send it).
    for unit in [&pool, &load("orchestratord.service")] {
        assert!(one(unit, "Service", "ExecReload").contains("-HUP"));
    }

    // orchestratord starts in parallel with pool-managerd: it waits for the socket, never the service.
    let orchestratord = load("orchestratord.service");
    assert_eq!(one(&orchestratord, "Service", "Type"), "notify");
    let after = words(&orchestratord, "Unit", "After");
    assert!(
        after.contains(&"pool-managerd.socket".to_owned()),
        "{after:?}"
    );
    for key in ["After", "Requires", "Wants", "BindsTo", "Requisite"] {
        assert!(
            !words(&orchestratord, "Unit", key).contains(&"pool-managerd.service".to_owned()),
            "orchestratord.service must not depend on pool-managerd.service ({key}=)"
        );
    }
    assert!(
        one(&orchestratord, "Service", "ExecStart")
            .contains("--socket /run/pool-managerd/pool.sock")
    );
    assert!(
        one(&orchestratord, "Service", "PrivateDevices") == "yes"
            && words(&orchestratord, "Service", "DeviceAllow").is_empty(),
        "orchestratord gets no device access"
    );
}

/// `name:...:id:...` lines of a passwd or group file, as name -> id.
fn ids(path: &Path) -> BTreeMap<String, u32> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some((fields.first()?.to_string(), fields.get(2)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_sysusers_and_tmpfiles_snippets_create_the_users_groups_and_directories_the_units_name() {
    let sysusers = systemd_tool("systemd-sysusers");
    let tmpfiles = systemd_tool("systemd-tmpfiles");
    let root = temp_dir();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", root.path().display());
    // With --root, the file's own path is read as it is (an absolute path is required).
    let users_conf = systemd_dir().join("sysusers.d/pool-managerd.conf");
    let users_conf = users_conf.canonicalize().unwrap();
    let created = run(&sysusers, &[root_arg.as_ref(), users_conf.as_os_str()]);
    assert!(created.success, "systemd-sysusers: {}", created.stderr);
    let users = ids(&root.path().join("etc/passwd"));
    let groups = ids(&root.path().join("etc/group"));

    // Every user and group a unit names exists.
    for file in unit_files() {
        let unit = parse_unit(&file);
        for (section, key, table) in [
            ("Service", "User", &users),
            ("Service", "Group", &groups),
            ("Service", "SupplementaryGroups", &groups),
            ("Socket", "SocketUser", &users),
            ("Socket", "SocketGroup", &groups),
        ] {
            for name in words(&unit, section, key) {
                assert!(
                    table.contains_key(&name),
                    "{}: {key}={name} is not created by sysusers.d/pool-managerd.conf",
                    file_name(&file)
                );
            }
        }
    }

    let dirs_conf = systemd_dir()
        .join("tmpfiles.d/pool-managerd.conf")
        .canonicalize()
        .unwrap();
    if !nix::unistd::geteuid().is_root() {
        // Creating directories owned by other users needs root (as CI and `systemctl` hosts are).
        eprintln!("not root: the tmpfiles.d snippet's owners and modes are checked only as root");
        return;
    }
    let made = run(
        &tmpfiles,
        &[
            root_arg.as_ref(),
            "--create".as_ref(),
            dirs_conf.as_os_str(),
        ],
    );
    assert!(made.success, "systemd-tmpfiles: {}", made.stderr);
    for (dir, mode, user, group) in [
        ("run/pool-managerd", 0o2750, "pool-managerd", "pool-clients"),
        (
            "var/lib/pool-managerd",
            0o750,
            "pool-managerd",
            "pool-managerd",
        ),
        (
            "var/log/pool-managerd",
            0o750,
            "pool-managerd",
            "pool-managerd",
        ),
        ("etc/pool-managerd", 0o750, "root", "pool-managerd"),
        ("etc/orchestratord", 0o750, "root", "orchestratord"),
    ] {
        let meta = std::fs::metadata(root.path().join(dir))
            .unwrap_or_else(|e| panic!("/{dir} was not created: {e}"));
        assert!(meta.is_dir(), "/{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "/{dir} mode");
        let uid = if user == "root" { 0 } else { users[user] };
        assert_eq!(
            (meta.uid(), meta.gid()),
            (uid, groups[group]),
            "/{dir} owner"
        );
    }
    // The socket unit puts pool.sock in the directory tmpfiles made, the service writes there.
    let socket = load("pool-managerd.socket");
    assert!(one(&socket, "Socket", "ListenStream").starts_with("/run/pool-managerd/"));
    let service = load("pool-managerd.service");
    assert_eq!(
        words(&service, "Service", "ReadWritePaths"),
        ["/run/pool-managerd"]
    );
}

/// The example config with every `# key = value` line uncommented: the documented defaults.
fn uncommented(example: &str, api_keys_file: &Path) -> String {
    example
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let is_setting = rest
                .split_once(" = ")
                .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            if !is_setting {
                line.to_owned()
            } else if rest.starts_with("api_keys_file = ") {
                format!("api_keys_file = {:?}", api_keys_file.display().to_string())
            } else {
                rest.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_orchestratord_config_is_accepted_as_shipped_and_with_every_key_set() {
    let example_path = systemd_dir().join("orchestratord.example.toml");
    let example = std::fs::read_to_string(&example_path).unwrap();
    let dir = temp_dir();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "example-key-0123456789abcdef\n").unwrap();
    let all_keys = dir.path().join("all-keys.toml");
    let uncommented = uncommented(&example, &keys);
    for key in [
        "listen",
        "socket",
        "api_keys_file",
        "open_paths",
        "max_body_bytes",
        "otlp_endpoint",
        "capacity",
        "full_policy",
        "batch_max_wait_ms",
        "queue_deadline_ms",
        "decode_stall_ms",
        "keepalive_ms",
        "ttl_ms",
        "max_turns",
        "max_tokens",
    ] {
        assert!(
            uncommented
                .lines()
                .any(|line| line.starts_with(&format!("{key} = "))),
            "orchestratord.example.toml does not document `{key}`"
        );
    }
    std::fs::write(&all_keys, &uncommented).unwrap();
    for config in [example_path.as_path(), all_keys.as_path()] {
        // The flags override the config's listen address and socket: nothing fixed is bound, and
        // pool-managerd is absent (orchestratord serves, and is not ready, without it).
        // A config it refuses stops it before READY (exit code 2), which `start` reports; dropping
        // the daemon stops it.
        let daemon = DaemonBuilder::new(binary("orchestratord"))
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--socket"])
            .arg(dir.path().join("absent.sock"))
            .start();
        assert!(daemon.ready("listen").starts_with("127.0.0.1:"));
    }
}
