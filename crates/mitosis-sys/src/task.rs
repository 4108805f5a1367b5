//! Per-task kernel state read from outside: robust futex lists, resource limits, and the
//! buffered content of another process's pipe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cvt;

/// RLIMIT_NLIMITS.
pub const RLIMITS: u32 = 16;

/// `get_robust_list(tid)`: the head and length the thread registered (head 0 if none).
pub fn robust_list(tid: i32) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out-pointers are valid, writable locals of the sizes the kernel writes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    cvt(ret)?;
    Ok((head, len as u64))
}

/// Task `tid`'s id in its own pid namespace (the last of `NSpid` in /proc/TID/status): what
/// `gettid` returns to it.
pub fn own_ns_id(tid: i32) -> io::Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no NSpid in its status"))
}

/// `ioprio_get(IOPRIO_WHO_PROCESS, pid)`: the task's I/O priority, as the task itself would
/// read it (no permission needed to read it).
pub fn io_priority(pid: i32) -> io::Result<i64> {
    // SAFETY: ioprio_get takes two integers and writes nothing.
    let ret = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, pid) };
    cvt(ret)
}

/// Every resource limit of `pid`, as (resource, soft, hard).
pub fn rlimits(pid: i32) -> io::Result<Vec<(u32, u64, u64)>> {
    (0..RLIMITS)
        .map(|resource| {
            let mut old = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `old` is a writable rlimit64; a null new limit only reads.
            let ret = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
            cvt(ret as libc::c_long)?;
            Ok((resource, old.rlim_cur, old.rlim_max))
        })
        .collect()
}

/// A duplicate of descriptor `fd` of the process behind `pidfd` (`pidfd_getfd`).
pub fn steal_fd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the kernel returns a new descriptor we then own.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    let new = cvt(ret)? as i32;
    // SAFETY: `new` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether descriptors `a` and `b` of `pid` are the same open file (`kcmp(KCMP_FILE)`): dups
/// of one descriptor are, two descriptors opened apart are not.
pub fn same_file(pid: i32, a: i32, b: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: plain integer arguments; kcmp reads no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    Ok(cvt(ret)? == 0)
}

/// Bytes buffered in a pipe, at most `max`, without consuming them: `tee` copies them into a
/// pipe of our own, which we drain.
pub fn peek_pipe(read_end: &OwnedFd, max: usize) -> io::Result<Vec<u8>> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer we pass.
    cvt(unsafe { libc::ioctl(read_end.as_raw_fd(), libc::FIONREAD, &mut queued) } as _)?;
    let queued = queued.max(0) as usize;
    if queued == 0 {
        return Ok(Vec::new());
    }
    if queued > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{queued} bytes buffered, more than {max}"),
        ));
    }
    let (ours_r, ours_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Our pipe must hold all of it, whatever the system's default size.
    nix::fcntl::fcntl(&ours_w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(max as _))?;
    let mut out = Vec::with_capacity(queued);
    // SAFETY: both are pipes we hold; tee only moves buffer references between them.
    let copied = unsafe {
        libc::tee(
            read_end.as_raw_fd(),
            ours_w.as_raw_fd(),
            queued,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    cvt(copied as libc::c_long)?;
    drop(ours_w);
    let mut file = std::fs::File::from(ours_r);
    io::Read::read_to_end(&mut file, &mut out)?;
    Ok(out)
}

/// The capacity of the pipe `end` belongs to (`F_GETPIPE_SZ`).
pub fn pipe_size(end: &OwnedFd) -> io::Result<usize> {
    let size = nix::fcntl::fcntl(end, nix::fcntl::FcntlArg::F_GETPIPE_SZ)?;
    Ok(size as usize)
}

/// Sets the calling thread's nice value (Linux nice is per thread).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority only reads its integer arguments.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    cvt(ret as libc::c_long)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn peeking_leaves_the_pipe_as_it_was() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"hello").unwrap();
        assert_eq!(peek_pipe(&r, 65536).unwrap(), b"hello");
        assert!(peek_pipe(&r, 3).is_err());
        drop(w);
        let mut rest = Vec::new();
        std::fs::File::from(r).read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"hello");
    }

    #[test]
    fn dups_are_the_same_file_and_reopens_are_not() {
        use std::os::fd::AsRawFd;
        let me = std::process::id() as i32;
        let a = std::fs::File::open("/dev/null").unwrap();
        let dup = a.try_clone().unwrap();
        let other = std::fs::File::open("/dev/null").unwrap();
        assert!(same_file(me, a.as_raw_fd(), dup.as_raw_fd()).unwrap());
        assert!(!same_file(me, a.as_raw_fd(), other.as_raw_fd()).unwrap());
    }

    #[test]
    fn own_limits_and_robust_list_are_readable() {
        let limits = rlimits(std::process::id() as i32).unwrap();
        assert_eq!(limits.len(), RLIMITS as usize);
        assert!(limits.iter().all(|&(_, soft, hard)| soft <= hard));
        // glibc registers a robust list for every thread it starts.
        let (head, len) = robust_list(0).unwrap();
        assert!(head != 0 && len > 0);
    }
}
