//! Where a seed's pages come from: this host's twin, or a peer's page server over the pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mitosis_fork::{PageSource, SourceError, TwinSource};
use mitosis_transport::FrameError;
use mitosis_transport::peer::{PeerError, PeerPool, RemoteError, SeedRef};

use crate::registry::Seed;

/// How long one request to a seed's host may take before the child is given up on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a failed page request means for the children that need those pages: a seed that is
/// gone, or an answer that makes no sense, is final; no answer in time or a broken connection
/// may pass.
fn source_error(e: PeerError) -> SourceError {
    let transient = match &e {
        PeerError::Connect(..)
        | PeerError::Timeout(..)
        | PeerError::NoHello(..)
        | PeerError::Busy(..)
        | PeerError::Frame(_, FrameError::Closed | FrameError::Io(_)) => true,
        PeerError::Remote(_, RemoteError::SeedGone(_)) => false,
        _ => false,
    };
    if transient {
        SourceError::Unavailable(e.to_string())
    } else {
        SourceError::Gone(e.to_string())
    }
}

/// A seed's pages on a peer, fetched over pooled connections.
#[derive(Clone)]
pub struct PeerSource {
    pub pool: Arc<PeerPool>,
    pub addr: SocketAddr,
    pub seed: SeedRef,
}

impl PageSource for PeerSource {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        self.pool
            .pages(self.addr, self.seed, runs, touched)
            .await
            .map_err(source_error)
    }

    async fn duplicate(&self) -> Result<Self, SourceError> {
        Ok(self.clone())
    }

    async fn record(&mut self, pages: Vec<u64>) -> Result<(), SourceError> {
        self.pool
            .touched(self.addr, self.seed, pages)
            .await
            .map_err(source_error)
    }
}

/// A seed of this host: read from its twin, recording the working set as the page server does.
#[derive(Clone)]
pub struct LocalSource {
    pub seed: Arc<Seed>,
    twin: TwinSource,
}

impl LocalSource {
    pub fn new(seed: Arc<Seed>) -> Self {
        LocalSource {
            twin: TwinSource::new(seed.memory.clone()),
            seed,
        }
    }
}

impl PageSource for LocalSource {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        let data = self.twin.read(runs, None).await?;
        if let Some(page) = touched {
            self.seed.record(page);
        }
        Ok(data)
    }

    async fn duplicate(&self) -> Result<Self, SourceError> {
        Ok(self.clone())
    }

    async fn record(&mut self, pages: Vec<u64>) -> Result<(), SourceError> {
        self.seed
            .record_touched(&pages)
            .map_err(|e| SourceError::Gone(e.to_string()))
    }
}

/// Either kind, behind the one fault path.
#[derive(Clone)]
pub enum Source {
    Local(LocalSource),
    Peer(PeerSource),
}

impl PageSource for Source {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        match self {
            Source::Local(s) => s.read(runs, touched).await,
            Source::Peer(s) => s.read(runs, touched).await,
        }
    }

    async fn duplicate(&self) -> Result<Self, SourceError> {
        Ok(self.clone())
    }

    async fn record(&mut self, pages: Vec<u64>) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.record(pages).await,
            Source::Peer(s) => s.record(pages).await,
        }
    }
}
