//! Stopping every thread of a seed and reading each one's state.

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use mitosis_descriptor::{AltStack, PendingSignal, RobustList, Rseq, Thread};
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::ptrace::{self, Tracee};
use mitosis_sys::task;
use nix::sys::ptrace::Options;

use crate::prepare::PrepareError;
use crate::regs::{RestartFor, regs_to_words, resume_point};

/// How long a thread may stay in uninterruptible sleep before prepare gives up on the seed.
const UNINTERRUPTIBLE_GRACE: Duration = Duration::from_millis(100);
const PR_GET_TID_ADDRESS: u64 = 40;
/// Below the x86_64 red zone (128 bytes): free scratch on any thread's stack.
pub(crate) const SCRATCH_BELOW_SP: u64 = 1024;

/// Every thread of a seed, seized and stopped; the main thread first.
pub struct Group {
    pub threads: Vec<Tracee>,
}

impl Group {
    pub fn main(&mut self) -> &mut Tracee {
        &mut self.threads[0]
    }

    /// Lets every thread go on (signals that arrived meanwhile are redelivered).
    pub fn release(self) {
        for t in self.threads {
            let _ = t.detach();
        }
    }
}

fn tasks(pid: i32) -> Result<BTreeSet<i32>, PrepareError> {
    crate::procfs::task_ids(pid).map_err(|_| PrepareError::NoSuchProcess(pid))
}

/// A task's state letter from /proc/PID/task/TID/stat ('R', 'S', 'D', ...).
fn state(pid: i32, tid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Refuses a seed another tracer holds or with a thread stuck in uninterruptible sleep (a
/// ptrace stop would wait for it without bound).
fn check(pid: i32, tids: &BTreeSet<i32>) -> Result<(), PrepareError> {
    for &tid in tids {
        let path = format!("/proc/{pid}/task/{tid}");
        if let Ok(Some(tracer)) = crate::procfs::tracer_pid_at(&path) {
            return Err(PrepareError::AlreadyTraced { pid, tid, tracer });
        }
        let since = Instant::now();
        while state(pid, tid) == Some('D') {
            if since.elapsed() > UNINTERRUPTIBLE_GRACE {
                return Err(PrepareError::Uninterruptible { pid, tid });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

/// Seizes `tid` with its seccomp filters suspended for our injected calls (a filter could
/// refuse them, or kill the seed). A kernel that cannot suspend them (no checkpoint/restore
/// support) still lets a thread without filters be traced.
fn seize(tid: i32, options: Options) -> std::io::Result<Tracee> {
    match Tracee::seize(tid, options | ptrace::suspend_seccomp()) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM)) => {
            let filtered = fs::read_to_string(format!("/proc/{tid}/status"))
                .map(|s| {
                    s.lines()
                        .any(|l| l.starts_with("Seccomp:") && !l.ends_with('0'))
                })
                .unwrap_or(true);
            if filtered {
                return Err(e);
            }
            Tracee::seize(tid, options)
        }
        other => other,
    }
}

/// Seizes and stops every thread of `pid`, including threads started meanwhile.
pub fn stop_all(pid: i32) -> Result<Group, PrepareError> {
    let first = tasks(pid)?;
    if !first.contains(&pid) {
        return Err(PrepareError::Unsupported {
            pid,
            what: "its main thread has exited".into(),
        });
    }
    check(pid, &first)?;
    let mut group = Group { threads: vec![] };
    let trace = |tid| move |source| PrepareError::Trace { pid: tid, source };
    let mut seen = BTreeSet::new();
    let mut todo = vec![pid];
    todo.extend(first.iter().filter(|&&t| t != pid));
    while !todo.is_empty() {
        for tid in todo.drain(..) {
            // The main thread follows the clone we inject; the others only stop.
            let options = if tid == pid {
                ptrace::seed_options()
            } else {
                Options::empty()
            };
            seen.insert(tid);
            let mut t = match seize(tid, options) {
                Ok(t) => t,
                // A thread that exited between the listing and now.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) && tid != pid => continue,
                Err(e) => {
                    group.release();
                    return Err(trace(tid)(e));
                }
            };
            match t.interrupt() {
                Ok(()) => group.threads.push(t),
                Err(_) if tid != pid => {
                    let _ = t.detach();
                }
                Err(e) => {
                    let _ = t.detach();
                    group.release();
                    return Err(trace(tid)(e));
                }
            }
        }
        todo = tasks(pid)?.difference(&seen).copied().collect();
    }
    Ok(group)
}

/// Reads one stopped thread's state. The injected calls that read its tid address and
/// alternate stack write to its stack below the red zone; its registers are put back after.
pub fn capture(
    pid: i32,
    t: &mut Tracee,
    mem: &RemoteMemory,
    insn: u64,
) -> Result<Thread, PrepareError> {
    let tid = t.pid();
    let inject = |what| {
        move |source| PrepareError::Inject {
            pid: tid,
            what,
            source,
        }
    };
    let regs = t.regs().map_err(inject("reading registers"))?;
    let xstate = t.xstate().map_err(inject("reading FPU state"))?;
    let sigmask = t.sigmask().map_err(inject("reading the signal mask"))?;
    let rseq = t
        .rseq()
        .map_err(inject("reading rseq registration"))?
        .map(|c| Rseq {
            pointer: c.abi_pointer,
            size: c.abi_size,
            signature: c.signature,
        });
    let (head, len) = task::robust_list(tid).map_err(inject("reading the robust futex list"))?;
    let scratch = (regs.rsp - SCRATCH_BELOW_SP) & !15;
    let tid_address = t
        .syscall(
            insn,
            libc::SYS_prctl,
            [PR_GET_TID_ADDRESS, scratch, 0, 0, 0, 0],
        )
        .map_err(inject("reading the tid address"))
        .and_then(|r| {
            // Kernels without checkpoint/restore support have no way to tell: keep none.
            if r.ret < 0 {
                return Ok(0);
            }
            read_word(mem, scratch).map_err(inject("reading the tid address"))
        });
    let altstack = t
        .syscall(insn, libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0])
        .map_err(inject("reading the alternate signal stack"))
        .and_then(|r| {
            if r.ret < 0 {
                return Ok(None);
            }
            let sp = read_word(mem, scratch).map_err(inject("reading the alternate stack"))?;
            let flags =
                read_word(mem, scratch + 8).map_err(inject("reading the alternate stack"))?;
            let size =
                read_word(mem, scratch + 16).map_err(inject("reading the alternate stack"))?;
            // SS_DISABLE: none set.
            Ok((flags as i32 & libc::SS_DISABLE == 0).then_some(AltStack {
                sp,
                size,
                flags: flags as i32 & !libc::SS_ONSTACK,
            }))
        });
    let timer_slack = t
        .syscall(
            insn,
            libc::SYS_prctl,
            [libc::PR_GET_TIMERSLACK as u64, 0, 0, 0, 0, 0],
        )
        .map_err(inject("reading the timer slack"));
    let pdeathsig = t
        .syscall(
            insn,
            libc::SYS_prctl,
            [libc::PR_GET_PDEATHSIG as u64, scratch, 0, 0, 0, 0],
        )
        .map_err(inject("reading the parent-death signal"))
        .and_then(|r| {
            if r.ret < 0 {
                return Ok(0);
            }
            read_word(mem, scratch).map_err(inject("reading the parent-death signal"))
        });
    let creds = super::creds::capture(pid, t, insn);
    // Whatever the injections did, the thread goes back to where it was.
    t.set_regs(&resume_point(&regs, RestartFor::SameTask))
        .map_err(inject("restoring registers"))?;
    let (creds, own_tid) = creds?;
    let tid_address = tid_address?;
    let tid_cache = tid_cache(mem, tid_address, regs.fs_base, own_tid);
    let pending = t
        .pending_signals(false)
        .map_err(inject("reading the pending signals"))?;
    let name = fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|n| n.trim_end_matches('\n').chars().take(15).collect())
        .unwrap_or_default();
    Ok(Thread {
        tid,
        name,
        regs: regs_to_words(&resume_point(&regs, RestartFor::OtherTask)),
        xstate,
        sigmask,
        rseq,
        robust_list: (head != 0).then_some(RobustList { head, len }),
        tid_address,
        tid_cache,
        own_tid,
        altstack: altstack?,
        in_syscall: regs.orig_rax as i64,
        creds,
        // A kernel that cannot say keeps the default.
        timer_slack_ns: timer_slack?.ret.try_into().unwrap_or(50_000),
        pdeathsig: pdeathsig? as u32 as u8,
        pending: pending_of(pending),
    })
}

/// Whether the process of stopped thread `t` is a child subreaper (process-wide, and not
/// inherited by fork, so read in the seed itself); the answer lands below its red zone.
pub fn child_subreaper(
    t: &mut Tracee,
    mem: &RemoteMemory,
    insn: u64,
) -> Result<bool, PrepareError> {
    let tid = t.pid();
    let inject = |source| PrepareError::Inject {
        pid: tid,
        what: "reading the child subreaper flag",
        source,
    };
    let regs = t.regs().map_err(inject)?;
    let scratch = (regs.rsp - SCRATCH_BELOW_SP) & !15;
    let asked = t.syscall(
        insn,
        libc::SYS_prctl,
        [libc::PR_GET_CHILD_SUBREAPER as u64, scratch, 0, 0, 0, 0],
    );
    t.set_regs(&resume_point(&regs, RestartFor::SameTask))
        .map_err(inject)?;
    if asked.map_err(inject)?.ret < 0 {
        return Ok(false);
    }
    Ok(read_word(mem, scratch).map_err(inject)? as u32 != 0)
}

/// Raw `siginfo_t`s as the descriptor keeps them (the number is their first word).
pub fn pending_of(raw: Vec<[u8; mitosis_sys::ptrace::SIGINFO_LEN]>) -> Vec<PendingSignal> {
    raw.into_iter()
        .map(|info| PendingSignal {
            signal: info[0],
            info: info.to_vec(),
        })
        .collect()
}

/// Where musl (x86_64) keeps a thread's id: `struct pthread`'s `tid`, after `self`, `dtv`,
/// `prev`, `next`, `sysinfo` and `canary`, at the thread pointer.
const MUSL_TID_OFFSET: u64 = 48;

/// Where the thread's runtime keeps its id (read from memory, not injected), or 0: glibc
/// keeps it at the tid address; musl keeps its thread-list lock there and the id in its
/// thread descriptor, which starts with a pointer to itself at the thread pointer. An
/// address that cannot be read holds nothing of the thread's.
fn tid_cache(mem: &RemoteMemory, tid_address: u64, fs_base: u64, own_tid: i32) -> u64 {
    let holds_tid = |at: u64| read_u32(mem, at).is_ok_and(|word| word as i32 == own_tid);
    if tid_address != 0 && holds_tid(tid_address) {
        return tid_address;
    }
    let musl_like = fs_base != 0
        && tid_address != 0
        && read_word(mem, fs_base).is_ok_and(|me| me == fs_base)
        && holds_tid(fs_base + MUSL_TID_OFFSET);
    if musl_like {
        fs_base + MUSL_TID_OFFSET
    } else {
        0
    }
}

fn read_u32(mem: &RemoteMemory, at: u64) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    mem.read_exact(at, &mut b)?;
    Ok(u32::from_ne_bytes(b))
}

fn read_word(mem: &RemoteMemory, at: u64) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    mem.read_exact(at, &mut b)?;
    Ok(u64::from_ne_bytes(b))
}
