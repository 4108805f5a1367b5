//! Cold starts: a bundle's process started afresh, with the caller's stdio, in a container of
//! its own, and stood by until it exits.
//!
//! Nothing is forked: this is what a platform without remote fork does for every new
//! instance (Fn's cold start), so the platform's keep-warm and cold policies, and the
//! load-spike experiment's baselines, start their instances through the same daemon and the
//! same containers as children. The connection behaves as a resume's: `Started`, signals to
//! the process, `Exited`; if the caller goes away, the process is killed.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mitosis_transport::control::{Event, FaultStats, MAX_REQUEST_FRAME, Request, ResumeStats};
use mitosis_transport::frame;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::Daemon;
use crate::errors::{Kind, StartFailed};
use crate::resume::{Stdio, send_event};

/// Names containers of cold starts apart (`cold1`, `cold2`...) from pooled ones and seeds.
static NEXT: AtomicU64 = AtomicU64::new(1);

pub async fn run<R, W>(
    daemon: Arc<Daemon>,
    reader: R,
    mut writer: W,
    bundle: String,
    memory_mib: Option<u64>,
    warm: Option<Duration>,
    stdio: Stdio,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let t0 = Instant::now();
    let started = match stdio {
        Stdio::Passed(fds) => start(&daemon, &bundle, memory_mib, warm, fds).await,
        // Its warm-up would have to be relayed apart from its answers: not yet.
        Stdio::Relayed => Err(StartFailed::NoStdio),
    };
    let container = match started {
        Ok(c) => c,
        Err(e) => {
            tracing::info!("start failed: {e}");
            return send_event(&mut writer, &e.to_event()).await;
        }
    };
    let counters = &daemon.counters;
    counters.children_started.fetch_add(1, Ordering::Relaxed);
    counters.children_running.fetch_add(1, Ordering::Relaxed);
    let total_us = t0.elapsed().as_micros() as u64;
    let stats = ResumeStats {
        container_us: total_us,
        total_us,
        ..ResumeStats::default()
    };
    let pid = container.main_pid().unwrap_or(container.init_pid());
    let _ = send_event(&mut writer, &Event::Started { pid, stats }).await;

    let outcome = stand_by(&container, reader).await;
    counters.children_running.fetch_sub(1, Ordering::Relaxed);
    let (status, mut reason) = match outcome {
        Ok(status) => (status, None),
        Err(e) => (137, Some(format!("lost track of the process: {e}"))),
    };
    if reason.is_none() && status == 128 + libc::SIGKILL {
        reason = crate::resume::oom_reason(&container);
    }
    // Init is gone (or killed here): what is left is its cgroup, off the event loop.
    tokio::task::spawn_blocking(move || {
        if let Err(e) = container.destroy() {
            tracing::warn!("removing a cold start's container: {e}");
        }
    });
    let event = Event::Exited {
        status,
        reason,
        stats: FaultStats::default(),
    };
    send_event(&mut writer, &event).await
}

async fn start(
    daemon: &Daemon,
    dir: &str,
    memory_mib: Option<u64>,
    warm: Option<Duration>,
    fds: Vec<OwnedFd>,
) -> Result<mitosis_container::Container, StartFailed> {
    let stdio: [OwnedFd; 3] = fds.try_into().map_err(|_| StartFailed::NoStdio)?;
    let containers = daemon.containers().map_err(StartFailed::Containers)?;
    let bundle = containers
        .bundle(Path::new(dir), None)
        .map_err(StartFailed::Bundle)?;
    let name = format!("cold{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let container = containers
        .start_instance(&bundle, name, stdio, memory_mib.map(|m| m << 20))
        .await
        .map_err(|why| StartFailed::Container {
            bundle: dir.to_owned(),
            why,
        })?;
    let Some(timeout) = warm else {
        return Ok(container);
    };
    let (container, warmed) = tokio::task::spawn_blocking(move || {
        let warmed = mitosis_container::seed::wait_warm(&container, timeout);
        if warmed.is_err() {
            container.kill();
        }
        (container, warmed)
    })
    .await
    .map_err(|e| StartFailed::Containers(e.to_string()))?;
    match warmed {
        Ok(_) => Ok(container),
        Err(why) => {
            let why = match crate::resume::oom_reason(&container) {
                Some(oom) => format!("{}: {oom}", why.replace("the seed", "the process")),
                None => why.replace("the seed", "the process"),
            };
            tokio::task::spawn_blocking(move || container.destroy());
            Err(StartFailed::NotWarm {
                bundle: dir.to_owned(),
                why,
            })
        }
    }
}

/// Forwards signals to the process until it exits; kills it if the caller goes away. Its
/// status, shell-style (init exits as the process did).
async fn stand_by<R: AsyncRead + Unpin + Send + 'static>(
    container: &mitosis_container::Container,
    mut reader: R,
) -> io::Result<i32> {
    let pidfd = container.init_pidfd()?;
    // SAFETY: the OwnedFd stays open and unchanged for as long as the AsyncFd owns it.
    let exited = unsafe { AsyncFd::register(pidfd) }.map_err(io::Error::from)?;
    // Frames are read by a task of their own: a read is not cancel-safe in a select.
    let (tx, mut requests) = mpsc::channel::<Request>(16);
    let forwarder = tokio::spawn(async move {
        while let Ok(req) = frame::read_limited::<_, Request>(&mut reader, MAX_REQUEST_FRAME).await
        {
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });
    let mut caller_gone = false;
    let status = loop {
        tokio::select! {
            ready = exited.readable() => {
                let mut guard = ready?;
                if let Some(status) = container.exit_status()? {
                    break status.shell_code();
                }
                guard.clear_ready();
            }
            req = requests.recv(), if !caller_gone => match req {
                Some(Request::Signal { signo }) => signal(container, signo),
                Some(_) => {}
                None => {
                    // Nobody holds the result: end the container (its pid namespace).
                    caller_gone = true;
                    container.kill();
                }
            },
        }
    };
    forwarder.abort();
    Ok(status)
}

/// Delivers `signo` to the container's process (to init, which ends the container, if the
/// process is gone already).
fn signal(container: &mitosis_container::Container, signo: i32) {
    let Some(target) = container.main_pid() else {
        container.kill();
        return;
    };
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed. The pid is init's
    // child, read just now: it cannot be reused before init reaps it.
    let sent = unsafe { libc::kill(target, signo) };
    tracing::debug!(target, signo, sent, "forwarded a signal");
}
