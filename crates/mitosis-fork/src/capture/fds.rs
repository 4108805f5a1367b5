//! Sorting a seed's descriptors into what its children get: regular files (reopened by path),
//! private kernel objects (recreated with their state) and what is dropped on purpose.
//!
//! Read while every thread of the seed is stopped, so pipe contents and eventfd counts match
//! the memory snapshot.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::OwnedFd;

use mitosis_descriptor::codec::{MAX_PIPE_SIZE, MAX_SOCKET_QUEUE};
use mitosis_descriptor::{DroppedFd, EpollWatch, FdRef, KernelObject, OpenFile, SocketEnd};
use mitosis_sys::{task, unix_socket};

use super::memfiles;

/// Character devices a child can open again and get the same thing.
const PORTABLE_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// What the seed's descriptors beyond stdio become in a child.
#[derive(Debug, Default)]
pub struct Fds {
    pub files: Vec<OpenFile>,
    pub objects: Vec<KernelObject>,
    pub dropped: Vec<DroppedFd>,
    /// State that cannot be carried: prepare refuses the seed with these reasons.
    pub refused: Vec<String>,
    /// For each memfd or deleted file: its index in `objects`, its device and inode (to find
    /// its shared mappings).
    pub mem_files: Vec<(usize, (u32, u32), u64)>,
}

/// One descriptor as /proc shows it.
pub(super) struct Entry {
    pub fd: i32,
    pub target: String,
    pub info: String,
    pub flags: i32,
}

pub(super) fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim_start_matches(':').trim())
}

fn entries(pid: i32) -> Vec<Entry> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return vec![];
    };
    let mut out: Vec<Entry> = dir
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            let flags = i32::from_str_radix(field(&info, "flags")?, 8).ok()?;
            Some(Entry {
                fd,
                target,
                info,
                flags,
            })
        })
        .filter(|e| e.fd >= 3)
        .collect();
    out.sort_by_key(|e| e.fd);
    out
}

pub(super) fn fd_ref(e: &Entry) -> FdRef {
    FdRef {
        fd: e.fd,
        flags: e.flags,
    }
}

/// Sorts the descriptors of `pid` (stopped). `pidfd` lets us peek into its pipes.
pub fn capture(pid: i32, pidfd: &OwnedFd) -> Fds {
    let mut out = Fds::default();
    let mut pipes: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    let mut eventfds: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    let mut epolls = Vec::new();
    let mut sockets: BTreeMap<u32, Vec<Entry>> = BTreeMap::new();
    let mut timers = Vec::new();
    let mut mem_files = BTreeMap::new();
    let drop = |out: &mut Fds, e: &Entry, reason: &str| out.dropped.push(dropped(e, reason));
    for e in entries(pid) {
        let t = e.target.as_str();
        if t.starts_with("pipe:") {
            pipes.entry(t.to_string()).or_default().push(e);
        } else if t == "anon_inode:[eventfd]" {
            // One entry per eventfd; dups share an id (kernels without ids: one per fd).
            let id = field(&e.info, "eventfd-id").map_or_else(|| e.fd.to_string(), Into::into);
            eventfds.entry(id).or_default().push(e);
        } else if t == "anon_inode:[eventpoll]" {
            epolls.push(e);
        } else if let Some(ino) = socket_inode(t) {
            sockets.entry(ino).or_default().push(e);
        } else if t == "anon_inode:[timerfd]" || t == "anon_inode:[signalfd]" {
            timers.push(e);
        } else if t.starts_with("/memfd:")
            || t.ends_with(" (deleted)")
            // POSIX shared memory: a file of the host's (or container's) own tmpfs.
            || t.starts_with("/dev/shm/")
        {
            match memfiles::kind(pidfd, &e) {
                Ok(memfiles::Kind::File(dev, ino)) => {
                    mem_files.entry((dev, ino)).or_insert_with(Vec::new).push(e)
                }
                Ok(memfiles::Kind::Fifo(ino)) => {
                    pipes.entry(format!("fifo:{ino}")).or_default().push(e)
                }
                Err(why) => drop(&mut out, &e, &why),
            }
        } else if t.starts_with("anon_inode:") {
            drop(
                &mut out,
                &e,
                "mitosis does not carry this kind of descriptor",
            );
        } else if PORTABLE_DEVICES.contains(&t) {
            out.objects.push(KernelObject::Device {
                path: t.to_string(),
                fds: vec![fd_ref(&e)],
            });
        } else if t.starts_with("/dev/") {
            drop(
                &mut out,
                &e,
                "a device other than null/zero/full/random/urandom",
            );
        } else if t.starts_with('/')
            // Through the descriptor itself: a container's path means nothing here.
            && fs::metadata(format!("/proc/{pid}/fd/{}", e.fd))
                .is_ok_and(|m| m.is_file() || m.is_dir())
        {
            let offset = field(&e.info, "pos")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            out.files.push(OpenFile {
                fd: e.fd,
                path: t.to_string(),
                flags: e.flags,
                offset,
            });
        } else {
            drop(&mut out, &e, "not a file this host can reopen");
        }
    }
    for (_, ends) in pipes {
        let (readers, writers): (Vec<&Entry>, Vec<&Entry>) = ends
            .iter()
            .partition(|e| e.flags & libc::O_ACCMODE == libc::O_RDONLY);
        if readers.is_empty() || writers.is_empty() {
            for e in &ends {
                drop(&mut out, e, "the other end of the pipe is outside the seed");
            }
            continue;
        }
        match pipe_state(pidfd, readers[0].fd) {
            Ok((size, content)) => out.objects.push(KernelObject::Pipe {
                readers: readers.iter().map(|e| fd_ref(e)).collect(),
                writers: writers.iter().map(|e| fd_ref(e)).collect(),
                size,
                content,
            }),
            Err(why) => {
                for e in &ends {
                    drop(&mut out, e, &format!("pipe content: {why}"));
                }
            }
        }
    }
    for (_, fds) in eventfds {
        let count = field(&fds[0].info, "eventfd-count")
            .and_then(|c| u64::from_str_radix(c, 16).ok())
            .unwrap_or(0);
        let semaphore = field(&fds[0].info, "eventfd-semaphore") == Some("1");
        out.objects.push(KernelObject::EventFd {
            fds: fds.iter().map(fd_ref).collect(),
            count,
            semaphore,
        });
    }
    socket_pairs(pid, pidfd, sockets, &mut out);
    memfiles::capture(pid, pidfd, mem_files, &mut out);
    for group in same_files(pid, timers) {
        match timer_object(&group) {
            Some(object) => out.objects.push(object),
            None => {
                for e in &group {
                    drop(&mut out, e, "its fdinfo is not understood");
                }
            }
        }
    }
    let carried = |fd: i32, out: &Fds| {
        fd < 3
            || out.files.iter().any(|f| f.fd == fd)
            || out.objects.iter().any(|o| o.fds().any(|f| f.fd == fd))
            || epolls.iter().any(|e| e.fd == fd)
    };
    for e in &epolls {
        let mut watches = Vec::new();
        for w in parse_epoll_watches(&e.info) {
            if carried(w.fd, &out) {
                watches.push(w);
            } else {
                out.dropped.push(DroppedFd {
                    fd: e.fd,
                    target: format!("epoll watch of fd {}", w.fd),
                    reason: "the watched descriptor is not carried".into(),
                });
            }
        }
        out.objects.push(KernelObject::Epoll {
            fds: vec![fd_ref(e)],
            watches,
        });
    }
    out
}

/// A pipe's capacity and what it buffers, through its read end `fd` in the seed.
fn pipe_state(pidfd: &OwnedFd, fd: i32) -> Result<(u32, Vec<u8>), String> {
    let end = task::steal_fd(pidfd, fd).map_err(|e| e.to_string())?;
    let size = task::pipe_size(&end).map_err(|e| e.to_string())?;
    if size > MAX_PIPE_SIZE {
        return Err(format!(
            "its capacity is {size} bytes, more than the {MAX_PIPE_SIZE} carried"
        ));
    }
    let content = task::peek_pipe(&end, size).map_err(|e| e.to_string())?;
    Ok((size as u32, content))
}

pub(super) fn dropped(e: &Entry, reason: &str) -> DroppedFd {
    DroppedFd {
        fd: e.fd,
        target: e.target.clone(),
        reason: reason.into(),
    }
}

fn socket_inode(target: &str) -> Option<u32> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Sockets connected to each other within the seed become socketpairs with their queued
/// messages; every other socket reaches outside the seed and is dropped.
fn socket_pairs(pid: i32, pidfd: &OwnedFd, sockets: BTreeMap<u32, Vec<Entry>>, out: &mut Fds) {
    if sockets.is_empty() {
        return;
    }
    let drop_all = |out: &mut Fds, ends: &[&Vec<Entry>], reason: &str| {
        let all = ends.iter().flat_map(|v| v.iter());
        out.dropped.extend(all.map(|e| dropped(e, reason)));
    };
    let diag = match unix_socket::unix_sockets(pid) {
        Ok(diag) => diag,
        Err(why) => {
            let all: Vec<&Vec<Entry>> = sockets.values().collect();
            drop_all(
                out,
                &all,
                &format!("sockets are not carried (sock_diag: {why})"),
            );
            return;
        }
    };
    for (&ino, entries) in &sockets {
        let pair = diag.get(&ino).and_then(|s| {
            let peer = s.peer?;
            let back = diag.get(&peer)?.peer == Some(ino);
            (back && sockets.contains_key(&peer)).then_some((s.kind, peer))
        });
        let Some((kind, peer)) = pair else {
            drop_all(
                out,
                &[entries],
                "sockets are not carried (they reach outside the seed)",
            );
            continue;
        };
        if peer < ino {
            continue; // taken with its peer
        }
        let ends = [entries, &sockets[&peer]];
        let queued = |end: &Vec<Entry>| -> Result<Vec<Vec<u8>>, String> {
            let fd = task::steal_fd(pidfd, end[0].fd).map_err(|e| e.to_string())?;
            unix_socket::peek_queue(&fd, kind, MAX_SOCKET_QUEUE).map_err(|e| e.to_string())
        };
        match (queued(ends[0]), queued(ends[1])) {
            (Ok(a), Ok(b)) => out.objects.push(KernelObject::SocketPair {
                kind,
                ends: [
                    SocketEnd {
                        fds: ends[0].iter().map(fd_ref).collect(),
                        queued: a,
                    },
                    SocketEnd {
                        fds: ends[1].iter().map(fd_ref).collect(),
                        queued: b,
                    },
                ],
            }),
            (Err(why), _) | (_, Err(why)) => {
                drop_all(out, &ends, &format!("socketpair queue: {why}"));
            }
        }
    }
}

/// `entries` grouped by the open file they refer to (dups of one descriptor share it).
pub(super) fn same_files(pid: i32, entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut groups: Vec<Vec<Entry>> = Vec::new();
    for e in entries {
        let same = |g: &Vec<Entry>| {
            g[0].target == e.target && task::same_file(pid, g[0].fd, e.fd).unwrap_or(false)
        };
        match groups.iter_mut().find(|g| same(g)) {
            Some(group) => group.push(e),
            None => groups.push(vec![e]),
        }
    }
    groups
}

/// A timerfd or signalfd from its fdinfo.
fn timer_object(group: &[Entry]) -> Option<KernelObject> {
    let info = &group[0].info;
    let fds = group.iter().map(fd_ref).collect();
    if group[0].target == "anon_inode:[signalfd]" {
        let mask = u64::from_str_radix(field(info, "sigmask")?, 16).ok()?;
        return Some(KernelObject::SignalFd { fds, mask });
    }
    // "(seconds, nanoseconds)"
    let time = |name: &str| -> Option<u64> {
        let v = field(info, name)?
            .trim_start_matches('(')
            .trim_end_matches(')');
        let (s, ns) = v.split_once(',')?;
        let (s, ns): (u64, u64) = (s.trim().parse().ok()?, ns.trim().parse().ok()?);
        Some(s * 1_000_000_000 + ns)
    };
    Some(KernelObject::TimerFd {
        fds,
        clock: field(info, "clockid")?.parse().ok()?,
        value_ns: time("it_value")?,
        interval_ns: time("it_interval")?,
        ticks: field(info, "ticks")?.parse().ok()?,
    })
}

/// The `tfd:` lines of an epoll's fdinfo.
fn parse_epoll_watches(info: &str) -> Vec<EpollWatch> {
    info.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let mut next_after = |key: &str| {
                words
                    .by_ref()
                    .skip_while(|w| *w != key)
                    .nth(1)
                    .map(str::to_string)
            };
            let fd = next_after("tfd:")?.parse().ok()?;
            let events = u32::from_str_radix(&next_after("events:")?, 16).ok()?;
            let data = u64::from_str_radix(&next_after("data:")?, 16).ok()?;
            Some(EpollWatch { fd, events, data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_lines() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:       17 events:       19 data:               11  pos:0 ino:40e sdev:10\n\
                    tfd:        0 events: 80000019 data:                0  pos:0 ino:b96e5 sdev:f\n";
        let w = parse_epoll_watches(info);
        assert_eq!(
            w,
            vec![
                EpollWatch {
                    fd: 17,
                    events: 0x19,
                    data: 0x11
                },
                EpollWatch {
                    fd: 0,
                    events: 0x8000_0019,
                    data: 0
                },
            ]
        );
    }

    #[test]
    fn own_descriptors_are_sorted() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"abc").unwrap();
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd returns a new descriptor (checked below) that only this OwnedFd owns.
        let efd = unsafe { OwnedFd::from_raw_fd(libc::eventfd(7, libc::EFD_CLOEXEC)) };
        assert!(efd.as_raw_fd() >= 0);
        let (mut sa, sb) = std::os::unix::net::UnixStream::pair().unwrap();
        sa.write_all(b"queued").unwrap();
        let sb_dup = sb.try_clone().unwrap();
        let timer = nix::sys::timerfd::TimerFd::new(
            nix::sys::timerfd::ClockId::CLOCK_MONOTONIC,
            nix::sys::timerfd::TimerFlags::TFD_CLOEXEC,
        )
        .unwrap();
        let hour = nix::sys::time::TimeSpec::new(3600, 0);
        timer
            .set(
                nix::sys::timerfd::Expiration::IntervalDelayed(hour, hour),
                nix::sys::timerfd::TimerSetTimeFlags::empty(),
            )
            .unwrap();
        let me = std::process::id() as i32;
        let pidfd = mitosis_sys::pidfd::open(me).unwrap();
        let fds = capture(me, &pidfd);
        let pair = fds.objects.iter().find_map(|o| match o {
            KernelObject::SocketPair { kind, ends } if ends[0].fds[0].fd == sa.as_raw_fd() => {
                Some((*kind, ends.clone()))
            }
            _ => None,
        });
        let (kind, ends) = pair.expect("the socketpair is carried");
        assert_eq!(kind, libc::SOCK_STREAM);
        assert!(ends[0].queued.is_empty());
        assert_eq!(ends[1].queued, vec![b"queued".to_vec()]);
        let mut b_fds: Vec<i32> = ends[1].fds.iter().map(|f| f.fd).collect();
        b_fds.sort();
        // The dup may take a lower number than the original: other tests of this process
        // close descriptors meanwhile.
        let mut want = [sb.as_raw_fd(), sb_dup.as_raw_fd()];
        want.sort();
        assert_eq!(b_fds, want, "dups share the end");
        let armed = fds.objects.iter().find_map(|o| match o {
            KernelObject::TimerFd {
                fds,
                value_ns,
                interval_ns,
                clock,
                ..
            } if fds[0].fd == timer.as_fd().as_raw_fd() => Some((*clock, *value_ns, *interval_ns)),
            _ => None,
        });
        let (clock, value_ns, interval_ns) = armed.expect("the timerfd is carried");
        assert_eq!(
            (clock, interval_ns),
            (libc::CLOCK_MONOTONIC, 3_600_000_000_000)
        );
        assert!(value_ns > 3_500_000_000_000 && value_ns <= 3_600_000_000_000);
        use std::os::fd::AsRawFd;
        let pipe = fds.objects.iter().find(|o| match o {
            KernelObject::Pipe { readers, .. } => readers[0].fd == r.as_raw_fd(),
            _ => false,
        });
        match pipe {
            Some(KernelObject::Pipe {
                writers, content, ..
            }) => {
                assert_eq!(writers[0].fd, w.as_raw_fd());
                assert_eq!(content, b"abc");
            }
            other => panic!("pipe not found: {other:?}"),
        }
        assert!(fds.objects.iter().any(|o| matches!(o,
            KernelObject::EventFd { fds, count: 7, .. } if fds[0].fd == efd.as_raw_fd())));
        drop((r, w, efd, sa, sb, sb_dup, timer));
    }
}
