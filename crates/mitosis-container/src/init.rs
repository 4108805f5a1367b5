//! `mitosis-init`: pid 1 of a container.
//!
//! Started by the daemon in new namespaces with its configuration on fd 3. It makes the
//! bundle's rootfs its root (private mounts, /proc of its own pid namespace, a minimal /dev),
//! sets the hostname, brings loopback up, and answers `ok` or `error: ...` on fd 3. Then it
//! either starts the bundle's process and lives as long as it does (a seed's container), or
//! waits, reaping orphans, for children that join its namespaces (a pooled container).

use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, chdir, execve, fork, pivot_root, sethostname};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mounts::UserMount;
use crate::spec::ListedMount;

/// The descriptor the configuration arrives on and the answer leaves by.
pub const CONFIG_FD: i32 = 3;

/// What the daemon tells a new init.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub rootfs: PathBuf,
    pub readonly: bool,
    /// Set when the container has its own uts namespace.
    pub hostname: Option<String>,
    /// Bring loopback up: the container has its own network namespace.
    pub loopback: bool,
    /// Paths to hide (an empty read-only tmpfs over a directory, /dev/null over a file).
    pub masked: Vec<String>,
    /// Paths to make read-only.
    pub readonly_paths: Vec<String>,
    /// The mounts the config listed beyond the standard ones.
    pub listed_mounts: Vec<ListedMount>,
    /// The bundle's own bind and tmpfs mounts.
    pub mounts: Vec<UserMount>,
    /// Kernel parameters of the container's own namespaces: (path under /proc, value).
    pub sysctl: Vec<(String, String)>,
    /// The process to run, for a seed's container.
    pub exec: Option<Exec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub umask: Option<u32>,
    pub oom_score_adj: Option<i32>,
    pub privileges: crate::privileges::Privileges,
    pub seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

#[derive(Debug, Error)]
pub enum InitError {
    #[error("reading the configuration: {0}")]
    Config(String),
    #[error("{step}: {source}")]
    Step {
        step: String,
        source: nix::errno::Errno,
    },
    #[error("{0}: command not found in the container")]
    NotFound(String),
    #[error("{0}")]
    Mount(String),
    #[error("{0}")]
    Seccomp(String),
    #[error("giving the process its privileges: {0}")]
    Privileges(String),
}

fn step(step: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> InitError {
    let step = step.into();
    move |source| InitError::Step { step, source }
}

/// [`step`] for a std I/O error.
fn io_step(step: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let step = step.into();
    move |e| InitError::Step {
        step,
        source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// The whole of `mitosis-init`.
pub fn main() -> ! {
    // SAFETY: the daemon starts us with the config socket on CONFIG_FD; nothing else owns it.
    let mut chan = unsafe { UnixStream::from_raw_fd(CONFIG_FD) };
    // SIGCHLD stays blocked here and is waited for with sigwait; the process we start gets
    // its mask back before exec.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    let started = read_config(&mut chan).and_then(|config| {
        set_up(&config)?;
        config.exec.as_ref().map(|e| start(e, &chld)).transpose()
    });
    let main = match started {
        Ok(main) => main,
        Err(e) => {
            let _ = writeln!(chan, "error: {e}");
            std::process::exit(1);
        }
    };
    let _ = writeln!(chan, "ok");
    drop(chan);
    reap(main, &chld)
}

fn read_config(chan: &mut UnixStream) -> Result<InitConfig, InitError> {
    let mut text = Vec::new();
    chan.read_to_end(&mut text)
        .map_err(|e| InitError::Config(e.to_string()))?;
    serde_json::from_slice(&text).map_err(|e| InitError::Config(e.to_string()))
}

/// Makes the rootfs our root, in our own mount namespace.
fn set_up(c: &InitConfig) -> Result<(), InitError> {
    let none: Option<&str> = None;
    // Nothing we mount may propagate back to the host.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("making mounts private"))?;
    let root = &c.rootfs;
    mount(
        Some(root.as_path()),
        root.as_path(),
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(step(format!("binding {}", root.display())))?;
    let under = |p: &str| root.join(p);
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &under("proc"), Some("proc"), nosuid, none)
        .map_err(step("mounting /proc"))?;
    mount(
        Some("sysfs"),
        &under("sys"),
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        none,
    )
    .map_err(step("mounting /sys"))?;
    mount(
        Some("tmpfs"),
        &under("tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )
    .map_err(step("mounting /tmp"))?;
    make_dev(&under("dev"))?;
    for &listed in &c.listed_mounts {
        mount_listed(&under, listed)?;
    }
    for m in &c.mounts {
        m.mount_under(root).map_err(InitError::Mount)?;
    }
    // Before /proc/sys may be made read-only (readonlyPaths).
    for (path, value) in &c.sysctl {
        std::fs::write(under("proc").join(path), value)
            .map_err(io_step(format!("setting /proc/{path}")))?;
    }

    chdir(root.as_path()).map_err(step("entering the rootfs"))?;
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only
    // the rootfs, without needing a directory for the old root inside it.
    pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    chdir("/").map_err(step("chdir /"))?;
    for path in &c.masked {
        mask(path)?;
    }
    for path in &c.readonly_paths {
        if Path::new(path).exists() {
            mount(
                Some(path.as_str()),
                path.as_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )
            .and_then(|_| {
                let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                mount(none, path.as_str(), none, flags, none)
            })
            .map_err(step(format!("making {path} read-only")))?;
        }
    }
    // No device node in the rootfs opens (there is no device cgroup: a process given
    // CAP_MKNOD could otherwise make and open the host's disks); /dev's own are bound.
    let mut root_flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NODEV;
    if c.readonly {
        root_flags |= MsFlags::MS_RDONLY;
    }
    mount(none, "/", none, root_flags, none).map_err(step("remounting the rootfs nodev"))?;
    if let Some(name) = &c.hostname {
        sethostname(name).map_err(step("setting the hostname"))?;
    }
    if c.loopback {
        mitosis_sys::ns::loopback_up().map_err(io_step("bringing loopback up"))?;
    }
    Ok(())
}

/// One of the mounts a container gets only when its config lists it.
fn mount_listed(under: &dyn Fn(&str) -> PathBuf, listed: ListedMount) -> Result<(), InitError> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let (what, dir, fstype, flags, data) = match listed {
        // A devpts of its own (`newinstance`), with /dev/ptmx reaching its multiplexer.
        ListedMount::DevPts => (
            "devpts",
            "dev/pts",
            "devpts",
            flags,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        ListedMount::Mqueue => (
            "mqueue",
            "dev/mqueue",
            "mqueue",
            flags | MsFlags::MS_NODEV,
            None,
        ),
        ListedMount::Cgroup => (
            "cgroup",
            "sys/fs/cgroup",
            "cgroup2",
            flags | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
            None,
        ),
    };
    let target = under(dir);
    // /sys/fs/cgroup is sysfs's own (read-only) directory; the others go in our /dev.
    if listed != ListedMount::Cgroup {
        std::fs::create_dir_all(&target).map_err(io_step(format!("creating /{dir}")))?;
    }
    mount(Some(what), &target, Some(fstype), flags, data)
        .map_err(step(format!("mounting /{dir}")))?;
    if listed == ListedMount::DevPts {
        let ptmx = under("dev/ptmx");
        let _ = std::fs::remove_file(&ptmx);
        std::os::unix::fs::symlink("pts/ptmx", &ptmx).map_err(io_step("linking /dev/ptmx"))?;
    }
    Ok(())
}

/// Hides `path` if it exists: a directory under an empty read-only tmpfs, a file under
/// /dev/null.
fn mask(path: &str) -> Result<(), InitError> {
    let none: Option<&str> = None;
    let p = Path::new(path);
    let result = if p.is_dir() {
        mount(Some("tmpfs"), p, Some("tmpfs"), MsFlags::MS_RDONLY, none)
    } else if p.exists() {
        mount(Some("/dev/null"), p, none, MsFlags::MS_BIND, none)
    } else {
        return Ok(());
    };
    result.map_err(step(format!("masking {path}")))
}

/// A /dev with the usual character devices, bound from the host's, and the usual links.
fn make_dev(dev: &Path) -> Result<(), InitError> {
    let none: Option<&str> = None;
    // nodev: the standard nodes are bind mounts of the host's, with their own flags; a node
    // made here does not open.
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
        Some("mode=755,size=64k"),
    )
    .map_err(step("mounting /dev"))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        std::fs::File::create(&target).map_err(io_step(format!("creating /dev/{name}")))?;
        let host = format!("/dev/{name}");
        mount(Some(host.as_str()), &target, none, MsFlags::MS_BIND, none)
            .map_err(step(format!("binding /dev/{name}")))?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, dev.join(link));
    }
    let shm = dev.join("shm");
    let _ = std::fs::create_dir(&shm);
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )
    .map_err(step("mounting /dev/shm"))?;
    Ok(())
}

/// Starts the bundle's process as our child; returns its pid.
fn start(e: &Exec, chld: &SigSet) -> Result<Pid, InitError> {
    let cstrings = |v: &[String]| -> Result<Vec<CString>, InitError> {
        v.iter()
            .map(|s| {
                CString::new(s.as_str()).map_err(|_| InitError::Config(format!("NUL in {s:?}")))
            })
            .collect()
    };
    let args = cstrings(&e.args)?;
    let env = cstrings(&e.env)?;
    let program =
        resolve(&e.args[0], &e.env).ok_or_else(|| InitError::NotFound(e.args[0].clone()))?;
    let program = CString::new(program.into_os_string().into_encoded_bytes())
        .map_err(|_| InitError::Config("NUL in the program path".into()))?;
    let cwd = e.cwd.clone();
    // SAFETY: init is single-threaded, so the child may do anything before exec.
    match unsafe { fork() }.map_err(step("fork"))? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let _ = chld.thread_unblock();
            let privileges = |r: Result<(), String>| r.map_err(InitError::Privileges);
            // As runc: with no_new_privs the filter goes last, just before exec; without it,
            // loading one takes CAP_SYS_ADMIN, so it goes before the ids and capabilities
            // change (and must let their calls through).
            let nnp = e.privileges.no_new_privileges;
            let seccomp = |now: bool| match &e.seccomp {
                Some(profile) if now => crate::seccomp::load(profile).map_err(InitError::Seccomp),
                _ => Ok(()),
            };
            let result = chdir(cwd.as_str())
                .map_err(step(format!("chdir {cwd}")))
                .and_then(|_| process_settings(e))
                .and_then(|_| privileges(e.privileges.apply_before_ids()))
                .and_then(|_| seccomp(!nnp))
                .and_then(|_| setgroups(&e.groups))
                .and_then(|_| nix::unistd::setgid(Gid::from_raw(e.gid)).map_err(step("setgid")))
                .and_then(|_| nix::unistd::setuid(Uid::from_raw(e.uid)).map_err(step("setuid")))
                .and_then(|_| privileges(e.privileges.apply_after_ids()))
                .and_then(|_| seccomp(nnp))
                .and_then(|_| execve(&program, &args, &env).map_err(step("exec")));
            let Err(err) = result;
            let _ = writeln!(io::stderr(), "mitosis-init: {err}");
            std::process::exit(127)
        }
    }
}

/// The umask and OOM score adjustment the config asks for (a score below the daemon's
/// fails: lowering it needs CAP_SYS_RESOURCE).
fn process_settings(e: &Exec) -> Result<(), InitError> {
    if let Some(mask) = e.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask & 0o777));
    }
    if let Some(score) = e.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .map_err(io_step(format!("setting oomScoreAdj {score}")))?;
    }
    Ok(())
}

fn setgroups(groups: &[u32]) -> Result<(), InitError> {
    let groups: Vec<Gid> = groups.iter().copied().map(Gid::from_raw).collect();
    nix::unistd::setgroups(&groups).map_err(step("setgroups"))
}

/// `name` as exec would find it with the container's PATH.
fn resolve(name: &str, env: &[String]) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = env
        .iter()
        .find_map(|v| v.strip_prefix("PATH="))
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// Reaps whatever dies in the container. With a main process, exits as it exits.
fn reap(main: Option<Pid>, chld: &SigSet) -> ! {
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if Some(pid) == main => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if Some(pid) == main => {
                    std::process::exit(128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = chld.wait();
    }
}

/// Reads init's one-line answer from the daemon's side of the channel.
pub fn read_answer(chan: &UnixStream) -> io::Result<Result<(), String>> {
    let mut line = String::new();
    BufReader::new(chan).read_line(&mut line)?;
    let line = line.trim_end();
    Ok(match line {
        "ok" => Ok(()),
        "" => Err("init exited before answering".into()),
        other => Err(other.strip_prefix("error: ").unwrap_or(other).to_string()),
    })
}
