//! The fault path: answers a child's missing-page faults from a [`PageSource`].
//!
//! A page that is pending comes from the seed, together with the pending pages right after it
//! (one round trip for a run); any other missing page is zero. The child's own mremap, madvise,
//! munmap and fork are followed so a page is never taken from the wrong place. If the source
//! fails, the handler returns an error and the caller kills the child: a child never runs on
//! with zero-filled memory where the seed had data.
//!
//! A process the child forks (and each one that process forks, and so on) shares the child's
//! pages copy-on-write and lacks what the child lacked: it gets a handler of its own on the same
//! source, which kills that process itself when the source fails. A handler ends once the
//! memory it serves is gone (its process exited or ran exec).

use std::collections::HashSet;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::pidfd;
use mitosis_sys::uffd::{Copied, Event, Fill, Userfaultfd};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::pending::PendingMap;
use crate::source::{PageSource, SourceError};

/// Pages fetched per fault, by default: the pending pages of the aligned block of this many
/// pages around the faulting page (both sides: a heap's neighbours are touched together).
/// Blocks of 16 cut a first child's faults by a fifth against the 16 pages after the fault
/// (numpy: 179 to 137-146). Where the seed's working set came first (a bootstrap), the rest
/// are strays: small blocks cost least. See [`LEARNING_PREFETCH_PAGES`] for where it did not.
pub const PREFETCH_PAGES: u64 = 16;
/// Pages fetched per fault by a child whose host knew nothing of the seed's working set (a
/// fresh seed's first children): everything it touches is a fault, so larger blocks pay.
/// numpy-as-written's first child: 217 faults and 62 ms with blocks of 16, 67 and 42 ms with
/// 64; numpy 143 and 37 ms, 64 and 35 ms (a fetch of 52 pages takes about 2.2x one of 14).
/// A host that got a bootstrap faults rarely, and there 64 slowed its children (numpy's cold
/// host 11.5 to 16 ms).
pub const LEARNING_PREFETCH_PAGES: u64 = 64;
/// Pages a replica of a seed with a profile learns one by one before its children's faults
/// bring whole blocks ([`crate::replica_pages::Prefetch::Learning`]): what a next seed of
/// the profile gets before its first child runs, 4 MiB, and 25 ms at most here. numpy's
/// first child touches about 400 pages, numpy-as-written's 1,800.
pub const LEARNING_BUDGET_PAGES: u64 = 1024;

#[derive(Debug, Error)]
pub enum FaultError {
    #[error("page source lost: {0}")]
    Source(SourceError),
    #[error("userfaultfd: {0}")]
    Uffd(#[from] io::Error),
}

/// Tries a read from the page source gets, the first included, before a transient failure
/// (a timeout, a broken connection) kills the child.
pub const SOURCE_ATTEMPTS: u32 = 3;
/// Wait before the next try, times the attempts so far.
const SOURCE_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Counters of one child's faults (its forked processes' included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub faults: u64,
    pub zero_faults: u64,
    pub fetches: u64,
    pub pages_fetched: u64,
    pub fetch_us: u64,
}

/// A fault handler that stopped, and the child's userfaultfd if it still has it.
///
/// The caller must kill the child *before* dropping the userfaultfd: once it is closed, the
/// kernel would fill the child's missing pages with zeros.
pub struct Stopped {
    pub error: FaultError,
    pub uffd: Option<Userfaultfd>,
}

/// Serves the faults of process `pid` on its userfaultfd `uffd`. Returns `Ok` once the
/// process's memory is gone (it exited, or ran exec), and `Err` when the handler cannot go on:
/// then the caller kills the process. Processes it forks get handlers of their own.
pub async fn serve<S: PageSource>(
    uffd: Userfaultfd,
    pid: i32,
    pending: PendingMap,
    source: S,
    stats: Arc<Mutex<FaultStats>>,
) -> Result<(), Stopped> {
    serve_process(uffd, Some(pid), pending, source, stats, None).await
}

/// A request to bring in every page the child still lacks (see [`serve_flattenable`]):
/// answered with the pages filled, or why not.
pub type Flatten = oneshot::Sender<Result<u64, FaultError>>;

/// [`serve`], also answering [`Flatten`] requests: the handler fills every pending page of
/// the child, so that nothing of its memory depends on its seed any more (multi-hop: the
/// child is about to be prepared as a seed itself, and a capture reads only the pages a
/// process has). Its forked processes' handlers answer none.
pub async fn serve_flattenable<S: PageSource>(
    uffd: Userfaultfd,
    pid: i32,
    pending: PendingMap,
    source: S,
    stats: Arc<Mutex<FaultStats>>,
    flatten: mpsc::Receiver<Flatten>,
) -> Result<(), Stopped> {
    serve_process(uffd, Some(pid), pending, source, stats, Some(flatten)).await
}

/// [`serve`] for a process whose pid may be unknown (then its forks' pids are too).
async fn serve_process<S: PageSource>(
    uffd: Userfaultfd,
    pid: Option<i32>,
    pending: PendingMap,
    source: S,
    stats: Arc<Mutex<FaultStats>>,
    flatten: Option<mpsc::Receiver<Flatten>>,
) -> Result<(), Stopped> {
    // SAFETY: `Userfaultfd` owns its fd (an OwnedFd), so it stays open and the same for as long as the AsyncFd that owns the Userfaultfd lives.
    let fd = match unsafe { AsyncFd::register(uffd) } {
        Ok(fd) => fd,
        Err(e) => {
            let (uffd, e) = e.into_parts();
            return Err(Stopped {
                error: FaultError::Uffd(e),
                uffd: Some(uffd),
            });
        }
    };
    match serve_on(&fd, pid, pending, source, stats, flatten).await {
        Ok(()) => Ok(()),
        Err(error) => Err(Stopped {
            error,
            uffd: Some(fd.into_inner()),
        }),
    }
}

type BoxedServe = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Stopped>> + Send>>;

/// [`serve_process`] behind a box, so that a handler can start handlers for forked processes.
fn serve_boxed<S: PageSource>(
    uffd: Userfaultfd,
    pid: Option<i32>,
    pending: PendingMap,
    source: S,
    stats: Arc<Mutex<FaultStats>>,
) -> BoxedServe {
    Box::pin(serve_process(uffd, pid, pending, source, stats, None))
}

/// How long a refused fill waits before it is tried again.
pub(crate) const RETRY_AFTER: Duration = Duration::from_micros(200);
/// How long a handler waits for events before it checks that its memory is still there; the
/// wait doubles while nothing happens, up to [`PROBE_MAX`]. No event says the memory is gone.
const PROBE_FIRST: Duration = Duration::from_millis(10);
const PROBE_MAX: Duration = Duration::from_secs(1);

async fn serve_on<S: PageSource>(
    fd: &AsyncFd<Userfaultfd>,
    pid: Option<i32>,
    mut pending: PendingMap,
    mut source: S,
    stats: Arc<Mutex<FaultStats>>,
    mut flatten: Option<mpsc::Receiver<Flatten>>,
) -> Result<(), FaultError> {
    let mut retry: Vec<u64> = Vec::new();
    let mut idle = PROBE_FIRST;
    // The children `pid` had when its last fork was followed.
    let mut children = HashSet::new();
    // A flatten under way: it waits for the layout changes it met to be read.
    let mut flattening: Option<Flatten> = None;
    loop {
        if let Some(reply) = flattening.take() {
            match crate::flatten::fill_all(fd.get_ref(), &mut pending, &mut source, &stats).await {
                Ok(None) => flattening = Some(reply),
                Ok(Some(pages)) => {
                    let _ = reply.send(Ok(pages));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        // A fill refused while another thread changed the layout waits for nothing the uffd
        // will announce (the change ends after its event was read): try again shortly.
        let wait = if retry.is_empty() && flattening.is_none() {
            idle
        } else {
            RETRY_AFTER
        };
        let readable = tokio::select! {
            r = tokio::time::timeout(wait, fd.readable()) => r,
            Some(reply) = crate::flatten::next(&mut flatten) => {
                flattening = Some(reply);
                continue;
            }
        };
        let mut guard = match readable {
            Ok(guard) => {
                idle = PROBE_FIRST;
                guard?
            }
            Err(_) if retry.is_empty() && flattening.is_none() => {
                if gone(fd.get_ref(), &pending) {
                    return Ok(());
                }
                idle = (idle * 2).min(PROBE_MAX);
                continue;
            }
            Err(_) => {
                retry_all(fd, &mut pending, &mut source, &stats, &mut retry).await?;
                continue;
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
                    // The forked process lacks what this one lacks now. Its handler owns its
                    // userfaultfd before anything here waits: dropped while the process lives
                    // (this handler cancelled), the fd would let the kernel zero-fill its pages.
                    let known = std::mem::take(&mut children);
                    let forked = spawn_forked(uffd, pid, known, pending.clone(), stats.clone());
                    let duplicated = source.duplicate().await;
                    let lost = duplicated.as_ref().err().cloned();
                    let _ = forked.source.send(duplicated);
                    // No other event is read until the process is found: see `find_forked`.
                    children = forked.found.await.unwrap_or_default();
                    if let Some(e) = lost {
                        return Err(FaultError::Source(e));
                    }
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

/// Reads `runs` of the seed (a faulted page first), trying again after a transient failure
/// (no answer in time, a broken connection) up to [`SOURCE_ATTEMPTS`] times in all: a child
/// waits out a brief network fault, but never longer than those attempts take, and a gone
/// seed fails at once.
pub(crate) async fn read_retrying<S: PageSource>(
    source: &mut S,
    runs: &[(u64, u32)],
) -> Result<Vec<u8>, SourceError> {
    let mut attempt = 1;
    let touched = runs.first().map(|r| r.0);
    loop {
        match source.read(runs.to_vec(), touched).await {
            Err(e) if e.is_transient() && attempt < SOURCE_ATTEMPTS => {
                tracing::warn!(attempt, "page source: {e}; trying again");
                tokio::time::sleep(SOURCE_RETRY_AFTER * attempt).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Fills the page at `addr`, with the pending pages of its block (the source's
/// [`PageSource::fault_around_pages`]);
/// `Ok(false)` if the kernel asked to retry (layout changing).
async fn resolve<S: PageSource>(
    uffd: &Userfaultfd,
    pending: &mut PendingMap,
    source: &mut S,
    stats: &Mutex<FaultStats>,
    addr: u64,
) -> Result<bool, FaultError> {
    let page = addr & !(PAGE_SIZE - 1);
    let Some(runs) = pending.take_around(page, source.fault_around_pages()) else {
        stats.lock().expect("stats").zero_faults += 1;
        return retry_on_again(uffd.zeropage(page, PAGE_SIZE));
    };
    let started = Instant::now();
    let wanted: Vec<(u64, u32)> = runs.iter().map(|r| (r.seed, r.pages as u32)).collect();
    let data = match read_retrying(source, &wanted).await {
        Ok(data) => data,
        Err(e) => {
            // Still missing: whoever kills the child must not find it gone from the map.
            runs.into_iter().for_each(|r| pending.restore_run(r));
            return Err(FaultError::Source(e));
        }
    };
    let pages: u64 = runs.iter().map(|r| r.pages).sum();
    {
        let mut s = stats.lock().expect("stats");
        s.faults += 1;
        s.fetches += 1;
        s.pages_fetched += pages;
        s.fetch_us += started.elapsed().as_micros() as u64;
    }
    // The faulted run first: copying it wakes the child.
    let mut at = 0usize;
    for (i, run) in runs.iter().enumerate() {
        let len = (run.pages * PAGE_SIZE) as usize;
        match uffd.copy(run.child, &data[at..at + len]) {
            Ok(Copied::All { .. }) => {}
            Ok(Copied::LayoutChanging { placed }) => {
                pending.restore_run(run.after(placed));
                runs[i + 1..].iter().for_each(|r| pending.restore_run(*r));
                // Only the faulted page's run decides whether the fault must be retried.
                return Ok(i > 0);
            }
            Err(e) if i > 0 => {
                // The child's layout changed under a neighbour (unmapped meanwhile): the
                // faulted page is in; the rest are the kernel's to report.
                runs[i..].iter().for_each(|r| pending.restore_run(*r));
                tracing::debug!("fault-around copy at {:#x}: {e}", run.child);
                return Ok(true);
            }
            Err(e) => return fill_failed(e),
        }
        at += len;
    }
    Ok(true)
}

fn retry_on_again(result: io::Result<Fill>) -> Result<bool, FaultError> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
        Err(e) => fill_failed(e),
    }
}

pub(crate) fn fill_failed(e: io::Error) -> Result<bool, FaultError> {
    match e.raw_os_error() {
        // The child's mm is gone (it exited while we fetched): nothing left to fill.
        Some(libc::ESRCH) => Ok(true),
        _ => Err(FaultError::Uffd(e)),
    }
}

/// The page the liveness probe fills: the lowest one the default `vm.mmap_min_addr` (64 KiB
/// at most) lets a process map, so it is hardly ever mapped, let alone registered.
const PROBE_PAGE: u64 = 0x10000;

/// Whether the memory `uffd` serves is gone: its process exited or ran exec. The probe is a
/// zero-fill of a page the seed did not have, which is what a fault there gets anyway, so it
/// changes nothing a process could see: the kernel answers ENOENT where nothing is registered,
/// and ESRCH once the memory is gone.
fn gone(uffd: &Userfaultfd, pending: &PendingMap) -> bool {
    !pending.is_pending(PROBE_PAGE)
        && matches!(uffd.zeropage(PROBE_PAGE, PAGE_SIZE),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH))
}

/// A forked process's handler, just started: it waits for its source, and tells the handler
/// of the process that forked once it has found the new process among that one's children.
struct Spawned<S> {
    source: oneshot::Sender<Result<S, SourceError>>,
    found: oneshot::Receiver<HashSet<i32>>,
}

/// Starts the handler of a process that `parent` forked, whose userfaultfd is `uffd`;
/// `known`: the children `parent` had at its previous fork.
fn spawn_forked<S: PageSource>(
    uffd: Userfaultfd,
    parent: Option<i32>,
    known: HashSet<i32>,
    pending: PendingMap,
    stats: Arc<Mutex<FaultStats>>,
) -> Spawned<S> {
    let (source_tx, source_rx) = oneshot::channel::<Result<S, SourceError>>();
    let (found_tx, found_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (process, children) = match parent {
            Some(parent) => find_forked(parent, known, &uffd, &pending).await,
            None => (None, known),
        };
        let _ = found_tx.send(children);
        let pid = process.as_ref().map(|p| p.pid);
        let error = match source_rx.await {
            Ok(Ok(source)) => match serve_boxed(uffd, pid, pending, source, stats).await {
                Ok(()) => return,
                Err(stopped) => return stop_forked(process, stopped).await,
            },
            Ok(Err(e)) => FaultError::Source(e),
            Err(_) => FaultError::Source(SourceError::Gone(
                "the handler of its parent was cancelled".into(),
            )),
        };
        let uffd = Some(uffd);
        stop_forked(process, Stopped { error, uffd }).await;
    });
    Spawned {
        source: source_tx,
        found: found_rx,
    }
}

/// A forked process, with a pidfd to kill it by (never another process that took its pid).
struct Forked {
    pid: i32,
    pidfd: OwnedFd,
}

/// How long a handler looks for the process a fork made before it serves it without a pid
/// (a process forked with CLONE_PARENT is its parent's sibling, not its child).
const FIND_FOR: Duration = Duration::from_millis(200);
/// How often it looks meanwhile.
const FIND_EVERY: Duration = Duration::from_millis(1);

/// Finds the process `parent` just forked with userfaultfd `uffd`. The kernel says only which
/// userfaultfd serves it; the pid comes from `parent`'s children, of which `known` are those
/// it had at its previous fork. The forking thread waited until the fork's event was read,
/// and the events of other forks of `parent` stay unread until this returns, so the one new
/// child that has not run exec is it. Returns it (`None` if its memory went away first, or it
/// is not found in time) and `parent`'s children now.
async fn find_forked(
    parent: i32,
    known: HashSet<i32>,
    uffd: &Userfaultfd,
    pending: &PendingMap,
) -> (Option<Forked>, HashSet<i32>) {
    let deadline = Instant::now() + FIND_FOR;
    loop {
        let children = children_of(parent);
        let new: Vec<i32> = children
            .iter()
            .copied()
            .filter(|c| !known.contains(c) && !has_execed(*c))
            .collect();
        if let [pid] = new[..] {
            // It may be gone already: then so is its memory, which the next round sees.
            if let Ok(pidfd) = pidfd::open(pid) {
                return (Some(Forked { pid, pidfd }), children.into_iter().collect());
            }
        }
        if gone(uffd, pending) {
            return (None, children.into_iter().collect());
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                parent,
                candidates = ?new,
                "a forked process was not found: if its fault handler fails, it cannot be killed"
            );
            return (None, children.into_iter().collect());
        }
        tokio::time::sleep(FIND_EVERY).await;
    }
}

/// The children of process `pid`: those of each of its threads.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// PF_FORKNOEXEC: set in a forked process until it runs exec.
const PF_FORKNOEXEC: u64 = 0x40;

/// Whether `pid` ran exec since its fork (or is gone): it is not a fork's copy any more.
fn has_execed(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The flags are the seventh field after the closing parenthesis of the command.
            let (_, fields) = stat.rsplit_once(')')?;
            fields.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_none_or(|flags| flags & PF_FORKNOEXEC == 0)
}

/// Kills a forked process whose handler stopped, and closes its userfaultfd only once it is
/// dead: before, the kernel would zero-fill its missing pages.
async fn stop_forked(process: Option<Forked>, stopped: Stopped) {
    let Some(uffd) = stopped.uffd else {
        tracing::error!("the fault handler of a forked process lost its userfaultfd");
        return;
    };
    let Some(Forked { pid, pidfd }) = process else {
        tracing::error!(
            "a forked process's fault handler stopped ({}), and its pid is unknown: it is left waiting",
            stopped.error
        );
        std::mem::forget(uffd);
        return;
    };
    tracing::warn!(pid, "killing a forked child: {}", stopped.error);
    if let Err(e) = pidfd::send_signal(&pidfd, libc::SIGKILL) {
        // Dead already, most likely: the wait below says.
        tracing::warn!(pid, "signalling a forked child: {e}");
    }
    // SAFETY: the OwnedFd stays open and unchanged for as long as the AsyncFd owns it.
    match unsafe { AsyncFd::register(pidfd) } {
        // A pidfd turns readable once its process has exited and released its memory.
        Ok(exited) => {
            let _ = exited.readable().await;
            drop(uffd);
        }
        // It dies all the same; only its userfaultfd stays open.
        Err(_) => std::mem::forget(uffd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with `errors` (in order), then answers one byte per page.
    struct Flaky {
        errors: Vec<SourceError>,
        reads: u32,
    }

    impl PageSource for Flaky {
        async fn read(
            &mut self,
            runs: Vec<(u64, u32)>,
            _: Option<u64>,
        ) -> Result<Vec<u8>, SourceError> {
            self.reads += 1;
            if !self.errors.is_empty() {
                return Err(self.errors.remove(0));
            }
            Ok(vec![7; runs[0].1 as usize])
        }

        async fn duplicate(&self) -> Result<Self, SourceError> {
            Err(SourceError::Gone("not needed".into()))
        }
    }

    fn flaky(errors: Vec<SourceError>) -> Flaky {
        Flaky { errors, reads: 0 }
    }

    #[tokio::test]
    async fn a_timeout_is_tried_again_and_a_gone_seed_is_not() {
        let late = || SourceError::Unavailable("no answer within 5s".into());
        let mut once_late = flaky(vec![late()]);
        assert_eq!(
            read_retrying(&mut once_late, &[(0x1000, 2)]).await,
            Ok(vec![7, 7])
        );
        assert_eq!(once_late.reads, 2);

        let mut always_late = flaky(vec![late(), late(), late(), late()]);
        assert_eq!(
            read_retrying(&mut always_late, &[(0x1000, 1)]).await,
            Err(late())
        );
        assert_eq!(always_late.reads, SOURCE_ATTEMPTS);

        let gone = SourceError::Gone("no seed 3".into());
        let mut dropped = flaky(vec![gone.clone()]);
        assert_eq!(read_retrying(&mut dropped, &[(0x1000, 1)]).await, Err(gone));
        assert_eq!(dropped.reads, 1);
    }
}
