//! The fault path: answers a child's missing-page faults from a [`PageSource`].
//!
//! A page that is pending comes from the seed, together with the pending pages right after it
//! (one round trip for a run); any other missing page is zero. The child's own mremap, madvise,
//! munmap and fork are followed so a page is never taken from the wrong place. If the source
//! fails, the handler returns an error and the caller kills the child: a child never runs on
//! with zero-filled memory where the seed had data.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::uffd::{Copied, Event, Fill, Userfaultfd};
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::pending::PendingMap;
use crate::source::PageSource;

/// Pages fetched per fault: the faulting page and the pending pages right after it.
pub const PREFETCH_PAGES: u64 = 16;

#[derive(Debug, Error)]
pub enum FaultError {
    #[error("page source lost: {0}")]
    Source(String),
    #[error("userfaultfd: {0}")]
    Uffd(#[from] io::Error),
}

/// Counters of one child's faults; the same type the daemon reports to the CLI.
pub use mitosis_transport::control::FaultStats;

/// A fault handler that stopped, and the child's userfaultfd if it still has it.
///
/// The caller must kill the child *before* dropping the userfaultfd: once it is closed, the
/// kernel would fill the child's missing pages with zeros.
pub struct Stopped {
    pub error: FaultError,
    pub uffd: Option<Userfaultfd>,
}

/// Serves faults on `uffd`; returns only when it cannot go on (the caller cancels it when the
/// child exits). Forked copies of the child get handlers of their own.
pub async fn serve<S: PageSource>(
    uffd: Userfaultfd,
    pending: PendingMap,
    source: S,
    stats: Arc<Mutex<FaultStats>>,
) -> Stopped {
    // SAFETY: `Userfaultfd` owns its fd (an OwnedFd), so it stays open and the same for as long as the AsyncFd that owns the Userfaultfd lives.
    let fd = match unsafe { AsyncFd::register(uffd) } {
        Ok(fd) => fd,
        Err(e) => {
            return Stopped {
                error: FaultError::Uffd(e.into()),
                uffd: None,
            };
        }
    };
    let error = match serve_on(&fd, pending, source, stats).await {
        Ok(never) => match never {},
        Err(e) => e,
    };
    Stopped {
        error,
        uffd: Some(fd.into_inner()),
    }
}

/// How long a refused fill waits before it is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_micros(200);

async fn serve_on<S: PageSource>(
    fd: &AsyncFd<Userfaultfd>,
    mut pending: PendingMap,
    mut source: S,
    stats: Arc<Mutex<FaultStats>>,
) -> Result<std::convert::Infallible, FaultError> {
    let mut retry: Vec<u64> = Vec::new();
    loop {
        // A fill refused while another thread changed the layout waits for nothing the uffd
        // will announce (the change ends after its event was read): try again shortly.
        let mut guard = if retry.is_empty() {
            fd.readable().await?
        } else {
            match tokio::time::timeout(RETRY_AFTER, fd.readable()).await {
                Ok(guard) => guard?,
                Err(_) => {
                    retry_all(fd, &mut pending, &mut source, &stats, &mut retry).await?;
                    continue;
                }
            }
        };
        while let Some(event) = guard.get_inner().read_event()? {
            match event {
                Event::PageFault { addr } => {
                    if !resolve(fd.get_ref(), &mut pending, &mut source, &stats, addr).await? {
                        retry.push(addr);
                    }
                }
                Event::Remap { from, to, len } => pending.remap(from, to, len),
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    pending.forget(start, end)
                }
                Event::Fork { uffd } => {
                    let copy = pending.clone();
                    let src = source.duplicate().await.map_err(FaultError::Source)?;
                    let handler = serve_boxed(uffd, copy, src, stats.clone());
                    tokio::spawn(async move {
                        let stopped = handler.await;
                        tracing::warn!(
                            "fault handler of a forked child stopped: {}",
                            stopped.error
                        );
                        // Without a pid to kill, the forked child is left waiting on its
                        // fault rather than handed zero-filled pages.
                        std::mem::forget(stopped.uffd);
                    });
                }
            }
        }
        guard.clear_ready();
        // Fills refused while the layout was changing: the faulting threads still wait.
        retry_all(fd, &mut pending, &mut source, &stats, &mut retry).await?;
    }
}

async fn retry_all<S: PageSource>(
    fd: &AsyncFd<Userfaultfd>,
    pending: &mut PendingMap,
    source: &mut S,
    stats: &Mutex<FaultStats>,
    retry: &mut Vec<u64>,
) -> Result<(), FaultError> {
    for addr in std::mem::take(retry) {
        if !resolve(fd.get_ref(), pending, source, stats, addr).await? {
            retry.push(addr);
        }
    }
    Ok(())
}

type BoxedServe = std::pin::Pin<Box<dyn std::future::Future<Output = Stopped> + Send>>;

/// [`serve`] behind a box, so that it can spawn itself for forked children.
fn serve_boxed<S: PageSource>(
    uffd: Userfaultfd,
    pending: PendingMap,
    source: S,
    stats: Arc<Mutex<FaultStats>>,
) -> BoxedServe {
    Box::pin(serve(uffd, pending, source, stats))
}

/// Fills the page at `addr`; `Ok(false)` if the kernel asked to retry (layout changing).
async fn resolve<S: PageSource>(
    uffd: &Userfaultfd,
    pending: &mut PendingMap,
    source: &mut S,
    stats: &Mutex<FaultStats>,
    addr: u64,
) -> Result<bool, FaultError> {
    let page = addr & !(PAGE_SIZE - 1);
    let Some(run) = pending.take_run(page, PREFETCH_PAGES) else {
        stats.lock().expect("stats").zero_faults += 1;
        return retry_on_again(uffd.zeropage(page, PAGE_SIZE));
    };
    let started = Instant::now();
    let data = source
        .read(vec![(run.seed, run.pages as u32)], Some(run.seed))
        .await
        .map_err(FaultError::Source)?;
    {
        let mut s = stats.lock().expect("stats");
        s.faults += 1;
        s.fetches += 1;
        s.pages_fetched += run.pages;
        s.fetch_us += started.elapsed().as_micros() as u64;
    }
    match uffd.copy(run.child, &data) {
        Ok(Copied::All { .. }) => Ok(true),
        Ok(Copied::LayoutChanging { placed }) => {
            pending.restore_run(run.after(placed));
            Ok(false)
        }
        Err(e) => fill_failed(e),
    }
}

fn retry_on_again(result: io::Result<Fill>) -> Result<bool, FaultError> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
        Err(e) => fill_failed(e),
    }
}

fn fill_failed(e: io::Error) -> Result<bool, FaultError> {
    match e.raw_os_error() {
        // The child's mm is gone (it exited while we fetched): nothing left to fill.
        Some(libc::ESRCH) => Ok(true),
        _ => Err(FaultError::Uffd(e)),
    }
}
