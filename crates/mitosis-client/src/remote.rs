//! The control protocol over TCP with mutual TLS (`mitosisd --control-listen`), async: what a
//! platform uses to reach every host's daemon across the network.
//!
//! Like the unix client, each request takes a connection of its own. A resume's stdio is
//! relayed on its connection ([`RemoteRunning::relay`]): stdin in chunks within the window
//! the daemon grants, stdout and stderr as they come, signals whenever, until the exit.
//! Dropping a [`RemoteRunning`] (or the relay's future) closes the connection, and the
//! daemon kills the child.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mitosis_transport::control::{Event, MAX_STDIO_CHUNK, Request, STDIN_WINDOW};
use mitosis_transport::frame;
use mitosis_transport::tls::Tls;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use crate::{DaemonStatus, Error, Exited, PrepareStats, Result, ResumeStats, unexpected};

/// Makes the TCP connection to a daemon. Where the socket is created decides the network
/// namespace it lives in, so a caller whose daemons are reachable only from another
/// namespace dials from a thread that joined it.
pub type Connector =
    Arc<dyn Fn(SocketAddr, Duration) -> io::Result<std::net::TcpStream> + Send + Sync>;

/// Dials from the calling thread's namespace.
pub fn direct() -> Connector {
    Arc::new(|addr, timeout| std::net::TcpStream::connect_timeout(&addr, timeout))
}

/// How long connecting may take, TLS handshake included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How this client reaches daemons over TCP: its certificate and CA, and how it dials.
#[derive(Clone)]
pub struct Remote {
    tls: Tls,
    connector: Connector,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Remote { .. }")
    }
}

impl Remote {
    /// Presents `tls`'s certificate and trusts daemons whose certificate chains to its CA
    /// and names the address dialed.
    pub fn new(tls: Tls) -> Remote {
        Remote {
            tls,
            connector: direct(),
        }
    }

    /// Dials with `connector` instead of from the calling thread.
    pub fn with_connector(mut self, connector: Connector) -> Remote {
        self.connector = connector;
        self
    }

    /// A connection to the daemon at `addr`, authenticated both ways.
    pub async fn connect(&self, addr: SocketAddr) -> Result<RemoteClient> {
        let connect_err = |err| Error::ConnectTcp { addr, err };
        let connector = self.connector.clone();
        let tcp = tokio::task::spawn_blocking(move || connector(addr, CONNECT_TIMEOUT))
            .await
            .map_err(|e| connect_err(io::Error::other(e)))?
            .map_err(connect_err)?;
        tcp.set_nonblocking(true).map_err(connect_err)?;
        tcp.set_nodelay(true).map_err(connect_err)?;
        let tcp = TcpStream::from_std(tcp).map_err(connect_err)?;
        let name = ServerName::IpAddress(addr.ip().into());
        let shake = self.tls.connector().connect(name, tcp);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, shake)
            .await
            .map_err(|_| Error::Handshake {
                addr,
                err: io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"),
            })?
            .map_err(|err| Error::Handshake { addr, err })?;
        Ok(RemoteClient {
            stream,
            memory_mib: None,
        })
    }
}

/// One TCP connection to a daemon.
pub struct RemoteClient {
    stream: TlsStream<TcpStream>,
    memory_mib: Option<u64>,
}

impl RemoteClient {
    /// Limits the memory of the child a resume starts to `mib` MiB (see
    /// [`crate::Client::with_memory_limit`]).
    pub fn with_memory_limit(mut self, mib: Option<u64>) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The daemon's state (its load among it: children running, seeds, replicas).
    pub async fn status(self) -> Result<DaemonStatus> {
        match self.call(&Request::Status).await? {
            Event::Status(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// Captures process `pid` of the daemon's host as a seed.
    pub async fn prepare_pid(self, pid: i32) -> Result<(String, PrepareStats)> {
        self.prepared(&Request::Prepare { pid }).await
    }

    /// As [`RemoteClient::prepare_pid`], a seed of the program named `profile` (see
    /// [`crate::Client::prepare_pid_profiled`]).
    pub async fn prepare_pid_profiled(
        self,
        pid: i32,
        profile: &str,
    ) -> Result<(String, PrepareStats)> {
        self.prepared(&Request::PrepareProfiled {
            pid: Some(pid),
            profile: profile.to_owned(),
        })
        .await
    }

    /// Starts the OCI bundle in `bundle` (a directory on the daemon's host), waits until it is
    /// warm and prepares it.
    pub async fn prepare_bundle(
        self,
        bundle: &Path,
        ready_timeout: Duration,
    ) -> Result<(String, PrepareStats)> {
        self.prepared(&Request::PrepareBundle {
            bundle: bundle.to_string_lossy().into_owned(),
            ready_timeout_ms: ready_timeout.as_millis() as u64,
        })
        .await
    }

    async fn prepared(self, request: &Request) -> Result<(String, PrepareStats)> {
        match self.call(request).await? {
            Event::Prepared { handle, stats } => Ok((handle, stats)),
            other => Err(unexpected(&other)),
        }
    }

    /// Stops serving a seed of the daemon's host.
    pub async fn drop_seed(self, handle: &str) -> Result<()> {
        self.done(&Request::Drop {
            handle: handle.to_owned(),
        })
        .await
    }

    /// Forgets the daemon's replica of the seed.
    pub async fn evict(self, handle: &str) -> Result<()> {
        self.done(&Request::Evict {
            handle: handle.to_owned(),
        })
        .await
    }

    /// Builds the daemon's replica of the seed now (see [`crate::Client::replicate`]).
    pub async fn replicate(self, handle: &str) -> Result<()> {
        self.done(&Request::Replicate {
            handle: handle.to_owned(),
        })
        .await
    }

    /// Sends `request`, one the daemon answers with `Done` (drop, evict, replicate, fill).
    pub async fn done(self, request: &Request) -> Result<()> {
        match self.call(request).await? {
            Event::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The encoded descriptor of the seed behind `handle`.
    pub async fn inspect(self, handle: &str) -> Result<Vec<u8>> {
        match self
            .call(&Request::Inspect {
                handle: handle.to_owned(),
            })
            .await?
        {
            Event::Descriptor(bytes) => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a child of the seed behind `handle` on the daemon's host, its stdio relayed on
    /// this connection; returns once it runs.
    pub async fn resume(mut self, handle: &str) -> Result<RemoteRunning> {
        send(
            &mut self.stream,
            &Request::Resume {
                handle: handle.to_owned(),
                memory_mib: self.memory_mib,
            },
        )
        .await?;
        match recv(&mut self.stream).await? {
            Event::Started { pid, stats } => Ok(RemoteRunning {
                pid,
                stats,
                stream: self.stream,
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn call(mut self, request: &Request) -> Result<Event> {
        send(&mut self.stream, request).await?;
        recv(&mut self.stream).await
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, request: &Request) -> Result<()> {
    w.write_all(&frame::encode(request))
        .await
        .map_err(Error::Send)?;
    w.flush().await.map_err(Error::Send)
}

/// The next event; an `Error` event becomes [`Error::Daemon`].
async fn recv<R: AsyncRead + Unpin>(r: &mut R) -> Result<Event> {
    match frame::read(r).await.map_err(Error::from_frame)? {
        Event::Error(e) => Err(Error::Daemon(e)),
        ev => Ok(ev),
    }
}

/// A child resumed over TCP, until it exits.
pub struct RemoteRunning {
    pub pid: i32,
    pub stats: ResumeStats,
    stream: TlsStream<TcpStream>,
}

/// Events read ahead of the relay: few, so a relay that writes its stdout slowly stops
/// reading the connection (and the daemon stops reading the child's pipes).
const EVENTS_AHEAD: usize = 4;

impl RemoteRunning {
    /// Relays the child's stdio until it exits: `stdin` to the child (then EOF), the child's
    /// stdout and stderr to `stdout` and `stderr`, and each signal number from `signals` to
    /// the child. An error writing `stdout` or `stderr` ends the relay, and the child.
    pub async fn relay<I, O, E>(
        self,
        mut stdin: I,
        mut stdout: O,
        mut stderr: E,
        mut signals: mpsc::Receiver<i32>,
    ) -> Result<Exited>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let (reader, mut writer) = tokio::io::split(self.stream);
        // Events are read on a task of their own: a frame read cut short by another branch
        // of the select below would lose its bytes.
        let (ahead, mut events) = mpsc::channel(EVENTS_AHEAD);
        let reading = tokio::spawn(read_events(reader, ahead));
        let _reading = AbortOnDrop(reading);
        let mut window = STDIN_WINDOW;
        let (mut stdin_done, mut signals_done) = (false, false);
        let mut buf = vec![0u8; MAX_STDIO_CHUNK];
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(Event::Stdout(bytes))) => write_out(&mut stdout, &bytes).await?,
                    Some(Ok(Event::Stderr(bytes))) => write_out(&mut stderr, &bytes).await?,
                    Some(Ok(Event::StdinWindow(n))) => window += n as usize,
                    Some(Ok(Event::Exited { status, reason, stats })) => {
                        return Ok(Exited { status, reason, stats });
                    }
                    Some(Ok(other)) => return Err(unexpected(&other)),
                    Some(Err(e)) => return Err(e),
                    None => return Err(Error::Closed),
                },
                read = stdin.read(&mut buf[..window.min(MAX_STDIO_CHUNK)]),
                    if !stdin_done && window > 0 => {
                    let n = read.map_err(Error::Stdio)?;
                    let request = if n == 0 {
                        stdin_done = true;
                        Request::StdinEof
                    } else {
                        window -= n;
                        Request::Stdin(buf[..n].to_vec())
                    };
                    send(&mut writer, &request).await?;
                }
                signo = signals.recv(), if !signals_done => match signo {
                    Some(signo) => send(&mut writer, &Request::Signal { signo }).await?,
                    None => signals_done = true,
                },
            }
        }
    }

    /// Relays nothing to the child's stdin and discards its output; returns its exit.
    pub async fn wait(self) -> Result<Exited> {
        let (_signal, signals) = mpsc::channel(1);
        self.relay(
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
            signals,
        )
        .await
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<()> {
    w.write_all(bytes).await.map_err(Error::Stdio)?;
    w.flush().await.map_err(Error::Stdio)
}

async fn read_events(
    mut reader: ReadHalf<TlsStream<TcpStream>>,
    ahead: mpsc::Sender<Result<Event>>,
) {
    loop {
        let event = recv(&mut reader).await;
        let last = event.is_err() || matches!(event, Ok(Event::Exited { .. }));
        if ahead.send(event).await.is_err() || last {
            return;
        }
    }
}
