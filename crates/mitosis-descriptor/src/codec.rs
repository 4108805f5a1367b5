//! The descriptor envelope: magic, version, length, CRC-32, then a postcard payload.
//!
//! Layout (little endian): `b"MTSD" | u16 version | u16 reserved | u32 len | u32 crc32 | payload`.
//! Decoding checks every field and the descriptor's own invariants before anyone uses it.

use thiserror::Error;

use std::collections::BTreeSet;

use crate::{Backing, Descriptor, KernelObject, REGS_WORDS, SocketEnd};

pub const MAGIC: &[u8; 4] = b"MTSD";
/// Bumped whenever the payload's shape changes.
pub const VERSION: u16 = 9;
pub const HEADER_LEN: usize = 16;
/// Far above any real seed (~12 bytes per resident page), small enough to refuse garbage.
pub const MAX_PAYLOAD: usize = 64 << 20;
const PAGE: u64 = 4096;
/// Highest user address on x86_64 with 4- or 5-level paging.
const USER_END: u64 = 1 << 56;
/// More threads than any runtime we fork starts; refuses garbage counts.
const MAX_THREADS: usize = 4096;
/// The largest pipe carried (the default `/proc/sys/fs/pipe-max-size`): a child gets a pipe
/// of the seed's size, and what was buffered fits it.
pub const MAX_PIPE_SIZE: usize = 1 << 20;
/// The largest memfd or deleted file carried (its whole content travels in the descriptor).
pub const MAX_MEM_FILE: usize = 16 << 20;
/// What all of a seed's memfds and deleted files may hold together.
pub const MAX_MEM_FILES: usize = 32 << 20;
/// What a container seed's tmpfs mounts may hold to be carried: bytes, and entries.
pub const MAX_CONTAINER_FILES_BYTES: usize = 8 << 20;
pub const MAX_CONTAINER_FILES: usize = 4096;
/// What a child can queue at one end of a socketpair without blocking (well below the default
/// socket buffer).
pub const MAX_SOCKET_QUEUE: usize = 65536;
/// Clocks a timerfd can run on: REALTIME, MONOTONIC, BOOTTIME and their _ALARM forms.
const TIMERFD_CLOCKS: [i32; 5] = [0, 1, 7, 8, 9];
/// Clocks a POSIX timer of a child can be on: realtime, monotonic, boottime and their alarm
/// and TAI variants (CPU-time clocks are refused at prepare).
const POSIX_TIMER_CLOCKS: [i32; 6] = [0, 1, 7, 8, 9, 11];
const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD_ID: i32 = 4;
const SIGINFO_LEN: usize = 128;
/// More than any RLIMIT_SIGPENDING a descriptor should carry.
const MAX_PENDING: usize = 64 * 1024;
const MAX_POSIX_TIMERS: usize = 64 * 1024;
/// More unreaped children than a seed should have (each child makes them again).
pub const MAX_ZOMBIES: usize = 1024;
/// RLIMIT_NLIMITS on Linux.
const RLIMITS: u8 = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("descriptor is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a mitosis descriptor (bad magic)")]
    BadMagic,
    #[error("descriptor version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error("descriptor length {0} does not match its header")]
    Length(usize),
    #[error("descriptor checksum mismatch: it is corrupted")]
    Checksum,
    #[error("descriptor payload is malformed: {0}")]
    Payload(String),
    #[error("descriptor is inconsistent: {0}")]
    Invalid(&'static str),
}

/// Encodes `desc` into its envelope.
pub fn encode(desc: &Descriptor) -> Vec<u8> {
    let payload = postcard::to_stdvec(desc).expect("descriptor serializes to memory");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes and validates an envelope.
pub fn decode(bytes: &[u8]) -> Result<Descriptor, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    if bytes[6..8] != [0, 0] {
        return Err(DecodeError::Payload("reserved header bits are set".into()));
    }
    let len = word(8) as usize;
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || payload.len() != len {
        return Err(DecodeError::Length(len));
    }
    if crc32fast::hash(payload) != word(12) {
        return Err(DecodeError::Checksum);
    }
    let desc: Descriptor =
        postcard::from_bytes(payload).map_err(|e| DecodeError::Payload(e.to_string()))?;
    validate(&desc)?;
    Ok(desc)
}

/// Checks the invariants the restore path relies on.
fn validate(d: &Descriptor) -> Result<(), DecodeError> {
    use DecodeError::Invalid;
    validate_threads(d)?;
    if let Some(c) = &d.container {
        validate_tmpfs(&c.tmpfs)?;
    }
    if d.auxv.len() % 2 != 0 || d.auxv.len() > 2 * 64 {
        return Err(Invalid("auxiliary vector is malformed"));
    }
    let mut prev_end = 0;
    for vma in &d.vmas {
        let aligned = vma.start % PAGE == 0 && vma.end % PAGE == 0;
        if !aligned || vma.start >= vma.end || vma.end > USER_END {
            return Err(Invalid("a mapping has a bad range"));
        }
        if vma.start < prev_end {
            return Err(Invalid("mappings overlap or are unsorted"));
        }
        prev_end = vma.end;
        if vma.prot & !7 != 0 {
            return Err(Invalid("a mapping has unknown protection bits"));
        }
        if !vma.seed_pages.is_canonical() || vma.seed_pages.end() > vma.pages() {
            return Err(Invalid("a mapping's page list exceeds the mapping"));
        }
        if let Backing::File {
            file,
            offset,
            file_pages,
        } = &vma.backing
        {
            if offset % PAGE != 0 || *file_pages > vma.pages() || file.path.contains('\0') {
                return Err(Invalid("a file mapping is malformed"));
            }
        }
    }
    if d.files.iter().any(|f| f.fd < 3 || f.path.contains('\0')) {
        return Err(Invalid("an open file entry is malformed"));
    }
    validate_objects(d)?;
    if let Some(v) = &d.vdso {
        if v.block_start > v.vdso_start || v.vdso_start >= v.vdso_end || v.vdso_end > USER_END {
            return Err(Invalid("the vDSO range is malformed"));
        }
    }
    Ok(())
}

fn validate_threads(d: &Descriptor) -> Result<(), DecodeError> {
    use DecodeError::Invalid;
    if d.threads.is_empty() || d.threads.len() > MAX_THREADS {
        return Err(Invalid("the thread list is empty or too long"));
    }
    for t in &d.threads {
        if t.regs.len() != REGS_WORDS {
            return Err(Invalid("register set has the wrong size"));
        }
        if t.xstate.len() > 64 * 1024 {
            return Err(Invalid("FPU state is too large"));
        }
        if t.name.len() > 15 || t.name.contains('\0') {
            return Err(Invalid("a thread name is malformed"));
        }
        validate_creds(&t.creds)?;
        if t.pdeathsig > 64 {
            return Err(Invalid("a parent-death signal is malformed"));
        }
        validate_pending(&t.pending)?;
    }
    let p = &d.process;
    validate_pending(&p.pending)?;
    if p.itimers.len() > 3 || p.itimers.iter().any(|t| t.which > 2) {
        return Err(Invalid("an interval timer is malformed"));
    }
    let timer_ok = |t: &crate::PosixTimer| {
        t.id >= 0
            && (t.signal as u32) <= 64
            && (t.thread as usize) < d.threads.len()
            && matches!(t.notify, SIGEV_SIGNAL | SIGEV_NONE | SIGEV_THREAD_ID)
            && POSIX_TIMER_CLOCKS.contains(&t.clock)
    };
    if p.posix_timers.len() > MAX_POSIX_TIMERS || !p.posix_timers.iter().all(timer_ok) {
        return Err(Invalid("a POSIX timer is malformed"));
    }
    let sched = &p.sched;
    let sched_ok = (-20..=19).contains(&sched.nice)
        && matches!(sched.policy, 0..=3 | 5)
        && sched.rt_priority <= 99
        && (sched.rt_priority == 0) == !matches!(sched.policy, 1 | 2)
        && sched.ioprio >> 13 <= 3
        && sched.mce_kill <= 2
        && (-1000..=1000).contains(&sched.oom_score_adj)
        && sched.coredump_filter <= 0x1ff;
    if !sched_ok {
        return Err(Invalid("the scheduling settings are out of range"));
    }
    // An exit code, or a signal (no core dump) that ends a process.
    let zombie_ok = |z: &crate::Zombie| {
        let (code, sig) = ((z.status >> 8) & 0xff, z.status & 0x7f);
        z.status & !0xff7f == 0 && (sig == 0 || (code == 0 && sig != 0x7f))
    };
    if p.zombies.len() > MAX_ZOMBIES || !p.zombies.iter().all(zombie_ok) {
        return Err(Invalid("an exited child is malformed"));
    }
    let bad_signal = |s: u8| s == 0 || s > 64 || s == 9 || s == 19;
    if p.sigactions.iter().any(|a| bad_signal(a.signal)) {
        return Err(Invalid(
            "a signal action names a signal that cannot have one",
        ));
    }
    if p.rlimits
        .iter()
        .any(|r| r.resource >= RLIMITS || r.soft > r.hard)
    {
        return Err(Invalid("a resource limit is malformed"));
    }
    if p.umask > 0o777 {
        return Err(Invalid("the umask is malformed"));
    }
    Ok(())
}

/// A container's tmpfs contents: within the bounds, plain relative paths (no `..`, no empty
/// or `.` component: a child's files land where they say and nowhere else), each entry's
/// directory listed before it, permission bits only.
fn validate_tmpfs(tmpfs: &[crate::TmpfsContent]) -> Result<(), DecodeError> {
    use crate::ContainerFileKind;
    let bad = || DecodeError::Invalid("a container's tmpfs content is malformed");
    let plain = |p: &str| {
        !p.is_empty()
            && p.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
    };
    let (mut count, mut bytes) = (0usize, 0usize);
    for t in tmpfs {
        if !plain(&t.mount) {
            return Err(bad());
        }
        let mut dirs: BTreeSet<&str> = BTreeSet::new();
        for f in &t.files {
            count += 1;
            bytes += match &f.kind {
                ContainerFileKind::File(content) => content.len(),
                ContainerFileKind::Symlink(target) => target.len(),
                ContainerFileKind::Dir => 0,
            };
            let parent_listed = f
                .path
                .rsplit_once('/')
                .is_none_or(|(parent, _)| dirs.contains(parent));
            let target_ok = match &f.kind {
                ContainerFileKind::Symlink(t) => !t.is_empty() && !t.contains('\0'),
                _ => true,
            };
            if !plain(&f.path) || !parent_listed || !target_ok || f.mode & !0o7777 != 0 {
                return Err(bad());
            }
            if f.kind == ContainerFileKind::Dir {
                dirs.insert(&f.path);
            }
        }
    }
    if count > MAX_CONTAINER_FILES || bytes > MAX_CONTAINER_FILES_BYTES {
        return Err(bad());
    }
    Ok(())
}

/// Queued signals: known numbers, whole `siginfo_t`s, no more than a queue can hold.
fn validate_pending(pending: &[crate::PendingSignal]) -> Result<(), DecodeError> {
    let ok = |p: &crate::PendingSignal| (1..=64).contains(&p.signal) && p.info.len() == SIGINFO_LEN;
    if pending.len() > MAX_PENDING || !pending.iter().all(ok) {
        return Err(DecodeError::Invalid("a pending signal is malformed"));
    }
    Ok(())
}

/// Limits as the kernel's: NGROUPS_MAX groups, BPF_MAXINSNS per program, and no more
/// filters than would fit the kernel's per-thread total (MAX_INSNS_PER_PATH).
fn validate_creds(c: &crate::Credentials) -> Result<(), DecodeError> {
    use DecodeError::Invalid;
    if c.groups.len() > 65536 {
        return Err(Invalid("too many supplementary groups"));
    }
    let insns: usize = c.seccomp.iter().map(|f| f.program.len() + 4).sum();
    let bad_program = |f: &crate::SeccompFilter| {
        f.program.is_empty() || f.program.len() > crate::SECCOMP_MAX_INSNS
    };
    if insns > 32768 || c.seccomp.iter().any(bad_program) {
        return Err(Invalid("a seccomp filter is malformed"));
    }
    let caps = &c.caps;
    if caps.effective & !caps.permitted != 0
        || caps.ambient & !(caps.permitted & caps.inheritable) != 0
    {
        return Err(Invalid("capability sets are inconsistent"));
    }
    Ok(())
}

/// Kernel objects: descriptor numbers above stdio, none given twice (files included), epoll
/// watches only on descriptors the child has.
fn validate_objects(d: &Descriptor) -> Result<(), DecodeError> {
    use DecodeError::Invalid;
    let mut taken: BTreeSet<i32> = d.files.iter().map(|f| f.fd).collect();
    if taken.len() != d.files.len() {
        return Err(Invalid("two open files share a descriptor number"));
    }
    for o in &d.objects {
        for f in o.fds() {
            if f.fd < 3 || !taken.insert(f.fd) {
                return Err(Invalid("a kernel object has a bad or duplicate descriptor"));
            }
        }
        if o.fds().next().is_none() {
            return Err(Invalid("a kernel object has no descriptor"));
        }
        match o {
            KernelObject::Device { path, .. }
                if !path.starts_with("/dev/") || path.contains('\0') =>
            {
                return Err(Invalid("a device path is malformed"));
            }
            KernelObject::Pipe {
                readers,
                writers,
                size,
                content,
            } if readers.is_empty()
                || writers.is_empty()
                || !(4096..=MAX_PIPE_SIZE as u32).contains(size)
                || content.len() > *size as usize =>
            {
                return Err(Invalid("a pipe is malformed"));
            }
            KernelObject::SocketPair { kind, ends } if !socket_pair_ok(*kind, ends) => {
                return Err(Invalid("a socketpair is malformed"));
            }
            KernelObject::TimerFd { clock, .. } if !TIMERFD_CLOCKS.contains(clock) => {
                return Err(Invalid("a timerfd has an unknown clock"));
            }
            KernelObject::MemFile {
                name,
                content,
                opens,
                mappings,
                ..
            } => {
                let mapped = |m: &crate::MemFileMapping| {
                    m.offset % PAGE == 0
                        && d.vmas.iter().any(|v| {
                            v.start == m.start && v.len() == m.len && v.shared && v.prot == m.prot
                        })
                };
                if content.len() > MAX_MEM_FILE
                    || name.contains('\0')
                    || opens.iter().any(|o| o.fds.is_empty())
                    || !mappings.iter().all(mapped)
                {
                    return Err(Invalid("a memfd or deleted file is malformed"));
                }
            }
            _ => {}
        }
    }
    let watched_ok = |fd: i32| (0..3).contains(&fd) || taken.contains(&fd);
    for o in &d.objects {
        if let KernelObject::Epoll { watches, .. } = o {
            if watches.iter().any(|w| !watched_ok(w.fd)) {
                return Err(Invalid("an epoll set watches a descriptor the child lacks"));
            }
        }
    }
    Ok(())
}

/// A known kind; each end has descriptors and at most [`MAX_SOCKET_QUEUE`] bytes queued, with
/// no empty message (a stream's queue is one message).
fn socket_pair_ok(kind: i32, ends: &[SocketEnd; 2]) -> bool {
    const STREAM: i32 = 1;
    const DGRAM: i32 = 2;
    const SEQPACKET: i32 = 5;
    [STREAM, DGRAM, SEQPACKET].contains(&kind)
        && ends.iter().all(|end| {
            let bytes: usize = end.queued.iter().map(Vec::len).sum();
            !end.fds.is_empty()
                && bytes <= MAX_SOCKET_QUEUE
                && end.queued.iter().all(|m| !m.is_empty())
                && (kind != STREAM || end.queued.len() <= 1)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FdRef, FileIdentity, MmFields, PageSet, Vma};

    pub(crate) fn sample() -> Descriptor {
        Descriptor {
            seed_id: 7,
            arch: "x86_64".into(),
            threads: vec![crate::Thread {
                tid: 100,
                name: "main".into(),
                regs: vec![0; REGS_WORDS],
                xstate: vec![1; 832],
                sigmask: 0,
                rseq: None,
                robust_list: None,
                tid_address: 0,
                tid_cache: 0,
                own_tid: 0,
                altstack: None,
                in_syscall: 0,
                creds: crate::Credentials::default(),
                timer_slack_ns: 50_000,
                pdeathsig: 0,
                pending: vec![],
            }],
            process: crate::ProcessState::default(),
            mm: MmFields::default(),
            auxv: vec![6, 4096, 0, 0],
            exe: None,
            vdso: None,
            vmas: vec![
                Vma {
                    dont_fork: true,
                    locked: true,
                    ..Vma::anonymous(
                        0x1000,
                        0x5000,
                        3,
                        PageSet::from_flags([true, false, true, true]),
                    )
                },
                Vma {
                    backing: crate::Backing::File {
                        file: FileIdentity {
                            path: "/bin/x".into(),
                            size: 8192,
                            hash: [3; 32],
                        },
                        offset: 0,
                        file_pages: 2,
                    },
                    ..Vma::anonymous(0x10000, 0x12000, 5, PageSet::default())
                },
            ],
            cwd: None,
            files: vec![],
            objects: vec![
                KernelObject::Pipe {
                    readers: vec![FdRef { fd: 5, flags: 0 }],
                    writers: vec![FdRef { fd: 6, flags: 1 }],
                    size: 65536,
                    content: b"hi".to_vec(),
                },
                KernelObject::Epoll {
                    fds: vec![FdRef { fd: 7, flags: 2 }],
                    watches: vec![crate::EpollWatch {
                        fd: 5,
                        events: 1,
                        data: 5,
                    }],
                },
                KernelObject::SocketPair {
                    kind: libc_sock::STREAM,
                    ends: [
                        SocketEnd {
                            fds: vec![FdRef { fd: 8, flags: 2 }],
                            queued: vec![b"ping".to_vec()],
                        },
                        SocketEnd {
                            fds: vec![FdRef { fd: 9, flags: 2 }],
                            queued: vec![],
                        },
                    ],
                },
                KernelObject::TimerFd {
                    fds: vec![FdRef { fd: 10, flags: 0 }],
                    clock: 1,
                    value_ns: 5_000_000_000,
                    interval_ns: 7_000_000_000,
                    ticks: 0,
                },
                KernelObject::SignalFd {
                    fds: vec![FdRef { fd: 11, flags: 0 }],
                    mask: 1 << 9,
                },
            ],
            dropped: vec![],
            container: None,
        }
    }

    #[test]
    fn round_trip() {
        let d = sample();
        assert_eq!(decode(&encode(&d)).unwrap(), d);
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode(&b).is_err(),
                    "flip of byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_and_garbage_are_refused() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err());
        }
        assert_eq!(decode(b"hello, this is not it"), Err(DecodeError::BadMagic));
    }

    /// Fuzz-style: random mutations of a valid envelope (with a fixed checksum, so they reach
    /// the payload decoder and validation) and random bytes never panic.
    #[test]
    fn random_inputs_never_panic() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode(&sample());
        for _ in 0..20_000 {
            let mut b = valid.clone();
            for _ in 0..(next() % 8 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            if next() % 4 == 0 {
                b.truncate((next() as usize) % b.len());
            }
            // Re-seal so the mutation reaches the payload decoder and the validator.
            if b.len() >= HEADER_LEN {
                let len = (b.len() - HEADER_LEN) as u32;
                b[8..12].copy_from_slice(&len.to_le_bytes());
                let crc = crc32fast::hash(&b[HEADER_LEN..]);
                b[12..16].copy_from_slice(&crc.to_le_bytes());
                b[..4].copy_from_slice(MAGIC);
                b[4..6].copy_from_slice(&VERSION.to_le_bytes());
                b[6..8].copy_from_slice(&[0, 0]);
            }
            let _ = decode(&b);
            let noise: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            let _ = decode(&noise);
        }
    }

    #[test]
    fn other_versions_are_refused() {
        let mut b = encode(&sample());
        b[4] = 8;
        assert_eq!(decode(&b), Err(DecodeError::Version(8)));
    }

    #[test]
    fn overlapping_mappings_are_refused() {
        let mut d = sample();
        d.vmas[1].start = 0x3000;
        assert_eq!(
            decode(&encode(&d)),
            Err(DecodeError::Invalid("mappings overlap or are unsorted"))
        );
    }

    #[test]
    fn a_containers_tmpfs_paths_stay_within_their_mount() {
        use crate::{ContainerFile, ContainerFileKind, ContainerRef, TmpfsContent};
        let entry = |path: &str, kind: ContainerFileKind| ContainerFile {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            kind,
        };
        let with = |mount: &str, files: Vec<ContainerFile>| {
            let mut d = sample();
            d.container = Some(ContainerRef {
                bundle: "/b".into(),
                digest: [0; 32],
                tmpfs: vec![TmpfsContent {
                    mount: mount.into(),
                    files,
                }],
            });
            decode(&encode(&d))
        };
        let file = || ContainerFileKind::File(b"x".to_vec());
        let dir = || ContainerFileKind::Dir;
        assert!(with("tmp", vec![entry("d", dir()), entry("d/f", file())]).is_ok());
        let malformed = Err(DecodeError::Invalid(
            "a container's tmpfs content is malformed",
        ));
        for (mount, files) in [
            ("tmp", vec![entry("../etc/passwd", file())]),
            ("tmp", vec![entry("d/f", file())]),
            ("tmp", vec![entry("f", file()), entry("f/g", file())]),
            ("tmp", vec![entry("a//b", file())]),
            ("/tmp", vec![entry("f", file())]),
            ("tmp/..", vec![entry("f", file())]),
            (
                "tmp",
                vec![entry("l", ContainerFileKind::Symlink(String::new()))],
            ),
        ] {
            assert_eq!(with(mount, files.clone()), malformed, "{mount} {files:?}");
        }
    }

    /// Socket kinds as the kernel numbers them.
    mod libc_sock {
        pub const STREAM: i32 = 1;
        pub const DGRAM: i32 = 2;
    }

    #[test]
    fn socketpairs_and_timers_are_checked() {
        let malformed = Err(DecodeError::Invalid("a socketpair is malformed"));
        let with_queue = |kind: i32, queued: Vec<Vec<u8>>| {
            let mut d = sample();
            d.objects[2] = KernelObject::SocketPair {
                kind,
                ends: [
                    SocketEnd {
                        fds: vec![FdRef { fd: 8, flags: 2 }],
                        queued,
                    },
                    SocketEnd {
                        fds: vec![FdRef { fd: 9, flags: 2 }],
                        queued: vec![],
                    },
                ],
            };
            decode(&encode(&d)).map(|_| ())
        };
        use libc_sock::{DGRAM, STREAM};
        assert_eq!(
            with_queue(DGRAM, vec![b"a".to_vec(), b"bb".to_vec()]),
            Ok(())
        );
        assert_eq!(with_queue(3, vec![]), malformed, "a raw socket");
        assert_eq!(
            with_queue(STREAM, vec![b"a".to_vec(), b"bb".to_vec()]),
            malformed
        );
        assert_eq!(with_queue(DGRAM, vec![vec![]]), malformed);
        assert_eq!(
            with_queue(DGRAM, vec![vec![1; MAX_SOCKET_QUEUE + 1]]),
            malformed
        );
        let mut d = sample();
        if let KernelObject::TimerFd { clock, .. } = &mut d.objects[3] {
            *clock = 2;
        }
        assert_eq!(
            decode(&encode(&d)),
            Err(DecodeError::Invalid("a timerfd has an unknown clock"))
        );
    }

    #[test]
    fn kernel_objects_must_not_collide_or_dangle() {
        let mut d = sample();
        d.objects.push(KernelObject::EventFd {
            fds: vec![FdRef { fd: 6, flags: 2 }],
            count: 1,
            semaphore: false,
        });
        assert!(matches!(decode(&encode(&d)), Err(DecodeError::Invalid(_))));
        let mut d = sample();
        d.objects.remove(0);
        assert_eq!(
            decode(&encode(&d)),
            Err(DecodeError::Invalid(
                "an epoll set watches a descriptor the child lacks"
            ))
        );
        let mut d = sample();
        d.threads.clear();
        assert!(matches!(decode(&encode(&d)), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn page_list_beyond_mapping_is_refused() {
        let mut d = sample();
        d.vmas[0].seed_pages = PageSet::full(5);
        assert!(matches!(decode(&encode(&d)), Err(DecodeError::Invalid(_))));
    }
}
