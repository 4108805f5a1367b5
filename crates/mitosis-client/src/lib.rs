//! The blocking client of a host's `mitosisd` control socket: what the `mitosis` CLI uses, and
//! what a platform that starts children itself would use instead of running the CLI.
//!
//! The daemon answers one request per connection, so every request consumes the [`Client`]:
//! `Client::connect(path)?.evict(handle)?`. A resume keeps its connection for as long as the
//! child runs ([`Running`]): signals go to the child over it, and its exit comes back on it.
//! If the connection closes first, the daemon kills the child.
//!
//! Daemons on other machines are reached over TCP with mutual TLS ([`remote`], async): an
//! [`Endpoint`] names either.

mod endpoint;
mod error;
pub mod remote;
mod running;
mod stats;
#[cfg(test)]
mod tests;
pub mod workflow;

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mitosis_sys::fdpass;
use mitosis_transport::control::Event;
use mitosis_transport::frame;

pub use endpoint::{Endpoint, EndpointError};
pub use error::{Error, Result};
pub use mitosis_transport::control::{
    DaemonError, DaemonStatus, ErrorKind, FaultStats, PrepareStats, ReplicaStatus, Request,
    ResumeStats, SeedStatus,
};
pub use mitosis_transport::tls::{Tls, TlsError};
pub use remote::{Connector, Remote, RemoteClient, RemoteRunning};
pub use running::{Exited, Running, Signaller};
pub use stats::{STATS_PAIRS, stats_line, stats_pairs};

/// One connection to a daemon's control socket.
pub struct Client {
    stream: UnixStream,
    /// A resumed child's memory limit in MiB (see [`Client::with_memory_limit`]).
    memory_mib: Option<u64>,
}

impl Client {
    /// Connects to the daemon's socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|err| Error::Connect {
            path: path.to_owned(),
            err,
        })?;
        Ok(Client {
            stream,
            memory_mib: None,
        })
    }

    /// A client over a connection made elsewhere (a socketpair, an inherited fd).
    pub fn from_stream(stream: UnixStream) -> Self {
        Client {
            stream,
            memory_mib: None,
        }
    }

    /// Limits the memory of the child a resume starts to `mib` MiB (its container's limit
    /// lowered to it; a seed whose children run in no container refuses it).
    pub fn with_memory_limit(mut self, mib: Option<u64>) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Gives up on any answer (a resume's `Started`, then its exit) after `timeout` with
    /// [`Error::Timeout`]; none by default.
    pub fn with_timeout(self, timeout: Duration) -> Result<Self> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(Error::Send)?;
        Ok(self)
    }

    /// Captures process `pid` of the daemon's host as a seed: its handle and timings.
    pub fn prepare_pid(self, pid: i32) -> Result<(String, PrepareStats)> {
        self.prepared(&Request::Prepare { pid })
    }

    /// As [`Client::prepare_pid`], a seed of the program named `profile`: its first
    /// children's hosts get the pages earlier seeds of that profile had their children touch
    /// (`stats.carried_pages` of them).
    pub fn prepare_pid_profiled(self, pid: i32, profile: &str) -> Result<(String, PrepareStats)> {
        self.prepared(&Request::PrepareProfiled {
            pid: Some(pid),
            profile: profile.to_owned(),
        })
    }

    /// Starts the OCI bundle in `bundle` (a directory on the daemon's host), waits until it is
    /// warm (blocked reading stdin, at most `ready_timeout`) and prepares it.
    pub fn prepare_bundle(
        self,
        bundle: &Path,
        ready_timeout: Duration,
    ) -> Result<(String, PrepareStats)> {
        self.prepared(&Request::PrepareBundle {
            bundle: bundle.to_string_lossy().into_owned(),
            ready_timeout_ms: ready_timeout.as_millis() as u64,
        })
    }

    fn prepared(self, request: &Request) -> Result<(String, PrepareStats)> {
        match self.call(request)? {
            Event::Prepared { handle, stats } => Ok((handle, stats)),
            other => Err(unexpected(&other)),
        }
    }

    /// Stops serving a seed of the daemon's host; children still needing its pages are killed.
    pub fn drop_seed(self, handle: &str) -> Result<()> {
        self.done(&Request::Drop {
            handle: handle.to_owned(),
        })
    }

    /// Forgets the daemon's replica of the seed: its next child there starts as on a new host.
    pub fn evict(self, handle: &str) -> Result<()> {
        self.done(&Request::Evict {
            handle: handle.to_owned(),
        })
    }

    /// Builds the daemon's replica of the seed now (if it has none), so its next child
    /// there is a plain fork; returns once it is ready.
    pub fn replicate(self, handle: &str) -> Result<()> {
        self.done(&Request::Replicate {
            handle: handle.to_owned(),
        })
    }

    /// Builds the daemon's replica of the seed (if it has none) and brings every page of the
    /// seed into it that its cache has room for, so the children forked there next share
    /// them; returns once they are in. For children that each read most of the seed.
    pub fn fill(self, handle: &str) -> Result<()> {
        self.done(&Request::Fill {
            handle: handle.to_owned(),
        })
    }

    /// Sends `request`, one the daemon answers with `Done` (drop, evict, replicate, fill).
    pub fn done(self, request: &Request) -> Result<()> {
        match self.call(request)? {
            Event::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The daemon's state (`mitosis status` prints its `Display`).
    pub fn status(self) -> Result<DaemonStatus> {
        match self.call(&Request::Status)? {
            Event::Status(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// The encoded descriptor of the seed behind `handle` (`mitosis_descriptor::decode`).
    pub fn inspect(self, handle: &str) -> Result<Vec<u8>> {
        match self.call(&Request::Inspect {
            handle: handle.to_owned(),
        })? {
            Event::Descriptor(bytes) => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a child of the seed behind `handle` on the daemon's host, with `stdin`, `stdout`
    /// and `stderr` as its fds 0, 1 and 2 (and `listener`, a listening socket, as fd 3).
    /// Returns once the child runs; the caller may close its copies of the descriptors then.
    pub fn resume(
        mut self,
        handle: &str,
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
        listener: Option<BorrowedFd<'_>>,
    ) -> Result<Running> {
        let fds: Vec<RawFd> = [stdin, stdout, stderr]
            .into_iter()
            .chain(listener)
            .map(|fd| fd.as_raw_fd())
            .collect();
        self.send(
            &Request::Resume {
                handle: handle.to_owned(),
                memory_mib: self.memory_mib,
            },
            &fds,
        )?;
        match self.recv()? {
            Event::Started { pid, stats } => Ok(Running::new(self.stream, pid, stats)),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts the OCI bundle in `bundle` (a directory on the daemon's host) afresh, in a
    /// container of its own, with `stdin`, `stdout` and `stderr` as its fds 0, 1 and 2 and its
    /// memory limited to `memory_mib` MiB if that is below the bundle's limit: a cold start,
    /// nothing forked. The same [`Running`] as a resume's (its stats: `container_us`,
    /// `total_us`). With `warm_timeout`, it returns once the process blocks reading stdin
    /// (all it wrote before is start-up output, in `stdout` already).
    pub fn start(
        mut self,
        bundle: &Path,
        memory_mib: Option<u64>,
        warm_timeout: Option<Duration>,
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<Running> {
        let fds: Vec<RawFd> = [stdin, stdout, stderr]
            .into_iter()
            .map(|fd| fd.as_raw_fd())
            .collect();
        self.send(
            &Request::Start {
                bundle: bundle.to_string_lossy().into_owned(),
                memory_mib,
                warm_timeout_ms: warm_timeout.map(|t| t.as_millis() as u64),
            },
            &fds,
        )?;
        match self.recv()? {
            Event::Started { pid, stats } => Ok(Running::new(self.stream, pid, stats)),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `req`, attaching `fds` (they arrive with the request).
    fn send(&mut self, req: &Request, fds: &[RawFd]) -> Result<()> {
        let bytes = frame::encode(req);
        let sent = fdpass::send(self.stream.as_raw_fd(), &bytes, fds).map_err(Error::Send)?;
        if sent < bytes.len() {
            self.stream.write_all(&bytes[sent..]).map_err(Error::Send)?;
        }
        Ok(())
    }

    /// The next answer; an `Error` event becomes [`Error::Daemon`].
    fn recv(&mut self) -> Result<Event> {
        recv(&mut self.stream)
    }

    fn call(mut self, req: &Request) -> Result<Event> {
        self.send(req, &[])?;
        self.recv()
    }
}

/// Reads one answer from `stream`; an `Error` event becomes [`Error::Daemon`].
fn recv(stream: &mut UnixStream) -> Result<Event> {
    match frame::read_blocking(stream).map_err(Error::from_frame)? {
        Event::Error(e) => Err(Error::Daemon(e)),
        ev => Ok(ev),
    }
}

fn unexpected(event: &Event) -> Error {
    Error::Unexpected(format!("{event:?}"))
}
