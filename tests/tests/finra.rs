//! The FINRA trade-validation workflow (examples/python/finra, docs/workflows.md) on three
//! hosts: a producer on host 0 loads market data and a portfolio, validators on hosts 1 and
//! 2 each run one audit rule over the whole table. Its state reaches them by remote fork
//! (children of `mitosis.fork_prepare()`), by pickle through Redis (a `redis-server` this
//! test starts in host 0) and by a pickle file; each way's verdicts must be the
//! single-process run's. A failing validator is reported (which one, and why) and nothing of
//! the workflow is left running.
//!
//! Needs root, Debian's redis-server and a python3 with pandas and redis
//! (scripts/setup.sh installs them): without them these tests fail, saying what is missing.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use mitosis_testbed::Testbed;
use mitosis_testbed::redis::Redis;
use serde_json::Value;

const DATA_MIB: &str = "4";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/finra/finra.py")
}

fn python_lib() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

/// The first of python3 and /usr/bin/python3 with pandas and redis, as its executable.
fn python() -> String {
    let mut tried = Vec::new();
    for p in ["python3", "/usr/bin/python3"] {
        let out = Command::new(p)
            .args(["-c", "import sys, pandas, redis; print(sys.executable)"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                return String::from_utf8_lossy(&o.stdout).trim().to_owned();
            }
            Ok(o) => tried.push(format!(
                "{p}: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )),
            Err(e) => tried.push(format!("{p}: {e}")),
        }
    }
    panic!(
        "NOT RUN: this test needs a python3 with pandas and redis ({}); \
         scripts/setup.sh installs python3-pandas and python3-redis",
        tried.join("; ")
    );
}

struct Workflow {
    tb: Testbed,
    python: String,
    redis: Option<Redis>,
    shared: Scratch,
}

impl Workflow {
    fn new() -> Workflow {
        let python = python();
        let tb = testbed(3);
        let redis = Redis::start("redis-server", tb.host(0), 6379, &tb.dir().join("redis"))
            .unwrap_or_else(|e| panic!("NOT RUN: starting Redis in host 0: {e}"));
        Workflow {
            tb,
            python,
            redis: Some(redis),
            shared: Scratch::new("finra"),
        }
    }

    fn sock(&self, h: usize) -> String {
        self.tb.host(h).socket_path().display().to_string()
    }

    fn netns(&self, h: usize) -> String {
        self.tb.host(h).netns_path().display().to_string()
    }

    /// finra.py `args` on host 0: status, its JSON lines, stderr.
    fn producer(&self, args: &[&str], validators: usize) -> (i32, Vec<Value>, String) {
        let host = self.tb.host(0);
        let mut cmd = host.command(&self.python);
        cmd.arg(script())
            .args(args)
            .args([
                "--data-mib",
                DATA_MIB,
                "--validators",
                &validators.to_string(),
            ])
            .env("PYTHONPATH", python_lib())
            .env("MITOSIS_SOCKET", host.socket_path())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = wait_output(cmd.spawn().expect("python3"), Duration::from_secs(300));
        let lines = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect();
        (
            mitosis_testbed::lines::shell_status(out.status),
            lines,
            stderr(&out),
        )
    }

    fn run(&self, method: &str, validators: usize, fail: &str) -> (i32, Vec<Value>, String) {
        let socks = format!("{},{}", self.sock(1), self.sock(2));
        let netns = format!("{},{}", self.netns(1), self.netns(2));
        let redis = self.redis.as_ref().expect("redis").addr().to_string();
        let shared = self.shared.0.display().to_string();
        let mut args = vec![
            "run",
            "--method",
            method,
            "--hosts",
            &socks,
            "--netns",
            &netns,
            "--redis",
            &redis,
            "--shared-dir",
            &shared,
            "--python",
            &self.python,
        ];
        if !fail.is_empty() {
            args.extend(["--fail", fail]);
        }
        self.producer(&args, validators)
    }

    /// Children host `h`'s daemon has started so far.
    fn children_started(&self, h: usize) -> u64 {
        mitosis_client::Client::connect(self.tb.host(h).socket_path())
            .and_then(|c| c.status())
            .expect("a daemon's status")
            .children_started
    }

    fn logs(&self) -> String {
        self.tb.hosts().iter().map(|h| h.daemon_log()).collect()
    }

    /// Nothing of the workflow runs any more: no seed, child or replica in any daemon, no
    /// Python process of this testbed, no file left in the shared directory.
    fn assert_nothing_left(&self) {
        let mut last = String::new();
        let clean = eventually(Duration::from_secs(15), || {
            let mut left = Vec::new();
            for h in self.tb.hosts() {
                let s = mitosis_client::Client::connect(h.socket_path())
                    .and_then(|c| c.status())
                    .expect("a daemon's status");
                if !s.seeds.is_empty() || s.children_running > 0 || !s.replicas.is_empty() {
                    left.push(format!(
                        "host {}: {} seeds, {} children running, {} replicas",
                        h.index(),
                        s.seeds.len(),
                        s.children_running,
                        s.replicas.len()
                    ));
                }
            }
            for pid in workflow_processes(self.tb.id()) {
                left.push(format!("finra.py process {pid} of this testbed"));
            }
            let files: Vec<_> = std::fs::read_dir(&self.shared.0)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            if !files.is_empty() {
                left.push(format!("shared files {files:?}"));
            }
            last = left.join("; ");
            left.is_empty()
        });
        assert!(clean, "left running: {last}\n{}", self.logs());
    }

    fn teardown(mut self) {
        let redis = self.redis.take().expect("redis");
        let pid = redis.pid().expect("redis runs") as i32;
        redis.stop();
        assert!(!alive(pid), "redis-server {pid} still runs");
        teardown(self.tb);
    }
}

/// Live processes started in testbed `id` (its marker in their environment) running
/// finra.py: producers, validators, and the children and replicas of a producer's seed.
fn workflow_processes(id: &str) -> Vec<i32> {
    let marker = format!("{}={id}", mitosis_testbed::TESTBED_ID_ENV);
    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    common::procfs::all_pids()
        .filter(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) && has(&cmdline, b"finra.py")
        })
        .filter(|pid| alive(*pid))
        .collect()
}

fn result(lines: &[Value]) -> &Value {
    lines
        .iter()
        .find(|l| l["role"] == "result" || l["role"] == "reference")
        .unwrap_or_else(|| panic!("no result line in {lines:?}"))
}

#[test]
fn finra_verdicts_by_remote_fork_redis_and_files_equal_a_single_process_run() {
    let w = Workflow::new();
    let n = 8;
    let (status, lines, err) = w.producer(&["reference"], n);
    assert_eq!(status, 0, "{err}");
    let reference = result(&lines);
    let digest = reference["report"]["digest"].as_str().expect("digest");
    // Every rule found something to report on the generated data (the planted anomalies).
    for (rule, flagged) in reference["report"]["flags_by_rule"].as_object().unwrap() {
        assert!(flagged.as_u64().unwrap() > 0, "{rule} flagged nothing");
    }
    for method in [
        "mitosis",
        "mitosis-staged",
        "mitosis-filled",
        "redis",
        "files",
    ] {
        let started_before = [w.children_started(1), w.children_started(2)];
        let (status, lines, err) = w.run(method, n, "");
        assert_eq!(status, 0, "{method}: {lines:?}\n{err}\n{}", w.logs());
        let r = result(&lines);
        assert_eq!(r["failures"], 0, "{method}: {lines:?}");
        assert_eq!(
            r["verdicts"], reference["verdicts"],
            "{method}'s verdicts differ from the single-process run's"
        );
        assert_eq!(r["report"]["digest"], digest, "{method}");
        assert_eq!(r["validators_detail"].as_array().unwrap().len(), n);
        if method.starts_with("mitosis") {
            // Its validators were children made by the daemons of hosts 1 and 2, half each.
            let started = [w.children_started(1), w.children_started(2)];
            assert_eq!(
                [
                    started[0] - started_before[0],
                    started[1] - started_before[1]
                ],
                [n as u64 / 2, n as u64 / 2],
                "{method}"
            );
        }
        eprintln!(
            "{method}: {} ms end to end, first validator at {} ms",
            r["total_ms"], r["first_start_ms"]
        );
        w.assert_nothing_left();
    }
    w.teardown();
}

#[test]
fn a_failing_validator_is_reported_with_its_reason_and_nothing_is_left_running() {
    let w = Workflow::new();
    for method in ["mitosis", "redis"] {
        let (status, lines, err) = w.run(method, 4, "1");
        assert_eq!(status, 3, "{method}: {lines:?}\n{err}\n{}", w.logs());
        let failed: Vec<&Value> = lines.iter().filter(|l| l["role"] == "failed").collect();
        assert_eq!(failed.len(), 1, "{method}: {lines:?}");
        let f = failed[0];
        assert_eq!(f["index"], 1, "{f}");
        assert_eq!(f["spec"], "missing_column:0");
        assert!(
            f["why"].as_str().unwrap().contains("exited with status 1"),
            "{f}"
        );
        assert!(
            f["error"].as_str().unwrap().contains("KeyError")
                && f["error"].as_str().unwrap().contains("settlement_date"),
            "{f}"
        );
        let r = result(&lines);
        assert_eq!(r["failures"], 1);
        assert!(r["report"].is_null(), "no report from a failed workflow");
        // The others ran to their verdicts.
        assert_eq!(r["validators_detail"].as_array().unwrap().len(), 3, "{r}");
        w.assert_nothing_left();
    }
    w.teardown();
}
