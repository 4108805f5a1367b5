//! The control protocol: the CLI's with the daemon on its own host (unix socket), and the
//! platform's with every host's daemon (TCP with mutual TLS, `mitosisd --control-listen`).
//!
//! Over TCP no descriptor can travel, so a resume's stdio is relayed on the connection: the
//! daemon makes the child's pipes, stdin goes as [`Request::Stdin`] and
//! [`Request::StdinEof`], and stdout and stderr come back as [`Event::Stdout`] and
//! [`Event::Stderr`] between `Started` and `Exited`. The client may have at most
//! [`STDIN_WINDOW`] bytes of stdin sent and not yet written to the child's pipe: the daemon
//! grants them back with [`Event::StdinWindow`] as the child reads, so that the daemon
//! buffers a bounded amount for a child that does not read, and signals still get through.

use serde::{Deserialize, Serialize};

/// Largest request frame a daemon reads: requests carry a handle, a path, a pid, or a chunk
/// of at most [`MAX_STDIO_CHUNK`] bytes of stdin.
pub const MAX_REQUEST_FRAME: usize = 64 << 10;
/// Most descriptors a request may come with (a resume's stdio and listening socket).
pub const MAX_REQUEST_FDS: usize = 4;
/// Largest chunk of relayed stdin, stdout or stderr in one frame.
pub const MAX_STDIO_CHUNK: usize = 32 << 10;
/// Bytes of relayed stdin a client may have sent that the child's pipe has not taken yet.
pub const STDIN_WINDOW: usize = 256 << 10;

/// What the CLI asks of its local daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Capture process `pid` as a seed; answered by `Prepared`.
    Prepare { pid: i32 },
    /// Start the OCI bundle in `bundle` (a directory on the daemon's host) in a container of
    /// its own, wait until its process blocks reading stdin (warm), and prepare it as a seed;
    /// answered by `Prepared`.
    PrepareBundle {
        bundle: String,
        ready_timeout_ms: u64,
    },
    /// Stop serving a seed of this host; answered by `Done`.
    Drop { handle: String },
    /// Start a child of the seed behind `handle`. On the unix socket, sent with the CLI's
    /// stdin, stdout and stderr attached; over TCP, its stdio is relayed on the connection.
    /// Answered by `Started` then `Exited` (and, relayed, `Stdout`/`Stderr`/`StdinWindow`
    /// between them).
    Resume {
        handle: String,
        /// The child's memory limit in MiB, if below its container's (its bundle's) own; for
        /// a child without a container, refused.
        memory_mib: Option<u64>,
    },
    /// Start the OCI bundle in `bundle` afresh in a container of its own, with the caller's
    /// stdin, stdout and stderr attached (a cold start: no seed, nothing forked), its memory
    /// limited to `memory_mib` MiB if that is below the bundle's own limit; answered by
    /// `Started` (its pid; of the stats only `container_us` and `total_us`) then `Exited`.
    /// With `warm_timeout_ms`, `Started` comes once the process is warm (blocked reading
    /// stdin, as a seed before its prepare), so what it wrote before is start-up output; one
    /// not warm within that time fails the request and is killed.
    Start {
        bundle: String,
        memory_mib: Option<u64>,
        warm_timeout_ms: Option<u64>,
    },
    /// Forget this host's replica of the seed behind `handle`; answered by `Done`.
    Evict { handle: String },
    /// Build this host's replica of the seed behind `handle` now, if it has none, so its
    /// next child is a plain fork (a platform primes hosts before calls come); answered by
    /// `Done` once it is ready.
    Replicate { handle: String },
    /// Deliver a signal to the running child of this connection.
    Signal { signo: i32 },
    /// The daemon's state; answered by `Status`.
    Status,
    /// The descriptor of the seed behind `handle` (on any host); answered by `Descriptor`.
    Inspect { handle: String },
    /// Relayed stdin for the running child of this connection (at most
    /// [`MAX_STDIO_CHUNK`] bytes, within the window the daemon granted).
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The relayed stdin ends: the child reads EOF once it has read what came before.
    StdinEof,
    /// Capture the process at the other end of this connection (SO_PEERCRED) as a seed while
    /// it waits for the answer, `Prepared`: a function forking itself (`fork_prepare`, see
    /// docs/workflows.md). Unix socket only: over TCP there is no caller process.
    PrepareCaller,
    /// Build this host's replica of the seed behind `handle` (as `Replicate`) and bring every
    /// page of the seed into it that the cache has room for, in huge pages where it can: for
    /// children that each read most of the seed (a workflow's validators over one table),
    /// which then share those pages as after a local fork, each holding only what it
    /// writes, instead of each copying what it faults in. Answered by `Done` once in.
    Fill { handle: String },
    /// `Prepare` (with `pid`) or `PrepareCaller` (without) of a seed of the program named
    /// `profile`: its first children's hosts get, as their bootstrap, the pages that earlier
    /// seeds of the same profile (and owner) had their children touch, carried over to this
    /// seed's mappings. Answered by `Prepared`.
    PrepareProfiled { pid: Option<i32>, profile: String },
}

/// What the daemon answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    Prepared {
        handle: String,
        stats: PrepareStats,
    },
    Done,
    Started {
        pid: i32,
        stats: ResumeStats,
    },
    /// The child ended; `status` is shell-style (code, or 128 + signal).
    Exited {
        status: i32,
        reason: Option<String>,
        stats: FaultStats,
    },
    Status(DaemonStatus),
    /// An encoded descriptor (see `mitosis_descriptor::decode`).
    Descriptor(Vec<u8>),
    Error(DaemonError),
    /// What the child of a relayed resume wrote to its stdout.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// What it wrote to its stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The child's pipe took this many more bytes of relayed stdin: the client may send as
    /// many more.
    StdinWindow(u32),
}

/// Why the daemon refused or failed a request: a kind a client matches on, and one line for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DaemonError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DaemonError {
            kind,
            message: message.into(),
        }
    }
}

/// What kind of failure a [`DaemonError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request itself is wrong: a malformed handle, missing stdio, a bad argument.
    BadRequest,
    /// The caller may not do this (its credentials, checked with SO_PEERCRED).
    Denied,
    /// No such seed on its host: never prepared, or dropped.
    NoSuchSeed,
    /// The handle's key is not the seed's.
    WrongKey,
    /// The seed's host could not be reached, or did not answer in time.
    Unreachable,
    /// The seed or its memory went away (its host lost it, or a child's page source died).
    SeedGone,
    /// No process with that pid.
    NoSuchProcess,
    /// The process or seed cannot be forked here: refused at prepare, or unfit for this host
    /// (architecture, kernel, a bundle that differs).
    Unsupported,
    /// This host lacks what the request needs now (containers, threads, randomness).
    Unavailable,
    /// Anything else: the message says what.
    Failed,
}

/// The daemon's state, as `mitosis status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The page server's address (in handles).
    pub listen: String,
    pub children_running: u64,
    pub children_started: u64,
    /// Page bytes this host's page server sent to peers.
    pub bytes_served: u64,
    /// Page-server connections open now, and those refused over the limits.
    pub peer_connections: u64,
    pub peer_refused: u64,
    /// Page-server connections refused at the TLS handshake (no valid certificate).
    pub peer_tls_refused: u64,
    /// TCP control connections open now, those refused over the limits, and those refused
    /// at the TLS handshake.
    pub control_connections: u64,
    pub control_refused: u64,
    pub control_tls_refused: u64,
    /// The host's CPUs this daemon may use, and its memory available (MemAvailable), for
    /// placing work: a platform skips a host without room for a function's memory.
    pub cpus: u64,
    pub memory_available_mib: u64,
    pub seeds: Vec<SeedStatus>,
    pub replicas: Vec<ReplicaStatus>,
    /// Idle pooled connections per peer.
    pub pool: Vec<(String, u64)>,
    /// The container lines (cgroup versions, pools), or why containers are unavailable.
    pub containers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedStatus {
    pub id: u64,
    pub pid: i32,
    pub vmas: u64,
    pub pages: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub seed: u64,
    pub host: String,
    pub pid: i32,
    pub pages: u64,
    pub children: u64,
}

impl std::fmt::Display for DaemonStatus {
    /// One fact per line, `key value...`, as scripts and tests read them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "listen {}", self.listen)?;
        writeln!(f, "seeds {}", self.seeds.len())?;
        writeln!(f, "children running {}", self.children_running)?;
        writeln!(f, "children started {}", self.children_started)?;
        writeln!(f, "bytes served {}", self.bytes_served)?;
        writeln!(f, "peer connections {}", self.peer_connections)?;
        writeln!(f, "peer connections refused {}", self.peer_refused)?;
        writeln!(f, "peer tls handshakes refused {}", self.peer_tls_refused)?;
        writeln!(f, "control connections {}", self.control_connections)?;
        writeln!(f, "control connections refused {}", self.control_refused)?;
        writeln!(
            f,
            "control tls handshakes refused {}",
            self.control_tls_refused
        )?;
        writeln!(f, "cpus {}", self.cpus)?;
        writeln!(f, "memory available {} MiB", self.memory_available_mib)?;
        for s in &self.seeds {
            writeln!(
                f,
                "seed {} pid {} vmas {} pages {}",
                s.id, s.pid, s.vmas, s.pages
            )?;
        }
        for r in &self.replicas {
            writeln!(
                f,
                "replica {}@{} pid {} pages {} children {}",
                r.seed, r.host, r.pid, r.pages, r.children
            )?;
        }
        for (peer, idle) in &self.pool {
            writeln!(f, "pool {peer} idle {idle}")?;
        }
        for line in &self.containers {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrepareStats {
    /// A bundle's seed: starting its container until the process waited on stdin.
    pub warm_us: u64,
    pub stopped_us: u64,
    pub total_us: u64,
    pub vmas: u32,
    pub seed_pages: u64,
    pub descriptor_bytes: u64,
    /// Pages carried over from earlier seeds of its profile (`PrepareProfiled`).
    pub carried_pages: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResumeStats {
    /// True if this host already had the seed's replica (no descriptor fetch, no build).
    pub cached: bool,
    /// Checking the seed and key with its host over a pooled connection.
    pub attach_us: u64,
    pub descriptor_us: u64,
    /// Decoding the descriptor and planning the layout (file checks included).
    pub plan_us: u64,
    /// Making the replica: descriptor to a stopped process holding the working set.
    pub build_us: u64,
    pub spawn_us: u64,
    pub restore_us: u64,
    pub eager_pages: u64,
    pub working_set_pages: u64,
    pub working_set_us: u64,
    /// Of `working_set_us`: installing the bootstrap pages, and waiting for them to arrive.
    pub install_us: u64,
    pub pages_wait_us: u64,
    /// Forking the child from the replica and handing it its stdio.
    pub fork_us: u64,
    /// Getting the child's container (0 for a seed that runs in none).
    pub container_us: u64,
    /// The container came ready-made from the pool.
    pub container_pooled: bool,
    /// Of `fork_us`, joining the container (its namespaces and cgroup).
    pub join_us: u64,
    pub total_us: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultStats {
    pub faults: u64,
    pub zero_faults: u64,
    pub fetches: u64,
    pub pages_fetched: u64,
    pub fetch_us: u64,
}
