//! Starting and timing the processes the benchmark measures.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long any single answer may take before the benchmark gives up on it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The lines of a child's stdout, read on a thread so that waiting can time out.
pub struct Lines {
    rx: Receiver<std::io::Result<String>>,
}

impl Lines {
    pub fn new(stdout: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                let result = reader.read_line(&mut line).map(|_| line);
                let done = !matches!(&result, Ok(l) if !l.is_empty());
                if tx.send(result).is_err() || done {
                    break;
                }
            }
        });
        Self { rx }
    }

    /// The next line without its newline; `None` at EOF.
    pub fn next(&self, what: &str) -> Result<Option<String>> {
        match self.rx.recv_timeout(STEP_TIMEOUT) {
            Ok(Ok(line)) if line.is_empty() => Ok(None),
            Ok(Ok(line)) => Ok(Some(line.trim_end_matches('\n').to_owned())),
            Ok(Err(err)) => Err(anyhow!("reading from {what}: {err}")),
            Err(RecvTimeoutError::Timeout) => {
                bail!("no output from {what} within {STEP_TIMEOUT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => Ok(None),
        }
    }
}

/// A long-running `seed_fn.py` (a seed or a fork server); killed when dropped.
pub struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines,
    /// Time from spawn to the `ready` line.
    pub startup: Duration,
}

impl Server {
    /// Spawns `cmd` (stdin and stdout are made pipes) and waits for its `ready` line.
    pub fn start(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let t = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let stdin = child.stdin.take();
        let lines = Lines::new(child.stdout.take().expect("stdout is piped"));
        let mut server = Self {
            child,
            stdin,
            lines,
            startup: Duration::ZERO,
        };
        match server.lines.next("a seed")? {
            Some(line) if line == "ready" => {
                server.startup = t.elapsed();
                Ok(server)
            }
            other => {
                server.kill();
                bail!("{cmd:?} did not print `ready` (got {other:?})")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes a request line; returns the time until the answer line arrived, and that line.
    pub fn request(&mut self, request: &str) -> Result<(Duration, String)> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the server's stdin is closed")?;
        let t = Instant::now();
        stdin
            .write_all(format!("{request}\n").as_bytes())
            .context("writing a request")?;
        let answer = self
            .lines
            .next("the fork server")?
            .context("the fork server exited")?;
        Ok((t.elapsed(), answer))
    }

    pub fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One run of a command that answers one request.
pub struct Run {
    /// From spawn to the first line of output.
    pub latency: Duration,
    /// That line (empty if there was none).
    pub answer: String,
    /// Shell-style exit status.
    pub status: i32,
    pub stderr: String,
}

/// Spawns `cmd` with `input` (plus a newline) as its whole stdin, and times it until its
/// first line of output.
pub fn run_timed(mut cmd: Command, input: &str) -> Result<Run> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The child may die before reading; its status tells why.
    let _ = stdin.write_all(format!("{input}\n").as_bytes());
    drop(stdin);
    let lines = Lines::new(child.stdout.take().expect("stdout is piped"));
    let first = match lines.next("a child") {
        Ok(line) => line,
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
    };
    let latency = t.elapsed();
    while let Ok(Some(_)) = lines.next("a child") {}
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait().context("waiting for a child")?;
    Ok(Run {
        latency,
        answer: first.unwrap_or_default(),
        status: shell_status(status),
        stderr,
    })
}

/// 128 + N for a child killed by signal N, else the exit code.
pub fn shell_status(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs a command to completion; returns wall time, stdout and stderr, failing on a bad status.
pub fn run_ok(mut cmd: Command) -> Result<(Duration, String, String)> {
    cmd.stdin(Stdio::null());
    let t = Instant::now();
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let wall = t.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!("{cmd:?} failed ({}):\n{}", output.status, stderr.trim_end());
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
    }
}
