//! Resuming a child for a CLI connection and standing by it until it exits.
//!
//! The CLI's stdio becomes the child's; signals the CLI forwards are delivered to it; if the
//! CLI goes away the child is killed; if its page source fails it is killed with the reason.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mitosis_descriptor::Handle;
use mitosis_fork::fault::{self, FaultStats};
use mitosis_fork::restore::{self, Child};
use mitosis_fork::{PageSource, TwinSource};
use mitosis_sys::{PAGE_SIZE, pidfd};
use mitosis_transport::control::{Event, Request, ResumeStats};
use mitosis_transport::frame;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::Daemon;
use crate::peer_source::PeerSource;

/// Where this child's pages come from: this host's twin, or a peer's page server.
enum Source {
    Local(TwinSource),
    Peer(PeerSource),
}

impl PageSource for Source {
    async fn read(&mut self, runs: Vec<(u64, u32)>) -> Result<Vec<u8>, String> {
        match self {
            Source::Local(s) => s.read(runs).await,
            Source::Peer(s) => s.read(runs).await,
        }
    }

    async fn duplicate(&self) -> Result<Self, String> {
        Ok(match self {
            Source::Local(s) => Source::Local(s.duplicate().await?),
            Source::Peer(s) => Source::Peer(s.duplicate().await?),
        })
    }
}

pub async fn run(
    daemon: Arc<Daemon>,
    stream: UnixStream,
    handle: String,
    fds: Vec<OwnedFd>,
) -> io::Result<()> {
    let (mut reader, mut writer) = stream.into_split();
    let (child, source, stats) = match start(&daemon, &handle, fds).await {
        Ok(started) => started,
        Err(msg) => {
            tracing::info!("resume failed: {msg}");
            return frame::write(&mut writer, &Event::Error(msg))
                .await
                .map_err(io::Error::other);
        }
    };
    let pid = child.pid;
    daemon.children_started.fetch_add(1, Ordering::Relaxed);
    daemon.children_running.fetch_add(1, Ordering::Relaxed);
    let _ = frame::write(&mut writer, &Event::Started { pid, stats }).await;

    let fault_stats = Arc::new(Mutex::new(FaultStats::default()));
    let mut handler = tokio::spawn(fault::serve(
        child.uffd,
        child.pending,
        source,
        fault_stats.clone(),
    ));
    let (tx, mut requests) = mpsc::channel::<Request>(16);
    let forwarder = tokio::spawn(async move {
        while let Ok(req) = frame::read::<_, Request>(&mut reader).await {
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });

    let pidfd = child.pidfd;
    // SAFETY: the OwnedFd stays open and unchanged for as long as the AsyncFd owns it.
    let exited = unsafe { AsyncFd::register(pidfd) }.map_err(io::Error::from)?;
    let mut reason: Option<String> = None;
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
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "fault handler stopped".into(),
                    Err(e) => format!("fault handler crashed: {e}"),
                };
                tracing::warn!(pid, "killing child: {why}");
                reason = Some(why);
                let _ = pidfd::send_signal(exited.get_ref(), libc::SIGKILL);
            }
            req = requests.recv(), if !cli_gone => match req {
                Some(Request::Signal { signo }) => { let _ = pidfd::send_signal(exited.get_ref(), signo); }
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
    daemon.children_running.fetch_sub(1, Ordering::Relaxed);
    let stats = fault_stats.lock().expect("stats").clone();
    let event = Event::Exited {
        status: status.shell_code(),
        reason,
        stats,
    };
    frame::write(&mut writer, &event)
        .await
        .map_err(io::Error::other)
}

/// Fetches the descriptor, plans and builds the child. Errors are one line for the user.
async fn start(
    daemon: &Arc<Daemon>,
    handle: &str,
    fds: Vec<OwnedFd>,
) -> Result<(Child, Source, ResumeStats), String> {
    let t0 = Instant::now();
    let handle: Handle = handle
        .parse()
        .map_err(|e: mitosis_descriptor::HandleError| e.to_string())?;
    let stdio: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| "resume needs the caller's stdin, stdout and stderr".to_string())?;
    let mut stats = ResumeStats::default();

    let (mut source, encoded) = if handle.host == daemon.listen {
        let seed = daemon
            .registry
            .authorize(handle.seed_id, &handle.key)
            .map_err(|e| e.to_string())?;
        (
            Source::Local(TwinSource::new(seed.memory.clone())),
            seed.encoded.clone(),
        )
    } else {
        let mut peer = PeerSource::connect(&handle)
            .await
            .map_err(|e| e.to_string())?;
        stats.connect_us = t0.elapsed().as_micros() as u64;
        let encoded = peer.descriptor().await.map_err(|e| e.to_string())?;
        (Source::Peer(peer), encoded)
    };
    let desc = mitosis_descriptor::decode(&encoded).map_err(|e| e.to_string())?;
    stats.descriptor_us = t0.elapsed().as_micros() as u64;
    let plan = restore::plan(&desc, &daemon.files, daemon.vdso_hash).map_err(|e| e.to_string())?;

    let runs: Vec<(u64, u32)> = plan
        .prefetch_runs()
        .iter()
        .map(|r| (r.seed, r.pages as u32))
        .collect();
    stats.eager_pages = runs.iter().map(|r| r.1 as u64).sum();
    let mut prefetched = Vec::with_capacity(stats.eager_pages as usize * PAGE_SIZE as usize);
    for chunk in batches(&runs, 4096) {
        prefetched.extend(
            source
                .read(chunk)
                .await
                .map_err(|e| format!("fetching pages: {e}"))?,
        );
    }

    let stub = daemon.stub.clone();
    let child = daemon
        .tracer
        .run(move || restore::build(plan, &stub, stdio, &prefetched))
        .await
        .map_err(|e| e.to_string())?;
    stats.spawn_us = child.spawn_us;
    stats.restore_us = child.restore_us;
    stats.total_us = t0.elapsed().as_micros() as u64;
    Ok((child, source, stats))
}

/// Splits runs into requests of at most `max_pages` pages (runs are never split).
fn batches(runs: &[(u64, u32)], max_pages: u64) -> Vec<Vec<(u64, u32)>> {
    let mut out: Vec<Vec<(u64, u32)>> = Vec::new();
    let mut size = 0;
    for &run in runs {
        if out.is_empty() || size + run.1 as u64 > max_pages {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("pushed above").push(run);
        size += run.1 as u64;
    }
    out
}
