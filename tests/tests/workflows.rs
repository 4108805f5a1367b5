//! Functions that fork from inside themselves (`mitosis.fork_prepare`, docs/workflows.md):
//! the call returns twice with the right values, children see the parent's memory at the
//! prepare point while the parent changes it, and a chain of generations crosses hosts.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::*;
use mitosis_testbed::Testbed;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/workflow_fn.py")
}

fn python_lib() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

/// Runs the workflow on host `on` (its daemon is `MITOSIS_SOCKET`) with `args`.
fn workflow(tb: &Testbed, on: usize, args: &[String]) -> Output {
    let mut cmd = tb.host(on).command("python3");
    cmd.arg(script())
        .args(args)
        .env("PYTHONPATH", python_lib())
        .env("MITOSIS_SOCKET", tb.host(on).socket_path())
        .stdin(std::process::Stdio::null());
    cmd.output().expect("python3")
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn logs(tb: &Testbed) -> String {
    tb.hosts().iter().map(|h| h.daemon_log()).collect()
}

fn sock(tb: &Testbed, host: usize) -> String {
    tb.host(host).socket_path().display().to_string()
}

#[test]
fn fork_prepare_returns_twice_and_children_see_the_prepare_point() {
    let tb = testbed(2);
    // The program prepares itself under a profile: its second run starts with what the
    // first run's children touched, and its children see the same.
    for run in 0..2 {
        let parent = fanout_checked(&tb);
        let carried = parent["carried"].as_u64().expect("carried");
        match run {
            0 => assert_eq!(carried, 0, "a profile never used: {parent}"),
            _ => assert!(carried > 50, "the second run carried {carried} pages"),
        }
    }
    teardown(tb);
}

/// Runs the fanout workflow on host 0 with children on hosts 1, 0 and 1, checks what the
/// parent and each child saw, and returns the parent's line.
fn fanout_checked(tb: &Testbed) -> serde_json::Value {
    let out = workflow(
        tb,
        0,
        &["fanout".into(), sock(tb, 0), sock(tb, 1), sock(tb, 0)],
    );
    let all = lines(&out);
    assert!(
        out.status.success(),
        "{all:?}\n{}\n{}",
        stderr(&out),
        logs(tb)
    );
    let parent = all
        .iter()
        .find(|l| l["role"] == "parent")
        .expect("parent line");
    // The parent returned as a parent and ran on, changing its memory.
    assert_eq!(parent["counter_gt"], true);
    assert_eq!(parent["blob_changed"], true);
    let results: Vec<_> = all.iter().filter(|l| l["role"] == "result").collect();
    assert_eq!(results.len(), 3);
    let mut digests = Vec::new();
    let mut draws = Vec::new();
    for (i, r) in results.iter().enumerate() {
        // Each child exits with its index: the status comes back like a subprocess's.
        assert_eq!(r["index"], i as u64);
        assert_eq!(r["returncode"], i as i64, "{r}");
        let child: serde_json::Value =
            serde_json::from_str(r["stdout"].as_str().unwrap().trim()).expect("child line");
        assert_eq!(child["role"], "child");
        assert_eq!(child["index"], i as u64);
        assert_eq!(child["arg"], format!("job-{i}"));
        // The prepare point: none of the parent's later writes.
        assert_eq!(child["counter"], 1, "{child}");
        assert_eq!(child["words"], serde_json::json!(["before"]));
        assert_eq!(child["blob_ok"], true, "{child}");
        digests.push(child["digest"].clone());
        draws.push(child["random"].as_f64().expect("a draw").to_bits());
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    // `random` is reseeded in each child, as after os.fork: no two draw the same number, nor
    // the number the parent drew next.
    draws.push(parent["random"].as_f64().expect("a draw").to_bits());
    let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
    assert_eq!(distinct.len(), draws.len(), "{all:?}");
    parent.clone()
}

#[test]
fn outside_a_mitosis_host_fork_prepare_raises_and_the_program_runs_on() {
    let tb = testbed(1);
    let out = workflow(
        &tb,
        0,
        &["nohost".into(), "/nonexistent/mitosisd.sock".into()],
    );
    let all = lines(&out);
    assert!(out.status.success(), "{all:?} {}", stderr(&out));
    assert!(
        all[0]["error"]
            .as_str()
            .unwrap()
            .contains("not on a mitosis host")
    );
    assert_eq!(all[1]["role"], "ran-on");
    teardown(tb);
}

/// A -> B -> C -> A: each generation is prepared again (flattened first) on the host its
/// parent sent it to, sees its parent's memory at its parent's prepare point (not what the
/// parent wrote after), and sends the next one on.
#[test]
fn a_three_generation_chain_crosses_three_hosts() {
    let tb = testbed(3);
    let out = workflow(
        &tb,
        0,
        &["chain".into(), sock(&tb, 1), sock(&tb, 2), sock(&tb, 0)],
    );
    let all = lines(&out);
    assert!(
        out.status.success(),
        "{all:?}\n{}\n{}",
        stderr(&out),
        logs(&tb)
    );
    let children: Vec<_> = all.iter().filter(|l| l["role"] == "child").collect();
    assert_eq!(children.len(), 3, "{all:?}");
    for (i, c) in children.iter().enumerate() {
        let generation = i + 1;
        assert_eq!(c["gen"], generation as u64);
        assert_eq!(c["arg"], format!("to-gen{generation}"));
        assert_eq!(c["sees_parent"], true, "{c}");
        let history: Vec<String> = (0..generation).map(|g| format!("gen{g}")).collect();
        assert_eq!(c["history"], serde_json::json!(history));
        // Made by host (gen mod 3)'s daemon, and told so.
        assert_eq!(c["socket"], sock(&tb, generation % 3));
    }
    let parents: Vec<_> = all.iter().filter(|l| l["role"] == "parent").collect();
    assert_eq!(parents.len(), 3);
    for p in &parents {
        assert_eq!(p["child_status"], 0, "{p}");
        eprintln!("generation {} prepared in {} ms", p["gen"], p["prepare_ms"]);
    }
    let log = logs(&tb);
    let flattened = log
        .lines()
        .filter(|l| l.contains("flattened a child"))
        .count();
    assert_eq!(flattened, 2, "generations 1 and 2 are flattened:\n{log}");
    for l in log.lines().filter(|l| l.contains("flattened a child")) {
        eprintln!("{l}");
    }
    teardown(tb);
}

/// A process a child forked takes its memory through a handler that cannot flatten it: its
/// fork_prepare is refused with a line that says so, and it runs on.
#[test]
fn a_process_a_child_forked_cannot_be_prepared_and_says_why() {
    let tb = testbed(2);
    let out = workflow(&tb, 0, &["forked".into(), sock(&tb, 1)]);
    let all = lines(&out);
    assert!(
        out.status.success(),
        "{all:?}\n{}\n{}",
        stderr(&out),
        logs(&tb)
    );
    let g = all
        .iter()
        .find(|l| l["role"] == "grandchild")
        .expect("grandchild line");
    let refused = g["refused"].as_str().unwrap_or_else(|| panic!("{g}"));
    assert!(refused.contains("multi-hop is unavailable"), "{refused}");
    assert_eq!(g["kind"], "Unsupported");
    let c = all
        .iter()
        .find(|l| l["role"] == "child")
        .expect("child line");
    assert_eq!(c["grandchild_status"], 0);
    teardown(tb);
}

/// The library's side of the platform's channel (docs/workflows.md, "On the platform"), with
/// this test's Python standing for the platform: a socket at fd 3 without the greeting is not
/// the platform's; with it, `fork_prepare` asks there, returns the token in the parent,
/// refuses `resume()` on it and reports the platform's refusal of a second prepare.
#[test]
fn the_python_library_prepares_through_the_platforms_channel_when_it_has_one() {
    const SCRIPT: &str = r#"
import json, os, socket, threading
import mitosis
out = {}
os.open("/dev/null", os.O_RDONLY)  # fd 3 taken first: the pair lands above it
mine, platform = socket.socketpair()
os.dup2(mine.fileno(), 3)
mine.close()
out["without_greeting"] = mitosis.on_platform()
platform.sendall(b"MITOSIS-PLATFORM 1\n")

def line():
    got = b""
    while not got.endswith(b"\n"):
        got += platform.recv(1)
    return got.decode()

def serve():
    out["asked"] = line()
    platform.sendall(b"PREPARED load/0\n")
    out["asked_again"] = line()
    platform.sendall(b"ERROR Unsupported a stage's process prepares itself once\n")

served = threading.Thread(target=serve)
served.start()
h = mitosis.fork_prepare()
out["parent"] = [h.is_child, h.handle, h.on_platform]
out["fd3_taken"] = not os.path.exists("/proc/self/fd/3")
try:
    mitosis.resume(h)
except mitosis.MitosisError as e:
    out["resume"] = str(e)
try:
    mitosis.fork_prepare()
except mitosis.DaemonError as e:
    out["again"] = [e.kind, e.message]
served.join()
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", python_lib())
        .env("MITOSIS_SOCKET", "/nonexistent/mitosisd.sock")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", stderr(&out));
    let all = lines(&out);
    let v = &all[0];
    assert_eq!(v["without_greeting"], false, "{v}");
    assert_eq!(v["asked"], "PREPARE\n");
    assert_eq!(v["parent"], serde_json::json!([false, "load/0", true]));
    assert_eq!(v["fd3_taken"], true, "{v}");
    assert!(
        v["resume"]
            .as_str()
            .unwrap()
            .contains("prepared through the platform"),
        "{v}"
    );
    assert_eq!(v["asked_again"], "PREPARE\n");
    assert_eq!(
        v["again"],
        serde_json::json!(["Unsupported", "a stage's process prepares itself once"])
    );
}
