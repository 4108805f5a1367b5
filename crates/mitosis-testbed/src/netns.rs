//! Thin helpers around iproute2 and the kernel's namespace files.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Result, TestbedError};

/// Where iproute2 keeps the bind mounts that name network namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Serializes `ip netns add` within this process: the first call sets up the
/// shared mount on /run/netns, and concurrent first calls can stack mounts.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// The path of the file naming network namespace `name`.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip ARGS`, turning a failure into an error that shows the command
/// line and its stderr.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    let command_line = || {
        let mut line = String::from("ip");
        for arg in args {
            line.push(' ');
            line.push_str(&arg.as_ref().to_string_lossy());
        }
        line
    };
    tracing::debug!(command = %command_line(), "running");
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => TestbedError::IpMissing { source },
            _ => TestbedError::Spawn {
                command: command_line(),
                source,
            },
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(TestbedError::CommandFailed {
            command: command_line(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Creates the named network namespace.
pub(crate) fn add(name: &str) -> Result<()> {
    // A poisoned lock only means another thread panicked mid-`ip`; the
    // guarded state lives in the kernel, so carrying on is fine.
    let _guard = NETNS_ADD_LOCK
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    ip(&["netns", "add", name])
}

/// Deletes the named network namespace if its file still exists.
pub(crate) fn delete(name: &str) -> Result<()> {
    if netns_path(name).exists() {
        ip(&["netns", "delete", name])
    } else {
        Ok(())
    }
}

/// Makes `cmd` enter the network namespace at `netns` between fork and exec.
///
/// The namespace file is opened now, so a failure to open it surfaces as a
/// spawn error, and the command keeps working even if the name disappears.
pub(crate) fn enter_on_spawn(cmd: &mut Command, netns: &Path) {
    let ns: Result<OwnedFd, i32> = File::open(netns)
        .map(OwnedFd::from)
        .map_err(|err| err.raw_os_error().unwrap_or(libc::ENOENT));
    // SAFETY: the hook runs in the forked child, where only async-signal-safe work is allowed. It only calls setns(2) and builds an io::Error from a raw errno, neither of which allocates or takes locks. The fd was opened with O_CLOEXEC, so the exec'd program does not inherit it.
    unsafe {
        cmd.pre_exec(move || match &ns {
            Ok(fd) => setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from),
            Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
        });
    }
}

/// The identity of a namespace: the device and inode of its nsfs file.
pub(crate) type NsId = (u64, u64);

/// The identity of the namespace that `path` (a netns file or a
/// `/proc/PID/ns/net` link) refers to.
pub(crate) fn ns_id(path: &Path) -> io::Result<NsId> {
    let meta = fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// The pids of all live processes, except this one.
pub(crate) fn other_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .collect()
}

/// The processes (other than this one) living in one of the namespaces in
/// `namespaces`. Zombies have left their namespaces and are not reported.
pub(crate) fn pids_in(namespaces: &[NsId]) -> Vec<u32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    other_pids()
        .into_iter()
        .filter(|pid| {
            ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
                .is_ok_and(|id| namespaces.contains(&id))
        })
        .collect()
}

/// SIGKILLs every process in `namespaces` until none is left, so that the
/// namespaces can really go away once their names are deleted.
pub(crate) fn kill_all_in(namespaces: &[NsId], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = pids_in(namespaces);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::io(
                format!("processes {pids:?} are still alive in the testbed's namespaces"),
                io::Error::from(io::ErrorKind::TimedOut),
            ));
        }
        for pid in pids {
            if let Ok(raw) = i32::try_from(pid) {
                // The process may exit on its own meanwhile; ESRCH is fine.
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// One dial request to a [`Dialer`]'s thread.
type Dial = (
    std::net::SocketAddr,
    Duration,
    std::sync::mpsc::Sender<io::Result<std::net::TcpStream>>,
);

/// Makes TCP connections from inside one network namespace: a thread of its own joined the
/// namespace once and dials on request (a socket keeps the namespace it was made in), so
/// that a process in the root namespace can reach the testbed's addresses without any
/// route from the root namespace. The thread ends with the last clone.
#[derive(Clone)]
pub struct Dialer {
    requests: std::sync::mpsc::Sender<Dial>,
}

impl Dialer {
    /// A dialer in the namespace at `netns`.
    pub(crate) fn new(netns: &Path) -> Result<Dialer> {
        let ns = File::open(netns)
            .map_err(|e| TestbedError::io(format!("opening {}", netns.display()), e))?;
        let (requests, incoming) = std::sync::mpsc::channel::<Dial>();
        let (joined_tx, joined) = std::sync::mpsc::channel();
        thread::Builder::new()
            .name("netns-dialer".into())
            .spawn(move || {
                let entered = setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = joined_tx.send(entered);
                drop(ns);
                if !ok {
                    return;
                }
                for (addr, timeout, reply) in incoming {
                    let _ = reply.send(std::net::TcpStream::connect_timeout(&addr, timeout));
                }
            })
            .map_err(|e| TestbedError::io("starting a netns dialer thread", e))?;
        joined
            .recv()
            .map_err(|_| TestbedError::io("a netns dialer thread", io::ErrorKind::Other.into()))?
            .map_err(|e| TestbedError::io(format!("joining {}", netns.display()), e))?;
        Ok(Dialer { requests })
    }

    /// A connection to `addr` made in the dialer's namespace.
    pub fn dial(
        &self,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> io::Result<std::net::TcpStream> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.requests
            .send((addr, timeout, reply))
            .map_err(|_| io::Error::other("the netns dialer thread is gone"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the netns dialer thread is gone"))?
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer { .. }")
    }
}
