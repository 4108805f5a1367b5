//! A child started by a resume, until it exits.

use std::io::Write;
use std::os::unix::net::UnixStream;

use mitosis_transport::control::{Event, FaultStats, Request, ResumeStats};
use mitosis_transport::frame;

use crate::{Error, Result, recv, unexpected};

/// A running child: its pid on the daemon's host, how it was started, and the connection
/// that stands by it. Dropping it without [`Running::wait`] closes the connection, and the
/// daemon kills the child.
pub struct Running {
    pub pid: i32,
    pub stats: ResumeStats,
    stream: UnixStream,
}

/// How a child ended.
#[derive(Debug, Clone)]
pub struct Exited {
    /// Shell-style: the exit code, or 128 + N if killed by signal N.
    pub status: i32,
    /// Why the daemon killed it, if it did (its seed's host went away, out of memory).
    pub reason: Option<String>,
    /// Its page faults, served over its life.
    pub stats: FaultStats,
}

/// Sends signals to a running child from another thread (see [`Running::signaller`]).
pub struct Signaller {
    stream: UnixStream,
}

impl Running {
    pub(crate) fn new(stream: UnixStream, pid: i32, stats: ResumeStats) -> Self {
        Running { pid, stats, stream }
    }

    /// Delivers signal `signo` to the child.
    pub fn signal(&self, signo: i32) -> Result<()> {
        send_signal(&self.stream, signo)
    }

    /// Gives up on its exit after `timeout` ([`Error::Timeout`]), or never with `None`: a
    /// long-lived instance waits without one.
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> Result<()> {
        self.stream.set_read_timeout(timeout).map_err(Error::Send)
    }

    /// A handle that delivers signals to this child while another thread waits for it.
    pub fn signaller(&self) -> Result<Signaller> {
        let stream = self.stream.try_clone().map_err(Error::Send)?;
        Ok(Signaller { stream })
    }

    /// Waits until the child exits.
    pub fn wait(mut self) -> Result<Exited> {
        match recv(&mut self.stream)? {
            Event::Exited {
                status,
                reason,
                stats,
            } => Ok(Exited {
                status,
                reason,
                stats,
            }),
            other => Err(unexpected(&other)),
        }
    }
}

impl Signaller {
    /// Delivers signal `signo` to the child (an error once the child's connection is gone).
    pub fn signal(&self, signo: i32) -> Result<()> {
        send_signal(&self.stream, signo)
    }
}

fn send_signal(mut stream: &UnixStream, signo: i32) -> Result<()> {
    stream
        .write_all(&frame::encode(&Request::Signal { signo }))
        .map_err(Error::Send)
}
