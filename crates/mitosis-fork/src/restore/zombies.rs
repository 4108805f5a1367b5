//! Making a seed's exited, unreaped child again in a child: a process of the child's that
//! exits with the same status and is left for the child's wait() to reap.

use mitosis_descriptor::Zombie;
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::ptrace::Tracee;

use super::RestoreError;

/// clone3's flag: the new process starts with default signal handlers.
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
const PR_GET_DUMPABLE: u64 = 3;
const PR_SET_DUMPABLE: u64 = 4;

fn failed(step: &str, ret: i64) -> RestoreError {
    RestoreError::Step {
        step: step.into(),
        source: std::io::Error::from_raw_os_error(-ret as i32),
    }
}

/// Makes `z` again as a child of `child` (stopped, every signal blocked: the SIGCHLD stays
/// pending for the caller to take), and waits until it has exited. `args_at` is writable
/// memory of the child for clone3's arguments; `insn` a `syscall` instruction there.
pub(super) fn make(
    child: &mut Tracee,
    insn: u64,
    mem: &RemoteMemory,
    args_at: u64,
    z: &Zombie,
) -> Result<(), RestoreError> {
    let trace = RestoreError::Trace;
    let signal = z.status & 0x7f;
    // It shares the child's memory (CLONE_VM): a copy would stop the child on a userfaultfd
    // fork event nobody reads yet. So a fatal signal must not dump the shared memory's core:
    // the child is not dumpable meanwhile.
    let mut dumpable = None;
    if signal != 0 {
        let was = child
            .syscall(insn, libc::SYS_prctl, [PR_GET_DUMPABLE, 0, 0, 0, 0, 0])
            .map_err(trace)?
            .ret;
        if was == 1 {
            let r = child
                .syscall(insn, libc::SYS_prctl, [PR_SET_DUMPABLE, 0, 0, 0, 0, 0])
                .map_err(trace)?;
            if r.ret < 0 {
                return Err(failed("make the child undumpable for a moment", r.ret));
            }
            dumpable = Some(was as u64);
        }
    }
    // struct clone_args (version 0): flags, pidfd, child_tid, parent_tid, exit_signal,
    // stack, stack_size, tls.
    let args: Vec<u8> = [
        libc::CLONE_VM as u64 | CLONE_CLEAR_SIGHAND,
        0,
        0,
        0,
        libc::SIGCHLD as u64,
        0,
        0,
        0,
    ]
    .iter()
    .flat_map(|w| w.to_ne_bytes())
    .collect();
    mem.write_all(args_at, &args)
        .map_err(|source| RestoreError::Step {
            step: "write clone3's arguments".into(),
            source,
        })?;
    let r = child
        .syscall(
            insn,
            libc::SYS_clone3,
            [args_at, args.len() as u64, 0, 0, 0, 0],
        )
        .map_err(trace)?;
    let pid = match r.new_child {
        Some(pid) if r.ret > 0 => pid,
        _ => return Err(failed("start an exited child of the seed again", r.ret)),
    };
    let mut kid = Tracee::adopt(pid);
    if let Err(e) = finish(&mut kid, insn, z.status) {
        kid.kill();
        return Err(e);
    }
    kid.detach().map_err(trace)?;
    // Until it is a zombie (WNOWAIT leaves it one).
    let ns_pid = super::continuation::ns_id(pid)?;
    let flags = (libc::WEXITED | libc::WNOWAIT) as u64;
    let r = child
        .syscall(
            insn,
            libc::SYS_waitid,
            [libc::P_PID as u64, ns_pid as u64, 0, flags, 0, 0],
        )
        .map_err(trace)?;
    if r.ret < 0 {
        return Err(failed("wait for the exited child made again", r.ret));
    }
    if let Some(was) = dumpable {
        let r = child
            .syscall(insn, libc::SYS_prctl, [PR_SET_DUMPABLE, was, 0, 0, 0, 0])
            .map_err(trace)?;
        if r.ret < 0 {
            return Err(failed("make the child dumpable again", r.ret));
        }
    }
    Ok(())
}

/// Sets the stopped new process to end with `status` once let go: exit_group with its code,
/// or its signal, queued and unblocked (default handlers), with exit_group(128 + N) behind it
/// should the signal be ignored.
fn finish(kid: &mut Tracee, insn: u64, status: i32) -> Result<(), RestoreError> {
    let trace = RestoreError::Trace;
    kid.wait_for_event_stop().map_err(trace)?;
    let signal = status & 0x7f;
    let code = if signal == 0 {
        (status >> 8) & 0xff
    } else {
        128 + signal
    };
    let mut regs = kid.regs().map_err(trace)?;
    regs.rip = insn;
    regs.rax = libc::SYS_exit_group as u64;
    regs.rdi = code as u64;
    regs.orig_rax = u64::MAX;
    kid.set_regs(&regs).map_err(trace)?;
    if signal != 0 {
        kid.set_sigmask(0).map_err(trace)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(kid.pid()),
            nix::sys::signal::Signal::try_from(signal).map_err(|e| trace(e.into()))?,
        )
        .map_err(|e| trace(e.into()))?;
    }
    Ok(())
}
