//! The page server protocol between daemons, and its pooled client.
//!
//! Every request names its seed, so a connection serves any seed and any child: daemons keep
//! a few long-lived connections per peer ([`PeerPool`]) and a new child costs no connection
//! setup. The seed's CPU is never involved: pages are read from its frozen twin by the seed
//! host's daemon.
//!
//! # Wire format (page protocol version [`PROTOCOL_VERSION`])
//!
//! Frames as in [`crate::frame`] (u32 LE length, then the body).
//!
//! 1. On accept the server sends a *hello*, laid out by hand so that a peer of any version can
//!    read the version: `b"MTPS"`, the version (u32 LE), then a fresh 32-byte nonce from
//!    getrandom, one per connection ([`Hello`]).
//! 2. Every request is a postcard [`Sealed`]: the seed id, a sequence number that strictly
//!    increases on the connection (from 0), the encoded [`Request`] as bytes, and a MAC: the
//!    BLAKE3 keyed hash, keyed with the seed's 256-bit key, of [`MAC_DOMAIN`] || nonce ||
//!    seed id (u64 LE) || seq (u64 LE) || body. The key itself never travels; a request
//!    recorded on one connection is refused on any other (another nonce) and on its own
//!    (its seq is spent).
//! 3. Every answer is a postcard [`Response`]; a bootstrap's pages follow its answer
//!    ([`PagesFollow`]). Answers are not authenticated: the MAC proves the requester, not
//!    the server.
//!
//! With mutual TLS ([`crate::tls`]) the server first sends [`crate::tls::ANNOUNCEMENT`] in
//! clear, then the TLS 1.3 handshake runs, then all of the above inside it, unchanged; a
//! bootstrap's pages then always come as `Chunk` frames (a replica cannot read encrypted
//! bytes from the socket).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::{Deserializer, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;

use crate::frame::{self, FrameError};
use crate::packed::{self, Chunk, UnpackError};
use crate::tls::Tls;

pub use mitosis_descriptor::KEY_LEN;

/// The page protocol this build speaks; 1 was the protocol without a hello, whose requests
/// carried the key.
pub const PROTOCOL_VERSION: u32 = 2;
pub const NONCE_LEN: usize = 32;
const HELLO_MAGIC: [u8; 4] = *b"MTPS";
/// Starts what a TLS page server sends in clear before the handshake.
pub const TLS_MAGIC: [u8; 4] = *b"MTLS";
const HELLO_LEN: usize = 4 + 4 + NONCE_LEN;
/// Largest hello a client reads (later versions may append to it).
const MAX_HELLO: usize = 256;
/// Separates request MACs from any other use of a seed's key.
pub const MAC_DOMAIN: &[u8] = b"mitosis page request v2";

/// Largest request frame a page server reads: a `Pages` request of
/// [`MAX_PAGES_PER_REQUEST`] one-page runs takes about 41 KiB.
pub const MAX_REQUEST_FRAME: usize = 64 << 10;
/// Most pages one `Pages` request may ask for (16 MiB), so also its most runs.
pub const MAX_PAGES_PER_REQUEST: u64 = 4096;
/// Most pages a bootstrap may carry (128 MiB unpacked), so also its most runs.
pub const MAX_BOOTSTRAP_PAGES: u64 = 32 * 1024;
/// Most connections a pool opens to one peer at once; past it, requests wait for one. Below
/// a page server's per-address limit, so a busy host is never refused by its peer.
pub const MAX_OPEN_PER_PEER: usize = 32;

/// A seed on the serving host and the key that opens it. Client side only: the key signs
/// requests ([`seal`]) and is never serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedRef {
    pub id: u64,
    pub key: [u8; KEY_LEN],
}

/// What a request asks; the seed it concerns is in its [`Sealed`] envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Is the seed there and is the key right? Answered by `Attached`.
    Attach,
    Descriptor,
    /// Runs of whole pages `(address, page count)`; the reply holds them back to back.
    /// `touched`: the page among them a child faulted on (the rest is prefetch), which the
    /// seed's host adds to the seed's working set.
    Pages {
        #[serde(deserialize_with = "request_runs")]
        runs: Vec<(u64, u32)>,
        touched: Option<u64>,
    },
    /// Everything a host needs to build its replica of the seed, in one exchange: answered by
    /// `Bootstrap`, then its pages as that answer says ([`PagesFollow`]).
    Bootstrap,
}

/// A request on the wire: which seed, the connection's sequence number, the MAC that proves
/// the sender holds the seed's key, and the encoded [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Sealed<'a> {
    pub seed: u64,
    pub seq: u64,
    pub mac: [u8; 32],
    #[serde(borrow, with = "serde_bytes")]
    pub body: &'a [u8],
}

impl<'a> Sealed<'a> {
    /// The envelope in a request frame's body; borrows the request bytes, allocates nothing.
    pub fn decode(frame_body: &'a [u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(frame_body)
    }

    /// True if `key` made the MAC on this connection (`nonce`); constant-time.
    pub fn verify(&self, key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN]) -> bool {
        // blake3::Hash compares in constant time.
        mac(key, nonce, self.seed, self.seq, self.body) == self.mac
    }

    /// The request, decoded only once the MAC was checked; run counts are bounded.
    pub fn request(&self) -> Result<Request, postcard::Error> {
        postcard::from_bytes(self.body)
    }
}

fn mac(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    seed: u64,
    seq: u64,
    body: &[u8],
) -> blake3::Hash {
    blake3::Hasher::new_keyed(key)
        .update(MAC_DOMAIN)
        .update(nonce)
        .update(&seed.to_le_bytes())
        .update(&seq.to_le_bytes())
        .update(body)
        .finalize()
}

/// The frame carrying `request` for `seed` as request `seq` of the connection that said
/// `nonce`.
pub fn seal(seed: &SeedRef, nonce: &[u8; NONCE_LEN], seq: u64, request: &Request) -> Vec<u8> {
    let body = postcard::to_stdvec(request).expect("requests serialize to memory");
    seal_body(seed, nonce, seq, &body)
}

/// [`seal`] of an already encoded request (or of any bytes: tests send malformed ones).
pub fn seal_body(seed: &SeedRef, nonce: &[u8; NONCE_LEN], seq: u64, body: &[u8]) -> Vec<u8> {
    let sealed = Sealed {
        seed: seed.id,
        seq,
        mac: *mac(&seed.key, nonce, seed.id, seq, body).as_bytes(),
        body,
    };
    frame::encode(&sealed)
}

/// The page server's first frame on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub nonce: [u8; NONCE_LEN],
}

/// Why a peer's hello was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HelloError {
    #[error("it is not a mitosis page server (bad hello)")]
    NotMitosis,
    #[error(
        "it speaks page protocol version {theirs} and this host speaks version {ours}: run the same mitosis on both"
    )]
    Version { ours: u32, theirs: u32 },
    #[error(
        "it requires mutual TLS: start this host's mitosisd with --tls-cert, --tls-key and --tls-ca too"
    )]
    TlsRequired,
    #[error(
        "it does not use TLS and this host requires it: start that mitosisd with --tls-cert, --tls-key and --tls-ca too"
    )]
    NotTls,
}

impl Hello {
    /// A hello of this version with a fresh nonce.
    pub fn fresh() -> Result<Self, getrandom::Error> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)?;
        Ok(Hello {
            version: PROTOCOL_VERSION,
            nonce,
        })
    }

    /// The whole frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + HELLO_LEN);
        out.extend_from_slice(&(HELLO_LEN as u32).to_le_bytes());
        out.extend_from_slice(&HELLO_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    /// A hello frame's body; a version other than ours is [`HelloError::Version`], a TLS
    /// server's announcement [`HelloError::TlsRequired`].
    pub fn parse(body: &[u8]) -> Result<Self, HelloError> {
        if body.get(..4) == Some(&TLS_MAGIC[..]) {
            return Err(HelloError::TlsRequired);
        }
        let version = magic_and_version(body, HELLO_MAGIC)?;
        let nonce = body[8..].try_into().map_err(|_| HelloError::NotMitosis)?;
        Ok(Hello { version, nonce })
    }

    /// Checks the first frame's body of a server this host reaches with TLS: a TLS server's
    /// announcement of our version ([`crate::tls::ANNOUNCEMENT`]); a plain server's hello is
    /// [`HelloError::NotTls`].
    pub fn parse_announcement(body: &[u8]) -> Result<(), HelloError> {
        if body.get(..4) == Some(&HELLO_MAGIC[..]) {
            return Err(HelloError::NotTls);
        }
        magic_and_version(body, TLS_MAGIC).map(drop)
    }
}

/// The version after `magic` at the start of `body`, if it is ours.
fn magic_and_version(body: &[u8], magic: [u8; 4]) -> Result<u32, HelloError> {
    if body.len() < 8 || body[..4] != magic {
        return Err(HelloError::NotMitosis);
    }
    let version = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(HelloError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    Ok(version)
}

/// Page runs of a request: at most one run per page asked for.
fn request_runs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, u32)>, D::Error> {
    bounded_runs(d, MAX_PAGES_PER_REQUEST as usize)
}

/// Page runs of a bootstrap answer.
fn bootstrap_runs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, u32)>, D::Error> {
    bounded_runs(d, MAX_BOOTSTRAP_PAGES as usize)
}

/// A sequence of at most `max` runs, refused as soon as it claims or holds more, so a frame
/// of a few bytes per run cannot make the decoder allocate more than `max` runs.
fn bounded_runs<'de, D: Deserializer<'de>>(d: D, max: usize) -> Result<Vec<(u64, u32)>, D::Error> {
    struct Runs(usize);
    impl<'de> Visitor<'de> for Runs {
        type Value = Vec<(u64, u32)>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {} page runs", self.0)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > self.0 {
                return Err(A::Error::invalid_length(hint, &self));
            }
            let mut runs = Vec::with_capacity(hint);
            while let Some(run) = seq.next_element()? {
                if runs.len() == self.0 {
                    return Err(A::Error::invalid_length(runs.len() + 1, &self));
                }
                runs.push(run);
            }
            Ok(runs)
        }
    }
    d.deserialize_seq(Runs(max))
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
        #[serde(deserialize_with = "bootstrap_runs")]
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
    #[error("request {1} for seed {0} is out of sequence (replayed?)")]
    Replayed(u64, u64),
}

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot reach host {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("host {0} did not answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error(
        "host {0} sent no hello within {1:?} (not a mitosisd, or one older than page protocol {PROTOCOL_VERSION})"
    )]
    NoHello(SocketAddr, Duration),
    #[error("host {0}: {1}")]
    Handshake(SocketAddr, HelloError),
    #[error("host {0}: TLS: {1}")]
    Tls(SocketAddr, String),
    #[error("host {0}: {1} connections busy for {2:?}")]
    Busy(SocketAddr, usize, Duration),
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

/// A connection to a page server: plain TCP, or TLS over it.
enum PeerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to a peer's page server, with what its requests are sealed with.
struct Conn {
    stream: PeerStream,
    /// The server's nonce for this connection (from its hello).
    nonce: [u8; NONCE_LEN],
    /// The sequence number of the next request.
    next_seq: u64,
    /// Its place among the [`MAX_OPEN_PER_PEER`] connections to the peer.
    _slot: OwnedSemaphorePermit,
}

/// A pooled connection lent out with unread raw pages in it. Back to the pool through
/// [`Leased::give_back`] once they are read; dropped, it is closed. It keeps its nonce and
/// sequence number: whoever reads the pages sends nothing.
pub struct Leased {
    addr: SocketAddr,
    conn: Conn,
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
    /// connection until [`Leased::give_back`]. Never a TLS connection's: its bytes are
    /// encrypted (a TLS server frames its pages, and [`PeerPool::bootstrap`] refuses raw
    /// ones on TLS).
    pub fn blocking_fd(&self) -> std::io::Result<RawFd> {
        let PeerStream::Plain(stream) = &self.conn.stream else {
            return Err(std::io::Error::other(
                "a TLS connection is not lent: its bytes are encrypted",
            ));
        };
        let sock = socket2::SockRef::from(stream);
        sock.set_read_timeout(Some(self.pool.timeout))?;
        sock.set_nonblocking(false)?;
        Ok(stream.as_raw_fd())
    }

    /// Returns the connection to the pool once every page was read from it.
    pub fn give_back(self) {
        let PeerStream::Plain(stream) = &self.conn.stream else {
            return;
        };
        let sock = socket2::SockRef::from(stream);
        if sock.set_nonblocking(true).is_ok() && sock.set_read_timeout(None).is_ok() {
            self.pool.checkin(self.addr, self.conn);
        }
    }
}

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
/// A request takes an idle connection (or opens one, at most [`MAX_OPEN_PER_PEER`] per peer),
/// and gives it back when answered. At most `max_idle` idle connections are kept per peer, so
/// the state stays the same size whatever the number of seeds and children. A pooled
/// connection that turns out dead (the peer restarted, or closed it after an idle while) is
/// replaced once, transparently: every request is a read and safe to repeat.
pub struct PeerPool {
    idle: Mutex<HashMap<SocketAddr, Vec<Conn>>>,
    slots: Mutex<HashMap<SocketAddr, Arc<Semaphore>>>,
    max_idle: usize,
    timeout: Duration,
    /// Set: every connection is mutual TLS ([`crate::tls`]).
    tls: Option<tokio_rustls::TlsConnector>,
}

impl PeerPool {
    pub fn new(max_idle: usize, request_timeout: Duration) -> Self {
        PeerPool {
            idle: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            max_idle: max_idle.min(MAX_OPEN_PER_PEER),
            timeout: request_timeout,
            tls: None,
        }
    }

    /// The same pool, whose connections are mutual TLS with `tls` (`None`: plain TCP).
    pub fn with_tls(mut self, tls: Option<&Tls>) -> Self {
        self.tls = tls.map(Tls::connector);
        self
    }

    /// Idle connections per peer, for the daemon's status.
    pub fn idle_counts(&self) -> Vec<(SocketAddr, usize)> {
        let idle = self.idle.lock().expect("pool lock");
        let mut out: Vec<_> = idle.iter().map(|(a, v)| (*a, v.len())).collect();
        out.sort();
        out
    }

    pub async fn attach(&self, addr: SocketAddr, seed: SeedRef) -> Result<(), PeerError> {
        match self.call(addr, &seed, &Request::Attach).await? {
            Response::Attached => Ok(()),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    pub async fn descriptor(&self, addr: SocketAddr, seed: SeedRef) -> Result<Vec<u8>, PeerError> {
        match self.call(addr, &seed, &Request::Descriptor).await? {
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
        let pages: u64 = runs.iter().map(|r| r.1 as u64).sum();
        // The server would refuse it, or not read a frame that large.
        if pages > MAX_PAGES_PER_REQUEST || runs.len() as u64 > MAX_PAGES_PER_REQUEST {
            return Err(PeerError::Remote(addr, RemoteError::TooLarge));
        }
        let want = pages as usize * packed::PAGE;
        let request = Request::Pages { runs, touched };
        match self.call(addr, &seed, &request).await? {
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
        let (conn, resp) = self.open_exchange(addr, &seed, &Request::Bootstrap).await?;
        let (descriptor, runs, follow) = match resp {
            Response::Bootstrap {
                descriptor,
                runs,
                follow,
            } => (descriptor, runs, follow),
            Response::Error(e) => {
                self.checkin(addr, conn);
                return Err(PeerError::Remote(addr, e));
            }
            _ => return Err(PeerError::Protocol(addr)),
        };
        let pages: u64 = runs.iter().map(|r| r.1 as u64).sum();
        // Sorted, disjoint, and not past the end of the address space (a hostile host could
        // otherwise overflow the check).
        let end = |r: &(u64, u32)| r.0.checked_add(r.1 as u64 * 4096);
        let sorted = runs.iter().all(|r| end(r).is_some())
            && runs
                .windows(2)
                .all(|w| end(&w[0]).is_some_and(|e| e <= w[1].0));
        if pages > MAX_BOOTSTRAP_PAGES || !sorted {
            return Err(PeerError::Protocol(addr));
        }
        let pages = match follow {
            PagesFollow::Raw if matches!(conn.stream, PeerStream::Tls(_)) => {
                return Err(PeerError::Tls(
                    addr,
                    "the server sent raw bootstrap pages, which a replica cannot read from a \
                     TLS stream"
                        .into(),
                ));
            }
            PagesFollow::Raw => BootstrapPages::Stream(Leased {
                addr,
                conn,
                pool: self.clone(),
            }),
            PagesFollow::Chunks(chunks) => {
                if chunks as u64 != pages.div_ceil(packed::CHUNK_PAGES as u64) {
                    return Err(PeerError::Protocol(addr));
                }
                let (tx, rx) = tokio::sync::mpsc::channel(chunks.max(1) as usize);
                let pool = self.clone();
                tokio::spawn(
                    async move { pool.receive_chunks(addr, conn, pages, chunks, tx).await },
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
        mut conn: Conn,
        pages: u64,
        chunks: u32,
        tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, PeerError>>,
    ) {
        let mut left = pages as usize * packed::PAGE;
        for _ in 0..chunks {
            let read = frame::read::<_, Response>(&mut conn.stream);
            let chunk = match timeout(self.timeout, read).await {
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
            self.checkin(addr, conn);
        } else {
            let _ = tx.send(Err(PeerError::Protocol(addr))).await;
        }
    }

    /// Seals `req` as the connection's next request, sends it and reads the first answer
    /// frame, leaving the connection with the caller.
    async fn send(
        &self,
        addr: SocketAddr,
        conn: &mut Conn,
        seed: &SeedRef,
        req: &Request,
    ) -> Result<Response, PeerError> {
        let seq = conn.next_seq;
        conn.next_seq += 1;
        let bytes = seal(seed, &conn.nonce, seq, req);
        if bytes.len() > 4 + MAX_REQUEST_FRAME {
            return Err(PeerError::Remote(addr, RemoteError::TooLarge));
        }
        let stream = &mut conn.stream;
        let exchange = async {
            stream.write_all(&bytes).await?;
            // TLS may hold the last record back until flushed (a no-op for TCP).
            stream.flush().await?;
            frame::read::<_, Response>(stream).await
        };
        match timeout(self.timeout, exchange).await {
            Err(_) => Err(PeerError::Timeout(addr, self.timeout)),
            Ok(Err(e)) => Err(PeerError::Frame(addr, e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    async fn call(
        &self,
        addr: SocketAddr,
        seed: &SeedRef,
        req: &Request,
    ) -> Result<Response, PeerError> {
        let (conn, response) = self.open_exchange(addr, seed, req).await?;
        // Only a connection that completed its exchange goes back: it is in a clean state.
        self.checkin(addr, conn);
        match response {
            Response::Error(e) => Err(PeerError::Remote(addr, e)),
            resp => Ok(resp),
        }
    }

    /// Sends `req` on a pooled connection (or a new one) and reads the first answer frame; the
    /// connection stays with the caller. A pooled connection the peer closed (it restarted, or
    /// closed it idle) is replaced once: every request is a read and safe to repeat.
    async fn open_exchange(
        &self,
        addr: SocketAddr,
        seed: &SeedRef,
        req: &Request,
    ) -> Result<(Conn, Response), PeerError> {
        if let Some(mut conn) = self.checkout(addr) {
            match self.send(addr, &mut conn, seed, req).await {
                Ok(resp) => return Ok((conn, resp)),
                // Dropped here: its slot is free for the new one.
                Err(PeerError::Frame(_, FrameError::Closed | FrameError::Io(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let mut conn = self.connect(addr).await?;
        let resp = self.send(addr, &mut conn, seed, req).await?;
        Ok((conn, resp))
    }

    /// Opens a connection (once one of the peer's slots is free) and reads the server's hello.
    async fn connect(&self, addr: SocketAddr) -> Result<Conn, PeerError> {
        let slots = self
            .slots
            .lock()
            .expect("pool lock")
            .entry(addr)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_OPEN_PER_PEER)))
            .clone();
        let slot = timeout(self.timeout, slots.acquire_owned())
            .await
            .map_err(|_| PeerError::Busy(addr, MAX_OPEN_PER_PEER, self.timeout))?
            .expect("the pool never closes its semaphores");
        let mut tcp = timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::Timeout(addr, self.timeout))?
            .map_err(|e| PeerError::Connect(addr, e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| PeerError::Connect(addr, e.to_string()))?;
        let mut stream = match &self.tls {
            None => PeerStream::Plain(tcp),
            Some(connector) => {
                let announced = self.first_frame(addr, &mut tcp).await?;
                Hello::parse_announcement(&announced).map_err(|e| PeerError::Handshake(addr, e))?;
                // The server's certificate must name the address dialed.
                let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = timeout(self.timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| PeerError::Timeout(addr, self.timeout))?
                    .map_err(|e| PeerError::Tls(addr, format!("handshake failed: {e}")))?;
                PeerStream::Tls(Box::new(tls))
            }
        };
        let hello = match self.first_frame(addr, &mut stream).await {
            // In TLS 1.3 the server checks the client's certificate after the client is done:
            // a refusal comes as an alert where the hello should be.
            Err(PeerError::Frame(_, FrameError::Io(e))) if self.tls.is_some() => {
                return Err(PeerError::Tls(addr, format!("refused by the server: {e}")));
            }
            Err(e) => return Err(e),
            Ok(body) => Hello::parse(&body).map_err(|e| PeerError::Handshake(addr, e))?,
        };
        Ok(Conn {
            stream,
            nonce: hello.nonce,
            next_seq: 0,
            _slot: slot,
        })
    }

    /// The body of the server's first frame (its hello, or its TLS announcement).
    async fn first_frame<S: AsyncRead + Unpin>(
        &self,
        addr: SocketAddr,
        stream: &mut S,
    ) -> Result<Vec<u8>, PeerError> {
        match timeout(self.timeout, frame::read_body(stream, MAX_HELLO)).await {
            Err(_) => Err(PeerError::NoHello(addr, self.timeout)),
            Ok(Err(e)) => Err(PeerError::Frame(addr, e)),
            Ok(Ok(body)) => Ok(body),
        }
    }

    fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        self.idle.lock().expect("pool lock").get_mut(&addr)?.pop()
    }

    fn checkin(&self, addr: SocketAddr, conn: Conn) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const KEY: [u8; KEY_LEN] = {
        let mut k = [0u8; KEY_LEN];
        let mut i = 0;
        while i < KEY_LEN {
            k[i] = 0xa0 + i as u8;
            i += 1;
        }
        k
    };
    const SEED: SeedRef = SeedRef { id: 7, key: KEY };

    fn every_request() -> Vec<Request> {
        vec![
            Request::Attach,
            Request::Descriptor,
            Request::Pages {
                runs: vec![(0x7f00_0000_0000, 3), (0x7f00_0001_0000, 1)],
                touched: Some(0x7f00_0000_1000),
            },
            Request::Bootstrap,
        ]
    }

    #[test]
    fn the_key_never_goes_on_the_wire() {
        let nonce = [0x11; NONCE_LEN];
        for (seq, request) in every_request().into_iter().enumerate() {
            let bytes = seal(&SEED, &nonce, seq as u64, &request);
            // Not the key, nor any 8 bytes of it.
            for part in KEY.windows(8) {
                assert!(
                    !bytes.windows(8).any(|w| w == part),
                    "{request:?} carries key bytes: {bytes:02x?}"
                );
            }
            let sealed = Sealed::decode(&bytes[4..]).unwrap();
            assert_eq!((sealed.seed, sealed.seq), (7, seq as u64));
            assert!(sealed.verify(&KEY, &nonce));
            assert_eq!(sealed.request().unwrap(), request);
        }
    }

    #[test]
    fn a_mac_holds_for_its_key_nonce_seq_and_body_only() {
        let nonce = [0x11; NONCE_LEN];
        let bytes = seal(&SEED, &nonce, 5, &Request::Attach);
        let sealed = Sealed::decode(&bytes[4..]).unwrap();
        let mut other_key = KEY;
        other_key[31] ^= 1;
        assert!(!sealed.verify(&other_key, &nonce));
        assert!(!sealed.verify(&KEY, &[0x12; NONCE_LEN]));
        let replayed = Sealed { seq: 6, ..sealed };
        assert!(!replayed.verify(&KEY, &nonce));
        let other_seed = Sealed {
            seed: 8,
            ..replayed
        };
        assert!(
            !Sealed {
                seq: 5,
                ..other_seed
            }
            .verify(&KEY, &nonce)
        );
        let body = postcard::to_stdvec(&Request::Bootstrap).unwrap();
        let sealed = Sealed::decode(&bytes[4..]).unwrap();
        assert!(
            !Sealed {
                body: &body,
                ..sealed
            }
            .verify(&KEY, &nonce)
        );
    }

    #[test]
    fn hellos_parse_and_other_versions_are_named() {
        let hello = Hello::fresh().unwrap();
        let frame = hello.frame();
        assert_eq!(Hello::parse(&frame[4..]), Ok(hello));
        assert_ne!(Hello::fresh().unwrap().nonce, hello.nonce);
        let mut other = frame[4..].to_vec();
        other[4..8].copy_from_slice(&9u32.to_le_bytes());
        // A later version may say more after its version.
        other.extend_from_slice(&[0; 20]);
        let err = Hello::parse(&other).unwrap_err();
        assert_eq!(err, HelloError::Version { ours: 2, theirs: 9 });
        assert!(err.to_string().contains("version 9") && err.to_string().contains("version 2"));
        assert_eq!(Hello::parse(b"HTTP/1.1 400"), Err(HelloError::NotMitosis));
        assert_eq!(Hello::parse(&frame[4..20]), Err(HelloError::NotMitosis));
        // A TLS server and a plain one, each met by the other kind of client.
        let announced = &crate::tls::ANNOUNCEMENT[4..];
        assert_eq!(Hello::parse(announced), Err(HelloError::TlsRequired));
        assert!(HelloError::TlsRequired.to_string().contains("--tls-cert"));
        assert_eq!(Hello::parse_announcement(announced), Ok(()));
        assert_eq!(
            Hello::parse_announcement(&frame[4..]),
            Err(HelloError::NotTls)
        );
        let mut later = announced.to_vec();
        later[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(
            Hello::parse_announcement(&later),
            Err(HelloError::Version { ours: 2, theirs: 9 })
        );
    }

    #[test]
    fn run_counts_are_bounded_before_allocating() {
        let max = MAX_PAGES_PER_REQUEST as usize;
        let pages = |n: usize| Request::Pages {
            runs: (0..n as u64).map(|i| (i * 8192, 1)).collect(),
            touched: None,
        };
        let ok = postcard::to_stdvec(&pages(max)).unwrap();
        assert!(ok.len() <= MAX_REQUEST_FRAME, "{} bytes", ok.len());
        assert!(postcard::from_bytes::<Request>(&ok).is_ok());
        let over = postcard::to_stdvec(&pages(max + 1)).unwrap();
        assert!(postcard::from_bytes::<Request>(&over).is_err());
        // A few bytes claiming 33.5 M runs are refused on the claim.
        let mut claim = postcard::to_stdvec(&pages(0)).unwrap();
        claim.truncate(1);
        claim.extend_from_slice(&[0x80, 0x80, 0x80, 0x10, 0, 0, 0, 0]);
        assert!(postcard::from_bytes::<Request>(&claim).is_err());
        // Answers too.
        let answer = |n: u64| Response::Bootstrap {
            descriptor: vec![],
            runs: (0..n).map(|i| (i * 8192, 1)).collect(),
            follow: PagesFollow::Raw,
        };
        let ok = postcard::to_stdvec(&answer(MAX_BOOTSTRAP_PAGES)).unwrap();
        assert!(postcard::from_bytes::<Response>(&ok).is_ok());
        let over = postcard::to_stdvec(&answer(MAX_BOOTSTRAP_PAGES + 1)).unwrap();
        assert!(postcard::from_bytes::<Response>(&over).is_err());
    }

    /// A page server of `version` on loopback: checks every request's MAC and sequence,
    /// answers `Attached`, and closes each connection after `per_connection` requests. Sends
    /// the sequence numbers it saw, per connection.
    async fn fake_server(
        version: u32,
        per_connection: usize,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u64>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let hello = Hello {
                    version,
                    ..Hello::fresh().unwrap()
                };
                stream.write_all(&hello.frame()).await.unwrap();
                let mut seqs = Vec::new();
                while seqs.len() < per_connection {
                    let Ok(body) = frame::read_body(&mut stream, MAX_REQUEST_FRAME).await else {
                        break;
                    };
                    let sealed = Sealed::decode(&body).unwrap();
                    assert!(sealed.verify(&KEY, &hello.nonce));
                    assert!(seqs.last().is_none_or(|&last| sealed.seq > last));
                    seqs.push(sealed.seq);
                    frame::write(&mut stream, &Response::Attached)
                        .await
                        .unwrap();
                }
                tx.send(seqs).unwrap();
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn pooled_connections_count_on_and_closed_ones_are_replaced() {
        let (addr, mut seen) = fake_server(PROTOCOL_VERSION, 3).await;
        let pool = PeerPool::new(4, Duration::from_secs(5));
        // Three requests on one connection, then the server closes it (as after an idle
        // while): the fourth goes on a new connection without an error.
        for _ in 0..4 {
            pool.attach(addr, SEED).await.unwrap();
        }
        assert_eq!(seen.recv().await.unwrap(), vec![0, 1, 2]);
        pool.attach(addr, SEED).await.unwrap();
        assert_eq!(pool.idle_counts(), vec![(addr, 1)]);
    }

    #[tokio::test]
    async fn a_server_of_another_version_is_a_typed_error() {
        let (addr, _seen) = fake_server(PROTOCOL_VERSION + 1, 1).await;
        let pool = PeerPool::new(4, Duration::from_secs(5));
        let err = pool.attach(addr, SEED).await.unwrap_err();
        assert!(
            matches!(
                err,
                PeerError::Handshake(_, HelloError::Version { ours: 2, theirs: 3 })
            ),
            "{err}"
        );
        assert!(pool.idle_counts().iter().all(|(_, n)| *n == 0));
    }

    #[tokio::test]
    async fn a_server_without_a_hello_times_out_clearly() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move { listener.accept().await });
        let pool = PeerPool::new(4, Duration::from_millis(200));
        let err = pool.attach(addr, SEED).await.unwrap_err();
        assert!(matches!(err, PeerError::NoHello(..)), "{err}");
        silent.abort();
    }

    /// A page server on loopback with `tls`: the announcement and handshake, then the hello,
    /// then `Attached` to every request. Sends each handshake's outcome.
    async fn fake_tls_server(
        tls: Tls,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (tx, acceptor) = (tx.clone(), tls.acceptor());
                tokio::spawn(async move {
                    stream.write_all(&crate::tls::ANNOUNCEMENT).await?;
                    let mut stream = match acceptor.accept(stream).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return Ok(());
                        }
                    };
                    let _ = tx.send(Ok(()));
                    stream.write_all(&Hello::fresh().unwrap().frame()).await?;
                    stream.flush().await?;
                    while frame::read_body(&mut stream, MAX_REQUEST_FRAME)
                        .await
                        .is_ok()
                    {
                        stream
                            .write_all(&frame::encode(&Response::Attached))
                            .await?;
                        stream.flush().await?;
                    }
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn tls_pools_check_the_chain_and_the_address() {
        use crate::tls::tests::{Files, ca, tls};
        let files = Files::new("pool");
        let (ours, theirs) = (ca("our CA"), ca("another CA"));
        let server = tls(&files, "server", &ours, "127.0.0.1", &ours);
        let client = tls(&files, "client", &ours, "127.0.0.9", &ours);
        let pool = |tls: Option<&Tls>| PeerPool::new(4, Duration::from_secs(5)).with_tls(tls);

        // Both certificates from the CA, the server's naming the address dialed.
        let (addr, mut shakes) = fake_tls_server(server).await;
        pool(Some(&client)).attach(addr, SEED).await.unwrap();
        assert_eq!(shakes.recv().await.unwrap(), Ok(()));

        // A client whose certificate is from another CA: the server refuses it.
        let stranger = tls(&files, "stranger", &theirs, "127.0.0.9", &ours);
        let err = pool(Some(&stranger)).attach(addr, SEED).await.unwrap_err();
        assert!(matches!(err, PeerError::Tls(..)), "{err}");
        let refused = shakes.recv().await.unwrap().unwrap_err();
        assert!(refused.contains("certificate"), "{refused}");

        // A plain client is told the server wants TLS.
        let err = pool(None).attach(addr, SEED).await.unwrap_err();
        assert!(
            matches!(err, PeerError::Handshake(_, HelloError::TlsRequired)),
            "{err}"
        );

        // A server whose certificate names another address, or is from another CA.
        for (issuer, ip) in [(&ours, "127.0.0.2"), (&theirs, "127.0.0.1")] {
            let server = tls(&files, "impostor", issuer, ip, &ours);
            let (addr, _shakes) = fake_tls_server(server).await;
            let err = pool(Some(&client)).attach(addr, SEED).await.unwrap_err();
            assert!(
                matches!(&err, PeerError::Tls(_, why) if why.starts_with("handshake failed")),
                "{err}"
            );
        }

        // A TLS client is told a plain server has no TLS.
        let (addr, _seen) = fake_server(PROTOCOL_VERSION, 1).await;
        let err = pool(Some(&client)).attach(addr, SEED).await.unwrap_err();
        assert!(
            matches!(err, PeerError::Handshake(_, HelloError::NotTls)),
            "{err}"
        );
    }
}
