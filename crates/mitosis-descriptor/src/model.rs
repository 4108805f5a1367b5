//! The descriptor's data model.

use serde::{Deserialize, Serialize};

use crate::{DroppedFd, KernelObject, PageSet, ProcessState, Thread};

/// Number of u64 words in x86_64 `user_regs_struct`.
pub const REGS_WORDS: usize = 27;

/// Everything a child host needs to rebuild a seed at its prepare point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub seed_id: u64,
    /// `uname -m` of the seed's host; children refuse a different one.
    pub arch: String,
    /// Every thread, the main thread first.
    pub threads: Vec<Thread>,
    pub process: ProcessState,
    pub mm: MmFields,
    /// The auxiliary vector as the kernel keeps it, (type, value) pairs flattened.
    pub auxv: Vec<u64>,
    pub exe: Option<FileIdentity>,
    pub vdso: Option<Vdso>,
    /// Mappings sorted by address, non-overlapping.
    pub vmas: Vec<Vma>,
    /// The seed's working directory, used by the child where it exists.
    pub cwd: Option<String>,
    /// Regular files the seed had open beyond stdio, to reopen in the child.
    pub files: Vec<OpenFile>,
    /// Pipes, eventfds, epoll sets and devices private to the seed: each child gets its own.
    pub objects: Vec<KernelObject>,
    /// Descriptors beyond stdio that children do not get.
    pub dropped: Vec<DroppedFd>,
    /// The container the seed runs in; its paths are relative to the bundle's rootfs.
    pub container: Option<ContainerRef>,
}

/// The OCI bundle of a containerized seed. Every host running its children has the bundle at
/// the same path; the digest makes sure it is the same function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    pub bundle: String,
    /// BLAKE3 of the bundle's config.json.
    pub digest: [u8; 32],
    /// What the seed's container held in its own tmpfs mounts (/tmp, /dev/shm, the bundle's)
    /// when it was prepared: each child's container starts with it.
    pub tmpfs: Vec<TmpfsContent>,
}

/// One tmpfs mount of a container and what it held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsContent {
    /// Where it is mounted, relative to the container's root (`tmp`, `dev/shm`).
    pub mount: String,
    /// Its entries, each directory before what it holds.
    pub files: Vec<ContainerFile>,
}

/// One entry of a container's tmpfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerFile {
    /// Relative to its mount (`cache/model.bin`): plain components only.
    pub path: String,
    /// Permission bits (with setuid, setgid and sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: ContainerFileKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerFileKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub pointer: u64,
    pub size: u32,
    pub signature: u32,
}

/// The mm_struct fields that `prctl(PR_SET_MM_MAP)` restores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// Where the seed's vDSO block (vvar pages followed by the vDSO) sits, and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vdso {
    /// Start of the block (first vvar page); what `ARCH_MAP_VDSO_64` takes.
    pub block_start: u64,
    pub vdso_start: u64,
    pub vdso_end: u64,
    /// BLAKE3 of the vDSO text: a child host with other vDSO code cannot run the seed's
    /// cached vDSO entry points.
    pub hash: [u8; 32],
}

/// A file as the seed's host saw it; the child maps its own copy only if it is identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: String,
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub hash: [u8; 32],
}

pub const PROT_READ: u8 = 1;
pub const PROT_WRITE: u8 = 2;
pub const PROT_EXEC: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u8,
    /// MAP_SHARED rather than MAP_PRIVATE.
    pub shared: bool,
    /// Grows down (the main thread's stack, or MAP_GROWSDOWN: smaps `gd`).
    pub grows_down: bool,
    /// Marked MADV_DONTFORK in the seed (V8 marks its heap so): children mark it again.
    pub dont_fork: bool,
    /// A shared file mapping that may be made writable (smaps `mw`: the seed opened the file
    /// read-write), even if it is not writable now: the child opens the file so too.
    pub may_write: bool,
    /// mlock'd or MAP_LOCKED in the seed (smaps `lo`): each child locks it again.
    pub locked: bool,
    /// Locked with MLOCK_ONFAULT (smaps `lf`).
    pub lock_on_fault: bool,
    pub backing: Backing,
    /// Pages whose content must come from the seed: for anonymous memory every page that
    /// exists; for a private file mapping the pages the seed wrote (no longer the file's).
    pub seed_pages: PageSet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    Anonymous,
    File {
        file: FileIdentity,
        offset: u64,
        /// Pages of this mapping that lie within the file; beyond them access is SIGBUS.
        file_pages: u64,
    },
}

impl Descriptor {
    /// The main thread (a decoded descriptor always has one).
    pub fn main_thread(&self) -> &Thread {
        &self.threads[0]
    }
}

impl Vma {
    /// A private anonymous mapping `[start, end)` with none of the flags set.
    pub fn anonymous(start: u64, end: u64, prot: u8, seed_pages: PageSet) -> Vma {
        Vma {
            start,
            end,
            prot,
            shared: false,
            grows_down: false,
            dont_fork: false,
            may_write: false,
            locked: false,
            lock_on_fault: false,
            backing: Backing::Anonymous,
            seed_pages,
        }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn pages(&self) -> u64 {
        self.len() / 4096
    }
}

/// A regular file open in the seed, reopened at the same descriptor number and offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    pub fd: i32,
    pub path: String,
    /// open(2) flags as /proc/PID/fdinfo shows them.
    pub flags: i32,
    pub offset: u64,
}
