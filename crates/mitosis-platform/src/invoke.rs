//! One call: a child of the function's seed, resumed through a host's daemon, with pipes the
//! platform owns as its stdin, stdout and stderr.
//!
//! The request body is written to the child's stdin, which is then closed; its stdout is the
//! answer. Over a unix socket the blocking control client runs on blocking threads (resume,
//! then the wait for the exit) and the pipes are read and written on the runtime; over TCP
//! the daemon makes the pipes and the stdio is relayed on the connection. The whole run is
//! bounded by the function's timeout: past it the child is killed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mitosis_client::{Client, Endpoint, Exited, Remote, ResumeStats, Running, Signaller};
use nix::fcntl::OFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::error::CallError;
use crate::http_contract::{self, HttpRequest};

/// How much of the child's stderr is kept, to say why it failed.
const STDERR_TAIL: usize = 2048;
/// Past the function's timeout, how long the daemon may take to confirm the kill before the
/// control connection is given up (and closed, which kills the child too).
const KILL_GRACE: Duration = Duration::from_secs(10);

/// What the daemon starts for a call.
#[derive(Clone)]
pub enum Launch {
    /// A child of the seed behind `handle` (a secret: never logged), its memory limited to
    /// `memory_mib`.
    Fork { handle: String, memory_mib: u64 },
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
    /// Starts it through the daemon's unix socket at `socket` with these stdio (and, for a
    /// fork, `listener` as its fd 3); blocking.
    pub fn run(
        &self,
        socket: &std::path::Path,
        backstop: Duration,
        stdio: [std::os::fd::BorrowedFd<'_>; 3],
        listener: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Running, mitosis_client::Error> {
        let [stdin, stdout, stderr] = stdio;
        match self {
            Launch::Fork { handle, memory_mib } => Client::connect(socket)?
                .with_timeout(backstop)?
                .with_memory_limit(Some(*memory_mib))
                .resume(handle, stdin, stdout, stderr, listener),
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
    /// The daemon's control endpoint, and how TCP ones are reached.
    pub endpoint: Endpoint,
    pub remote: Option<Remote>,
    pub host: String,
    pub launch: Launch,
    /// The HTTP contract: the request to forward to the function's socket (the body is
    /// `input`); `None` for the stdin/stdout contract.
    pub http: Option<HttpRequest>,
    pub input: axum::body::Bytes,
    pub timeout: Duration,
    pub max_output: usize,
    /// A workflow stage's process: its channel to the platform as its fd 3, through which it
    /// may prepare itself ([`crate::channel`]). Unix sockets only (a descriptor cannot cross
    /// TCP): over `tcp://` endpoints the process gets none.
    pub channel: Option<(usize, crate::channel::Channel)>,
}

/// A call that ran to its end with exit status 0.
#[derive(Debug)]
pub struct Answer {
    /// Its stdout, or its HTTP answer's body.
    pub output: Vec<u8>,
    /// Its HTTP answer's status and headers (the HTTP contract).
    pub http: Option<(u16, http_contract::Headers)>,
    pub stats: ResumeStats,
    /// From the resume request to the child's exit.
    pub elapsed: Duration,
}

/// Ends a task with the call.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

/// Says the call is over (its process exited, or is being killed) before ending its channel.
struct ExitedOnDrop {
    exited: Arc<AtomicBool>,
    _serving: AbortOnDrop,
}

impl Drop for ExitedOnDrop {
    fn drop(&mut self) {
        self.exited.store(true, Ordering::Release);
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    match call.endpoint.clone() {
        Endpoint::Unix(socket) => run_unix(call, socket).await,
        Endpoint::Tcp(addr) => run_tcp(call, addr).await,
    }
}

/// A sink for the child's stdout that refuses to hold more than the answer's limit.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.limit {
            self.over = true;
            return Poll::Ready(Err(io::Error::other("the answer is too large")));
        }
        self.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A sink for the child's stderr that keeps its last [`STDERR_TAIL`] bytes.
struct Tail(Vec<u8>);

impl tokio::io::AsyncWrite for Tail {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.extend_from_slice(buf);
        let over = self.0.len().saturating_sub(STDERR_TAIL);
        self.0.drain(..over);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The call over TCP: resumed with its stdio relayed on the connection. Past the deadline
/// the relay is dropped, which closes the connection: the daemon then kills the child.
async fn run_tcp(call: Call, addr: std::net::SocketAddr) -> Result<Answer, CallError> {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + call.timeout;
    let host = call.host.clone();
    if call.http.is_some() {
        // No descriptor crosses TCP: the function's socket would need relaying too.
        return Err(CallError::Daemon {
            host,
            err: mitosis_client::Error::Unexpected(
                "the HTTP contract over tcp:// endpoints is not supported yet".into(),
            ),
        });
    }
    let Launch::Fork { handle, memory_mib } = &call.launch else {
        // A start relays no warm-up; the cold and fn-cache policies need unix sockets.
        return Err(CallError::Daemon {
            host,
            err: mitosis_client::Error::Unexpected(
                "cold starts over tcp:// endpoints are not supported yet".into(),
            ),
        });
    };
    let Some(remote) = call.remote else {
        return Err(CallError::Daemon {
            host,
            err: mitosis_client::Error::ConnectTcp {
                addr,
                err: io::Error::other("no TLS configured for daemons over TCP"),
            },
        });
    };
    let resumed = tokio::time::timeout_at(deadline, async {
        remote
            .connect(addr)
            .await?
            .with_memory_limit(Some(*memory_mib))
            .resume(handle)
            .await
    })
    .await
    .map_err(|_| CallError::TimedOut(call.timeout.as_secs()))?;
    let running = resumed.map_err(|err| CallError::Daemon {
        host: host.clone(),
        err,
    })?;
    let stats = running.stats.clone();
    let mut output = Capped {
        bytes: Vec::new(),
        limit: call.max_output,
        over: false,
    };
    let mut errors = Tail(Vec::new());
    let (_signals, none) = tokio::sync::mpsc::channel(1);
    let relayed = tokio::time::timeout_at(
        deadline,
        running.relay(&call.input[..], &mut output, &mut errors, none),
    )
    .await
    .map_err(|_| CallError::TimedOut(call.timeout.as_secs()))?;
    let exited = match relayed {
        Err(_) if output.over => return Err(CallError::OutputTooLarge(call.max_output)),
        Err(err) => return Err(CallError::HostLost { host, err }),
        Ok(exited) => exited,
    };
    answer(exited, output.bytes, &errors.0, stats, t0, call.max_output)
}

/// The answer of a child that exited: its stdout if it exited 0, else why it failed.
fn answer(
    exited: Exited,
    output: Vec<u8>,
    errors: &[u8],
    stats: ResumeStats,
    t0: Instant,
    max_output: usize,
) -> Result<Answer, CallError> {
    if output.len() > max_output {
        return Err(CallError::OutputTooLarge(max_output));
    }
    if exited.status != 0 {
        let mut why = exited
            .reason
            .unwrap_or_else(|| format!("exited with status {}", exited.status));
        let tail = String::from_utf8_lossy(errors);
        if let Some(last) = tail.lines().rev().find(|l| !l.trim().is_empty()) {
            why = format!("{why}: {}", last.trim());
        }
        return Err(CallError::Crashed(why));
    }
    Ok(Answer {
        output,
        http: None,
        stats,
        elapsed: t0.elapsed(),
    })
}

/// The call over the daemon's unix socket, with pipes this platform owns.
async fn run_unix(call: Call, socket: PathBuf) -> Result<Answer, CallError> {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + call.timeout;
    let (in_r, in_w) = pipe_pair()?;
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;

    let (launch, host) = (call.launch, call.host.clone());
    let cold = matches!(launch, Launch::Cold { .. });
    // The HTTP contract: a socket this platform listens on becomes the child's fd 3.
    let tcp_listener = match &call.http {
        Some(_) => Some(std::net::TcpListener::bind((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        ))?),
        None => None,
    };
    let listening = tcp_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    // A workflow stage: its channel to the platform is its fd 3 instead.
    let (channel, channel_end) = match call.channel {
        Some(_) if tcp_listener.is_some() || cold => {
            return Err(CallError::BadInput(
                "workflow stages run forked functions of the stdin/stdout contract".into(),
            ));
        }
        Some((host_index, channel)) => {
            let (theirs, ours) = crate::channel::pair()?;
            (Some((host_index, channel, ours)), Some(theirs))
        }
        None => (None, None),
    };
    let listener: Option<OwnedFd> = match tcp_listener {
        Some(l) => Some(l.into()),
        None => channel_end,
    };
    // The read timeout is a backstop: the deadline below is what callers see.
    let backstop = call.timeout + KILL_GRACE;
    let resuming = tokio::task::spawn_blocking(move || {
        let running = launch.run(
            &socket,
            backstop,
            [in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
            listener.as_ref().map(|l| l.as_fd()),
        )?;
        // The child has its copies; ours close here so its exit ends our reads.
        drop((in_r, out_w, err_w, listener));
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
    // Served while the call runs; a prepare under way finishes on its own (see `channel`).
    let exited_flag = Arc::new(AtomicBool::new(false));
    let _channel = channel.map(|(host_index, channel, ours)| ExitedOnDrop {
        exited: exited_flag.clone(),
        _serving: AbortOnDrop(tokio::spawn(crate::channel::serve(
            ours,
            running.pid,
            host_index,
            channel,
            exited_flag.clone(),
        ))),
    });
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
    // The request goes over HTTP (queued in the socket's backlog until the child accepts);
    // stdin only tells the function to serve it.
    let mut exchange = match (&call.http, listening) {
        (Some(req), Some(addr)) => {
            let (req, body, max) = (req.clone(), call.input.clone(), call.max_output);
            Some(tokio::spawn(async move {
                http_contract::exchange(addr, &req, &body, max).await
            }))
        }
        _ => None,
    };
    let input = match &call.http {
        Some(_) => axum::body::Bytes::from_static(http_contract::SERVE_ONE),
        None => call.input,
    };
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
                exited_flag.store(true, Ordering::Release);
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
    if let Some(exchange) = exchange.take() {
        // The child is gone: its side of the connection is closed, the answer complete.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let answered = tokio::time::timeout(left + Duration::from_secs(1), exchange).await;
        if let Ok(Ok(Ok(response))) = answered {
            return Ok(Answer {
                output: response.body,
                http: Some((response.status, response.headers)),
                stats,
                elapsed: t0.elapsed(),
            });
        }
        let why = match answered {
            Ok(Ok(Err(http_contract::HttpAnswerError::TooLarge(n)))) => {
                return Err(CallError::OutputTooLarge(n));
            }
            Ok(Ok(Err(e))) => e.to_string(),
            _ => "no HTTP answer".to_owned(),
        };
        return match answer(exited, Vec::new(), &errors, stats, t0, call.max_output) {
            Ok(_) => Err(CallError::Crashed(format!(
                "exited 0 without an answer: {why}"
            ))),
            Err(e) => Err(e),
        };
    }
    answer(exited, output, &errors, stats, t0, call.max_output)
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
