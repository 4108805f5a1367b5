//! End to end with a real runtime: a warmed numpy function, children on another host.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

fn seed_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/seed_fn.py")
}

/// The answer without its `pid` field, which differs per process.
fn without_pid(answer: &str) -> (String, Option<i64>) {
    let at = answer
        .find(", \"pid\": ")
        .unwrap_or_else(|| panic!("no pid in {answer:?}"));
    let pid = answer[at + 9..].trim_end_matches(['}', '\n']).parse().ok();
    (answer[..at].to_string(), pid)
}

/// What a cold run of the same function answers.
fn cold_answer(request: &str) -> String {
    let mut child = Command::new("python3")
        .arg(seed_script())
        .arg("--once")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    without_pid(text.lines().last().expect("an answer")).0
}

#[test]
fn numpy_children_on_another_host_answer_like_the_function() {
    let tb = testbed(2);
    let mut cmd = tb.host(0).command("python3");
    cmd.arg(seed_script());
    let seed = Seed::start(cmd);
    let handle = prepare(&tb, 0, seed.pid());

    for n in [0, 3, 17, 41, 3, 99, 7, 250] {
        let request = format!("{{\"n\": {n}}}\n");
        let out = cli(&tb, 1, &["resume", &handle], &request);
        assert_eq!(
            out.status.code(),
            Some(0),
            "n={n}: {}\n{}",
            stderr(&out),
            tb.host(1).daemon_log()
        );
        let text = stdout(&out);
        let (answer, pid) = without_pid(text.trim_end());
        assert_eq!(answer, cold_answer(&request), "n={n}");
        assert_ne!(pid, Some(seed.pid() as i64), "the child is its own process");
    }
    drop(seed);
    teardown(tb);
}
