//! What can go wrong talking to the daemon.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use mitosis_transport::FrameError;
use mitosis_transport::control::{DaemonError, ErrorKind};
use thiserror::Error;

/// An error of the control-socket client; each variant's message says it all on one line.
#[derive(Debug, Error)]
pub enum Error {
    /// The socket could not be connected to.
    #[error("cannot reach the local mitosisd at {} (is it running?): {err}", path.display())]
    Connect { path: PathBuf, err: io::Error },
    /// A daemon's TCP control listener could not be connected to.
    #[error("cannot reach mitosisd at tcp://{addr}: {err}")]
    ConnectTcp { addr: SocketAddr, err: io::Error },
    /// The TLS handshake with it failed: a certificate not of the cluster's CA on either
    /// side, or not naming the address dialed.
    #[error("TLS handshake with mitosisd at tcp://{addr} failed: {err}")]
    Handshake { addr: SocketAddr, err: io::Error },
    /// Reading the stdin to relay, or writing the stdout or stderr relayed, failed.
    #[error("relaying the child's stdio: {0}")]
    Stdio(io::Error),
    /// Writing a request failed.
    #[error("sending to mitosisd: {0}")]
    Send(io::Error),
    /// Reading an answer failed (other than a closed connection or a timeout).
    #[error("reading from mitosisd: {0}")]
    Recv(FrameError),
    /// The daemon closed the connection before answering.
    #[error("mitosisd closed the connection")]
    Closed,
    /// No answer within the timeout set on the client; the connection is then unusable.
    #[error("no answer from mitosisd in time")]
    Timeout,
    /// The daemon refused or failed the request: its kind, to match on, and one line.
    #[error("{0}")]
    Daemon(DaemonError),
    /// An answer that does not fit the request.
    #[error("unexpected answer from mitosisd: {0}")]
    Unexpected(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The daemon's kind of failure, if the daemon answered with one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Daemon(e) => Some(e.kind),
            _ => None,
        }
    }

    pub(crate) fn from_frame(e: FrameError) -> Self {
        match e {
            FrameError::Closed => Error::Closed,
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Error::Timeout
            }
            other => Error::Recv(other),
        }
    }
}
