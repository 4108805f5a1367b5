//! A container on this host: a `mitosis-init` in new namespaces, and its cgroup.

use std::ffi::CString;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mitosis_sys::pidfd;
use thiserror::Error;

use crate::cgroup::{Cgroup, CgroupError, Hierarchy};
use crate::init::{Exec, InitConfig};
use crate::spec::Bundle;

/// How long init may take to set the container up.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ContainerError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("starting {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("talking to the container's init: {0}")]
    Channel(std::io::Error),
    #[error("setting the container up: {0}")]
    Init(String),
}

/// What runs in a new container.
pub enum Contents {
    /// Nothing yet: children join it later (a pooled container).
    Empty,
    /// The bundle's process, with this stdio (a seed's container).
    Process { stdio: [OwnedFd; 3] },
}

/// A running container. Dropping it does not stop it: call [`Container::destroy`].
#[derive(Debug)]
pub struct Container {
    name: String,
    hostname: String,
    init_pid: i32,
    init: OwnedFd,
    cgroup: Cgroup,
    namespaces: i32,
}

impl Container {
    /// Creates container `name` of `bundle` with `hostname`, its init being `init_exe`.
    /// On failure nothing is left behind.
    pub fn create(
        hierarchy: &Hierarchy,
        init_exe: &Path,
        bundle: &Bundle,
        name: &str,
        hostname: &str,
        contents: Contents,
    ) -> Result<Container, ContainerError> {
        let mut limits = bundle.limits.clone();
        // init is one more process in the container than the function asked for.
        limits.pids = limits.pids.map(|p| p + 1);
        let cgroup = hierarchy.create(name, &limits)?;
        match start_init(init_exe, bundle, hostname, &cgroup, contents) {
            Ok((init_pid, init)) => Ok(Container {
                name: name.into(),
                hostname: hostname.into(),
                init_pid,
                init,
                cgroup,
                namespaces: bundle.namespaces,
            }),
            Err(e) => {
                let _ = cgroup.destroy();
                Err(e)
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The pid of the container's init, whose namespaces a child joins.
    pub fn init_pid(&self) -> i32 {
        self.init_pid
    }

    /// CLONE_NEW* flags of the container's namespaces.
    pub fn namespaces(&self) -> i32 {
        self.namespaces
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The process init started (a seed's container), as this host's pid.
    pub fn main_pid(&self) -> Option<i32> {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.init_pid)).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// True while init runs (a seed's container ends with its process).
    pub fn is_running(&self) -> bool {
        matches!(pidfd::peek_exit(&self.init), Ok(None))
    }

    /// How init exited, once it has (a container with a process exits as its process did:
    /// its code, or 128 + the signal that killed it). Init is left for [`Container::destroy`]
    /// to reap.
    pub fn exit_status(&self) -> std::io::Result<Option<pidfd::ExitStatus>> {
        pidfd::peek_exit(&self.init)
    }

    /// Kills init, which ends the container's pid namespace and every process in it.
    pub fn kill(&self) {
        let _ = pidfd::send_signal(&self.init, libc::SIGKILL);
    }

    /// A pidfd of init, readable once it exits (to wait for it on an event loop).
    pub fn init_pidfd(&self) -> std::io::Result<OwnedFd> {
        self.init.try_clone()
    }

    /// Stops everything in the container and removes its cgroup. Killing init ends its pid
    /// namespace, which kills every process in it; the mounts go with the last of them.
    pub fn destroy(self) -> Result<(), ContainerError> {
        let _ = pidfd::send_signal(&self.init, libc::SIGKILL);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.init_pid), None);
        self.cgroup.destroy()?;
        Ok(())
    }
}

/// Starts init in the bundle's namespaces, in `cgroup`, and waits for its answer.
fn start_init(
    init_exe: &Path,
    bundle: &Bundle,
    hostname: &str,
    cgroup: &Cgroup,
    contents: Contents,
) -> Result<(i32, OwnedFd), ContainerError> {
    let spawn_err = |source| ContainerError::Spawn {
        exe: init_exe.display().to_string(),
        source,
    };
    let exe = CString::new(init_exe.as_os_str().as_encoded_bytes()).map_err(|_| {
        spawn_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "NUL in path",
        ))
    })?;
    let argv = [CString::from(c"mitosis-init")];
    let (mut ours, theirs) = UnixStream::pair().map_err(ContainerError::Channel)?;
    let null = std::fs::File::open("/dev/null").map_err(spawn_err)?;
    let (stdio, exec): ([RawFd; 3], _) = match &contents {
        Contents::Empty => ([null.as_raw_fd(); 3], None),
        Contents::Process { stdio } => (
            [
                stdio[0].as_raw_fd(),
                stdio[1].as_raw_fd(),
                stdio[2].as_raw_fd(),
            ],
            Some(Exec {
                args: bundle.args.clone(),
                env: bundle.env.clone(),
                cwd: bundle.cwd.clone(),
                uid: bundle.uid,
                gid: bundle.gid,
                groups: bundle.groups.clone(),
                umask: bundle.umask,
                oom_score_adj: bundle.oom_score_adj,
                privileges: bundle.privileges.clone(),
                seccomp: bundle.seccomp.clone(),
            }),
        ),
    };
    let fds = [stdio[0], stdio[1], stdio[2], theirs.as_raw_fd()];
    let pid = mitosis_sys::ns::spawn_in_namespaces(bundle.namespaces, &exe, &argv, &fds)
        .map_err(spawn_err)?;
    drop(theirs);
    drop(contents);
    let init = match pidfd::open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            reap(pid);
            return Err(spawn_err(e));
        }
    };
    let fail = |e: ContainerError| {
        let _ = pidfd::send_signal(&init, libc::SIGKILL);
        reap(pid);
        Err(e)
    };
    // Into the cgroup before it starts anything, so all the container's processes are in it.
    if let Err(e) = cgroup.add(pid) {
        return fail(e.into());
    }
    let config = InitConfig {
        rootfs: bundle.rootfs.clone(),
        readonly: bundle.readonly,
        hostname: (bundle.namespaces & libc::CLONE_NEWUTS != 0).then(|| hostname.to_string()),
        loopback: bundle.namespaces & libc::CLONE_NEWNET != 0,
        masked: bundle.masked.clone(),
        readonly_paths: bundle.readonly_paths.clone(),
        listed_mounts: bundle.listed_mounts.clone(),
        mounts: bundle.mounts.clone(),
        sysctl: bundle.sysctl.clone(),
        exec,
    };
    let sent = serde_json::to_vec(&config)
        .map_err(std::io::Error::other)
        .and_then(|bytes| ours.write_all(&bytes))
        .and_then(|_| ours.shutdown(Shutdown::Write))
        .and_then(|_| ours.set_read_timeout(Some(INIT_TIMEOUT)));
    if let Err(e) = sent {
        return fail(ContainerError::Channel(e));
    }
    let t0 = Instant::now();
    match crate::init::read_answer(&ours) {
        Ok(Ok(())) => Ok((pid, init)),
        Ok(Err(msg)) => fail(ContainerError::Init(msg)),
        Err(e) if t0.elapsed() >= INIT_TIMEOUT => fail(ContainerError::Init(format!(
            "no answer within {INIT_TIMEOUT:?} ({e})"
        ))),
        Err(e) => fail(ContainerError::Channel(e)),
    }
}

fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}
