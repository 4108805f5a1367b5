//! `mitosisd`, the daemon of one host: it prepares seeds, serves their pages to peers, and
//! resumes children of any seed on request, each forked from this host's replica of the seed.

pub mod accept;
pub mod access;
pub mod bootstrap;
pub mod cache;
pub mod containers;
pub mod control;
pub mod errors;
pub mod fill;
pub mod health;
pub mod metrics;
pub mod multihop;
pub mod peer_server;
pub mod peer_source;
pub mod profiles;
pub mod registry;
pub mod relay;
pub mod remote;
pub mod replica;
pub mod resume;
pub mod start;
pub mod tracer;
pub mod twins;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mitosis_fork::FileCache;
use mitosis_transport::peer::PeerPool;

/// Shared state of one daemon.
pub struct Daemon {
    pub listen: SocketAddr,
    pub registry: registry::Registry,
    pub files: Arc<FileCache>,
    /// Stubs waiting to become replicas; a replica's tracer thread takes one.
    pub stubs: Arc<mitosis_fork::restore::StubPool>,
    pub vdso_hash: [u8; 32],
    pub pool: Arc<PeerPool>,
    pub cache: Arc<cache::HostCache>,
    /// Fill a replica with the rest of its seed's pages once a warm child had to fetch some
    /// ([`fill`]).
    pub background_fill: bool,
    pub counters: Counters,
    /// What `/metrics` adds to the counters (per seed, latencies).
    pub metrics: metrics::Metrics,
    /// Seeds from bundles and the containers children join; an error if this host can't.
    pub containers: Result<containers::Containers, String>,
    /// How this host's seeds' bootstrap pages are packed.
    pub bootstrap_codec: mitosis_transport::packed::Codec,
    /// Set: every page-protocol connection, served or opened, is mutual TLS (the pool has
    /// it too).
    pub tls: Option<mitosis_transport::tls::Tls>,
    /// The twins this daemon holds, for the next daemon to reap should this one crash.
    pub twins: twins::TwinLedger,
    /// Running children's fault handlers, to flatten a child before it is prepared.
    pub flatteners: multihop::Flatteners,
    /// Running children's containers, which a seed made of a child takes over.
    pub child_containers: multihop::ChildContainers,
}

impl Daemon {
    pub fn containers(&self) -> Result<&containers::Containers, String> {
        self.containers
            .as_ref()
            .map_err(|e| format!("containers are unavailable on this host: {e}"))
    }
}

/// The daemon's metrics, reported by `mitosis status`.
#[derive(Default)]
pub struct Counters {
    pub children_started: AtomicU64,
    pub children_running: AtomicU64,
    /// Page bytes this host's page server sent to peers.
    pub bytes_served: AtomicU64,
    /// Page-server connections open now.
    pub peer_connections: AtomicU64,
    /// Page-server connections closed at once, over the limits.
    pub peer_refused: AtomicU64,
    /// Page-server connections whose TLS handshake failed (no valid certificate, too slow).
    pub peer_tls_refused: AtomicU64,
    /// TCP control connections open now, closed at once over the limits, and refused at
    /// the TLS handshake.
    pub control_connections: AtomicU64,
    pub control_refused: AtomicU64,
    pub control_tls_refused: AtomicU64,
}

/// Drops replicas whose seed is gone from its host, every `period`.
pub async fn sweep_cache(daemon: Arc<Daemon>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        for entry in daemon.cache.entries() {
            let (host, id) = (entry.key.host, entry.key.id);
            let gone = if host == daemon.listen {
                daemon.registry.authorize(id, &entry.key.key).is_err()
            } else {
                match daemon.pool.attach(host, entry.key.seed_ref()).await {
                    Err(e) => e.is_seed_gone(),
                    Ok(()) => false,
                }
            };
            if gone && daemon.cache.remove(entry.key) {
                tracing::info!(seed = id, %host, "replica dropped: its seed is gone");
            }
        }
    }
}
