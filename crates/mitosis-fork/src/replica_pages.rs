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

/// What a child's fault on a page the replica lacks brings in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// The pending pages of the aligned block of this many pages around it, into the replica
    /// and the child both (see [`PageSource::fault_around_pages`]).
    Blocks(u64),
    /// The block of `block` pages into the replica, the faulted page alone into the child.
    /// The child's first touch of each other page of the block is then a fault too, served
    /// from the replica (no round trip, but about 25 µs a page here, the fault's own cost)
    /// and reported to the seed's host: a seed whose working set nobody has recorded learns
    /// the start of it from its first child, not one page per block: the first `budget`
    /// pages children touch, what the next seeds of a profile need before they can run. Then
    /// faults bring whole blocks (the bulk of a scan comes on demand, or in a fill).
    Learning { block: u64, budget: u64 },
}

/// Touched pages sent to the seed's host at most this often, in one request each.
const TOUCHED_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

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

/// True if `claimed` are exactly `runs`: every page of them was still to fetch.
fn covers(claimed: &[Run], runs: &[(u64, u32)]) -> bool {
    claimed.len() == runs.len()
        && claimed
            .iter()
            .zip(runs)
            .all(|(c, &(at, n))| c.child == at && c.pages == n as u64)
}

fn overlaps(runs: &[Run], wanted: &[(u64, u32)]) -> bool {
    runs.iter().any(|r| {
        wanted
            .iter()
            .any(|&(at, n)| r.child < at + n as u64 * PAGE_SIZE && at < r.end())
    })
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

    /// [`ReplicaPages::claim`] of the aligned block of `block` pages around `page` if `page`
    /// is pending, else of `page` alone (it is here, or on its way); and whether it was.
    fn claim_around(&self, page: u64, block: u64) -> (Claim, bool) {
        let mut state = self.state.lock().expect("replica pages lock");
        if state.pending.is_pending(page) {
            (
                Self::claim_locked(&mut state, &[block_around(page, block)]),
                true,
            )
        } else {
            (Self::claim_locked(&mut state, &[(page, 1)]), false)
        }
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

    /// The block a learning fault brings into the replica, while there is budget left.
    fn learning_block(&self) -> Option<u64> {
        match self.prefetch {
            Prefetch::Learning { block, budget }
                if self.learned.load(Ordering::Relaxed) < budget =>
            {
                Some(block)
            }
            _ => None,
        }
    }

    /// Reads one page a child faulted on, learning ([`Prefetch::Learning`]): a pending page
    /// brings its block into the replica (the seed's host records the page as touched); a
    /// page the replica has, or is bringing in, is noted as touched here and reported.
    async fn read_learning(
        self: &Arc<Self>,
        page: u64,
        block: u64,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        self.learned.fetch_add(1, Ordering::Relaxed);
        let (claim, pending) = self.claim_around(page, block);
        if pending && claim.waits.is_empty() {
            // Every other page of the block was pending too, or is the replica's already.
            let mut offset = 0;
            for r in &claim.wanted {
                if r.child <= page && page < r.end() {
                    offset += (page - r.child) / PAGE_SIZE;
                    break;
                }
                offset += r.pages;
            }
            let data = self.fetch_whole(claim, touched).await?;
            let at = (offset * PAGE_SIZE) as usize;
            return Ok(data[at..at + PAGE_SIZE as usize].to_vec());
        }
        let runs = [(page, 1)];
        if pending {
            let block_runs = [block_around(page, block)];
            self.fill_touched(&block_runs, touched, Some(claim)).await?;
        } else {
            self.fill_touched(&runs, None, Some(claim)).await?;
            if touched.is_some() {
                self.note_touched(page);
            }
        }
        read_runs(&self.memory, &runs)
            .map_err(|e| SourceError::Gone(format!("the replica is gone: {e}")))
    }

    /// Adds `page` to the touched pages to report; the first of a batch sends the batch
    /// [`TOUCHED_EVERY`] later, in one request (a failed report costs the working set those
    /// pages, never a child).
    fn note_touched(self: &Arc<Self>, page: u64) {
        let first = {
            let mut touched = self.touched.lock().expect("touched lock");
            touched.push(page);
            touched.len() == 1
        };
        if !first {
            return;
        }
        let replica = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(TOUCHED_EVERY).await;
            if let Some(replica) = replica.upgrade() {
                replica.report_touched().await;
            }
        });
    }

    /// Sends the touched pages not reported yet to the seed's host now: when a child ends,
    /// so that what it touched is recorded before anyone hears of its end (and drops its
    /// seed, say).
    pub async fn report_touched(&self) {
        // Held across the send: a report that ends a child waits for one under way.
        let _sending = self.reporting.lock().await;
        let pages = std::mem::take(&mut *self.touched.lock().expect("touched lock"));
        if pages.is_empty() {
            return;
        }
        let sent = match self.source.duplicate().await {
            Ok(mut source) => source.record(pages).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::debug!("reporting touched pages: {e}");
        }
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

/// The aligned block of `block` pages (a power of two) around `page`, as a run.
fn block_around(page: u64, block: u64) -> (u64, u32) {
    let size = block.max(1).next_power_of_two() * PAGE_SIZE;
    (page & !(size - 1), (size / PAGE_SIZE) as u32)
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
