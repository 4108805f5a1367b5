//! Making a seed's replica on this host, and forking children from it.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mitosis_container::{Bundle, Container};
use mitosis_descriptor::TmpfsContent;
use mitosis_fork::PageSource;
use mitosis_fork::fault;
use mitosis_fork::pending::PendingMap;
use mitosis_fork::pending::Run;
use mitosis_fork::replica_pages::{FromReplica, Prefetch, ReplicaPages, chunk_runs, lacking};
use mitosis_fork::restore::replica::{Join, JoinSpec};
use mitosis_fork::restore::{self, StreamedPages, replica};
use mitosis_sys::uffd::Userfaultfd;
use mitosis_transport::control::ResumeStats;
use mitosis_transport::packed;

use crate::Daemon;
use crate::bootstrap::Incoming;
use crate::cache::SeedKey;
use crate::errors::{BuildFailed, ForkFailed};
use crate::peer_source::Source;
use crate::tracer::Tracer;

/// A replica and what it takes to fork from it.
pub struct Entry {
    pub key: SeedKey,
    pub pid: i32,
    /// The process and the fork events' receiver: lent to the tracer thread during a fork.
    /// Forks of one replica go one at a time (each is a ptrace conversation with it).
    process: tokio::sync::Mutex<Option<(replica::Replica, Receiver<Userfaultfd>)>>,
    pub pages: Arc<ReplicaPages<Source>>,
    /// The seed's pages of its shared anonymous mappings, which each child maps afresh.
    shared_pending: PendingMap,
    shared_ranges: Vec<(u64, u64)>,
    pub last_used: Mutex<Instant>,
    pub children: AtomicU64,
    /// Set once a background fill of the rest of the seed's pages has started ([`crate::fill`]).
    pub filling: std::sync::atomic::AtomicBool,
    watcher: tokio::task::JoinHandle<()>,
    /// The thread that traces the replica: its build, finish and every fork run there.
    tracer: Tracer,
    /// The bundle of a containerized seed: each child joins a container of it.
    pub bundle: Option<Arc<Bundle>>,
    /// What the seed's container held in its tmpfs mounts: each child's starts with it.
    tmpfs: Arc<Vec<TmpfsContent>>,
}

impl Entry {
    /// Pages this replica holds that came from the seed.
    pub fn pages(&self) -> u64 {
        self.pages.counters().pages_fetched
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some((replica, _)) = self.process.get_mut().take() {
            replica.kill();
        }
    }
}

/// Builds the replica of the seed `source` serves: the descriptor and the bootstrap pages come
/// in one exchange, and the replica is built while the pages still travel.
pub async fn build(
    daemon: &Daemon,
    key: SeedKey,
    source: Source,
    stats: &mut ResumeStats,
) -> Result<Entry, BuildFailed> {
    let t0 = Instant::now();
    let mut incoming = match &source {
        Source::Local(local) => Incoming::from_local(local.seed.clone()),
        Source::Peer(peer) => {
            Incoming::from_peer(daemon.pool.bootstrap(peer.addr, peer.seed).await?)
        }
    };
    stats.descriptor_us = t0.elapsed().as_micros() as u64;
    // Raw pages wait in the connection for the replica to read them itself as it is made;
    // packed ones keep coming while it is made, and go in after.
    let stream = incoming.take_stream();
    let streamed = match &stream {
        Some(leased) => Some(
            leased
                .blocking_fd()
                .map_err(|e| BuildFailed::Pages(format!("lending the page stream: {e}")))?,
        ),
        None => None,
    };
    let streamed = streamed.map(|fd| (fd, incoming.runs.clone()));
    let (made, built) = make(daemon, &incoming.descriptor, streamed).await?;
    stats.plan_us = made.plan_us;
    stats.spawn_us = built.spawn_us;
    stats.restore_us = built.restore_us;
    let pid = built.replica.pid();
    // The bootstrap holds the pages the first child needs at once, then the working set.
    let eager_pages: u64 = made
        .overlay
        .iter()
        .chain(&made.eager)
        .map(|r| r.pages)
        .sum();
    let bootstrap_pages: u64 = incoming.runs.iter().map(|r| r.1 as u64).sum();
    let pages = ReplicaPages::new(
        pid,
        built.uffd,
        built.pending,
        source.clone(),
        made.shared_ranges.clone(),
        made.lazy_ranges.clone(),
        // No working set recorded yet: its children's faults are all there is to go by. A
        // seed of a profile with nothing carried over learns what they touch page by page
        // for its later seeds; one whose bootstrap holds more (what earlier seeds learned, a
        // guess: another run of a program touches pages of its own; or what its own
        // children recorded since) fetches large blocks still.
        match (bootstrap_pages <= eager_pages, incoming.learn) {
            (true, true) => Prefetch::Learning {
                block: fault::LEARNING_PREFETCH_PAGES,
                budget: fault::LEARNING_BUDGET_PAGES,
            },
            (true, false) | (false, true) => Prefetch::Blocks(fault::LEARNING_PREFETCH_PAGES),
            (false, false) => Prefetch::Blocks(fault::PREFETCH_PAGES),
        },
    )
    .map_err(|e| BuildFailed::Pages(format!("watching the replica: {e}")))?;
    // The gaps between the seed's pages get zero pages off the build's path: the children
    // forked after find them mapped (`ReplicaPages::zero_the_gaps`).
    tokio::task::spawn_blocking({
        let pages = pages.clone();
        move || {
            let zeroed = pages.zero_the_gaps();
            tracing::debug!(pid, zeroed, "zero pages in the gaps");
        }
    });
    let (forks_tx, forks) = std::sync::mpsc::channel();
    let watcher = tokio::spawn({
        let pages = pages.clone();
        async move {
            if let Err(e) = pages.watch(forks_tx).await {
                tracing::warn!(pid, "replica watcher stopped: {e}");
            }
        }
    });
    // Each chunk goes in as it lands; then what the bulk lacked of the pages the first child
    // needs at once.
    let ws = Instant::now();
    let pages_in = async {
        let mut installed = 0;
        let (mut wait, mut install) = (Duration::ZERO, Duration::ZERO);
        let chunks = match stream {
            Some(leased) => {
                installed = pages.streamed_in(&incoming.runs).await;
                leased.give_back();
                Vec::new()
            }
            None => chunk_runs(&incoming.runs, packed::CHUNK_PAGES as u32),
        };
        for runs in chunks {
            let asked = Instant::now();
            let bulk = incoming.next(runs).await?;
            let landed = Instant::now();
            installed += pages
                .install_bulk(&bulk, &made.overlay)
                .await
                .map_err(|e| e.to_string())?;
            wait += landed - asked;
            install += landed.elapsed();
        }
        let lacking = lacking(&made.overlay, &incoming.runs);
        if !lacking.is_empty() {
            let data = source
                .clone()
                .read(lacking.clone(), None)
                .await
                .map_err(|e| format!("fetching the seed's file pages: {e}"))?;
            pages
                .write_overlay(&lacking, &data)
                .map_err(|e| e.to_string())?;
        }
        let eager: Vec<(u64, u32)> = made
            .eager
            .iter()
            .map(|r| (r.seed, r.pages as u32))
            .collect();
        pages
            .fill(&eager)
            .await
            .map_err(|e| format!("fetching the stack and TLS pages: {e}"))?;
        Ok::<_, String>((installed, wait, install))
    };
    let mut process = built.replica;
    let finished = match pages_in.await {
        Ok((installed, wait, install)) => {
            stats.working_set_pages = installed;
            stats.pages_wait_us = wait.as_micros() as u64;
            stats.install_us = install.as_micros() as u64;
            let (p, finished) = made
                .tracer
                .run(move || {
                    let finished = process.finish();
                    (process, finished)
                })
                .await;
            process = p;
            finished.map_err(BuildFailed::from)
        }
        Err(e) => Err(BuildFailed::Pages(e)),
    };
    if let Err(e) = finished {
        watcher.abort();
        process.kill();
        return Err(e);
    }
    stats.eager_pages = eager_pages;
    stats.working_set_pages = stats.working_set_pages.saturating_sub(stats.eager_pages);
    stats.working_set_us = ws.elapsed().as_micros() as u64;
    stats.build_us = t0.elapsed().as_micros() as u64;
    Ok(Entry {
        key,
        pid,
        process: tokio::sync::Mutex::new(Some((process, forks))),
        pages,
        shared_pending: made.shared_pending,
        shared_ranges: made.shared_ranges,
        last_used: Mutex::new(Instant::now()),
        children: AtomicU64::new(0),
        filling: Default::default(),
        watcher,
        bundle: made.bundle,
        tmpfs: made.tmpfs,
        tracer: made.tracer,
    })
}

/// A replica process built from a descriptor, with what its entry keeps of the plan.
struct Made {
    plan_us: u64,
    bundle: Option<Arc<Bundle>>,
    tmpfs: Arc<Vec<TmpfsContent>>,
    shared_pending: PendingMap,
    shared_ranges: Vec<(u64, u64)>,
    overlay: Vec<Run>,
    eager: Vec<Run>,
    /// The ranges registered with userfaultfd.
    lazy_ranges: Vec<(u64, u64)>,
    tracer: Tracer,
}

/// Plans the replica of the seed `encoded` describes and builds it on a tracer thread of its
/// own.
/// `streamed`: the socket the bootstrap pages wait in, raw, and their runs.
async fn make(
    daemon: &Daemon,
    encoded: &[u8],
    streamed: Option<(RawFd, Vec<(u64, u32)>)>,
) -> Result<(Made, replica::Built), BuildFailed> {
    let started = Instant::now();
    let desc = mitosis_descriptor::decode(encoded)?;
    let bundle = match &desc.container {
        Some(r) => Some(
            daemon
                .containers()
                .and_then(|c| c.bundle_of(r))
                .map_err(BuildFailed::Containers)?,
        ),
        None => None,
    };
    let binds = bundle.as_ref().map(|b| b.binds()).unwrap_or_default();
    let tmpfs = Arc::new(
        desc.container
            .as_ref()
            .map(|c| c.tmpfs.clone())
            .unwrap_or_default(),
    );
    let root = bundle.as_ref().map(|b| restore::ContainerRoot {
        rootfs: &b.rootfs,
        binds: &binds,
    });
    let plan = restore::plan(&desc, &daemon.files, daemon.vdso_hash, root)?;
    let plan_us = started.elapsed().as_micros() as u64;
    let join = bundle.as_ref().map(|b| JoinSpec {
        namespaces: b.namespaces,
        cwd: desc.cwd.clone().unwrap_or_else(|| b.cwd.clone()),
    });
    let shared_ranges: Vec<(u64, u64)> = plan
        .maps
        .iter()
        .filter(|m| m.fresh_in_each_child())
        .map(|m| (m.start, m.len))
        .collect();
    let mut shared_pending = PendingMap::new();
    let mut all = plan.pending.clone();
    for &(start, len) in &shared_ranges {
        shared_pending.replace_with(&all.split_off(start, start + len), &[]);
    }
    let (overlay, eager) = (plan.overlay.clone(), plan.eager.clone());
    let lazy_ranges = plan.lazy_ranges.clone();
    let stubs = daemon.stubs.clone();
    let tracer =
        Tracer::spawn(&format!("replica-{}", desc.seed_id)).map_err(BuildFailed::Tracer)?;
    let built = tracer
        .run(move || {
            let pages = streamed
                .as_ref()
                .map(|(fd, runs)| StreamedPages { fd: *fd, runs });
            replica::build(plan, &stubs, join, pages)
        })
        .await?;
    Ok((
        Made {
            plan_us,
            bundle,
            tmpfs,
            shared_pending,
            shared_ranges,
            overlay,
            eager,
            lazy_ranges,
            tracer,
        },
        built,
    ))
}

/// A child forked from a replica, with the fault path it needs.
pub struct Forked {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub uffd: Userfaultfd,
    pub pending: PendingMap,
    pub source: FromReplica<Source>,
    /// The container the child joined; handed back to the pool when it exits.
    pub container: Option<Container>,
}

/// Forks a child of `entry` with `stdio` (and `listener` as its fd 3), its container's
/// memory limit lowered to `memory_mib` if asked.
pub async fn fork(
    daemon: &Daemon,
    entry: &Arc<Entry>,
    stdio: [OwnedFd; 3],
    listener: Option<OwnedFd>,
    memory_mib: Option<u64>,
    stats: &mut ResumeStats,
) -> Result<Forked, ForkFailed> {
    // `_starting` keeps the pool's worker from contending with the fork below.
    let (container, _starting) = match &entry.bundle {
        Some(bundle) => {
            let t0 = Instant::now();
            let pool = &daemon.containers().map_err(ForkFailed::Containers)?.pool;
            // Usually ready-made; made here (milliseconds) when the pool ran dry.
            let taken = tokio::task::block_in_place(|| pool.take(bundle))
                .map_err(|e| ForkFailed::Container(e.to_string()))?;
            // Before the child is in it: a limit it is over would kill it at once.
            if let Some(mib) = memory_mib
                && let Err(e) = taken.container.cgroup().lower_memory_limit(mib << 20)
            {
                pool.release(taken.container);
                return Err(ForkFailed::Container(e.to_string()));
            }
            // The seed's tmpfs content, in the container's own view of its mounts.
            if !entry.tmpfs.is_empty() {
                let root = PathBuf::from(format!("/proc/{}/root", taken.container.init_pid()));
                let tmpfs = entry.tmpfs.clone();
                let written = tokio::task::block_in_place(|| {
                    mitosis_container::tmpfs::restore(&root, &tmpfs)
                });
                if let Err(e) = written {
                    pool.release(taken.container);
                    let why = format!("giving the child its seed's tmpfs content: {e}");
                    return Err(ForkFailed::Container(why));
                }
            }
            stats.container_us = t0.elapsed().as_micros() as u64;
            stats.container_pooled = taken.pooled;
            (Some(Arc::new(taken.container)), Some(taken.starting))
        }
        None if memory_mib.is_some() => return Err(ForkFailed::NoContainerToLimit),
        None => (None, None),
    };
    let join = container.as_ref().map(|c| {
        let c = c.clone();
        Join {
            init_pid: c.init_pid(),
            before_run: Box::new(move |pid| c.cgroup().add(pid).map_err(std::io::Error::other)),
        }
    });
    // Taken before the fork: fills that end meanwhile leave the child pages it has anyway.
    let mut pending = entry.pages.still_missing();
    pending.replace_with(&entry.shared_pending, &entry.shared_ranges);
    let mut lent = entry.process.lock().await;
    let process = lent.take().ok_or(ForkFailed::NoReplica)?;
    let (process, forked) = entry
        .tracer
        .run(move || {
            let (mut replica, forks) = process;
            let forked = replica.fork(stdio, listener, &forks, join);
            ((replica, forks), forked)
        })
        .await;
    *lent = Some(process);
    drop(lent);
    // The fork has consumed the join, and with it the other reference.
    let container = container.map(|c| Arc::try_unwrap(c).expect("the join is gone"));
    let forked = match forked {
        Ok(f) => f,
        Err(e) => {
            if let (Some(c), Ok(containers)) = (container, daemon.containers()) {
                containers.pool.release(c);
            }
            return Err(e.into());
        }
    };
    stats.fork_us = forked.fork_us;
    stats.join_us = forked.join_us;
    Ok(Forked {
        pid: forked.pid,
        pidfd: forked.pidfd,
        uffd: forked.uffd,
        pending,
        source: FromReplica(entry.pages.clone()),
        container,
    })
}
