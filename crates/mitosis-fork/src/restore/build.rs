//! Building a replica: start `mitosis-stub`, let it open files, then replace its address space
//! with the seed's layout.
//!
//! Runs on the daemon's tracer thread: the stub is traced from spawn until it is let go.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use mitosis_sys::pidfd;
use mitosis_sys::ptrace::{self, Stop, Tracee};
use mitosis_sys::uffd::{self, Userfaultfd};
use mitosis_sys::{PAGE_SIZE, fdpass};
use mitosis_transport::frame;
use thiserror::Error;

use super::plan::Plan;
use super::protocol::{CHANNEL_FD, Go, Ready, Setup};
use super::trampoline::{self, Record};
use crate::procfs;

/// Events the fault handler follows so the child's own mremap/madvise/munmap/fork stay correct.
pub const UFFD_FEATURES: u64 = uffd::FEATURE_EVENT_FORK
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP;

const ARCH_MAP_VDSO_64: u64 = 0x2003;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
/// Top of the 47-bit user address space.
const USER_TOP: u64 = 0x7fff_ffff_f000;

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("starting the stub {0}: {1}")]
    Spawn(String, io::Error),
    #[error("talking to the stub: {0}")]
    Channel(String),
    #[error("the stub could not prepare: {0}")]
    Stub(String),
    #[error("restore step `{step}` failed: {source}")]
    Step { step: String, source: io::Error },
    #[error("tracing the child: {0}")]
    Trace(io::Error),
    #[error("no free address for the trampoline")]
    NoRoom,
    #[error("the child died during restore: {0}")]
    Died(String),
}

/// A stub just started, traced, with its channel.
pub(crate) struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub tracee: Tracee,
    pub chan: UnixStream,
}

impl Spawned {
    /// Kills and reaps the stub (it is our child).
    pub fn kill(self) {
        let _ = pidfd::send_signal(&self.pidfd, libc::SIGKILL);
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        );
    }
}

/// Starts the stub (stdio on /dev/null: a replica has none) and seizes it. It waits for its
/// setup, which says where it works.
pub(crate) fn spawn(stub: &Path) -> Result<Spawned, RestoreError> {
    let (chan, theirs) =
        UnixStream::pair().map_err(|e| RestoreError::Spawn("socketpair".into(), e))?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(stub);
    cmd.env_clear()
        // The stub must not register rseq: the child registers the seed's area instead.
        .env("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
        .current_dir("/");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe system calls (dup2, prctl) on values captured by copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(their_fd, CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // If the daemon dies, its children die too: they would otherwise lose their pages.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| RestoreError::Spawn(stub.display().to_string(), e))?;
    drop(theirs);
    let pid = child.id() as i32;
    let pidfd = pidfd::open(pid).map_err(RestoreError::Trace)?;
    let tracee = match Tracee::seize(pid, ptrace::exit_kill_options()) {
        Ok(t) => t,
        Err(e) => {
            let _ = pidfd::send_signal(&pidfd, libc::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            return Err(RestoreError::Trace(e));
        }
    };
    Ok(Spawned {
        pid,
        pidfd,
        tracee,
        chan,
    })
}

/// The stub after its address space was replaced by the seed's: still stopped, still holding
/// the trampoline at `at` (`size` bytes).
pub(crate) struct Laid {
    pub uffd: Userfaultfd,
    pub at: u64,
    pub size: u64,
    /// Where `extra` landed in the data area.
    pub extra_at: u64,
}

/// Data a replica appends to the trampoline's data area, built once `at` is known.
pub(crate) type Extra<'a> = &'a dyn Fn(u64) -> Vec<u8>;

/// Runs the trampoline in the stub and sets what must be there before the seed's code runs:
/// lazy ranges registered, FPU state and rseq set. The seed's pages come after, before the
/// first fork. The stub
/// becomes a replica: it keeps its channel, closes its stdio, and carries `extra`.
pub(crate) fn lay_out(
    plan: &Plan,
    spawned: &mut Spawned,
    extra: Extra,
) -> Result<Laid, RestoreError> {
    let Spawned {
        pid, tracee, chan, ..
    } = spawned;
    let pid = *pid;
    let chan_err = |e: &dyn std::fmt::Display| RestoreError::Channel(e.to_string());
    let setup = Setup {
        work_fd_base: plan.work_fd_base,
        root: plan.root.as_ref().map(|r| r.to_string_lossy().into_owned()),
        cwd: plan.cwd.clone(),
        opens: plan.opens.clone(),
    };
    chan.write_all(&frame::encode(&setup))
        .map_err(|e| chan_err(&e))?;
    let (ready, fds) = recv_frame_with_fds(chan).map_err(|e| chan_err(&e))?;
    let opened = match ready {
        Ready::Opened(fds) => fds,
        Ready::Failed(why) => return Err(RestoreError::Stub(why)),
    };
    let uffd = Userfaultfd::from_owned(
        fds.into_iter()
            .next()
            .ok_or_else(|| chan_err(&"no userfaultfd"))?,
    );
    uffd.handshake(UFFD_FEATURES)
        .map_err(|e| RestoreError::Step {
            step: "userfaultfd handshake".into(),
            source: e,
        })?;

    // Place the trampoline where neither the stub nor the seed has anything.
    let code = trampoline::code();
    let extra_len = extra(0).len() as u64;
    let (_, labels, data_len) = records_for(plan, &opened, 0, 0);
    let data_len = data_len.next_multiple_of(8) + extra_len;
    let size = PAGE_SIZE + data_len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let own = procfs::parse_maps(
        &std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(RestoreError::Trace)?,
    )
    .map_err(|e| chan_err(&e))?;
    let taken: Vec<(u64, u64)> = own
        .iter()
        .map(|m| (m.start, m.end))
        .chain(plan.maps.iter().map(|m| (m.start, m.start + m.len)))
        .chain([(plan.vdso_block, plan.vdso_block + 64 * PAGE_SIZE)])
        .collect();
    let at = (1u64..4096)
        .map(|i| i << 20)
        .find(|&a| taken.iter().all(|&(s, e)| a + size <= s || a >= e))
        .ok_or(RestoreError::NoRoom)?;
    let (records, _, _) = records_for(plan, &opened, at, at + size);
    debug_assert_eq!(records.len(), labels.len());
    let mut data = encode_data(plan, &records, at + PAGE_SIZE);
    data.resize(data.len().next_multiple_of(8), 0);
    let extra_at = at + PAGE_SIZE + data.len() as u64;
    data.extend(extra(extra_at));
    let go = Go {
        at,
        code: code.to_vec(),
        data,
        records: records.len() as u64,
    };
    chan.write_all(&frame::encode(&go))
        .map_err(|e| chan_err(&e))?;

    // The stub now unmaps itself and rebuilds the seed's layout; it stops on int3.
    match tracee.wait().map_err(RestoreError::Trace)? {
        Stop::Signal(libc::SIGTRAP) => {}
        other => {
            let why = read_failure(chan).unwrap_or_else(|| format!("{other:?}"));
            return Err(RestoreError::Died(why));
        }
    }
    check_batch(tracee, &labels)?;

    let step = |step: &str| {
        let step = step.to_string();
        move |source| RestoreError::Step { step, source }
    };
    for &(start, len) in &plan.lazy_ranges {
        uffd.register(start, len)
            .map_err(step(&format!("register {start:#x}+{len:#x}")))?;
    }
    // Pages the seed's threads touch at once that the seed never had: zero-filled now, so no
    // child faults on them before its fault path runs. Pages outside the lazy ranges are not
    // ours to fill: that is fine. The seed's own pages come with the bootstrap pages.
    for &page in &plan.hot {
        let _ = uffd.zeropage(page, PAGE_SIZE);
    }
    Ok(Laid {
        uffd,
        at,
        size,
        extra_at,
    })
}

/// Loads the main thread's FPU state and signal mask into the replica and registers its rseq
/// area. Needs the seed's pages in place: the kernel writes to the rseq area at once.
pub(crate) fn load_main_thread(
    tracee: &mut Tracee,
    main: &mitosis_descriptor::Thread,
    at: u64,
) -> Result<(), RestoreError> {
    let step = |step: &str| {
        let step = step.to_string();
        move |source| RestoreError::Step { step, source }
    };
    tracee
        .set_xstate(&main.xstate)
        .map_err(step("load FPU state"))?;
    tracee
        .set_sigmask(main.sigmask)
        .map_err(step("set the signal mask"))?;
    let insn = at + trampoline::syscall_offset();
    if let Some(r) = main.rseq {
        let ret = tracee
            .syscall(
                insn,
                libc::SYS_rseq,
                [r.pointer, r.size as u64, 0, r.signature as u64, 0, 0],
            )
            .map_err(RestoreError::Trace)?;
        if ret.ret < 0 {
            return Err(RestoreError::Step {
                step: "register rseq".into(),
                source: io::Error::from_raw_os_error(-ret.ret as i32),
            });
        }
    }
    Ok(())
}

/// After a trampoline batch stopped on int3: the failed call's label, if one failed.
pub(crate) fn check_batch(tracee: &Tracee, labels: &[String]) -> Result<(), RestoreError> {
    let regs = tracee.regs().map_err(RestoreError::Trace)?;
    if regs.r12 != 0 {
        let index = labels.len() - regs.r12 as usize;
        let errno = -(regs.rax as i64) as i32;
        return Err(RestoreError::Step {
            step: labels[index].clone(),
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(())
}

/// The trampoline's system calls, with a label for each (for error messages).
/// Pointers into the data area are computed from `at`; sizes do not depend on it.
fn records_for(plan: &Plan, fds: &[i32], at: u64, end: u64) -> (Vec<Record>, Vec<String>, u64) {
    let mut recs: Vec<Record> = Vec::new();
    let mut labels = Vec::new();
    let mut push = |r: Record, l: String| {
        recs.push(r);
        labels.push(l)
    };
    push(
        [libc::SYS_munmap as u64, 0, at, 0, 0, 0, 0],
        "unmap the stub below the trampoline".into(),
    );
    push(
        [
            libc::SYS_munmap as u64,
            end,
            USER_TOP.saturating_sub(end),
            0,
            0,
            0,
            0,
        ],
        "unmap the stub above the trampoline".into(),
    );
    for m in &plan.maps {
        let fd = m.file.map_or(u64::MAX, |i| fds[i] as u64);
        let flags = m.flags | libc::MAP_FIXED_NOREPLACE as u64;
        push(
            [
                libc::SYS_mmap as u64,
                m.start,
                m.len,
                m.prot,
                flags,
                fd,
                m.offset,
            ],
            format!("map {:#x}-{:#x}", m.start, m.start + m.len),
        );
    }
    push(
        [
            libc::SYS_arch_prctl as u64,
            ARCH_MAP_VDSO_64,
            plan.vdso_block,
            0,
            0,
            0,
            0,
        ],
        "place the vDSO".into(),
    );
    // Everything so far plus the records below precede the mm map in the data area.
    let n_fixed = plan.maps.len() as u64 + 3 + 3;
    let mm_map = at + PAGE_SIZE + n_fixed * 56;
    push(
        [
            libc::SYS_prctl as u64,
            PR_SET_MM,
            PR_SET_MM_MAP,
            mm_map,
            MM_MAP_LEN,
            0,
            0,
        ],
        "set the mm fields".into(),
    );
    // A replica keeps its channel (at exactly work_fd_base) and no stdio: each child it forks
    // receives its own stdio on the channel, as fds 0-2.
    let first_closed = plan.work_fd_base as u64 + 1;
    push(
        [
            libc::SYS_close_range as u64,
            first_closed,
            u32::MAX as u64,
            0,
            0,
            0,
            0,
        ],
        "close the stub's files".into(),
    );
    push(
        [libc::SYS_close_range as u64, 0, 2, 0, 0, 0, 0],
        "close the stub's stdio".into(),
    );
    let _ = plan.exe;
    let data_len = n_fixed * 56 + MM_MAP_LEN + plan.auxv.len() as u64 * 8;
    (recs, labels, data_len)
}

const MM_MAP_LEN: u64 = 104;

/// Lays out the data area: records, then `struct prctl_mm_map`, then the auxv words.
fn encode_data(plan: &Plan, records: &[Record], data_at: u64) -> Vec<u8> {
    let mut out: Vec<u8> = records
        .iter()
        .flatten()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let auxv_at = data_at + out.len() as u64 + MM_MAP_LEN;
    let mm = &plan.mm;
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ] {
        out.extend_from_slice(&w.to_ne_bytes());
    }
    out.extend_from_slice(&((plan.auxv.len() * 8) as u32).to_ne_bytes());
    // exe_fd: -1 keeps the stub's; replacing it needs the fd of the identical executable.
    out.extend_from_slice(&u32::MAX.to_ne_bytes());
    for w in &plan.auxv {
        out.extend_from_slice(&w.to_ne_bytes());
    }
    out
}

/// Reads one frame that may carry descriptors.
fn recv_frame_with_fds(chan: &mut UnixStream) -> io::Result<(Ready, Vec<OwnedFd>)> {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(msg) = frame::try_decode(&buf).map_err(io::Error::other)? {
            return Ok((msg, fds));
        }
        let (n, mut got) = fdpass::recv(chan.as_raw_fd(), &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stub exited",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        fds.append(&mut got);
    }
}

/// A failure the stub reported before it died, if any.
fn read_failure(chan: &mut UnixStream) -> Option<String> {
    chan.set_nonblocking(true).ok()?;
    match recv_frame_with_fds(chan).ok()? {
        (Ready::Failed(why), _) => Some(why),
        _ => None,
    }
}
