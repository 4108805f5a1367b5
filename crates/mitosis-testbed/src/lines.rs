//! Processes that speak the seeds' line protocol (examples/python/seedlib.py): a line
//! `ready` once warm, then one answer line per request line. The demo and the benchmark drive
//! seeds, fork servers, cold starts and `mitosis resume` through these.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single line may take before the reader gives up on it.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong talking to a line-protocol process.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("spawning {command}: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("{command} did not print `ready` (got {got:?})")]
    NotReady {
        command: String,
        got: Option<String>,
    },
    #[error("reading from {what}: {source}")]
    Read { what: String, source: io::Error },
    #[error("no output from {what} within {LINE_TIMEOUT:?}")]
    Timeout { what: String },
    #[error("{what} exited")]
    Exited { what: String },
    #[error("writing a request: {0}")]
    Write(io::Error),
    #[error("waiting for a child: {0}")]
    Wait(io::Error),
}

/// The lines of a child's stdout, read on a thread so that waiting can time out.
pub struct Lines {
    rx: Receiver<io::Result<String>>,
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

    /// The next line without its newline; `None` at EOF. `what` names the process in errors.
    pub fn next(&self, what: &str) -> Result<Option<String>, LineError> {
        match self.rx.recv_timeout(LINE_TIMEOUT) {
            Ok(Ok(line)) if line.is_empty() => Ok(None),
            Ok(Ok(line)) => Ok(Some(line.trim_end_matches('\n').to_owned())),
            Ok(Err(source)) => Err(LineError::Read {
                what: what.to_owned(),
                source,
            }),
            Err(RecvTimeoutError::Timeout) => Err(LineError::Timeout {
                what: what.to_owned(),
            }),
            Err(RecvTimeoutError::Disconnected) => Ok(None),
        }
    }
}

/// A long-running seed or fork server; killed when dropped.
pub struct LineServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines,
    /// Time from spawn to the `ready` line.
    pub startup: Duration,
}

impl LineServer {
    /// Spawns `cmd` (stdin and stdout become pipes) and waits for its `ready` line.
    pub fn start(mut cmd: Command) -> Result<Self, LineError> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let t = Instant::now();
        let command = format!("{cmd:?}");
        let mut child = cmd.spawn().map_err(|source| LineError::Spawn {
            command: command.clone(),
            source,
        })?;
        let stdin = child.stdin.take();
        let lines = Lines::new(child.stdout.take().expect("stdout is piped"));
        let mut server = Self {
            child,
            stdin,
            lines,
            startup: Duration::ZERO,
        };
        match server.lines.next("the seed") {
            Ok(Some(line)) if line == "ready" => {
                server.startup = t.elapsed();
                Ok(server)
            }
            Ok(got) => {
                server.kill();
                Err(LineError::NotReady { command, got })
            }
            Err(e) => {
                server.kill();
                Err(e)
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes a request line; returns the time until the answer line arrived, and that line.
    pub fn request(&mut self, request: &str) -> Result<(Duration, String), LineError> {
        let t = Instant::now();
        self.send(request)?;
        let answer = self.answer()?;
        Ok((t.elapsed(), answer))
    }

    /// Writes a request line without waiting for its answer.
    pub fn send(&mut self, request: &str) -> Result<(), LineError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            LineError::Write(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the server's stdin is closed",
            ))
        })?;
        stdin
            .write_all(format!("{request}\n").as_bytes())
            .map_err(LineError::Write)
    }

    /// The next answer line.
    pub fn answer(&mut self) -> Result<String, LineError> {
        self.lines
            .next("the server")?
            .ok_or_else(|| LineError::Exited {
                what: "the server".to_owned(),
            })
    }

    pub fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LineServer {
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

/// Spawns `cmd` with `input` (plus a newline) on its stdin, and times it until its first line
/// of output; its stdin is then closed and it runs to its end.
pub fn run_timed(cmd: Command, input: &str) -> Result<Run, LineError> {
    run_probed(cmd, input, |_| ()).map(|(run, ())| run)
}

/// Like [`run_timed`], but while the child still has its stdin open (a seed then waits for
/// its next request), `probe` looks at it, given the answer line.
pub fn run_probed<T>(
    mut cmd: Command,
    input: &str,
    probe: impl FnOnce(&str) -> T,
) -> Result<(Run, T), LineError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|source| LineError::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The child may die before reading; its status tells why.
    let _ = stdin.write_all(format!("{input}\n").as_bytes());
    let lines = Lines::new(child.stdout.take().expect("stdout is piped"));
    // Read stderr on the side, so a chatty child never blocks on it.
    let stderr_reader = read_all(child.stderr.take().expect("stderr is piped"));
    let first = match lines.next("a child") {
        Ok(line) => line,
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
    };
    let latency = t.elapsed();
    let answer = first.unwrap_or_default();
    let probed = probe(&answer);
    drop(stdin);
    // The rest of its output, up to its end; one that hangs on is killed (and fails).
    loop {
        match lines.next("a child") {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().map_err(LineError::Wait)?;
    let stderr = stderr_reader.join().unwrap_or_default();
    Ok((
        Run {
            latency,
            answer,
            status: shell_status(status),
            stderr,
        },
        probed,
    ))
}

/// 128 + N for a child killed by signal N, else the exit code.
pub fn shell_status(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Reads a pipe to its end on a thread.
pub fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn a_server_answers_line_by_line_and_is_killed_when_dropped() {
        let mut server =
            LineServer::start(sh("echo ready; while read l; do echo \"got $l\"; done")).unwrap();
        let pid = server.pid();
        assert_eq!(server.request("a").unwrap().1, "got a");
        server.send("b").unwrap();
        server.send("c").unwrap();
        assert_eq!(server.answer().unwrap(), "got b");
        assert_eq!(server.answer().unwrap(), "got c");
        drop(server);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_timed_run_reports_its_answer_status_and_stderr() {
        let run = run_timed(sh("read l; echo \"re $l\"; echo oops >&2; exit 3"), "q").unwrap();
        assert_eq!(run.answer, "re q");
        assert_eq!(run.status, 3);
        assert_eq!(run.stderr, "oops\n");
        let killed = run_timed(sh("kill -9 $$"), "").unwrap();
        assert_eq!((killed.answer.as_str(), killed.status), ("", 137));
    }

    #[test]
    fn a_server_that_is_not_ready_or_exits_is_an_error() {
        let not_ready = LineServer::start(sh("echo hello")).err().unwrap();
        assert!(matches!(not_ready, LineError::NotReady { got: Some(ref g), .. } if g == "hello"));
        let mut server = LineServer::start(sh("echo ready; read l")).unwrap();
        server.send("x").unwrap();
        assert!(matches!(server.answer(), Err(LineError::Exited { .. })));
    }
}
