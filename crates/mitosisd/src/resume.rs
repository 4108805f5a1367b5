//! Resuming a child for a CLI connection and standing by it until it exits.
//!
//! The child is forked from this host's replica of the seed (built on first use). The CLI's
//! stdio becomes the child's; signals the CLI forwards are delivered to it; if the CLI goes
//! away the child is killed; if its page source fails it is killed with the reason.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mitosis_descriptor::Handle;
use mitosis_fork::fault::{self, FaultStats};
use mitosis_sys::pidfd;
use mitosis_transport::control::{self, Event, MAX_REQUEST_FRAME, Request, ResumeStats};
use mitosis_transport::frame;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::Daemon;
use crate::cache::SeedKey;
use crate::errors::{Kind, ResumeFailed};
use crate::metrics::{HostLabels, SeedLabels};
use crate::peer_source::{LocalSource, PeerSource, Source};
use crate::replica::{self, Entry, Forked};

pub async fn run(
    daemon: Arc<Daemon>,
    stream: UnixStream,
    handle: String,
    fds: Vec<OwnedFd>,
) -> io::Result<()> {
    let (mut reader, mut writer) = stream.into_split();
    // A handle that does not parse names no seed: its failure is counted nowhere.
    let labels = handle.parse::<Handle>().ok().map(|h| SeedLabels::of(&h));
    let metrics = &daemon.metrics;
    let (entry, child, stats) = match start(&daemon, &handle, fds).await {
        Ok(started) => started,
        Err(e) => {
            if let Some(labels) = &labels {
                metrics.children_failed.get_or_create(labels).inc();
            }
            tracing::info!("resume failed: {e}");
            return frame::write(&mut writer, &e.to_event())
                .await
                .map_err(io::Error::other);
        }
    };
    let pid = child.pid;
    let container = child.container;
    let counters = &daemon.counters;
    counters.children_started.fetch_add(1, Ordering::Relaxed);
    counters.children_running.fetch_add(1, Ordering::Relaxed);
    entry.children.fetch_add(1, Ordering::Relaxed);
    let labels = SeedLabels {
        seed: entry.key.id,
        seed_host: entry.key.host.to_string(),
    };
    metrics.children_started.get_or_create(&labels).inc();
    metrics.children_running.get_or_create(&labels).inc();
    metrics
        .resume_seconds
        .get_or_create(&HostLabels::of(stats.cached))
        .observe(stats.total_us as f64 / 1e6);
    let _ = frame::write(&mut writer, &Event::Started { pid, stats }).await;

    let fault_stats = Arc::new(Mutex::new(FaultStats::default()));
    let mut handler = tokio::spawn(fault::serve(
        child.uffd,
        pid,
        child.pending,
        child.source,
        fault_stats.clone(),
    ));
    let (tx, mut requests) = mpsc::channel::<Request>(16);
    let forwarder = tokio::spawn(async move {
        while let Ok(req) = frame::read_limited::<_, Request>(&mut reader, MAX_REQUEST_FRAME).await
        {
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });

    // SAFETY: the OwnedFd stays open and unchanged for as long as the AsyncFd owns it.
    let exited = unsafe { AsyncFd::register(child.pidfd) }.map_err(io::Error::from)?;
    let mut reason: Option<String> = None;
    // Held until the child is reaped: closing it first would let the kernel zero-fill.
    let mut stopped_uffd = None;
    let mut handler_done = false;
    let mut cli_gone = false;
    let status = loop {
        tokio::select! {
            ready = exited.readable() => {
                let mut guard = ready?;
                if let Some(status) = pidfd::try_reap(exited.get_ref())? {
                    break status;
                }
                guard.clear_ready();
            }
            result = &mut handler, if !handler_done => {
                handler_done = true;
                let why = match result {
                    // Its memory is gone: the child is exiting (or ran exec).
                    Ok(Ok(())) => continue,
                    Ok(Err(stopped)) => {
                        stopped_uffd = stopped.uffd;
                        stopped.error.to_string()
                    }
                    Err(e) => format!("fault handler crashed: {e}"),
                };
                tracing::warn!(pid, "killing child: {why}");
                reason = Some(why);
                let _ = pidfd::send_signal(exited.get_ref(), libc::SIGKILL);
            }
            req = requests.recv(), if !cli_gone => match req {
                Some(Request::Signal { signo }) => {
                    let sent = pidfd::send_signal(exited.get_ref(), signo);
                    tracing::debug!(pid, signo, ?sent, "forwarded a signal");
                }
                Some(_) => {}
                None => {
                    // The resumer is gone: nobody holds the child's result, so end it.
                    cli_gone = true;
                    let _ = pidfd::send_signal(exited.get_ref(), libc::SIGKILL);
                }
            },
        }
    };
    handler.abort();
    forwarder.abort();
    drop(stopped_uffd);
    if let Some(c) = container {
        if reason.is_none() && status == pidfd::ExitStatus::Signaled(libc::SIGKILL) {
            reason = oom_reason(&c);
        }
        if let Ok(containers) = daemon.containers() {
            containers.pool.release(c);
        }
    }
    counters.children_running.fetch_sub(1, Ordering::Relaxed);
    entry.children.fetch_sub(1, Ordering::Relaxed);
    metrics.children_running.get_or_create(&labels).dec();
    if reason.is_some() {
        metrics.children_failed.get_or_create(&labels).inc();
    }
    // The child's faults grew the replica: make room for it among the others.
    daemon.cache.evict_over_budget(entry.key);
    let stats = *fault_stats.lock().expect("stats");
    metrics.child_faults.inc_by(stats.faults);
    metrics.child_pages_fetched.inc_by(stats.pages_fetched);
    let event = Event::Exited {
        status: status.shell_code(),
        reason,
        stats: control::FaultStats {
            faults: stats.faults,
            zero_faults: stats.zero_faults,
            fetches: stats.fetches,
            pages_fetched: stats.pages_fetched,
            fetch_us: stats.fetch_us,
        },
    };
    frame::write(&mut writer, &event)
        .await
        .map_err(io::Error::other)
}

/// Why a child killed by SIGKILL died, if its container's memory limit did it.
pub(crate) fn oom_reason(c: &mitosis_container::Container) -> Option<String> {
    (c.cgroup().oom_kills() > 0).then(|| match c.cgroup().memory_limit() {
        Some(limit) => format!(
            "out of memory: killed at its container's limit of {} MiB",
            limit >> 20
        ),
        None => "out of memory: killed by its container's memory limit".into(),
    })
}

/// Checks the seed with its host, finds or builds its replica here, and forks the child.
/// Errors are one line for the user.
async fn start(
    daemon: &Arc<Daemon>,
    handle: &str,
    fds: Vec<OwnedFd>,
) -> Result<(Arc<Entry>, Forked, ResumeStats), ResumeFailed> {
    let t0 = Instant::now();
    let handle: Handle = handle.parse()?;
    // stdin, stdout, stderr, and optionally a listening socket for the child's fd 3.
    let mut fds = fds.into_iter();
    let stdio: [OwnedFd; 3] = fds
        .by_ref()
        .take(3)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| ResumeFailed::NoStdio)?;
    let listener = fds.next();
    let mut stats = ResumeStats::default();
    let key = SeedKey {
        host: handle.host,
        id: handle.seed_id,
        key: handle.key,
    };
    let seed = key.seed_ref();

    // Every child checks its seed first: a replica of a dropped seed must serve nothing more.
    // A host without a replica checks with the bootstrap, which the seed's host refuses alike.
    let local = if handle.host == daemon.listen {
        match daemon.registry.authorize(handle.seed_id, &handle.key) {
            Ok(s) => Some(s),
            Err(e) => {
                daemon.cache.remove(key);
                return Err(e.into());
            }
        }
    } else {
        None
    };
    if local.is_none() && daemon.cache.get(key).is_some() {
        if let Err(e) = daemon.pool.attach(handle.host, seed).await {
            if e.is_seed_gone() {
                daemon.cache.remove(key);
            }
            return Err(e.into());
        }
    }
    stats.attach_us = t0.elapsed().as_micros() as u64;

    let build = || async {
        let source = match local {
            Some(seed) => Source::Local(LocalSource::new(seed)),
            None => Source::Peer(PeerSource {
                pool: daemon.pool.clone(),
                addr: handle.host,
                seed,
            }),
        };
        replica::build(daemon, key, source, &mut stats).await
    };
    let (entry, built) = daemon.cache.get_or_build(key, build).await?;
    stats.cached = !built;
    let child = replica::fork(daemon, &entry, stdio, listener, &mut stats).await?;
    daemon.cache.evict_over_budget(key);
    stats.total_us = t0.elapsed().as_micros() as u64;
    Ok((entry, child, stats))
}
