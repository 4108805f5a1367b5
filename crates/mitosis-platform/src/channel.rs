//! The platform's side of a workflow stage's channel: how a function prepares itself on the
//! platform without holding a daemon's control socket (docs/workflows.md, "On the platform").
//!
//! Each process a workflow stage runs gets, as its fd 3, one end of a unix socket pair whose
//! other end the platform keeps; [`PLATFORM_GREETING`] waits on it, so the function's library
//! knows it runs under the platform. Its `fork_prepare` sends [`PLATFORM_PREPARE`] and blocks
//! reading the answer; the platform asks the daemon that runs the process to prepare it
//! (`Prepare { pid }`, a running child of that daemon: flattened first, and its container
//! kept for the seed) and answers `PREPARED TOKEN` or `ERROR KIND MESSAGE`. The seed's handle
//! never reaches the function: the token only names the stage instance. The handles stay
//! with the workflow's run ([`RunSeeds`]), which forks the next stages from them and drops
//! them all when it ends, whether it succeeded or not.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mitosis_client::workflow::{PLATFORM_GREETING, PLATFORM_MAX_LINE, PLATFORM_PREPARE};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use tokio::io::{AsyncWriteExt, Interest};

use crate::hosts::Hosts;

/// A seed a stage's process made of itself.
#[derive(Clone)]
pub struct MadeSeed {
    /// The host whose daemon prepared it (where the process ran).
    pub host: usize,
    /// Its handle (a secret: never logged, never given to the function).
    pub handle: String,
    pub stage: String,
    pub index: usize,
}

impl std::fmt::Debug for MadeSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MadeSeed({}[{}] on host {})",
            self.stage, self.index, self.host
        )
    }
}

#[derive(Default)]
struct Made {
    seeds: Vec<MadeSeed>,
    /// The run is over: a seed whose prepare ends now is dropped at once.
    closed: bool,
}

/// The seeds one workflow run made, dropped when it ends ([`RunSeeds::drop_all`]).
pub struct RunSeeds {
    hosts: Arc<Hosts>,
    made: Mutex<Made>,
}

impl RunSeeds {
    pub fn new(hosts: Arc<Hosts>) -> Arc<Self> {
        Arc::new(RunSeeds {
            hosts,
            made: Mutex::default(),
        })
    }

    fn made(&self) -> std::sync::MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `seed`; false if the run is over (the caller drops it).
    fn add(&self, seed: MadeSeed) -> bool {
        let mut made = self.made();
        if made.closed {
            return false;
        }
        made.seeds.push(seed);
        true
    }

    /// The seed instance `index` of `stage` made, if it prepared itself.
    pub fn of(&self, stage: &str, index: usize) -> Option<MadeSeed> {
        let made = self.made();
        made.seeds
            .iter()
            .find(|s| s.stage == stage && s.index == index)
            .cloned()
    }

    /// How many seeds the run made so far.
    pub fn len(&self) -> usize {
        self.made().seeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the run is over (its seeds dropped or being dropped).
    pub fn is_closed(&self) -> bool {
        self.made().closed
    }

    /// Drops every seed the run made (their hosts at once, each bounded), and any whose
    /// prepare ends later. Children still running from them are killed by their daemons, and
    /// the other hosts' replicas of them are evicted now (not at their daemons' next sweep).
    pub async fn drop_all(&self) {
        let seeds = {
            let mut made = self.made();
            made.closed = true;
            std::mem::take(&mut made.seeds)
        };
        let mut drops = tokio::task::JoinSet::new();
        for seed in seeds {
            for host in 0..self.hosts.len() {
                // A host that is down answers nothing: its replica goes with its daemon, or
                // at its daemon's sweep.
                if host != seed.host && !self.hosts.get(host).is_up() {
                    continue;
                }
                let reach = self.hosts.reach(host);
                let seed = seed.clone();
                drops.spawn(async move {
                    if host == seed.host {
                        if let Err(e) = reach.drop_seed(&seed.handle).await {
                            tracing::warn!(?seed, "dropping a workflow's seed: {e}");
                        }
                    } else if let Err(e) = reach.evict(&seed.handle).await {
                        // Most hosts never ran a child of it: they have no replica.
                        tracing::trace!(?seed, host, "evicting a workflow seed's replica: {e}");
                    }
                });
            }
        }
        while drops.join_next().await.is_some() {}
    }
}

/// Drops a run's seeds if the run is abandoned before it does (its HTTP client went away and
/// its future was dropped): in the background, on the runtime.
pub struct DropOnExit(pub Arc<RunSeeds>);

impl Drop for DropOnExit {
    fn drop(&mut self) {
        if self.0.is_closed() {
            return;
        }
        let seeds = self.0.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { seeds.drop_all().await });
        }
    }
}

/// What a stage's call needs to serve its process's channel.
#[derive(Clone)]
pub struct Channel {
    pub seeds: Arc<RunSeeds>,
    pub stage: String,
    pub index: usize,
    /// How long a prepare may take (the call's own timeout bounds it anyway).
    pub timeout: Duration,
}

/// A channel's two ends: the process's (its fd 3) and the platform's, with the greeting
/// already waiting in it.
pub fn pair() -> io::Result<(OwnedFd, std::os::unix::net::UnixStream)> {
    let (theirs, ours) = std::os::unix::net::UnixStream::pair()?;
    // Every message then comes with its sender's pid: only the stage's process may ask.
    setsockopt(&ours, sockopt::PassCred, &true).map_err(io::Error::from)?;
    // A few bytes into an empty socket buffer: never blocks.
    io::Write::write_all(&mut &ours, PLATFORM_GREETING)?;
    Ok((theirs.into(), ours))
}

/// One answer line: `ERROR KIND MESSAGE`, the message on one line.
fn error_line(kind: &str, message: &str) -> Vec<u8> {
    let message: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(PLATFORM_MAX_LINE - 32)
        .collect();
    format!("ERROR {kind} {message}\n").into_bytes()
}

/// Serves the channel of process `pid` (as its daemon on `host` sees it) until the process
/// closes it or exits. Aborting this leaves a prepare under way to finish on its own, and its
/// seed recorded (or dropped, the run being over).
///
/// `exited` is set once the call has seen the process exit: a prepare that ends after that
/// may have captured another process that took the pid, and its seed is dropped.
pub async fn serve(
    ours: std::os::unix::net::UnixStream,
    pid: i32,
    host: usize,
    channel: Channel,
    exited: Arc<AtomicBool>,
) {
    if let Err(e) = serve_lines(ours, pid, host, channel, exited).await {
        tracing::debug!(pid, "a stage's channel ended: {e}");
    }
}

/// Reads what waits on the channel, without waiting, with its sender's pid as this process's
/// pid namespace sees it (0: a process not visible here).
fn recv_with_pid(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<i32>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    // Room for the credentials alone: descriptors a process sends along do not fit, and the
    // kernel installs none of them (the message says it was cut: refused below).
    let mut space = nix::cmsg_space!(UnixCredentials);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let refused = || io::Error::new(io::ErrorKind::InvalidData, "control data on the channel");
    let mut pid = None;
    for c in msg.cmsgs().map_err(|_| refused())? {
        match c {
            ControlMessageOwned::ScmCredentials(creds) => pid = Some(creds.pid()),
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in this process for this message;
                    // nothing else knows it, and it is closed once here.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
                return Err(refused());
            }
            _ => return Err(refused()),
        }
    }
    Ok((msg.bytes, pid))
}

/// Why a line did not come from the stage's own process (`pid`), if it did not: a process it
/// forked shares the channel, but preparing `pid` while it runs elsewhere would capture it at
/// no prepare point. A sender this namespace cannot see (0) is not checked.
fn foreign_sender(senders: &[i32], pid: i32) -> Option<i32> {
    senders.iter().copied().find(|&s| s != pid && s != 0)
}

async fn serve_lines(
    ours: std::os::unix::net::UnixStream,
    pid: i32,
    host: usize,
    channel: Channel,
    exited: Arc<AtomicBool>,
) -> io::Result<()> {
    ours.set_nonblocking(true)?;
    let mut stream = tokio::net::UnixStream::from_std(ours)?;
    let mut prepared = false;
    let mut pending: Vec<u8> = Vec::new();
    let mut senders: Vec<i32> = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        let Some(end) = pending.iter().position(|&b| b == b'\n') else {
            if pending.len() > PLATFORM_MAX_LINE {
                stream
                    .write_all(&error_line("BadRequest", "a line too long"))
                    .await?;
                return Ok(());
            }
            stream.readable().await?;
            let raw = stream.as_raw_fd();
            match stream.try_io(Interest::READABLE, || recv_with_pid(raw, &mut chunk)) {
                Ok((0, _)) => return Ok(()),
                Ok((n, sender)) => {
                    pending.extend_from_slice(&chunk[..n]);
                    senders.extend(sender);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            continue;
        };
        let line: Vec<u8> = pending.drain(..=end).collect();
        // The rest of what waits may be the next line's, from the same senders.
        let from = match pending.is_empty() {
            true => std::mem::take(&mut senders),
            false => senders.clone(),
        };
        let answer = if let Some(other) = foreign_sender(&from, pid) {
            error_line(
                "Denied",
                &format!(
                    "pid {other} is not the stage's process ({pid}): only it may prepare \
                     itself (a process it forked shares its channel)"
                ),
            )
        } else if line != PLATFORM_PREPARE {
            error_line(
                "BadRequest",
                &format!("unknown request {:?}", String::from_utf8_lossy(&line)),
            )
        } else if prepared {
            error_line(
                "Unsupported",
                "a stage's process prepares itself once (its children may, in their stage)",
            )
        } else {
            prepared = true;
            prepare(pid, host, &channel, exited.clone()).await
        };
        stream.write_all(&answer).await?;
    }
}

/// Prepares the process and records its seed, on a task of its own so that the seed is
/// recorded (or dropped) even if the call is abandoned meanwhile; the answer line.
async fn prepare(pid: i32, host: usize, channel: &Channel, exited: Arc<AtomicBool>) -> Vec<u8> {
    let seeds = channel.seeds.clone();
    let (stage, index, timeout) = (channel.stage.clone(), channel.index, channel.timeout);
    let made = tokio::spawn(async move {
        let reach = seeds.hosts.reach(host);
        let handle = reach.clone().prepare_pid(pid, timeout).await?;
        if exited.load(Ordering::Acquire) {
            // The pid may be another process's by now: never fork that.
            if let Err(e) = reach.drop_seed(&handle).await {
                tracing::warn!("dropping a seed whose process exited: {e}");
            }
            return Err(mitosis_client::Error::Unexpected(
                "the process exited while it was prepared".into(),
            ));
        }
        let seed = MadeSeed {
            host,
            handle: handle.clone(),
            stage,
            index,
        };
        tracing::info!(?seed, "a stage's process prepared itself");
        if !seeds.add(seed) {
            if let Err(e) = reach.drop_seed(&handle).await {
                tracing::warn!("dropping a seed made after its run ended: {e}");
            }
        }
        Ok::<(), mitosis_client::Error>(())
    });
    match made.await {
        Ok(Ok(())) => format!("PREPARED {}/{}\n", channel.stage, channel.index).into_bytes(),
        Ok(Err(e)) => {
            let kind = e
                .kind()
                .map_or_else(|| "Unavailable".to_owned(), |k| format!("{k:?}"));
            error_line(&kind, &e.to_string())
        }
        Err(e) => error_line("Failed", &format!("the prepare did not finish: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_are_one_line() {
        let l = error_line("Denied", "no\nway\r");
        assert_eq!(l, b"ERROR Denied no way \n");
        let long = error_line("Failed", &"x".repeat(5000));
        assert!(long.len() <= PLATFORM_MAX_LINE);
    }

    #[test]
    fn only_the_stages_process_may_ask() {
        assert_eq!(foreign_sender(&[7, 7], 7), None);
        // Not visible from here: not checked.
        assert_eq!(foreign_sender(&[0], 7), None);
        assert_eq!(foreign_sender(&[7, 8], 7), Some(8));
    }

    #[test]
    fn the_channel_says_who_sent() {
        let (theirs, ours) = pair().unwrap();
        let mut theirs = std::os::unix::net::UnixStream::from(theirs);
        io::Write::write_all(&mut theirs, PLATFORM_PREPARE).unwrap();
        let mut buf = [0u8; 64];
        let (n, pid) = recv_with_pid(ours.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], PLATFORM_PREPARE);
        assert_eq!(pid, Some(std::process::id() as i32));
    }

    #[test]
    fn descriptors_sent_on_the_channel_are_refused() {
        let (theirs, ours) = pair().unwrap();
        let sent = std::fs::File::open("/dev/null").unwrap();
        let fds = [sent.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let iov = [io::IoSlice::new(PLATFORM_PREPARE)];
        nix::sys::socket::sendmsg::<()>(theirs.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .unwrap();
        let mut buf = [0u8; 64];
        let got = recv_with_pid(ours.as_raw_fd(), &mut buf);
        assert_eq!(got.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_pair_has_the_greeting_waiting() {
        let (theirs, _ours) = pair().unwrap();
        let mut got = vec![0u8; PLATFORM_GREETING.len()];
        let mut s = std::os::unix::net::UnixStream::from(theirs);
        io::Read::read_exact(&mut s, &mut got).unwrap();
        assert_eq!(got, PLATFORM_GREETING);
    }
}
