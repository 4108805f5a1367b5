//! Fn's keep-warm policy (`fn-cache`): instances started cold and reused.
//!
//! A call takes an idle instance of its function (any host) if there is one; otherwise it
//! starts one cold, through the daemon of the host the policy picks, and waits until it is
//! warm (blocked reading stdin). The request goes to the instance as one line on its stdin
//! and the answer is the next line of its stdout (the line contract: the examples' seeds,
//! Fn's `json` format). A finished instance waits for the next call; one idle for its
//! function's `idle_timeout` is ended by the reaper, as Fn does.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mitosis_client::{Exited, ResumeStats, Signaller};
use nix::fcntl::OFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::error::CallError;
use crate::invoke::{Answer, Launch};

/// How much of an instance's stderr is kept, to say why it failed.
const STDERR_TAIL: usize = 2048;
/// Past its warm-up, how long the daemon may take to answer a start.
const START_BACKSTOP: Duration = Duration::from_secs(10);
/// How often idle instances are checked against their `idle_timeout`.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// A running instance of a function, between calls or in one.
pub struct Instance {
    pub host: usize,
    /// The image it was started from (a changed image makes new instances).
    pub image: String,
    pub idle_timeout: Duration,
    stdin: pipe::Sender,
    stdout: pipe::Receiver,
    /// Bytes read past the last answer's newline.
    pending: Vec<u8>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
    killer: Signaller,
    exited: JoinHandle<Result<Exited, mitosis_client::Error>>,
    last_used: Instant,
    /// Calls it answered.
    pub served: u64,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Ends the process (a small frame on a connection that carries nothing else from
        // this side); the wait thread then returns.
        let _ = self.killer.signal(libc::SIGKILL);
    }
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

impl Instance {
    /// Starts one cold through the daemon at `endpoint` (a unix socket: instances relay no
    /// warm-up over TCP yet) and waits until it is warm.
    pub async fn start(
        host: usize,
        host_name: &str,
        endpoint: &mitosis_client::Endpoint,
        launch: Launch,
        image: String,
        idle_timeout: Duration,
    ) -> Result<(Instance, ResumeStats), CallError> {
        let mitosis_client::Endpoint::Unix(socket) = endpoint.clone() else {
            return Err(CallError::Daemon {
                host: host_name.to_owned(),
                err: mitosis_client::Error::Unexpected(
                    "keep-warm instances over tcp:// endpoints are not supported yet".into(),
                ),
            });
        };
        let (in_r, in_w) = pipe_pair()?;
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        let started = tokio::task::spawn_blocking(move || {
            let running = launch.run(
                &socket,
                START_BACKSTOP,
                [in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
                None,
            )?;
            drop((in_r, out_w, err_w));
            // No timeout on its exit: an instance lives for as long as it is kept.
            running.set_timeout(None)?;
            Ok(running)
        })
        .await
        .map_err(|e| CallError::Io(io::Error::other(e)))?
        .map_err(|err| CallError::Daemon {
            host: host_name.to_owned(),
            err,
        })?;
        let stats = started.stats.clone();
        let killer = started.signaller().map_err(|err| CallError::Daemon {
            host: host_name.to_owned(),
            err,
        })?;
        let exited = tokio::task::spawn_blocking(move || started.wait());
        let stdout = pipe::Receiver::from_owned_fd(out_r)?;
        let mut stderr = pipe::Receiver::from_owned_fd(err_r)?;
        // Warm: what it wrote so far was its start-up.
        let mut startup = Vec::new();
        crate::invoke::drain(&stdout, &mut startup);
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let tail = stderr_tail.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
                t.extend_from_slice(&buf[..n]);
                let over = t.len().saturating_sub(STDERR_TAIL);
                t.drain(..over);
            }
        });
        Ok((
            Instance {
                host,
                image,
                idle_timeout,
                stdin: pipe::Sender::from_owned_fd(in_w)?,
                stdout,
                pending: Vec::new(),
                stderr_tail,
                killer,
                exited,
                last_used: Instant::now(),
                served: 0,
            },
            stats,
        ))
    }

    /// Sends `input` as one request line and reads the answer line, within `timeout`. An
    /// instance that failed is not to be used again (the error says why).
    pub async fn call(
        &mut self,
        input: &[u8],
        timeout: Duration,
        max_output: usize,
    ) -> Result<Vec<u8>, CallError> {
        if input.contains(&b'\n')
            && input.iter().rposition(|&b| b == b'\n') != Some(input.len() - 1)
        {
            return Err(CallError::BadInput(
                "a keep-warm instance takes one request line: the body has a newline inside".into(),
            ));
        }
        let exchange = async {
            self.stdin.write_all(input).await?;
            if input.last() != Some(&b'\n') {
                self.stdin.write_all(b"\n").await?;
            }
            loop {
                if let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                    let rest = self.pending.split_off(nl + 1);
                    return Ok(std::mem::replace(&mut self.pending, rest));
                }
                if self.pending.len() > max_output {
                    return Err(io::Error::other("answer too large"));
                }
                if self.stdout.read_buf(&mut self.pending).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        };
        let answered = tokio::time::timeout(timeout, exchange).await;
        self.last_used = Instant::now();
        match answered {
            Err(_) => Err(CallError::TimedOut(timeout.as_secs())),
            Ok(Ok(line)) => {
                self.served += 1;
                Ok(line)
            }
            Ok(Err(e)) if e.to_string() == "answer too large" => {
                Err(CallError::OutputTooLarge(max_output))
            }
            Ok(Err(_)) => Err(CallError::Crashed(self.why_gone().await)),
        }
    }

    /// Why an instance stopped answering: its exit (or the daemon's reason) and the last line
    /// of its stderr.
    async fn why_gone(&mut self) -> String {
        let waited = tokio::time::timeout(Duration::from_secs(2), &mut self.exited).await;
        let mut why = match waited {
            Ok(Ok(Ok(e))) => e
                .reason
                .unwrap_or_else(|| format!("exited with status {}", e.status)),
            Ok(Ok(Err(e))) => format!("its daemon: {e}"),
            _ => "it closed its stdout".to_owned(),
        };
        let tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let tail = String::from_utf8_lossy(&tail);
        if let Some(last) = tail.lines().rev().find(|l| !l.trim().is_empty()) {
            why = format!("{why}: {}", last.trim());
        }
        why
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last_used) >= self.idle_timeout || self.exited.is_finished()
    }
}

/// Idle instances per function.
#[derive(Default)]
pub struct Instances {
    idle: Mutex<HashMap<String, Vec<Instance>>>,
    /// Per function, notified when one of its instances becomes idle: a call waiting for a
    /// cold start takes it instead, as Fn's agent does.
    freed: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

impl Instances {
    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Instance>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle instance of function `fn_id` from `image`, the most recently used (Fn's LIFO
    /// keeps the fewest instances busy), on a host `usable` accepts.
    pub fn take(
        &self,
        fn_id: &str,
        image: &str,
        usable: impl Fn(usize) -> bool,
    ) -> Option<Instance> {
        let mut idle = self.idle();
        let list = idle.get_mut(fn_id)?;
        let at = list
            .iter()
            .rposition(|i| i.image == image && usable(i.host) && !i.exited.is_finished())?;
        Some(list.remove(at))
    }

    /// Keeps `instance` for the next call of `fn_id`, and wakes the calls waiting for one.
    pub fn put_back(&self, fn_id: &str, instance: Instance) {
        self.idle()
            .entry(fn_id.to_owned())
            .or_default()
            .push(instance);
        self.freed(fn_id).notify_waiters();
    }

    /// Notified whenever an instance of `fn_id` becomes idle.
    pub fn freed(&self, fn_id: &str) -> Arc<tokio::sync::Notify> {
        self.freed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(fn_id.to_owned())
            .or_default()
            .clone()
    }

    /// Ends every idle instance of `fn_id` (deleted function).
    pub fn remove(&self, fn_id: &str) {
        let gone = self.idle().remove(fn_id);
        self.freed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(fn_id);
        drop(gone);
    }

    /// Idle instances of each function now.
    pub fn counts(&self) -> Vec<(String, usize)> {
        self.idle()
            .iter()
            .map(|(id, list)| (id.clone(), list.len()))
            .collect()
    }

    /// Ends the instances idle past their `idle_timeout`, every [`REAP_EVERY`].
    pub fn start_reaping(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let now = Instant::now();
                let mut expired = Vec::new();
                {
                    let mut idle = me.idle();
                    for list in idle.values_mut() {
                        let mut i = 0;
                        while i < list.len() {
                            if list[i].expired(now) {
                                expired.push(list.remove(i));
                            } else {
                                i += 1;
                            }
                        }
                    }
                    idle.retain(|_, list| !list.is_empty());
                }
                if !expired.is_empty() {
                    tracing::debug!(
                        ended = expired.len(),
                        "idle instances past their idle_timeout"
                    );
                }
                // Dropped outside the lock: each drop sends a kill.
                drop(expired);
            }
        });
    }
}

/// The answer of a call served by an instance.
pub fn answer(output: Vec<u8>, stats: ResumeStats, t0: Instant) -> Answer {
    Answer {
        output,
        http: None,
        stats,
        elapsed: t0.elapsed(),
    }
}
