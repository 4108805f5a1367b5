//! `mitosis-demo`, the README's main command, end to end (as root): a short run answers every
//! call and says which host ran each, and SIGINT still tears its testbed down.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BUNDLE: &str = "/var/lib/mitosis/bundles/python";

fn demo(args: &[&str]) -> Child {
    assert!(
        Path::new(BUNDLE).join("config.json").exists(),
        "{BUNDLE} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    Command::new(bin("mitosis-demo"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mitosis-demo")
}

/// Sends `sig` to `child`.
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Waits for `child` up to `limit`; past it, SIGINT (so it tears down), then SIGKILL.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String, String) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if !interrupted && start.elapsed() > limit {
            signal(&child, libc::SIGINT);
            interrupted = true;
        }
        if start.elapsed() > limit + Duration::from_secs(20) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!interrupted, "mitosis-demo ran past {limit:?}");
    (
        status.code(),
        reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}

/// The network namespaces of testbed `id` that still exist.
fn namespaces_of(id: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(id))
        .map(str::to_owned)
        .collect()
}

/// The testbed id in the demo's `- testbed ID up in ...` line.
fn testbed_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("- testbed "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no testbed line in:\n{out}"))
        .to_owned()
}

#[test]
fn the_demo_answers_every_call_and_says_where_it_ran() {
    let child = demo(&["--calls", "4", "--clients", "2", "--cold", "2"]);
    let (code, out, err) = finish(child, Duration::from_secs(120));
    assert_eq!(code, Some(0), "mitosis-demo failed:\n{out}\n{err}");
    // One table line per call: number, client, body, host, latency, verdict.
    let calls: Vec<&str> = out
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 7 && f[0].parse::<usize>().is_ok() && f[1].parse::<usize>().is_ok()
        })
        .collect();
    assert_eq!(calls.len(), 4, "4 call lines expected:\n{out}");
    for line in &calls {
        let f: Vec<&str> = line.split_whitespace().collect();
        // `{"n":` `1}` are two fields, then the host.
        let host = f[4];
        assert!(
            host.starts_with('h') && host[1..].parse::<usize>().is_ok_and(|h| h < 3),
            "no host in {line:?}"
        );
        assert_eq!(f.last(), Some(&"ok"), "{line:?}");
    }
    assert!(out.contains("calls per host: h"), "{out}");
    assert!(out.contains("all 5 calls answered correctly"), "{out}");
    let id = testbed_id(&out);
    assert!(namespaces_of(&id).is_empty(), "testbed {id} left behind");
}

#[test]
fn sigint_tears_the_demo_down() {
    let mut child = demo(&["--calls", "2000", "--clients", "2", "--cold", "1"]);
    // Wait until the calls run, then interrupt.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains("concurrent clients") {
            break;
        }
    }
    assert!(
        seen.contains("concurrent clients"),
        "never got to the calls:\n{seen}"
    );
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, libc::SIGINT);
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        rest
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest = reader.join().unwrap();
    let err = err_reader.join().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "after SIGINT:\n{seen}{rest}\n{err}"
    );
    let id = testbed_id(&seen);
    assert!(namespaces_of(&id).is_empty(), "testbed {id} left behind");
}
