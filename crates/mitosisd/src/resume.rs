//! Resuming a child for a control connection and standing by it until it exits.
//!
//! The child is forked from this host's replica of the seed (built on first use). The CLI's
//! stdio becomes the child's (unix socket), or the daemon makes its pipes and relays them on
//! the connection (TCP, see `relay`); signals the client forwards are delivered to it; if the
//! client goes away the child is killed; if its page source fails it is killed with the
//! reason.

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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Daemon;
use crate::cache::SeedKey;
use crate::errors::{Kind, ResumeFailed};
use crate::metrics::{HostLabels, SeedLabels};
use crate::peer_source::{LocalSource, PeerSource, Source};
use crate::relay::{self, Relay, StdinFeed};
use crate::replica::{self, Entry, Forked};

/// Events queued for a connection's writer: few, so a slow client stops the relay's pumps.
const EVENT_QUEUE: usize = 8;
/// How long one event may wait for the client to read before the connection is given up
/// (and the child killed).
const EVENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a child's stdio comes from.
pub enum Stdio {
    /// The caller's descriptors (stdin, stdout, stderr, and a listening socket for fd 3),
    /// passed with the request on the unix socket.
    Passed(Vec<OwnedFd>),
    /// Pipes the daemon makes, relayed on the connection (TCP).
    Relayed,
}

/// Writes one event and flushes it (a TLS stream holds written bytes until flushed).
pub async fn send_event<W: AsyncWrite + Unpin>(writer: &mut W, event: &Event) -> io::Result<()> {
    frame::write(writer, event)
        .await
        .map_err(io::Error::other)?;
    writer.flush().await
}

pub async fn run<R, W>(
    daemon: Arc<Daemon>,
    reader: R,
    mut writer: W,
    handle: String,
    memory_mib: Option<u64>,
    stdio: Stdio,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // A handle that does not parse names no seed: its failure is counted nowhere.
    let labels = handle.parse::<Handle>().ok().map(|h| SeedLabels::of(&h));
    let metrics = &daemon.metrics;
    let (entry, child, stats, ends) = match start(&daemon, &handle, memory_mib, stdio).await {
        Ok(started) => started,
        Err(e) => {
            if let Some(labels) = &labels {
                metrics.children_failed.get_or_create(labels).inc();
            }
            tracing::info!("resume failed: {e}");
            return send_event(&mut writer, &e.to_event()).await;
        }
    };
    let pid = child.pid;
    // Registered by pid: a seed made of this child (prepared again) takes its container.
    let container = match (child.container, &entry.bundle) {
        (Some(c), Some(bundle)) => {
            let bundle = mitosis_descriptor::ContainerRef {
                bundle: bundle.dir.to_string_lossy().into_owned(),
                digest: bundle.digest,
                // Read when it is prepared.
                tmpfs: Vec::new(),
            };
            Some(daemon.child_containers.add(pid, c, bundle))
        }
        (Some(c), None) => Some(std::sync::Arc::new(Mutex::new(Some(c)))),
        (None, _) => None,
    };
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
    let warm = stats.cached;
    let (events, queued) = mpsc::channel::<Event>(EVENT_QUEUE);
    let writing = tokio::spawn(write_events(writer, queued));
    let _ = events.send(Event::Started { pid, stats }).await;
    // Started goes first: the pumps queue after it.
    let (relay, feed) = match ends.map(|ends| Relay::start(ends, &events)) {
        Some(Ok((relay, feed))) => (Some(relay), Some(feed)),
        Some(Err(e)) => {
            tracing::warn!(pid, "relaying the child's stdio: {e}");
            (None, None)
        }
        None => (None, None),
    };

    let fault_stats = Arc::new(Mutex::new(FaultStats::default()));
    let flatten = daemon.flatteners.add(pid);
    let mut handler = tokio::spawn(fault::serve_flattenable(
        child.uffd,
        pid,
        child.pending,
        child.source,
        fault_stats.clone(),
        flatten,
    ));
    let (tx, mut requests) = mpsc::channel::<i32>(16);
    let forwarder = tokio::spawn(forward(reader, tx, feed));

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
                Some(signo) => {
                    let sent = pidfd::send_signal(exited.get_ref(), signo);
                    tracing::debug!(pid, signo, ?sent, "forwarded a signal");
                }
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
    if let Some(relay) = relay {
        relay.finish().await;
    }
    drop(stopped_uffd);
    daemon.child_containers.remove(pid);
    // Empty if a seed made of the child took it: it goes with that seed.
    if let Some(c) = container.and_then(|slot| slot.lock().expect("child container").take()) {
        if reason.is_none() && status == pidfd::ExitStatus::Signaled(libc::SIGKILL) {
            reason = oom_reason(&c);
        }
        if let Ok(containers) = daemon.containers() {
            containers.pool.release(c);
        }
    }
    daemon.flatteners.remove(pid);
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
    crate::fill::after_child(&daemon, &entry, warm, stats.pages_fetched);
    entry.pages.report_touched().await;
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
    let _ = events.send(event).await;
    drop(events);
    writing.await.map_err(io::Error::other)?
}

/// Writes queued events in order, each within [`EVENT_WRITE_TIMEOUT`].
async fn write_events<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queued: mpsc::Receiver<Event>,
) -> io::Result<()> {
    while let Some(event) = queued.recv().await {
        tokio::time::timeout(EVENT_WRITE_TIMEOUT, send_event(&mut writer, &event))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client reads nothing"))??;
    }
    Ok(())
}

/// Reads the client's requests while the child runs: signals go to `signals`, relayed stdin
/// to `feed`. Ends (and so has the child killed) when the client goes away or breaks the
/// protocol; never waits for the child, so a signal always gets through.
async fn forward<R: AsyncRead + Unpin>(
    mut reader: R,
    signals: mpsc::Sender<i32>,
    mut feed: Option<StdinFeed>,
) {
    loop {
        let request = match frame::read_limited::<_, Request>(&mut reader, MAX_REQUEST_FRAME).await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("a running child's connection ended: {e}");
                return;
            }
        };
        let fed = match (request, &mut feed) {
            (Request::Signal { signo }, _) => {
                if signals.send(signo).await.is_err() {
                    return;
                }
                Ok(())
            }
            (Request::Stdin(data), Some(feed)) => feed.data(data),
            (Request::StdinEof, Some(feed)) => {
                feed.eof();
                Ok(())
            }
            // The child has the caller's own stdin, or this is another request: nothing to do.
            (other, _) => {
                tracing::debug!("ignored a request while a child runs: {other:?}");
                Ok(())
            }
        };
        if let Err(e) = fed {
            tracing::info!("ending a running child's connection: {e}");
            return;
        }
    }
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
    memory_mib: Option<u64>,
    stdio: Stdio,
) -> Result<(Arc<Entry>, Forked, ResumeStats, Option<relay::Ends>), ResumeFailed> {
    let t0 = Instant::now();
    let handle: Handle = handle.parse()?;
    let (stdio, listener, ends) = match stdio {
        // stdin, stdout, stderr, and optionally a listening socket for the child's fd 3.
        Stdio::Passed(fds) => {
            let mut fds = fds.into_iter();
            let stdio: [OwnedFd; 3] = fds
                .by_ref()
                .take(3)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| ResumeFailed::NoStdio)?;
            (stdio, fds.next(), None)
        }
        Stdio::Relayed => {
            let (stdio, ends) = relay::pipes().map_err(ResumeFailed::Pipes)?;
            (stdio, None, Some(ends))
        }
    };
    let mut stats = ResumeStats::default();
    let (entry, key) = replica_of(daemon, &handle, t0, &mut stats).await?;
    let child = replica::fork(daemon, &entry, stdio, listener, memory_mib, &mut stats).await?;
    daemon.cache.evict_over_budget(key);
    stats.total_us = t0.elapsed().as_micros() as u64;
    Ok((entry, child, stats, ends))
}

/// This host's replica of the seed behind `handle`: checked with the seed's host, built
/// here if there is none (`stats` say how long each step took).
pub async fn replica_of(
    daemon: &Arc<Daemon>,
    handle: &Handle,
    t0: Instant,
    stats: &mut ResumeStats,
) -> Result<(Arc<Entry>, SeedKey), ResumeFailed> {
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
        replica::build(daemon, key, source, stats).await
    };
    let (entry, built) = daemon.cache.get_or_build(key, build).await?;
    stats.cached = !built;
    Ok((entry, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mitosis_transport::control::{MAX_STDIO_CHUNK, STDIN_WINDOW};
    use tokio::io::AsyncWriteExt;

    /// Runs `forward` on what `client` writes; the signals it passed, once it ended.
    async fn forwarded(client: Vec<u8>, relayed: bool) -> Vec<i32> {
        let (mut near, far) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = mpsc::channel(16);
        let (_child, ends) = relay::pipes().unwrap();
        let (events, _queued) = mpsc::channel(64);
        let (_relay, feed) = Relay::start(ends, &events).unwrap();
        let task = tokio::spawn(forward(far, tx, relayed.then_some(feed)));
        near.write_all(&client).await.unwrap();
        drop(near);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("forward ends on its own")
            .unwrap();
        let mut got = Vec::new();
        while let Some(s) = rx.recv().await {
            got.push(s);
        }
        got
    }

    fn frames(requests: &[Request]) -> Vec<u8> {
        requests.iter().flat_map(frame::encode).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_or_malformed_frame_ends_the_connection() {
        let mut oversized = frames(&[Request::Signal { signo: 10 }]);
        oversized.extend_from_slice(&(MAX_REQUEST_FRAME as u32 + 1).to_le_bytes());
        // The rest is never read: the header alone is refused.
        oversized.extend_from_slice(&frames(&[Request::Signal { signo: 12 }]));
        assert_eq!(forwarded(oversized, true).await, [10]);

        let mut malformed = frames(&[Request::Signal { signo: 10 }]);
        malformed.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        malformed.extend_from_slice(&frames(&[Request::Signal { signo: 12 }]));
        assert_eq!(forwarded(malformed, true).await, [10]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_past_the_window_ends_the_connection_and_signals_pass_before() {
        // The child reads nothing: its pipe holds 64 KiB, then the window fills.
        let chunk = || Request::Stdin(vec![1; MAX_STDIO_CHUNK]);
        let mut requests: Vec<Request> = (0..STDIN_WINDOW / MAX_STDIO_CHUNK)
            .map(|_| chunk())
            .collect();
        requests.push(Request::Signal { signo: 15 });
        requests.extend((0..4).map(|_| chunk()));
        requests.push(Request::Signal { signo: 9 });
        requests.push(Request::Signal { signo: 9 });
        let got = forwarded(frames(&requests), true).await;
        assert_eq!(got[0], 15, "{got:?}");
        assert!(
            got.len() < 3,
            "the connection ended past the window: {got:?}"
        );

        // A chunk larger than the protocol's, within a frame, is refused too.
        let big = frames(&[
            Request::Stdin(vec![0; MAX_STDIO_CHUNK + 1]),
            Request::Signal { signo: 1 },
        ]);
        assert_eq!(forwarded(big, true).await, Vec::<i32>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eof_ends_the_forwarding() {
        let got = forwarded(
            frames(&[Request::StdinEof, Request::Signal { signo: 2 }]),
            true,
        )
        .await;
        assert_eq!(got, [2]);
        // Stdin on a connection without a relay (the unix socket) is ignored.
        let got = forwarded(
            frames(&[Request::Stdin(vec![1]), Request::Signal { signo: 3 }]),
            false,
        )
        .await;
        assert_eq!(got, [3]);
    }
}
