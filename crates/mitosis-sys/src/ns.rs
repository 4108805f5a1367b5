//! Starting a program in new namespaces, and the little network set-up a new one needs.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;

use crate::cvt;

/// Starts `exe` with `argv` in the new namespaces `flags` (CLONE_NEW*), with `fds[i]` as its
/// descriptor `i` and nothing else open. Returns its pid (a child of the caller, reaped by it).
///
/// `clone` rather than `unshare` in a `pre_exec` hook: a new pid namespace only takes its
/// first process, and the program must be that process (its init).
pub fn spawn_in_namespaces(
    flags: i32,
    exe: &CStr,
    argv: &[CString],
    fds: &[RawFd],
) -> io::Result<i32> {
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    let clone_flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    let z = 0usize;
    // A fork-like clone (no CLONE_VM, no new stack): the child gets a copy of this address
    // space and, until execve, only makes async-signal-safe calls on memory prepared above.
    // SAFETY: as above: no allocation, no locks in the child.
    let pid = unsafe { libc::syscall(libc::SYS_clone, clone_flags, z, z, z, z) };
    if pid == 0 {
        child_exec(exe.as_ptr(), ptrs.as_ptr(), env.as_ptr(), fds);
    }
    cvt(pid).map(|p| p as i32)
}

/// The child side of [`spawn_in_namespaces`], only ever called in its freshly cloned child:
/// put `fds` at 0.., exec, or exit 127.
fn child_exec(
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    env: *const *const libc::c_char,
    fds: &[RawFd],
) -> ! {
    // SAFETY: we are the clone's child; async-signal-safe calls on what the parent prepared.
    unsafe {
        // First out of the way (a source may sit on a target number), then into place.
        let mut moved = [0 as RawFd; 8];
        for (i, &fd) in fds.iter().enumerate().take(moved.len()) {
            moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
            if moved[i] < 0 {
                libc::_exit(127);
            }
        }
        for (i, &fd) in moved.iter().enumerate().take(fds.len()) {
            if libc::dup2(fd, i as RawFd) < 0 {
                libc::_exit(127);
            }
        }
        libc::close_range(fds.len() as u32, u32::MAX, 0);
        libc::execve(exe, argv, env);
        libc::_exit(127)
    }
}

/// Brings the loopback interface of the caller's network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let kind = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC;
    // SAFETY: a plain socket(2); the result is checked and closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, kind, 0) };
    let sock = cvt(sock as libc::c_long)? as RawFd;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq we own.
    let result = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing the socket made above, once.
    unsafe { libc::close(sock) };
    result
}
