//! The CLI's protocol with the daemon on its own host (unix socket).

use serde::{Deserialize, Serialize};

/// Largest request frame a daemon reads: requests carry a handle, a path or a pid.
pub const MAX_REQUEST_FRAME: usize = 64 << 10;
/// Most descriptors a request may come with (a resume's stdio and listening socket).
pub const MAX_REQUEST_FDS: usize = 4;

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
    /// Start a child of the seed behind `handle`. Sent with the CLI's stdin, stdout and stderr
    /// attached; answered by `Started` then `Exited`.
    Resume { handle: String },
    /// Forget this host's replica of the seed behind `handle`; answered by `Done`.
    Evict { handle: String },
    /// Deliver a signal to the running child of this connection.
    Signal { signo: i32 },
    /// Human-readable state of the daemon.
    Status,
    /// The descriptor of the seed behind `handle` (on any host); answered by `Descriptor`.
    Inspect { handle: String },
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
    Status(String),
    /// An encoded descriptor (see `mitosis_descriptor::decode`).
    Descriptor(Vec<u8>),
    Error(String),
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
