//! The pages of a replica: this host's cache of a seed, shared by all its children here.
//!
//! A child's missing page is first brought into the replica (fetched from the seed's host
//! once per host, never once per child), then copied to the child from the replica. Forks
//! take the replica's state under the same lock as fills, so a child's list of pages still to
//! fetch is exactly what the replica lacked at its fork.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::uffd::{Copied, Event, Userfaultfd};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, MutexGuard};

use crate::fault::FaultError;
use crate::pending::{PendingMap, Run};
use crate::source::{PageSource, read_runs};

/// Pages per request when filling: small enough that several pipeline, large enough that
/// request overhead does not matter.
pub const PIPELINE_PAGES: u64 = 256;
/// Requests a fill keeps in flight.
pub const IN_FLIGHT: usize = 4;
/// How often, and how far apart, a fill refused while the replica's layout changes is tried.
const LAYOUT_RETRIES: usize = 20;
const LAYOUT_RETRY_AFTER: std::time::Duration = std::time::Duration::from_micros(500);

pub struct ReplicaPages<S> {
    uffd: AsyncFd<Userfaultfd>,
    memory: RemoteMemory,
    state: Mutex<State<S>>,
    fetched: AtomicU64,
    fetches: AtomicU64,
    fetch_us: AtomicU64,
}

pub struct State<S> {
    pub pending: PendingMap,
    source: S,
}

/// Counters of what a replica fetched from its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounters {
    pub pages_fetched: u64,
    pub fetches: u64,
    pub fetch_us: u64,
}

impl<S: PageSource + Sync> ReplicaPages<S> {
    pub fn new(
        pid: i32,
        uffd: Userfaultfd,
        pending: PendingMap,
        source: S,
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ReplicaPages {
            // SAFETY: `Userfaultfd` owns its fd, which stays open and the same for as long as the AsyncFd that owns it.
            uffd: unsafe { AsyncFd::register(uffd) }?,
            // Writable: the seed's own writes to file pages are copied over the mapped file.
            memory: RemoteMemory::open(pid, true)?,
            state: Mutex::new(State { pending, source }),
            fetched: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            fetch_us: AtomicU64::new(0),
        }))
    }

    pub fn counters(&self) -> ReplicaCounters {
        ReplicaCounters {
            pages_fetched: self.fetched.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            fetch_us: self.fetch_us.load(Ordering::Relaxed),
        }
    }

    /// Holds fills off while a child is forked; the guard's `pending` is what the child lacks.
    pub async fn freeze(&self) -> MutexGuard<'_, State<S>> {
        self.state.lock().await
    }

    /// Brings the still-pending pages of `runs` (replica addresses) into the replica, in as
    /// few requests as possible. Returns how many pages were fetched.
    pub async fn fill(&self, runs: &[(u64, u32)]) -> Result<u64, String> {
        let mut state = self.state.lock().await;
        self.fill_locked(&mut state, runs, None).await
    }

    /// `touched`: the page of `runs` a child faulted on, passed on to the source.
    async fn fill_locked(
        &self,
        state: &mut State<S>,
        runs: &[(u64, u32)],
        touched: Option<u64>,
    ) -> Result<u64, String> {
        let wanted = take_runs(&mut state.pending, runs);
        let total: u64 = wanted.iter().map(|r| r.pages).sum();
        let groups = batches(&wanted, PIPELINE_PAGES);
        let mut copied = vec![false; groups.len()];
        let result = self
            .fetch_and_copy(state, &groups, touched, &mut copied)
            .await;
        if result.is_err() {
            for (group, done) in groups.iter().zip(&copied) {
                if !done {
                    group.iter().for_each(|run| state.pending.restore_run(*run));
                }
            }
        }
        result?;
        self.fetched.fetch_add(total, Ordering::Relaxed);
        Ok(total)
    }

    /// Fetches `groups` pipelined and copies each into the replica as it lands.
    async fn fetch_and_copy(
        &self,
        state: &mut State<S>,
        groups: &[&[Run]],
        touched: Option<u64>,
        copied: &mut [bool],
    ) -> Result<(), String> {
        fetch_pipelined(&state.source, groups, touched, |index, data, took| {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            self.fetch_us
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            self.copy_runs(groups[index], &data)?;
            copied[index] = true;
            Ok(())
        })
        .await
    }

    fn copy_runs(&self, runs: &[Run], data: &[u8]) -> Result<(), String> {
        let mut at = 0usize;
        for run in runs {
            let len = (run.pages * PAGE_SIZE) as usize;
            self.copy_run(run.child, &data[at..at + len])?;
            at += len;
        }
        Ok(())
    }

    /// Places the seed's bytes of one run in the replica. A page that is there already
    /// without being the seed's is overwritten: children forked later copy it as it is.
    fn copy_run(&self, start: u64, data: &[u8]) -> Result<(), String> {
        let fail = |e: &dyn std::fmt::Display| format!("filling the replica at {start:#x}: {e}");
        let mut placed = 0usize;
        for _ in 0..LAYOUT_RETRIES {
            let copied = self
                .uffd
                .get_ref()
                .copy(start + placed as u64, &data[placed..])
                .map_err(|e| fail(&e))?;
            match copied {
                Copied::All { present: 0 } => return Ok(()),
                Copied::All { present } => {
                    tracing::debug!(start, present, "replica pages in place before their fill");
                    return self.write(&[(start, data)]);
                }
                // Forks hold fills off, so the replica's layout changes only briefly, if ever.
                Copied::LayoutChanging { placed: more } => {
                    placed += more as usize;
                    std::thread::sleep(LAYOUT_RETRY_AFTER);
                }
            }
        }
        Err(fail(&"its layout kept changing"))
    }

    /// Installs pages that came in bulk: those still pending are copied in through the
    /// userfaultfd, those of `overlay` (file pages the seed wrote) are written over the mapped
    /// file. Returns how many pages went in.
    pub async fn install_bulk(&self, bulk: &Bulk, overlay: &[Run]) -> Result<u64, String> {
        let mut state = self.state.lock().await;
        let mut installed = 0;
        let mut at = 0;
        for &(addr, pages) in &bulk.runs {
            for run in take_runs(&mut state.pending, &[(addr, pages)]) {
                let from = at + (run.child - addr) as usize;
                let len = (run.pages * PAGE_SIZE) as usize;
                self.copy_runs(&[run], &bulk.data[from..from + len])?;
                installed += run.pages;
            }
            at += pages as usize * PAGE_SIZE as usize;
        }
        let pieces: Vec<(u64, &[u8])> = overlap(&bulk.runs, overlay)
            .into_iter()
            .map(|(page, pages, from)| {
                let len = pages as usize * PAGE_SIZE as usize;
                (page, &bulk.data[from..from + len])
            })
            .collect();
        self.write(&pieces)?;
        installed += pieces
            .iter()
            .map(|p| p.1.len() as u64 / PAGE_SIZE)
            .sum::<u64>();
        self.fetched.fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
    }

    /// Records pages the replica read in itself from a bootstrap stream: no longer pending.
    /// Returns how many went in.
    pub async fn streamed_in(&self, runs: &[(u64, u32)]) -> u64 {
        let mut state = self.state.lock().await;
        take_runs(&mut state.pending, runs);
        let total = runs.iter().map(|r| r.1 as u64).sum();
        self.fetched.fetch_add(total, Ordering::Relaxed);
        total
    }

    /// Writes `runs` of file pages the seed wrote (their bytes back to back in `data`).
    pub fn write_overlay(&self, runs: &[(u64, u32)], data: &[u8]) -> Result<(), String> {
        let mut at = 0;
        let pieces: Vec<(u64, &[u8])> = runs
            .iter()
            .map(|&(addr, pages)| {
                let len = pages as usize * PAGE_SIZE as usize;
                at += len;
                (addr, &data[at - len..at])
            })
            .collect();
        self.write(&pieces)?;
        self.fetched
            .fetch_add(runs.iter().map(|r| r.1 as u64).sum(), Ordering::Relaxed);
        Ok(())
    }

    /// Writes the seed's own pages over the replica's file mappings.
    fn write(&self, pieces: &[(u64, &[u8])]) -> Result<(), String> {
        self.memory
            .write_pieces(pieces)
            .map_err(|e| format!("writing the seed's file pages: {e}"))
    }

    /// Reads `runs` from the replica, filling what it lacks first.
    pub async fn read(&self, runs: &[(u64, u32)], touched: Option<u64>) -> Result<Vec<u8>, String> {
        let _state = {
            let mut state = self.state.lock().await;
            self.fill_locked(&mut state, runs, touched).await?;
            state
        };
        read_runs(&self.memory, runs).map_err(|e| format!("the replica is gone: {e}"))
    }

    /// Follows the replica's userfaultfd: hands each fork's new userfaultfd to `forks`.
    /// The replica itself never runs, so a fault can only come from a read of ours; it is
    /// served like any fill. Returns when the replica is gone.
    pub async fn watch(
        self: Arc<Self>,
        forks: std::sync::mpsc::Sender<Userfaultfd>,
    ) -> Result<(), FaultError> {
        loop {
            let mut guard = self.uffd.readable().await?;
            loop {
                let event = match guard.get_inner().read_event() {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    // The replica exited: its userfaultfd reports no more.
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                match event {
                    Event::Fork { uffd } => {
                        if forks.send(uffd).is_err() {
                            return Ok(());
                        }
                    }
                    Event::PageFault { addr } => {
                        let page = addr & !(PAGE_SIZE - 1);
                        if self.fill(&[(page, 1)]).await.map_err(FaultError::Source)? == 0 {
                            let _ = self.uffd.get_ref().zeropage(page, PAGE_SIZE);
                        }
                    }
                    Event::Remap { .. } | Event::Remove { .. } | Event::Unmap { .. } => {}
                }
            }
            guard.clear_ready();
        }
    }
}

/// Takes the pending pages of `runs` out of `pending`, as runs.
fn take_runs(pending: &mut PendingMap, runs: &[(u64, u32)]) -> Vec<Run> {
    let mut wanted: Vec<Run> = Vec::new();
    for &(addr, pages) in runs {
        let end = addr + pages as u64 * PAGE_SIZE;
        let mut page = addr & !(PAGE_SIZE - 1);
        while page < end {
            match pending.take_run(page, (end - page) / PAGE_SIZE) {
                Some(run) => {
                    page += run.pages * PAGE_SIZE;
                    wanted.push(run);
                }
                None => page += PAGE_SIZE,
            }
        }
    }
    wanted
}

/// Fetches `groups` with up to [`IN_FLIGHT`] requests at once, so the seed host's reads, the
/// network and our copies overlap; `land` gets each group's bytes as they arrive.
async fn fetch_pipelined<S: PageSource>(
    source: &S,
    groups: &[&[Run]],
    touched: Option<u64>,
    mut land: impl FnMut(usize, Vec<u8>, std::time::Duration) -> Result<(), String>,
) -> Result<(), String> {
    let mut requests = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while next < groups.len() && requests.len() < IN_FLIGHT {
            let mut source = source.duplicate().await?;
            let runs: Vec<(u64, u32)> = groups[next]
                .iter()
                .map(|r| (r.seed, r.pages as u32))
                .collect();
            let index = next;
            let touched = touched.filter(|&page| {
                runs.iter()
                    .any(|&(at, n)| (at..at + n as u64 * PAGE_SIZE).contains(&page))
            });
            requests.spawn(async move {
                let started = Instant::now();
                let data = source.read(runs, touched).await;
                (index, data, started.elapsed())
            });
            next += 1;
        }
        let Some(joined) = requests.join_next().await else {
            return Ok(());
        };
        let (index, data, took) = joined.map_err(|e| format!("fetch task: {e}"))?;
        land(index, data?, took)?;
    }
}

/// Pages that arrive in bulk before their replica exists: `runs` (seed addresses, which are
/// the replica's too) and their bytes back to back.
#[derive(Debug)]
pub struct Bulk {
    pub runs: Vec<(u64, u32)>,
    pub data: Vec<u8>,
}

/// The pages of `overlay` that `runs` hold, as `(address, pages, offset of their bytes)` in a
/// bulk of `runs`. Both sorted by address, without overlaps: one sweep over the two.
fn overlap(runs: &[(u64, u32)], overlay: &[Run]) -> Vec<(u64, u32, usize)> {
    let mut out = Vec::new();
    let mut first = 0;
    let mut at = 0;
    for &(addr, pages) in runs {
        let end = addr + pages as u64 * PAGE_SIZE;
        while first < overlay.len() && overlay[first].end() <= addr {
            first += 1;
        }
        for o in overlay[first..].iter().take_while(|o| o.child < end) {
            let (from, to) = (addr.max(o.child), end.min(o.end()));
            if from < to {
                let pages = ((to - from) / PAGE_SIZE) as u32;
                out.push((from, pages, at + (from - addr) as usize));
            }
        }
        at += pages as usize * PAGE_SIZE as usize;
    }
    out
}

/// The pages of `overlay` (sorted) that a bulk of `runs` (sorted) does not hold, as runs.
pub fn lacking(overlay: &[Run], runs: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let held = overlap(runs, overlay);
    let mut held = held.iter().peekable();
    let mut out = Vec::new();
    for run in overlay {
        let (mut page, end) = (run.child, run.end());
        while let Some(&&(from, pages, _)) = held.peek().filter(|h| h.0 < end) {
            if from > page {
                out.push((page, ((from - page) / PAGE_SIZE) as u32));
            }
            page = from + pages as u64 * PAGE_SIZE;
            held.next();
        }
        if page < end {
            out.push((page, ((end - page) / PAGE_SIZE) as u32));
        }
    }
    out
}

/// `runs` cut into consecutive groups of `chunk_pages` pages (the last may be shorter), as a
/// bulk transfer's chunks hold them.
pub fn chunk_runs(runs: &[(u64, u32)], chunk_pages: u32) -> Vec<Vec<(u64, u32)>> {
    let mut out: Vec<Vec<(u64, u32)>> = Vec::new();
    let mut room = 0;
    for &(mut addr, mut pages) in runs {
        while pages > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = chunk_pages;
            }
            let take = pages.min(room);
            out.last_mut().expect("pushed").push((addr, take));
            addr += take as u64 * PAGE_SIZE;
            pages -= take;
            room -= take;
        }
    }
    out
}

/// A child's page source: its replica.
pub struct FromReplica<S>(pub Arc<ReplicaPages<S>>);

impl<S: PageSource + Sync> PageSource for FromReplica<S> {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, String> {
        self.0.read(&runs, touched).await
    }

    async fn duplicate(&self) -> Result<Self, String> {
        Ok(FromReplica(self.0.clone()))
    }
}

/// Splits runs into groups of at most `max_pages` pages (a longer run is a group of its own).
pub fn batches(runs: &[Run], max_pages: u64) -> Vec<&[Run]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, run) in runs.iter().enumerate() {
        if i > start && size + run.pages > max_pages {
            out.push(&runs[start..i]);
            (start, size) = (i, 0);
        }
        size += run.pages;
    }
    if start < runs.len() {
        out.push(&runs[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pages: u64) -> Run {
        Run {
            child: 0,
            seed: 0,
            pages,
        }
    }

    #[test]
    fn chunks_split_runs_at_chunk_boundaries() {
        let p = PAGE_SIZE;
        let chunks = chunk_runs(&[(0x10000, 3), (0x40000, 4), (0x90000, 1)], 4);
        assert_eq!(
            chunks,
            vec![
                vec![(0x10000, 3), (0x40000, 1)],
                vec![(0x40000 + p, 3), (0x90000, 1)],
            ]
        );
        assert!(chunk_runs(&[], 4).is_empty());
    }

    #[test]
    fn overlay_pieces_follow_what_the_bulk_holds() {
        let p = PAGE_SIZE;
        let runs = [(0x10000, 2), (0x20000, 1), (0x30000, 4)];
        let run = |child, pages| Run {
            child,
            seed: child,
            pages,
        };
        let overlay = [
            run(0x10000, 3),     // held, then lacking
            run(0x20000 - p, 2), // lacking, then held
            run(0x30000 + p, 1), // inside a longer bulk run
            run(0x50000, 2),     // not in the bulk at all
        ];
        assert_eq!(
            overlap(&runs, &overlay),
            vec![
                (0x10000, 2, 0),
                (0x20000, 1, 2 * p as usize),
                (0x30000 + p, 1, 4 * p as usize)
            ]
        );
        assert_eq!(
            lacking(&overlay, &runs),
            vec![(0x10000 + 2 * p, 1), (0x20000 - p, 1), (0x50000, 2)]
        );
        assert_eq!(lacking(&overlay, &[]).len(), overlay.len());
        assert!(overlap(&[], &overlay).is_empty());
    }

    #[test]
    fn batches_respect_the_limit() {
        let runs = [run(3), run(2), run(4), run(10), run(1)];
        let sizes: Vec<u64> = batches(&runs, 5)
            .iter()
            .map(|b| b.iter().map(|r| r.pages).sum())
            .collect();
        assert_eq!(sizes, vec![5, 4, 10, 1]);
        assert!(batches(&[], 5).is_empty());
    }
}
