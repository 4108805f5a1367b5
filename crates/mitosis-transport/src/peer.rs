//! The page server protocol between daemons, and its pooled client.
//!
//! Every request names its seed (id + key), so a connection serves any seed and any child:
//! daemons keep a few long-lived connections per peer ([`PeerPool`]) and a new child costs no
//! connection setup. The seed's CPU is never involved: pages are read from its frozen twin by
//! the seed host's daemon.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::frame::{self, FrameError};
use crate::packed::{self, Chunk, UnpackError};

pub use mitosis_descriptor::KEY_LEN;

/// A seed on the serving host and the key that opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRef {
    pub id: u64,
    pub key: [u8; KEY_LEN],
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Is the seed there and is the key right? Answered by `Attached`.
    Attach {
        seed: SeedRef,
    },
    Descriptor {
        seed: SeedRef,
    },
    /// Runs of whole pages `(address, page count)`; the reply holds them back to back.
    /// `touched`: the page among them a child faulted on (the rest is prefetch), which the
    /// seed's host adds to the seed's working set.
    Pages {
        seed: SeedRef,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    },
    /// Everything a host needs to build its replica of the seed, in one exchange: answered by
    /// `Bootstrap`, then its pages as that answer says ([`PagesFollow`]).
    Bootstrap {
        seed: SeedRef,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Attached,
    Descriptor(#[serde(with = "serde_bytes")] Vec<u8>),
    Pages(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The descriptor and the page runs that follow (the seed-written pages of its file
    /// mappings, the pages its threads touch at once, and its working set).
    Bootstrap {
        #[serde(with = "serde_bytes")]
        descriptor: Vec<u8>,
        runs: Vec<(u64, u32)>,
        follow: PagesFollow,
    },
    Chunk(Chunk),
    Error(RemoteError),
}

/// How a bootstrap's pages follow its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PagesFollow {
    /// As they are, back to back, unframed: the receiver can read them straight into place.
    Raw,
    /// As this many `Chunk` frames, each packed on its own.
    Chunks(u32),
}

/// Why a seed's host refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum RemoteError {
    #[error("no seed {0} on that host (never prepared, or dropped)")]
    NoSuchSeed(u64),
    #[error("wrong key for seed {0}")]
    WrongKey(u64),
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
    #[error("host {0} sent bad pages: {1}")]
    Unpack(SocketAddr, UnpackError),
}

/// The answer to a bootstrap: the seed's descriptor, and the pages of `runs` back to back.
#[derive(Debug)]
pub struct Bootstrap {
    pub descriptor: Vec<u8>,
    pub runs: Vec<(u64, u32)>,
    pub pages: BootstrapPages,
}

#[derive(Debug)]
pub enum BootstrapPages {
    /// Unpacked as they arrive, in chunks of [`packed::CHUNK_PAGES`] pages (the last may be
    /// shorter).
    Chunks(tokio::sync::mpsc::Receiver<Result<Vec<u8>, PeerError>>),
    /// Still in the connection, raw: for the caller to read.
    Stream(Leased),
}

/// A pooled connection lent out with unread raw pages in it. Back to the pool through
/// [`Leased::give_back`] once they are read; dropped, it is closed.
pub struct Leased {
    addr: SocketAddr,
    stream: TcpStream,
    pool: Arc<PeerPool>,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased").field("addr", &self.addr).finish()
    }
}

impl Leased {
    /// The socket, switched to blocking reads that time out after the pool's request timeout,
    /// for another process (a replica) to read the pages from. Nothing else may use the
    /// connection until [`Leased::give_back`].
    pub fn blocking_fd(&self) -> std::io::Result<RawFd> {
        let sock = socket2::SockRef::from(&self.stream);
        sock.set_read_timeout(Some(self.pool.timeout))?;
        sock.set_nonblocking(false)?;
        Ok(self.stream.as_raw_fd())
    }

    /// Returns the connection to the pool once every page was read from it.
    pub fn give_back(self) {
        let sock = socket2::SockRef::from(&self.stream);
        if sock.set_nonblocking(true).is_ok() && sock.set_read_timeout(None).is_ok() {
            self.pool.checkin(self.addr, self.stream);
        }
    }
}

/// Most pages a bootstrap may carry (128 MiB unpacked).
pub const MAX_BOOTSTRAP_PAGES: u64 = 32 * 1024;

impl PeerError {
    /// True if the seed itself is gone or refused (as opposed to the network failing).
    pub fn is_seed_gone(&self) -> bool {
        matches!(
            self,
            PeerError::Remote(_, RemoteError::NoSuchSeed(_) | RemoteError::WrongKey(_))
        )
    }
}

/// Long-lived connections to peer daemons, shared by every child on this host.
///
/// A request takes an idle connection (or opens one), and gives it back when answered. At most
/// `max_idle` idle connections are kept per peer, so the state stays the same size whatever the
/// number of seeds and children. A pooled connection that turns out dead (the peer restarted)
/// is replaced once, transparently: every request is a read and safe to repeat.
pub struct PeerPool {
    idle: Mutex<HashMap<SocketAddr, Vec<TcpStream>>>,
    max_idle: usize,
    timeout: Duration,
}

impl PeerPool {
    pub fn new(max_idle: usize, request_timeout: Duration) -> Self {
        PeerPool {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            timeout: request_timeout,
        }
    }

    /// Idle connections per peer, for the daemon's status.
    pub fn idle_counts(&self) -> Vec<(SocketAddr, usize)> {
        let idle = self.idle.lock().expect("pool lock");
        let mut out: Vec<_> = idle.iter().map(|(a, v)| (*a, v.len())).collect();
        out.sort();
        out
    }

    /// Opens connections to `addr` ahead of need, up to the idle limit.
    pub async fn warm(&self, addr: SocketAddr, count: usize) -> Result<(), PeerError> {
        for _ in 0..count.min(self.max_idle) {
            let stream = self.connect(addr).await?;
            self.checkin(addr, stream);
        }
        Ok(())
    }

    pub async fn attach(&self, addr: SocketAddr, seed: SeedRef) -> Result<(), PeerError> {
        match self.call(addr, &Request::Attach { seed }).await? {
            Response::Attached => Ok(()),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    pub async fn descriptor(&self, addr: SocketAddr, seed: SeedRef) -> Result<Vec<u8>, PeerError> {
        match self.call(addr, &Request::Descriptor { seed }).await? {
            Response::Descriptor(d) => Ok(d),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    /// Reads the given page runs; the result is their bytes back to back.
    pub async fn pages(
        &self,
        addr: SocketAddr,
        seed: SeedRef,
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    ) -> Result<Vec<u8>, PeerError> {
        let want: usize = runs.iter().map(|r| r.1 as usize * 4096).sum();
        let request = Request::Pages {
            seed,
            runs,
            touched,
        };
        match self.call(addr, &request).await? {
            Response::Pages(p) if p.len() == want => Ok(p),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    /// Asks for the seed's descriptor and bootstrap pages in one exchange. Returns once the
    /// descriptor is in; the pages follow while the caller builds: packed chunks unpacked by
    /// a task of their own, or raw pages left in the connection for the caller.
    pub async fn bootstrap(
        self: &Arc<Self>,
        addr: SocketAddr,
        seed: SeedRef,
    ) -> Result<Bootstrap, PeerError> {
        let (stream, resp) = self
            .open_exchange(addr, &Request::Bootstrap { seed })
            .await?;
        let (descriptor, runs, follow) = match resp {
            Response::Bootstrap {
                descriptor,
                runs,
                follow,
            } => (descriptor, runs, follow),
            Response::Error(e) => {
                self.checkin(addr, stream);
                return Err(PeerError::Remote(addr, e));
            }
            _ => return Err(PeerError::Protocol(addr)),
        };
        let pages: u64 = runs.iter().map(|r| r.1 as u64).sum();
        let sorted = runs
            .windows(2)
            .all(|w| w[0].0 + w[0].1 as u64 * 4096 <= w[1].0);
        if pages > MAX_BOOTSTRAP_PAGES || !sorted {
            return Err(PeerError::Protocol(addr));
        }
        let pages = match follow {
            PagesFollow::Raw => BootstrapPages::Stream(Leased {
                addr,
                stream,
                pool: self.clone(),
            }),
            PagesFollow::Chunks(chunks) => {
                if chunks as u64 != pages.div_ceil(packed::CHUNK_PAGES as u64) {
                    return Err(PeerError::Protocol(addr));
                }
                let (tx, rx) = tokio::sync::mpsc::channel(chunks.max(1) as usize);
                let pool = self.clone();
                tokio::spawn(
                    async move { pool.receive_chunks(addr, stream, pages, chunks, tx).await },
                );
                BootstrapPages::Chunks(rx)
            }
        };
        Ok(Bootstrap {
            descriptor,
            runs,
            pages,
        })
    }

    /// Reads and unpacks a bootstrap's chunks in order; the connection goes back to the pool
    /// only if every chunk came whole.
    async fn receive_chunks(
        &self,
        addr: SocketAddr,
        mut stream: TcpStream,
        pages: u64,
        chunks: u32,
        tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, PeerError>>,
    ) {
        let mut left = pages as usize * packed::PAGE;
        for _ in 0..chunks {
            let chunk = match timeout(self.timeout, frame::read::<_, Response>(&mut stream)).await {
                Err(_) => Err(PeerError::Timeout(addr, self.timeout)),
                Ok(Err(e)) => Err(PeerError::Frame(addr, e)),
                Ok(Ok(Response::Chunk(c))) => packed::unpack(c)
                    .map_err(|e| PeerError::Unpack(addr, e))
                    .and_then(|data| match left.checked_sub(data.len()) {
                        Some(rest) => {
                            left = rest;
                            Ok(data)
                        }
                        None => Err(PeerError::Protocol(addr)),
                    }),
                Ok(Ok(_)) => Err(PeerError::Protocol(addr)),
            };
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
        if left == 0 {
            self.checkin(addr, stream);
        } else {
            let _ = tx.send(Err(PeerError::Protocol(addr))).await;
        }
    }

    /// Sends `req` and reads the first answer frame, leaving the stream with the caller.
    async fn send(
        &self,
        addr: SocketAddr,
        stream: &mut TcpStream,
        req: &Request,
    ) -> Result<Response, PeerError> {
        let exchange = async {
            frame::write(stream, req).await?;
            frame::read::<_, Response>(stream).await
        };
        match timeout(self.timeout, exchange).await {
            Err(_) => Err(PeerError::Timeout(addr, self.timeout)),
            Ok(Err(e)) => Err(PeerError::Frame(addr, e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    async fn call(&self, addr: SocketAddr, req: &Request) -> Result<Response, PeerError> {
        let (stream, response) = self.open_exchange(addr, req).await?;
        // Only a connection that completed its exchange goes back: it is in a clean state.
        self.checkin(addr, stream);
        match response {
            Response::Error(e) => Err(PeerError::Remote(addr, e)),
            resp => Ok(resp),
        }
    }

    /// Sends `req` on a pooled connection (or a new one) and reads the first answer frame; the
    /// connection stays with the caller. A pooled connection the peer closed (it restarted) is
    /// replaced once: every request is a read and safe to repeat.
    async fn open_exchange(
        &self,
        addr: SocketAddr,
        req: &Request,
    ) -> Result<(TcpStream, Response), PeerError> {
        if let Some(mut stream) = self.checkout(addr) {
            match self.send(addr, &mut stream, req).await {
                Ok(resp) => return Ok((stream, resp)),
                Err(PeerError::Frame(_, FrameError::Closed | FrameError::Io(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let mut stream = self.connect(addr).await?;
        let resp = self.send(addr, &mut stream, req).await?;
        Ok((stream, resp))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, PeerError> {
        let stream = timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::Timeout(addr, self.timeout))?
            .map_err(|e| PeerError::Connect(addr, e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| PeerError::Connect(addr, e.to_string()))?;
        Ok(stream)
    }

    fn checkout(&self, addr: SocketAddr) -> Option<TcpStream> {
        self.idle.lock().expect("pool lock").get_mut(&addr)?.pop()
    }

    fn checkin(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(stream);
        }
    }
}
