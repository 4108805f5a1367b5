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

/// A seed holding a MADV_DONTFORK range (as V8's heap is): a fork leaves it out, so prepare
/// must notice that its twin came out smaller and let the range through. The child on
/// another host reads the seed's bytes there, and the seed keeps the range marked.
#[test]
fn a_dont_fork_range_reaches_the_child() {
    const SEED: &str = r#"
import mmap, os
PAGES = 64
m = mmap.mmap(-1, PAGES * 4096)
for i in range(PAGES):
    m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
m.madvise(mmap.MADV_DONTFORK)
os.write(1, b"ready\n")
while True:
    if not os.read(0, 100):
        os._exit(0)
    os.write(1, b"sum %d pid %d\n" % (sum(m[::512]), os.getpid()))
"#;
    // Eight samples of every page, page i holding i + 1.
    let want = format!("sum {}", 8 * (1..=64).sum::<u64>());
    let tb = testbed(2);
    let mut cmd = tb.host(0).command("python3");
    cmd.args(["-c", SEED]);
    let mut seed = Seed::start(cmd);
    assert!(seed.send("x").starts_with(&want), "the seed's own answer");
    let handle = prepare(&tb, 0, seed.pid());

    let out = cli(&tb, 1, &["resume", &handle], "x\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        tb.host(1).daemon_log()
    );
    let answer = stdout(&out);
    assert!(answer.starts_with(&want), "child answered {answer:?}");
    assert!(!answer.contains(&format!("pid {}\n", seed.pid())));
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", seed.pid())).unwrap();
    assert!(
        smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" dc")),
        "the seed's range is still MADV_DONTFORK"
    );
    assert!(seed.send("x").starts_with(&want), "the seed runs on");
    drop(seed);
    teardown(tb);
}
