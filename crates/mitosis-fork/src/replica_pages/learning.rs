//! Learning a seed's working set page by page ([`Prefetch::Learning`]): what a replica's
//! children touch among the pages it fetched for them, reported to the seed's host.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use mitosis_sys::PAGE_SIZE;

use super::{Claim, ReplicaPages};
use crate::source::{PageSource, SourceError, read_runs};

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

impl<S: PageSource + Sync> ReplicaPages<S> {
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

    /// The block a learning fault brings into the replica, while there is budget left.
    pub(super) fn learning_block(&self) -> Option<u64> {
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
    pub(super) async fn read_learning(
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
}

/// The aligned block of `block` pages (a power of two) around `page`, as a run.
fn block_around(page: u64, block: u64) -> (u64, u32) {
    let size = block.max(1).next_power_of_two() * PAGE_SIZE;
    (page & !(size - 1), (size / PAGE_SIZE) as u32)
}
