//! The page server: other hosts' daemons fetch descriptors and pages of our seeds.
//!
//! Requests are stateless (each names its seed), so peers keep a few pooled connections and
//! send any child's requests over any of them. Each connection starts with a hello carrying
//! a fresh nonce; each request carries a MAC made with the seed's key over that nonce and a
//! sequence number (see `mitosis_transport::peer`), checked before the request is decoded.
//!
//! # What an unauthenticated peer can cost
//!
//! At most [`MAX_CONNECTIONS`] connections are open (at most [`MAX_PER_ADDRESS`] per peer
//! address; more are closed at once). Each holds at most one request frame
//! ([`MAX_REQUEST_FRAME`], 64 KiB, refused on its header before anything is allocated) and
//! a task of a few KiB; the envelope borrows from the frame, and the request inside is
//! decoded only after its MAC checks out (and then with bounded run counts). So peers
//! without a key cost at most about 512 × (64 + 4) KiB ≈ 34 MiB over an idle daemon. A
//! connection must send its first request within [`FIRST_REQUEST_TIMEOUT`] and each frame's
//! body within [`REQUEST_TIMEOUT`] of its header, and read each answer within
//! [`WRITE_TIMEOUT`]; an idle one is closed after [`IDLE_TIMEOUT`] (pools replace it
//! transparently).
//!
//! # With TLS
//!
//! With `--tls-*` every connection is mutual TLS 1.3 (`mitosis_transport::tls`): after the
//! clear announcement, a peer must complete the handshake with a certificate chaining to the
//! CA within [`FIRST_REQUEST_TIMEOUT`] of accept, or it is dropped, counted and logged (at
//! most once a second). Such a connection also holds rustls' buffers while it lasts. A
//! bootstrap's pages then always go as chunks, whatever `--bootstrap-codec` says: the new
//! host's replica cannot read encrypted bytes straight from the socket.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mitosis_fork::source::read_runs_into;
use mitosis_transport::frame::{self, FrameError};
use mitosis_transport::peer::{
    Hello, MAX_PAGES_PER_REQUEST, MAX_REQUEST_FRAME, RemoteError, Request, Response, Sealed,
    pages_frame_head,
};
use mitosis_transport::tls;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::Daemon;
use crate::accept::{Admitted, Backoff, Limits};
use crate::bootstrap;
use crate::peer_source::REQUEST_TIMEOUT;
use crate::registry::Seed;

/// Most page-server connections open at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Most page-server connections open from one address (a peer's pool opens at most
/// `MAX_OPEN_PER_PEER`, 32).
pub const MAX_PER_ADDRESS: usize = 64;
/// How long after accept the first request may take.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may wait idle for its next request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one write (an answer, or a bootstrap's page bytes) may wait for the peer to
/// read; its own requests time out well before (5 s).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a peer connection ended.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("no request within {0:?}")]
    Idle(Duration),
    #[error("a request's body did not come within {0:?}")]
    SlowBody(Duration),
    #[error("the peer read nothing for {0:?}")]
    NotReading(Duration),
    #[error("a request frame of {0} bytes (at most {MAX_REQUEST_FRAME})")]
    TooLarge(usize),
    #[error("malformed request: {0}")]
    Malformed(postcard::Error),
    #[error("no randomness for the hello: {0}")]
    Random(getrandom::Error),
    #[error("no TLS handshake within {0:?}")]
    SlowHandshake(Duration),
    #[error("TLS handshake refused: {0}")]
    Handshake(std::io::Error),
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Frame(FrameError::Io(e))
    }
}

/// Logs failed TLS handshakes at most once a second, with how many went unlogged since.
#[derive(Default)]
struct HandshakeRefusals {
    /// When the last line was logged, and the refusals since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl HandshakeRefusals {
    fn refused(&self, daemon: &Daemon, peer: SocketAddr, err: &ConnError) {
        daemon
            .counters
            .peer_tls_refused
            .fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().expect("refusals lock");
        let (last, quiet) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            *quiet += 1;
            return;
        }
        tracing::warn!(
            %peer,
            unlogged_since_last = *quiet,
            "refused a peer connection: {err}"
        );
        *state = (Some(Instant::now()), 0);
    }
}

pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    let acceptor = daemon.tls.as_ref().map(tls::Tls::acceptor);
    let refusals = Arc::new(HandshakeRefusals::default());
    let limits = Limits::new(MAX_PER_ADDRESS, MAX_CONNECTIONS, |c| &c.peer_connections);
    let mut backoff = Backoff::new("peer connections");
    // Connections refused since the last one admitted, logged once per burst.
    let mut refused_burst = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.accepted();
        let slot = match limits.admit(peer.ip(), &daemon) {
            Admitted::Yes(slot) => slot,
            Admitted::No {
                from_address,
                total,
            } => {
                if refused_burst == 0 {
                    tracing::warn!(
                        %peer,
                        from_address,
                        total,
                        "refusing peer connections over the limits ({MAX_PER_ADDRESS} per \
                         address, {MAX_CONNECTIONS} in all); counting them quietly until one \
                         is admitted"
                    );
                }
                refused_burst += 1;
                daemon.counters.peer_refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
        };
        if refused_burst > 0 {
            tracing::warn!(
                "admitting peer connections again; refused {refused_burst} over the limits"
            );
            refused_burst = 0;
        }
        let daemon = daemon.clone();
        let (acceptor, refusals) = (acceptor.clone(), refusals.clone());
        tokio::spawn(async move {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, "peer connection ended: {e}");
                return;
            }
            let ended = match acceptor {
                None => connection(stream, peer, &daemon, false).await,
                Some(acceptor) => match handshake(stream, &acceptor).await {
                    Ok(stream) => connection(stream, peer, &daemon, true).await,
                    Err(e) => {
                        refusals.refused(&daemon, peer, &e);
                        Ok(())
                    }
                },
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, "peer connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// The server side of a TLS connection: the clear announcement, then a handshake that must
/// end with a client certificate chaining to the CA, all within [`FIRST_REQUEST_TIMEOUT`].
async fn handshake(
    mut stream: TcpStream,
    acceptor: &TlsAcceptor,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, ConnError> {
    let shake = async {
        stream.write_all(&tls::ANNOUNCEMENT).await?;
        acceptor.accept(stream).await
    };
    timeout(FIRST_REQUEST_TIMEOUT, shake)
        .await
        .map_err(|_| ConnError::SlowHandshake(FIRST_REQUEST_TIMEOUT))?
        .map_err(ConnError::Handshake)
}

/// Serves one connection; `tls`: `stream` is TLS (so bootstrap pages go framed).
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    daemon: &Daemon,
    tls: bool,
) -> Result<(), ConnError> {
    let hello = Hello::fresh().map_err(ConnError::Random)?;
    send(&mut stream, &hello.frame()).await?;
    // The last sequence number accepted: each request must carry a larger one.
    let mut last_seq: Option<u64> = None;
    let mut wait = FIRST_REQUEST_TIMEOUT;
    let mut body = Vec::new();
    loop {
        let Some(()) = read_request(&mut stream, &mut body, wait).await? else {
            return Ok(());
        };
        wait = IDLE_TIMEOUT;
        let sealed = Sealed::decode(&body).map_err(ConnError::Malformed)?;
        let seed = match check(daemon, &sealed, &hello, last_seq) {
            Ok(seed) => seed,
            Err(e) => {
                tracing::debug!(%peer, seed = sealed.seed, "refused a request: {e}");
                send(&mut stream, &frame::encode(&Response::Error(e))).await?;
                continue;
            }
        };
        last_seq = Some(sealed.seq);
        match sealed.request().map_err(ConnError::Malformed)? {
            Request::Bootstrap => {
                let wire = bootstrap::Wire::of(daemon.bootstrap_codec, tls);
                match bootstrap::packed(&seed, wire).await {
                    Ok(packed) => {
                        for f in &packed.frames {
                            stream.write_all(f).await?;
                        }
                        stream.flush().await?;
                        daemon
                            .counters
                            .bytes_served
                            .fetch_add(packed.bytes, Ordering::Relaxed);
                    }
                    Err(e) => send(&mut stream, &frame::encode(&Response::Error(e))).await?,
                }
            }
            request => {
                let framed = answer(request, &seed, daemon)
                    .await
                    .unwrap_or_else(|e| frame::encode(&Response::Error(e)));
                send(&mut stream, &framed).await?;
            }
        }
    }
}

/// Writes `bytes` unless the peer stops reading for [`WRITE_TIMEOUT`]: a peer that sends
/// requests and reads no answer would otherwise hold its connection forever.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), ConnError> {
    let write = async {
        stream.write_all(bytes).await?;
        // TLS may hold the last record back until flushed (a no-op for TCP).
        stream.flush().await
    };
    timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| ConnError::NotReading(WRITE_TIMEOUT))?
        .map_err(ConnError::from)
}

/// Reads the next request frame's body into `body`: its header within `wait`, its body
/// within the request timeout after. `None` if the peer closed the connection between frames.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    body: &mut Vec<u8>,
    wait: Duration,
) -> Result<Option<()>, ConnError> {
    let mut header = [0u8; 4];
    match timeout(wait, stream.read_exact(&mut header)).await {
        Err(_) => return Err(ConnError::Idle(wait)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let len = match frame::body_len(header, MAX_REQUEST_FRAME) {
        Ok(len) => len,
        Err(_) => {
            // Said once, then the connection ends: the rest of that frame is never read.
            let len = u32::from_le_bytes(header) as usize;
            let refusal = frame::encode(&Response::Error(RemoteError::TooLarge));
            let _ = timeout(REQUEST_TIMEOUT, send(stream, &refusal)).await;
            return Err(ConnError::TooLarge(len));
        }
    };
    body.clear();
    body.resize(len, 0);
    match timeout(REQUEST_TIMEOUT, stream.read_exact(body)).await {
        Err(_) => Err(ConnError::SlowBody(REQUEST_TIMEOUT)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(Some(())),
    }
}

/// The seed a sealed request opens: it exists, its key made the MAC on this connection, and
/// the request comes after the last one accepted.
fn check(
    daemon: &Daemon,
    sealed: &Sealed<'_>,
    hello: &Hello,
    last_seq: Option<u64>,
) -> Result<Arc<Seed>, RemoteError> {
    let seed = daemon
        .registry
        .get(sealed.seed)
        .ok_or(RemoteError::NoSuchSeed(sealed.seed))?;
    if !seed.verify(sealed, &hello.nonce) {
        return Err(RemoteError::WrongKey(sealed.seed));
    }
    if last_seq.is_some_and(|last| sealed.seq <= last) {
        return Err(RemoteError::Replayed(sealed.seed, sealed.seq));
    }
    Ok(seed)
}

/// Reads of more pages than this go to a blocking thread: a fault's few pages are read in
/// place (a thread hop would cost more than the read), a large prefetch must not hold up the
/// runtime's other connections.
const INLINE_READ_PAGES: u64 = 64;

/// The answer's frame. Pages are read from the twin straight into it, after its head.
async fn answer(request: Request, seed: &Seed, daemon: &Daemon) -> Result<Vec<u8>, RemoteError> {
    let (runs, touched) = match request {
        Request::Attach => return Ok(frame::encode(&Response::Attached)),
        Request::Descriptor => {
            return Ok(frame::encode(&Response::Descriptor(seed.encoded.clone())));
        }
        // Answered in `connection`: it streams.
        Request::Bootstrap => return Err(RemoteError::TooLarge),
        Request::Pages { runs, touched } => (runs, touched),
        Request::Touched { runs } => {
            // As many pages as a request may ask for: the client sends no more at once, and
            // a run's length alone must not size what is checked and recorded.
            if runs.iter().map(|r| r.1 as u64).sum::<u64>() > MAX_PAGES_PER_REQUEST {
                return Err(RemoteError::TooLarge);
            }
            let pages: Vec<u64> = runs
                .iter()
                .flat_map(|&(at, n)| (0..n as u64).map(move |i| at.saturating_add(i * 4096)))
                .collect();
            seed.record_touched(&pages)?;
            return Ok(frame::encode(&Response::Recorded));
        }
    };
    let pages: u64 = runs.iter().map(|r| r.1 as u64).sum();
    if pages > MAX_PAGES_PER_REQUEST {
        return Err(RemoteError::TooLarge);
    }
    seed.check_runs(&runs)?;
    if let Some(page) = touched {
        seed.check_runs(&[(page & !4095, 1)])?;
    }
    let len = pages as usize * 4096;
    let mut framed = pages_frame_head(len);
    let head = framed.len();
    framed.resize(head + len, 0);
    let framed = if pages <= INLINE_READ_PAGES {
        read_runs_into(&seed.memory, &runs, &mut framed[head..]).map(|()| framed)
    } else {
        let memory = seed.memory.clone();
        tokio::task::spawn_blocking(move || {
            read_runs_into(&memory, &runs, &mut framed[head..]).map(|()| framed)
        })
        .await
        .map_err(|e| RemoteError::SeedGone(format!("reading task: {e}")))?
    }
    .map_err(|e| RemoteError::SeedGone(e.to_string()))?;
    if let Some(page) = touched {
        seed.record(page);
    }
    daemon
        .counters
        .bytes_served
        .fetch_add(len as u64, Ordering::Relaxed);
    Ok(framed)
}
