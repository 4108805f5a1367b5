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

mod pool;
pub use pool::{Bootstrap, BootstrapPages, Leased, PeerPool};

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
    /// Pages children touched that came earlier as another page's neighbours (runs, as in
    /// `Pages`): the seed's host adds them to the working set. Answered by `Recorded`.
    Touched {
        #[serde(deserialize_with = "request_runs")]
        runs: Vec<(u64, u32)>,
    },
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
        /// A seed of a profile: where its bootstrap holds nothing beyond the pages its
        /// threads touch at once (nothing carried over, nothing recorded yet), children show
        /// the replica every page they touch (see `ReplicaPages`'s learning prefetch), for
        /// the profile's later seeds.
        learn: bool,
    },
    Chunk(Chunk),
    Error(RemoteError),
    /// `Touched` is recorded.
    Recorded,
}

/// Sorted, distinct page addresses as runs `(address, pages)`, as requests and answers carry
/// them.
pub fn page_runs(pages: &[u64]) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for &page in pages {
        match runs.last_mut() {
            Some((start, n)) if *start + *n as u64 * packed::PAGE as u64 == page => *n += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

/// What comes before a `Pages` answer's `len` page bytes in its frame: the frame header, the
/// variant and the length (postcard: a LEB128 varint). A page server writes it and reads the
/// pages in right after, with no copy in between; a client that asked for `len` bytes reads
/// it apart and the pages straight into their buffer.
pub fn pages_frame_head(len: usize) -> Vec<u8> {
    let mut body =
        postcard::to_stdvec(&Response::Pages(Vec::new())).expect("a response serializes to memory");
    // The empty length's one byte, replaced by `len` as postcard writes a length.
    body.pop();
    body.extend(postcard::to_stdvec(&len).expect("a length serializes to memory"));
    let mut head = ((body.len() + len) as u32).to_le_bytes().to_vec();
    head.extend(body);
    head
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

#[cfg(test)]
mod tests;
