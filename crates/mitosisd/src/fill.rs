//! Background fill: a replica whose warm children still fetch pages from the seed's host
//! takes in the rest of the seed's pages between children, so that later children fetch
//! nothing.
//!
//! Seeds whose children read only what the working set brought (most functions) never start
//! one, and keep replicas that small. One that does (a child on a warm host had to fetch
//! [`AFTER_PAGES`] pages or more: it reads parts of the heap no earlier child did) fills in
//! address order, a few requests at a time, while the cache has room for it (it never takes
//! the cache over `--cache-mib`). Each filled stretch is collapsed into huge pages where it
//! can be (`MADV_COLLAPSE`): a fork copies a page-table entry per page, so a replica held in
//! 4 KiB pages costs every child's fork time, and past [`MAX_REPLICA_PAGES`] of those the
//! fill stops. A child's fault on a page the fill is fetching waits for that
//! fetch rather than asking twice. It stops when the replica is evicted or its seed dropped,
//! and for good on a failed fetch (children then fetch on demand, as before).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Daemon;
use crate::replica::Entry;

/// A warm child fetching this many pages or more starts its replica's fill.
pub const AFTER_PAGES: u64 = 16;
/// A replica is not filled past this many pages held as 4 KiB pages (128 MiB). Each child is
/// a fork of the replica, and a fork copies a page-table entry for every such page (pages come
/// in through userfaultfd as 4 KiB pages): measured here, a replica holding the bigheap seed's
/// whole 1 GiB that way made each fork take 24 ms, where fetching the few pages a child reads
/// costs less. Pages collapsed into huge pages do not count.
pub const MAX_REPLICA_PAGES: u64 = 32 * 1024;
/// A huge page, in bytes.
const HUGE: u64 = 2 << 20;
/// Pages asked for at a time: [`mitosis_fork::replica_pages::PIPELINE_PAGES`] per request,
/// [`mitosis_fork::replica_pages::IN_FLIGHT`] requests.
const STEP_PAGES: u64 = 1024;
/// A background fill of more than [`PACE_ABOVE`] pages rests, while children of the replica
/// run (or ran within [`BUSY_WITHIN`]), this many times as long as each step took (at most
/// [`PACE_MAX`]): it takes at most a quarter of the time, so the children it is meant to speed
/// up are not slowed by it for long on a busy host (the 1 GiB bigheap seed's warm children
/// took 44-50 ms during a full-speed fill, 24 ms paced, 15 ms without one). A smaller fill is
/// over soon enough at full speed (json's 60 MiB: its warm children 1.26x a local fork's at
/// full speed, 2.2x paced, as they kept fetching meanwhile). A `Fill` request, whose caller
/// waits for it, never rests.
const PACE: u32 = 3;
const PACE_ABOVE: u64 = 64 * 1024;
const PACE_MAX: std::time::Duration = std::time::Duration::from_millis(50);
const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(200);

/// Starts `entry`'s fill if a child that ran on it warm (`warm`: the replica was there before
/// it) fetched `fetched` pages, the seed is another host's, and none has started yet.
pub fn after_child(daemon: &Arc<Daemon>, entry: &Arc<Entry>, warm: bool, fetched: u64) {
    let remote_seed = entry.key.host != daemon.listen;
    if !daemon.background_fill || !warm || !remote_seed || fetched < AFTER_PAGES {
        return;
    }
    if entry.filling.swap(true, Ordering::Relaxed) {
        return;
    }
    tracing::info!(seed = entry.key.id, host = %entry.key.host, "replica fill started");
    tokio::spawn(run(daemon.clone(), Arc::downgrade(entry)));
}

async fn run(daemon: Arc<Daemon>, entry: std::sync::Weak<Entry>) {
    let large = entry
        .upgrade()
        .is_some_and(|e| e.pages.still_missing().len() > PACE_ABOVE);
    let (filled, why) = fill(&daemon, &entry, large).await;
    tracing::info!(filled, "replica fill ended: {why}");
}

/// Fills `entry` now, as the background fill would, and returns once it is done (every page
/// in, or the cache or the replica's 4 KiB page limit reached): for a workflow whose children
/// all read most of the seed (control request `Fill`). A failed fetch fails it, with the
/// reason.
pub async fn whole(
    daemon: &Arc<Daemon>,
    entry: &Arc<Entry>,
) -> Result<u64, crate::errors::ResumeFailed> {
    let (filled, why) = fill(daemon, &Arc::downgrade(entry), false).await;
    tracing::info!(
        seed = entry.key.id,
        filled,
        "replica filled on request: {why}"
    );
    match why {
        Ended::FetchFailed(e) => Err(crate::errors::ResumeFailed::Fill(e)),
        _ => Ok(filled),
    }
}

/// Why a fill ended.
enum Ended {
    Gone,
    Evicted,
    CacheFull,
    AtMost,
    Complete,
    FetchFailed(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Ended::Gone => "replica gone",
            Ended::Evicted => "replica evicted or seed dropped",
            Ended::CacheFull => "cache full",
            Ended::AtMost => "replica at its most in 4 KiB pages",
            Ended::Complete => "every page in",
            Ended::FetchFailed(e) => e,
        })
    }
}

/// Fills the replica a step at a time until something stops it: pages filled, and why.
/// `pace`: rest between steps while the replica's children run ([`PACE`]).
async fn fill(daemon: &Arc<Daemon>, entry: &std::sync::Weak<Entry>, pace: bool) -> (u64, Ended) {
    let mut filled = 0u64;
    let pidfd = entry
        .upgrade()
        .and_then(|e| mitosis_sys::pidfd::open(e.pid).ok());
    let why = loop {
        let Some(entry) = entry.upgrade() else {
            break Ended::Gone;
        };
        if !daemon.cache.holds(entry.key) {
            break Ended::Evicted;
        }
        let room = daemon.cache.room_pages().min(STEP_PAGES);
        if room == 0 {
            break Ended::CacheFull;
        }
        let small = entry.pages().saturating_sub(huge_pages(entry.pid));
        let room = room.min(MAX_REPLICA_PAGES.saturating_sub(small));
        if room == 0 {
            break Ended::AtMost;
        }
        let runs = entry.pages.next_pending(room);
        if runs.is_empty() {
            break Ended::Complete;
        }
        let step = std::time::Instant::now();
        let added = match entry.pages.fill(&runs).await {
            Ok(added) => added,
            Err(e) => {
                tracing::info!(seed = entry.key.id, "replica fill stopped: {e}");
                break Ended::FetchFailed(format!("filling the replica: {e}"));
            }
        };
        filled += added;
        if let Some(pidfd) = &pidfd {
            collapse(pidfd, &runs);
        }
        daemon.metrics.replica_pages_filled.inc_by(added);
        if pace && busy(&entry) {
            let rest = (step.elapsed() * PACE).min(PACE_MAX);
            drop(entry);
            tokio::time::sleep(rest).await;
        }
    };
    (filled, why)
}

/// Whether children of `entry` run, or ran a moment ago.
fn busy(entry: &Entry) -> bool {
    entry.children.load(Ordering::Relaxed) > 0
        || entry.last_used.lock().expect("entry lock").elapsed() < BUSY_WITHIN
}

/// Collapses the whole huge pages `runs` (replica addresses) reach the end of: with the run
/// before, a huge page the last step left half filled is complete now. One that still lacks
/// a page (a hole the seed never touched) stays as it is.
fn collapse(pidfd: &std::os::fd::OwnedFd, runs: &[(u64, u32)]) {
    for &(at, pages) in runs {
        let end = (at + u64::from(pages) * mitosis_sys::PAGE_SIZE) & !(HUGE - 1);
        // One call per huge page: one that crosses the mapping's edge fails alone.
        let mut block = at & !(HUGE - 1);
        while block < end {
            let _ = mitosis_sys::pidfd::collapse(pidfd, block, HUGE);
            block += HUGE;
        }
    }
}

/// Pages of `pid` held as huge pages (`AnonHugePages` of smaps_rollup), in 4 KiB pages.
fn huge_pages(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 4)
}
