//! A seed started from an OCI bundle: its container, and waiting until it is warm.
//!
//! The seed convention is "warm, waiting for a request" = blocked in `read(0)`: the bundle's
//! process runs with a pipe as stdin whose write end we hold (so it waits for input forever)
//! and a log file as stdout and stderr (quoted when it fails before it is warm).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::cgroup::Hierarchy;
use crate::{Bundle, Container, ContainerError, Contents};

/// How much of a failed seed's output an error quotes.
const LOG_TAIL: u64 = 400;
/// How often the seed is checked while it warms up.
const WARM_POLL: Duration = Duration::from_millis(2);

/// The container a bundle's seed runs in, and what keeps it waiting.
pub struct SeedContainer {
    pub container: Container,
    /// The seed's pid, as this host sees it.
    pub pid: i32,
    /// The write end of the seed's stdin: held so the seed waits for input forever (none
    /// for a process started otherwise and prepared where it ran: see [`SeedContainer::adopt`]).
    _stdin: Option<OwnedFd>,
}

impl SeedContainer {
    /// The container of process `pid`, started otherwise (a child of a seed, prepared again
    /// where it runs), kept for the seed made of it: the seed's twin lives in its namespaces,
    /// so the container goes with the seed, not with the process.
    pub fn adopt(container: Container, pid: i32) -> SeedContainer {
        SeedContainer {
            container,
            pid,
            _stdin: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum SeedStartError {
    #[error("the seed's {what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// It exited, or did not wait on stdin in time; `output` is the end of what it wrote.
    #[error("{why}{}", quoted(.output))]
    NotWarm { why: String, output: String },
}

fn quoted(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("; it wrote: {output}")
    }
}

/// Starts `bundle`'s process in a container named `name` and waits (blocking, at most
/// `ready_timeout`) until it blocks reading stdin. A seed that never gets warm is destroyed.
pub fn start_seed(
    hierarchy: &Hierarchy,
    init_exe: &Path,
    bundle: &Bundle,
    name: &str,
    ready_timeout: Duration,
) -> Result<SeedContainer, SeedStartError> {
    let setup = |what| move |source| SeedStartError::Setup { what, source };
    let (stdin_read, stdin_write) =
        nix::unistd::pipe().map_err(|e| setup("stdin pipe")(io::Error::from(e)))?;
    let log = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(std::env::temp_dir())
        .map_err(setup("log file"))?;
    let out = log.try_clone().map_err(setup("log file"))?;
    let err = log.try_clone().map_err(setup("log file"))?;
    let container = Container::create(
        hierarchy,
        init_exe,
        bundle,
        name,
        &bundle.hostname,
        Contents::Process {
            stdio: [stdin_read, out.into(), err.into()],
        },
    )?;
    match wait_warm(&container, ready_timeout) {
        Ok(pid) => Ok(SeedContainer {
            container,
            pid,
            _stdin: Some(stdin_write),
        }),
        Err(why) => {
            let output = log_tail(log);
            let _ = container.destroy();
            Err(SeedStartError::NotWarm { why, output })
        }
    }
}

/// Waits until the container's process blocks in read(0). Its pid as this host sees it.
pub fn wait_warm(container: &Container, timeout: Duration) -> Result<i32, String> {
    let t0 = Instant::now();
    loop {
        if !container.is_running() {
            return Err("the seed exited before it was warm".into());
        }
        if let Some(pid) = container.main_pid() {
            if reads_stdin(pid) {
                return Ok(pid);
            }
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "the seed did not wait for input on stdin within {timeout:?}"
            ));
        }
        std::thread::sleep(WARM_POLL);
    }
}

/// True if a thread of `pid` is blocked in read(2) on descriptor 0
/// (/proc/PID/task/TID/syscall: "0 0x0 ..."). Any thread: a runtime may read stdin on
/// another than its first (the JVM runs `main` on a thread of its own; a Go program reads
/// on whichever thread its goroutine runs).
pub fn reads_stdin(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        std::fs::read_to_string(task.path().join("syscall"))
            .is_ok_and(|s| s.split_whitespace().take(2).eq(["0", "0x0"]))
    })
}

fn log_tail(mut log: File) -> String {
    let len = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = log.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut text = String::new();
    let _ = log.read_to_string(&mut text);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_reading_stdin_is_seen_waiting() {
        let mut cat = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = cat.id() as i32;
        let t0 = Instant::now();
        while !reads_stdin(pid) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "cat never read stdin"
            );
            std::thread::sleep(WARM_POLL);
        }
        assert!(!reads_stdin(std::process::id() as i32));
        cat.kill().unwrap();
        cat.wait().unwrap();
    }

    #[test]
    fn a_thread_reading_stdin_is_seen_waiting() {
        // A python whose second thread reads stdin while its main thread sleeps.
        let mut py = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, threading, time\n\
                 threading.Thread(target=sys.stdin.buffer.raw.read, args=(1,)).start()\n\
                 time.sleep(30)",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = py.id() as i32;
        let t0 = Instant::now();
        while !reads_stdin(pid) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "its thread never read stdin"
            );
            std::thread::sleep(WARM_POLL);
        }
        // Its main thread sleeps: only another thread reads.
        let main = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
        assert!(!main.starts_with("0 0x0"), "{main}");
        py.kill().unwrap();
        py.wait().unwrap();
    }

    #[test]
    fn a_failure_quotes_what_the_seed_wrote() {
        let e = SeedStartError::NotWarm {
            why: "the seed exited before it was warm".into(),
            output: "Traceback: boom".into(),
        };
        assert_eq!(
            e.to_string(),
            "the seed exited before it was warm; it wrote: Traceback: boom"
        );
        let quiet = SeedStartError::NotWarm {
            why: "late".into(),
            output: String::new(),
        };
        assert_eq!(quiet.to_string(), "late");
    }
}
