//! Where a seed's pages come from: this host's twin, or a peer's page server over the pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mitosis_fork::{PageSource, TwinSource};
use mitosis_transport::peer::{PeerPool, SeedRef};

use crate::registry::Seed;

/// How long one request to a seed's host may take before the child is given up on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    ) -> Result<Vec<u8>, String> {
        self.pool
            .pages(self.addr, self.seed, runs, touched)
            .await
            .map_err(|e| e.to_string())
    }

    async fn duplicate(&self) -> Result<Self, String> {
        Ok(self.clone())
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
    ) -> Result<Vec<u8>, String> {
        let data = self.twin.read(runs, None).await?;
        if let Some(page) = touched {
            self.seed.record(page);
        }
        Ok(data)
    }

    async fn duplicate(&self) -> Result<Self, String> {
        Ok(self.clone())
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
    ) -> Result<Vec<u8>, String> {
        match self {
            Source::Local(s) => s.read(runs, touched).await,
            Source::Peer(s) => s.read(runs, touched).await,
        }
    }

    async fn duplicate(&self) -> Result<Self, String> {
        Ok(self.clone())
    }
}
