//! `mitosisd`, the daemon of one host: it prepares seeds, serves their pages to peers, and
//! resumes children of any seed on request.

pub mod control;
pub mod peer_server;
pub mod peer_source;
pub mod registry;
pub mod resume;
pub mod tracer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use mitosis_fork::FileCache;

/// Shared state of one daemon.
pub struct Daemon {
    pub listen: SocketAddr,
    pub registry: registry::Registry,
    pub tracer: tracer::Tracer,
    pub files: Arc<FileCache>,
    pub stub: PathBuf,
    pub vdso_hash: [u8; 32],
    pub children_started: AtomicU64,
    pub children_running: AtomicU64,
}
