//! The Debian package on a fresh machine (docs/operations.md, "Packaging"): packaging/build-deb.sh
//! builds it (dev profile), a fresh Debian of the host's release boots with systemd as PID 1
//! in systemd-nspawn (common::machine: nothing on the host or in the cached tree changes), dpkg
//! installs the package there, and systemd runs its units: the daemon and the platform answer,
//! the installed CLI prepares and resumes a program through the installed daemon, a killed
//! daemon comes back, a stop stops everything. And `cargo install --path crates/mitosis-cli`.
//!
//! Needs root, systemd-nspawn and debootstrap (scripts/setup.sh installs them), cargo-deb
//! (scripts/test.sh installs it) and a Debian mirror the first time (the machine's tree is
//! cached in target/pkgtest/); without them these tests fail saying what is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::machine::{Machine, machine_root, repo, target_dir};
use common::*;
use serde_json::Value;

const STATUS: &str = include_str!("../../docs/schemas/status.schema.json");
const UNITS: [&str; 2] = ["mitosisd.service", "mitosis-platform.service"];

fn require(what: &str, installer: &str, cmd: &mut Command) {
    let found = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "{what} is missing: {installer} installs it");
}

fn require_root_and_tools() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
    let tools: [(&str, &[&str], &str); 3] = [
        (
            "systemd-nspawn",
            &["systemd-nspawn", "--version"],
            "scripts/setup.sh",
        ),
        (
            "debootstrap",
            &["debootstrap", "--version"],
            "scripts/setup.sh",
        ),
        (
            "cargo-deb",
            &["cargo", "deb", "--version"],
            "scripts/test.sh",
        ),
    ];
    for (what, argv, installer) in tools {
        require(what, installer, Command::new(argv[0]).args(&argv[1..]));
    }
}

/// Runs `cmd` (killed after 15 min) and asserts it succeeds.
fn run_ok(mut cmd: Command, what: &str) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let out = wait_output(child, Duration::from_secs(900));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
}

/// The profile whose binaries this test runs beside (target/debug: dev).
fn profile() -> String {
    let dir = bin_dir();
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".into(),
        Some(other) => other.into(),
        None => panic!("no profile in {}", dir.display()),
    }
}

/// Held while a test builds with cargo and runs what it built: both tests' builds put their
/// binaries in target/debug (cargo replaces them there), where build-deb.sh reads its own.
static CARGO: Mutex<()> = Mutex::new(());

fn cargo_lock() -> MutexGuard<'static, ()> {
    CARGO
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// packaging/build-deb.sh (this test's profile, fast compression) into `dir`/mitosis.deb.
fn build_deb(dir: &Path) -> PathBuf {
    let _cargo = cargo_lock();
    let deb = dir.join("mitosis.deb");
    let mut cmd = Command::new(repo().join("packaging/build-deb.sh"));
    cmd.args(["--fast", "--output"])
        .arg(&deb)
        .env("PROFILE", profile())
        .env("CARGO_TARGET_DIR", target_dir());
    run_ok(cmd, "packaging/build-deb.sh");
    deb
}

/// `GET url` from inside the machine: the status code and body.
fn get(m: &Machine, url: &str) -> (String, String) {
    let out = m.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.to_string(), body.to_string())
}

/// Waits (up to 30 s) until `url` answers 200 in the machine; its body.
fn wait_ok(m: &Machine, url: &str, unit: &str) -> String {
    let mut last = (String::new(), String::new());
    let ok = m.wait_until(Duration::from_secs(30), || {
        last = get(m, url);
        last.0 == "200"
    });
    assert!(
        ok,
        "{url} never answered 200: {last:?}\n{}",
        m.journal(unit)
    );
    last.1
}

/// Waits (up to 30 s) until the platform is ready with its host h0, this machine's daemon, up.
fn assert_platform_sees_its_host(m: &Machine) {
    let mut ready = Value::Null;
    let up = m.wait_until(Duration::from_secs(30), || {
        let (code, body) = get(m, "http://127.0.0.1:8080/readyz");
        ready = serde_json::from_str(&body).unwrap_or(Value::Null);
        code == "200" && ready["hosts_up"] == serde_json::json!(["h0"])
    });
    assert!(up, "platform not ready: {ready}\n{}", m.journal(UNITS[1]));
}

/// Both units active.
fn assert_active(m: &Machine, why: &str) {
    for unit in UNITS {
        let state = m.unit_property(unit, "ActiveState");
        assert_eq!(state, "active", "{unit} {why}\n{}", m.journal(unit));
    }
}

fn check_status_schema(value: &Value) {
    let schema: Value = serde_json::from_str(STATUS).expect("schema parses");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\nin {value:#}");
}

/// `mitosis status --json` through the installed CLI.
fn status(m: &Machine) -> Value {
    let text = m.ok(&["mitosis", "status", "--json"]);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn deb_installs_on_a_fresh_machine_and_systemd_runs_its_units() {
    require_root_and_tools();
    let started = Instant::now();
    let scratch = Scratch::new("package");
    let deb = build_deb(&scratch.0);
    let built = started.elapsed();
    let root = machine_root();
    let fixtures = Path::new(MEMCHECK_BIN).parent().expect("the fixtures' dir");
    let mut m = Machine::boot(
        &root,
        "pkg",
        &[(&scratch.0, "/mnt/pkg"), (fixtures, "/mnt/fixtures")],
        &scratch.0,
    );
    let booted = started.elapsed();
    assert!(deb.is_file());

    // Installed with dpkg: its files and conffiles; the units known, neither enabled nor
    // started (docs/operations.md: set `listen` first).
    m.ok(&["dpkg", "-i", "/mnt/pkg/mitosis.deb"]);
    let files = m.ok(&["dpkg", "-L", "mitosis"]);
    for path in [
        "/usr/bin/mitosis",
        "/usr/bin/mitosisd",
        "/usr/bin/mitosis-stub",
        "/usr/bin/mitosis-init",
        "/usr/bin/mitosis-platform",
        "/usr/lib/systemd/system/mitosisd.service",
        "/usr/lib/systemd/system/mitosis-platform.service",
        "/usr/share/man/man8/mitosisd.8",
        "/usr/share/doc/mitosis/operations.md",
    ] {
        assert!(files.lines().any(|l| l == path), "{path} not in:\n{files}");
    }
    let conffiles = m.ok(&["dpkg-query", "-W", "-f=${Conffiles}", "mitosis"]);
    assert!(
        conffiles.contains("/etc/mitosis/mitosisd.toml"),
        "{conffiles}"
    );
    assert!(
        conffiles.contains("/etc/mitosis/mitosis-platform.toml"),
        "{conffiles}"
    );
    for unit in UNITS {
        assert_eq!(m.unit_property(unit, "LoadState"), "loaded", "{unit}");
        assert_eq!(m.unit_property(unit, "UnitFileState"), "disabled", "{unit}");
        assert_eq!(m.unit_property(unit, "ActiveState"), "inactive", "{unit}");
    }

    // Enabled and started by systemd, with the default config files.
    m.ok(&["systemctl", "enable", "--now", UNITS[0], UNITS[1]]);
    assert_active(&m, "after enable --now");
    for unit in UNITS {
        assert_eq!(m.unit_property(unit, "UnitFileState"), "enabled", "{unit}");
    }
    assert_eq!(
        wait_ok(&m, "http://127.0.0.1:9464/healthz", UNITS[0]),
        "ok\n"
    );
    assert_eq!(
        wait_ok(&m, "http://127.0.0.1:9464/readyz", UNITS[0]),
        "ready\n"
    );
    wait_ok(&m, "http://127.0.0.1:8080/healthz", UNITS[1]);
    assert_platform_sees_its_host(&m);
    // The control socket's directory, the daemon's alone; the platform's state directory.
    assert_eq!(
        m.ok(&[
            "stat",
            "-c",
            "%a %U %G %F",
            "/run/mitosis",
            "/run/mitosis/mitosisd.sock"
        ]),
        "700 root root directory\n600 root root socket\n"
    );
    assert_eq!(
        m.ok(&["stat", "-c", "%a %U %F", "/var/lib/mitosis-platform"]),
        "700 root directory\n"
    );
    m.ok(&["test", "-s", "/var/lib/mitosis-platform/platform.db"]);
    let st = status(&m);
    check_status_schema(&st);
    assert_eq!(st["listen"], "127.0.0.1:7070", "{st}");

    // A program prepared and resumed through the installed daemon: the memcheck fixture,
    // started in the machine (by nsenter, outside the units), its copy checks every page.
    let seed_cmd = m.command(&[
        "sh",
        "-c",
        "mkdir -p /tmp/seed && exec /mnt/fixtures/memcheck /tmp/seed",
    ]);
    let mut seed = Seed::start(seed_cmd);
    let seed_pid = *processes_with_parent(seed.child.id())
        .first()
        .expect("memcheck under nsenter");
    let pid = m.inner_pid(seed_pid).to_string();
    m.ok(&[
        "mitosis",
        "prepare",
        "--pid",
        &pid,
        "--output",
        "/root/seed.handle",
    ]);
    assert_eq!(status(&m)["seeds"].as_array().map(Vec::len), Some(1));
    let out = m.run_with(
        &["mitosis", "resume", "--handle-file", "/root/seed.handle"],
        "verify\n",
    );
    assert_eq!(
        (stdout(&out), out.status.code()),
        (format!("ok 11 {MEMCHECK_DIGEST}\n"), Some(0)),
        "resume: {}\n{}",
        stderr(&out),
        m.journal(UNITS[0])
    );
    assert_eq!(
        seed.send("verify"),
        format!("ok 11 {MEMCHECK_DIGEST}"),
        "the seed runs on, intact"
    );
    m.ok(&["mitosis", "drop", "--handle-file", "/root/seed.handle"]);
    drop(seed);

    // kill -9 of the daemon: systemd starts it again (Restart=on-failure, RestartSec=2s).
    let old = m.unit_property(UNITS[0], "MainPID");
    m.ok(&["sh", "-c", &format!("kill -KILL {old}")]);
    let mut now = String::new();
    let restarted = m.wait_until(Duration::from_secs(20), || {
        let props = "--property=NRestarts,ActiveState,MainPID";
        now = m.ok(&["systemctl", "show", props, UNITS[0]]);
        let value = |key: &str| {
            now.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or("")
        };
        value("NRestarts") == "1"
            && value("ActiveState") == "active"
            && !["0", "", &old].contains(&value("MainPID"))
    });
    assert!(
        restarted,
        "no restart after kill -9: {now:?}\n{}",
        m.journal(UNITS[0])
    );
    assert_eq!(
        wait_ok(&m, "http://127.0.0.1:9464/readyz", UNITS[0]),
        "ready\n"
    );
    assert_eq!(status(&m)["seeds"], serde_json::json!([]));
    assert_platform_sees_its_host(&m);

    // A stop stops everything cleanly: both inactive (not failed), no mitosis process left,
    // the socket's directory gone.
    m.ok(&["systemctl", "stop", UNITS[1], UNITS[0]]);
    for unit in UNITS {
        let state = (
            m.unit_property(unit, "ActiveState"),
            m.unit_property(unit, "Result"),
        );
        assert_eq!(
            state,
            ("inactive".into(), "success".into()),
            "{}",
            m.journal(unit)
        );
    }
    for name in ["mitosisd", "mitosis-stub", "mitosis-platform"] {
        assert_eq!(m.processes_of(name), Vec::<i32>::new(), "{name} after stop");
    }
    m.ok(&["test", "!", "-e", "/run/mitosis"]);

    // Enabled: the system's own target starts both again (as at boot).
    m.ok(&["systemctl", "start", "multi-user.target"]);
    assert_active(&m, "wanted by multi-user.target");
    assert_eq!(
        wait_ok(&m, "http://127.0.0.1:9464/readyz", UNITS[0]),
        "ready\n"
    );

    let tested = started.elapsed();
    assert!(m.poweroff(), "no clean poweroff\n{}", m.console_tail());
    assert!(
        !root.join("usr/bin/mitosisd").exists(),
        "the machine's tree is left as it was"
    );
    eprintln!(
        "package: built in {built:.1?}, machine up at {booted:.1?}, tested at {tested:.1?}, \
         off at {:.1?}",
        started.elapsed()
    );
}

#[test]
fn cargo_install_path_installs_the_cli() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
    let root = Scratch::new("cargo-install");
    // --debug and this target dir: the test's own build cache (a release build from scratch
    // would take minutes); otherwise what docs/operations.md says to run.
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    cmd.current_dir(repo())
        .args([
            "install",
            "--locked",
            "--debug",
            "--path",
            "crates/mitosis-cli",
            "--root",
        ])
        .arg(&root.0)
        .env("CARGO_TARGET_DIR", target_dir());
    let cargo = cargo_lock();
    run_ok(cmd, "cargo install --path crates/mitosis-cli");
    drop(cargo);
    let cli = root.0.join("bin/mitosis");
    let out = Command::new(&cli)
        .arg("--version")
        .output()
        .expect("mitosis runs");
    assert_eq!(
        stdout(&out),
        format!("mitosis {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(&cli)
        .args(["status", "--json", "--socket", "/nonexistent/mitosisd.sock"])
        .output()
        .expect("mitosis runs");
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
}
