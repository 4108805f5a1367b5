//! Capturing a running process as a seed.
//!
//! Every thread of the seed is stopped only long enough to read its state (registers, FPU,
//! signal mask, rseq, robust list, tid address, alternate stack) and its descriptors, and to
//! run two system calls in the main thread: `brk(0)` (the exact break, which /proc does not
//! show) and a `clone` that creates its *twin*.
//! The twin is a copy-on-write snapshot that never runs: it is the page source children read,
//! so the seed runs on and its later writes stay invisible to children. Everything else
//! (layout, page lists, file identities) is read from the twin after the seed is released.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Instant;

use mitosis_descriptor::{
    Backing, Descriptor, FileIdentity, KernelObject, MemFileMapping, PROT_EXEC, PROT_READ,
    PROT_WRITE, PageSet, ProcessState, Thread, Vdso, Vma,
};
use mitosis_sys::PAGE_SIZE;
use mitosis_sys::mem::{PageState, RemoteMemory, StateRun};
use mitosis_sys::ptrace::{self, Regs, Tracee};
use thiserror::Error;

use crate::capture::{self, threads, vmflags};
use crate::filecache::FileCache;
use crate::procfs::{self, MapsEntry};
use crate::regs::{RestartFor, resume_point};

#[derive(Debug, Error)]
pub enum PrepareError {
    #[error("no process with pid {0}")]
    NoSuchProcess(i32),
    #[error("pid {pid} cannot be forked: its thread {tid} is already traced by pid {tracer}")]
    AlreadyTraced { pid: i32, tid: i32, tracer: i32 },
    #[error("pid {pid} cannot be forked: its thread {tid} is stuck in uninterruptible sleep")]
    Uninterruptible { pid: i32, tid: i32 },
    #[error("cannot trace pid {pid}: {source}")]
    Trace { pid: i32, source: io::Error },
    #[error("pid {pid}: {what} failed: {source}")]
    Inject {
        pid: i32,
        what: &'static str,
        source: io::Error,
    },
    #[error("reading {path}: {source}")]
    Proc { path: String, source: io::Error },
    #[error("pid {pid}: {reason}")]
    Malformed { pid: i32, reason: MalformedProc },
    #[error("pid {pid} has a mapping mitosis cannot fork: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("pid {pid} has state mitosis cannot carry: {what}")]
    Uncarried { pid: i32, what: String },
    #[error("pid {pid} has no `syscall` instruction mitosis can borrow (no vDSO)")]
    NoSyscallInsn { pid: i32 },
}

/// /proc content that did not parse.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct MalformedProc(pub(crate) String);

/// The frozen copy of a seed. It never runs; dropping it does not kill it: call
/// [`Twin::release`] from the tracer thread.
pub struct Twin {
    tracee: Tracee,
    memory: Arc<RemoteMemory>,
    seed_pid: i32,
}

impl Twin {
    pub fn pid(&self) -> i32 {
        self.tracee.pid()
    }

    pub fn memory(&self) -> &Arc<RemoteMemory> {
        &self.memory
    }

    /// Kills the twin and has the seed reap it, so no zombie stays behind. Must run on the
    /// thread that prepared it.
    pub fn release(self, syscall_insn: u64) {
        release_twin(self.tracee, self.seed_pid, syscall_insn);
    }
}

/// Kills `twin`, the seed's child (without exit signal), and reaps it inside the seed: only
/// its parent can, and no wait() of the seed's own would (a child without exit signal is
/// seen by __WALL or __WCLONE waits alone).
fn release_twin(twin: Tracee, seed_pid: i32, syscall_insn: u64) {
    let twin_pid = twin.pid();
    twin.kill();
    if let Ok(mut seed) = Tracee::seize(seed_pid, nix::sys::ptrace::Options::empty()) {
        if seed.interrupt().is_ok() {
            reap_in(&mut seed, syscall_insn, twin_pid);
        }
        let _ = seed.detach();
    }
}

/// Runs `wait4(twin, __WALL)` in the stopped `seed` and puts its registers back.
fn reap_in(seed: &mut Tracee, syscall_insn: u64, twin_pid: i32) {
    if let Ok(saved) = seed.regs() {
        let _ = seed.syscall(
            syscall_insn,
            libc::SYS_wait4,
            [twin_pid as u64, 0, libc::__WALL as u64, 0, 0, 0],
        );
        let _ = seed.set_regs(&resume_point(&saved, RestartFor::SameTask));
    }
}

/// Reaps a twin a crashed daemon left: killed with its tracer, it is a zombie child of its
/// seed. Only a zombie child of `seed_pid` is touched; returns whether it was reaped.
pub fn reap_orphan_twin(seed_pid: i32, twin_pid: i32) -> Result<bool, PrepareError> {
    let zombie_child = fs::read_to_string(format!("/proc/{twin_pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(") ")?.1.to_string();
            let mut f = rest.split_whitespace();
            let state = f.next()?;
            let ppid: i32 = f.next()?.parse().ok()?;
            Some(state == "Z" && ppid == seed_pid)
        })
        .unwrap_or(false);
    if !zombie_child {
        return Ok(false);
    }
    let mut seed =
        Tracee::seize(seed_pid, nix::sys::ptrace::Options::empty()).map_err(|source| {
            PrepareError::Trace {
                pid: seed_pid,
                source,
            }
        })?;
    let reaped = seed
        .interrupt()
        .and_then(|_| seed.regs())
        .map_err(|source| PrepareError::Trace {
            pid: seed_pid,
            source,
        })
        .and_then(|regs| find_syscall_insn(seed_pid, &regs))
        .map(|insn| reap_in(&mut seed, insn, twin_pid));
    let _ = seed.detach();
    reaped?;
    Ok(!std::path::Path::new(&format!("/proc/{twin_pid}")).exists())
}

/// A prepared seed: its twin and the descriptor children are built from.
pub struct Prepared {
    pub twin: Twin,
    pub descriptor: Descriptor,
    /// Address of a `syscall` instruction in the seed (and twin), for later injections.
    pub syscall_insn: u64,
    /// How long the seed itself was stopped.
    pub stopped_us: u64,
}

fn proc_err(path: String) -> impl FnOnce(io::Error) -> PrepareError {
    move |source| PrepareError::Proc { path, source }
}

fn read_proc(path: String) -> Result<String, PrepareError> {
    fs::read_to_string(&path).map_err(proc_err(path))
}

/// Captures `pid` as seed `seed_id`. Must run on the daemon's tracer thread. `released` is
/// called once the seed runs again (the rest of the capture reads its twin): work on the seed
/// itself that would slow its stop (smaps takes its memory lock) can start then.
pub fn prepare(
    pid: i32,
    seed_id: u64,
    files: &FileCache,
    released: impl FnOnce(),
) -> Result<Prepared, PrepareError> {
    let mut released = Some(released);
    let mut on_release = || {
        if let Some(f) = released.take() {
            f()
        }
    };
    capture::creds::check_namespace(pid)?;
    let cwd = fs::read_link(format!("/proc/{pid}/cwd"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());

    // A fork leaves MADV_DONTFORK ranges (V8's heap) out of the twin, and VmFlags (locked,
    // grows down, may be made writable) show only in smaps. Reading it costs milliseconds:
    // it is read only when something needs it (the twin is smaller than the seed, the seed
    // has memory locked, or a shared file mapping is read-only), and the twin made again
    // with the DONTFORK ranges let through.
    let mut snap = snapshot(pid, &[], &mut on_release)?;
    let mut maps = twin_maps(&snap);
    let mut dont_fork = Vec::new();
    let mut smaps = Vec::new();
    let lost = lost_in_twin(&snap);
    if let Ok(m) = &maps
        && (lost
            || vmflags::needs_smaps(pid, m)
            || vmflags::grows_down_in_twin(&mut snap.twin.tracee, snap.syscall_insn, m))
    {
        smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map(|s| procfs::parse_smaps(&s))
            .unwrap_or_default();
    }
    if maps.is_ok() && lost {
        let lost = procfs::dont_fork_of(&smaps);
        if let Some(special) = lost.iter().find(|m| m.special) {
            snap.twin.release(snap.syscall_insn);
            return Err(PrepareError::Unsupported {
                pid,
                what: format!("{} at {:#x}", special.name, special.start),
            });
        }
        dont_fork = lost.iter().map(|m| (m.start, m.end)).collect();
        if !dont_fork.is_empty() {
            snap.twin.release(snap.syscall_insn);
            snap = snapshot(pid, &dont_fork, &mut on_release)?;
            maps = twin_maps(&snap);
        }
    }
    let maps = match maps {
        Ok(maps) if snap.fds.refused.is_empty() => maps,
        Ok(_) => {
            snap.twin.release(snap.syscall_insn);
            return Err(PrepareError::Uncarried {
                pid,
                what: snap.fds.refused.join("; "),
            });
        }
        Err(e) => {
            snap.twin.release(snap.syscall_insn);
            return Err(e);
        }
    };
    match capture::children::zombies(pid, snap.twin.pid(), &snap.process.sigactions) {
        Ok(zombies) => snap.process.zombies = zombies,
        Err(e) => {
            snap.twin.release(snap.syscall_insn);
            return Err(e);
        }
    }
    link_mem_files(&mut snap.fds, &maps);
    let flags = vmflags::VmaFlags {
        dont_fork: &dont_fork,
        smaps: &smaps,
    };
    match describe(&snap.twin, &maps, seed_id, files, &flags) {
        Ok(mut descriptor) => {
            descriptor.threads = snap.threads;
            descriptor.process = snap.process;
            descriptor.mm.brk = snap.brk;
            descriptor.files = snap.fds.files;
            descriptor.objects = snap.fds.objects;
            descriptor.dropped = snap.fds.dropped;
            descriptor.cwd = cwd;
            Ok(Prepared {
                twin: snap.twin,
                descriptor,
                syscall_insn: snap.syscall_insn,
                stopped_us: snap.stopped_us,
            })
        }
        Err(e) => {
            snap.twin.release(snap.syscall_insn);
            Err(e)
        }
    }
}

/// Gives each memfd or deleted file the seed's shared mappings of it: a child maps its own
/// copy there, so the descriptor and the memory stay one object.
fn link_mem_files(fds: &mut capture::fds::Fds, maps: &[MapsEntry]) {
    for &(index, dev, ino) in &fds.mem_files {
        let Some(KernelObject::MemFile { mappings, .. }) = fds.objects.get_mut(index) else {
            continue;
        };
        let of_it = maps
            .iter()
            .filter(|m| m.shared && m.dev == dev && m.inode == ino);
        mappings.extend(of_it.map(|m| MemFileMapping {
            start: m.start,
            len: m.end - m.start,
            prot: (m.read as u8 * PROT_READ)
                | (m.write as u8 * PROT_WRITE)
                | (m.exec as u8 * PROT_EXEC),
            offset: m.offset,
        }));
    }
}

/// A twin and the seed state read while the seed was stopped.
struct Snapshot {
    twin: Twin,
    threads: Vec<Thread>,
    fds: capture::fds::Fds,
    brk: u64,
    process: ProcessState,
    syscall_insn: u64,
    stopped_us: u64,
    seed_vm_pages: Option<u64>,
}

/// Stops the seed, captures its threads and descriptors, clones the twin (letting the
/// `dont_fork` ranges through) and lets the seed go on; then reads the process state.
fn snapshot(
    pid: i32,
    dont_fork: &[(u64, u64)],
    on_release: &mut dyn FnMut(),
) -> Result<Snapshot, PrepareError> {
    let stop_start = Instant::now();
    let mut group = threads::stop_all(pid)?;
    let frozen = freeze(&mut group, pid, dont_fork);
    // Whatever happened, the seed goes on running.
    group.release();
    on_release();
    let Frozen {
        mut twin,
        kept,
        seed_vm_pages,
        threads,
        fds,
        brk,
        insn: syscall_insn,
    } = frozen?;
    let stopped_us = stop_start.elapsed().as_micros() as u64;

    let process = match capture::process::capture(pid, &mut twin, syscall_insn) {
        Ok(p) => ProcessState {
            child_subreaper: kept.subreaper,
            pending: kept.pending,
            itimers: kept.itimers,
            posix_timers: kept.posix_timers,
            ..p
        },
        Err(e) => {
            release_twin(twin, pid, syscall_insn);
            return Err(e);
        }
    };
    // The twin must not hold the seed's files open (a pipe's reader would never see EOF).
    let twin_pid = twin.pid();
    let close = twin.syscall(
        syscall_insn,
        libc::SYS_close_range,
        [0, u32::MAX as u64, 0, 0, 0, 0],
    );
    if let Err(source) = close {
        release_twin(twin, pid, syscall_insn);
        return Err(PrepareError::Inject {
            pid,
            what: "closing the twin's files",
            source,
        });
    }
    let memory = match RemoteMemory::open(twin_pid, false) {
        Ok(m) => m,
        Err(source) => {
            release_twin(twin, pid, syscall_insn);
            return Err(PrepareError::Proc {
                path: format!("/proc/{twin_pid}/mem"),
                source,
            });
        }
    };
    Ok(Snapshot {
        twin: Twin {
            tracee: twin,
            memory: Arc::new(memory),
            seed_pid: pid,
        },
        threads,
        fds,
        brk,
        process,
        syscall_insn,
        stopped_us,
        seed_vm_pages,
    })
}

fn twin_maps(snap: &Snapshot) -> Result<Vec<MapsEntry>, PrepareError> {
    let pid = snap.twin.pid();
    procfs::parse_maps(&read_proc(format!("/proc/{pid}/maps"))?).map_err(|r| {
        PrepareError::Malformed {
            pid,
            reason: MalformedProc(r),
        }
    })
}

/// True if the twin lacks some of the seed's memory: fork leaves MADV_DONTFORK ranges out,
/// and out of the child's address-space size. The seed's size was read while it was
/// stopped for the fork; the twin's never changes. Unknown counts as lacking (smaps is then
/// read for nothing).
fn lost_in_twin(snap: &Snapshot) -> bool {
    let twin = procfs::vm_pages(snap.twin.pid()).ok();
    !matches!((snap.seed_vm_pages, twin), (Some(seed), Some(twin)) if seed == twin)
}

/// Process-wide state a fork does not pass on, so read in the seed itself.
struct Kept {
    subreaper: bool,
    pending: Vec<mitosis_descriptor::PendingSignal>,
    itimers: Vec<mitosis_descriptor::IntervalTimer>,
    posix_timers: Vec<mitosis_descriptor::PosixTimer>,
}

struct Frozen {
    twin: Tracee,
    kept: Kept,
    /// The seed's address-space size at the fork, in pages.
    seed_vm_pages: Option<u64>,
    threads: Vec<Thread>,
    fds: capture::fds::Fds,
    brk: u64,
    insn: u64,
}

/// With every thread stopped: read their state and the descriptors, and clone the twin.
fn freeze(
    group: &mut threads::Group,
    pid: i32,
    dont_fork: &[(u64, u64)],
) -> Result<Frozen, PrepareError> {
    let inject = |what| move |source| PrepareError::Inject { pid, what, source };
    let main_regs = group.main().regs().map_err(inject("reading registers"))?;
    let insn = find_syscall_insn(pid, &main_regs)?;
    let mem = RemoteMemory::open(pid, false).map_err(proc_err(format!("/proc/{pid}/mem")))?;
    let mut captured = Vec::with_capacity(group.threads.len());
    for t in &mut group.threads {
        captured.push(threads::capture(pid, t, &mem, insn)?);
    }
    let subreaper = threads::child_subreaper(group.main(), &mem, insn)?;
    let tids: Vec<i32> = captured.iter().map(|t| t.tid).collect();
    let (itimers, posix_timers) = capture::timers::capture(pid, group.main(), &mem, insn, &tids)?;
    let pending = group
        .main()
        .pending_signals(true)
        .map_err(inject("reading the pending signals"))?;
    let pidfd = mitosis_sys::pidfd::open(pid).map_err(inject("opening a pidfd"))?;
    capture::timers::bring_timerfds_up_to_date(pid, group.main(), insn)?;
    let fds = capture::fds::capture(pid, &pidfd);
    let seed = group.main();
    let brk = seed
        .syscall(insn, libc::SYS_brk, [0; 6])
        .map_err(inject("brk(0)"))?
        .ret as u64;
    // A fork leaves MADV_DONTFORK ranges out: let the twin have them, then mark them again.
    let clone = advise(seed, insn, dont_fork, libc::MADV_DOFORK)
        .and_then(|_| {
            // clone(flags = 0): a plain copy-on-write child with no exit signal, invisible to
            // the seed's ordinary wait() calls. Only the calling thread is copied, which is all
            // a page source needs.
            seed.syscall(insn, libc::SYS_clone, [0; 6])
        })
        .and_then(|clone| advise(seed, insn, dont_fork, libc::MADV_DONTFORK).map(|_| clone))
        .map_err(inject("cloning the twin"));
    // Put the seed back where it was, with an interrupted system call set to restart.
    seed.set_regs(&resume_point(&main_regs, RestartFor::SameTask))
        .map_err(inject("restoring registers"))?;
    let clone = clone?;
    let twin_pid = match (clone.ret, clone.new_child) {
        (ret, Some(child)) if ret > 0 => child,
        (ret, _) => {
            return Err(PrepareError::Inject {
                pid,
                what: "cloning the twin",
                source: io::Error::from_raw_os_error((-ret) as i32),
            });
        }
    };
    // Still stopped: the size the twin must have if fork left nothing out.
    let seed_vm_pages = procfs::vm_pages(pid).ok();
    let mut twin = Tracee::adopt(twin_pid);
    let twin_ready = twin
        .wait_for_event_stop()
        .and_then(|_| twin.set_options(twin_options(&captured)));
    if let Err(source) = twin_ready {
        twin.kill();
        // The seed is still stopped: it reaps the twin now.
        reap_in(seed, insn, twin_pid);
        return Err(PrepareError::Inject {
            pid,
            what: "stopping the twin",
            source,
        });
    }
    Ok(Frozen {
        twin,
        kept: Kept {
            subreaper,
            pending: threads::pending_of(pending),
            itimers,
            posix_timers,
        },
        seed_vm_pages,
        threads: captured,
        fds,
        brk,
        insn,
    })
}

/// The twin dies with the daemon; the calls we inject into it bypass the seccomp filters it
/// inherited from the seed.
fn twin_options(threads: &[Thread]) -> nix::sys::ptrace::Options {
    let filtered = threads.iter().any(|t| !t.creds.seccomp.is_empty());
    if filtered {
        ptrace::exit_kill_options() | ptrace::suspend_seccomp()
    } else {
        ptrace::exit_kill_options()
    }
}

fn advise(seed: &mut Tracee, insn: u64, ranges: &[(u64, u64)], advice: i32) -> io::Result<()> {
    for &(start, end) in ranges {
        let ret = seed
            .syscall(
                insn,
                libc::SYS_madvise,
                [start, end - start, advice as u64, 0, 0, 0],
            )?
            .ret;
        if ret < 0 {
            return Err(io::Error::from_raw_os_error(-ret as i32));
        }
    }
    Ok(())
}

/// A `syscall` instruction to run injected calls from: the one the seed is stopped after, or
/// any `0f 05` byte pair in its vDSO (the CPU decodes from wherever rip points).
fn find_syscall_insn(pid: i32, regs: &Regs) -> Result<u64, PrepareError> {
    let mem = RemoteMemory::open(pid, false).map_err(proc_err(format!("/proc/{pid}/mem")))?;
    let mut two = [0u8; 2];
    if (regs.orig_rax as i64) >= 0
        && mem.read_exact(regs.rip - 2, &mut two).is_ok()
        && two == [0x0f, 0x05]
    {
        return Ok(regs.rip - 2);
    }
    let maps = procfs::parse_maps(&read_proc(format!("/proc/{pid}/maps"))?).map_err(|r| {
        PrepareError::Malformed {
            pid,
            reason: MalformedProc(r),
        }
    })?;
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or(PrepareError::NoSyscallInsn { pid })?;
    let mut text = vec![0u8; (vdso.end - vdso.start) as usize];
    mem.read_exact(vdso.start, &mut text)
        .map_err(proc_err(format!("/proc/{pid}/mem")))?;
    text.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|off| vdso.start + off as u64)
        .ok_or(PrepareError::NoSyscallInsn { pid })
}

/// Builds the descriptor's layout and page lists from the frozen twin.
fn describe(
    twin: &Twin,
    maps: &[MapsEntry],
    seed_id: u64,
    files: &FileCache,
    flags: &vmflags::VmaFlags,
) -> Result<Descriptor, PrepareError> {
    let pid = twin.pid();
    let malformed = |r: String| PrepareError::Malformed {
        pid,
        reason: MalformedProc(r),
    };
    let mm = procfs::parse_stat_mm(&read_proc(format!("/proc/{pid}/stat"))?).map_err(malformed)?;
    let auxv = procfs::parse_auxv(
        &fs::read(format!("/proc/{pid}/auxv")).map_err(proc_err(format!("/proc/{pid}/auxv")))?,
    );
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| {
            let path = p.to_str()?.to_string();
            let f = File::open(&p).ok()?;
            files.identify(&f, &path).ok()
        });

    let mut vmas = Vec::new();
    let mut vdso_block: Option<(u64, u64, u64)> = None;
    // The twin's existing pages in one page-table walk, for every mapping at once.
    let user = maps.iter().filter(|m| m.name != "[vsyscall]");
    let span = user
        .clone()
        .map(|m| m.start)
        .min()
        .zip(user.map(|m| m.end).max());
    // Any failure leaves the proven way: pagemap read mapping by mapping.
    let scanned = span.and_then(|(start, end)| {
        twin.memory
            .existing_runs(start, end)
            .inspect_err(|e| tracing::debug!(pid, "PAGEMAP_SCAN: {e}; reading pagemap"))
            .ok()
            .flatten()
    });
    let mut seen = Seen {
        scanned,
        ..Seen::default()
    };
    for m in maps {
        match m.name.as_str() {
            "[vsyscall]" => continue,
            "[vvar]" | "[vvar_vclock]" => {
                let b = vdso_block.get_or_insert((m.start, 0, 0));
                b.0 = b.0.min(m.start);
                continue;
            }
            "[vdso]" => {
                let b = vdso_block.get_or_insert((m.start, 0, 0));
                (b.1, b.2) = (m.start, m.end);
                continue;
            }
            _ => {}
        }
        let mut vma = describe_vma(twin, m, files, &mut seen)?;
        vma.dont_fork = flags
            .dont_fork
            .iter()
            .any(|&(s, e)| s <= m.start && m.end <= e);
        if let Some(f) = flags.of(m) {
            vma.grows_down |= f.has("gd");
            vma.may_write |= vma.shared && f.has("mw");
            vma.locked = f.has("lo");
            vma.lock_on_fault = f.has("lf");
        } else if vmflags::read_only_shared_file(m) {
            // The twin maps the same open files as the seed.
            vma.may_write |= vmflags::shared_file_writable(twin.pid(), m) == Some(true);
        }
        vmas.push(vma);
    }
    let vdso = match vdso_block {
        Some((block_start, vdso_start, vdso_end)) if vdso_end > 0 => {
            let mut text = vec![0u8; (vdso_end - vdso_start) as usize];
            twin.memory
                .read_exact(vdso_start, &mut text)
                .map_err(proc_err(format!("/proc/{pid}/mem")))?;
            Some(Vdso {
                block_start,
                vdso_start,
                vdso_end,
                hash: *blake3::hash(&text).as_bytes(),
            })
        }
        _ => None,
    };

    Ok(Descriptor {
        seed_id,
        arch: std::env::consts::ARCH.to_string(),
        threads: Vec::new(),
        process: Default::default(),
        mm,
        auxv,
        exe,
        vdso,
        vmas,
        cwd: None,
        files: Vec::new(),
        objects: Vec::new(),
        dropped: Vec::new(),
        container: None,
    })
}

/// What `describe` opened or identified once for all the mappings.
#[derive(Default)]
struct Seen {
    /// The twin's existing pages, when the kernel can scan for them (PAGEMAP_SCAN).
    scanned: Option<Vec<StateRun>>,
    /// The seed's memory, for the page states of shared mappings.
    seed_memory: Option<RemoteMemory>,
    /// Identities by (inode, path): a library has several mappings.
    files: HashMap<(u64, String), FileIdentity>,
}

/// The identity of the file `m` maps, if the file at its path is still that one (same device
/// and inode) and this host has hashed that version: one stat, where opening the mapping
/// through map_files costs several times more.
fn known_at_path(files: &FileCache, m: &MapsEntry) -> Option<FileIdentity> {
    let md = fs::metadata(&m.name).ok()?;
    let dev = (libc::major(md.dev()), libc::minor(md.dev()));
    (md.ino() == m.inode && dev == m.dev).then(|| files.known(&md, &m.name))?
}

/// The pages of `m` (indices from its start) within the `runs` whose state is `wanted`.
fn pages_in_runs(runs: &[StateRun], m: &MapsEntry, wanted: impl Fn(PageState) -> bool) -> PageSet {
    let first = runs.partition_point(|r| r.end <= m.start);
    let mut set = PageSet::default();
    for r in runs[first..].iter().take_while(|r| r.start < m.end) {
        if wanted(r.state) {
            let (start, end) = (r.start.max(m.start), r.end.min(m.end));
            set.push_run((start - m.start) / PAGE_SIZE, (end - start) / PAGE_SIZE);
        }
    }
    set
}

fn describe_vma(
    twin: &Twin,
    m: &MapsEntry,
    files: &FileCache,
    seen: &mut Seen,
) -> Result<Vma, PrepareError> {
    let pid = twin.pid();
    let pages = ((m.end - m.start) / PAGE_SIZE) as usize;
    let prot =
        (m.read as u8 * PROT_READ) | (m.write as u8 * PROT_WRITE) | (m.exec as u8 * PROT_EXEC);
    // Shared memory without a real file (MAP_SHARED|MAP_ANONYMOUS, SysV, memfd, POSIX shared
    // memory in /dev/shm, which no other host has) is carried as anonymous memory with its
    // content.
    let is_shmem = m.name.starts_with("/dev/zero")
        || m.name.starts_with("/SYSV")
        || m.name.starts_with("/memfd:")
        || m.name.starts_with("/dev/shm/");
    let file_backed = m.inode != 0 && m.name.starts_with('/') && !is_shmem;
    if file_backed && m.name.starts_with("/dev/") {
        return Err(PrepareError::Unsupported {
            pid: twin.seed_pid,
            what: format!("device mapping {}", m.name),
        });
    }
    // A kernel object's own memory (perf ring buffers, io_uring rings, BPF maps) means nothing
    // without the object, which no other process can get.
    if m.name.starts_with("anon_inode:") {
        return Err(PrepareError::Unsupported {
            pid: twin.seed_pid,
            what: format!("{} at {:#x}", m.name, m.start),
        });
    }
    let backing = if file_backed {
        let identity = match seen.files.get(&(m.inode, m.name.clone())) {
            Some(identity) => identity.clone(),
            None => {
                let identity = match known_at_path(files, m) {
                    Some(known) => known,
                    None => {
                        // map_files opens the exact file mapped, even if it was deleted or
                        // replaced since.
                        let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                        let file = File::open(&link).map_err(proc_err(link))?;
                        files
                            .identify(&file, &m.name)
                            .map_err(proc_err(m.name.clone()))?
                    }
                };
                seen.files
                    .insert((m.inode, m.name.clone()), identity.clone());
                identity
            }
        };
        let in_file = identity.size.saturating_sub(m.offset).div_ceil(PAGE_SIZE);
        Backing::File {
            file: identity,
            offset: m.offset,
            file_pages: in_file.min(pages as u64),
        }
    } else {
        Backing::Anonymous
    };
    let held = |s: PageState| match backing {
        // Private file pages the seed wrote are anonymous now: they are not in the file.
        Backing::File { .. } => s.exists() && !s.file && !m.shared,
        Backing::Anonymous => s.exists(),
    };
    let seed_pages = match &seen.scanned {
        Some(runs) if !m.shared => pages_in_runs(runs, m, held),
        // fork copies no page table entries for shared mappings, so the twin knows nothing
        // of them; their pages are the seed's (still shared with the twin).
        _ => {
            let states_of = if m.shared { twin.seed_pid } else { pid };
            let memory = if m.shared {
                match &mut seen.seed_memory {
                    Some(memory) => &*memory,
                    empty => &*empty.insert(
                        RemoteMemory::open(states_of, false)
                            .map_err(proc_err(format!("/proc/{states_of}/pagemap")))?,
                    ),
                }
            } else {
                &*twin.memory
            };
            let states = memory
                .page_states(m.start, pages)
                .map_err(proc_err(format!("/proc/{states_of}/pagemap")))?;
            PageSet::from_flags(states.into_iter().map(held))
        }
    };
    Ok(Vma {
        start: m.start,
        end: m.end,
        prot,
        shared: m.shared,
        grows_down: m.name == "[stack]",
        dont_fork: false,
        may_write: m.shared && m.write,
        locked: false,
        lock_on_fault: false,
        backing,
        seed_pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, end: u64, file: bool) -> StateRun {
        StateRun {
            start: start * PAGE_SIZE,
            end: end * PAGE_SIZE,
            state: PageState {
                present: true,
                swapped: false,
                file,
            },
        }
    }

    #[test]
    fn a_mapping_takes_its_share_of_the_scanned_runs() {
        // Pages 16..32 mapped; runs before, across both edges and inside it.
        let m = &procfs::parse_maps("00010000-00020000 rw-p 00000000 00:00 0\n").unwrap()[0];
        let runs = [
            run(2, 4, false),
            run(14, 18, false),
            run(18, 20, true),
            run(20, 21, false),
            run(25, 26, false),
            run(30, 40, false),
        ];
        let anon = pages_in_runs(&runs, m, |s| s.exists() && !s.file);
        assert_eq!(anon.runs(), &[(0, 2), (4, 1), (9, 1), (14, 2)]);
        let all = pages_in_runs(&runs, m, PageState::exists);
        assert_eq!(all.runs(), &[(0, 5), (9, 1), (14, 2)]);
        assert!(pages_in_runs(&runs[..1], m, PageState::exists).is_empty());
    }

    /// A maps line for `path` as the file there is now.
    fn mapping_of(path: &std::path::Path) -> MapsEntry {
        let md = fs::metadata(path).unwrap();
        let line = format!(
            "00400000-00401000 r--p 00000000 {:x}:{:x} {} {}\n",
            libc::major(md.dev()),
            libc::minor(md.dev()),
            md.ino(),
            path.display()
        );
        procfs::parse_maps(&line).unwrap().remove(0)
    }

    #[test]
    fn a_mapped_file_is_known_by_its_path_only_while_it_is_the_same_file() {
        let dir = std::env::temp_dir().join(format!("mitosis-known-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lib.so");
        fs::write(&path, b"version one").unwrap();
        let files = FileCache::new();
        let m = mapping_of(&path);
        assert!(known_at_path(&files, &m).is_none(), "not hashed yet");
        let one = files
            .identify(&File::open(&path).unwrap(), &m.name)
            .unwrap();
        assert_eq!(known_at_path(&files, &m), Some(one.clone()));
        let mut elsewhere = m.clone();
        elsewhere.dev.1 += 1;
        assert!(
            known_at_path(&files, &elsewhere).is_none(),
            "another device"
        );

        // Replaced (as a package upgrade does): the path now names another file, even once
        // that one is hashed too, so the mapping must be opened through map_files.
        let new = dir.join("lib.so.new");
        fs::write(&new, b"version two").unwrap();
        fs::rename(&new, &path).unwrap();
        files
            .identify(&File::open(&path).unwrap(), &m.name)
            .unwrap();
        assert!(known_at_path(&files, &m).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
