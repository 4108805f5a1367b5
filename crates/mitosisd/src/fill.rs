//! Background fill: a replica whose warm children still fetch pages from the seed's host
//! takes in the rest of the seed's pages between children, so that later children fetch
//! nothing.
//!
//! Seeds whose children read only what the working set brought (most functions) never start
//! one, and keep replicas that small. One that does (a child on a warm host had to fetch
//! [`AFTER_PAGES`] pages or more: it reads parts of the heap no earlier child did) fills in
//! address order, a few requests at a time, while the cache has room for it (it never takes
//! the cache over `--cache-mib`) and up to [`MAX_REPLICA_PAGES`]. A child's fault on a page the fill is fetching waits for that
//! fetch rather than asking twice. It stops when the replica is evicted or its seed dropped,
//! and for good on a failed fetch (children then fetch on demand, as before).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Daemon;
use crate::replica::Entry;

/// A warm child fetching this many pages or more starts its replica's fill.
pub const AFTER_PAGES: u64 = 16;
/// A replica is not filled past this many pages (128 MiB). Each child is a fork of the
/// replica, and a fork copies a page-table entry for every 4 KiB page it holds (pages come in
/// through userfaultfd, never as huge pages): measured here, a replica holding the bigheap
/// seed's whole 1 GiB made each fork take 24 ms, where fetching the few pages a child reads
/// costs less.
pub const MAX_REPLICA_PAGES: u64 = 32 * 1024;
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
        let room = room.min(MAX_REPLICA_PAGES.saturating_sub(entry.pages()));
        if room == 0 {
            break "replica at its most";
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
        daemon.metrics.replica_pages_filled.inc_by(added);
    };
    tracing::info!(filled, "replica fill ended: {why}");
}
