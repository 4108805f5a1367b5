//! This host's containers: seeds started from OCI bundles, and the pool children join.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mitosis_container::cgroup::Hierarchy;
use mitosis_container::pool::Pool;
use mitosis_container::{Bundle, Container, Contents};
use mitosis_descriptor::ContainerRef;

/// How much of a failed seed's output an error quotes.
const LOG_TAIL: u64 = 400;

pub struct Containers {
    pub pool: Pool,
    hierarchy: Arc<Hierarchy>,
    init_exe: PathBuf,
}

/// The container a bundle's seed runs in, and what keeps it waiting.
pub struct SeedContainer {
    pub container: Container,
    /// The write end of the seed's stdin: held so the seed waits for input forever.
    _stdin: OwnedFd,
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

    /// Starts `bundle`'s process as seed `id` and waits until it blocks reading stdin.
    /// Returns the container and the process's pid.
    pub async fn start_seed(
        &self,
        bundle: &Bundle,
        id: u64,
        ready_timeout: Duration,
    ) -> Result<(SeedContainer, i32), String> {
        let (stdin_read, stdin_write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        let log = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(std::env::temp_dir())
            .map_err(|e| format!("the seed's log file: {e}"))?;
        let out = log.try_clone().map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let (hierarchy, init_exe, bundle_c) = (
            self.hierarchy.clone(),
            self.init_exe.clone(),
            bundle.clone(),
        );
        let container = tokio::task::spawn_blocking(move || {
            Container::create(
                &hierarchy,
                &init_exe,
                &bundle_c,
                &format!("seed{id}"),
                &bundle_c.hostname,
                Contents::Process {
                    stdio: [stdin_read, out.into(), err.into()],
                },
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let seed = SeedContainer {
            container,
            _stdin: stdin_write,
        };
        match wait_warm(&seed.container, ready_timeout).await {
            Ok(pid) => Ok((seed, pid)),
            Err(why) => {
                let tail = log_tail(log);
                // Draining its cgroup may take a while: off the async threads.
                let _ = tokio::task::spawn_blocking(move || seed.container.destroy()).await;
                Err(if tail.is_empty() {
                    why
                } else {
                    format!("{why}; it wrote: {tail}")
                })
            }
        }
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

/// Waits until the container's process blocks in read(0): the seed convention for "warm,
/// waiting for a request". Its pid as this host sees it.
async fn wait_warm(container: &Container, timeout: Duration) -> Result<i32, String> {
    let t0 = Instant::now();
    loop {
        if !container.is_running() {
            return Err("the seed exited before it was warm".into());
        }
        if let Some(pid) = container.main_pid() {
            if reads_stdin(pid) {
                return Ok(pid);
            }
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "the seed did not wait for input on stdin within {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// True if `pid` is blocked in read(2) on descriptor 0 (/proc/PID/syscall: "0 0x0 ...").
fn reads_stdin(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .is_ok_and(|s| s.split_whitespace().take(2).eq(["0", "0x0"]))
}

fn log_tail(mut log: File) -> String {
    let len = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = log.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut text = String::new();
    let _ = log.read_to_string(&mut text);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
