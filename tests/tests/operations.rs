//! Operating mitosis (docs/operations.md): `--json` output checked against docs/schemas/, the
//! exit code of each kind of failure, `/healthz` and `/readyz` of a daemon and of the
//! platform, and `--config` files. Needs root.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::metrics::METRICS;
use common::*;
use serde_json::Value;

fn check(schema: &str, value: &Value) {
    let schema: Value = serde_json::from_str(schema).expect("schema parses");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\nin {value:#}");
}

const STATUS: &str = include_str!("../../docs/schemas/status.schema.json");
const INSPECT: &str = include_str!("../../docs/schemas/inspect.schema.json");
const PREPARE: &str = include_str!("../../docs/schemas/prepare.schema.json");
const RESUME_STATS: &str = include_str!("../../docs/schemas/resume-stats.schema.json");
const ERROR: &str = include_str!("../../docs/schemas/error.schema.json");

fn json_of(text: &str) -> Value {
    let line = text.trim_end().lines().last().expect("a line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `GET path` from inside `host`'s namespace: the status code and body.
fn curl(tb: &mitosis_testbed::Testbed, host: usize, path: &str) -> (String, String) {
    let out = tb
        .host(host)
        .command("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg(format!("http://{METRICS}{path}"))
        .output()
        .expect("curl runs");
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').expect("a code");
    (code.to_string(), body.to_string())
}

/// A failure with `--json`: its exit code and kind, its stderr a schema-valid error object.
fn assert_fails(out: &std::process::Output, code: i32, kind: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", stderr(out));
    let err = json_of(&stderr(out));
    check(ERROR, &err);
    assert_eq!(err["error"]["kind"], kind, "{err}");
    assert_eq!(err["error"]["exit"], code);
}

#[test]
fn json_output_fits_the_schemas_and_each_failure_has_its_code() {
    let tb = testbed_with(2, &["--metrics", METRICS]);
    assert_eq!(curl(&tb, 0, "/healthz"), ("200".into(), "ok\n".into()));
    assert_eq!(curl(&tb, 1, "/readyz"), ("200".into(), "ready\n".into()));

    let (dir, _seed, handle) = prepared_memcheck(&tb, "operations");
    let status = json_of(&stdout(&cli(&tb, 0, &["status", "--json"], "")));
    check(STATUS, &status);
    assert_eq!(status["seeds"].as_array().unwrap().len(), 1, "{status}");

    let out = cli(&tb, 1, &["inspect", "--json", &handle], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let inspected = json_of(&stdout(&out));
    check(INSPECT, &inspected);
    let id: u64 = handle.split('/').nth(3).unwrap().parse().unwrap();
    assert_eq!(inspected["seed_id"], id);
    let key = handle.rsplit('/').next().unwrap();
    assert!(!stdout(&out).contains(key), "the key stays out of inspect");

    let out = cli(
        &tb,
        1,
        &["resume", "--stats", "--json", &handle],
        "verify\n",
    );
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
    let stats = json_of(&stderr(&out));
    check(RESUME_STATS, &stats);
    assert_eq!(
        (stats["exit"].as_u64(), stats["killed"].is_null()),
        (Some(0), true)
    );
    assert_eq!(stats["stats"]["cached"], 0, "the first child here is cold");

    // A second seed, prepared with --json.
    let other = memcheck_seed(&tb, 0, &dir.0);
    let pid = other.pid().to_string();
    let out = cli(&tb, 0, &["prepare", "--json", "--pid", &pid], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let prepared = json_of(&stdout(&out));
    check(PREPARE, &prepared);
    assert!(
        prepared["handle"]
            .as_str()
            .unwrap()
            .starts_with("mitosis://")
    );

    // Each kind of failure, its own code.
    let last = if handle.ends_with('0') { "1" } else { "0" };
    let wrong_key = format!("{}{last}", &handle[..handle.len() - 1]);
    assert_fails(
        &cli(&tb, 1, &["inspect", "--json", &wrong_key], ""),
        77,
        "denied",
    );
    assert_fails(
        &cli(&tb, 1, &["inspect", "--json", "mitosis://x"], ""),
        65,
        "bad_input",
    );
    assert_fails(
        &cli(&tb, 0, &["prepare", "--json", "--pid", "999999"], ""),
        66,
        "no_such_process",
    );
    let out = cli(
        &tb,
        1,
        &["status", "--json", "--socket", "/nonexistent/mitosisd.sock"],
        "",
    );
    assert_fails(&out, 69, "daemon_unreachable");
    assert_fails(&cli(&tb, 1, &["inspect", "--json"], ""), 64, "usage");
    // Clap's own usage errors: 64 too.
    assert_eq!(
        cli(&tb, 1, &["resume", "--bogus"], "").status.code(),
        Some(64)
    );
    assert!(cli(&tb, 0, &["drop", &handle], "").status.success());
    let out = cli(
        &tb,
        1,
        &["resume", "--stats", "--json", &handle],
        "verify\n",
    );
    assert_fails(&out, 67, "seed_gone");
    assert_eq!(stdout(&out), "", "the child never ran");
    teardown(tb);
}

/// `GET path` from `addr` in this namespace: the status code and body.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.get(9..12)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
}

#[test]
fn config_files_set_flags_and_malformed_ones_stop_before_anything_starts() {
    let dir = Scratch::new("config");
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let socket = dir.0.join("never").join("mitosisd.sock");
    let bad = write(
        "bad.toml",
        &format!("listen = \"127.0.0.1:0\"\nsocket = {socket:?}\nstub-pool = \"two\"\n"),
    );
    let out = Command::new(bin("mitosisd"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("line 3, key `stub-pool`"), "{err}");
    assert!(!socket.parent().unwrap().exists(), "nothing started");
    let unknown = write("unknown.toml", "listen = \"127.0.0.1:0\"\nstubpool = 2\n");
    let out = Command::new(bin("mitosisd"))
        .arg("--config")
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("key `stubpool`: unknown field"),
        "{}",
        stderr(&out)
    );

    // The platform over a daemon, everything from its file: live, then ready once polled.
    let tb = testbed(1);
    let api = "127.0.0.1:18093";
    let config = write(
        "platform.toml",
        &format!(
            "host = [\"h0={}\"]\napi = \"{api}\"\npolicy = \"remote-fork\"\n",
            tb.host(0).socket_path().display()
        ),
    );
    let bad = write(
        "platform-bad.toml",
        "api = \"127.0.0.1:18094\"\nhosts = 3\n",
    );
    let out = Command::new(bin("mitosis-platform"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("line 2, key `hosts`: unknown field"),
        "{}",
        stderr(&out)
    );

    let mut platform = Command::new(bin("mitosis-platform"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let live = eventually(Duration::from_secs(10), || {
        get(api, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    let ready = eventually(Duration::from_secs(10), || {
        get(api, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let (_, body) = get(api, "/readyz").unwrap_or_default();
    // SAFETY: kill(2) with our child's pid and SIGTERM.
    unsafe { libc::kill(platform.id() as i32, libc::SIGTERM) };
    let _ = platform.wait();
    assert!(live, "the platform's /healthz never answered");
    assert!(ready, "the platform never got ready: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["hosts_up"], serde_json::json!(["h0"]));
    teardown(tb);
}
