//! The control protocol: the local CLI's requests on the unix socket, and (see `remote`) a
//! cluster operator's over TCP with mutual TLS.
//!
//! The socket is root's alone (0600 in a 0700 directory, see `main`), and whoever connects
//! is checked anyway (SO_PEERCRED), in case its mode was widened: root may ask anything; any
//! other user may ask the status, prepare a process it could ptrace itself, and drop,
//! inspect or evict seeds of this host it prepared. A TCP peer with a certificate of the
//! cluster's CA is a cluster operator, with root's rights.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mitosis_descriptor::Handle;
use mitosis_sys::fdpass;
use mitosis_transport::control::{
    DaemonStatus, Event, MAX_REQUEST_FDS, MAX_REQUEST_FRAME, PrepareStats, ReplicaStatus, Request,
    SeedStatus,
};
use mitosis_transport::frame;
use mitosis_transport::peer::RemoteError;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::Daemon;
use crate::accept::Backoff;
use crate::access::{self, Caller};
use crate::cache::SeedKey;
use crate::containers::SeedContainer;
use crate::errors::{Kind, PrepareFailed, RequestRefused, SeedOpFailed};
use crate::registry::Seed;
use mitosis_descriptor::ContainerRef;

/// How long after connecting a client may take to send its request.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let mut backoff = Backoff::new("control connections");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff.accepted();
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, daemon).await {
                        tracing::debug!("control connection ended: {e}");
                    }
                });
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

async fn connection(stream: UnixStream, daemon: Arc<Daemon>) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let caller = Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, recv_first(&stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))?;
    let Some((request, fds)) = first? else {
        return Ok(());
    };
    let (reader, writer) = stream.into_split();
    let stdio = crate::resume::Stdio::Passed(fds);
    answer(daemon, &caller, request, stdio, reader, writer).await
}

/// Answers `caller`'s first request on a connection, whichever the transport.
pub async fn answer<R, W>(
    daemon: Arc<Daemon>,
    caller: &Caller,
    request: Request,
    stdio: crate::resume::Stdio,
    reader: R,
    mut writer: W,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    use crate::resume::send_event;
    if let Err(why) = authorize(&daemon, caller, &request) {
        tracing::info!(uid = caller.uid, pid = ?caller.pid, "{why}");
        return send_event(&mut writer, &RequestRefused::Denied(why).to_event()).await;
    }
    let event = match request {
        Request::Prepare { pid } => prepare_checked(&daemon, caller, Some(pid), None).await,
        Request::PrepareCaller => prepare_checked(&daemon, caller, None, None).await,
        Request::PrepareProfiled { pid, profile } => match crate::profiles::check_name(&profile) {
            Ok(()) => prepare_checked(&daemon, caller, pid, Some(&profile)).await,
            Err(why) => RequestRefused::BadRequest(why).to_event(),
        },
        Request::PrepareBundle {
            bundle,
            ready_timeout_ms,
        } => prepare_bundle(&daemon, &bundle, ready_timeout_ms)
            .await
            .unwrap_or_else(|e| e.to_event()),
        Request::Drop { handle } => drop_seed(&daemon, &handle)
            .await
            .unwrap_or_else(|e| e.to_event()),
        Request::Status => Event::Status(status(&daemon)),
        Request::Evict { handle } => evict(&daemon, &handle).unwrap_or_else(|e| e.to_event()),
        Request::Replicate { handle } => replicate(&daemon, &handle, false)
            .await
            .unwrap_or_else(|e| e.to_event()),
        Request::Fill { handle } => replicate(&daemon, &handle, true)
            .await
            .unwrap_or_else(|e| e.to_event()),
        Request::Inspect { handle } => inspect(&daemon, &handle)
            .await
            .unwrap_or_else(|e| e.to_event()),
        Request::Resume { handle, memory_mib } => {
            return crate::resume::run(daemon, reader, writer, handle, memory_mib, stdio).await;
        }
        Request::Start {
            bundle,
            memory_mib,
            warm_timeout_ms,
        } => {
            let warm = warm_timeout_ms.map(Duration::from_millis);
            return crate::start::run(daemon, reader, writer, bundle, memory_mib, warm, stdio)
                .await;
        }
        Request::Signal { .. } | Request::Stdin(_) | Request::StdinEof => {
            RequestRefused::BadRequest("no child runs on this connection".into()).to_event()
        }
    };
    send_event(&mut writer, &event).await
}

/// Why `caller` may not make `request`, if it may not: one line for the user.
fn authorize(daemon: &Daemon, caller: &Caller, request: &Request) -> Result<(), String> {
    if caller.is_root() {
        return Ok(());
    }
    let uid = caller.uid;
    let root_only = |what: &str, why: &str| {
        Err(format!(
            "refused: only root may {what} ({why}; caller uid {uid})"
        ))
    };
    match request {
        Request::Status | Request::Signal { .. } | Request::Stdin(_) | Request::StdinEof => Ok(()),
        Request::Prepare { pid } => access::may_trace(caller, *pid)
            .map_err(|why| format!("refused: uid {uid} may not prepare pid {pid}: {why} (only processes it could ptrace)")),
        // A process may always trace itself; may_trace still checks it is dumpable.
        Request::PrepareCaller | Request::PrepareProfiled { pid: None, .. } => match caller.pid {
            Some(pid) => access::may_trace(caller, pid)
                .map_err(|why| format!("refused: uid {uid} may not prepare itself: {why}")),
            None => Err("refused: the caller's pid is unknown".into()),
        },
        Request::PrepareProfiled { pid: Some(pid), .. } => access::may_trace(caller, *pid)
            .map_err(|why| format!("refused: uid {uid} may not prepare pid {pid}: {why} (only processes it could ptrace)")),
        Request::PrepareBundle { .. } => root_only("prepare a bundle", "its seed runs as root in a container"),
        Request::Start { .. } => root_only("start a bundle", "it runs as root in a container"),
        // A child has exactly its seed's credentials, which the caller could trace when it
        // prepared it: its own seeds of this host, then.
        Request::Resume { handle, .. } => own_seed(daemon, uid, "resume", handle),
        Request::Drop { handle } => own_seed(daemon, uid, "drop", handle),
        Request::Inspect { handle } => own_seed(daemon, uid, "inspect", handle),
        Request::Evict { handle } => own_seed(daemon, uid, "evict", handle),
        Request::Replicate { handle } => own_seed(daemon, uid, "replicate", handle),
        Request::Fill { handle } => own_seed(daemon, uid, "fill a replica of", handle),
    }
}

/// Ok if `handle` names a seed of this host that `uid` prepared (or none: the request itself
/// then says there is no such seed).
fn own_seed(daemon: &Daemon, uid: u32, verb: &str, handle: &str) -> Result<(), String> {
    let h: Handle = handle
        .parse()
        .map_err(|e: mitosis_descriptor::HandleError| e.to_string())?;
    if h.host != daemon.listen {
        return Err(format!(
            "refused: only root may {verb} seeds of other hosts ({}; caller uid {uid})",
            h.host
        ));
    }
    match daemon.registry.get(h.seed_id) {
        Some(seed) if seed.owner != uid => Err(format!(
            "refused: uid {uid} may not {verb} seed {}: another user prepared it",
            h.seed_id
        )),
        _ => Ok(()),
    }
}

/// A process prepared for a user other than root must still be one it could ptrace once
/// captured (it could have run a setuid program in between): if not, the seed goes.
async fn recheck(
    daemon: &Daemon,
    caller: &Caller,
    pid: i32,
    event: Event,
) -> Result<Event, PrepareFailed> {
    let Event::Prepared { handle, .. } = &event else {
        return Ok(event);
    };
    let Err(why) = access::may_trace(caller, pid) else {
        return Ok(event);
    };
    if let Ok(h) = handle.parse::<Handle>()
        && let Some(seed) = daemon.registry.remove(h.seed_id)
    {
        release(daemon, &seed).await;
    }
    Err(PrepareFailed::Changed {
        uid: caller.uid,
        pid,
        why,
    })
}

/// Reads the first request, with the descriptors sent along with it. A request larger than
/// [`MAX_REQUEST_FRAME`] or with more than [`MAX_REQUEST_FDS`] descriptors is refused.
async fn recv_first(stream: &UnixStream) -> io::Result<Option<(Request, Vec<OwnedFd>)>> {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(req) =
            frame::try_decode_limited(&buf, MAX_REQUEST_FRAME).map_err(io::Error::other)?
        {
            return Ok(Some((req, fds)));
        }
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            fdpass::recv(stream.as_raw_fd(), &mut chunk)
        }) {
            Ok((0, _)) => return Ok(None),
            Ok((n, mut got)) => {
                buf.extend_from_slice(&chunk[..n]);
                fds.append(&mut got);
                if fds.len() > MAX_REQUEST_FDS {
                    return Err(io::Error::other(format!(
                        "a request with more than {MAX_REQUEST_FDS} descriptors"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A seed from a bundle: its container, and how long it took to get warm.
struct FromBundle {
    container: SeedContainer,
    bundle: ContainerRef,
    warm_us: u64,
}

async fn prepare_bundle(
    daemon: &Arc<Daemon>,
    dir: &str,
    ready_timeout_ms: u64,
) -> Result<Event, PrepareFailed> {
    let started = std::time::Instant::now();
    let containers = daemon.containers().map_err(PrepareFailed::Containers)?;
    let bundle = containers
        .bundle(std::path::Path::new(dir), None)
        .map_err(PrepareFailed::Containers)?;
    let id = daemon.registry.next_id();
    let timeout = std::time::Duration::from_millis(ready_timeout_ms);
    let container = containers
        .start_seed(&bundle, id, timeout)
        .await
        .map_err(|why| PrepareFailed::Start {
            dir: dir.to_string(),
            why,
        })?;
    let pid = container.pid;
    let from = FromBundle {
        container,
        bundle: ContainerRef {
            bundle: bundle.dir.to_string_lossy().into_owned(),
            digest: bundle.digest,
            tmpfs: Vec::new(),
        },
        warm_us: started.elapsed().as_micros() as u64,
    };
    prepare_with_id(daemon, pid, id, Some(from), 0, None).await
}

/// Prepares `pid` (or, with none, the caller) for `caller`, then checks the caller may still
/// have it (see `recheck`).
async fn prepare_checked(
    daemon: &Arc<Daemon>,
    caller: &Caller,
    pid: Option<i32>,
    profile: Option<&str>,
) -> Event {
    let Some(pid) = pid.or(caller.pid) else {
        return RequestRefused::BadRequest(
            "prepare the caller: only a local process on the unix socket can be".into(),
        )
        .to_event();
    };
    let id = daemon.registry.next_id();
    let prepared = match prepare_with_id(daemon, pid, id, None, caller.uid, profile).await {
        Ok(event) => recheck(daemon, caller, pid, event).await,
        Err(e) => Err(e),
    };
    prepared.unwrap_or_else(|e| e.to_event())
}

/// Prepares `pid` as seed `id` for the user `owner`, a seed of `profile` if named.
async fn prepare_with_id(
    daemon: &Arc<Daemon>,
    pid: i32,
    id: u64,
    from: Option<FromBundle>,
    owner: u32,
    profile: Option<&str>,
) -> Result<Event, PrepareFailed> {
    let started = std::time::Instant::now();
    // A child of a seed is flattened first; any other process is checked beside the capture,
    // once it runs again (see `multihop`).
    let lazy_check = match from {
        None => crate::multihop::before_prepare(&daemon.flatteners, pid).await?,
        Some(_) => None,
    };
    let (released, seed_runs) = tokio::sync::oneshot::channel::<()>();
    // A child in a container: its seed takes the container over (the twin is made in it)
    // and its children join containers of the same bundle.
    let in_container = match from {
        None => daemon.child_containers.bundle_of(pid),
        Some(_) => None,
    };
    let files = daemon.files.clone();
    let capture = async {
        match crate::tracer::Tracer::spawn(&format!("seed-{id}")) {
            Ok(tracer) => tracer
                .run(move || {
                    mitosis_fork::prepare(pid, id, &files, move || {
                        let _ = released.send(());
                    })
                })
                .await
                .map(|prepared| (prepared, tracer))
                .map_err(PrepareFailed::Capture),
            Err(e) => Err(PrepareFailed::Tracer(e)),
        }
    };
    let check = async {
        match lazy_check {
            // Not released: the capture failed, and says why.
            Some(check) if seed_runs.await.is_ok() => check.run().await,
            _ => Ok(()),
        }
    };
    let (captured, verdict) = tokio::join!(capture, check);
    let (mut prepared, tracer) = match captured {
        Ok(p) => p,
        Err(e) => {
            if let Some(from) = from {
                destroy_seed_container(from.container).await;
            }
            return Err(e);
        }
    };
    if let Err(e) = verdict {
        let (twin, insn) = (prepared.twin, prepared.syscall_insn);
        tracer.run(move || twin.release(insn)).await;
        return Err(e);
    }
    // Its container's bundle (loaded once), and what the container holds in its own tmpfs
    // mounts, for its children's containers.
    let container_ref = from
        .as_ref()
        .map(|f| f.bundle.clone())
        .or_else(|| in_container.clone());
    let in_bundle = match &container_ref {
        None => Ok(None),
        Some(r) => daemon
            .containers()
            .and_then(|c| c.bundle_of(r))
            .map(Some)
            .map_err(PrepareFailed::Containers),
    };
    let tmpfs = match in_bundle {
        Ok(None) => Ok((None, Vec::new())),
        Ok(Some(bundle)) => container_tmpfs(pid, &bundle)
            .await
            .map(|t| (Some(bundle), t)),
        Err(e) => Err(e),
    };
    let (in_bundle, tmpfs) = match tmpfs {
        Ok(t) => t,
        Err(e) => {
            let (twin, insn) = (prepared.twin, prepared.syscall_insn);
            tracer.run(move || twin.release(insn)).await;
            if let Some(from) = from {
                destroy_seed_container(from.container).await;
            }
            return Err(e);
        }
    };
    let adopted = match &in_container {
        Some(bundle) => match daemon.child_containers.adopt(pid) {
            Some(container) => Some((SeedContainer::adopt(container, pid), bundle.clone())),
            None => {
                // It exited during the capture, and its container (with the twin) went.
                let (twin, insn) = (prepared.twin, prepared.syscall_insn);
                tracer.run(move || twin.release(insn)).await;
                return Err(PrepareFailed::Containers(format!(
                    "pid {pid} exited while it was prepared"
                )));
            }
        },
        None => None,
    };
    let mut key = [0u8; mitosis_descriptor::KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| PrepareFailed::Random(e.to_string()))?;
    prepared.descriptor.container = from
        .as_ref()
        .map(|f| f.bundle.clone())
        .or_else(|| adopted.as_ref().map(|(_, bundle)| bundle.clone()))
        .map(|r| ContainerRef { tmpfs, ..r });
    if let Some(bundle) = &in_bundle {
        crate::containers::drop_files_children_cannot_reach(&mut prepared.descriptor, bundle);
    }
    let d = &prepared.descriptor;
    tracing::debug!(
        pid,
        threads = d.threads.len(),
        sigactions = ?d.process.sigactions,
        objects = ?d.objects,
        dropped = ?d.dropped,
        "captured"
    );
    let encoded = mitosis_descriptor::encode(&prepared.descriptor);
    let mut stats = PrepareStats {
        warm_us: from.as_ref().map_or(0, |f| f.warm_us),
        stopped_us: prepared.stopped_us,
        total_us: started.elapsed().as_micros() as u64,
        vmas: prepared.descriptor.vmas.len() as u32,
        seed_pages: prepared
            .descriptor
            .vmas
            .iter()
            .map(|v| v.seed_pages.len())
            .sum(),
        descriptor_bytes: encoded.len() as u64,
        carried_pages: 0,
    };
    let mut seed = Seed::new(pid, key, owner, prepared, encoded, tracer);
    if let Some(name) = profile {
        let learned = daemon.registry.learned(owner, name);
        let (profiled, carried) = seed.with_profile(name, learned.as_ref());
        tracing::info!(
            pid,
            profile = name,
            learned = learned.as_ref().map_or(0, |l| l.len()),
            carried,
            "profile carried over"
        );
        seed = profiled;
        stats.carried_pages = carried as u64;
        stats.total_us = started.elapsed().as_micros() as u64;
    }
    *seed.container.lock().expect("container lock") = from
        .map(|f| f.container)
        .or(adopted.map(|(container, _)| container));
    let seed = daemon.registry.insert(seed);
    if !seed.carried_pages().is_empty() {
        // Its first children's hosts will want the carried pages: pack them now.
        let wire = crate::bootstrap::Wire::of(daemon.bootstrap_codec, daemon.tls.is_some());
        crate::bootstrap::pack_ahead(seed.clone(), wire);
    }
    let twin = seed
        .twin
        .lock()
        .expect("twin lock")
        .as_ref()
        .map(|t| t.pid());
    match twin.map(|twin| crate::twins::TwinRecord::of(pid, twin)) {
        Some(Ok(record)) => daemon.twins.add(record),
        Some(Err(e)) => tracing::warn!(pid, "recording the twin: {e}"),
        None => {}
    }
    let handle = Handle {
        host: daemon.listen,
        seed_id: seed.id,
        key,
    };
    tracing::info!(pid, seed = seed.id, us = stats.total_us, "prepared");
    Ok(Event::Prepared {
        handle: handle.to_string(),
        stats,
    })
}

/// A handle of a seed of this host.
fn local_handle(daemon: &Daemon, handle: &str) -> Result<Handle, SeedOpFailed> {
    let handle: Handle = handle.parse()?;
    if handle.host != daemon.listen {
        return Err(SeedOpFailed::Elsewhere {
            id: handle.seed_id,
            host: handle.host.to_string(),
            here: daemon.listen.to_string(),
        });
    }
    Ok(handle)
}

async fn drop_seed(daemon: &Arc<Daemon>, handle: &str) -> Result<Event, SeedOpFailed> {
    let handle = local_handle(daemon, handle)?;
    daemon.registry.authorize(handle.seed_id, &handle.key)?;
    let seed = daemon
        .registry
        .remove(handle.seed_id)
        .ok_or(RemoteError::NoSuchSeed(handle.seed_id))?;
    daemon.cache.remove(SeedKey {
        host: daemon.listen,
        id: seed.id,
        key: handle.key,
    });
    release(daemon, &seed).await;
    tracing::info!(seed = seed.id, "dropped");
    Ok(Event::Done)
}

/// The descriptor behind `handle`, from this host's registry or the seed's host (which checks
/// the key either way).
async fn inspect(daemon: &Daemon, handle: &str) -> Result<Event, SeedOpFailed> {
    let handle: Handle = handle.parse()?;
    if handle.host == daemon.listen {
        let seed = daemon.registry.authorize(handle.seed_id, &handle.key)?;
        return Ok(Event::Descriptor(seed.encoded.clone()));
    }
    let seed = SeedKey {
        host: handle.host,
        id: handle.seed_id,
        key: handle.key,
    }
    .seed_ref();
    Ok(Event::Descriptor(
        daemon.pool.descriptor(handle.host, seed).await?,
    ))
}

/// Builds this host's replica of `handle`'s seed (checked with its host first, as a resume
/// does), without forking anything.
/// Builds this host's replica of `handle`'s seed if it has none; with `whole`, then brings in
/// every page of the seed the cache has room for ([`crate::fill::whole`]).
async fn replicate(
    daemon: &Arc<Daemon>,
    handle: &str,
    whole: bool,
) -> Result<Event, crate::errors::ResumeFailed> {
    let h: Handle = handle.parse()?;
    let mut stats = mitosis_transport::control::ResumeStats::default();
    let (entry, key) =
        crate::resume::replica_of(daemon, &h, std::time::Instant::now(), &mut stats).await?;
    // Built over the budget, it makes room among the others like a child's growth does.
    daemon.cache.evict_over_budget(key);
    if whole {
        crate::fill::whole(daemon, &entry).await?;
    }
    Ok(Event::Done)
}

fn evict(daemon: &Daemon, handle: &str) -> Result<Event, SeedOpFailed> {
    let h: Handle = handle.parse()?;
    let key = SeedKey {
        host: h.host,
        id: h.seed_id,
        key: h.key,
    };
    if daemon.cache.remove(key) {
        Ok(Event::Done)
    } else {
        Err(SeedOpFailed::NoReplica(h.seed_id))
    }
}

/// Kills a seed's twin (on its tracer thread, which owns it), and its container if any.
pub async fn release(daemon: &Daemon, seed: &Seed) {
    let twin = seed.twin.lock().expect("twin lock").take();
    if let Some(twin) = twin {
        daemon.twins.remove(twin.pid());
        let insn = seed.syscall_insn;
        seed.tracer.run(move || twin.release(insn)).await;
    }
    let container = seed.container.lock().expect("container lock").take();
    if let Some(container) = container {
        destroy_seed_container(container).await;
    }
}

/// Reads the tmpfs mounts of `pid`'s container (of `bundle`), off the async threads.
async fn container_tmpfs(
    pid: i32,
    bundle: &mitosis_container::Bundle,
) -> Result<Vec<mitosis_descriptor::TmpfsContent>, PrepareFailed> {
    let mounts = bundle.tmpfs_mounts();
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let captured =
        tokio::task::spawn_blocking(move || mitosis_container::tmpfs::capture(&root, &mounts))
            .await
            .map_err(|e| PrepareFailed::Containers(e.to_string()))?;
    if let Some(first) = captured.left_out.first() {
        tracing::warn!(
            pid,
            left_out = captured.left_out.len(),
            first,
            "children's containers start without part of the seed's tmpfs content"
        );
    }
    Ok(captured.tmpfs)
}

async fn destroy_seed_container(c: SeedContainer) {
    let done = tokio::task::spawn_blocking(move || c.container.destroy()).await;
    if let Ok(Err(e)) = done {
        tracing::warn!("destroying a seed's container: {e}");
    }
}

/// MemAvailable of /proc/meminfo, in MiB.
fn memory_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib >> 10)
}

fn status(daemon: &Daemon) -> DaemonStatus {
    let c = &daemon.counters;
    let count = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    DaemonStatus {
        listen: daemon.listen.to_string(),
        children_running: count(&c.children_running),
        children_started: count(&c.children_started),
        bytes_served: count(&c.bytes_served),
        peer_connections: count(&c.peer_connections),
        peer_refused: count(&c.peer_refused),
        peer_tls_refused: count(&c.peer_tls_refused),
        control_connections: count(&c.control_connections),
        control_refused: count(&c.control_refused),
        control_tls_refused: count(&c.control_tls_refused),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        memory_available_mib: memory_available_mib().unwrap_or(0),
        seeds: daemon
            .registry
            .all()
            .iter()
            .map(|seed| SeedStatus {
                id: seed.id,
                pid: seed.pid,
                vmas: seed.descriptor.vmas.len() as u64,
                pages: seed
                    .descriptor
                    .vmas
                    .iter()
                    .map(|v| v.seed_pages.len())
                    .sum(),
            })
            .collect(),
        replicas: daemon
            .cache
            .lines()
            .into_iter()
            .map(|line| ReplicaStatus {
                seed: line.key.id,
                host: line.key.host.to_string(),
                pid: line.pid,
                pages: line.pages,
                children: line.children,
            })
            .collect(),
        pool: daemon
            .pool
            .idle_counts()
            .into_iter()
            .map(|(peer, idle)| (peer.to_string(), idle as u64))
            .collect(),
        containers: match daemon.containers() {
            Ok(c) => c.status_lines(),
            Err(e) => vec![format!("containers unavailable: {e}")],
        },
    }
}
