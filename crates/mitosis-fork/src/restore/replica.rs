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
//! before the clone; the child's first batch joins the other namespaces through the same
//! pidfd, which it inherits as descriptor 0 (the replica has no stdio, so it is the lowest
//! free). That batch is a batch of its own so that joining is timed apart (`join_us`).

use super::StubPool;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use mitosis_descriptor::Thread;
use mitosis_sys::ptrace::{Regs, Stop, Tracee};
use mitosis_sys::uffd::Userfaultfd;
use mitosis_sys::{fdpass, pidfd};
use nix::sys::ptrace::Options;

use super::batch::{Arg, Batch, Placed};
use super::build::{self, Laid, RestoreError, Spawned, StreamedPages};
use super::confine::{self, HostCreds};
use super::continuation::{self, Continuation};
use super::ids::{self, OwnIds, PlacedIds, THREAD_FLAGS, tid_clone};
use super::kernel_state;
use super::plan::Plan;
use super::trampoline;
use crate::pending::PendingMap;
use crate::regs::{RestartFor, resume_point, words_to_regs};

/// cmsg space for up to four descriptors.
const CMSG_SPACE: usize = 32;
/// Where a child finds the listening socket it is handed (systemd's first passed fd).
pub const LISTEN_FD: i32 = 3;
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

type BeforeRun = Option<Box<dyn FnOnce(i32) -> std::io::Result<()> + Send>>;

/// The replica process. Lives on the tracer thread's side: every method must run there.
pub struct Replica {
    spawned: Spawned,
    at: u64,
    size: u64,
    /// The child's batch, without and with a listening socket (none if fd 3 is the seed's).
    batch: Placed,
    listener_batch: Option<Placed>,
    seed_regs: Regs,
    /// The clone flags and child-tid address that hand on the main thread's ([`tid_clone`]).
    tid_clone: (i32, u64),
    /// For a seed that ran in a container: the `clone_args` that give its children's
    /// process and threads their seed's own ids ([`ids`]).
    own_ids: Option<PlacedIds>,
    /// The other threads, with the batch each runs for itself.
    threads: Vec<(Thread, Placed)>,
    /// Shared anonymous mappings: each child gets a fresh one (seed contents, own writes).
    shared: Vec<(u64, u64)>,
    /// The batch that joins a child to its container, for a seed that ran in one.
    join_batch: Option<Placed>,
    /// The seccomp filters every thread shares, installed in the main thread before it
    /// clones the others.
    shared_filters: Option<Placed>,
    /// The main thread's own credentials and confinement, its last batch.
    confine: Option<Placed>,
    /// Some thread has seccomp filters: the calls we make in a child must bypass them.
    suspend_seccomp: bool,
    /// Pending signals and timers, which each child re-creates with its own ids.
    continuation: Continuation,
    /// The main thread and the process batch, until [`Replica::finish`] ran them.
    unfinished: Option<(Thread, Placed)>,
    /// What the daemon writes for the replica through /proc (forks inherit it).
    sched: mitosis_descriptor::Scheduling,
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
    /// Of `fork_us`, joining the container: the replica's switch to its pid namespace, the
    /// child's setns of the others and its move into the cgroup (0 without a container).
    pub join_us: u64,
}

/// Builds the replica of `plan`, up to its pages: it has the seed's layout and its lazy ranges
/// are registered. Then the caller brings in the pages and calls [`Replica::finish`].
pub fn build(
    plan: Plan,
    stubs: &StubPool,
    join: Option<JoinSpec>,
    pages: Option<StreamedPages>,
) -> Result<Built, RestoreError> {
    let t0 = Instant::now();
    let mut spawned = stubs.take()?;
    let spawn_us = t0.elapsed().as_micros() as u64;
    // Unregistered in each child before its batch replaces them (memfds' mappings included).
    let shared: Vec<(u64, u64)> = plan
        .maps
        .iter()
        .filter(|m| m.file.is_none() && m.flags & libc::MAP_SHARED as u64 != 0)
        .map(|m| (m.start, m.len))
        .collect();
    let host = match HostCreds::of(spawned.pid) {
        Ok(h) => h,
        Err(source) => {
            spawned.kill();
            return Err(RestoreError::Step {
                step: "read the stub's credentials".into(),
                source,
            });
        }
    };
    let batches = Batches::new(&plan, join.as_ref(), &host);
    let extra = |at: u64| batches.encode(at);
    let laid = match build::lay_out(&plan, &mut spawned, &extra, pages) {
        Ok(l) => l,
        Err(e) => {
            spawned.kill();
            return Err(e);
        }
    };
    let placed = batches.place(laid.extra_at);
    let Laid { uffd, at, size, .. } = laid;
    let main = plan.threads[0].clone();
    let seed_regs = resume_point(&words_to_regs(&main.regs), RestartFor::OtherTask);
    Ok(Built {
        replica: Replica {
            spawned,
            at,
            size,
            batch: placed.child,
            listener_batch: placed.listener,
            seed_regs,
            tid_clone: tid_clone(&main),
            own_ids: placed.own_ids,
            threads: plan.threads[1..]
                .iter()
                .cloned()
                .zip(placed.threads)
                .collect(),
            shared,
            join_batch: placed.join,
            shared_filters: placed.shared_filters,
            confine: placed.confine,
            suspend_seccomp: confine::any_filters(&plan.threads),
            continuation: Continuation::of(&plan.process, &plan.threads),
            unfinished: Some((main, placed.process)),
            sched: plan.process.sched,
        },
        uffd,
        pending: plan.pending,
        spawn_us,
        restore_us: t0.elapsed().as_micros() as u64 - spawn_us,
    })
}

impl Replica {
    /// Loads the main thread's state and runs the process batch (handlers, limits): the last
    /// step of a build, once the seed's pages the replica needs are in (or served by the
    /// replica's fault watcher). Forks need it done.
    pub fn finish(&mut self) -> Result<(), RestoreError> {
        let Some((main, process)) = self.unfinished.take() else {
            return Ok(());
        };
        let tracee = &mut self.spawned.tracee;
        build::load_main_thread(tracee, &main, self.at)?;
        run_batch(tracee, self.at, &process)?;
        kernel_state::write_proc_settings(self.spawned.pid, &self.sched)?;
        let tracee = &mut self.spawned.tracee;
        // Forks must stop us so each child is traced from its first instruction; children
        // inherit the options, and with TRACECLONE the threads they start are traced too.
        tracee
            .set_options(
                Options::PTRACE_O_TRACEFORK
                    | Options::PTRACE_O_TRACECLONE
                    | Options::PTRACE_O_EXITKILL,
            )
            .map_err(RestoreError::Trace)
    }
}

/// Every batch a replica keeps in its data area, laid out one after the other.
struct Batches {
    join: Option<Batch>,
    own_ids: Option<OwnIds>,
    child: Batch,
    listener: Option<Batch>,
    shared_filters: Option<Batch>,
    confine: Option<Batch>,
    process: Batch,
    threads: Vec<Batch>,
}

struct PlacedBatches {
    join: Option<Placed>,
    own_ids: Option<PlacedIds>,
    child: Placed,
    listener: Option<Placed>,
    shared_filters: Option<Placed>,
    confine: Option<Placed>,
    process: Placed,
    threads: Vec<Placed>,
}

impl Batches {
    fn new(plan: &Plan, join: Option<&JoinSpec>, host: &HostCreds) -> Self {
        let chan_fd = plan.work_fd_base;
        let files: BTreeSet<i32> = plan.opens.iter().filter_map(|o| o.target_fd).collect();
        let seed_has_3 = files.contains(&LISTEN_FD)
            || plan
                .objects
                .iter()
                .any(|o| o.fds().any(|f| f.fd == LISTEN_FD));
        let batch = |listener| child_batch(chan_fd, plan, &files, listener);
        let main = &plan.threads[0];
        let shared = confine::shared_filters(&plan.threads);
        let mut filters = Batch::default();
        confine::filter_calls(&mut filters, &main.creds.seccomp[..shared], main.tid);
        let mut own = Batch::default();
        confine::confine_calls(&mut own, &main.creds, host, shared, main.tid);
        if own.count() > 0 || plan.process.dumpable != 1 {
            confine::finish_calls(&mut own, plan.process.dumpable);
        }
        Batches {
            join: join.map(join_batch),
            own_ids: join.and_then(|_| OwnIds::new(&plan.threads)),
            child: batch(false),
            listener: (!seed_has_3).then(|| batch(true)),
            shared_filters: (filters.count() > 0).then_some(filters),
            confine: (own.count() > 0).then_some(own),
            process: kernel_state::process_batch(&plan.process, main),
            threads: plan.threads[1..]
                .iter()
                .map(|t| {
                    let mut b = kernel_state::thread_batch(t);
                    confine::confine_calls(&mut b, &t.creds, host, shared, t.tid);
                    b
                })
                .collect(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Batch> {
        self.join
            .iter()
            .chain(self.own_ids.as_ref().map(OwnIds::batch))
            .chain([&self.child])
            .chain(self.listener.as_ref())
            .chain(self.shared_filters.as_ref())
            .chain(self.confine.as_ref())
            .chain([&self.process])
            .chain(&self.threads)
    }

    fn encode(&self, at: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for b in self.all() {
            out.extend(b.encode(at + out.len() as u64));
        }
        out
    }

    fn place(&self, at: u64) -> PlacedBatches {
        let mut next = at;
        let mut place = |b: &Batch| {
            let p = Placed {
                at: next,
                labels: b.labels(),
            };
            next += b.len();
            p
        };
        PlacedBatches {
            join: self.join.as_ref().map(&mut place),
            own_ids: self
                .own_ids
                .as_ref()
                .map(|ids| ids.place(place(ids.batch()).at)),
            child: place(&self.child),
            listener: self.listener.as_ref().map(&mut place),
            shared_filters: self.shared_filters.as_ref().map(&mut place),
            confine: self.confine.as_ref().map(&mut place),
            process: place(&self.process),
            threads: self.threads.iter().map(place).collect(),
        }
    }
}

/// A child's ptrace options (inherited from the replica), with its seccomp filters suspended
/// for the calls we make in it until it is let go.
fn child_options() -> Options {
    Options::PTRACE_O_TRACEFORK
        | Options::PTRACE_O_TRACECLONE
        | Options::PTRACE_O_EXITKILL
        | mitosis_sys::ptrace::suspend_seccomp()
}

/// Runs a placed batch in a stopped tracee through the trampoline at `at`.
pub(crate) fn run_batch(t: &mut Tracee, at: u64, batch: &Placed) -> Result<(), RestoreError> {
    begin_batch(t, at, batch)?;
    end_batch(t, batch)
}

/// Lets stopped `t` run `batch` (the trampoline's batch runner at `at`); [`end_batch`] waits
/// for it. Threads begun one after the other run their batches side by side.
fn begin_batch(t: &mut Tracee, at: u64, batch: &Placed) -> Result<(), RestoreError> {
    if batch.labels.is_empty() {
        return Ok(());
    }
    let mut regs = t.regs().map_err(RestoreError::Trace)?;
    regs.rip = at;
    regs.rdi = batch.at;
    regs.rsi = batch.labels.len() as u64;
    regs.orig_rax = u64::MAX;
    t.set_regs(&regs).map_err(RestoreError::Trace)?;
    t.cont().map_err(RestoreError::Trace)
}

/// Waits for `t` to stop at the end of `batch` (begun with [`begin_batch`]), and says which
/// call failed if one did.
fn end_batch(t: &mut Tracee, batch: &Placed) -> Result<(), RestoreError> {
    if batch.labels.is_empty() {
        return Ok(());
    }
    match t.wait().map_err(RestoreError::Trace)? {
        Stop::Signal(libc::SIGTRAP) => {}
        other => return Err(RestoreError::Died(format!("{other:?}"))),
    }
    build::check_batch(t, &batch.labels)
}

/// The batch a child of a containerized seed runs first: join the container's namespaces
/// but the pid one (set by the replica for the clone) through the pidfd at [`JOIN_FD`], close
/// it, and enter the seed's working directory there.
fn join_batch(join: &JoinSpec) -> Batch {
    let mut b = Batch::default();
    let flags = (join.namespaces & !libc::CLONE_NEWPID) as u64;
    b.call(
        libc::SYS_setns,
        &[JOIN_FD.into(), flags.into()],
        "join the container's namespaces",
    );
    b.call(
        libc::SYS_close,
        &[JOIN_FD.into()],
        "close the container's pidfd",
    );
    let cwd = b.c_string(&join.cwd);
    b.call(libc::SYS_chdir, &[cwd], format!("enter {}", join.cwd));
    b
}

/// mlock2's flag: lock pages as they fault in rather than now.
const MLOCK_ONFAULT: u64 = 1;

/// The batch each child runs right after the fork (and its join): die with the daemon, take
/// its stdio (and listening socket) from the replica's channel, drop the channel, give shared
/// memory a fresh mapping of its own, register the main thread's robust list, and recreate
/// the seed's private kernel objects at their descriptor numbers.
fn child_batch(chan_fd: i32, plan: &Plan, files: &BTreeSet<i32>, listener: bool) -> Batch {
    let mut b = Batch::default();
    b.call(
        libc::SYS_prctl,
        &[
            (libc::PR_SET_PDEATHSIG as u64).into(),
            (libc::SIGKILL as u64).into(),
        ],
        "die with the daemon",
    );
    // recvmsg: one byte, and the descriptors in a control buffer.
    let byte = b.bytes(&[0; 8]);
    let iov = b.words(vec![byte, 1u64.into()]);
    let cmsg = b.bytes(&[0; CMSG_SPACE]);
    // struct msghdr: name, namelen(+pad), iov, iovlen, control, controllen, flags(+pad).
    let msg = b.words(vec![
        0u64.into(),
        0u64.into(),
        iov,
        1u64.into(),
        cmsg,
        (CMSG_SPACE as u64).into(),
        0u64.into(),
    ]);
    b.call(
        libc::SYS_recvmsg,
        &[chan_fd.into(), msg, 0u64.into()],
        "receive stdio",
    );
    b.call(
        libc::SYS_close,
        &[chan_fd.into()],
        "close the replica's channel",
    );
    let mut open: BTreeSet<i32> = files.iter().copied().chain(0..3).collect();
    if listener {
        // The socket arrived right after stdio: fd 3 is free (the seed does not use it).
        open.insert(LISTEN_FD);
    }
    for m in plan.maps.iter().filter(|m| m.fresh_in_each_child()) {
        let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
        b.call(
            libc::SYS_mmap,
            &[
                m.start.into(),
                m.len.into(),
                m.prot.into(),
                flags.into(),
                Arg::Val(u64::MAX),
                0u64.into(),
            ],
            format!("fresh shared memory at {:#x}", m.start),
        );
    }
    for m in plan.maps.iter().filter(|m| m.dont_fork) {
        b.call(
            libc::SYS_madvise,
            &[m.start.into(), m.len.into(), libc::MADV_DONTFORK.into()],
            format!("keep {:#x} out of the child's own forks", m.start),
        );
    }
    kernel_state::robust_list_call(&mut b, &plan.threads[0]);
    kernel_state::tid_address_call(&mut b, &plan.threads[0]);
    // Process-wide, but a fork does not pass it on.
    if plan.process.child_subreaper {
        b.call(
            libc::SYS_prctl,
            &[(libc::PR_SET_CHILD_SUBREAPER as u64).into(), 1u64.into()],
            "become a child subreaper",
        );
    }
    kernel_state::object_calls(&mut b, &plan.objects, &open);
    // After every mapping is in place (a memfd's replaces its placeholder).
    // A fork does not pass locks on. Locked on fault: populating now would fault on pages
    // nobody serves until the child runs; they come in when touched, and stay.
    for m in plan.maps.iter().filter(|m| m.locked) {
        b.call(
            libc::SYS_mlock2,
            &[m.start.into(), m.len.into(), MLOCK_ONFAULT.into()],
            format!("lock {:#x}-{:#x}", m.start, m.start + m.len),
        );
    }
    b
}

impl Replica {
    pub fn pid(&self) -> i32 {
        self.spawned.pid
    }

    /// Forks a child with `stdio` (and `listener` at fd 3). `forks` yields the child's
    /// userfaultfd, read from the replica's FORK event by the async side while the fork waits.
    pub fn fork(
        &mut self,
        stdio: [OwnedFd; 3],
        listener: Option<OwnedFd>,
        forks: &Receiver<Userfaultfd>,
        join: Option<Join>,
    ) -> Result<Forked, RestoreError> {
        let t0 = Instant::now();
        if self.unfinished.is_some() {
            return Err(RestoreError::Channel("the replica is not finished".into()));
        }
        if join.is_some() != self.join_batch.is_some() {
            return Err(RestoreError::Channel(
                "a child must join a container exactly when its seed ran in one".into(),
            ));
        }
        if listener.is_some() && self.listener_batch.is_none() {
            return Err(RestoreError::Channel(format!(
                "the seed holds fd {LISTEN_FD}, where a listening socket would go"
            )));
        }
        let tracee = &mut self.spawned.tracee;
        let insn = self.at + trampoline::syscall_offset();
        let saved = tracee.regs().map_err(RestoreError::Trace)?;
        let init = join.as_ref().map(|j| j.init_pid);
        let mut join_us = 0;
        let own = init.and(self.own_ids.as_ref().map(|ids| ids.main));
        let result = Self::clone_child(tracee, insn, init, self.tid_clone, own, &mut join_us);
        let clone_us = t0.elapsed().as_micros() as u64;
        tracee.set_regs(&saved).map_err(RestoreError::Trace)?;
        let (result, own_ids) = result?;
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
        let mut threads = Vec::new();
        let started = self.start_child(
            &mut child,
            &mut threads,
            (stdio, listener),
            forks,
            (before_run, own_ids),
            &mut join_us,
        );
        match started {
            Ok(uffd) => {
                for t in threads {
                    t.detach().map_err(RestoreError::Trace)?;
                }
                child.detach().map_err(RestoreError::Trace)?;
                tracing::debug!(pid, clone_us, join_us, "forked");
                Ok(Forked {
                    pid,
                    pidfd,
                    uffd,
                    fork_us: t0.elapsed().as_micros() as u64,
                    join_us,
                })
            }
            Err(e) => {
                child.kill();
                // The group is dead; reap the threads we trace.
                threads.into_iter().for_each(Tracee::kill);
                Err(e)
            }
        }
    }

    /// Injects the clone into the replica, first moving its pid namespace for children to
    /// that of `init` (the container to join), timed into `join_us`. With `own`, the child
    /// tries its seed's own id there first ([`ids::clone_as_seed`]); says if it got it.
    fn clone_child(
        tracee: &mut Tracee,
        insn: u64,
        init: Option<i32>,
        (tid_flags, child_tid): (i32, u64),
        own: Option<u64>,
        join_us: &mut u64,
    ) -> Result<(mitosis_sys::ptrace::SyscallResult, bool), RestoreError> {
        let step = |step: &str, ret: i64| RestoreError::Step {
            step: step.into(),
            source: std::io::Error::from_raw_os_error(-ret as i32),
        };
        let mut call =
            |nr: i64, args: [u64; 6]| tracee.syscall(insn, nr, args).map_err(RestoreError::Trace);
        let t0 = Instant::now();
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
        *join_us += t0.elapsed().as_micros() as u64;
        let flags = (libc::CLONE_PARENT | libc::SIGCHLD | tid_flags) as u64;
        let result = ids::clone_as_seed(&mut call, own, [flags, 0, child_tid]);
        if init.is_some() {
            // The child has its copy; the replica keeps no descriptor of a container.
            call(libc::SYS_close, [JOIN_FD, 0, 0, 0, 0, 0])?;
        }
        result
    }

    /// Runs the child's batches (its join first, timed into `join_us`) and starts its threads.
    fn start_child(
        &self,
        child: &mut Tracee,
        threads: &mut Vec<Tracee>,
        (stdio, listener): ([OwnedFd; 3], Option<OwnedFd>),
        forks: &Receiver<Userfaultfd>,
        (before_run, own_ids): (BeforeRun, bool),
        join_us: &mut u64,
    ) -> Result<Userfaultfd, RestoreError> {
        let t0 = Instant::now();
        let uffd = forks
            .recv_timeout(FORK_UFFD_WAIT)
            .map_err(|_| RestoreError::Channel("the fork's userfaultfd never arrived".into()))?;
        let uffd_us = t0.elapsed().as_micros() as u64;
        child.wait_for_event_stop().map_err(RestoreError::Trace)?;
        if self.suspend_seccomp {
            child
                .set_options(child_options())
                .map_err(RestoreError::Trace)?;
        }
        // The batch replaces the shared mappings; registered, that would block the child on
        // an unmap event nobody reads yet. They are registered again once replaced.
        for &(start, len) in &self.shared {
            uffd.unregister(start, len)
                .map_err(|source| RestoreError::Step {
                    step: format!("unregister shared memory {start:#x}+{len:#x}"),
                    source,
                })?;
        }
        let joining = Instant::now();
        if let Some(join) = &self.join_batch {
            run_batch(child, self.at, join)?;
        }
        if let Some(before_run) = before_run {
            before_run(child.pid()).map_err(|source| RestoreError::Step {
                step: "put the child into its container's cgroup".into(),
                source,
            })?;
        }
        *join_us += joining.elapsed().as_micros() as u64;
        let raw: Vec<i32> = stdio
            .iter()
            .chain(listener.as_ref())
            .map(|fd| fd.as_raw_fd())
            .collect();
        fdpass::send(self.spawned.chan.as_raw_fd(), b"s", &raw)
            .map_err(|e| RestoreError::Channel(e.to_string()))?;
        let batch = match listener {
            Some(_) => self.listener_batch.as_ref().expect("checked in fork"),
            None => &self.batch,
        };
        drop((stdio, listener));
        run_batch(child, self.at, batch)?;
        let batch_us = t0.elapsed().as_micros() as u64;
        for &(start, len) in &self.shared {
            uffd.register(start, len)
                .map_err(|source| RestoreError::Step {
                    step: format!("register shared memory {start:#x}+{len:#x}"),
                    source,
                })?;
        }
        if let Some(filters) = &self.shared_filters {
            run_batch(child, self.at, filters)?;
        }
        // Threads come last: they are created in the container's cgroup and namespaces.
        self.start_threads(child, threads, own_ids)?;
        // The main thread's credentials go last: until now it creates what needs the
        // daemon's (namespaces joined, threads started with credentials of their own).
        if let Some(confine) = &self.confine {
            run_batch(child, self.at, confine)?;
        }
        // Last: a signal queued now stays pending until the child runs.
        continuation::run(&self.continuation, child, threads, self.at)?;
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
            total_us = t0.elapsed().as_micros() as u64,
            "child started"
        );
        Ok(uffd)
    }

    /// Clones the seed's other threads in the stopped child: each registers its robust list,
    /// rseq area and alternate stack, then takes the seed thread's FPU state, signal mask and
    /// registers. They stay stopped (in `threads`) until the whole child is ready. All are
    /// cloned first, then their batches run side by side (each is a thread's own calls), so
    /// their stops and wake-ups overlap. With `own_ids` each asks for its seed thread's own
    /// id first ([`ids`]).
    fn start_threads(
        &self,
        child: &mut Tracee,
        threads: &mut Vec<Tracee>,
        own_ids: bool,
    ) -> Result<(), RestoreError> {
        let insn = self.at + trampoline::syscall_offset();
        let own_args = self.own_ids.as_ref().filter(|_| own_ids);
        for (i, (seed, _)) in self.threads.iter().enumerate() {
            let own = own_args.map(|ids| ids.threads[i]);
            let rsp = words_to_regs(&seed.regs).rsp;
            let (tid_flags, child_tid) = tid_clone(seed);
            let flags = (THREAD_FLAGS | tid_flags) as u64;
            let call = |nr, args| child.syscall(insn, nr, args).map_err(RestoreError::Trace);
            let (r, _) = ids::clone_as_seed(call, own, [flags, rsp, child_tid])?;
            let tid = match r.new_child {
                Some(tid) if r.ret > 0 => tid,
                _ => {
                    return Err(RestoreError::Step {
                        step: format!("start thread {} of the seed", seed.tid),
                        source: std::io::Error::from_raw_os_error(-r.ret as i32),
                    });
                }
            };
            threads.push(Tracee::adopt(tid));
            let t = threads.last_mut().expect("just pushed");
            t.wait_for_event_stop().map_err(RestoreError::Trace)?;
            if self.suspend_seccomp {
                t.set_options(child_options())
                    .map_err(RestoreError::Trace)?;
            }
        }
        for (t, (_, batch)) in threads.iter_mut().zip(&self.threads) {
            begin_batch(t, self.at, batch)?;
        }
        for (t, (seed, batch)) in threads.iter_mut().zip(&self.threads) {
            end_batch(t, batch)?;
            let regs = resume_point(&words_to_regs(&seed.regs), RestartFor::OtherTask);
            let step = |what: &str| {
                let step = format!("{what} of thread {}", seed.tid);
                move |source| RestoreError::Step { step, source }
            };
            t.set_xstate(&seed.xstate)
                .map_err(step("load the FPU state"))?;
            t.set_sigmask(seed.sigmask)
                .map_err(step("set the signal mask"))?;
            t.set_regs(&regs).map_err(step("set the registers"))?;
        }
        Ok(())
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

    /// A host whose credentials are the test seeds' (the defaults): no confinement calls.
    fn same_as_seed() -> HostCreds {
        HostCreds {
            creds: Default::default(),
            last_cap: 40,
        }
    }
    use mitosis_sys::PAGE_SIZE;

    fn plan_with(files: &[i32]) -> Plan {
        let shared = super::super::MapStep {
            start: 0x1000_0000,
            len: 2 * PAGE_SIZE,
            prot: 3,
            flags: (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64,
            file: None,
            offset: 0,
            dont_fork: false,
            mem_file: false,
            locked: false,
        };
        super::super::plan::sample(vec![shared], files)
    }

    fn words(b: &Batch) -> Vec<u64> {
        b.encode(0x5000_0000)
            .chunks(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Records of 8 words: number, six arguments, expected result.
    const RECORD: usize = 8;

    fn numbers(b: &Batch) -> Vec<u64> {
        let w = words(b);
        (0..b.count() as usize).map(|i| w[i * RECORD]).collect()
    }

    #[test]
    fn child_batch_takes_stdio_then_maps_then_registers() {
        let plan = plan_with(&[]);
        let b = child_batch(70, &plan, &BTreeSet::new(), false);
        let w = words(&b);
        let r = RECORD;
        assert_eq!(
            numbers(&b),
            [
                libc::SYS_prctl,
                libc::SYS_recvmsg,
                libc::SYS_close,
                libc::SYS_mmap,
                libc::SYS_set_robust_list
            ]
            .map(|n| n as u64)
        );
        // recvmsg(70, msghdr, 0) whose iovec points at one byte.
        assert_eq!(w[r + 1], 70);
        let msg = ((w[r + 2] - 0x5000_0000) / 8) as usize;
        let iov = ((w[msg + 2] - 0x5000_0000) / 8) as usize;
        assert_eq!(w[iov + 1], 1);
        assert_eq!(w[msg + 5], CMSG_SPACE as u64);
        assert_eq!(w[3 * r + 1], 0x1000_0000);
    }

    #[test]
    fn a_listener_needs_fd_3_free_in_the_seed() {
        assert!(
            Batches::new(&plan_with(&[3]), None, &same_as_seed())
                .listener
                .is_none()
        );
        let plan = plan_with(&[4]);
        let b = Batches::new(&plan, None, &same_as_seed());
        let (plain, listen) = (b.child.labels(), b.listener.unwrap().labels());
        assert_eq!(plain, listen);
    }

    #[test]
    fn a_child_joins_its_container_in_a_batch_of_its_own() {
        let plan = plan_with(&[]);
        let spec = JoinSpec {
            namespaces: libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWNS,
            cwd: "/opt/fn".into(),
        };
        let joined = Batches::new(&plan, Some(&spec), &same_as_seed());
        let join = joined.join.as_ref().expect("a join batch");
        assert_eq!(
            numbers(join),
            [libc::SYS_setns, libc::SYS_close, libc::SYS_chdir].map(|n| n as u64)
        );
        // setns(JOIN_FD, every namespace but the pid one, which the replica set).
        let w = words(join);
        assert_eq!(w[1], JOIN_FD);
        assert_eq!(w[2], (libc::CLONE_NEWNET | libc::CLONE_NEWNS) as u64);
        // The rest of the child's batch is the same as without a container.
        let plain = Batches::new(&plan, None, &same_as_seed());
        assert!(plain.join.is_none());
        assert_eq!(joined.child.labels(), plain.child.labels());
        // Laid out first, before the batches every child runs.
        let placed = joined.place(0x5000_0000);
        assert_eq!(placed.join.unwrap().at, 0x5000_0000);
        assert_eq!(placed.child.at, 0x5000_0000 + join.len());
    }
}
