//! One child resumed in the benchmark's own process over a host's control socket, as a
//! serverless platform would start it: no process is spawned by the measurer.
//!
//! The clock starts before the request line is written to the child's stdin pipe and the
//! Resume request is sent (the connection to the socket is made just before), and stops when
//! the answer line is read from its stdout pipe.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mitosis_client::{Client, stats_pairs};
use mitosis_testbed::Host;

use crate::daemon::ChildStats;
use crate::pipe::{PipeLines, pipe, read_available};
use crate::procs::STEP_TIMEOUT;

/// One child that answered (rightly or not) and exited.
pub struct ChildRun {
    /// Resume request sent to answer read.
    pub latency: Duration,
    /// The first line of its stdout (empty if there was none).
    pub answer: String,
    /// Shell-style exit status.
    pub status: i32,
    /// Why the daemon killed it, if it did.
    pub reason: Option<String>,
    pub stats: ChildStats,
    pub stderr: String,
}

/// Resumes a child of `handle` on `host` with `input` (plus a newline) on its stdin, times it
/// to its first line of output, lets `probe` look at it (given that line and its pid on the
/// host, which a child in a container does not know) while it still has its stdin, then
/// closes its stdin and waits for its exit. Output after the answer is not
/// read while it runs: a child writing more than a pipe holds (64 KiB) would block, time out
/// and fail (the seeds write one line per request, and little to stderr).
pub fn run_child<T>(
    host: &Host,
    handle: &str,
    input: &str,
    probe: impl FnOnce(&str, u32) -> T,
) -> Result<(ChildRun, T)> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let mut stdin = File::from(stdin_w);
    let mut stdout = PipeLines::new(stdout_r);
    let line = format!("{input}\n");
    let client = Client::connect(host.socket_path())?.with_timeout(STEP_TIMEOUT)?;

    let t = Instant::now();
    stdin
        .write_all(line.as_bytes())
        .context("writing the request")?;
    let running = client.resume(
        handle,
        stdin_r.as_fd(),
        stdout_w.as_fd(),
        stderr_w.as_fd(),
        None,
    )?;
    let first = stdout.next(t + STEP_TIMEOUT);
    let latency = t.elapsed();

    // The child has its own copies; ours would keep its pipes open.
    drop((stdin_r, stdout_w, stderr_w));
    let answer = match first {
        Ok(line) => line.unwrap_or_default(),
        // Dropping the connection makes the daemon kill the child.
        Err(err) => return Err(err).context("reading the answer"),
    };
    let probed = probe(&answer, running.pid as u32);
    drop(stdin);
    let start = running.stats.clone();
    // Times out after STEP_TIMEOUT; dropping the connection then makes the daemon kill it.
    let exited = running.wait().context("waiting for the child")?;
    let stderr = read_available(stderr_r);
    Ok((
        ChildRun {
            latency,
            answer,
            status: exited.status,
            reason: exited.reason,
            stats: stats_pairs(&start, &exited.stats).into_iter().collect(),
            stderr,
        },
        probed,
    ))
}
