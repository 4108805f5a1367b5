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

use mitosis_frame as frame;
use mitosis_sys::PAGE_SIZE;
use mitosis_sys::pidfd;
use mitosis_sys::ptrace::{self, Stop, Tracee};
use mitosis_sys::uffd::{self, Userfaultfd};
use thiserror::Error;

use super::batch::RECORD_LEN;
use super::plan::Plan;
use super::protocol::{self, CHANNEL_FD, Go, Ready, Setup};
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
    #[error("restore step `{step}` came short: {got} bytes")]
    Short { step: String, got: u64 },
    #[error("tracing the child: {0}")]
    Trace(io::Error),
    #[error("no free address for the trampoline")]
    NoRoom,
    #[error("the child died during restore: {0}")]
    Died(String),
}

/// A stub started and waiting for its setup, not yet traced.
pub(crate) struct Started {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub chan: UnixStream,
}

impl Started {
    /// Kills and reaps the stub (it is our child).
    pub fn kill(self) {
        kill_and_reap(&self.pidfd, self.pid);
    }

    /// Traces the stub from the calling thread, which must be the one that builds with it.
    pub fn seize(self) -> Result<Spawned, RestoreError> {
        match Tracee::seize(self.pid, ptrace::exit_kill_options()) {
            Ok(tracee) => Ok(Spawned {
                pid: self.pid,
                pidfd: self.pidfd,
                tracee,
                chan: self.chan,
            }),
            Err(e) => {
                self.kill();
                Err(RestoreError::Trace(e))
            }
        }
    }
}

/// A stub traced, with its channel.
pub(crate) struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub tracee: Tracee,
    pub chan: UnixStream,
}

impl Spawned {
    /// Kills and reaps the stub (it is our child).
    pub fn kill(self) {
        kill_and_reap(&self.pidfd, self.pid);
    }
}

fn kill_and_reap(pidfd: &OwnedFd, pid: i32) {
    let _ = pidfd::send_signal(pidfd, libc::SIGKILL);
    let _ = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::__WALL),
    );
}

/// Starts the stub (stdio on /dev/null: a replica has none). It waits for its setup, which
/// says where it works; if the daemon dies first, it reads end-of-file and exits. It dies with
/// the thread that started it (PR_SET_PDEATHSIG).
pub(crate) fn start(stub: &Path) -> Result<Started, RestoreError> {
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
    Ok(Started { pid, pidfd, chan })
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

/// Pages the stub reads itself, straight into the seed's layout, before anything is
/// registered: `runs` back to back on the connected socket `fd` (the bootstrap's stream).
/// The kernel copies them once, from the socket into the new pages.
#[derive(Debug, Clone, Copy)]
pub struct StreamedPages<'a> {
    pub fd: i32,
    pub runs: &'a [(u64, u32)],
}

/// Runs the trampoline in the stub and sets what must be there before the seed's code runs:
/// lazy ranges registered, FPU state and rseq set. The seed's pages come after, before the
/// first fork. The stub
/// becomes a replica: it keeps its channel, closes its stdio, and carries `extra`.
pub(crate) fn lay_out(
    plan: &Plan,
    spawned: &mut Spawned,
    extra: Extra,
    pages: Option<StreamedPages>,
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
    let (ready, fds) = protocol::recv_with_fds(chan).map_err(|e| chan_err(&e))?;
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
    // The stub takes the stream's socket on the first number clear of its own work fds
    // (channel, opened files, userfaultfd); the trampoline closes it with them.
    let stub_pages = pages.map(|p| StreamedPages {
        fd: opened.iter().copied().fold(plan.work_fd_base, i32::max) + 2,
        runs: p.runs,
    });
    let Records {
        labels, data_len, ..
    } = records_for(plan, &opened, stub_pages, 0, 0);
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
    let Records { records, tail, .. } = records_for(plan, &opened, stub_pages, at, at + size);
    debug_assert_eq!(records.len(), labels.len());
    let mut data = encode_data(plan, &records, at + PAGE_SIZE);
    data.extend(tail.iter().flat_map(|w| w.to_ne_bytes()));
    data.resize(data.len().next_multiple_of(8), 0);
    let extra_at = at + PAGE_SIZE + data.len() as u64;
    data.extend(extra(extra_at));
    let go = Go {
        at,
        code: code.to_vec(),
        data,
        records: records.len() as u64,
        pages_fd: stub_pages.map(|p| p.fd),
    };
    let handed: Vec<i32> = pages.iter().map(|p| p.fd).collect();
    protocol::send_with_fds(chan, &go, &handed).map_err(|e| chan_err(&e))?;

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
    if regs.r12 == 0 {
        return Ok(());
    }
    let step = labels[labels.len() - regs.r12 as usize].clone();
    let ret = regs.rax as i64;
    Err(if (-4095..0).contains(&ret) {
        RestoreError::Step {
            step,
            source: io::Error::from_raw_os_error(-ret as i32),
        }
    } else {
        // Not an errno: a result other than the one the record expects.
        RestoreError::Short {
            step,
            got: regs.rax,
        }
    })
}

/// The trampoline's system calls, with a label for each (for error messages).
/// Pointers into the data area are computed from `at`; sizes do not depend on it.
fn records_for(
    plan: &Plan,
    fds: &[i32],
    pages: Option<StreamedPages>,
    at: u64,
    end: u64,
) -> Records {
    let mut recs: Vec<Record> = Vec::new();
    let mut labels = Vec::new();
    let mut push = |r: Record, l: String| {
        recs.push(r);
        labels.push(l);
        recs.len() - 1
    };
    let call = |nr: i64, args: [u64; 6]| -> Record {
        let mut r = [0; 8];
        r[0] = nr as u64;
        r[1..7].copy_from_slice(&args);
        r[7] = trampoline::ANY;
        r
    };
    push(
        call(libc::SYS_munmap, [0, at, 0, 0, 0, 0]),
        "unmap the stub below the trampoline".into(),
    );
    push(
        call(
            libc::SYS_munmap,
            [end, USER_TOP.saturating_sub(end), 0, 0, 0, 0],
        ),
        "unmap the stub above the trampoline".into(),
    );
    let runs = pages.map_or(&[][..], |p| p.runs);
    // Mappings the streamed pages land in are writable until the pages are in.
    let mut reprotect = Vec::new();
    for m in &plan.maps {
        let fd = m.file.map_or(u64::MAX, |i| fds[i] as u64);
        let flags = m.flags | libc::MAP_FIXED_NOREPLACE as u64;
        let mut prot = m.prot;
        if prot & libc::PROT_WRITE as u64 == 0 && overlaps(runs, m.start, m.start + m.len) {
            prot |= (libc::PROT_READ | libc::PROT_WRITE) as u64;
            reprotect.push(m);
        }
        push(
            call(libc::SYS_mmap, [m.start, m.len, prot, flags, fd, m.offset]),
            format!("map {:#x}-{:#x}", m.start, m.start + m.len),
        );
    }
    // One recvmsg scatters the stream over up to IOV_MAX runs: each byte is copied once,
    // from the socket to its page, in a handful of calls.
    let groups: Vec<&[(u64, u32)]> = runs.chunks(IOV_MAX).collect();
    let mut receives = Vec::with_capacity(groups.len());
    let fd = pages.map_or(0, |p| p.fd as u64);
    for group in &groups {
        let bytes: u64 = group.iter().map(|r| r.1 as u64 * PAGE_SIZE).sum();
        let mut r = call(
            libc::SYS_recvmsg,
            [fd, 0, libc::MSG_WAITALL as u64, 0, 0, 0],
        );
        r[7] = bytes;
        let (first, last) = (group[0], group[group.len() - 1]);
        let end = last.0 + last.1 as u64 * PAGE_SIZE;
        receives.push(push(
            r,
            format!("receive the seed's pages {:#x}-{end:#x}", first.0),
        ));
    }
    for m in reprotect {
        push(
            call(libc::SYS_mprotect, [m.start, m.len, m.prot, 0, 0, 0]),
            format!("protect {:#x}-{:#x}", m.start, m.start + m.len),
        );
    }
    push(
        call(
            libc::SYS_arch_prctl,
            [ARCH_MAP_VDSO_64, plan.vdso_block, 0, 0, 0, 0],
        ),
        "place the vDSO".into(),
    );
    // The mm map follows the records in the data area: its address is set once all are in.
    let set_mm = push(
        call(
            libc::SYS_prctl,
            [PR_SET_MM, PR_SET_MM_MAP, 0, MM_MAP_LEN, 0, 0],
        ),
        "set the mm fields".into(),
    );
    // A replica keeps its channel (at exactly work_fd_base) and no stdio: each child it forks
    // receives its own stdio on the channel, as fds 0-2. The page stream's socket goes too.
    let first_closed = plan.work_fd_base as u64 + 1;
    push(
        call(
            libc::SYS_close_range,
            [first_closed, u32::MAX as u64, 0, 0, 0, 0],
        ),
        "close the stub's files".into(),
    );
    push(
        call(libc::SYS_close_range, [0, 2, 0, 0, 0, 0]),
        "close the stub's stdio".into(),
    );
    let records_len = recs.len() as u64 * RECORD_LEN;
    recs[set_mm][3] = at + PAGE_SIZE + records_len;
    // After the mm map and the auxv: each recvmsg's msghdr, then all their iovecs.
    let tail_at = at + PAGE_SIZE + records_len + MM_MAP_LEN + plan.auxv.len() as u64 * 8;
    let mut iov_at = tail_at + groups.len() as u64 * MSGHDR_LEN;
    let mut tail: Vec<u64> = Vec::new();
    for (group, &i) in groups.iter().zip(&receives) {
        recs[i][2] = tail_at + tail.len() as u64 * 8;
        // name, namelen, iov, iovlen, control, controllen, flags.
        tail.extend([0, 0, iov_at, group.len() as u64, 0, 0, 0]);
        iov_at += group.len() as u64 * 16;
    }
    tail.extend(
        groups
            .iter()
            .flat_map(|g| g.iter())
            .flat_map(|&(addr, n)| [addr, n as u64 * PAGE_SIZE]),
    );
    Records {
        data_len: records_len + MM_MAP_LEN + plan.auxv.len() as u64 * 8 + tail.len() as u64 * 8,
        records: recs,
        labels,
        tail,
    }
}

/// The trampoline's calls and what its data area holds after them.
struct Records {
    records: Vec<Record>,
    /// A label per record, for error messages.
    labels: Vec<String>,
    /// Words that follow the auxv: the msghdrs and iovecs of the page stream's reads.
    tail: Vec<u64>,
    data_len: u64,
}

const MSGHDR_LEN: u64 = 56;
const IOV_MAX: usize = 1024;

/// Whether any of `runs` (sorted) has a page in `start..end`.
fn overlaps(runs: &[(u64, u32)], start: u64, end: u64) -> bool {
    let first = runs.partition_point(|&(a, n)| a + n as u64 * PAGE_SIZE <= start);
    runs.get(first).is_some_and(|&(a, _)| a < end)
}

const MM_MAP_LEN: u64 = 104;

/// Lays out the data area: records, then `struct prctl_mm_map`, then the auxv words (then
/// the records' tail).
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

/// A failure the stub reported before it died, if any.
fn read_failure(chan: &mut UnixStream) -> Option<String> {
    chan.set_nonblocking(true).ok()?;
    match protocol::recv_with_fds(chan).ok()? {
        (Ready::Failed(why), _) => Some(why),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::{self, MapStep};
    use super::*;

    fn map(start: u64, pages: u64, prot: i32) -> MapStep {
        MapStep {
            start,
            len: pages * PAGE_SIZE,
            prot: prot as u64,
            flags: (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            file: None,
            offset: 0,
            dont_fork: false,
            mem_file: false,
            locked: false,
        }
    }

    #[test]
    fn streamed_pages_are_read_in_place_then_protected() {
        let (ro, rw) = (libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE);
        let plan = plan::sample(
            vec![
                map(0x10000, 4, ro),
                map(0x20000, 4, rw),
                map(0x30000, 2, ro),
            ],
            &[],
        );
        // Three runs: two in the read-only mapping, one in the writable one; the other
        // read-only mapping gets none.
        let runs = [(0x10000, 1), (0x12000, 2), (0x21000, 1)];
        let pages = StreamedPages {
            fd: 77,
            runs: &runs,
        };
        let at = 0x4000_0000;
        let r = records_for(&plan, &[], Some(pages), at, at + 3 * PAGE_SIZE);
        assert_eq!(r.records.len(), r.labels.len());
        let calls = |nr: i64| r.records.iter().filter(move |c| c[0] == nr as u64);
        let mmaps: Vec<_> = calls(libc::SYS_mmap).map(|c| (c[1], c[3])).collect();
        let writable = (ro | libc::PROT_WRITE) as u64;
        assert_eq!(
            mmaps,
            [
                (0x10000, writable),
                (0x20000, rw as u64),
                (0x30000, ro as u64)
            ]
        );
        let protects: Vec<_> = calls(libc::SYS_mprotect).map(|c| (c[1], c[3])).collect();
        assert_eq!(protects, [(0x10000, ro as u64)]);

        // One recvmsg of all four pages, expecting exactly them; it comes after the maps and
        // before the protection goes back on.
        let position = |nr: i64| r.records.iter().position(|c| c[0] == nr as u64).unwrap();
        let recv = &r.records[position(libc::SYS_recvmsg)];
        assert!(
            position(libc::SYS_recvmsg)
                > r.records
                    .iter()
                    .rposition(|c| c[0] == libc::SYS_mmap as u64)
                    .unwrap()
        );
        assert!(position(libc::SYS_recvmsg) < position(libc::SYS_mprotect));
        assert_eq!(recv[1], 77);
        assert_eq!(recv[3], libc::MSG_WAITALL as u64);
        assert_eq!(recv[7], 4 * PAGE_SIZE);
        // Every other call takes any success.
        assert_eq!(
            calls(libc::SYS_mmap).map(|c| c[7]).max(),
            Some(trampoline::ANY)
        );

        // The msghdr is in the tail and points at the three iovecs after it.
        let tail_at = at + PAGE_SIZE + r.records.len() as u64 * RECORD_LEN + MM_MAP_LEN;
        assert_eq!(recv[2], tail_at);
        let msghdr = &r.tail[..7];
        assert_eq!((msghdr[2], msghdr[3]), (tail_at + MSGHDR_LEN, 3));
        assert_eq!(
            &r.tail[7..],
            [
                0x10000,
                PAGE_SIZE,
                0x12000,
                2 * PAGE_SIZE,
                0x21000,
                PAGE_SIZE
            ]
        );
        assert_eq!(
            r.data_len,
            r.records.len() as u64 * RECORD_LEN + MM_MAP_LEN + r.tail.len() as u64 * 8
        );
    }

    #[test]
    fn without_a_stream_nothing_is_read_or_reprotected() {
        let plan = plan::sample(vec![map(0x10000, 4, libc::PROT_READ)], &[]);
        let r = records_for(&plan, &[], None, 0x4000_0000, 0x4000_3000);
        assert!(r.tail.is_empty());
        assert!(
            r.records
                .iter()
                .all(|c| { c[0] != libc::SYS_recvmsg as u64 && c[0] != libc::SYS_mprotect as u64 })
        );
        assert_eq!(r.records[2][3], libc::PROT_READ as u64);
    }

    #[test]
    fn overlap_finds_runs_touching_a_range() {
        let runs = [(0x10000, 2), (0x20000, 1)];
        assert!(overlaps(&runs, 0x11000, 0x13000));
        assert!(!overlaps(&runs, 0x12000, 0x20000));
        assert!(overlaps(&runs, 0x12000, 0x20001));
        assert!(!overlaps(&runs, 0x21000, 0x30000));
        assert!(!overlaps(&[], 0, u64::MAX));
    }
}
