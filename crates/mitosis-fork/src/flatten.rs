//! Flattening a child before it is prepared as a seed itself (multi-hop).
//!
//! A capture describes the pages a process *has* (its page tables); a child still lacks the
//! pages it never touched, which its fault handler would fetch from the seed's host. So
//! before a child is prepared, its handler fills every page still pending: the new seed's
//! descriptor then stands alone, and its children never reach back to the older seeds.

use std::sync::Mutex;
use std::time::Instant;

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::uffd::{Copied, Userfaultfd};
use tokio::sync::mpsc;

use crate::fault::{FaultError, FaultStats, Flatten, fill_failed, read_retrying};
use crate::pending::PendingMap;
use crate::source::PageSource;

/// Pages per read while flattening (256 KiB): large reads, well under the page protocol's
/// bound per request.
const RUN_PAGES: u64 = 64;

/// The next flatten request, or never if this handler takes none.
pub(crate) async fn next(rx: &mut Option<mpsc::Receiver<Flatten>>) -> Option<Flatten> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Fills every pending page. `Ok(Some(pages))` once none is left; `Ok(None)` if the child's
/// layout was changing (its events must be read first: call again after).
pub(crate) async fn fill_all<S: PageSource>(
    uffd: &Userfaultfd,
    pending: &mut PendingMap,
    source: &mut S,
    stats: &Mutex<FaultStats>,
) -> Result<Option<u64>, FaultError> {
    let mut filled = 0;
    while let Some(run) = pending.take_first(RUN_PAGES) {
        let started = Instant::now();
        let data = match read_retrying(source, &[(run.seed, run.pages as u32)]).await {
            Ok(data) => data,
            Err(e) => {
                pending.restore_run(run);
                return Err(FaultError::Source(e));
            }
        };
        {
            let mut s = stats.lock().expect("stats");
            s.fetches += 1;
            s.pages_fetched += run.pages;
            s.fetch_us += started.elapsed().as_micros() as u64;
        }
        match uffd.copy(run.child, &data) {
            Ok(Copied::All { .. }) => filled += run.pages,
            Ok(Copied::LayoutChanging { placed }) => {
                pending.restore_run(run.after(placed));
                return Ok(None);
            }
            Err(e) => {
                pending.restore_run(run);
                fill_failed(e)?;
                // Its memory is gone (it exited): nothing is left to flatten.
                return Ok(Some(filled));
            }
        }
    }
    tracing::debug!(pages = filled, page_size = PAGE_SIZE, "flattened");
    Ok(Some(filled))
}
