//! Exit codes: one per kind of failure, in the sysexits range (64-79), so a script can tell a
//! dropped seed from an unreachable daemon without reading stderr. docs/operations.md has
//! the table.
//!
//! `mitosis resume` exits with its child's status once the child ran (0-255, 128 + N if a
//! signal N killed it); these codes mean mitosis failed only when the child never ran, with
//! one exception: a child the daemon killed because its memory's source went away exits with
//! [`Code::PageSourceLost`], as a resume that lost it before the child started.

use std::fmt;

use mitosis_client::{Error, ErrorKind};

/// What went wrong, as the process's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// The command line is wrong (clap's own errors, a missing handle).
    Usage = 64,
    /// Input that does not parse or that the daemon refused as malformed.
    BadInput = 65,
    /// No process with that pid (prepare --pid).
    NoSuchProcess = 66,
    /// The seed is not (or no longer) on its host: never prepared, or dropped.
    SeedGone = 67,
    /// The seed's host could not be reached, or did not answer in time.
    SeedHostUnreachable = 68,
    /// This host's mitosisd could not be reached (not running, wrong --socket, a TLS
    /// handshake refused), or it closed the connection before answering.
    DaemonUnreachable = 69,
    /// The daemon failed the request for another reason (its message says which).
    Failed = 70,
    /// This host lacks what the request needs now (containers, threads, memory).
    Unavailable = 71,
    /// A local file could not be read or written (--handle-file, --output), or the child's
    /// stdio could not be relayed.
    Io = 74,
    /// No answer from the daemon in time.
    Timeout = 75,
    /// The daemon answered something that does not fit the request.
    Protocol = 76,
    /// Not allowed: the caller's credentials, or a key that is not the seed's.
    Denied = 77,
    /// Refused: the process cannot be captured as a seed (refused at prepare), or the seed
    /// cannot be forked on this host (architecture, kernel, a bundle that differs).
    Refused = 78,
    /// The seed's memory went away (its host lost it, its page source died): before the child
    /// started, or while it ran (then the daemon killed it).
    PageSourceLost = 79,
}

impl Code {
    #[cfg(test)]
    pub const ALL: [Code; 14] = [
        Code::Usage,
        Code::BadInput,
        Code::NoSuchProcess,
        Code::SeedGone,
        Code::SeedHostUnreachable,
        Code::DaemonUnreachable,
        Code::Failed,
        Code::Unavailable,
        Code::Io,
        Code::Timeout,
        Code::Protocol,
        Code::Denied,
        Code::Refused,
        Code::PageSourceLost,
    ];

    pub fn of_kind(kind: ErrorKind) -> Code {
        match kind {
            ErrorKind::BadRequest => Code::BadInput,
            ErrorKind::Denied | ErrorKind::WrongKey => Code::Denied,
            ErrorKind::NoSuchSeed => Code::SeedGone,
            ErrorKind::Unreachable => Code::SeedHostUnreachable,
            ErrorKind::SeedGone => Code::PageSourceLost,
            ErrorKind::NoSuchProcess => Code::NoSuchProcess,
            ErrorKind::Unsupported => Code::Refused,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Failed => Code::Failed,
        }
    }

    pub fn of_client(e: &Error) -> Code {
        match e {
            Error::Connect { .. } | Error::ConnectTcp { .. } | Error::Handshake { .. } => {
                Code::DaemonUnreachable
            }
            Error::Closed | Error::Send(_) => Code::DaemonUnreachable,
            Error::Stdio(_) => Code::Io,
            Error::Recv(_) | Error::Unexpected(_) => Code::Protocol,
            Error::Timeout => Code::Timeout,
            Error::Daemon(d) => Code::of_kind(d.kind),
        }
    }

    /// The code of an error from `run`: the first cause in its chain that has one.
    pub fn of(e: &anyhow::Error) -> Code {
        for cause in e.chain() {
            if let Some(f) = cause.downcast_ref::<Failure>() {
                return f.code;
            }
            if let Some(c) = cause.downcast_ref::<Error>() {
                return Code::of_client(c);
            }
            if cause
                .downcast_ref::<mitosis_descriptor::HandleError>()
                .is_some()
            {
                return Code::BadInput;
            }
            // A descriptor from the daemon that does not decode.
            if cause
                .downcast_ref::<mitosis_descriptor::DecodeError>()
                .is_some()
            {
                return Code::Protocol;
            }
            if cause.downcast_ref::<std::io::Error>().is_some() {
                return Code::Io;
            }
        }
        Code::Failed
    }

    /// Its name in `--json` output and in docs/operations.md.
    pub fn name(self) -> &'static str {
        match self {
            Code::Usage => "usage",
            Code::BadInput => "bad_input",
            Code::NoSuchProcess => "no_such_process",
            Code::SeedGone => "seed_gone",
            Code::SeedHostUnreachable => "seed_host_unreachable",
            Code::DaemonUnreachable => "daemon_unreachable",
            Code::Failed => "failed",
            Code::Unavailable => "unavailable",
            Code::Io => "io",
            Code::Timeout => "timeout",
            Code::Protocol => "protocol",
            Code::Denied => "denied",
            Code::Refused => "refused",
            Code::PageSourceLost => "page_source_lost",
        }
    }
}

/// A failure of the CLI itself, with its code.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn error(code: Code, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Failure {
            code,
            message: message.into(),
        })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Whether the daemon killed a child because its memory's source went away (rather than at
/// its container's memory limit, which the child's own status, 137, reports).
pub fn lost_its_pages(reason: &str) -> bool {
    !reason.starts_with("out of memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mitosis_client::DaemonError;

    #[test]
    fn every_kind_has_a_distinct_code_in_the_sysexits_range() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!((64..=79).contains(&(code as u8)), "{code:?}");
            assert!(seen.insert(code as u8), "{code:?} reused");
            assert!(seen.len() <= Code::ALL.len());
        }
        let kinds = [
            ErrorKind::BadRequest,
            ErrorKind::NoSuchSeed,
            ErrorKind::Unreachable,
            ErrorKind::SeedGone,
            ErrorKind::NoSuchProcess,
            ErrorKind::Unsupported,
            ErrorKind::Unavailable,
            ErrorKind::Failed,
            ErrorKind::Denied,
        ];
        let codes: std::collections::HashSet<u8> =
            kinds.iter().map(|k| Code::of_kind(*k) as u8).collect();
        assert_eq!(codes.len(), kinds.len(), "each daemon kind its own code");
    }

    #[test]
    fn codes_are_found_through_context() {
        let daemon = Error::Daemon(DaemonError::new(ErrorKind::NoSuchSeed, "no seed 3"));
        let e = anyhow::Error::new(daemon).context("resuming");
        assert_eq!(Code::of(&e), Code::SeedGone);
        let e = anyhow::Error::new(Error::Connect {
            path: "/nowhere".into(),
            err: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(Code::of(&e), Code::DaemonUnreachable);
        let e = "mitosis://x"
            .parse::<mitosis_descriptor::Handle>()
            .unwrap_err();
        assert_eq!(Code::of(&anyhow::Error::new(e)), Code::BadInput);
        let e = Failure::error(Code::Usage, "no handle");
        assert_eq!(Code::of(&e.context("reading")), Code::Usage);
        assert_eq!(Code::of(&anyhow::anyhow!("other")), Code::Failed);
    }

    #[test]
    fn out_of_memory_is_the_childs_own_end() {
        assert!(!lost_its_pages(
            "out of memory: killed at its container's limit of 64 MiB"
        ));
        assert!(lost_its_pages("page source 10.0.0.1:7070 lost: closed"));
    }
}
