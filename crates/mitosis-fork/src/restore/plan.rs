//! Deciding, on the child's host, how each of the seed's mappings is rebuilt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mitosis_descriptor::{
    Backing, Descriptor, FileIdentity, KernelObject, MmFields, ProcessState, Thread, Vma,
};
use mitosis_sys::PAGE_SIZE;
use thiserror::Error;

use super::protocol::OpenSpec;
use crate::filecache::FileCache;
use crate::pending::{PendingMap, Run};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the seed runs on {seed}, this host is {host}")]
    Arch { seed: String, host: String },
    #[error("this host's vDSO differs from the seed host's (different kernel)")]
    VdsoDiffers,
    #[error("the seed has no vDSO")]
    NoVdso,
}

/// How one mapping is created in the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapStep {
    pub start: u64,
    pub len: u64,
    pub prot: u64,
    pub flags: u64,
    /// Index into [`Plan::opens`] of the file to map, or `None` for anonymous memory.
    pub file: Option<usize>,
    pub offset: u64,
    /// MADV_DONTFORK in the seed: set in each child (not the replica, whose forks must copy it).
    pub dont_fork: bool,
    /// A shared mapping of a memfd or deleted file the seed has open: each child maps its own
    /// copy of the file here (see `KernelObject::MemFile`).
    pub mem_file: bool,
    /// Locked in the seed: each child locks it (not the replica: fork does not pass locks on).
    pub locked: bool,
}

impl MapStep {
    /// Shared memory each child gets a fresh anonymous mapping of, served whole through its
    /// own userfaultfd.
    pub fn fresh_in_each_child(&self) -> bool {
        self.file.is_none() && self.flags & libc::MAP_SHARED as u64 != 0 && !self.mem_file
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub maps: Vec<MapStep>,
    pub opens: Vec<OpenSpec>,
    pub exe: Option<usize>,
    pub work_fd_base: i32,
    /// Ranges whose missing pages are served through userfaultfd.
    pub lazy_ranges: Vec<(u64, u64)>,
    /// Pages still to come from the seed once the child runs.
    pub pending: PendingMap,
    /// Pages written before the child starts: the seed's own writes to private file mappings.
    pub overlay: Vec<Run>,
    /// Pending pages copied before the first child because it touches them at once (stack,
    /// TLS).
    pub eager: Vec<Run>,
    /// Pages the threads touch at once that the seed never had: zero-filled at once.
    pub hot: Vec<u64>,
    /// The seed's threads, the main thread first.
    pub threads: Vec<Thread>,
    pub process: ProcessState,
    /// Kernel objects each child gets a fresh copy of.
    pub objects: Vec<KernelObject>,
    pub vdso_block: u64,
    pub mm: MmFields,
    pub auxv: Vec<u64>,
    pub cwd: Option<String>,
    /// The container rootfs the seed's paths are relative to; `None`: this host's root.
    pub root: Option<PathBuf>,
}

/// A container's files as this host sees them: its rootfs, and the host paths its bundle
/// binds into it.
#[derive(Debug, Clone, Copy)]
pub struct ContainerRoot<'a> {
    pub rootfs: &'a Path,
    /// (where in the container, the host path bound there), in the order they are mounted.
    pub binds: &'a [(String, PathBuf)],
}

impl ContainerRoot<'_> {
    /// The host path of `path` (the container's) when a bind mount holds it; the last mount
    /// over a path is the one the container sees.
    pub fn bound(&self, path: &str) -> Option<PathBuf> {
        self.binds.iter().rev().find_map(|(dest, source)| {
            let rest = Path::new(path).strip_prefix(dest).ok()?;
            Some(if rest.as_os_str().is_empty() {
                source.clone()
            } else {
                source.join(rest)
            })
        })
    }

    /// Where `path` (the container's) is on this host.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.bound(path)
            .unwrap_or_else(|| self.rootfs.join(path.trim_start_matches('/')))
    }
}

/// Plans the child of `desc` on this host. `local_vdso_hash` is this host's vDSO digest;
/// `root` the files of the seed's container, if it ran in one.
pub fn plan(
    desc: &Descriptor,
    files: &FileCache,
    local_vdso_hash: [u8; 32],
    root: Option<ContainerRoot>,
) -> Result<Plan, PlanError> {
    let host = std::env::consts::ARCH;
    if desc.arch != host {
        return Err(PlanError::Arch {
            seed: desc.arch.clone(),
            host: host.into(),
        });
    }
    let vdso = desc.vdso.ok_or(PlanError::NoVdso)?;
    if vdso.hash != local_vdso_hash {
        return Err(PlanError::VdsoDiffers);
    }

    // A file a bundle binds into its container is opened at its host path, before the stub
    // enters the rootfs.
    let open_spec = |path: &str, flags: i32, target_fd: Option<i32>, offset: u64| {
        let bound = root.and_then(|r| r.bound(path));
        OpenSpec {
            host_path: bound.is_some(),
            path: bound.map_or_else(|| path.into(), |p| p.to_string_lossy().into_owned()),
            flags,
            target_fd,
            offset,
        }
    };
    let mut opens: Vec<OpenSpec> = Vec::new();
    let mut open_index: HashMap<(String, i32), usize> = HashMap::new();
    let mut open = |path: &str, flags: i32| -> usize {
        *open_index
            .entry((path.to_string(), flags))
            .or_insert_with(|| {
                opens.push(open_spec(path, flags, None, 0));
                opens.len() - 1
            })
    };

    // A library has several mappings: each file is checked once.
    let mut checked: HashMap<FileIdentity, bool> = HashMap::new();
    let mut identical = |file: &FileIdentity| -> bool {
        if let Some(&same) = checked.get(file) {
            return same;
        }
        let at = root.map_or_else(|| PathBuf::from(&file.path), |r| r.host_path(&file.path));
        let same = files.is_identical(file, &at);
        checked.insert(file.clone(), same);
        same
    };
    let mem_file_maps: Vec<u64> = desc
        .objects
        .iter()
        .flat_map(|o| match o {
            KernelObject::MemFile { mappings, .. } => mappings.as_slice(),
            _ => &[],
        })
        .map(|m| m.start)
        .collect();
    let mut maps = Vec::new();
    let mut lazy_ranges = Vec::new();
    let mut pending = PendingMap::new();
    let mut overlay = Vec::new();
    for vma in &desc.vmas {
        let mut flags = if vma.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } as u64;
        if vma.grows_down {
            flags |= libc::MAP_GROWSDOWN as u64;
        }
        let mut step = MapStep {
            start: vma.start,
            len: vma.len(),
            prot: vma.prot as u64,
            flags,
            file: None,
            offset: 0,
            dont_fork: vma.dont_fork,
            mem_file: mem_file_maps.contains(&vma.start),
            locked: vma.locked,
        };
        match &vma.backing {
            Backing::File { file, offset, .. } if identical(file) => {
                // The seed's file was open read-write if its shared mapping may be made
                // writable (even if it is read-only now).
                let writable_shared =
                    vma.shared && (vma.may_write || vma.prot & mitosis_descriptor::PROT_WRITE != 0);
                let mode = if writable_shared {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                };
                step.file = Some(open(&file.path, mode));
                step.offset = *offset;
                // Pages the seed wrote privately are not in the file: copy them over.
                overlay.extend(runs_of(vma));
            }
            backing => {
                // Anonymous memory, or a file this host does not have: the seed serves it all.
                step.flags = (step.flags & !(libc::MAP_SHARED as u64))
                    | libc::MAP_PRIVATE as u64
                    | libc::MAP_ANONYMOUS as u64;
                // A deleted file's shared mapping stays shared: each child maps its memfd there.
                if vma.shared && (matches!(backing, Backing::Anonymous) || step.mem_file) {
                    step.flags =
                        (step.flags & !(libc::MAP_PRIVATE as u64)) | libc::MAP_SHARED as u64;
                }
                let from_seed: Vec<bool> = match backing {
                    Backing::File { file_pages, .. } => (0..vma.pages())
                        .map(|p| p < *file_pages || vma.seed_pages.contains(p))
                        .collect(),
                    Backing::Anonymous => (0..vma.pages())
                        .map(|p| vma.seed_pages.contains(p))
                        .collect(),
                };
                if vma.shared || named_by_the_kernel(vma.start, vma.start + vma.len(), &desc.mm) {
                    // Each child registers its own shared mapping whole (see replica). The
                    // heap and the stack too: registering part of one splits it, and only the
                    // part holding brk or the stack's start keeps the name /proc/PID/maps
                    // gives it (glibc sizes the main thread's stack from that line).
                    lazy_ranges.push((vma.start, vma.len()));
                } else {
                    lazy_ranges.extend(lazy_spans(vma.start, &from_seed));
                }
                pending.insert(vma.start, vma.start, from_seed);
            }
        }
        maps.push(step);
    }

    // Sorted, so that a bulk's share of it is found in one sweep.
    overlay.sort_unstable_by_key(|r| r.child);
    let exe = desc
        .exe
        .as_ref()
        .filter(|e| identical(e))
        .map(|e| open(&e.path, libc::O_RDONLY));
    let object_fds = desc.objects.iter().flat_map(|o| o.fds()).map(|f| f.fd);
    let work_fd_base = desc
        .files
        .iter()
        .map(|f| f.fd)
        .chain(object_fds)
        .map(|fd| fd + 1)
        .max()
        .unwrap_or(0)
        .max(64);
    for f in &desc.files {
        let flags = f.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        opens.push(open_spec(&f.path, flags, Some(f.fd), f.offset));
    }

    // Each thread touches its stack, TLS, tid word and rseq area at once: the pages the seed
    // has come before the first child (they stay pending until then), the others are zeroed.
    let mut eager: Vec<Run> = Vec::new();
    let mut hot_pages = Vec::new();
    for page in desc
        .threads
        .iter()
        .flat_map(hot_pages_of)
        .chain(arg_env_pages(&desc.mm))
    {
        if eager.iter().any(|r| r.child == page) || hot_pages.contains(&page) {
            continue;
        }
        if pending.is_pending(page) {
            eager.push(Run {
                child: page,
                seed: page,
                pages: 1,
            });
        } else {
            hot_pages.push(page);
        }
    }

    Ok(Plan {
        maps,
        opens,
        exe,
        work_fd_base,
        lazy_ranges,
        pending,
        overlay,
        eager,
        hot: hot_pages,
        threads: desc.threads.clone(),
        process: desc.process.clone(),
        objects: desc.objects.clone(),
        vdso_block: vdso.block_start,
        mm: desc.mm,
        auxv: desc.auxv.clone(),
        cwd: desc.cwd.clone(),
        root: root.map(|r| r.rootfs.to_path_buf()),
    })
}

/// Holes of at least this many pages the seed never had are left out of the userfaultfd
/// ranges: the kernel zero-fills their pages on touch, with no round trip to the fault path
/// (a heap the seed trimmed has many). Smaller holes are not worth another mapping.
const HOLE_PAGES: usize = 16;

/// The parts of a private mapping at `start` to serve through userfaultfd: its pages from the
/// seed and the holes of fewer than [`HOLE_PAGES`] pages between them, as `(start, len)`.
fn lazy_spans(start: u64, from_seed: &[bool]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (page, _) in from_seed.iter().enumerate().filter(|(_, has)| **has) {
        match spans.last_mut() {
            Some((_, end)) if page - *end < HOLE_PAGES => *end = page + 1,
            _ => spans.push((page, page + 1)),
        }
    }
    spans
        .into_iter()
        .map(|(first, end)| {
            (
                start + first as u64 * PAGE_SIZE,
                (end - first) as u64 * PAGE_SIZE,
            )
        })
        .collect()
}

/// Whether the kernel names the mapping `start..end` `[heap]` or `[stack]` in /proc/PID/maps:
/// it holds part of the brk area, or the stack's start (as `vma_is_initial_stack` does).
fn named_by_the_kernel(start: u64, end: u64, mm: &MmFields) -> bool {
    let heap = mm.start_brk != 0 && start <= mm.brk && end >= mm.start_brk;
    let stack = mm.start_stack != 0 && start <= mm.start_stack && end >= mm.start_stack;
    heap || stack
}

/// Most pages of each of the argument and environment areas brought in before the first
/// child (the kernel's own limit on both together is a quarter of an 8 MiB stack).
const ARG_ENV_PAGES: u64 = 512;

/// The pages of the argument and environment areas: the kernel reads them for other
/// processes (/proc/PID/cmdline, environ) through a path that cannot wait for a userfaultfd
/// fault, so they must be in place before the child runs.
fn arg_env_pages(mm: &MmFields) -> impl Iterator<Item = u64> {
    [(mm.arg_start, mm.arg_end), (mm.env_start, mm.env_end)]
        .into_iter()
        .filter(|&(start, end)| start != 0 && end > start)
        .flat_map(|(start, end)| {
            let first = start & !(PAGE_SIZE - 1);
            let pages = (end - first).div_ceil(PAGE_SIZE).min(ARG_ENV_PAGES);
            (0..pages).map(move |i| first + i * PAGE_SIZE)
        })
}

/// The pages a thread touches as soon as it runs.
fn hot_pages_of(t: &Thread) -> impl Iterator<Item = u64> + '_ {
    let regs = crate::regs::words_to_regs(&t.regs);
    [
        regs.rsp.wrapping_sub(2 * PAGE_SIZE),
        regs.rsp.wrapping_sub(PAGE_SIZE),
        regs.rsp,
        regs.fs_base,
        t.tid_address,
    ]
    .into_iter()
    .chain(t.rseq.map(|r| r.pointer))
    .chain(t.robust_list.map(|r| r.head))
    .filter(|&a| a != 0)
    .map(|a| a & !(PAGE_SIZE - 1))
}

/// The seed's pages a host needs before its first child, whatever its files: every page the
/// seed wrote in its file mappings (the overlay where the host has the file) and the pages
/// its threads touch at once. Page addresses, sorted, each once.
pub fn bootstrap_pages(desc: &Descriptor) -> Vec<u64> {
    let mut pages: Vec<u64> = desc
        .vmas
        .iter()
        .filter(|v| matches!(v.backing, Backing::File { .. }))
        .flat_map(|v| runs_of(v).flat_map(|r| (0..r.pages).map(move |i| r.child + i * PAGE_SIZE)))
        .collect();
    for page in desc
        .threads
        .iter()
        .flat_map(hot_pages_of)
        .chain(arg_env_pages(&desc.mm))
    {
        let has = desc.vmas.iter().any(|v| {
            page >= v.start
                && page < v.start + v.len()
                && v.seed_pages.contains((page - v.start) / PAGE_SIZE)
        });
        if has {
            pages.push(page);
        }
    }
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// The seed-written pages of `vma` as runs (same address in seed and child).
fn runs_of(vma: &Vma) -> impl Iterator<Item = Run> + '_ {
    vma.seed_pages.runs().iter().map(|&(first, count)| {
        let addr = vma.start + first * PAGE_SIZE;
        Run {
            child: addr,
            seed: addr,
            pages: count,
        }
    })
}

/// A plan of `maps` whose opens are `files` (at their own numbers), for unit tests.
#[cfg(test)]
pub(crate) fn sample(maps: Vec<MapStep>, files: &[i32]) -> Plan {
    Plan {
        maps,
        opens: files
            .iter()
            .map(|&fd| OpenSpec {
                path: "/etc/hostname".into(),
                host_path: false,
                flags: 0,
                target_fd: Some(fd),
                offset: 0,
            })
            .collect(),
        exe: None,
        work_fd_base: 70,
        lazy_ranges: vec![],
        pending: Default::default(),
        overlay: vec![],
        eager: vec![],
        hot: vec![],
        threads: vec![Thread {
            tid: 1,
            name: "t".into(),
            regs: vec![0; mitosis_descriptor::REGS_WORDS],
            xstate: vec![],
            sigmask: 0,
            rseq: None,
            robust_list: Some(mitosis_descriptor::RobustList {
                head: 0x77,
                len: 24,
            }),
            tid_address: 0,
            tid_cache: 0,
            own_tid: 0,
            altstack: None,
            in_syscall: -1,
            creds: Default::default(),
            timer_slack_ns: 50_000,
            pdeathsig: 0,
            pending: vec![],
        }],
        process: Default::default(),
        objects: vec![],
        vdso_block: 0,
        mm: Default::default(),
        auxv: vec![],
        cwd: None,
        root: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(set: &[usize], len: usize) -> Vec<bool> {
        (0..len).map(|p| set.contains(&p)).collect()
    }

    #[test]
    fn a_container_path_is_its_last_binds_host_path_or_the_rootfs() {
        let binds = [
            ("/data".to_string(), PathBuf::from("/srv/data")),
            ("/data/models".to_string(), PathBuf::from("/srv/models")),
            ("/etc/motd".to_string(), PathBuf::from("/srv/motd")),
        ];
        let root = ContainerRoot {
            rootfs: Path::new("/bundles/fn/rootfs"),
            binds: &binds,
        };
        let host = |p: &str| root.host_path(p);
        assert_eq!(host("/data/t.csv"), Path::new("/srv/data/t.csv"));
        assert_eq!(host("/data/models/m.bin"), Path::new("/srv/models/m.bin"));
        assert_eq!(host("/etc/motd"), Path::new("/srv/motd"));
        assert_eq!(
            host("/database/x"),
            Path::new("/bundles/fn/rootfs/database/x")
        );
        assert_eq!(
            host("/usr/lib/libc.so.6"),
            Path::new("/bundles/fn/rootfs/usr/lib/libc.so.6")
        );
        assert_eq!(root.bound("/tmp/x"), None);
    }

    #[test]
    fn the_heap_and_the_stack_are_named_by_the_kernel() {
        let mm = MmFields {
            start_brk: 0x5000,
            brk: 0x9000,
            start_stack: 0x7ff0_8000,
            ..Default::default()
        };
        assert!(named_by_the_kernel(0x5000, 0xa000, &mm));
        assert!(named_by_the_kernel(0x7ff0_0000, 0x7ff1_0000, &mm));
        assert!(!named_by_the_kernel(0xa000, 0xb000, &mm));
        assert!(!named_by_the_kernel(0x1000, 0x4000, &mm));
        assert!(!named_by_the_kernel(0x1000, 0x4000, &MmFields::default()));
    }

    #[test]
    fn lazy_spans_leave_out_only_large_holes() {
        let base = 0x10_0000;
        let page = PAGE_SIZE;
        // A hole of HOLE_PAGES - 1 pages stays in; one of HOLE_PAGES pages is left out.
        let small = HOLE_PAGES;
        let large = 2 * HOLE_PAGES + 1;
        let seed = pages(&[0, 1, small, large, large + 1], 100);
        assert_eq!(
            lazy_spans(base, &seed),
            vec![
                (base, (small as u64 + 1) * page),
                (base + large as u64 * page, 2 * page)
            ]
        );
        assert!(lazy_spans(base, &pages(&[], 64)).is_empty());
        assert_eq!(
            lazy_spans(base, &pages(&[63], 64)),
            vec![(base + 63 * page, page)]
        );
    }
}
