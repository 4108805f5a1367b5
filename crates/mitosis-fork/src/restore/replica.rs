//! A replica: this host's copy of a seed, built like a child but never run.
//!
//! It holds the pages this host has fetched, and every child of the seed on this host is a
//! fork of it: pages the replica has are physically shared and copied on write, exactly as
//! after a local fork. Pages it lacks stay registered with userfaultfd and arrive on demand.
//!
//! A child is made by injecting `clone(CLONE_PARENT)` into the stopped replica (so the child
//! is the daemon's child) and running a small batch in the child: take its stdio from the
//! replica's channel, drop the channel, give shared memory a fresh mapping of its own. Then it
//! gets the seed's registers and is let go.
//!
//! A child of a containerized seed also joins a container made ahead of time: the replica
//! takes a pidfd of the container's init and sets its pid namespace for children from it
//! before the clone; the child's batch joins the other namespaces through the same pidfd,
//! which it inherits as descriptor 0 (the replica has no stdio, so it is the lowest free).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use mitosis_sys::ptrace::{Regs, Stop, Tracee};
use mitosis_sys::uffd::Userfaultfd;
use mitosis_sys::{fdpass, pidfd};
use nix::sys::ptrace::Options;

use super::build::{self, Laid, RestoreError, Spawned};
use super::plan::Plan;
use super::trampoline::{self, Record};
use crate::pending::PendingMap;
use crate::regs::{RestartFor, resume_point, words_to_regs};

const RECORD: u64 = std::mem::size_of::<Record>() as u64;
/// msghdr (56) + iovec (16) + one byte (8) + cmsg space for three fds (32).
const MSG_AREA: u64 = 56 + 16 + 8 + 32;
/// How long a fork may wait for its userfaultfd (the fork blocks until it is read).
const FORK_UFFD_WAIT: Duration = Duration::from_secs(5);
/// Where a joining child finds the pidfd of its container's init.
const JOIN_FD: u64 = 0;

/// The containers children of a replica join, as far as the batch needs to know at build.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// CLONE_NEW* flags of the containers' namespaces.
    pub namespaces: i32,
    /// The seed's working directory inside the container.
    pub cwd: String,
}

/// The container one child joins.
pub struct Join {
    pub init_pid: i32,
    /// Runs on the stopped child before it is let go (puts it into the container's cgroup).
    pub before_run: Box<dyn FnOnce(i32) -> std::io::Result<()> + Send>,
}

/// The replica process. Lives on the tracer thread's side: every method must run there.
pub struct Replica {
    spawned: Spawned,
    at: u64,
    size: u64,
    batch_at: u64,
    batch_labels: Vec<String>,
    seed_regs: Regs,
    /// Shared anonymous mappings: each child gets a fresh one (seed contents, own writes).
    shared: Vec<(u64, u64)>,
    joins: bool,
}

/// What a new replica hands to the async side.
pub struct Built {
    pub replica: Replica,
    /// The replica's userfaultfd: its missing pages, and one FORK event per child.
    pub uffd: Userfaultfd,
    /// Seed pages the replica does not have yet.
    pub pending: PendingMap,
    pub spawn_us: u64,
    pub restore_us: u64,
}

/// A child just forked from a replica, already running the seed's code.
pub struct Forked {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub uffd: Userfaultfd,
    pub fork_us: u64,
}

/// Builds the replica of `plan`. `prefetched` holds [`Plan::prefetch_runs`] back to back.
pub fn build(
    plan: Plan,
    stub: &Path,
    prefetched: &[u8],
    join: Option<JoinSpec>,
) -> Result<Built, RestoreError> {
    let t0 = Instant::now();
    let mut spawned = build::spawn(&plan, stub, None)?;
    let spawn_us = t0.elapsed().as_micros() as u64;
    let shared: Vec<(u64, u64)> = plan
        .maps
        .iter()
        .filter(|m| m.file.is_none() && m.flags & libc::MAP_SHARED as u64 != 0)
        .map(|m| (m.start, m.len))
        .collect();
    let chan_fd = plan.work_fd_base as u64;
    let maps = plan.maps.clone();
    let joins = join.is_some();
    let batch_join = join.clone();
    let extra = move |at: u64| child_batch(at, chan_fd, &maps, batch_join.as_ref()).0;
    let laid = build::lay_out(&plan, &mut spawned, prefetched, Some(&extra));
    let laid = match laid.and_then(|l| {
        // Forks must stop us so each child is traced from its first instruction.
        spawned
            .tracee
            .set_options(Options::PTRACE_O_TRACEFORK | Options::PTRACE_O_EXITKILL)
            .map_err(RestoreError::Trace)?;
        Ok(l)
    }) {
        Ok(l) => l,
        Err(e) => {
            spawned.kill();
            return Err(e);
        }
    };
    let Laid {
        uffd,
        at,
        size,
        extra_at,
    } = laid;
    let (_, batch_labels) = child_batch(extra_at, chan_fd, &plan.maps, join.as_ref());
    let seed_regs = resume_point(&words_to_regs(&plan.regs), RestartFor::OtherTask);
    Ok(Built {
        replica: Replica {
            spawned,
            at,
            size,
            batch_at: extra_at,
            batch_labels,
            seed_regs,
            shared,
            joins,
        },
        uffd,
        pending: plan.pending,
        spawn_us,
        restore_us: t0.elapsed().as_micros() as u64 - spawn_us,
    })
}

/// The batch each child runs right after the fork, laid out at `at`: records, then the
/// recvmsg structures, then the container's working directory. Returns its bytes and a label
/// per record.
fn child_batch(
    at: u64,
    chan_fd: u64,
    maps: &[super::MapStep],
    join: Option<&JoinSpec>,
) -> (Vec<u8>, Vec<String>) {
    let shared: Vec<&super::MapStep> = maps
        .iter()
        .filter(|m| m.file.is_none() && m.flags & libc::MAP_SHARED as u64 != 0)
        .collect();
    let n = 3 + shared.len() as u64 + if join.is_some() { 3 } else { 0 };
    let msg = at + n * RECORD;
    let (iov, byte, cmsg) = (msg + 56, msg + 72, msg + 80);
    let cwd_at = msg + MSG_AREA;
    let mut records: Vec<(Record, String)> = vec![(
        [
            libc::SYS_prctl as u64,
            libc::PR_SET_PDEATHSIG as u64,
            libc::SIGKILL as u64,
            0,
            0,
            0,
            0,
        ],
        "die with the daemon".into(),
    )];
    if let Some(join) = join {
        // The pid namespace was set by the replica for the clone; the rest is joined here.
        let flags = (join.namespaces & !libc::CLONE_NEWPID) as u64;
        records.extend([
            (
                [libc::SYS_setns as u64, JOIN_FD, flags, 0, 0, 0, 0],
                "join the container's namespaces".into(),
            ),
            (
                [libc::SYS_close as u64, JOIN_FD, 0, 0, 0, 0, 0],
                "close the container's pidfd".into(),
            ),
            (
                [libc::SYS_chdir as u64, cwd_at, 0, 0, 0, 0, 0],
                format!("enter {}", join.cwd),
            ),
        ]);
    }
    records.extend([
        (
            [libc::SYS_recvmsg as u64, chan_fd, msg, 0, 0, 0, 0],
            "receive stdio".into(),
        ),
        (
            [libc::SYS_close as u64, chan_fd, 0, 0, 0, 0, 0],
            "close the replica's channel".into(),
        ),
    ]);
    for m in shared {
        let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
        records.push((
            [
                libc::SYS_mmap as u64,
                m.start,
                m.len,
                m.prot,
                flags,
                u64::MAX,
                0,
            ],
            format!("fresh shared memory at {:#x}", m.start),
        ));
    }
    let mut out: Vec<u8> = records
        .iter()
        .flat_map(|(r, _)| r.iter().flat_map(|w| w.to_ne_bytes()))
        .collect();
    // struct msghdr: name, namelen(+pad), iov, iovlen, control, controllen, flags(+pad).
    for w in [0, 0, iov, 1, cmsg, 32, 0] {
        out.extend_from_slice(&u64::to_ne_bytes(w));
    }
    // struct iovec, then the byte buffer and the control buffer.
    for w in [byte, 1] {
        out.extend_from_slice(&u64::to_ne_bytes(w));
    }
    out.resize(out.len() + 8 + 32, 0);
    debug_assert_eq!(out.len() as u64, n * RECORD + MSG_AREA);
    if let Some(join) = join {
        out.extend_from_slice(join.cwd.as_bytes());
        out.push(0);
    }
    (out, records.into_iter().map(|(_, l)| l).collect())
}

impl Replica {
    pub fn pid(&self) -> i32 {
        self.spawned.pid
    }

    /// Forks a child with `stdio`. `forks` yields the child's userfaultfd, read from the
    /// replica's FORK event by the async side while the fork waits for it.
    pub fn fork(
        &mut self,
        stdio: [OwnedFd; 3],
        forks: &Receiver<Userfaultfd>,
        join: Option<Join>,
    ) -> Result<Forked, RestoreError> {
        let t0 = Instant::now();
        if join.is_some() != self.joins {
            return Err(RestoreError::Channel(
                "a child must join a container exactly when its seed ran in one".into(),
            ));
        }
        let tracee = &mut self.spawned.tracee;
        let insn = self.at + trampoline::syscall_offset();
        let saved = tracee.regs().map_err(RestoreError::Trace)?;
        let result = Self::clone_child(tracee, insn, join.as_ref().map(|j| j.init_pid));
        let clone_us = t0.elapsed().as_micros() as u64;
        tracee.set_regs(&saved).map_err(RestoreError::Trace)?;
        let result = result?;
        let pid = match result.new_child {
            Some(pid) if result.ret > 0 => pid,
            _ => {
                return Err(RestoreError::Step {
                    step: "fork the replica".into(),
                    source: std::io::Error::from_raw_os_error(-result.ret as i32),
                });
            }
        };
        let mut child = Tracee::adopt(pid);
        let pidfd = match pidfd::open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                child.kill();
                return Err(RestoreError::Trace(e));
            }
        };
        let before_run = join.map(|j| j.before_run);
        match self.start_child(&mut child, stdio, forks, before_run) {
            Ok(uffd) => {
                child.detach().map_err(RestoreError::Trace)?;
                tracing::debug!(pid, clone_us, "forked");
                Ok(Forked {
                    pid,
                    pidfd,
                    uffd,
                    fork_us: t0.elapsed().as_micros() as u64,
                })
            }
            Err(e) => {
                child.kill();
                Err(e)
            }
        }
    }

    /// Injects the clone into the replica, first moving its pid namespace for children to
    /// that of `init` (the container to join) when there is one.
    fn clone_child(
        tracee: &mut Tracee,
        insn: u64,
        init: Option<i32>,
    ) -> Result<mitosis_sys::ptrace::SyscallResult, RestoreError> {
        let step = |step: &str, ret: i64| RestoreError::Step {
            step: step.into(),
            source: std::io::Error::from_raw_os_error(-ret as i32),
        };
        let mut call =
            |nr: i64, args: [u64; 6]| tracee.syscall(insn, nr, args).map_err(RestoreError::Trace);
        if let Some(init) = init {
            let fd = call(libc::SYS_pidfd_open, [init as u64, 0, 0, 0, 0, 0])?.ret;
            if fd != JOIN_FD as i64 {
                if fd >= 0 {
                    call(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
                    return Err(step(
                        "open the container's pidfd at fd 0 (fd 0 is taken)",
                        -libc::EBUSY as i64,
                    ));
                }
                return Err(step("open the container's pidfd", fd));
            }
            let set = call(
                libc::SYS_setns,
                [JOIN_FD, libc::CLONE_NEWPID as u64, 0, 0, 0, 0],
            )?
            .ret;
            if set < 0 {
                call(libc::SYS_close, [JOIN_FD, 0, 0, 0, 0, 0])?;
                return Err(step("enter the container's pid namespace", set));
            }
        }
        let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as u64;
        let result = call(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]);
        if init.is_some() {
            // The child has its copy; the replica keeps no descriptor of a container.
            call(libc::SYS_close, [JOIN_FD, 0, 0, 0, 0, 0])?;
        }
        result
    }

    fn start_child(
        &self,
        child: &mut Tracee,
        stdio: [OwnedFd; 3],
        forks: &Receiver<Userfaultfd>,
        before_run: Option<Box<dyn FnOnce(i32) -> std::io::Result<()> + Send>>,
    ) -> Result<Userfaultfd, RestoreError> {
        let t0 = Instant::now();
        let uffd = forks
            .recv_timeout(FORK_UFFD_WAIT)
            .map_err(|_| RestoreError::Channel("the fork's userfaultfd never arrived".into()))?;
        let uffd_us = t0.elapsed().as_micros() as u64;
        child.wait_for_event_stop().map_err(RestoreError::Trace)?;
        // The batch replaces the shared mappings; registered, that would block the child on
        // an unmap event nobody reads yet. They are registered again once replaced.
        for &(start, len) in &self.shared {
            uffd.unregister(start, len)
                .map_err(|source| RestoreError::Step {
                    step: format!("unregister shared memory {start:#x}+{len:#x}"),
                    source,
                })?;
        }
        let raw = [
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
        ];
        fdpass::send(self.spawned.chan.as_raw_fd(), b"s", &raw)
            .map_err(|e| RestoreError::Channel(e.to_string()))?;
        drop(stdio);

        let mut regs = child.regs().map_err(RestoreError::Trace)?;
        regs.rip = self.at;
        regs.rdi = self.batch_at;
        regs.rsi = self.batch_labels.len() as u64;
        regs.orig_rax = u64::MAX;
        child.set_regs(&regs).map_err(RestoreError::Trace)?;
        child.cont().map_err(RestoreError::Trace)?;
        match child.wait().map_err(RestoreError::Trace)? {
            Stop::Signal(libc::SIGTRAP) => {}
            other => return Err(RestoreError::Died(format!("{other:?}"))),
        }
        build::check_batch(child, &self.batch_labels)?;
        let batch_us = t0.elapsed().as_micros() as u64;
        if let Some(before_run) = before_run {
            before_run(child.pid()).map_err(|source| RestoreError::Step {
                step: "put the child into its container's cgroup".into(),
                source,
            })?;
        }
        let joined_us = t0.elapsed().as_micros() as u64;
        for &(start, len) in &self.shared {
            uffd.register(start, len)
                .map_err(|source| RestoreError::Step {
                    step: format!("register shared memory {start:#x}+{len:#x}"),
                    source,
                })?;
        }
        let insn = self.at + trampoline::syscall_offset();
        child
            .syscall(insn, libc::SYS_munmap, [self.at, self.size, 0, 0, 0, 0])
            .map_err(RestoreError::Trace)?;
        child
            .set_regs(&self.seed_regs)
            .map_err(RestoreError::Trace)?;
        tracing::debug!(
            pid = child.pid(),
            uffd_us,
            batch_us,
            joined_us,
            total_us = t0.elapsed().as_micros() as u64,
            "child started"
        );
        Ok(uffd)
    }

    /// Shared anonymous ranges, which each child maps afresh (pending from the seed again).
    pub fn shared_ranges(&self) -> &[(u64, u64)] {
        &self.shared
    }

    /// Kills and reaps the replica; its children live on with what they have.
    pub fn kill(self) {
        self.spawned.kill();
    }
}

/// Pages of a replica: its own resident size in pages (from /proc/PID/statm).
pub fn resident_pages(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mitosis_sys::PAGE_SIZE;

    #[test]
    fn child_batch_layout() {
        let maps = vec![super::super::MapStep {
            start: 0x1000_0000,
            len: 2 * PAGE_SIZE,
            prot: 3,
            flags: (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64,
            file: None,
            offset: 0,
        }];
        let (bytes, labels) = child_batch(0x5000_0000, 70, &maps, None);
        assert_eq!(labels.len(), 4);
        assert_eq!(bytes.len() as u64, 4 * RECORD + MSG_AREA);
        let word = |i: usize| u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        // recvmsg(70, msghdr right after the records, 0)
        assert_eq!(word(7), libc::SYS_recvmsg as u64);
        assert_eq!(word(8), 70);
        let msg = 0x5000_0000 + 4 * RECORD;
        assert_eq!(word(9), msg);
        // msghdr.msg_iov points at the iovec, whose base is the byte after it.
        let m = (4 * RECORD / 8) as usize;
        assert_eq!(word(m + 2), msg + 56);
        assert_eq!(word(m + 5), 32);
        assert_eq!(word(m + 7), msg + 72);
        // The shared mapping is replaced in place.
        assert_eq!(word(21), libc::SYS_mmap as u64);
        assert_eq!(word(22), 0x1000_0000);
    }
}
