//! Starting and timing the processes the benchmark measures.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use mitosis_testbed::lines::LineServer as Server;
use mitosis_testbed::lines::read_all;
pub use mitosis_testbed::lines::run_timed;

/// How long any single answer may take before the benchmark gives up on it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command run to completion (prepare, drop, status, criu dump) may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// CPU time of every thread of `pid` so far, in ns (/proc/PID/task/*/schedstat: exact, where
/// /proc/PID/stat counts clock ticks); `None` if it is gone.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// Runs a command to completion; returns wall time, stdout and stderr, failing on a bad status
/// or after [`RUN_TIMEOUT`] (the command is then killed).
pub fn run_ok(mut cmd: Command) -> Result<(Duration, String, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    let stdout = read_all(child.stdout.take().expect("stdout is piped"));
    let stderr = read_all(child.stderr.take().expect("stderr is piped"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(status) => status.context("waiting for a command")?,
        Err(_) => {
            let _ = kill_and_wait_reaped(pid);
            bail!("{cmd:?} did not finish within {RUN_TIMEOUT:?} (killed)");
        }
    };
    let wall = t.elapsed();
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!("{cmd:?} failed ({status}):\n{}", stderr.trim_end());
    }
    Ok((wall, stdout, stderr))
}

/// The answer line with its `"pid": N` field removed, for comparing answers of different
/// processes.
pub fn without_pid(answer: &str) -> String {
    let key = "\"pid\":";
    let Some(start) = answer.find(key) else {
        return answer.to_owned();
    };
    let rest = answer[start + key.len()..].trim_start();
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let rest = rest[digits..].trim_start();
    let rest = rest.strip_prefix(',').map_or(rest, str::trim_start);
    format!("{}{}", &answer[..start], rest)
}

/// Whether `got` is the expected answer, pid aside.
pub fn same_answer(got: &str, want: &str) -> bool {
    !got.is_empty() && without_pid(got) == without_pid(want)
}

/// Whether `prog` can be run (is found on PATH or is a path that exists).
pub fn on_path(prog: &str) -> bool {
    if prog.contains('/') {
        return Path::new(prog).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(prog).is_file()))
}

/// The `"pid": N` of an answer line.
pub fn answer_pid(answer: &str) -> Option<u32> {
    let key = "\"pid\":";
    let rest = answer[answer.find(key)? + key.len()..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The private memory of process `pid` in KiB (`Private_Clean` + `Private_Dirty` of
/// /proc/PID/smaps_rollup): what it does not share with its parent, replica or anyone.
pub fn private_kib(pid: u32) -> Option<u64> {
    parse_private_kib(&fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

fn parse_private_kib(smaps_rollup: &str) -> Option<u64> {
    let mut total = None;
    for line in smaps_rollup.lines() {
        let Some(rest) = line
            .strip_prefix("Private_Clean:")
            .or_else(|| line.strip_prefix("Private_Dirty:"))
        else {
            continue;
        };
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        total = Some(total.unwrap_or(0) + kib);
    }
    total
}

/// Kills process `pid` (with `kill -KILL`) and waits until its parent has reaped it.
pub fn kill_and_wait_reaped(pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    let gone = || !Path::new(&format!("/proc/{pid}")).exists();
    if !status.success() && !gone() {
        bail!("kill -KILL {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone() {
        if Instant::now() > deadline {
            bail!("process {pid} was not reaped within 5 s of SIGKILL");
        }
        thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_ignored() {
        let a = r#"{"label": "label-05", "n": 5, "norm": 1.5, "pid": 23235, "sum": -2.5}"#;
        let b = r#"{"label": "label-05", "n": 5, "norm": 1.5, "pid": 7, "sum": -2.5}"#;
        assert!(same_answer(a, b));
        assert_eq!(
            without_pid(a),
            r#"{"label": "label-05", "n": 5, "norm": 1.5, "sum": -2.5}"#
        );
        assert!(!same_answer(&a.replace("-2.5", "-2.6"), b));
        assert!(!same_answer("", b));
        assert_eq!(answer_pid(a), Some(23235));
        assert_eq!(answer_pid(r#"{"n": 1, "pid":7}"#), Some(7));
        assert_eq!(answer_pid(r#"{"n": 1}"#), None);
    }

    #[test]
    fn private_memory() {
        let text = "00400000-7ffd1 ---p 00000000 00:00 0 [rollup]\nRss: 5000 kB\nPss: 3000 kB\nShared_Clean: 2000 kB\nShared_Dirty: 0 kB\nPrivate_Clean: 120 kB\nPrivate_Dirty: 2880 kB\nReferenced: 5000 kB\n";
        assert_eq!(parse_private_kib(text), Some(3000));
        assert_eq!(parse_private_kib("Rss: 1 kB\n"), None);
    }
}
