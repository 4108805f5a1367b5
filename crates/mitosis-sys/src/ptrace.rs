//! ptrace: stopping a process, reading and setting its registers, and running system calls in it.

use std::io;

use nix::sys::ptrace::{self, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// General-purpose registers (x86_64 `user_regs_struct`), including fs/gs base.
pub type Regs = libc::user_regs_struct;

const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// PTRACE_PEEKSIGINFO flag: read the process-wide queue, not the thread's own.
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// A `siginfo_t`, as the kernel copies it.
pub const SIGINFO_LEN: usize = 128;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
/// More filters than the kernel lets a thread stack up (each costs at least 4 instructions
/// of a 32768-instruction budget).
const MAX_SECCOMP_FILTERS: u64 = 8192;
/// Largest XSAVE area we accept; AVX-512 needs ~2.7 KiB, AMX ~11 KiB.
const XSTATE_MAX: usize = 16 * 1024;

/// The thread's restartable-sequences registration (`struct ptrace_rseq_configuration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct RseqConfig {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// Why a tracee stopped (or that it is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Syscall entry or exit (PTRACE_O_TRACESYSGOOD).
    Syscall,
    /// A ptrace event (clone, fork, exec, stop...) with its signal.
    Event {
        event: i32,
        sig: i32,
    },
    /// Signal-delivery stop.
    Signal(i32),
    Exited(i32),
    Killed(i32),
}

/// What an injected system call produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallResult {
    /// Raw return value: negative errno on failure.
    pub ret: i64,
    /// Pid of a process the call created (clone/fork), auto-attached and stopped.
    pub new_child: Option<i32>,
}

/// A process we trace. All requests must come from the thread that seized it.
#[derive(Debug)]
pub struct Tracee {
    pid: Pid,
    /// Signals that arrived while we held the process; redelivered on detach.
    deferred: Vec<Signal>,
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

impl Tracee {
    /// Seizes `pid` without stopping it.
    pub fn seize(pid: i32, options: Options) -> io::Result<Self> {
        let pid = Pid::from_raw(pid);
        ptrace::seize(pid, options | Options::PTRACE_O_TRACESYSGOOD).map_err(nix_err)?;
        Ok(Tracee {
            pid,
            deferred: Vec::new(),
        })
    }

    /// Adopts a process that was auto-attached to us (a traced clone's child).
    pub fn adopt(pid: i32) -> Self {
        Tracee {
            pid: Pid::from_raw(pid),
            deferred: Vec::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    pub fn set_options(&self, options: Options) -> io::Result<()> {
        ptrace::setoptions(self.pid, options | Options::PTRACE_O_TRACESYSGOOD).map_err(nix_err)
    }

    /// Waits for the next stop of this tracee.
    pub fn wait(&self) -> io::Result<Stop> {
        loop {
            let status = match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
                Err(nix::Error::EINTR) => continue,
                other => other.map_err(nix_err)?,
            };
            return Ok(match status {
                WaitStatus::PtraceSyscall(_) => Stop::Syscall,
                WaitStatus::PtraceEvent(_, sig, event) => Stop::Event {
                    event,
                    sig: sig as i32,
                },
                WaitStatus::Stopped(_, sig) => Stop::Signal(sig as i32),
                WaitStatus::Exited(_, code) => Stop::Exited(code),
                WaitStatus::Signaled(_, sig, _) => Stop::Killed(sig as i32),
                _ => continue,
            });
        }
    }

    /// Stops a running tracee and waits until it is in a ptrace stop we can work from.
    ///
    /// Signals that arrive first are deferred and redelivered at detach.
    pub fn interrupt(&mut self) -> io::Result<()> {
        ptrace::interrupt(self.pid).map_err(nix_err)?;
        self.wait_for_event_stop()
    }

    /// Waits for a PTRACE_EVENT_STOP (interrupt, group stop, or a new auto-attached child).
    pub fn wait_for_event_stop(&mut self) -> io::Result<()> {
        loop {
            match self.wait()? {
                Stop::Event {
                    event: PTRACE_EVENT_STOP,
                    ..
                } => return Ok(()),
                Stop::Signal(sig) => {
                    if let Ok(s) = Signal::try_from(sig) {
                        self.deferred.push(s);
                    }
                    // Suppress for now: we need the tracee stopped, not handling a signal.
                    ptrace::cont(self.pid, None).map_err(nix_err)?;
                }
                Stop::Exited(code) => return Err(gone(format!("exited with status {code}"))),
                Stop::Killed(sig) => return Err(gone(format!("was killed by signal {sig}"))),
                _ => ptrace::cont(self.pid, None).map_err(nix_err)?,
            }
        }
    }

    pub fn regs(&self) -> io::Result<Regs> {
        ptrace::getregs(self.pid).map_err(nix_err)
    }

    pub fn set_regs(&self, regs: &Regs) -> io::Result<()> {
        ptrace::setregs(self.pid, *regs).map_err(nix_err)
    }

    /// The full XSAVE area: x87, SSE, AVX and whatever else this CPU has enabled.
    pub fn xstate(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which is writable for its whole length; the kernel shrinks iov_len to the bytes it wrote.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                self.pid.as_raw(),
                NT_X86_XSTATE,
                &mut iov,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    pub fn set_xstate(&self, xstate: &[u8]) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: xstate.as_ptr() as *mut libc::c_void,
            iov_len: xstate.len(),
        };
        // SAFETY: `iov` describes `xstate`, which the kernel only reads for SETREGSET.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGSET,
                self.pid.as_raw(),
                NT_X86_XSTATE,
                &mut iov,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The thread's blocked signals (bit N-1 for signal N).
    pub fn sigmask(&self) -> io::Result<u64> {
        let mut mask: u64 = 0;
        // SAFETY: `mask` is a writable 8-byte sigset, the size we pass.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GETSIGMASK,
                self.pid.as_raw(),
                std::mem::size_of::<u64>(),
                &mut mask,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(mask)
    }

    pub fn set_sigmask(&self, mask: u64) -> io::Result<()> {
        // SAFETY: the kernel reads one 8-byte sigset from `mask`.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_SETSIGMASK,
                self.pid.as_raw(),
                std::mem::size_of::<u64>(),
                &mask,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The signals queued for the thread (`shared`: for its whole process), oldest first, as
    /// raw `siginfo_t`s; the queue is left as it is.
    pub fn pending_signals(&self, shared: bool) -> io::Result<Vec<[u8; SIGINFO_LEN]>> {
        /// `struct ptrace_peeksiginfo_args`.
        #[repr(C)]
        struct Args {
            off: u64,
            flags: u32,
            nr: i32,
        }
        const BATCH: usize = 32;
        let mut out = Vec::new();
        loop {
            let args = Args {
                off: out.len() as u64,
                flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
                nr: BATCH as i32,
            };
            let mut buf = [[0u8; SIGINFO_LEN]; BATCH];
            // SAFETY: the kernel reads `args` and writes at most `nr` siginfos into `buf`,
            // which holds that many.
            let ret = unsafe {
                libc::ptrace(
                    PTRACE_PEEKSIGINFO,
                    self.pid.as_raw(),
                    &args as *const Args,
                    buf.as_mut_ptr(),
                )
            };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            out.extend_from_slice(&buf[..ret as usize]);
            if (ret as usize) < BATCH {
                return Ok(out);
            }
        }
    }

    /// The thread's rseq registration, if it has one.
    pub fn rseq(&self) -> io::Result<Option<RseqConfig>> {
        let mut conf = RseqConfig::default();
        // SAFETY: `conf` is a writable ptrace_rseq_configuration of the size we pass.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.pid.as_raw(),
                std::mem::size_of::<RseqConfig>(),
                &mut conf,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((conf.abi_pointer != 0).then_some(conf))
    }

    /// The thread's seccomp filters, the oldest first: each one's instructions (a packed
    /// `struct sock_filter` per word) and the flags it was installed with.
    pub fn seccomp_filters(&self) -> io::Result<Vec<(Vec<u64>, u64)>> {
        let mut newest_first = Vec::new();
        for index in 0..MAX_SECCOMP_FILTERS {
            // SAFETY: a null buffer asks only for the program's length.
            let len = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_FILTER,
                    self.pid.as_raw(),
                    index,
                    std::ptr::null_mut::<u64>(),
                )
            };
            if len < 0 {
                let e = io::Error::last_os_error();
                // ENOENT: past the oldest filter.
                if e.raw_os_error() == Some(libc::ENOENT) {
                    break;
                }
                return Err(e);
            }
            let mut program = vec![0u64; len as usize];
            // SAFETY: `program` holds `len` sock_filter entries (8 bytes each), as many as
            // the kernel just said this filter has; it writes no more.
            let got = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_FILTER,
                    self.pid.as_raw(),
                    index,
                    program.as_mut_ptr(),
                )
            };
            if got != len {
                return Err(io::Error::other("a seccomp filter changed while read"));
            }
            // struct seccomp_metadata { u64 filter_off; u64 flags; }
            let mut meta = [index, 0u64];
            // SAFETY: `meta` is a writable seccomp_metadata of the size we pass.
            let ret = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_METADATA,
                    self.pid.as_raw(),
                    std::mem::size_of_val(&meta),
                    meta.as_mut_ptr(),
                )
            };
            let flags = if ret < 0 { 0 } else { meta[1] };
            newest_first.push((program, flags));
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// Runs system call `nr` in the tracee from a `syscall` instruction at `insn`.
    ///
    /// The tracee must be in a ptrace stop; it is left in the syscall-exit stop with its
    /// registers changed: the caller saves and restores them.
    pub fn syscall(&mut self, insn: u64, nr: i64, args: [u64; 6]) -> io::Result<SyscallResult> {
        let mut regs = self.regs()?;
        regs.rip = insn;
        regs.rax = nr as u64;
        // No syscall in progress: the kernel must not apply restart logic to our registers.
        regs.orig_rax = u64::MAX;
        [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9] = args;
        self.set_regs(&regs)?;
        let mut new_child = None;
        let mut entered = false;
        loop {
            ptrace::syscall(self.pid, None).map_err(nix_err)?;
            match self.wait()? {
                Stop::Syscall if !entered => entered = true,
                Stop::Syscall => break,
                Stop::Event { event, .. }
                    if event == libc::PTRACE_EVENT_CLONE || event == libc::PTRACE_EVENT_FORK =>
                {
                    new_child = Some(ptrace::getevent(self.pid).map_err(nix_err)? as i32);
                }
                Stop::Signal(sig) => {
                    if let Ok(s) = Signal::try_from(sig) {
                        self.deferred.push(s);
                    }
                }
                Stop::Exited(code) => return Err(gone(format!("exited with status {code}"))),
                Stop::Killed(sig) => return Err(gone(format!("was killed by signal {sig}"))),
                Stop::Event { .. } => {}
            }
        }
        Ok(SyscallResult {
            ret: self.regs()?.rax as i64,
            new_child,
        })
    }

    /// Resumes a stopped tracee (no signal).
    pub fn cont(&self) -> io::Result<()> {
        ptrace::cont(self.pid, None).map_err(nix_err)
    }

    /// Lets the tracee go, redelivering any signal that arrived while we held it.
    pub fn detach(self) -> io::Result<()> {
        let mut deferred = self.deferred.into_iter();
        ptrace::detach(self.pid, deferred.next()).map_err(nix_err)?;
        for sig in deferred {
            let _ = nix::sys::signal::kill(self.pid, sig);
        }
        Ok(())
    }

    /// Kills the tracee and reaps it if it is our child.
    pub fn kill(self) {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, Some(WaitPidFlag::__WALL));
    }
}

fn gone(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("the process {what}"))
}

/// Options mitosis uses when seizing a seed: follow the clone we inject.
pub fn seed_options() -> Options {
    Options::PTRACE_O_TRACECLONE | Options::PTRACE_O_TRACEFORK
}

/// Options for processes that must die with the daemon (twins, children under construction).
pub fn exit_kill_options() -> Options {
    Options::PTRACE_O_EXITKILL
}

/// Lets a tracee's injected system calls bypass its seccomp filters (which could refuse them,
/// or kill it): for checkpoint and restore, by a tracer with CAP_SYS_ADMIN. Cleared on
/// detach.
pub fn suspend_seccomp() -> Options {
    Options::from_bits_retain(libc::PTRACE_O_SUSPEND_SECCOMP)
}
