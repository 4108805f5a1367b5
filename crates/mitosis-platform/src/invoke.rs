//! One call: a child of the function's seed, resumed through a host's daemon, with pipes the
//! platform owns as its stdin, stdout and stderr.
//!
//! The request body is written to the child's stdin, which is then closed; its stdout is the
//! answer. The blocking control client runs on blocking threads (resume, then the wait for
//! the exit), the pipes are read and written on the runtime, and the whole run is bounded by
//! the function's timeout: past it the child is killed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mitosis_client::{Client, Exited, ResumeStats, Running, Signaller};
use nix::fcntl::OFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::error::CallError;

/// How much of the child's stderr is kept, to say why it failed.
const STDERR_TAIL: usize = 2048;
/// Past the function's timeout, how long the daemon may take to confirm the kill before the
/// control connection is given up (and closed, which kills the child too).
const KILL_GRACE: Duration = Duration::from_secs(10);

/// What the daemon starts for a call.
#[derive(Clone)]
pub enum Launch {
    /// A child of the seed behind `handle` (a secret: never logged).
    Fork { handle: String },
    /// The bundle at `bundle` started afresh (a cold start), its memory limited to
    /// `memory_mib`; the call waits for it to be warm (`ready`), and what it writes before
    /// is start-up output, not the answer.
    Cold {
        bundle: PathBuf,
        memory_mib: u64,
        ready: Duration,
    },
}

impl Launch {
    /// Starts it through the daemon at `socket` with these stdio; blocking.
    pub fn run(
        &self,
        socket: &std::path::Path,
        backstop: Duration,
        stdio: [std::os::fd::BorrowedFd<'_>; 3],
    ) -> Result<Running, mitosis_client::Error> {
        let [stdin, stdout, stderr] = stdio;
        match self {
            Launch::Fork { handle } => Client::connect(socket)?
                .with_timeout(backstop)?
                .resume(handle, stdin, stdout, stderr, None),
            Launch::Cold {
                bundle,
                memory_mib,
                ready,
            } => Client::connect(socket)?
                .with_timeout(backstop + *ready)?
                .start(
                    bundle,
                    Some(*memory_mib),
                    Some(*ready),
                    stdin,
                    stdout,
                    stderr,
                ),
        }
    }
}

/// What one call needs.
pub struct Call {
    /// The daemon's control socket.
    pub socket: PathBuf,
    pub host: String,
    pub launch: Launch,
    pub input: axum::body::Bytes,
    pub timeout: Duration,
    pub max_output: usize,
}

/// A call that ran to its end with exit status 0.
#[derive(Debug)]
pub struct Answer {
    pub output: Vec<u8>,
    pub stats: ResumeStats,
    /// From the resume request to the child's exit.
    pub elapsed: Duration,
}

/// Kills the child if the call is abandoned (timed out, or its HTTP client went away).
struct KillOnDrop(Option<Signaller>);

impl KillOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // A signal is one small frame on a socket that carries nothing else from this
            // side, so the write does not block in practice; once the daemon gone, it fails.
            let _ = s.signal(libc::SIGKILL);
        }
    }
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Runs the call on its host.
pub async fn run(call: Call) -> Result<Answer, CallError> {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + call.timeout;
    let (in_r, in_w) = pipe_pair()?;
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;

    let (socket, launch, host) = (call.socket, call.launch, call.host.clone());
    let cold = matches!(launch, Launch::Cold { .. });
    // The read timeout is a backstop: the deadline below is what callers see.
    let backstop = call.timeout + KILL_GRACE;
    let resuming = tokio::task::spawn_blocking(move || {
        let running = launch.run(
            &socket,
            backstop,
            [in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
        )?;
        // The child has its copies; ours close here so its exit ends our reads.
        drop((in_r, out_w, err_w));
        Ok(running)
    });
    // If the deadline passes first, the resume thread finishes on its own and drops the
    // `Running` it made, which closes its connection: the daemon then kills the child.
    let running = match tokio::time::timeout_at(deadline, resuming).await {
        Err(_) => return Err(CallError::TimedOut(call.timeout.as_secs())),
        Ok(joined) => joined
            .map_err(|e| CallError::Io(io::Error::other(e)))?
            .map_err(|err| CallError::Daemon {
                host: host.clone(),
                err,
            })?,
    };
    let stats = running.stats.clone();
    let mut killer = KillOnDrop(Some(running.signaller().map_err(|err| {
        CallError::Daemon {
            host: host.clone(),
            err,
        }
    })?));
    let mut waiting = tokio::task::spawn_blocking(move || running.wait());

    let mut stdin = pipe::Sender::from_owned_fd(in_w)?;
    let mut stdout = pipe::Receiver::from_owned_fd(out_r)?;
    let mut stderr = pipe::Receiver::from_owned_fd(err_r)?;
    if cold {
        // Warm now, blocked reading stdin: all it wrote so far was its start-up.
        drain(&stdout, &mut Vec::new());
        drain(&stderr, &mut Vec::new());
    }
    let input = call.input;
    let feed = async move {
        // A child that exits without reading all of it closes the pipe: not our error.
        let _ = stdin.write_all(&input).await;
    };
    tokio::pin!(feed);

    let mut output = Vec::new();
    let mut errors = Vec::new();
    let mut err_buf = [0u8; 1024];
    let (mut fed, mut out_done, mut err_done) = (false, false, false);
    let mut exited: Option<Exited> = None;
    let timed_out = loop {
        if exited.is_some() && out_done {
            break false;
        }
        tokio::select! {
            () = &mut feed, if !fed => fed = true,
            read = stdout.read_buf(&mut output), if !out_done => match read {
                Ok(0) | Err(_) => out_done = true,
                Ok(_) if output.len() > call.max_output => {
                    return Err(CallError::OutputTooLarge(call.max_output));
                }
                Ok(_) => {}
            },
            read = stderr.read(&mut err_buf), if !err_done => match read {
                Ok(0) | Err(_) => err_done = true,
                Ok(n) => {
                    errors.extend_from_slice(&err_buf[..n]);
                    let over = errors.len().saturating_sub(STDERR_TAIL);
                    errors.drain(..over);
                }
            },
            waited = &mut waiting, if exited.is_none() => {
                killer.disarm();
                let e = waited
                    .map_err(|e| CallError::Io(io::Error::other(e)))?
                    .map_err(|err| CallError::HostLost { host: host.clone(), err })?;
                exited = Some(e);
                // Whatever the child wrote is in the pipes now; a copy of its stdout kept
                // elsewhere (a grandchild) must not hold the answer back.
                drain(&stdout, &mut output);
                drain(&stderr, &mut errors);
                let over = errors.len().saturating_sub(STDERR_TAIL);
                errors.drain(..over);
                out_done = true;
            },
            () = tokio::time::sleep_until(deadline), if exited.is_none() => break true,
        }
    };
    if timed_out {
        // `killer` kills the child on drop, and the wait thread returns once it is dead.
        return Err(CallError::TimedOut(call.timeout.as_secs()));
    }
    let exited = exited.expect("the loop ends with an exit or the deadline");
    if output.len() > call.max_output {
        return Err(CallError::OutputTooLarge(call.max_output));
    }
    if exited.status != 0 {
        let mut why = exited
            .reason
            .unwrap_or_else(|| format!("exited with status {}", exited.status));
        let tail = String::from_utf8_lossy(&errors);
        if let Some(last) = tail.lines().rev().find(|l| !l.trim().is_empty()) {
            why = format!("{why}: {}", last.trim());
        }
        return Err(CallError::Crashed(why));
    }
    Ok(Answer {
        output,
        stats,
        elapsed: t0.elapsed(),
    })
}

/// Reads what is in the pipe now, without waiting for more. A read(2) of its own: tokio's
/// `try_read` answers WouldBlock without reading until the runtime has seen the pipe
/// readable, which it may not have yet when the exit comes first.
pub(crate) fn drain(pipe: &pipe::Receiver, into: &mut Vec<u8>) {
    let mut buf = [0u8; 8192];
    // The fd is non-blocking (tokio made it so): this stops at EAGAIN or EOF.
    while let Ok(n) = nix::unistd::read(pipe.as_fd(), &mut buf) {
        if n == 0 {
            break;
        }
        into.extend_from_slice(&buf[..n]);
    }
}
