//! The pages of a replica: this host's cache of a seed, shared by all its children here.
//!
//! A child's missing page is first brought into the replica (fetched from the seed's host
//! once per host, never once per child), then copied to the child from the replica.
//!
//! No lock is held across a fetch: a fill takes the pages it will fetch out of `pending` and
//! marks them in flight, so readers of other pages go on meanwhile and readers of the same
//! pages wait for that fill instead of fetching them twice. A child forked meanwhile counts
//! pages in flight as still to fetch: whether they land in the replica before or after its
//! fork, it finds them there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::uffd::{Copied, Event, Userfaultfd};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::fault::FaultError;
use crate::pending::{PendingMap, Run};
use crate::source::{PageSource, SourceError, read_runs};

mod learning;
mod runs;

pub use learning::Prefetch;
pub use runs::{Bulk, batches, chunk_runs, lacking};
use runs::{covers, overlap, overlaps, take_runs};

/// Pages per request when filling: small enough that several pipeline, large enough that
/// request overhead does not matter.
pub const PIPELINE_PAGES: u64 = 256;
/// Requests a fill keeps in flight.
pub const IN_FLIGHT: usize = 4;
/// How often, and how far apart, a fill refused while the replica's layout changes (a fork
/// in progress) is tried.
const LAYOUT_RETRIES: usize = 200;
const LAYOUT_RETRY_AFTER: std::time::Duration = std::time::Duration::from_micros(500);
/// How many times a read waits out another fill that failed before it gives up.
const WAIT_RETRIES: usize = 3;

pub struct ReplicaPages<S> {
    uffd: AsyncFd<Userfaultfd>,
    memory: RemoteMemory,
    state: Mutex<State>,
    source: S,
    fetched: AtomicU64,
    fetches: AtomicU64,
    fetch_us: AtomicU64,
    /// Ranges each child maps afresh (shared anonymous memory): the replica's pages there are
    /// never a child's.
    fresh: Vec<(u64, u64)>,
    /// The ranges registered with userfaultfd `(start, len)`: the seed's pages and the small
    /// gaps between them ([`ReplicaPages::zero_the_gaps`]).
    registered: Vec<(u64, u64)>,
    /// What a child's fault brings in.
    prefetch: Prefetch,
    /// Pages children touched that the replica had (learning): the seed's host has not
    /// heard of them yet. Sent in batches by [`ReplicaPages::note_touched`].
    touched: Mutex<Vec<u64>>,
    reporting: tokio::sync::Mutex<()>,
    /// Pages learned so far (see [`Prefetch::Learning`]'s budget).
    learned: AtomicU64,
}

/// What a fill in progress says when it ends: `None` until then, then its outcome.
type Outcome = Option<Result<(), SourceError>>;

struct State {
    /// Seed pages nobody has fetched yet.
    pending: PendingMap,
    /// Pages a fill is fetching now, with where it will say it is done.
    in_flight: Vec<(Vec<Run>, watch::Receiver<Outcome>)>,
}

/// A fill's claim on pages: pending pages now its to fetch, and other fills to wait for.
struct Claim {
    wanted: Vec<Run>,
    done: Option<watch::Sender<Outcome>>,
    waits: Vec<watch::Receiver<Outcome>>,
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
        fresh: Vec<(u64, u64)>,
        registered: Vec<(u64, u64)>,
        prefetch: Prefetch,
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ReplicaPages {
            // SAFETY: `Userfaultfd` owns its fd, which stays open and the same for as long as the AsyncFd that owns it.
            uffd: unsafe { AsyncFd::register(uffd) }?,
            // Writable: the seed's own writes to file pages are copied over the mapped file.
            memory: RemoteMemory::open(pid, true)?,
            state: Mutex::new(State {
                pending,
                in_flight: Vec::new(),
            }),
            source,
            fetched: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            fetch_us: AtomicU64::new(0),
            fresh,
            registered,
            prefetch,
            touched: Mutex::new(Vec::new()),
            reporting: tokio::sync::Mutex::new(()),
            learned: AtomicU64::new(0),
        }))
    }

    pub fn counters(&self) -> ReplicaCounters {
        ReplicaCounters {
            pages_fetched: self.fetched.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            fetch_us: self.fetch_us.load(Ordering::Relaxed),
        }
    }

    /// Maps the zero page at every registered page that is none of the seed's and that the
    /// replica lacks: the gaps between the seed's pages, which the seed never touched (small
    /// gaps are registered with its pages so as not to split its mappings). Children forked
    /// after then allocate into them as after a local fork, with no round trip to the daemon
    /// per page: a FINRA validator made 6,500 such zero faults, 50 µs each with its siblings
    /// at it too. Zero pages cost page-table entries only. Returns the pages mapped; none
    /// where the kernel cannot list the present pages at once (PAGEMAP_SCAN, 6.7 and later).
    pub fn zero_the_gaps(&self) -> u64 {
        // Seed pages are missing (pending, in flight) or present: taken in that order, a page a
        // fill brings in meanwhile is in the first, so no seed page is ever zeroed.
        let missing = self.still_missing();
        let uffd = self.uffd.get_ref();
        let mut zeroed = 0;
        let mut zero = |from: u64, to: u64| {
            let mut at = from;
            while at < to {
                while at < to && missing.is_pending(at) {
                    at += PAGE_SIZE;
                }
                let start = at;
                while at < to && !missing.is_pending(at) {
                    at += PAGE_SIZE;
                }
                zeroed += zero_range(uffd, start, at);
            }
        };
        for &(start, len) in &self.registered {
            let end = start + len;
            if self.fresh.iter().any(|&(s, l)| s <= start && end <= s + l) {
                continue;
            }
            let Ok(Some(present)) = self.memory.existing_runs(start, end) else {
                continue;
            };
            let mut at = start;
            for run in present {
                zero(at, run.start);
                at = at.max(run.end);
            }
            zero(at, end);
        }
        zeroed
    }

    /// Up to `max_pages` of the seed pages nobody has fetched or is fetching, lowest first,
    /// as runs for [`ReplicaPages::fill`] (they stay pending until it claims them).
    pub fn next_pending(&self, max_pages: u64) -> Vec<(u64, u32)> {
        let mut state = self.state.lock().expect("replica pages lock");
        let mut taken = Vec::new();
        let mut left = max_pages;
        while left > 0 {
            let Some(run) = state.pending.take_first(left) else {
                break;
            };
            left -= run.pages;
            taken.push(run);
        }
        let runs = taken.iter().map(|r| (r.child, r.pages as u32)).collect();
        taken.into_iter().for_each(|r| state.pending.restore_run(r));
        runs
    }

    /// The seed pages a child forked now must still fetch: those pending and those in
    /// flight (which may land in the replica after the fork).
    pub fn still_missing(&self) -> PendingMap {
        let state = self.state.lock().expect("replica pages lock");
        let mut missing = state.pending.clone();
        for (runs, _) in &state.in_flight {
            runs.iter().for_each(|r| missing.restore_run(*r));
        }
        missing
    }

    /// Takes the pending pages of `runs` to fetch, and notes fills already fetching others.
    fn claim(&self, runs: &[(u64, u32)]) -> Claim {
        let mut state = self.state.lock().expect("replica pages lock");
        Self::claim_locked(&mut state, runs)
    }

    fn claim_locked(state: &mut State, runs: &[(u64, u32)]) -> Claim {
        let waits = state
            .in_flight
            .iter()
            .filter(|(taken, _)| overlaps(taken, runs))
            .map(|(_, done)| done.clone())
            .collect();
        let wanted = take_runs(&mut state.pending, runs);
        let done = (!wanted.is_empty()).then(|| {
            let (tx, rx) = watch::channel(None);
            state.in_flight.push((wanted.clone(), rx));
            tx
        });
        Claim {
            wanted,
            done,
            waits,
        }
    }

    /// Ends a claim: what was not copied in is pending again; waiters learn the outcome.
    fn settle(&self, claim: Claim, uncopied: Vec<Run>, outcome: &Result<u64, SourceError>) {
        let Some(done) = claim.done else { return };
        {
            let mut state = self.state.lock().expect("replica pages lock");
            state
                .in_flight
                .retain(|(_, rx)| !rx.same_channel(&done.subscribe()));
            uncopied
                .into_iter()
                .for_each(|r| state.pending.restore_run(r));
        }
        let _ = done.send(Some(outcome.as_ref().map(|_| ()).map_err(Clone::clone)));
    }

    /// Brings the still-pending pages of `runs` (replica addresses) into the replica, in as
    /// few requests as possible, and waits for those another fill is fetching. Returns how
    /// many pages were pending or in flight.
    pub async fn fill(&self, runs: &[(u64, u32)]) -> Result<u64, SourceError> {
        self.fill_touched(runs, None, None).await
    }

    /// `touched`: the page of `runs` a child faulted on, passed on to the source; `first`: a
    /// claim on `runs` made already.
    async fn fill_touched(
        &self,
        runs: &[(u64, u32)],
        touched: Option<u64>,
        mut first: Option<Claim>,
    ) -> Result<u64, SourceError> {
        let mut total = 0;
        for _ in 0..WAIT_RETRIES {
            let claim = first.take().unwrap_or_else(|| self.claim(runs));
            let waits = claim.waits.clone();
            total += self.fetch_claimed(claim, touched).await?;
            let mut waited_ok = true;
            for mut w in waits {
                let ended = w.wait_for(Option::is_some).await.map(|o| o.clone());
                if let Ok(Some(Err(_))) | Err(_) = ended {
                    waited_ok = false;
                }
                // Pages of these runs were in flight: the seed's, not holes.
                total += 1;
            }
            if waited_ok {
                return Ok(total);
            }
            // Another fill of some of these pages failed: they are pending again.
        }
        Err(SourceError::Unavailable(
            "filling the replica: other fills of the same pages kept failing".into(),
        ))
    }

    /// Fetches the claimed pages pipelined, copying each group in as it lands.
    async fn fetch_claimed(&self, claim: Claim, touched: Option<u64>) -> Result<u64, SourceError> {
        let total: u64 = claim.wanted.iter().map(|r| r.pages).sum();
        if total == 0 {
            self.settle(claim, Vec::new(), &Ok(0));
            return Ok(0);
        }
        let wanted = claim.wanted.clone();
        let groups = batches(&wanted, PIPELINE_PAGES);
        let mut copied = vec![false; groups.len()];
        let mut pipeline = Pipelined::new(&self.source, &groups, touched);
        let result = async {
            while let Some(landed) = pipeline.next().await {
                let (index, data, took) = landed?;
                self.fetches.fetch_add(1, Ordering::Relaxed);
                self.fetch_us
                    .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                self.copy_runs(groups[index], &data).await?;
                copied[index] = true;
            }
            Ok::<_, SourceError>(())
        }
        .await;
        drop(pipeline);
        let result = result.map(|_| total);
        let uncopied: Vec<Run> = groups
            .iter()
            .zip(&copied)
            .filter(|(_, done)| !**done)
            .flat_map(|(group, _)| group.iter().copied())
            .collect();
        if result.is_ok() {
            self.fetched.fetch_add(total, Ordering::Relaxed);
        }
        self.settle(claim, uncopied, &result);
        result
    }

    async fn copy_runs(&self, runs: &[Run], data: &[u8]) -> Result<(), SourceError> {
        let mut at = 0usize;
        for run in runs {
            let len = (run.pages * PAGE_SIZE) as usize;
            self.copy_run(run.child, &data[at..at + len]).await?;
            at += len;
        }
        Ok(())
    }

    /// Places the seed's bytes of one run in the replica. A page that is there already
    /// without being the seed's is overwritten: children forked later copy it as it is.
    async fn copy_run(&self, start: u64, data: &[u8]) -> Result<(), SourceError> {
        let fail = |e: &dyn std::fmt::Display| {
            SourceError::Gone(format!("filling the replica at {start:#x}: {e}"))
        };
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
                // A fork of the replica is in progress: it ends within milliseconds.
                Copied::LayoutChanging { placed: more } => {
                    placed += more as usize;
                    tokio::time::sleep(LAYOUT_RETRY_AFTER).await;
                }
            }
        }
        Err(fail(&"its layout kept changing"))
    }

    /// Installs pages that came in bulk: those still pending are copied in through the
    /// userfaultfd, those of `overlay` (file pages the seed wrote) are written over the mapped
    /// file. Returns how many pages went in.
    pub async fn install_bulk(&self, bulk: &Bulk, overlay: &[Run]) -> Result<u64, SourceError> {
        let mut installed = 0;
        let mut at = 0;
        for &(addr, pages) in &bulk.runs {
            let claim = self.claim(&[(addr, pages)]);
            let mut uncopied = Vec::new();
            let mut result = Ok(0);
            for run in &claim.wanted {
                let from = at + (run.child - addr) as usize;
                let len = (run.pages * PAGE_SIZE) as usize;
                match self.copy_runs(&[*run], &bulk.data[from..from + len]).await {
                    Ok(()) => installed += run.pages,
                    Err(e) => {
                        uncopied.push(*run);
                        result = Err(e);
                    }
                }
            }
            self.settle(claim, uncopied, &result);
            result?;
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
        let mut state = self.state.lock().expect("replica pages lock");
        take_runs(&mut state.pending, runs);
        let total = runs.iter().map(|r| r.1 as u64).sum();
        self.fetched.fetch_add(total, Ordering::Relaxed);
        total
    }

    /// Writes `runs` of file pages the seed wrote (their bytes back to back in `data`).
    pub fn write_overlay(&self, runs: &[(u64, u32)], data: &[u8]) -> Result<(), SourceError> {
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
    fn write(&self, pieces: &[(u64, &[u8])]) -> Result<(), SourceError> {
        self.memory
            .write_pieces(pieces)
            .map_err(|e| SourceError::Gone(format!("writing the seed's file pages: {e}")))
    }

    /// Reads `runs` from the replica, filling what it lacks first. A fault's pages that were
    /// all still to fetch (most of what a new host's first child asks) take the short way:
    /// one request made here rather than in a task of its own, and the bytes handed over as
    /// they came while a task copies them into the replica, not read back from it.
    pub async fn read(
        self: &Arc<Self>,
        runs: &[(u64, u32)],
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        if let (Some(block), &[(page, 1)]) = (self.learning_block(), runs) {
            return self.read_learning(page, block, touched).await;
        }
        let claim = self.claim(runs);
        let pages: u64 = runs.iter().map(|r| r.1 as u64).sum();
        if claim.waits.is_empty() && pages <= PIPELINE_PAGES && covers(&claim.wanted, runs) {
            return self.fetch_whole(claim, touched).await;
        }
        self.fill_touched(runs, touched, Some(claim)).await?;
        read_runs(&self.memory, runs)
            .map_err(|e| SourceError::Gone(format!("the replica is gone: {e}")))
    }

    /// Fetches a claim in one request and returns its bytes at once; a task copies them into
    /// the replica meanwhile (the child waits for its own copy only: about 2.5 µs a page
    /// each). The pages stay in flight until they are in: a reader of them waits for it, a
    /// fork of the replica meanwhile counts them as still to fetch.
    async fn fetch_whole(
        self: &Arc<Self>,
        claim: Claim,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        let wanted = claim.wanted.clone();
        let runs: Vec<(u64, u32)> = wanted.iter().map(|r| (r.seed, r.pages as u32)).collect();
        let started = Instant::now();
        let fetched = match self.source.duplicate().await {
            Ok(mut source) => source.read(runs, touched).await,
            Err(e) => Err(e),
        };
        let data = match fetched {
            Ok(data) => data,
            Err(e) => {
                self.settle(claim, wanted, &Err(e.clone()));
                return Err(e);
            }
        };
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.fetch_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let replica = self.clone();
        let copy = data.clone();
        tokio::spawn(async move {
            let total: u64 = wanted.iter().map(|r| r.pages).sum();
            let (uncopied, outcome) = match replica.copy_runs(&wanted, &copy).await {
                Ok(()) => {
                    replica.fetched.fetch_add(total, Ordering::Relaxed);
                    (Vec::new(), Ok(total))
                }
                Err(e) => (wanted, Err(e)),
            };
            replica.settle(claim, uncopied, &outcome);
        });
        Ok(data)
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
                        // Not the seed's (neither pending nor in flight): a hole, zero.
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

/// Fetches `groups` with up to [`IN_FLIGHT`] requests at once, so the seed host's reads, the
/// network and our copies overlap; each group's bytes come out of [`Pipelined::next`] as
/// they arrive. Dropping it abandons the requests still out.
struct Pipelined<'a, S> {
    source: &'a S,
    groups: &'a [&'a [Run]],
    touched: Option<u64>,
    requests: tokio::task::JoinSet<(usize, Result<Vec<u8>, SourceError>, std::time::Duration)>,
    next: usize,
}

impl<'a, S: PageSource> Pipelined<'a, S> {
    fn new(source: &'a S, groups: &'a [&'a [Run]], touched: Option<u64>) -> Self {
        Pipelined {
            source,
            groups,
            touched,
            requests: tokio::task::JoinSet::new(),
            next: 0,
        }
    }

    /// The next group to land: its index, bytes and how long its request took.
    async fn next(&mut self) -> Option<Result<(usize, Vec<u8>, std::time::Duration), SourceError>> {
        while self.next < self.groups.len() && self.requests.len() < IN_FLIGHT {
            let mut source = match self.source.duplicate().await {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let runs: Vec<(u64, u32)> = self.groups[self.next]
                .iter()
                .map(|r| (r.seed, r.pages as u32))
                .collect();
            let index = self.next;
            let touched = self.touched.filter(|&page| {
                runs.iter()
                    .any(|&(at, n)| (at..at + n as u64 * PAGE_SIZE).contains(&page))
            });
            self.requests.spawn(async move {
                let started = Instant::now();
                let data = source.read(runs, touched).await;
                (index, data, started.elapsed())
            });
            self.next += 1;
        }
        let joined = self.requests.join_next().await?;
        Some(match joined {
            Ok((index, Ok(data), took)) => Ok((index, data, took)),
            Ok((_, Err(e), _)) => Err(e),
            Err(e) => Err(SourceError::Gone(format!("fetch task: {e}"))),
        })
    }
}

/// Maps the zero page over `[start, end)` of a process that never runs: in one call, or page
/// by page where one call stops (a page there already; the process forking meanwhile, which
/// makes userfaultfd answer EAGAIN until the fork is done). Returns the pages mapped.
fn zero_range(uffd: &Userfaultfd, start: u64, end: u64) -> u64 {
    if end <= start {
        return 0;
    }
    if let Ok(mitosis_sys::uffd::Fill::Done) = uffd.zeropage(start, end - start) {
        return (end - start) / PAGE_SIZE;
    }
    let mut zeroed = 0;
    for page in (start..end).step_by(PAGE_SIZE as usize) {
        for _ in 0..ZERO_RETRIES {
            match uffd.zeropage(page, PAGE_SIZE) {
                Ok(mitosis_sys::uffd::Fill::Done) => zeroed += 1,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    continue;
                }
                _ => {}
            }
            break;
        }
    }
    zeroed
}

/// Tries of one page's zero page while its process forks.
const ZERO_RETRIES: usize = 50;

/// A child's page source: its replica.
pub struct FromReplica<S>(pub Arc<ReplicaPages<S>>);

impl<S: PageSource + Sync> PageSource for FromReplica<S> {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        self.0.read(&runs, touched).await
    }

    async fn duplicate(&self) -> Result<Self, SourceError> {
        Ok(FromReplica(self.0.clone()))
    }

    fn fault_around_pages(&self) -> u64 {
        match (self.0.prefetch, self.0.learning_block()) {
            (Prefetch::Blocks(pages), _) => pages,
            // The block goes into the replica; the child gets the page it touched.
            (Prefetch::Learning { .. }, Some(_)) => 1,
            (Prefetch::Learning { block, .. }, None) => block,
        }
    }
}
