//! System-call batches that give a replica and its children the seed's kernel state: signal
//! dispositions, limits and umask (once, in the replica: forks inherit them), each thread's own
//! registrations, and fresh copies of the seed's private pipes, socketpairs, eventfds, timerfds,
//! signalfds, epoll sets and devices (in every child: children must not share them).

use std::collections::BTreeSet;

use mitosis_descriptor::{
    EpollWatch, FdRef, KernelObject, MemFileMapping, MemFileOpen, ProcessState, SIG_IGN, SocketEnd,
    Thread,
};

use super::batch::Batch;

const RSEQ_FLAGS: u64 = 0;
/// `struct kernel_sigaction` is 32 bytes and takes an 8-byte sigset.
const SIGSET_SIZE: u64 = 8;
const NANOS: u64 = 1_000_000_000;
/// `_IOW('T', 0, u64)`: sets a timerfd's count of unread expirations (CONFIG_CHECKPOINT_RESTORE).
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

/// Dispositions, limits, umask and the main thread's alternate stack, run once in a replica.
pub(crate) fn process_batch(state: &ProcessState, main: &Thread) -> Batch {
    let mut b = Batch::default();
    // Signals the seed left at their default go back to it: the stub's runtime installed
    // handlers of its own (SIGSEGV, SIGBUS) and ignores SIGPIPE.
    let default = b.words(vec![0u64.into(); 4]);
    for signal in 1..=64u64 {
        let kept = state.sigactions.iter().any(|a| a.signal as u64 == signal);
        if kept || signal == libc::SIGKILL as u64 || signal == libc::SIGSTOP as u64 {
            continue;
        }
        b.call(
            libc::SYS_rt_sigaction,
            &[signal.into(), default, 0u64.into(), SIGSET_SIZE.into()],
            format!("reset signal {signal}"),
        );
    }
    for a in &state.sigactions {
        let act = b.words(vec![
            a.handler.into(),
            a.flags.into(),
            a.restorer.into(),
            a.mask.into(),
        ]);
        let what = if a.handler == SIG_IGN {
            "ignore"
        } else {
            "handle"
        };
        b.call(
            libc::SYS_rt_sigaction,
            &[
                (a.signal as u64).into(),
                act,
                0u64.into(),
                SIGSET_SIZE.into(),
            ],
            format!("{what} signal {}", a.signal),
        );
    }
    for r in &state.rlimits {
        let lim = b.words(vec![r.soft.into(), r.hard.into()]);
        b.call(
            libc::SYS_prlimit64,
            &[0u64.into(), (r.resource as u64).into(), lim, 0u64.into()],
            format!("set resource limit {}", r.resource),
        );
    }
    b.call(
        libc::SYS_umask,
        &[(state.umask as u64).into()],
        format!("set umask {:o}", state.umask),
    );
    // Both pass to forks: set once, in the replica.
    if state.thp_disabled {
        b.call(
            libc::SYS_prctl,
            &[(libc::PR_SET_THP_DISABLE as u64).into(), 1u64.into()],
            "turn transparent huge pages off",
        );
    }
    if state.personality != 0 {
        b.call(
            libc::SYS_personality,
            &[(state.personality as u64).into()],
            format!("set personality {:#x}", state.personality),
        );
    }
    timer_slack_call(&mut b, main);
    sched_calls(&mut b, &state.sched);
    // Always: without it the replica keeps the stub's alternate stack (Rust's runtime sets
    // one), long unmapped, and a handler with SA_ONSTACK would crash the child.
    let ss = match main.altstack {
        Some(s) => vec![s.sp.into(), (s.flags as u64).into(), s.size.into()],
        None => vec![0u64.into(), (libc::SS_DISABLE as u64).into(), 0u64.into()],
    };
    let ss = b.words(ss);
    b.call(
        libc::SYS_sigaltstack,
        &[ss, 0u64.into()],
        "set the main thread's alternate signal stack",
    );
    name_call(&mut b, main);
    b
}

/// The seed's nice value, policy, I/O priority and memory-error kill policy, which forks
/// inherit. (Its OOM score adjustment and core dump filter are files: the daemon writes them.)
fn sched_calls(b: &mut Batch, s: &mitosis_descriptor::Scheduling) {
    b.call_expecting(
        libc::SYS_setpriority,
        &[
            (libc::PRIO_PROCESS as u64).into(),
            0u64.into(),
            (s.nice as i64).into(),
        ],
        0,
        format!("set nice {}", s.nice),
    );
    let param = b.bytes(&s.rt_priority.to_ne_bytes());
    b.call_expecting(
        libc::SYS_sched_setscheduler,
        &[0u64.into(), (s.policy as u64).into(), param],
        0,
        format!("set scheduling policy {}", s.policy),
    );
    b.call_expecting(
        libc::SYS_ioprio_set,
        &[1u64.into(), 0u64.into(), (s.ioprio as u64).into()],
        0,
        format!("set I/O priority {:#x}", s.ioprio),
    );
    let mce = match s.mce_kill {
        0 | 1 => [libc::PR_MCE_KILL_SET as u64, s.mce_kill as u64],
        _ => [libc::PR_MCE_KILL_CLEAR as u64, 0],
    };
    b.call_expecting(
        libc::SYS_prctl,
        &[
            (libc::PR_MCE_KILL as u64).into(),
            mce[0].into(),
            mce[1].into(),
            0u64.into(),
            0u64.into(),
        ],
        0,
        "set the memory-error kill policy",
    );
}

/// Writes the seed's OOM score adjustment and core dump filter for `pid` (the replica). A
/// score below the replica's own needs CAP_SYS_RESOURCE: without it the build fails rather
/// than give children a score their seed did not have.
pub(crate) fn write_proc_settings(
    pid: i32,
    s: &mitosis_descriptor::Scheduling,
) -> Result<(), super::RestoreError> {
    for (name, value) in [
        ("oom_score_adj", s.oom_score_adj.to_string()),
        ("coredump_filter", format!("{:#x}", s.coredump_filter)),
    ] {
        let path = format!("/proc/{pid}/{name}");
        std::fs::write(&path, value).map_err(|source| super::RestoreError::Step {
            step: format!("write {path}"),
            source,
        })?;
    }
    Ok(())
}

/// What a thread registers for itself: its robust futex list, rseq area and alternate stack.
pub(crate) fn thread_batch(t: &Thread) -> Batch {
    let mut b = Batch::default();
    // A new thread starts with its creator's slack: always set its own.
    timer_slack_call(&mut b, t);
    robust_list_call(&mut b, t);
    tid_address_call(&mut b, t);
    if let Some(r) = t.rseq {
        b.call(
            libc::SYS_rseq,
            &[
                r.pointer.into(),
                (r.size as u64).into(),
                RSEQ_FLAGS.into(),
                (r.signature as u64).into(),
            ],
            format!("register rseq of thread {}", t.tid),
        );
    }
    altstack_call(&mut b, t);
    name_call(&mut b, t);
    // A new thread has none. The main thread keeps the SIGKILL that ties it to the daemon.
    if t.pdeathsig != 0 {
        b.call(
            libc::SYS_prctl,
            &[
                (libc::PR_SET_PDEATHSIG as u64).into(),
                (t.pdeathsig as u64).into(),
            ],
            format!("set the parent-death signal of thread {}", t.tid),
        );
    }
    b
}

fn timer_slack_call(b: &mut Batch, t: &Thread) {
    b.call(
        libc::SYS_prctl,
        &[
            (libc::PR_SET_TIMERSLACK as u64).into(),
            t.timer_slack_ns.into(),
        ],
        format!("set the timer slack of thread {}", t.tid),
    );
}

/// The thread's name (`comm`); the replica's main thread takes the seed's, and forks copy it.
fn name_call(b: &mut Batch, t: &Thread) {
    if !t.name.is_empty() {
        let name = b.c_string(&t.name);
        b.call(
            libc::SYS_prctl,
            &[(libc::PR_SET_NAME as u64).into(), name],
            format!("name thread {} {:?}", t.tid, t.name),
        );
    }
}

/// Registers the thread's tid address where its clone could not (musl's: the clone wrote the
/// thread's id elsewhere).
pub(crate) fn tid_address_call(b: &mut Batch, t: &Thread) {
    if super::ids::sets_own_tid_address(t) {
        b.call(
            libc::SYS_set_tid_address,
            &[t.tid_address.into()],
            format!("set the tid address of thread {}", t.tid),
        );
    }
}

/// The main thread's robust list: a fork does not inherit it.
pub(crate) fn robust_list_call(b: &mut Batch, t: &Thread) {
    if let Some(r) = t.robust_list.filter(|r| r.head != 0) {
        b.call(
            libc::SYS_set_robust_list,
            &[r.head.into(), r.len.into()],
            format!("set the robust futex list of thread {}", t.tid),
        );
    }
}

fn altstack_call(b: &mut Batch, t: &Thread) {
    if let Some(s) = t.altstack {
        let ss = b.words(vec![s.sp.into(), (s.flags as u64).into(), s.size.into()]);
        b.call(
            libc::SYS_sigaltstack,
            &[ss, 0u64.into()],
            format!("set the alternate signal stack of thread {}", t.tid),
        );
    }
}

/// The lowest free descriptor numbers, as the kernel will hand them out.
struct FdTable(BTreeSet<i32>);

impl FdTable {
    fn take(&mut self) -> i32 {
        let fd = (0..).find(|fd| !self.0.contains(fd)).expect("a free fd");
        self.0.insert(fd);
        fd
    }

    fn close(&mut self, fd: i32) {
        self.0.remove(&fd);
    }
}

/// Appends the calls that recreate `objects` at their descriptor numbers, given the
/// descriptors open at that point (`open`).
///
/// Every target number is first taken by a placeholder (a copy of stdin), so the objects the
/// kernel creates land only on numbers that are free in both the child and our model; each is
/// then moved over its targets with `dup3`, which replaces the placeholder atomically.
pub(crate) fn object_calls(b: &mut Batch, objects: &[KernelObject], open: &BTreeSet<i32>) {
    let mut table = FdTable(open.clone());
    for fd in objects.iter().flat_map(|o| o.fds()) {
        b.call(
            libc::SYS_dup3,
            &[0i32.into(), fd.fd.into(), 0i32.into()],
            format!("reserve fd {}", fd.fd),
        );
        table.0.insert(fd.fd);
    }
    for o in objects {
        match o {
            KernelObject::Device { path, fds } => {
                let p = b.c_string(path);
                let flags = fds[0].flags & !libc::O_CLOEXEC;
                b.call(
                    libc::SYS_openat,
                    &[libc::AT_FDCWD.into(), p, flags.into(), 0i32.into()],
                    format!("open {path}"),
                );
                let tmp = table.take();
                place(b, &mut table, tmp, fds, "device");
            }
            KernelObject::EventFd {
                fds,
                count,
                semaphore,
            } => {
                let flags =
                    (fds[0].flags & libc::O_NONBLOCK) | (*semaphore as i32 * libc::EFD_SEMAPHORE);
                b.call(
                    libc::SYS_eventfd2,
                    &[(*count).into(), flags.into()],
                    "create an eventfd",
                );
                let tmp = table.take();
                place(b, &mut table, tmp, fds, "eventfd");
            }
            KernelObject::Epoll { fds, .. } => {
                b.call(
                    libc::SYS_epoll_create1,
                    &[0i32.into()],
                    "create an epoll set",
                );
                let tmp = table.take();
                place(b, &mut table, tmp, fds, "epoll set");
            }
            KernelObject::Pipe {
                readers,
                writers,
                size,
                content,
            } => {
                let pair = b.bytes(&[0; 8]);
                let flags = readers[0].flags & libc::O_NONBLOCK;
                b.call(libc::SYS_pipe2, &[pair, flags.into()], "create a pipe");
                let (r, w) = (table.take(), table.take());
                // Before the refill: what the seed buffered may exceed the default size.
                b.call(
                    libc::SYS_fcntl,
                    &[w.into(), libc::F_SETPIPE_SZ.into(), (*size as u64).into()],
                    format!("make a pipe {size} bytes large"),
                );
                if !content.is_empty() {
                    let data = b.bytes(content);
                    b.call(
                        libc::SYS_write,
                        &[w.into(), data, (content.len() as u64).into()],
                        format!("refill a pipe with {} bytes", content.len()),
                    );
                }
                if writers[0].flags & libc::O_NONBLOCK != flags {
                    b.call(
                        libc::SYS_fcntl,
                        &[
                            w.into(),
                            libc::F_SETFL.into(),
                            (writers[0].flags & libc::O_NONBLOCK).into(),
                        ],
                        "set a pipe's write end flags",
                    );
                }
                // A FIFO's ends were opened by path: open(2) flags (O_LARGEFILE) pipe2 cannot
                // give, so they are opened again from the new ends.
                let r = reopened(b, &mut table, r, readers[0].flags, "a pipe's read end");
                let w = reopened(b, &mut table, w, writers[0].flags, "a pipe's write end");
                place(b, &mut table, r, readers, "pipe");
                place(b, &mut table, w, writers, "pipe");
            }
            KernelObject::SocketPair { kind, ends } => {
                socket_pair_calls(b, &mut table, *kind, ends)
            }
            KernelObject::TimerFd {
                fds,
                clock,
                value_ns,
                interval_ns,
                ticks,
            } => {
                let flags = fds[0].flags & libc::O_NONBLOCK;
                b.call(
                    libc::SYS_timerfd_create,
                    &[(*clock).into(), flags.into()],
                    format!("create a timerfd on clock {clock}"),
                );
                let tmp = table.take();
                if *value_ns != 0 {
                    // struct itimerspec: interval, then value, each (seconds, nanoseconds).
                    let split = |ns: u64| [(ns / NANOS).into(), (ns % NANOS).into()];
                    let [is, ins] = split(*interval_ns);
                    let [vs, vns] = split(*value_ns);
                    let spec = b.words(vec![is, ins, vs, vns]);
                    b.call(
                        libc::SYS_timerfd_settime,
                        &[tmp.into(), 0i32.into(), spec, 0u64.into()],
                        "arm a timerfd",
                    );
                }
                if *ticks != 0 {
                    let count = b.words(vec![(*ticks).into()]);
                    b.call(
                        libc::SYS_ioctl,
                        &[tmp.into(), TFD_IOC_SET_TICKS.into(), count],
                        format!("give a timerfd its {ticks} unread expirations"),
                    );
                }
                place(b, &mut table, tmp, fds, "timerfd");
            }
            KernelObject::MemFile {
                name,
                content,
                seals,
                opens,
                mappings,
            } => mem_file_calls(b, &mut table, name, content, *seals, opens, mappings),
            KernelObject::SignalFd { fds, mask } => {
                let flags = fds[0].flags & libc::O_NONBLOCK;
                let set = b.words(vec![(*mask).into()]);
                b.call(
                    libc::SYS_signalfd4,
                    &[(-1i32).into(), set, SIGSET_SIZE.into(), flags.into()],
                    "create a signalfd",
                );
                let tmp = table.take();
                place(b, &mut table, tmp, fds, "signalfd");
            }
        }
    }
    for o in objects {
        if let KernelObject::Epoll { fds, watches } = o {
            for w in watches {
                epoll_add(b, fds[0].fd, w);
            }
        }
    }
}

/// The kernel's O_LARGEFILE on x86_64 (libc defines it as 0 there): set by open(2) only.
const O_LARGEFILE: i32 = 0o100000;

/// `fd` itself, or if the seed's `flags` say its end was opened by path, a new description
/// opened through /proc/self/fd with them (and `fd` closed).
fn reopened(b: &mut Batch, table: &mut FdTable, fd: i32, flags: i32, what: &str) -> i32 {
    if flags & O_LARGEFILE == 0 {
        return fd;
    }
    let path = b.c_string(&format!("/proc/self/fd/{fd}"));
    let flags = flags & !libc::O_CLOEXEC;
    b.call(
        libc::SYS_openat,
        &[libc::AT_FDCWD.into(), path, flags.into(), 0i32.into()],
        format!("open {what} again"),
    );
    let new = table.take();
    b.call(libc::SYS_close, &[fd.into()], format!("close fd {fd}"));
    table.close(fd);
    new
}

/// Longest name `memfd_create` takes (its limit, 249 bytes, less the NUL).
const MEMFD_NAME_MAX: usize = 248;

/// A memfd with the seed's content, mapped where the seed shared-mapped its file, then each
/// open file description reopened from it (through /proc/self/fd, which gives a description
/// of its own with the seed's access mode and flags) at its offset.
fn mem_file_calls(
    b: &mut Batch,
    table: &mut FdTable,
    name: &str,
    content: &[u8],
    seals: u32,
    opens: &[MemFileOpen],
    mappings: &[MemFileMapping],
) {
    let mut end = name.len().min(MEMFD_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let cname = b.c_string(&name[..end]);
    b.call(
        libc::SYS_memfd_create,
        &[cname, (libc::MFD_ALLOW_SEALING as u64).into()],
        format!("create a memfd for {name}"),
    );
    let tmp = table.take();
    if !content.is_empty() {
        let data = b.bytes(content);
        b.call_expecting(
            libc::SYS_pwrite64,
            &[tmp.into(), data, (content.len() as u64).into(), 0u64.into()],
            content.len() as u64,
            format!("fill the memfd for {name} with {} bytes", content.len()),
        );
    }
    for m in mappings {
        let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
        b.call(
            libc::SYS_mmap,
            &[
                m.start.into(),
                m.len.into(),
                (m.prot as u64).into(),
                flags.into(),
                tmp.into(),
                m.offset.into(),
            ],
            format!("map {name} at {:#x}", m.start),
        );
    }
    // After the mappings: F_SEAL_FUTURE_WRITE forbids new writable ones.
    if seals & !(libc::F_SEAL_SEAL as u32) != 0 {
        b.call(
            libc::SYS_fcntl,
            &[tmp.into(), libc::F_ADD_SEALS.into(), (seals as u64).into()],
            format!("seal the memfd for {name}"),
        );
    }
    let path = b.c_string(&format!("/proc/self/fd/{tmp}"));
    for open in opens {
        let flags =
            open.fds[0].flags & !(libc::O_CLOEXEC | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        b.call(
            libc::SYS_openat,
            &[libc::AT_FDCWD.into(), path, flags.into(), 0i32.into()],
            format!("open {name} again"),
        );
        let fd = table.take();
        if open.offset != 0 {
            b.call_expecting(
                libc::SYS_lseek,
                &[fd.into(), open.offset.into(), libc::SEEK_SET.into()],
                open.offset,
                format!("seek {name} to {}", open.offset),
            );
        }
        place(b, table, fd, &open.fds, "memfd");
    }
    b.call(libc::SYS_close, &[tmp.into()], format!("close fd {tmp}"));
    table.close(tmp);
}

/// A fresh socketpair with each end's queue refilled from the other end, in order.
fn socket_pair_calls(b: &mut Batch, table: &mut FdTable, kind: i32, ends: &[SocketEnd; 2]) {
    let pair = b.bytes(&[0; 8]);
    b.call(
        libc::SYS_socketpair,
        &[libc::AF_UNIX.into(), kind.into(), 0i32.into(), pair],
        "create a socketpair",
    );
    let fds = [table.take(), table.take()];
    for (at, end) in ends.iter().enumerate() {
        for message in &end.queued {
            let data = b.bytes(message);
            // Never blocks: what the seed had queued fits the new pair's buffers, and a
            // failure names itself rather than hanging the child.
            b.call(
                libc::SYS_sendto,
                &[
                    fds[1 - at].into(),
                    data,
                    (message.len() as u64).into(),
                    libc::MSG_DONTWAIT.into(),
                    0u64.into(),
                    0u64.into(),
                ],
                format!("queue {} bytes on a socketpair", message.len()),
            );
        }
    }
    for (fd, end) in fds.iter().zip(ends) {
        let nonblock = end.fds[0].flags & libc::O_NONBLOCK;
        if nonblock != 0 {
            b.call(
                libc::SYS_fcntl,
                &[(*fd).into(), libc::F_SETFL.into(), nonblock.into()],
                "make a socket non-blocking",
            );
        }
    }
    place(b, table, fds[0], &ends[0].fds, "socket");
    place(b, table, fds[1], &ends[1].fds, "socket");
}

/// Moves a new object from `tmp` onto each of its descriptor numbers, then frees `tmp`.
fn place(b: &mut Batch, table: &mut FdTable, tmp: i32, fds: &[FdRef], what: &str) {
    for f in fds {
        let cloexec = f.flags & libc::O_CLOEXEC;
        b.call(
            libc::SYS_dup3,
            &[tmp.into(), f.fd.into(), cloexec.into()],
            format!("put the {what} at fd {}", f.fd),
        );
    }
    b.call(libc::SYS_close, &[tmp.into()], format!("close fd {tmp}"));
    table.close(tmp);
}

fn epoll_add(b: &mut Batch, epfd: i32, w: &EpollWatch) {
    // struct epoll_event is packed on x86_64: u32 events, u64 data.
    let mut event = w.events.to_ne_bytes().to_vec();
    event.extend_from_slice(&w.data.to_ne_bytes());
    let ev = b.bytes(&event);
    b.call(
        libc::SYS_epoll_ctl,
        &[epfd.into(), libc::EPOLL_CTL_ADD.into(), w.fd.into(), ev],
        format!("watch fd {} from epoll fd {epfd}", w.fd),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::batch::RECORD_LEN;

    fn fd(fd: i32, flags: i32) -> FdRef {
        FdRef { fd, flags }
    }

    /// Runs the calls against a model of the fd table and checks every object ends up where
    /// the seed had it, with nothing else left open.
    #[test]
    fn objects_land_on_their_numbers_whatever_the_order() {
        let objects = vec![
            KernelObject::Pipe {
                readers: vec![fd(4, 0)],
                writers: vec![fd(3, 1)],
                size: 65536,
                content: b"xy".to_vec(),
            },
            KernelObject::EventFd {
                fds: vec![fd(9, 2), fd(5, 2 | libc::O_CLOEXEC)],
                count: 5,
                semaphore: false,
            },
            KernelObject::Epoll {
                fds: vec![fd(7, 2)],
                watches: vec![EpollWatch {
                    fd: 4,
                    events: 1,
                    data: 4,
                }],
            },
            KernelObject::SocketPair {
                kind: libc::SOCK_DGRAM,
                ends: [
                    SocketEnd {
                        fds: vec![fd(11, 2)],
                        queued: vec![b"a".to_vec(), b"bb".to_vec()],
                    },
                    SocketEnd {
                        fds: vec![fd(8, 2 | libc::O_NONBLOCK)],
                        queued: vec![],
                    },
                ],
            },
            KernelObject::TimerFd {
                fds: vec![fd(10, 0)],
                clock: libc::CLOCK_MONOTONIC,
                value_ns: 1_500_000_000,
                interval_ns: 0,
                ticks: 2,
            },
            KernelObject::SignalFd {
                fds: vec![fd(12, 0)],
                mask: 1 << 9,
            },
        ];
        let open: BTreeSet<i32> = [0, 1, 2, 6].into();
        let mut b = Batch::default();
        object_calls(&mut b, &objects, &open);
        let bytes = b.encode(0);
        let word = |r: usize, i: usize| {
            let at = r * RECORD_LEN as usize + i * 8;
            u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap()) as i64
        };
        // Simulate: which object each fd holds.
        let mut table: std::collections::BTreeMap<i64, String> = open
            .iter()
            .map(|&f| (f as i64, "pre".to_string()))
            .collect();
        let mut sent = Vec::new();
        let lowest = |t: &std::collections::BTreeMap<i64, String>| {
            (0..).find(|f| !t.contains_key(f)).unwrap()
        };
        for r in 0..b.count() as usize {
            let nr = word(r, 0);
            if nr == libc::SYS_dup3 {
                let src = table[&word(r, 1)].clone();
                table.insert(word(r, 2), src);
            } else if nr == libc::SYS_close {
                assert!(table.remove(&word(r, 1)).is_some());
            } else if nr == libc::SYS_pipe2 {
                let rd = lowest(&table);
                table.insert(rd, "pipe-r".into());
                let wr = lowest(&table);
                table.insert(wr, "pipe-w".into());
            } else if nr == libc::SYS_eventfd2 {
                assert_eq!(word(r, 1), 5);
                let f = lowest(&table);
                table.insert(f, "eventfd".into());
            } else if nr == libc::SYS_epoll_create1 {
                let f = lowest(&table);
                table.insert(f, "epoll".into());
            } else if nr == libc::SYS_socketpair {
                let a = lowest(&table);
                table.insert(a, "sock-a".into());
                let b = lowest(&table);
                table.insert(b, "sock-b".into());
            } else if nr == libc::SYS_sendto {
                // Messages for end a are sent from end b.
                assert_eq!(table[&word(r, 1)], "sock-b");
                sent.push(word(r, 3));
            } else if nr == libc::SYS_timerfd_create {
                let f = lowest(&table);
                table.insert(f, "timerfd".into());
            } else if nr == libc::SYS_timerfd_settime || nr == libc::SYS_ioctl {
                assert_eq!(table[&word(r, 1)], "timerfd");
            } else if nr == libc::SYS_signalfd4 {
                assert_eq!(word(r, 1), -1);
                let f = lowest(&table);
                table.insert(f, "signalfd".into());
            } else if nr == libc::SYS_fcntl {
                let on = table[&word(r, 1)].as_str();
                assert!(on == "sock-b" || on == "pipe-w", "fcntl on {on}");
            } else if nr == libc::SYS_write {
                assert_eq!(table[&word(r, 1)], "pipe-w");
            } else if nr == libc::SYS_epoll_ctl {
                assert_eq!(table[&word(r, 1)], "epoll");
                assert_eq!(table[&word(r, 3)], "pipe-r");
            }
        }
        let expect: std::collections::BTreeMap<i64, String> = [
            (0, "pre"),
            (1, "pre"),
            (2, "pre"),
            (3, "pipe-w"),
            (4, "pipe-r"),
            (5, "eventfd"),
            (6, "pre"),
            (7, "epoll"),
            (8, "sock-b"),
            (9, "eventfd"),
            (10, "timerfd"),
            (11, "sock-a"),
            (12, "signalfd"),
        ]
        .into_iter()
        .map(|(f, s)| (f, s.to_string()))
        .collect();
        assert_eq!(table, expect);
        assert_eq!(sent, [1, 2], "messages queued in order");
    }
}
