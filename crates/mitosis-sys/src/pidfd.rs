//! Process file descriptors: race-free signalling and reaping of children.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cvt;

/// Opens a pidfd for `pid`; it becomes readable when the process exits.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; no memory is passed.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `MADV_COLLAPSE` (not in libc for every target yet).
const MADV_COLLAPSE: i32 = 25;

/// Asks the kernel to back `len` bytes at `start` in the process behind `pidfd` with huge
/// pages (`process_madvise(MADV_COLLAPSE)`), so that its page tables hold one entry per 2 MiB.
/// Fails for a range with a page missing that userfaultfd would have to fill.
pub fn collapse(pidfd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let iov = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: len as usize,
    };
    // SAFETY: the iovec names memory of the other process (never dereferenced here); it lives
    // for the call, and vlen is 1.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd.as_raw_fd(),
            &iov as *const libc::iovec,
            1usize,
            MADV_COLLAPSE,
            0u32,
        )
    })?;
    Ok(())
}

/// Sends `sig` to the process behind `pidfd`.
pub fn send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: no siginfo is passed (NULL), flags are zero.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }
}

/// Reaps the exited child behind `pidfd` without blocking; `None` if it still runs.
pub fn try_reap(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    poll_exit(pidfd, 0)
}

/// The exit status of the child behind `pidfd` if it has exited, leaving it to be reaped.
pub fn peek_exit(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    poll_exit(pidfd, libc::WNOWAIT)
}

fn poll_exit(pidfd: &OwnedFd, flags: i32) -> io::Result<Option<ExitStatus>> {
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t; P_PIDFD takes the fd as id.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::__WALL | flags,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info`; si_pid is 0 when nothing has exited yet.
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if code == libc::CLD_EXITED {
        ExitStatus::Exited(status)
    } else {
        ExitStatus::Signaled(status)
    }))
}
