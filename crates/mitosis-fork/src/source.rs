//! Where a child's missing pages come from.

use std::future::Future;
use std::sync::Arc;

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::mem::RemoteMemory;
use thiserror::Error;

/// Why a page source could not give pages. The fault path retries what is transient and
/// kills a child only when its seed's pages are gone for good.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SourceError {
    /// The seed, or its memory, is gone (dropped, its host restarted, its twin dead), or the
    /// source answered with something unusable: what needs these pages must die.
    #[error("{0}")]
    Gone(String),
    /// No answer in time, or a broken connection: another try may succeed.
    #[error("{0}")]
    Unavailable(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable(_))
    }
}

/// A source of seed pages, behind the one fault path. The daemon has a socket implementation
/// (a peer's page server); [`TwinSource`] reads a twin on this very host.
pub trait PageSource: Send + Sized + 'static {
    /// Reads runs `(seed address, pages)`; returns their bytes back to back. `touched` is the
    /// page of them a child faulted on, if any (the rest is prefetch): the seed's host records
    /// it in the working set.
    fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> impl Future<Output = Result<Vec<u8>, SourceError>> + Send;

    /// Another handle to the same source, for a forked child's fault handler.
    fn duplicate(&self) -> impl Future<Output = Result<Self, SourceError>> + Send;

    /// The block a fault brings in whole (its pending pages, in one request).
    fn fault_around_pages(&self) -> u64 {
        crate::fault::PREFETCH_PAGES
    }

    /// Tells the seed's host that children touched `pages` (page addresses), which it served
    /// earlier as another page's neighbours: it adds them to the working set. Nothing, for a
    /// source that records no working set.
    fn record(&mut self, pages: Vec<u64>) -> impl Future<Output = Result<(), SourceError>> + Send {
        let _ = pages;
        async { Ok(()) }
    }
}

/// Pages read straight from a twin's memory on this host.
#[derive(Clone)]
pub struct TwinSource {
    memory: Arc<RemoteMemory>,
}

impl TwinSource {
    pub fn new(memory: Arc<RemoteMemory>) -> Self {
        TwinSource { memory }
    }
}

impl PageSource for TwinSource {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        _: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        read_runs(&self.memory, &runs)
            .map_err(|e| SourceError::Gone(format!("the seed's twin is gone: {e}")))
    }

    async fn duplicate(&self) -> Result<Self, SourceError> {
        Ok(self.clone())
    }
}

/// Reads page runs from a twin into one buffer.
pub fn read_runs(memory: &RemoteMemory, runs: &[(u64, u32)]) -> std::io::Result<Vec<u8>> {
    let total: usize = runs.iter().map(|r| r.1 as usize * PAGE_SIZE as usize).sum();
    let mut out = vec![0u8; total];
    read_runs_into(memory, runs, &mut out)?;
    Ok(out)
}

/// Reads page runs from a twin into `out`, back to back; `out` holds exactly their bytes.
pub fn read_runs_into(
    memory: &RemoteMemory,
    runs: &[(u64, u32)],
    out: &mut [u8],
) -> std::io::Result<()> {
    let mut pieces = Vec::with_capacity(runs.len());
    let mut rest = out;
    for &(addr, pages) in runs {
        let (piece, after) = rest.split_at_mut(pages as usize * PAGE_SIZE as usize);
        pieces.push((addr, piece));
        rest = after;
    }
    memory.read_pieces(&mut pieces)
}
