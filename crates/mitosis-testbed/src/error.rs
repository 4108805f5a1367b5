//! The error type of the testbed.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building, using or tearing down a
/// [`Testbed`](crate::Testbed).
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// Network namespaces can only be created by root.
    #[error(
        "the testbed needs root privileges to create network namespaces (effective uid is {euid})"
    )]
    NotRoot {
        /// The effective uid of this process.
        euid: u32,
    },

    /// iproute2 is not installed (or not in `PATH`).
    #[error(
        "the `ip` command (iproute2) is needed to build the testbed but could not be run: {source}"
    )]
    IpMissing {
        /// Why spawning `ip` failed.
        source: io::Error,
    },

    /// The requested number of hosts does not fit the testbed's /24 subnet.
    #[error("a testbed holds between 1 and {max} hosts, but {requested} were requested")]
    BadHostCount {
        /// The number of hosts asked for.
        requested: usize,
        /// The largest supported number of hosts.
        max: usize,
    },

    /// A command ran but exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },

    /// A command could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line that could not be started.
        command: String,
        /// Why it could not be started.
        source: io::Error,
    },

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path involved.
        context: String,
        /// The underlying error.
        source: io::Error,
    },

    /// The daemon exited before its unix socket accepted a connection.
    #[error("the daemon of host {host} exited during startup ({status}); log {log}:\n{log_tail}")]
    DaemonExited {
        /// The host's netns name (it starts with the testbed id).
        host: String,
        /// The daemon's exit status.
        status: String,
        /// The daemon's log file.
        log: PathBuf,
        /// The end of the daemon's log.
        log_tail: String,
    },

    /// The daemon did not accept a connection on its unix socket in time.
    #[error(
        "the daemon of host {host} did not accept connections on {socket} within {timeout:?}; log {log}:\n{log_tail}"
    )]
    DaemonTimeout {
        /// The host's netns name (it starts with the testbed id).
        host: String,
        /// The unix socket that never became ready.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// The daemon's log file.
        log: PathBuf,
        /// The end of the daemon's log.
        log_tail: String,
    },

    /// `start_daemon` was called on a testbed configured without a daemon.
    #[error("host {host} has no daemon configured")]
    NoDaemonConfigured {
        /// The host's netns name.
        host: String,
    },

    /// `start_daemon` was called while the daemon is still running.
    #[error("the daemon of host {host} is already running (pid {pid})")]
    DaemonAlreadyRunning {
        /// The host's netns name.
        host: String,
        /// The running daemon's pid.
        pid: u32,
    },

    /// Teardown finished, but some resources could not be released.
    #[error("teardown of testbed {id} was incomplete: {}", .problems.join("; "))]
    Teardown {
        /// The testbed id.
        id: String,
        /// One message per resource that could not be released.
        problems: Vec<String>,
    },
}

impl TestbedError {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;
