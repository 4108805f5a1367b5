//! This host's containers: seeds started from OCI bundles, and the pool children join.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::OwnedFd;

use mitosis_container::cgroup::Hierarchy;
use mitosis_container::pool::Pool;
pub use mitosis_container::seed::SeedContainer;
use mitosis_container::{Bundle, Container, Contents};
use mitosis_descriptor::{ContainerRef, Descriptor, DroppedFd};
use mitosis_fork::restore::ContainerRoot;

pub struct Containers {
    pub pool: Pool,
    hierarchy: Arc<Hierarchy>,
    init_exe: PathBuf,
}

impl Containers {
    /// Sets up this daemon's cgroups (removing what a crashed daemon of the same `instance`
    /// left) and starts the pool.
    pub fn new(instance: &str, init_exe: PathBuf, pool_target: usize) -> anyhow::Result<Self> {
        let hierarchy = Arc::new(Hierarchy::detect(instance)?);
        let removed = hierarchy.remove_leftovers()?;
        if removed > 0 {
            tracing::info!(removed, "removed containers a previous daemon left");
        }
        // Made again with the first container: until then, a crash leaves nothing behind.
        hierarchy.remove_base();
        tracing::info!("containers: {}", hierarchy.describe());
        Ok(Containers {
            pool: Pool::new(hierarchy.clone(), init_exe.clone(), pool_target),
            hierarchy,
            init_exe,
        })
    }

    /// The bundle in `dir`; with `want`, it must be that exact bundle (a child's seed's).
    pub fn bundle(&self, dir: &Path, want: Option<&[u8; 32]>) -> Result<Arc<Bundle>, String> {
        let loaded = Bundle::load(dir).map_err(|e| e.to_string())?;
        if want.is_some_and(|w| *w != loaded.digest) {
            return Err(format!(
                "the bundle at {} differs from the one the seed runs (config.json changed)",
                dir.display()
            ));
        }
        self.hierarchy
            .check(&loaded.limits)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(loaded))
    }

    /// The bundle a seed's descriptor names.
    pub fn bundle_of(&self, r: &ContainerRef) -> Result<Arc<Bundle>, String> {
        self.bundle(Path::new(&r.bundle), Some(&r.digest))
    }

    /// Starts `bundle`'s process as seed `id` and waits (off the async threads) until it
    /// blocks reading stdin.
    pub async fn start_seed(
        &self,
        bundle: &Arc<Bundle>,
        id: u64,
        ready_timeout: Duration,
    ) -> Result<SeedContainer, String> {
        let (hierarchy, init_exe, bundle) = (
            self.hierarchy.clone(),
            self.init_exe.clone(),
            bundle.clone(),
        );
        tokio::task::spawn_blocking(move || {
            mitosis_container::seed::start_seed(
                &hierarchy,
                &init_exe,
                &bundle,
                &format!("seed{id}"),
                ready_timeout,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Starts `bundle`'s process afresh in container `name` with `stdio` (a cold start), its
    /// memory limited to `memory_bytes` if that is below the bundle's own limit (from the
    /// start: the cgroup is made with it).
    pub async fn start_instance(
        &self,
        bundle: &Bundle,
        name: String,
        stdio: [OwnedFd; 3],
        memory_bytes: Option<u64>,
    ) -> Result<Container, String> {
        let mut bundle = bundle.clone();
        if let Some(bytes) = memory_bytes {
            let own = bundle.limits.memory_bytes.unwrap_or(u64::MAX);
            bundle.limits.memory_bytes = Some(own.min(bytes));
        }
        let (hierarchy, init_exe) = (self.hierarchy.clone(), self.init_exe.clone());
        tokio::task::spawn_blocking(move || {
            Container::create(
                &hierarchy,
                &init_exe,
                &bundle,
                &name,
                &bundle.hostname,
                Contents::Process { stdio },
            )
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    pub fn status_lines(&self) -> Vec<String> {
        let mut out = vec![format!("containers {}", self.hierarchy.describe())];
        for s in self.pool.stats() {
            out.push(format!(
                "container pool {} ready {} made {} taken {} misses {} make_us {}",
                s.bundle.display(),
                s.ready,
                s.made,
                s.taken,
                s.misses,
                s.make_us
            ));
        }
        out.push(format!("containers releasing {}", self.pool.releasing()));
        out.push(format!(
            "container cgroups {}",
            self.hierarchy.names().len()
        ));
        out
    }

    /// Destroys the pool's containers and this daemon's cgroup directories (daemon exit).
    pub fn shutdown(&self) {
        self.pool.shutdown();
        self.hierarchy.remove_base();
    }
}

/// Drops the open files of a seed in `bundle`'s container that no child can reopen: those in
/// its container's own filesystems (its /tmp, /dev/shm), which are neither in the rootfs nor
/// bound from the host. Its capture reads their paths in the seed's mounts, not the host's.
pub fn drop_files_children_cannot_reach(d: &mut Descriptor, bundle: &Bundle) {
    let binds = bundle.binds();
    let root = ContainerRoot {
        rootfs: &bundle.rootfs,
        binds: &binds,
    };
    let (kept, lost): (Vec<_>, Vec<_>) = std::mem::take(&mut d.files)
        .into_iter()
        .partition(|f| root.host_path(&f.path).exists());
    d.files = kept;
    d.dropped.extend(lost.into_iter().map(|f| DroppedFd {
        fd: f.fd,
        target: f.path,
        reason: "in a filesystem of its container's own, not in the bundle".into(),
    }));
}
