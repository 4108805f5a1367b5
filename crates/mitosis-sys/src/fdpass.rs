//! Passing file descriptors over unix sockets (SCM_RIGHTS).

use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 8;

/// Room for one SCM_RIGHTS message of [`MAX_FDS`] descriptors (`CMSG_SPACE(8 * 4)` is 48 on
/// 64-bit Linux); u64 words keep it aligned for `cmsghdr`.
const CONTROL_WORDS: usize = 6;

/// Sends `data` with `fds` attached in one message.
pub fn send(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}

/// Reads what waits on socket `sock` into `buf` without taking it and without waiting
/// (`MSG_PEEK | MSG_DONTWAIT`): `WouldBlock` if nothing does.
pub fn peek_now(sock: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::sys::socket::recv(sock, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)
}

/// Receives one message into `buf`, returning its length and the descriptors it carried.
///
/// Every descriptor the kernel installed is owned (and so closed) whatever happens: a message
/// with more than [`MAX_FDS`] descriptors is truncated by the kernel (the rest are never
/// installed) and is an error here, after the ones that were installed are taken and closed.
pub fn recv(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<libc::c_int>()) as u32) } as usize;
    let mut control = [0u64; CONTROL_WORDS];
    debug_assert!(space <= size_of::<[u64; CONTROL_WORDS]>());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg points at `iov` (which covers `buf`) and at `control` (`space` bytes), all
    // alive and exclusively ours for the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let fds = take_fds(&msg);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a message carried more than {MAX_FDS} descriptors (or other control data): refused, {} closed",
                fds.len()
            ),
        ));
    }
    Ok((n as usize, fds))
}

/// Takes ownership of every descriptor in `msg`'s control data, as the kernel left it
/// (`msg_controllen` is what it filled, truncated messages included).
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: CMSG_LEN only computes a size.
    let header = unsafe { libc::CMSG_LEN(0) } as usize;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen
    // and return null past the last header.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies in the (aligned) buffer.
        let hdr = unsafe { &*cmsg };
        let len = hdr.cmsg_len;
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS && len >= header
        {
            // The data may not run past the bytes the kernel filled.
            let end = msg.msg_controllen;
            // SAFETY: CMSG_DATA points just past this header, inside the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            let offset = data as usize - msg.msg_control as usize;
            let count = (len - header).min(end.saturating_sub(offset)) / size_of::<libc::c_int>();
            for i in 0..count {
                // SAFETY: `i` < count keeps the read inside the filled control data; the
                // buffer is only 4-aligned there, hence read_unaligned.
                let fd = unsafe { data.cast::<libc::c_int>().add(i).read_unaligned() };
                // SAFETY: the kernel installed this descriptor in our table for this message;
                // nothing else knows of it, so it is ours to own and close.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    fds
}

/// A close-on-exec duplicate of `fd` numbered `min` or higher (then close the original): a
/// descriptor kept clear of the low numbers others are handed at (stdio, fd 3).
pub fn dup_at_least(fd: &impl AsRawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd` and returns a new descriptor, which we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Raw fd of anything that has one; a helper to keep call sites short.
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn descriptors_come_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        send(a.as_raw_fd(), b"hi", &[null.as_raw_fd(); 3]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hi"[..], 3));
        send(a.as_raw_fd(), b"x", &[null.as_raw_fd(); MAX_FDS]).unwrap();
        assert_eq!(recv(b.as_raw_fd(), &mut buf).unwrap().1.len(), MAX_FDS);
        send(a.as_raw_fd(), b"y", &[]).unwrap();
        assert!(recv(b.as_raw_fd(), &mut buf).unwrap().1.is_empty());
    }

    #[test]
    fn overfull_messages_are_refused_and_leak_nothing() {
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut buf = [0u8; 16];
        // Other tests of this binary open and close descriptors at the same time, so the
        // count is compared over many messages: 100 leaks of 8 would show.
        let before = open_fds();
        for _ in 0..100 {
            send(a.as_raw_fd(), b"z", &[null.as_raw_fd(); 12]).unwrap();
            let err = recv(b.as_raw_fd(), &mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
        let after = open_fds();
        assert!(
            after < before + 8,
            "{before} descriptors before, {after} after"
        );
    }
}
