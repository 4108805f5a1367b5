//! Unix domain sockets seen from outside their process: which socket is connected to which
//! (the kernel's sock_diag netlink interface), and what is queued on one, read without
//! taking it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest};
use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockProtocol, SockType,
};
use thiserror::Error;

use crate::cvt;

/// One unix socket of a network namespace, as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixSocket {
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
    /// The inode of the socket it is connected to.
    pub peer: Option<u32>,
}

/// Every unix socket in the network namespace of `pid`, by inode.
///
/// sock_diag answers for the namespace the netlink socket was made in, so for a process in
/// another namespace (a container) the socket is made on a short-lived thread that joins it.
pub fn unix_sockets(pid: i32) -> io::Result<HashMap<u32, UnixSocket>> {
    let theirs = File::open(format!("/proc/{pid}/ns/net"))?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    let diag = if theirs.metadata()?.ino() == ours.ino() {
        diag_socket()?
    } else {
        std::thread::spawn(move || {
            nix::sched::setns(theirs.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            diag_socket()
        })
        .join()
        .map_err(|_| io::Error::other("the sock_diag thread panicked"))??
    };
    dump(&diag)
}

fn diag_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?)
}

fn dump(diag: &OwnedFd) -> io::Result<HashMap<u32, UnixSocket>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::all(),
        inode: 0,
        show_flags: ShowFlags::PEER,
        cookie: [0xff; 8],
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    // An unconnected netlink socket sends to the kernel.
    socket::send(diag.as_raw_fd(), &buf, MsgFlags::empty())?;

    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = socket::recv(diag.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at < n {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => {
                    let socket = UnixSocket {
                        kind: r.header.kind as i32,
                        peer: r.peer().filter(|&p| p != 0),
                    };
                    out.insert(r.header.inode, socket);
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

/// Why the queue of a socket could not be read.
#[derive(Debug, Error)]
pub enum PeekError {
    #[error("{0} bytes are queued, more than {1}")]
    TooMuch(usize, usize),
    #[error("a queued message carries descriptors")]
    Descriptors,
    #[error("an empty datagram is queued")]
    EmptyDatagram,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The messages queued to be read on `sock` (a unix socket of kind `kind`), oldest first, at
/// most `max` bytes in all, left in place: a stream's bytes come as one message.
///
/// Reads with MSG_PEEK from a peek offset (SO_PEEK_OFF), which moves past each message read;
/// the socket's own offset is put back after, so its process sees no change.
pub fn peek_queue(sock: &OwnedFd, kind: i32, max: usize) -> Result<Vec<Vec<u8>>, PeekError> {
    let fd = sock.as_raw_fd();
    let old = get_peek_offset(fd)?;
    set_peek_offset(fd, 0)?;
    let peeked = peek_all(fd, kind == libc::SOCK_STREAM, max);
    set_peek_offset(fd, old)?;
    peeked
}

fn peek_all(fd: i32, stream: bool, max: usize) -> Result<Vec<Vec<u8>>, PeekError> {
    let mut messages = Vec::new();
    let mut total = 0;
    // One byte more than allowed: a longer message shows up as too much, not as truncated.
    let mut buf = vec![0u8; max + 1];
    loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf[..max + 1 - total])];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let got = match socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), flags) {
            Ok(got) => got,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let mut carries_fds = got.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in got.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                carries_fds = true;
                for fd in fds {
                    // The peek installed these in our process just now; close them.
                    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if carries_fds {
            return Err(PeekError::Descriptors);
        }
        let n = got.bytes;
        if n == 0 {
            // A stream at its end, or a datagram of no bytes, which an offset cannot step over.
            if stream {
                break;
            }
            return Err(PeekError::EmptyDatagram);
        }
        total += n;
        if total > max {
            return Err(PeekError::TooMuch(total, max));
        }
        let data = iov[0][..n].to_vec();
        match messages.last_mut() {
            Some(last) if stream => Vec::extend_from_slice(last, &data),
            _ => messages.push(data),
        }
    }
    Ok(messages)
}

fn get_peek_offset(fd: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are writable and sized for the int SO_PEEK_OFF returns.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(ret as libc::c_long)?;
    Ok(value)
}

fn set_peek_offset(fd: i32, value: i32) -> io::Result<()> {
    // SAFETY: SO_PEEK_OFF reads one int from the pointer, of the length passed.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(ret as libc::c_long)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    /// The inode of the socket `/proc/PID/fd/FD` names.
    fn socket_inode(pid: u32, fd: i32) -> u32 {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        let link = link.to_string_lossy();
        link.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    fn inode(fd: &impl AsRawFd) -> u32 {
        socket_inode(std::process::id(), fd.as_raw_fd())
    }

    #[test]
    fn socketpair_ends_name_each_other() {
        let (a, b) = UnixStream::pair().unwrap();
        let (c, d) = UnixDatagram::pair().unwrap();
        let lone = UnixDatagram::unbound().unwrap();
        let all = unix_sockets(std::process::id() as i32).unwrap();
        let at = |s: &dyn AsRawFd| all[&inode(&s.as_raw_fd())];
        assert_eq!(at(&a).peer, Some(inode(&b)));
        assert_eq!(at(&b).peer, Some(inode(&a)));
        assert_eq!(at(&a).kind, libc::SOCK_STREAM);
        assert_eq!(at(&c).peer, Some(inode(&d)));
        assert_eq!(at(&d).kind, libc::SOCK_DGRAM);
        // An unconnected socket has no peer, if it is listed at all.
        assert_eq!(all.get(&inode(&lone)).and_then(|s| s.peer), None);
    }

    /// A process in a network namespace of its own (a container's) has its sockets listed from
    /// that namespace. Needs root, as every privileged test here.
    #[test]
    fn sockets_of_another_network_namespace_are_found() {
        use std::io::BufRead;
        let script = "import socket, sys\n\
                      a, b = socket.socketpair()\n\
                      print(a.fileno(), b.fileno(), flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "python3", "-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare and python3");
        let mut line = String::new();
        let mut out = io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let pid = child.id() as i32;
        let fds: Vec<i32> = line
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        let ino = |fd: i32| socket_inode(pid as u32, fd);
        let (a, b) = (ino(fds[0]), ino(fds[1]));
        let theirs = unix_sockets(pid);
        let ours = unix_sockets(std::process::id() as i32).unwrap();
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(theirs.unwrap()[&a].peer, Some(b));
        assert!(!ours.contains_key(&a), "listed from the wrong namespace");
    }

    #[test]
    fn peeking_a_stream_leaves_its_bytes_and_offset() {
        use std::io::{Read, Write};
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"hello ").unwrap();
        a.write_all(b"world").unwrap();
        let b = OwnedFd::from(b);
        let kind = libc::SOCK_STREAM;
        assert_eq!(
            peek_queue(&b, kind, 64).unwrap(),
            vec![b"hello world".to_vec()]
        );
        assert!(matches!(
            peek_queue(&b, kind, 5),
            Err(PeekError::TooMuch(..))
        ));
        assert_eq!(get_peek_offset(b.as_raw_fd()).unwrap(), -1);
        let mut b = UnixStream::from(b);
        b.set_nonblocking(true).unwrap();
        let mut all = vec![0; 64];
        let n = b.read(&mut all).unwrap();
        assert_eq!(&all[..n], b"hello world");
        assert!(peek_queue(&OwnedFd::from(b), kind, 64).unwrap().is_empty());
    }

    #[test]
    fn peeking_datagrams_keeps_their_boundaries() {
        let (a, b) = UnixDatagram::pair().unwrap();
        for m in [&b"a"[..], b"bb", b"ccc"] {
            a.send(m).unwrap();
        }
        let b = OwnedFd::from(b);
        let kind = libc::SOCK_DGRAM;
        let want: Vec<Vec<u8>> = vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()];
        assert_eq!(peek_queue(&b, kind, 64).unwrap(), want);
        // A peek offset the process set itself survives.
        set_peek_offset(b.as_raw_fd(), 1).unwrap();
        assert_eq!(peek_queue(&b, kind, 64).unwrap(), want);
        assert_eq!(get_peek_offset(b.as_raw_fd()).unwrap(), 1);
        set_peek_offset(b.as_raw_fd(), -1).unwrap();
        let b = UnixDatagram::from(b);
        let mut buf = [0; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), 1);
        assert_eq!(buf[0], b'a');
    }

    #[test]
    fn a_queued_descriptor_is_refused_and_not_leaked() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let name = "mitosis-peek-test";
        let memfd =
            nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let fds = [memfd.as_raw_fd()];
        let cmsg = [socket::ControlMessage::ScmRights(&fds)];
        let iov = [io::IoSlice::new(b"x")];
        socket::sendmsg::<()>(a.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        let b = OwnedFd::from(b);
        assert!(matches!(
            peek_queue(&b, libc::SOCK_DGRAM, 64),
            Err(PeekError::Descriptors)
        ));
        // Only our own descriptor of the memfd is open: the peeked copy was closed.
        let open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(name))
            })
            .count();
        assert_eq!(open, 1);
    }
}
