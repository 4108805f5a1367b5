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
    let mut filled = 0u64;
    let pidfd = entry
        .upgrade()
        .and_then(|e| mitosis_sys::pidfd::open(e.pid).ok());
    let why = loop {
        let Some(entry) = entry.upgrade() else {
            break "replica gone";
        };
        if !daemon.cache.holds(entry.key) {
            break "replica evicted or seed dropped";
        }
        let room = daemon.cache.room_pages().min(STEP_PAGES);
        if room == 0 {
            break "cache full";
        }
        let small = entry.pages().saturating_sub(huge_pages(entry.pid));
        let room = room.min(MAX_REPLICA_PAGES.saturating_sub(small));
        if room == 0 {
            break "replica at its most in 4 KiB pages";
        }
        let runs = entry.pages.next_pending(room);
        if runs.is_empty() {
            break "every page in";
        }
        let added = match entry.pages.fill(&runs).await {
            Ok(added) => added,
            Err(e) => {
                tracing::info!(seed = entry.key.id, "replica fill stopped: {e}");
                break "a fetch failed";
            }
        };
        filled += added;
        if let Some(pidfd) = &pidfd {
            collapse(pidfd, &runs);
        }
        daemon.metrics.replica_pages_filled.inc_by(added);
    };
    tracing::info!(filled, "replica fill ended: {why}");
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
