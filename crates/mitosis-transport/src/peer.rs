//! The page server protocol between daemons, and its client.
//!
//! A connection is bound to one seed by `Attach` (seed id + key); after that it serves the
//! descriptor and page reads. The seed's CPU is never involved: pages are read from its frozen
//! twin by the seed host's daemon.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::frame::{self, FrameError};

pub use mitosis_descriptor::KEY_LEN;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Attach {
        seed_id: u64,
        key: [u8; KEY_LEN],
    },
    Descriptor,
    /// Runs of whole pages `(address, page count)`; the reply holds them back to back.
    Pages {
        runs: Vec<(u64, u32)>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Attached,
    Descriptor(#[serde(with = "serde_bytes")] Vec<u8>),
    Pages(#[serde(with = "serde_bytes")] Vec<u8>),
    Error(RemoteError),
}

/// Why a seed's host refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum RemoteError {
    #[error("no seed {0} on that host (never prepared, or dropped)")]
    NoSuchSeed(u64),
    #[error("wrong key for seed {0}")]
    WrongKey(u64),
    #[error("the connection is not attached to a seed")]
    NotAttached,
    #[error("page range {0:#x}+{1} is outside the seed's memory")]
    BadRange(u64, u32),
    #[error("the seed's memory is gone: {0}")]
    SeedGone(String),
    #[error("request too large")]
    TooLarge,
}

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot reach host {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("host {0} did not answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("host {0}: {1}")]
    Remote(SocketAddr, RemoteError),
    #[error("host {0}: {1}")]
    Frame(SocketAddr, FrameError),
    #[error("host {0} sent an unexpected reply")]
    Protocol(SocketAddr),
}

/// A connection to a seed's host, attached to that seed.
pub struct PeerClient {
    addr: SocketAddr,
    stream: TcpStream,
    timeout: Duration,
}

impl PeerClient {
    /// Connects to `addr` and attaches to `seed_id` with `key`.
    pub async fn attach(
        addr: SocketAddr,
        seed_id: u64,
        key: [u8; KEY_LEN],
        request_timeout: Duration,
    ) -> Result<Self, PeerError> {
        let stream = timeout(request_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::Timeout(addr, request_timeout))?
            .map_err(|e| PeerError::Connect(addr, e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| PeerError::Connect(addr, e.to_string()))?;
        let mut client = PeerClient {
            addr,
            stream,
            timeout: request_timeout,
        };
        match client.call(&Request::Attach { seed_id, key }).await? {
            Response::Attached => Ok(client),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fetches the seed's encoded descriptor.
    pub async fn descriptor(&mut self) -> Result<Vec<u8>, PeerError> {
        match self.call(&Request::Descriptor).await? {
            Response::Descriptor(d) => Ok(d),
            _ => Err(PeerError::Protocol(self.addr)),
        }
    }

    /// Reads the given page runs; the result is their bytes back to back.
    pub async fn pages(&mut self, runs: Vec<(u64, u32)>) -> Result<Vec<u8>, PeerError> {
        let want: usize = runs.iter().map(|r| r.1 as usize * 4096).sum();
        match self.call(&Request::Pages { runs }).await? {
            Response::Pages(p) if p.len() == want => Ok(p),
            _ => Err(PeerError::Protocol(self.addr)),
        }
    }

    async fn call(&mut self, req: &Request) -> Result<Response, PeerError> {
        let addr = self.addr;
        let exchange = async {
            frame::write(&mut self.stream, req).await?;
            frame::read::<_, Response>(&mut self.stream).await
        };
        match timeout(self.timeout, exchange).await {
            Err(_) => Err(PeerError::Timeout(addr, self.timeout)),
            Ok(Err(e)) => Err(PeerError::Frame(addr, e)),
            Ok(Ok(Response::Error(e))) => Err(PeerError::Remote(addr, e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}
