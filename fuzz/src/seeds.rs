//! The generated corpus: small valid encodings of real values, one file each under
//! `corpus/<target>/gen-<name>`. Regenerate with `cargo run -p mitosis-fuzz --bin
//! mitosis-fuzz-corpus` whenever a wire type changes; files not named `gen-*` (AFL finds) are
//! kept as they are.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use mitosis_descriptor::{
    AltStack, Backing, ContainerFile, ContainerFileKind, ContainerRef, Descriptor, DroppedFd,
    EpollWatch, FdRef, FileIdentity, Handle, KEY_LEN, KernelObject, MmFields, OpenFile, PageSet,
    ProcessState, REGS_WORDS, Rlimit, RobustList, Rseq, SigAction, SocketEnd, Thread, TmpfsContent,
    Vdso, Vma,
};
use mitosis_transport::control::{self, Event, FaultStats, PrepareStats, ResumeStats};
use mitosis_transport::frame;
use mitosis_transport::packed::{self, Codec, PAGE};
use mitosis_transport::peer::{self, PagesFollow, RemoteError, SeedRef};

/// Prefix of generated files; the generator replaces those and only those.
pub const GENERATED: &str = "gen-";

pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// Every generated seed: target name, then file name to bytes.
pub fn generate() -> BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> {
    let mut all = BTreeMap::new();
    let mut add = |target: &'static str, seeds: Vec<(&str, Vec<u8>)>| {
        let files = seeds
            .into_iter()
            .map(|(name, bytes)| (format!("{GENERATED}{name}"), bytes))
            .collect();
        all.insert(target, files);
    };
    add("peer_request", peer_requests());
    add("peer_response", peer_responses());
    add("control_request", control_requests());
    add("control_event", control_events());
    add("packed", chunks());
    add("descriptor", descriptors());
    add("handle", handles());
    all
}

/// The files of `target`'s corpus directory, by name.
pub fn load(target: &str) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let dir = corpus_dir().join(target);
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            out.insert(name, std::fs::read(entry.path())?);
        }
    }
    Ok(out)
}

/// Writes the generated seeds and removes generated files no longer made; returns the names
/// of the files it changed.
pub fn write() -> io::Result<Vec<String>> {
    let mut changed = Vec::new();
    for (target, seeds) in generate() {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir)?;
        let on_disk = load(target)?;
        for name in on_disk.keys() {
            if name.starts_with(GENERATED) && !seeds.contains_key(name) {
                std::fs::remove_file(dir.join(name))?;
                changed.push(format!("{target}/{name} (removed)"));
            }
        }
        for (name, bytes) in seeds {
            if on_disk.get(&name) != Some(&bytes) {
                std::fs::write(dir.join(&name), &bytes)?;
                changed.push(format!("{target}/{name}"));
            }
        }
    }
    Ok(changed)
}

fn seed(id: u64) -> SeedRef {
    SeedRef {
        id,
        key: std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a),
    }
}

/// Sealed request frames as a client sends them, and a server's hello.
fn peer_requests() -> Vec<(&'static str, Vec<u8>)> {
    use peer::Request;
    let nonce = [9u8; peer::NONCE_LEN];
    let sealed = |s: SeedRef, seq, r: &Request| peer::seal(&s, &nonce, seq, r);
    vec![
        (
            "hello",
            peer::Hello {
                version: peer::PROTOCOL_VERSION,
                nonce,
            }
            .frame()[4..]
                .to_vec(),
        ),
        ("attach", sealed(seed(1), 0, &Request::Attach)),
        ("descriptor", sealed(seed(300), 1, &Request::Descriptor)),
        (
            "pages",
            sealed(
                seed(1),
                2,
                &Request::Pages {
                    runs: vec![
                        (0x7f12_3456_7000, 1),
                        (0x7f12_3456_9000, 16),
                        (0x5555_0000, 3),
                    ],
                    touched: Some(0x7f12_3456_7000),
                },
            ),
        ),
        (
            "pages-prefetch",
            sealed(
                seed(u64::MAX),
                u64::MAX,
                &Request::Pages {
                    runs: vec![(0x1000, 64)],
                    touched: None,
                },
            ),
        ),
        ("bootstrap", sealed(seed(2), 3, &Request::Bootstrap)),
        (
            "touched",
            sealed(
                seed(2),
                4,
                &Request::Touched {
                    runs: vec![(0x40_0000, 3), (0x50_0000, 1)],
                },
            ),
        ),
    ]
}

fn peer_responses() -> Vec<(&'static str, Vec<u8>)> {
    use peer::Response;
    let chunk = |data: &[u8], codec| packed::pack(data, codec).remove(0);
    let mut out = vec![
        ("attached", frame::encode(&Response::Attached)),
        (
            "descriptor",
            frame::encode(&Response::Descriptor(mitosis_descriptor::encode(
                &minimal_descriptor(),
            ))),
        ),
        ("pages", frame::encode(&Response::Pages(pattern(1)))),
        ("recorded", frame::encode(&Response::Recorded)),
        (
            "bootstrap-raw",
            frame::encode(&Response::Bootstrap {
                descriptor: mitosis_descriptor::encode(&minimal_descriptor()),
                runs: vec![(0x1000, 2), (0x10000, 1)],
                follow: PagesFollow::Raw,
                learn: false,
            }),
        ),
        (
            "bootstrap-chunks",
            frame::encode(&Response::Bootstrap {
                descriptor: mitosis_descriptor::encode(&minimal_descriptor()),
                runs: vec![(0x40_0000, 100)],
                follow: PagesFollow::Chunks(2),
                learn: true,
            }),
        ),
        (
            "chunk-lz4",
            frame::encode(&Response::Chunk(chunk(&pattern(4), Codec::Lz4))),
        ),
        (
            "chunk-raw",
            frame::encode(&Response::Chunk(chunk(&[0; PAGE], Codec::Raw))),
        ),
    ];
    let errors = [
        ("error-no-seed", RemoteError::NoSuchSeed(3)),
        ("error-key", RemoteError::WrongKey(3)),
        ("error-range", RemoteError::BadRange(0x7fff_0000, 9)),
        ("error-gone", RemoteError::SeedGone("twin exited".into())),
        ("error-too-large", RemoteError::TooLarge),
    ];
    for (name, e) in errors {
        out.push((name, frame::encode(&Response::Error(e))));
    }
    out
}

fn control_requests() -> Vec<(&'static str, Vec<u8>)> {
    use control::Request;
    let handle = sample_handles()[0].to_string();
    vec![
        ("prepare", frame::encode(&Request::Prepare { pid: 1234 })),
        ("prepare-caller", frame::encode(&Request::PrepareCaller)),
        (
            "prepare-profiled",
            frame::encode(&Request::PrepareProfiled {
                pid: None,
                profile: "app/fn".into(),
            }),
        ),
        (
            "prepare-bundle",
            frame::encode(&Request::PrepareBundle {
                bundle: "/var/lib/mitosis/bundles/python".into(),
                ready_timeout_ms: 30_000,
            }),
        ),
        (
            "drop",
            frame::encode(&Request::Drop {
                handle: handle.clone(),
            }),
        ),
        (
            "resume",
            frame::encode(&Request::Resume {
                handle: handle.clone(),
                memory_mib: Some(256),
            }),
        ),
        (
            "start",
            frame::encode(&Request::Start {
                bundle: "/var/lib/mitosis/bundles/python".into(),
                memory_mib: Some(128),
                warm_timeout_ms: Some(30_000),
            }),
        ),
        (
            "replicate",
            frame::encode(&Request::Replicate {
                handle: handle.clone(),
            }),
        ),
        (
            "evict",
            frame::encode(&Request::Evict {
                handle: handle.clone(),
            }),
        ),
        ("signal", frame::encode(&Request::Signal { signo: 15 })),
        ("status", frame::encode(&Request::Status)),
        ("inspect", frame::encode(&Request::Inspect { handle })),
        (
            "stdin",
            frame::encode(&Request::Stdin(b"line 1\nline 2\n".to_vec())),
        ),
        ("stdin-eof", frame::encode(&Request::StdinEof)),
    ]
}

fn control_events() -> Vec<(&'static str, Vec<u8>)> {
    let resume = ResumeStats {
        cached: true,
        attach_us: 120,
        descriptor_us: 300,
        plan_us: 450,
        build_us: 4000,
        spawn_us: 200,
        restore_us: 3000,
        eager_pages: 880,
        working_set_pages: 1200,
        working_set_us: 2500,
        install_us: 900,
        pages_wait_us: 1600,
        fork_us: 650,
        container_us: 24,
        container_pooled: true,
        join_us: 137,
        total_us: 8000,
    };
    vec![
        (
            "prepared",
            frame::encode(&Event::Prepared {
                handle: sample_handles()[0].to_string(),
                stats: PrepareStats {
                    warm_us: 0,
                    stopped_us: 590,
                    total_us: 1350,
                    vmas: 64,
                    seed_pages: 2200,
                    descriptor_bytes: 9000,
                    carried_pages: 300,
                },
            }),
        ),
        ("done", frame::encode(&Event::Done)),
        (
            "started",
            frame::encode(&Event::Started {
                pid: 4321,
                stats: resume,
            }),
        ),
        (
            "started-default",
            frame::encode(&Event::Started {
                pid: 1,
                stats: ResumeStats::default(),
            }),
        ),
        (
            "exited",
            frame::encode(&Event::Exited {
                status: 137,
                reason: Some("out of memory: killed at its container's limit of 64 MiB".into()),
                stats: FaultStats {
                    faults: 40,
                    zero_faults: 12,
                    fetches: 3,
                    pages_fetched: 48,
                    fetch_us: 900,
                },
            }),
        ),
        (
            "exited-clean",
            frame::encode(&Event::Exited {
                status: 0,
                reason: None,
                stats: FaultStats::default(),
            }),
        ),
        (
            "status",
            frame::encode(&Event::Status(control::DaemonStatus {
                listen: "10.0.0.1:7070".into(),
                children_running: 2,
                children_started: 9,
                bytes_served: 1 << 20,
                peer_connections: 3,
                peer_refused: 0,
                peer_tls_refused: 1,
                control_connections: 2,
                control_refused: 0,
                control_tls_refused: 5,
                cpus: 2,
                memory_available_mib: 20_480,
                seeds: vec![control::SeedStatus {
                    id: 1,
                    pid: 4242,
                    vmas: 80,
                    pages: 3000,
                }],
                replicas: vec![control::ReplicaStatus {
                    seed: 4,
                    host: "10.0.0.2:7070".into(),
                    pid: 777,
                    pages: 1200,
                    children: 1,
                }],
                pool: vec![("10.0.0.2:7070".into(), 4)],
                containers: vec!["containers cgroup v1 (memory, cpu, pids)".into()],
            })),
        ),
        (
            "descriptor",
            frame::encode(&Event::Descriptor(mitosis_descriptor::encode(
                &minimal_descriptor(),
            ))),
        ),
        (
            "stdout",
            frame::encode(&Event::Stdout(b"got line 1\n".to_vec())),
        ),
        (
            "stderr",
            frame::encode(&Event::Stderr(b"warning\n".to_vec())),
        ),
        ("stdin-window", frame::encode(&Event::StdinWindow(32 << 10))),
        (
            "error",
            frame::encode(&Event::Error(control::DaemonError::new(
                control::ErrorKind::NoSuchSeed,
                "no seed 3 on that host",
            ))),
        ),
    ]
}

/// Chunks as the body of a `Response::Chunk` carries them.
fn chunks() -> Vec<(&'static str, Vec<u8>)> {
    let body = |data: &[u8], codec| {
        postcard::to_stdvec(&packed::pack(data, codec).remove(0)).expect("serializes")
    };
    let mut mixed = vec![0u8; 3 * PAGE];
    mixed[PAGE..2 * PAGE].copy_from_slice(&noise(PAGE, 1));
    vec![
        ("raw-1", body(&pattern(1), Codec::Raw)),
        ("lz4-zero-1", body(&[0; PAGE], Codec::Lz4)),
        ("lz4-pattern-64", body(&pattern(64), Codec::Lz4)),
        ("lz4-mixed-3", body(&mixed, Codec::Lz4)),
    ]
}

/// Heap-like pages: repetitive, so they compress like a seed's memory.
fn pattern(pages: usize) -> Vec<u8> {
    (0..pages * PAGE).map(|i| (i / 7 % 251) as u8).collect()
}

/// Incompressible bytes (xorshift).
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn descriptors() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("minimal", mitosis_descriptor::encode(&minimal_descriptor())),
        ("runtime", mitosis_descriptor::encode(&runtime_descriptor())),
    ]
}

fn thread(tid: i32, name: &str) -> Thread {
    Thread {
        tid,
        name: name.into(),
        regs: (0..REGS_WORDS as u64)
            .map(|i| 0x7ffd_0000_0000 + i)
            .collect(),
        xstate: noise(64, tid as u64)
            .into_iter()
            .chain(std::iter::repeat_n(0, 512))
            .collect(),
        sigmask: 0,
        rseq: None,
        robust_list: None,
        tid_address: 0,
        tid_cache: 0,
        own_tid: 0,
        altstack: None,
        in_syscall: -1,
        creds: mitosis_descriptor::Credentials {
            uids: [65534; 4],
            gids: [65534, 65534, 65534, 100],
            groups: vec![4, 24],
            caps: mitosis_descriptor::Capabilities {
                effective: 0x400,
                permitted: 0x400,
                inheritable: 0x400,
                bounding: 0x1ff_ffff_ffff,
                ambient: 0x400,
            },
            securebits: 0x10,
            no_new_privs: true,
            // A filter returning ALLOW: `ret #0x7fff0000`.
            seccomp: vec![mitosis_descriptor::SeccompFilter {
                program: vec![0x7fff_0000_0000_0006],
                flags: 2,
            }],
        },
        timer_slack_ns: 50_000,
        pdeathsig: 0,
        pending: vec![],
    }
}

fn anon(start: u64, pages: u64, prot: u8, seed_pages: PageSet) -> Vma {
    Vma::anonymous(start, start + pages * PAGE as u64, prot, seed_pages)
}

/// One thread, one mapping: the least a decoder accepts.
fn minimal_descriptor() -> Descriptor {
    Descriptor {
        seed_id: 1,
        arch: "x86_64".into(),
        threads: vec![thread(100, "seed")],
        process: ProcessState::default(),
        mm: MmFields::default(),
        auxv: vec![6, 4096, 0, 0],
        exe: None,
        vdso: None,
        vmas: vec![anon(0x1000, 4, 3, PageSet::from_flags([true, false, true]))],
        cwd: None,
        files: vec![],
        objects: vec![],
        dropped: vec![],
        container: None,
    }
}

/// Shaped like a small runtime's seed: threads with their rseq, robust lists and alternate
/// stacks, an executable and libraries, a heap, a stack, the vDSO, every kind of kernel object.
fn runtime_descriptor() -> Descriptor {
    let file = |path: &str, size: u64| FileIdentity {
        path: path.into(),
        size,
        hash: std::array::from_fn(|i| size as u8 ^ i as u8),
    };
    let mapped = |start: u64, pages: u64, prot: u8, f: FileIdentity, offset: u64| Vma {
        backing: Backing::File {
            offset,
            file_pages: pages,
            file: f,
        },
        ..Vma::anonymous(start, start + pages * PAGE as u64, prot, PageSet::default())
    };
    let exe = file("/usr/bin/python3.11", 6_831_736);
    let libc = file("/usr/lib/x86_64-linux-gnu/libc.so.6", 1_922_136);
    let mut main = thread(4000, "python3");
    main.in_syscall = 0; // read(0): waiting for its request
    main.tid_address = 0x7f00_0000_0a10;
    main.tid_cache = 0x7f00_0000_0a10;
    let mut threads = vec![main];
    for n in 1..4 {
        let mut t = thread(4000 + n, &format!("OpenBLAS-{n}"));
        t.rseq = Some(Rseq {
            pointer: 0x7f00_1000_0000 + n as u64 * 0x1000,
            size: 32,
            signature: 0x5305_3053,
        });
        t.robust_list = Some(RobustList {
            head: 0x7f00_1000_0920 + n as u64 * 0x1000,
            len: 24,
        });
        t.altstack = Some(AltStack {
            sp: 0x7f00_2000_0000,
            size: 0x4000,
            flags: 0,
        });
        t.sigmask = 1 << 13;
        t.in_syscall = 202;
        threads.push(t);
    }
    let mut heap = PageSet::default();
    heap.push_run(0, 30);
    heap.push_run(40, 2);
    heap.push(100);
    let mut written = PageSet::default();
    written.push(1);
    let mut data = mapped(0x5555_5580_0000, 2, 3, exe.clone(), 0x60_0000);
    data.seed_pages = written;
    let mut stack = anon(0x7ffd_1000_0000, 33, 3, PageSet::default());
    stack.grows_down = true;
    stack.seed_pages.push_run(29, 4);
    let mut v8 = anon(0x7f00_3000_0000, 16, 3, PageSet::full(16));
    v8.dont_fork = true;
    v8.locked = true;
    let fd = |fd, flags| FdRef { fd, flags };
    Descriptor {
        seed_id: 0x1234_5678,
        arch: "x86_64".into(),
        threads,
        process: ProcessState {
            dumpable: 1,
            thp_disabled: true,
            personality: 0x0040000,
            child_subreaper: true,
            sigactions: vec![
                SigAction {
                    signal: 2,
                    handler: 0x5555_5560_1234,
                    flags: 0x0400_0000,
                    restorer: 0x7f00_0004_2520,
                    mask: 0,
                },
                SigAction {
                    signal: 13,
                    handler: mitosis_descriptor::SIG_IGN,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                },
            ],
            rlimits: vec![
                Rlimit {
                    resource: 7,
                    soft: 1024,
                    hard: 524_288,
                },
                Rlimit {
                    resource: 3,
                    soft: 8 << 20,
                    hard: u64::MAX,
                },
            ],
            umask: 0o022,
            pending: vec![mitosis_descriptor::PendingSignal {
                signal: 10,
                info: [10, 0, 0, 0].into_iter().chain([0; 124]).collect(),
            }],
            itimers: vec![mitosis_descriptor::IntervalTimer {
                which: 0,
                value_ns: 1_500_000_000,
                interval_ns: 0,
            }],
            posix_timers: vec![mitosis_descriptor::PosixTimer {
                id: 1,
                clock: 1,
                notify: 0,
                signal: 34,
                value: 7,
                thread: 0,
                value_ns: 2_000_000_000,
                interval_ns: 500_000_000,
            }],
            sched: mitosis_descriptor::Scheduling {
                nice: 5,
                policy: 3,
                rt_priority: 0,
                ioprio: (2 << 13) | 6,
                mce_kill: 1,
                oom_score_adj: 123,
                coredump_filter: 0x3f,
            },
            zombies: vec![
                mitosis_descriptor::Zombie {
                    pid: 4100,
                    status: 3 << 8,
                },
                mitosis_descriptor::Zombie {
                    pid: 4101,
                    status: 15,
                },
            ],
        },
        mm: MmFields {
            start_code: 0x5555_5540_0000,
            end_code: 0x5555_5570_0000,
            start_data: 0x5555_5580_0000,
            end_data: 0x5555_5582_0000,
            start_brk: 0x5555_5600_0000,
            brk: 0x5555_5610_0000,
            start_stack: 0x7ffd_1002_0f00,
            arg_start: 0x7ffd_1002_1000,
            arg_end: 0x7ffd_1002_1020,
            env_start: 0x7ffd_1002_1020,
            env_end: 0x7ffd_1002_1fe0,
        },
        auxv: vec![33, 0x7ffd_1003_0000, 6, 4096, 25, 0x7ffd_1002_0f10, 0, 0],
        exe: Some(exe.clone()),
        vdso: Some(Vdso {
            block_start: 0x7ffd_1003_0000 - 4 * PAGE as u64,
            vdso_start: 0x7ffd_1003_0000,
            vdso_end: 0x7ffd_1003_2000,
            hash: [7; 32],
        }),
        vmas: vec![
            mapped(0x5555_5540_0000, 3, 5, exe.clone(), 0),
            data,
            anon(0x5555_5600_0000, 256, 3, heap),
            anon(0x7f00_0000_0000, 8, 3, PageSet::from_flags([false, true])),
            mapped(0x7f00_0004_0000, 400, 5, libc.clone(), 0x28000),
            mapped(0x7f00_001d_0000, 16, 1, libc, 0x1b8000),
            v8,
            stack,
        ],
        cwd: Some("/srv/fn".into()),
        files: vec![OpenFile {
            fd: 3,
            path: "/srv/fn/model.bin".into(),
            flags: 0o2_000_000,
            offset: 4096,
        }],
        objects: vec![
            KernelObject::Device {
                path: "/dev/urandom".into(),
                fds: vec![fd(4, 0o2_000_000)],
            },
            KernelObject::Pipe {
                readers: vec![fd(5, 0)],
                writers: vec![fd(6, 1)],
                size: 65536,
                content: b"queued".to_vec(),
            },
            KernelObject::EventFd {
                fds: vec![fd(7, 0o4002)],
                count: 1,
                semaphore: false,
            },
            KernelObject::Epoll {
                fds: vec![fd(8, 0o2_000_000)],
                watches: vec![
                    EpollWatch {
                        fd: 7,
                        events: 1,
                        data: 7,
                    },
                    EpollWatch {
                        fd: 9,
                        events: 0x2001,
                        data: 9,
                    },
                ],
            },
            KernelObject::SocketPair {
                kind: 1,
                ends: [
                    SocketEnd {
                        fds: vec![fd(9, 0o4002)],
                        queued: vec![b"\0".to_vec()],
                    },
                    SocketEnd {
                        fds: vec![fd(10, 0o4002)],
                        queued: vec![],
                    },
                ],
            },
            KernelObject::SocketPair {
                kind: 2,
                ends: [
                    SocketEnd {
                        fds: vec![fd(11, 2)],
                        queued: vec![b"one".to_vec(), b"two".to_vec()],
                    },
                    SocketEnd {
                        fds: vec![fd(12, 2)],
                        queued: vec![],
                    },
                ],
            },
            KernelObject::TimerFd {
                fds: vec![fd(13, 0)],
                clock: 1,
                value_ns: 250_000_000,
                interval_ns: 1_000_000_000,
                ticks: 2,
            },
            KernelObject::SignalFd {
                fds: vec![fd(14, 0)],
                mask: 1 << 16,
            },
        ],
        dropped: vec![DroppedFd {
            fd: 15,
            target: "socket:[123456]".into(),
            reason: "a socket reaching outside the seed".into(),
        }],
        container: Some(ContainerRef {
            bundle: "/var/lib/mitosis/bundles/python".into(),
            digest: [0xc4; 32],
            tmpfs: vec![TmpfsContent {
                mount: "tmp".into(),
                files: vec![
                    ContainerFile {
                        path: "cache".into(),
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        kind: ContainerFileKind::Dir,
                    },
                    ContainerFile {
                        path: "cache/model.txt".into(),
                        mode: 0o644,
                        uid: 1000,
                        gid: 1000,
                        kind: ContainerFileKind::File(b"weights".to_vec()),
                    },
                    ContainerFile {
                        path: "latest".into(),
                        mode: 0o777,
                        uid: 0,
                        gid: 0,
                        kind: ContainerFileKind::Symlink("cache/model.txt".into()),
                    },
                ],
            }],
        }),
    }
}

fn sample_handles() -> Vec<Handle> {
    let key: [u8; KEY_LEN] = std::array::from_fn(|i| (i * 7) as u8);
    vec![
        Handle {
            host: "10.0.0.1:7070".parse().expect("address"),
            seed_id: 1,
            key,
        },
        Handle {
            host: "[fe80::1%2]:65535".parse().expect("address"),
            seed_id: u64::MAX,
            key: [0xff; KEY_LEN],
        },
        Handle {
            host: "[::ffff:192.0.2.1]:1".parse().expect("address"),
            seed_id: 0,
            key: [0; KEY_LEN],
        },
    ]
}

fn handles() -> Vec<(&'static str, Vec<u8>)> {
    let h = sample_handles();
    vec![
        ("v4", h[0].to_string().into_bytes()),
        ("v6-scope", h[1].to_string().into_bytes()),
        ("v4-mapped", h[2].to_string().into_bytes()),
        (
            "spaced-upper",
            format!(
                "  mitosis://{}/{}/{}\n",
                h[0].host,
                h[0].seed_id,
                h[0].to_string()
                    .rsplit('/')
                    .next()
                    .expect("key")
                    .to_uppercase()
            )
            .into_bytes(),
        ),
    ]
}
