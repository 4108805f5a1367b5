//! The pooled client of the page protocol: a few long-lived connections per peer, each with
//! the nonce and next sequence number its requests are sealed with.

use super::*;
use mitosis_sys::sock::set_recv_low_water;
use tokio::io::AsyncReadExt;

/// The answer to a bootstrap: the seed's descriptor, and the pages of `runs` back to back.
#[derive(Debug)]
pub struct Bootstrap {
    pub descriptor: Vec<u8>,
    pub runs: Vec<(u64, u32)>,
    pub pages: BootstrapPages,
    /// See `Response::Bootstrap`.
    pub learn: bool,
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

/// Answers longer than this are awaited whole on plain TCP (see [`read_answer`]).
const WHOLE_ABOVE: usize = 16 << 10;

/// Reads one answer frame. An answer of the `pages` bytes asked for goes straight into its
/// buffer (no decoding copy). On plain TCP a long body (pages) is awaited whole: with the
/// socket's low-water mark at what is still to come, the task wakes once for all of it
/// instead of once per batch of segments, each wake-up a thread's round trip through the
/// scheduler (a 50-page answer took three or four).
async fn read_answer(
    stream: &mut PeerStream,
    pages: Option<usize>,
) -> Result<Response, FrameError> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .map_err(frame::closed_on_eof)?;
    let len = frame::body_len(header, frame::MAX_FRAME)?;
    let mut body = Vec::new();
    if let Some(want) = pages {
        let head = pages_frame_head(want);
        if head[..4] == header {
            body.resize(head.len() - 4, 0);
            stream
                .read_exact(&mut body)
                .await
                .map_err(frame::closed_on_eof)?;
            if body == head[4..] {
                let mut data = vec![0u8; want];
                read_body(stream, &mut data).await?;
                return Ok(Response::Pages(data));
            }
            // As long, but another answer: decoded whole below.
        }
    }
    let read = body.len();
    body.resize(len, 0);
    read_body(stream, &mut body[read..]).await?;
    Ok(postcard::from_bytes(&body)?)
}

/// Fills `body`: on plain TCP, a long one awaited whole ([`read_whole`]).
async fn read_body(stream: &mut PeerStream, body: &mut [u8]) -> Result<(), FrameError> {
    match stream {
        PeerStream::Plain(tcp) if body.len() > WHOLE_ABOVE => read_whole(tcp, body).await,
        _ => stream
            .read_exact(body)
            .await
            .map(drop)
            .map_err(frame::closed_on_eof),
    }
}

/// Fills `body` from `tcp`, waiting for readiness only with the low-water mark at the bytes
/// still missing; the mark is set back to one byte after.
async fn read_whole(tcp: &mut TcpStream, body: &mut [u8]) -> Result<(), FrameError> {
    let mut filled = 0;
    let mut marked = false;
    let result = loop {
        if filled == body.len() {
            break Ok(());
        }
        match tcp.try_read(&mut body[filled..]) {
            Ok(0) => break Err(FrameError::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Without the mark (an old kernel) it only wakes more often.
                marked |= set_recv_low_water(tcp, body.len() - filled).is_ok();
                if let Err(e) = tcp.readable().await {
                    break Err(FrameError::Io(e));
                }
            }
            Err(e) => break Err(FrameError::Io(e)),
        }
    };
    if marked {
        let _ = set_recv_low_water(tcp, 1);
    }
    result
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
        match self.call(addr, &seed, (&Request::Attach, None)).await? {
            Response::Attached => Ok(()),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    pub async fn descriptor(&self, addr: SocketAddr, seed: SeedRef) -> Result<Vec<u8>, PeerError> {
        match self.call(addr, &seed, (&Request::Descriptor, None)).await? {
            Response::Descriptor(d) => Ok(d),
            _ => Err(PeerError::Protocol(addr)),
        }
    }

    /// Tells the seed's host that children touched `pages` (page addresses) for its working
    /// set, in requests of at most [`MAX_PAGES_PER_REQUEST`] pages.
    pub async fn touched(
        &self,
        addr: SocketAddr,
        seed: SeedRef,
        mut pages: Vec<u64>,
    ) -> Result<(), PeerError> {
        pages.sort_unstable();
        pages.dedup();
        for chunk in pages.chunks(MAX_PAGES_PER_REQUEST as usize) {
            let runs = super::page_runs(chunk);
            match self
                .call(addr, &seed, (&Request::Touched { runs }, None))
                .await?
            {
                Response::Recorded => {}
                _ => return Err(PeerError::Protocol(addr)),
            }
        }
        Ok(())
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
        match self.call(addr, &seed, (&request, Some(want))).await? {
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
        let (conn, resp) = self
            .open_exchange(addr, &seed, (&Request::Bootstrap, None))
            .await?;
        let (descriptor, runs, follow, learn) = match resp {
            Response::Bootstrap {
                descriptor,
                runs,
                follow,
                learn,
            } => (descriptor, runs, follow, learn),
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
            learn,
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
        (req, pages): (&Request, Option<usize>),
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
            read_answer(stream, pages).await
        };
        match timeout(self.timeout, exchange).await {
            Err(_) => Err(PeerError::Timeout(addr, self.timeout)),
            Ok(Err(e)) => Err(PeerError::Frame(addr, e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Sends `req` and reads its answer; `pages`: the bytes of pages it asks for, if it does.
    async fn call(
        &self,
        addr: SocketAddr,
        seed: &SeedRef,
        req: (&Request, Option<usize>),
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
        req: (&Request, Option<usize>),
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
