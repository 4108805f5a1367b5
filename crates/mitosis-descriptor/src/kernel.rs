//! The kernel state of a seed beyond its memory: threads, signal dispositions, limits and the
//! descriptors that are not regular files.

use serde::{Deserialize, Serialize};

use crate::Rseq;

/// One thread at the prepare point. The first thread of a descriptor is the seed's main thread
/// (the thread-group leader); the child's process starts as it and clones the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thread {
    /// Its id on the seed's host, for inspection.
    pub tid: i32,
    /// Its id in its own pid namespace (what `gettid` returned to it): a container's, or
    /// `tid` outside one. A child in a container takes it; elsewhere a child's threads get
    /// ids of their own.
    pub own_tid: i32,
    /// Its name (`comm`, at most 15 bytes).
    pub name: String,
    /// `user_regs_struct` as words, already adjusted to restart an interrupted system call.
    pub regs: Vec<u64>,
    /// The XSAVE area (x87/SSE/AVX state).
    pub xstate: Vec<u8>,
    /// Blocked signals: bit N-1 for signal N.
    pub sigmask: u64,
    pub rseq: Option<Rseq>,
    /// `set_robust_list` head and length.
    pub robust_list: Option<RobustList>,
    /// The thread's clear-child-tid address: the kernel clears the word there when the thread
    /// exits and wakes its waiters (glibc's `pthread_join` waits on `pthread.tid`; musl's
    /// thread-list lock is released so).
    pub tid_address: u64,
    /// Where the thread's runtime keeps its id (0: nowhere known), which a child's thread gets
    /// its own id written to at creation: glibc keeps it at `tid_address` (`pthread.tid`);
    /// musl keeps its thread-list lock there instead (an id written into it would leave the
    /// lock held forever) and the id in its `struct pthread`.
    pub tid_cache: u64,
    pub altstack: Option<AltStack>,
    /// The system call it was stopped in (`orig_rax`), or -1 in user code.
    pub in_syscall: i64,
    /// Who the thread acts as and what it may do: the kernel keeps these per thread.
    pub creds: Credentials,
    /// `prctl(PR_GET_TIMERSLACK)`, in nanoseconds.
    pub timer_slack_ns: u64,
    /// `prctl(PR_GET_PDEATHSIG)`: the signal it gets when its parent dies (0: none).
    pub pdeathsig: u8,
    /// Signals queued for this thread alone, oldest first.
    pub pending: Vec<PendingSignal>,
}

/// A queued signal with what its receiver will read of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSignal {
    pub signal: u8,
    /// The raw `siginfo_t` (128 bytes).
    pub info: Vec<u8>,
}

/// `setitimer`'s timers: which (ITIMER_REAL, _VIRTUAL, _PROF), time left and period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalTimer {
    pub which: u8,
    pub value_ns: u64,
    pub interval_ns: u64,
}

/// A POSIX timer (`timer_create`), restored with its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// `sigev_notify`: SIGEV_SIGNAL, SIGEV_NONE, or SIGEV_THREAD_ID with [`Self::thread`].
    pub notify: i32,
    pub signal: u8,
    /// `sigev_value`, handed to the signal's receiver.
    pub value: u64,
    /// For SIGEV_THREAD_ID: the index in the descriptor's threads of the thread it signals.
    pub thread: u32,
    pub value_ns: u64,
    pub interval_ns: u64,
}

/// A thread's identity and confinement, which its counterpart in every child gets exactly:
/// never more, never less.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Real, effective, saved and filesystem user ids.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem group ids.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub caps: Capabilities,
    /// `prctl(PR_GET_SECUREBITS)`.
    pub securebits: u32,
    pub no_new_privs: bool,
    /// Seccomp filters, the oldest first (the order they must be installed in).
    pub seccomp: Vec<SeccompFilter>,
}

/// Capability sets as bit masks (bit N for capability N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
}

/// One classic-BPF seccomp program, as `PTRACE_SECCOMP_GET_FILTER` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilter {
    /// `struct sock_filter` instructions, each packed into a word (code, jt, jf, k).
    pub program: Vec<u64>,
    /// `SECCOMP_FILTER_FLAG_*` it was installed with, as far as the kernel reports them
    /// (`PTRACE_SECCOMP_GET_METADATA`: LOG).
    pub flags: u64,
}

/// Most instructions a classic BPF program may have (BPF_MAXINSNS).
pub const SECCOMP_MAX_INSNS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobustList {
    pub head: u64,
    pub len: u64,
}

/// A `sigaltstack` (`stack_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub size: u64,
    pub flags: i32,
}

/// Process-wide state every thread shares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// Signals whose disposition is not the default, in the kernel's `struct sigaction` form.
    pub sigactions: Vec<SigAction>,
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    /// `prctl(PR_GET_DUMPABLE)`: whether other processes of its user may trace it.
    pub dumpable: u8,
    /// `prctl(PR_GET_THP_DISABLE)`: transparent huge pages turned off for the process.
    pub thp_disabled: bool,
    /// `personality(0xffffffff)`: the execution domain and its flags (ADDR_NO_RANDOMIZE...).
    pub personality: u32,
    /// `prctl(PR_GET_CHILD_SUBREAPER)`: orphaned descendants are reparented to it.
    pub child_subreaper: bool,
    /// Signals queued for the whole process, oldest first.
    pub pending: Vec<PendingSignal>,
    /// Armed `setitimer` timers (a fork does not pass them on).
    pub itimers: Vec<IntervalTimer>,
    /// POSIX timers (a fork does not pass them on).
    pub posix_timers: Vec<PosixTimer>,
    /// How the kernel schedules and ranks the process.
    pub sched: Scheduling,
    /// Children of the seed that exited and were not reaped: each child has such a child,
    /// with the same status, for its own wait() to reap.
    pub zombies: Vec<Zombie>,
}

/// Scheduling, I/O priority and how the kernel treats the process under memory pressure or
/// memory errors: forks inherit all of it, so the replica takes it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduling {
    /// The main thread's nice value (-20..19).
    pub nice: i8,
    /// `sched_getscheduler`: SCHED_OTHER, SCHED_BATCH, SCHED_IDLE, SCHED_FIFO, SCHED_RR.
    pub policy: u32,
    pub rt_priority: u32,
    /// `ioprio_get` of the main thread (class << 13 | level; 0: none set).
    pub ioprio: u32,
    /// `prctl(PR_MCE_KILL_GET)`: 0 late, 1 early, 2 the system's default.
    pub mce_kill: u8,
    /// /proc/PID/oom_score_adj (-1000..1000).
    pub oom_score_adj: i16,
    /// /proc/PID/coredump_filter.
    pub coredump_filter: u32,
}

/// The kernel's values for a process that changed none of them.
pub const DEFAULT_SCHEDULING: Scheduling = Scheduling {
    nice: 0,
    policy: 0,
    rt_priority: 0,
    ioprio: 0,
    mce_kill: 2,
    oom_score_adj: 0,
    coredump_filter: 0x33,
};

impl Default for Scheduling {
    fn default() -> Self {
        DEFAULT_SCHEDULING
    }
}

/// An exited, unreaped child of the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zombie {
    /// Its pid in the seed's view, for inspection: the child's zombie gets a pid of its own.
    pub pid: i32,
    /// Its status as wait() reports it: an exit code, or a signal without a core dump.
    pub status: i32,
}

pub const SIG_IGN: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signal: u8,
    /// Handler address, or [`SIG_IGN`].
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u8,
    pub soft: u64,
    pub hard: u64,
}

/// A descriptor number and its `open(2)` flags (access mode, O_NONBLOCK, O_CLOEXEC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRef {
    pub fd: i32,
    pub flags: i32,
}

/// A kernel object private to the seed that each child gets a fresh copy of, at the same
/// descriptor numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelObject {
    /// A character device such as /dev/null or /dev/urandom, opened again by path.
    Device { path: String, fds: Vec<FdRef> },
    /// A pipe with both ends in the seed, its capacity (`F_GETPIPE_SZ`) and what was
    /// buffered in it.
    Pipe {
        readers: Vec<FdRef>,
        writers: Vec<FdRef>,
        size: u32,
        content: Vec<u8>,
    },
    EventFd {
        fds: Vec<FdRef>,
        count: u64,
        semaphore: bool,
    },
    /// An epoll instance and what it watches (descriptors the child also gets).
    Epoll {
        fds: Vec<FdRef>,
        watches: Vec<EpollWatch>,
    },
    /// Two connected unix sockets, both in the seed (a socketpair, such as asyncio's self-pipe).
    SocketPair {
        /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
        kind: i32,
        ends: [SocketEnd; 2],
    },
    /// A timerfd, armed as it was: `value_ns` to the next expiry (0: disarmed), then every
    /// `interval_ns`; `ticks` expirations not yet read.
    TimerFd {
        fds: Vec<FdRef>,
        clock: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    /// A signalfd and the signals it takes (bit N-1 for signal N).
    SignalFd { fds: Vec<FdRef>, mask: u64 },
    /// A file no other host has: a memfd, or a file deleted while the seed had it open. Each
    /// child gets a memfd with its content, opened as each of the seed's descriptions was, and
    /// mapped where the seed shared-mapped it (so writes through one show through the other).
    MemFile {
        /// The memfd's name, or the deleted file's path.
        name: String,
        content: Vec<u8>,
        /// `F_GET_SEALS` of a memfd (0 for a deleted file).
        seals: u32,
        /// Each open file description of it: its descriptors (one flags value) and offset.
        opens: Vec<MemFileOpen>,
        /// The seed's `MAP_SHARED` mappings of it.
        mappings: Vec<MemFileMapping>,
    },
}

/// One open file description of a [`KernelObject::MemFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFileOpen {
    pub fds: Vec<FdRef>,
    pub offset: u64,
}

/// A shared mapping of a [`KernelObject::MemFile`]: exactly one of the descriptor's mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFileMapping {
    pub start: u64,
    pub len: u64,
    /// PROT_* bits.
    pub prot: u8,
    /// Offset in the file.
    pub offset: u64,
}

/// One end of a [`KernelObject::SocketPair`]: its descriptors and the messages queued to be
/// read there, oldest first (a stream's bytes as one message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketEnd {
    pub fds: Vec<FdRef>,
    pub queued: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollWatch {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

impl KernelObject {
    /// Every descriptor number that refers to this object.
    pub fn fds(&self) -> Box<dyn Iterator<Item = &FdRef> + '_> {
        let (a, b): (&[FdRef], &[FdRef]) = match self {
            KernelObject::MemFile { opens, .. } => {
                return Box::new(opens.iter().flat_map(|o| o.fds.iter()));
            }
            KernelObject::Device { fds, .. }
            | KernelObject::EventFd { fds, .. }
            | KernelObject::Epoll { fds, .. }
            | KernelObject::TimerFd { fds, .. }
            | KernelObject::SignalFd { fds, .. } => (fds, &[]),
            KernelObject::Pipe {
                readers, writers, ..
            } => (readers, writers),
            KernelObject::SocketPair { ends, .. } => (&ends[0].fds, &ends[1].fds),
        };
        Box::new(a.iter().chain(b))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            KernelObject::Device { .. } => "device",
            KernelObject::Pipe { .. } => "pipe",
            KernelObject::EventFd { .. } => "eventfd",
            KernelObject::Epoll { .. } => "epoll",
            KernelObject::SocketPair { .. } => "socketpair",
            KernelObject::TimerFd { .. } => "timerfd",
            KernelObject::SignalFd { .. } => "signalfd",
            KernelObject::MemFile { .. } => "memfile",
        }
    }
}

/// A descriptor the child does not get, and why: it reaches outside the seed (a socket, one end
/// of a pipe) or is of a kind mitosis does not carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedFd {
    pub fd: i32,
    /// What it was, as /proc/PID/fd shows it (`socket:[123]`, `anon_inode:[timerfd]`).
    pub target: String,
    pub reason: String,
}
