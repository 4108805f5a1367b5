//! A running `mitosis resume` driven line by line: its stdin held by the test, its stdout
//! read with a timeout, failures reported with the child's threads and the daemon's log.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Output};
use std::sync::mpsc;
use std::time::Duration;

use mitosis_testbed::Testbed;

use super::procfs::threads_report;
use super::{eventually, spawn_cli, stderr, wait_output};

/// How long a child (or seed) may take for one answer line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// `mitosis resume` running on a host: its stdin held by the test, its stdout read line by
/// line with a timeout. Killed (and its stdin closed, so the child sees EOF) if dropped
/// before [`Resumed::finish`].
pub struct Resumed {
    cli: Option<Child>,
    stdin: Option<ChildStdin>,
    pub lines: mpsc::Receiver<String>,
    /// The child's pid once it told it (for failure messages).
    pub child_pid: Option<i32>,
    /// The log of the daemon of the child's host (for failure messages).
    daemon_log: PathBuf,
}

impl Resumed {
    pub fn start(tb: &Testbed, host: usize, args: &[&str]) -> Resumed {
        let (mut cli, stdin) = spawn_cli(tb, host, args);
        let out = cli.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Resumed {
            cli: Some(cli),
            stdin: Some(stdin),
            lines,
            child_pid: None,
            daemon_log: tb.host(host).log_path().to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.cli.as_ref().expect("running").id() as i32
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the child");
    }

    /// The next line the child prints.
    pub fn line(&mut self, waiting_for: &str) -> String {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let cli = self.cli.take().expect("running");
                // SAFETY: kill(2) on our own child process.
                unsafe { libc::kill(cli.id() as i32, libc::SIGKILL) };
                let threads = self.child_pid.map(threads_report).unwrap_or_default();
                let out = wait_output(cli, Duration::from_secs(10));
                // After a disconnect the command has ended on its own: its status is the child's.
                panic!(
                    "no line from the child for {waiting_for} ({e:?}); resume ({}): {}\nthreads:\n{threads}\n{}",
                    out.status,
                    stderr(&out),
                    self.log_tail()
                );
            }
        }
    }

    pub fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.line(line)
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.daemon_log)
    }

    /// For failure messages: how the command ended (with its stderr) if it has.
    pub fn note(&mut self) -> String {
        let cli = self.cli.as_mut().expect("running");
        match cli.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut pipe) = cli.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
                }
                format!("resume exited ({status}): {err}")
            }
            _ => "resume still running".to_string(),
        }
    }

    /// Asks `line` and checks the answer is `want`; on a mismatch, the failure shows the
    /// child's threads and the daemon's log.
    pub fn expect(&mut self, line: &str, want: &str) {
        let got = self.ask(line);
        if got != want {
            let threads = self.child_pid.map(threads_report).unwrap_or_default();
            panic!(
                "{line:?}: got {got:?}, want {want:?}\nthreads:\n{threads}\n{}",
                self.log_tail()
            );
        }
    }

    /// Sends `sig` to the `mitosis resume` process (which forwards it to the child).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Closes the child's stdin and waits for the command; returns its output and the lines
    /// the child printed after the last one read.
    pub fn finish(mut self) -> (Output, Vec<String>) {
        drop(self.stdin.take());
        let cli = self.cli.as_mut().expect("running");
        let exited = eventually(Duration::from_secs(60), || {
            cli.try_wait().is_ok_and(|s| s.is_some())
        });
        if !exited {
            let threads = self.child_pid.map(threads_report).unwrap_or_default();
            panic!(
                "the child did not exit after EOF on its stdin; its threads:\n{threads}\n{}",
                self.log_tail()
            );
        }
        let out = wait_output(self.cli.take().expect("running"), Duration::from_secs(10));
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            rest.push(line);
        }
        (out, rest)
    }
}

impl Resumed {
    /// [`Resumed::finish`]: the command exits 0 and the child printed nothing more.
    pub fn finish_ok(self) {
        let log = self.daemon_log.clone();
        let (out, rest) = self.finish();
        assert_eq!(
            out.status.code(),
            Some(0),
            "resume: {}\n{}",
            stderr(&out),
            log_tail(&log)
        );
        assert!(rest.is_empty(), "unexpected output {rest:?}");
    }
}

impl Drop for Resumed {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut cli) = self.cli.take() {
            let _ = cli.kill();
            let _ = cli.wait();
        }
    }
}

/// The end of a daemon's log (for failure messages).
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("log of {} (end):\n{tail}", log.display())
}
