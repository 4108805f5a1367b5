//! Capturing a running process as a seed.
//!
//! Every thread of the seed is stopped only long enough to read its state (registers, FPU,
//! signal mask, rseq, robust list, tid address, alternate stack) and its descriptors, and to
//! run two system calls in the main thread: `brk(0)` (the exact break, which /proc does not
//! show) and a `clone` that creates its *twin*.
//! The twin is a copy-on-write snapshot that never runs: it is the page source children read,
//! so the seed runs on and its later writes stay invisible to children. Everything else
//! (layout, page lists, file identities) is read from the twin after the seed is released.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use mitosis_descriptor::{
    Backing, Descriptor, FileIdentity, PROT_EXEC, PROT_READ, PROT_WRITE, PageSet, ProcessState,
    Thread, Vdso, Vma,
};
use mitosis_sys::PAGE_SIZE;
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::ptrace::{self, Regs, Tracee};
use thiserror::Error;

use crate::capture::{self, threads};
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
    #[error("pid {pid} has no `syscall` instruction mitosis can borrow (no vDSO)")]
    NoSyscallInsn { pid: i32 },
}

/// /proc content that did not parse.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct MalformedProc(String);

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
        let twin = self.tracee.pid();
        self.tracee.kill();
        // The twin is the seed's child (without exit signal): reap it inside the seed.
        if let Ok(mut seed) = Tracee::seize(self.seed_pid, nix::sys::ptrace::Options::empty()) {
            if seed.interrupt().is_ok() {
                if let Ok(saved) = seed.regs() {
                    let _ = seed.syscall(
                        syscall_insn,
                        libc::SYS_wait4,
                        [twin as u64, 0, libc::__WALL as u64, 0, 0, 0],
                    );
                    let _ = seed.set_regs(&resume_point(&saved, RestartFor::SameTask));
                }
            }
            let _ = seed.detach();
        }
    }
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

/// Captures `pid` as seed `seed_id`. Must run on the daemon's tracer thread.
pub fn prepare(pid: i32, seed_id: u64, files: &FileCache) -> Result<Prepared, PrepareError> {
    let cwd = fs::read_link(format!("/proc/{pid}/cwd"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());

    // A fork leaves MADV_DONTFORK ranges (V8's heap) out of the twin. Only smaps tells which
    // ranges those are, and reading it costs milliseconds: it is read only when a mapping of
    // the seed is missing from the twin, and the twin made again with them let through.
    let mut snap = snapshot(pid, &[])?;
    let mut maps = twin_maps(&snap);
    let mut dont_fork = Vec::new();
    if maps.as_ref().is_ok_and(|maps| lost_in_twin(pid, maps)) {
        dont_fork = fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map(|s| procfs::parse_dont_fork(&s))
            .unwrap_or_default();
        if !dont_fork.is_empty() {
            snap.twin.release(snap.syscall_insn);
            snap = snapshot(pid, &dont_fork)?;
            maps = twin_maps(&snap);
        }
    }
    let maps = match maps {
        Ok(maps) => maps,
        Err(e) => {
            snap.twin.release(snap.syscall_insn);
            return Err(e);
        }
    };
    match describe(&snap.twin, &maps, seed_id, files, &dont_fork) {
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

/// A twin and the seed state read while the seed was stopped.
struct Snapshot {
    twin: Twin,
    threads: Vec<Thread>,
    fds: capture::fds::Fds,
    brk: u64,
    process: ProcessState,
    syscall_insn: u64,
    stopped_us: u64,
}

/// Stops the seed, captures its threads and descriptors, clones the twin (letting the
/// `dont_fork` ranges through) and lets the seed go on; then reads the process state.
fn snapshot(pid: i32, dont_fork: &[(u64, u64)]) -> Result<Snapshot, PrepareError> {
    let stop_start = Instant::now();
    let mut group = threads::stop_all(pid)?;
    let frozen = freeze(&mut group, pid, dont_fork);
    // Whatever happened, the seed goes on running.
    group.release();
    let Frozen {
        mut twin,
        threads,
        fds,
        brk,
        insn: syscall_insn,
    } = frozen?;
    let stopped_us = stop_start.elapsed().as_micros() as u64;

    let process = match capture::process::capture(pid, &mut twin, syscall_insn) {
        Ok(p) => p,
        Err(e) => {
            twin.kill();
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
        twin.kill();
        return Err(PrepareError::Inject {
            pid,
            what: "closing the twin's files",
            source,
        });
    }
    let memory = match RemoteMemory::open(twin_pid, false) {
        Ok(m) => m,
        Err(source) => {
            twin.kill();
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

/// True if a mapping of the seed is not among its twin's: a MADV_DONTFORK range, or one the
/// seed made since it was let go (then smaps is read for nothing, no harm done).
fn lost_in_twin(pid: i32, twin: &[MapsEntry]) -> bool {
    let Some(seed) = fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()
        .and_then(|t| procfs::parse_maps(&t).ok())
    else {
        return true;
    };
    let kept: HashSet<(u64, u64)> = twin.iter().map(|m| (m.start, m.end)).collect();
    seed.iter().any(|m| !kept.contains(&(m.start, m.end)))
}

struct Frozen {
    twin: Tracee,
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
        captured.push(threads::capture(t, &mem, insn)?);
    }
    let pidfd = mitosis_sys::pidfd::open(pid).map_err(inject("opening a pidfd"))?;
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
    let mut twin = Tracee::adopt(twin_pid);
    let twin_ready = twin
        .wait_for_event_stop()
        .and_then(|_| twin.set_options(ptrace::exit_kill_options()));
    if let Err(source) = twin_ready {
        twin.kill();
        return Err(PrepareError::Inject {
            pid,
            what: "stopping the twin",
            source,
        });
    }
    Ok(Frozen {
        twin,
        threads: captured,
        fds,
        brk,
        insn,
    })
}

fn advise(seed: &mut Tracee, insn: u64, ranges: &[(u64, u64)], advice: i32) -> io::Result<()> {
    for &(start, end) in ranges {
        seed.syscall(
            insn,
            libc::SYS_madvise,
            [start, end - start, advice as u64, 0, 0, 0],
        )?;
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
    dont_fork: &[(u64, u64)],
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
    let mut seen = Seen::default();
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
        let dont_fork = dont_fork.iter().any(|&(s, e)| s <= m.start && m.end <= e);
        vmas.push(describe_vma(twin, m, files, &mut seen, dont_fork)?);
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
    /// The seed's memory, for the page states of shared mappings.
    seed_memory: Option<RemoteMemory>,
    /// Identities by (inode, path): a library has several mappings.
    files: HashMap<(u64, String), FileIdentity>,
}

fn describe_vma(
    twin: &Twin,
    m: &MapsEntry,
    files: &FileCache,
    seen: &mut Seen,
    dont_fork: bool,
) -> Result<Vma, PrepareError> {
    let pid = twin.pid();
    let pages = ((m.end - m.start) / PAGE_SIZE) as usize;
    // fork copies no page table entries for shared mappings, so the twin's pagemap knows
    // nothing of them; their pages are the seed's (still shared with the twin).
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
    let prot =
        (m.read as u8 * PROT_READ) | (m.write as u8 * PROT_WRITE) | (m.exec as u8 * PROT_EXEC);
    // Shared memory without a real file (MAP_SHARED|MAP_ANONYMOUS, SysV, memfd) is carried as
    // anonymous memory with its content.
    let is_shmem = m.name.starts_with("/dev/zero")
        || m.name.starts_with("/SYSV")
        || m.name.starts_with("/memfd:");
    let file_backed = m.inode != 0 && m.name.starts_with('/') && !is_shmem;
    if file_backed && m.name.starts_with("/dev/") {
        return Err(PrepareError::Unsupported {
            pid,
            what: format!("device mapping {}", m.name),
        });
    }
    let backing = if file_backed {
        let identity = match seen.files.get(&(m.inode, m.name.clone())) {
            Some(identity) => identity.clone(),
            None => {
                // map_files opens the exact file mapped, even if it was deleted or replaced
                // since.
                let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                let file = File::open(&link).map_err(proc_err(link))?;
                let identity = files
                    .identify(&file, &m.name)
                    .map_err(proc_err(m.name.clone()))?;
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
    let seed_pages = match backing {
        // Private file pages the seed wrote are anonymous now: they are not in the file.
        Backing::File { .. } => {
            PageSet::from_flags(states.iter().map(|s| s.exists() && !s.file && !m.shared))
        }
        Backing::Anonymous => PageSet::from_flags(states.iter().map(|s| s.exists())),
    };
    Ok(Vma {
        start: m.start,
        end: m.end,
        prot,
        shared: m.shared,
        grows_down: m.name == "[stack]",
        dont_fork,
        backing,
        seed_pages,
    })
}
