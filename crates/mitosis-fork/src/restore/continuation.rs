//! What each child gets at fork time, because it names the child's own ids or must not fire
//! before the child runs: the seed's pending signals (re-queued with their siginfo, the
//! process's and each thread's), its interval timers and its POSIX timers (with their ids),
//! and its exited, unreaped children.

use mitosis_descriptor::{IntervalTimer, PendingSignal, PosixTimer, ProcessState, Thread, Zombie};
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::ptrace::Tracee;

use super::RestoreError;
use super::batch::{Batch, Placed};
use super::trampoline;

const NANOS: u64 = 1_000_000_000;
/// `prctl(PR_TIMER_CREATE_RESTORE_IDS, ON/OFF)`: timer_create takes the id it is given.
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const SIGEVENT_LEN: usize = 64;

/// The seed's state a child re-creates for itself before it runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Continuation {
    process_pending: Vec<PendingSignal>,
    itimers: Vec<IntervalTimer>,
    timers: Vec<PosixTimer>,
    /// Each thread's own pending signals and signal mask, the main thread first.
    threads: Vec<(Vec<PendingSignal>, u64)>,
    zombies: Vec<Zombie>,
}

impl Continuation {
    pub fn of(process: &ProcessState, threads: &[Thread]) -> Self {
        Continuation {
            process_pending: process.pending.clone(),
            itimers: process.itimers.clone(),
            timers: process.posix_timers.clone(),
            threads: threads
                .iter()
                .map(|t| (t.pending.clone(), t.sigmask))
                .collect(),
            zombies: process.zombies.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.process_pending.is_empty()
            && self.itimers.is_empty()
            && self.timers.is_empty()
            && self.threads.iter().all(|(p, _)| p.is_empty())
            && self.zombies.is_empty()
    }
}

/// A pid or tid as the child's own pid namespace numbers it (the last of `NSpid`).
pub(super) fn ns_id(tid: i32) -> Result<i32, RestoreError> {
    mitosis_sys::task::own_ns_id(tid).map_err(|source| RestoreError::Step {
        step: format!("read the namespace id of {tid}"),
        source,
    })
}

/// (seconds, sub-second units) words of a time in nanoseconds.
fn split(ns: u64, unit: u64) -> [u64; 2] {
    [ns / NANOS, (ns % NANOS) / unit]
}

/// The main thread's calls: timers, then its own and the process's signals.
fn main_batch(c: &Continuation, tids: &[i32]) -> Batch {
    let mut b = Batch::default();
    let tgid = tids[0];
    if !c.zombies.is_empty() {
        // The SIGCHLD their exits raised (blocked meanwhile): the seed's own, if it had one
        // pending, is queued again below.
        let set = b.bytes(&(1u64 << (libc::SIGCHLD - 1)).to_ne_bytes());
        let now = b.bytes(&[0; 16]);
        b.call_expecting(
            libc::SYS_rt_sigtimedwait,
            &[set, 0u64.into(), now, 8u64.into()],
            libc::SIGCHLD as u64,
            "take the SIGCHLD of the exited children made again",
        );
    }
    for t in &c.itimers {
        // Never 0 (that would disarm it): at least one microsecond.
        let [vs, vus] = split(t.value_ns.max(1000), 1000);
        let [is, ius] = split(t.interval_ns, 1000);
        let v = b.words(vec![is.into(), ius.into(), vs.into(), vus.into()]);
        b.call(
            libc::SYS_setitimer,
            &[(t.which as u64).into(), v, 0u64.into()],
            format!("arm interval timer {}", t.which),
        );
    }
    if !c.timers.is_empty() {
        b.call_expecting(
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS.into(), 1u64.into()],
            0,
            "let timer_create take the seed's timer ids",
        );
        for t in &c.timers {
            // struct sigevent: value, signo, notify, then the thread id (SIGEV_THREAD_ID).
            let mut ev = vec![0u8; SIGEVENT_LEN];
            ev[..8].copy_from_slice(&t.value.to_ne_bytes());
            ev[8..12].copy_from_slice(&(t.signal as i32).to_ne_bytes());
            ev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
            ev[16..20].copy_from_slice(&tids[t.thread as usize].to_ne_bytes());
            let ev = b.bytes(&ev);
            let id = b.bytes(&t.id.to_ne_bytes());
            b.call_expecting(
                libc::SYS_timer_create,
                &[t.clock.into(), ev, id],
                0,
                format!("create POSIX timer {}", t.id),
            );
        }
        b.call_expecting(
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS.into(), 0u64.into()],
            0,
            "let timer_create choose timer ids again",
        );
        for t in c.timers.iter().filter(|t| t.value_ns != 0) {
            let [is, ins] = split(t.interval_ns, 1);
            let [vs, vns] = split(t.value_ns, 1);
            let spec = b.words(vec![is.into(), ins.into(), vs.into(), vns.into()]);
            b.call_expecting(
                libc::SYS_timer_settime,
                &[(t.id as u64).into(), 0u64.into(), spec, 0u64.into()],
                0,
                format!("arm POSIX timer {}", t.id),
            );
        }
    }
    signal_calls(&mut b, &c.threads[0].0, tgid, tgid);
    for s in &c.process_pending {
        let info = b.bytes(&s.info);
        b.call_expecting(
            libc::SYS_rt_sigqueueinfo,
            &[tgid.into(), (s.signal as u64).into(), info],
            0,
            format!("queue signal {} for the process", s.signal),
        );
    }
    b
}

/// Re-queues a thread's own signals; run by that thread (the kernel lets a thread queue a
/// signal with a kernel or kill() origin only to itself).
fn signal_calls(b: &mut Batch, pending: &[PendingSignal], tgid: i32, tid: i32) {
    for s in pending {
        let info = b.bytes(&s.info);
        b.call_expecting(
            libc::SYS_rt_tgsigqueueinfo,
            &[tgid.into(), tid.into(), (s.signal as u64).into(), info],
            0,
            format!("queue signal {} for thread {tid}", s.signal),
        );
    }
}

/// Runs the continuation in a stopped child: `child` its main thread, `threads` the others
/// (in the seed's order, stopped with their seed registers set), the trampoline at `at`.
/// Every thread blocks every signal meanwhile, so none is delivered while we trace it; its
/// seed mask comes back after.
pub(crate) fn run(
    c: &Continuation,
    child: &mut Tracee,
    threads: &mut [Tracee],
    at: u64,
) -> Result<(), RestoreError> {
    if c.is_empty() {
        return Ok(());
    }
    let mut tids = vec![ns_id(child.pid())?];
    for t in threads.iter() {
        tids.push(ns_id(t.pid())?);
    }
    let mut batches = vec![main_batch(c, &tids)];
    for (i, (pending, _)) in c.threads.iter().enumerate().skip(1) {
        let mut b = Batch::default();
        signal_calls(&mut b, pending, tids[0], tids[i]);
        batches.push(b);
    }
    let len: u64 = batches.iter().map(Batch::len).sum();
    let insn = at + trampoline::syscall_offset();
    // Room for the zombies' clone_args after the calls.
    let size = (len + 128).next_multiple_of(mitosis_sys::PAGE_SIZE);
    let step = |step: &str| {
        let step = step.to_string();
        move |source| RestoreError::Step { step, source }
    };
    let mapped = child
        .syscall(
            insn,
            libc::SYS_mmap,
            [
                0,
                size,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
        .map_err(RestoreError::Trace)?
        .ret;
    if mapped < 0 {
        return Err(step("map the continuation's calls")(
            std::io::Error::from_raw_os_error(-mapped as i32),
        ));
    }
    let mem = RemoteMemory::open(child.pid(), true).map_err(step("open the child's memory"))?;
    let mut next = mapped as u64;
    let mut placed = Vec::new();
    for b in &batches {
        mem.write_all(next, &b.encode(next))
            .map_err(step("write the continuation's calls"))?;
        placed.push(Placed {
            at: next,
            labels: b.labels(),
        });
        next += b.len();
    }
    for (i, (t, p)) in threads.iter_mut().zip(&placed[1..]).enumerate() {
        let saved = t.regs().map_err(RestoreError::Trace)?;
        t.set_sigmask(u64::MAX)
            .map_err(step("block every signal"))?;
        super::replica::run_batch(t, at, p)?;
        t.set_regs(&saved).map_err(RestoreError::Trace)?;
        t.set_sigmask(c.threads[i + 1].1)
            .map_err(step("set the signal mask"))?;
    }
    child
        .set_sigmask(u64::MAX)
        .map_err(step("block every signal"))?;
    let clone_args = next.next_multiple_of(8);
    for z in &c.zombies {
        super::zombies::make(child, insn, &mem, clone_args, z)?;
    }
    super::replica::run_batch(child, at, &placed[0])?;
    child
        .syscall(insn, libc::SYS_munmap, [mapped as u64, size, 0, 0, 0, 0])
        .map_err(RestoreError::Trace)?;
    child
        .set_sigmask(c.threads[0].1)
        .map_err(step("set the signal mask"))
}
