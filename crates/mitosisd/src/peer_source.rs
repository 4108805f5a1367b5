//! The socket page source: a seed's pages fetched from its host's page server.

use std::time::Duration;

use mitosis_descriptor::Handle;
use mitosis_fork::PageSource;
use mitosis_transport::peer::{PeerClient, PeerError};

/// How long one request to a seed's host may take before the child is given up on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PeerSource {
    handle: Handle,
    client: PeerClient,
}

impl PeerSource {
    pub async fn connect(handle: &Handle) -> Result<Self, PeerError> {
        let client =
            PeerClient::attach(handle.host, handle.seed_id, handle.key, REQUEST_TIMEOUT).await?;
        Ok(PeerSource {
            handle: handle.clone(),
            client,
        })
    }

    pub async fn descriptor(&mut self) -> Result<Vec<u8>, PeerError> {
        self.client.descriptor().await
    }
}

impl PageSource for PeerSource {
    async fn read(&mut self, runs: Vec<(u64, u32)>) -> Result<Vec<u8>, String> {
        self.client.pages(runs).await.map_err(|e| e.to_string())
    }

    async fn duplicate(&self) -> Result<Self, String> {
        PeerSource::connect(&self.handle)
            .await
            .map_err(|e| e.to_string())
    }
}
