//! What the daemon's operations return when they fail: one enum per operation, as firecracker
//! does, each knowing the [`ErrorKind`] it goes on the wire as. Clients match on the kind;
//! people read the message, one line.

use std::io;

use mitosis_descriptor::{DecodeError, HandleError};
use mitosis_fork::PrepareError;
use mitosis_fork::restore::{PlanError, RestoreError};
use mitosis_transport::control::{DaemonError, ErrorKind, Event};
use mitosis_transport::peer::{PeerError, RemoteError};
use thiserror::Error;

/// The wire kind of an error.
pub trait Kind: std::fmt::Display {
    fn kind(&self) -> ErrorKind;

    /// The error as the control protocol carries it.
    fn to_event(&self) -> Event {
        Event::Error(DaemonError::new(self.kind(), self.to_string()))
    }
}

impl Kind for RemoteError {
    fn kind(&self) -> ErrorKind {
        match self {
            RemoteError::NoSuchSeed(_) => ErrorKind::NoSuchSeed,
            RemoteError::WrongKey(_) => ErrorKind::WrongKey,
            RemoteError::SeedGone(_) => ErrorKind::SeedGone,
            RemoteError::BadRange(..) | RemoteError::TooLarge | RemoteError::Replayed(..) => {
                ErrorKind::Failed
            }
        }
    }
}

impl Kind for PeerError {
    fn kind(&self) -> ErrorKind {
        match self {
            PeerError::Connect(..) | PeerError::Timeout(..) | PeerError::NoHello(..) => {
                ErrorKind::Unreachable
            }
            PeerError::Busy(..) => ErrorKind::Unavailable,
            PeerError::Remote(_, e) => e.kind(),
            // Another protocol version, or TLS on one side only or with another CA.
            PeerError::Handshake(..) | PeerError::Tls(..) => ErrorKind::Unsupported,
            PeerError::Frame(..) | PeerError::Protocol(_) | PeerError::Unpack(..) => {
                ErrorKind::Failed
            }
        }
    }
}

impl Kind for PrepareError {
    fn kind(&self) -> ErrorKind {
        match self {
            PrepareError::NoSuchProcess(_) => ErrorKind::NoSuchProcess,
            PrepareError::AlreadyTraced { .. }
            | PrepareError::Uninterruptible { .. }
            | PrepareError::Unsupported { .. }
            | PrepareError::Uncarried { .. }
            | PrepareError::NoSyscallInsn { .. } => ErrorKind::Unsupported,
            PrepareError::Trace { .. }
            | PrepareError::Inject { .. }
            | PrepareError::Proc { .. }
            | PrepareError::Malformed { .. } => ErrorKind::Failed,
        }
    }
}

impl Kind for HandleError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadRequest
    }
}

/// Why a prepare failed.
#[derive(Debug, Error)]
pub enum PrepareFailed {
    #[error(transparent)]
    Capture(#[from] PrepareError),
    /// A bundle that cannot be started, or containers this host lacks.
    #[error("{0}")]
    Containers(String),
    #[error("starting {dir}: {why}")]
    Start { dir: String, why: String },
    #[error("starting a tracer thread: {0}")]
    Tracer(io::Error),
    #[error("no randomness for the seed's key: {0}")]
    Random(String),
    /// The caller could trace the process when it asked, no longer once it was captured.
    #[error(
        "refused: uid {uid} may not prepare pid {pid}: {why} (it changed while it was prepared)"
    )]
    Changed { uid: u32, pid: i32, why: String },
    /// A child that cannot be prepared again (multi-hop): why.
    #[error("{0}")]
    MultiHop(String),
}

impl Kind for PrepareFailed {
    fn kind(&self) -> ErrorKind {
        match self {
            PrepareFailed::Capture(e) => e.kind(),
            PrepareFailed::Containers(_) | PrepareFailed::Start { .. } => ErrorKind::Unsupported,
            PrepareFailed::Tracer(_) | PrepareFailed::Random(_) => ErrorKind::Unavailable,
            PrepareFailed::Changed { .. } => ErrorKind::Denied,
            PrepareFailed::MultiHop(_) => ErrorKind::Unsupported,
        }
    }
}

/// Why drop, inspect or evict failed.
#[derive(Debug, Error)]
pub enum SeedOpFailed {
    #[error(transparent)]
    Handle(#[from] HandleError),
    #[error("seed {id} lives on {host}, not on this host ({here})")]
    Elsewhere { id: u64, host: String, here: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("no replica of seed {0} on this host")]
    NoReplica(u64),
}

impl Kind for SeedOpFailed {
    fn kind(&self) -> ErrorKind {
        match self {
            SeedOpFailed::Handle(e) => e.kind(),
            SeedOpFailed::Elsewhere { .. } => ErrorKind::BadRequest,
            SeedOpFailed::Remote(e) => e.kind(),
            SeedOpFailed::Peer(e) => e.kind(),
            SeedOpFailed::NoReplica(_) => ErrorKind::NoSuchSeed,
        }
    }
}

/// Why a host could not build its replica of a seed.
#[derive(Debug, Error)]
pub enum BuildFailed {
    #[error(transparent)]
    Bootstrap(#[from] PeerError),
    #[error(transparent)]
    Descriptor(#[from] DecodeError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Containers(String),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// Bringing in the pages the replica needs before its first child.
    #[error("{0}")]
    Pages(String),
    #[error("starting a tracer thread: {0}")]
    Tracer(io::Error),
}

impl Kind for BuildFailed {
    fn kind(&self) -> ErrorKind {
        match self {
            BuildFailed::Bootstrap(e) => e.kind(),
            BuildFailed::Plan(_) | BuildFailed::Containers(_) => ErrorKind::Unsupported,
            BuildFailed::Tracer(_) => ErrorKind::Unavailable,
            BuildFailed::Descriptor(_) | BuildFailed::Restore(_) | BuildFailed::Pages(_) => {
                ErrorKind::Failed
            }
        }
    }
}

/// Why a child could not be forked from a replica.
#[derive(Debug, Error)]
pub enum ForkFailed {
    #[error("{0}")]
    Containers(String),
    #[error("container for the child: {0}")]
    Container(String),
    #[error("the replica is gone")]
    NoReplica,
    #[error("a memory limit needs a container, and this seed's children run in none")]
    NoContainerToLimit,
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

impl Kind for ForkFailed {
    fn kind(&self) -> ErrorKind {
        match self {
            ForkFailed::Containers(_) | ForkFailed::Container(_) => ErrorKind::Unavailable,
            ForkFailed::NoReplica | ForkFailed::Restore(_) => ErrorKind::Failed,
            ForkFailed::NoContainerToLimit => ErrorKind::BadRequest,
        }
    }
}

/// Why a cold start of a bundle failed before its process ran.
#[derive(Debug, Error)]
pub enum StartFailed {
    #[error(
        "a start needs the caller's stdin, stdout and stderr (passed on the unix socket; not relayed over TCP yet)"
    )]
    NoStdio,
    #[error("{0}")]
    Containers(String),
    /// The bundle is unusable here (missing, malformed, limits this host cannot enforce).
    #[error("{0}")]
    Bundle(String),
    #[error("starting {bundle}: {why}")]
    Container { bundle: String, why: String },
    /// It exited, or did not block reading stdin in time.
    #[error("{bundle}: {why}")]
    NotWarm { bundle: String, why: String },
}

impl Kind for StartFailed {
    fn kind(&self) -> ErrorKind {
        match self {
            StartFailed::NoStdio => ErrorKind::BadRequest,
            StartFailed::NotWarm { .. } => ErrorKind::Failed,
            StartFailed::Bundle(_) => ErrorKind::Unsupported,
            StartFailed::Containers(_) | StartFailed::Container { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Why a resume failed before its child ran.
#[derive(Debug, Error)]
pub enum ResumeFailed {
    #[error(transparent)]
    Handle(#[from] HandleError),
    #[error("resume needs the caller's stdin, stdout and stderr")]
    NoStdio,
    #[error("making the child's stdio pipes: {0}")]
    Pipes(io::Error),
    #[error(transparent)]
    Seed(#[from] RemoteError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Build(#[from] BuildFailed),
    #[error(transparent)]
    Fork(#[from] ForkFailed),
    /// A fetch of the replica's fill (control request `Fill`) failed.
    #[error("{0}")]
    Fill(String),
}

impl Kind for ResumeFailed {
    fn kind(&self) -> ErrorKind {
        match self {
            ResumeFailed::Handle(e) => e.kind(),
            ResumeFailed::NoStdio => ErrorKind::BadRequest,
            ResumeFailed::Pipes(_) => ErrorKind::Unavailable,
            ResumeFailed::Seed(e) => e.kind(),
            ResumeFailed::Peer(e) => e.kind(),
            ResumeFailed::Build(e) => e.kind(),
            ResumeFailed::Fork(e) => e.kind(),
            ResumeFailed::Fill(_) => ErrorKind::SeedGone,
        }
    }
}

/// A refusal of the caller (SO_PEERCRED), or a request that makes no sense here.
#[derive(Debug, Error)]
pub enum RequestRefused {
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    BadRequest(String),
}

impl Kind for RequestRefused {
    fn kind(&self) -> ErrorKind {
        match self {
            RequestRefused::Denied(_) => ErrorKind::Denied,
            RequestRefused::BadRequest(_) => ErrorKind::BadRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_cause() {
        let gone = ResumeFailed::Peer(PeerError::Remote(
            "10.0.0.1:7070".parse().unwrap(),
            RemoteError::NoSuchSeed(3),
        ));
        assert_eq!(gone.kind(), ErrorKind::NoSuchSeed);
        let down = ResumeFailed::Build(BuildFailed::Bootstrap(PeerError::Connect(
            "10.0.0.1:7070".parse().unwrap(),
            "refused".into(),
        )));
        assert_eq!(down.kind(), ErrorKind::Unreachable);
        let Event::Error(e) = down.to_event() else {
            panic!("an error event")
        };
        assert_eq!(e.message, down.to_string());
        assert_eq!(
            PrepareFailed::Capture(PrepareError::NoSuchProcess(9)).kind(),
            ErrorKind::NoSuchProcess
        );
        assert_eq!(
            SeedOpFailed::Handle(HandleError::Shape).kind(),
            ErrorKind::BadRequest
        );
    }
}
