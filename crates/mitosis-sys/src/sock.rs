//! Socket options the socket crates do not offer.

use std::io;
use std::os::fd::AsRawFd;

/// Sets `SO_RCVLOWAT`: the socket reads as ready (epoll, poll) only once `bytes` are queued,
/// or at end of stream or error. A reader that knows how long the rest of a message is wakes
/// once for all of it instead of once per segment batch.
pub fn set_recv_low_water(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a live c_int whose size is passed; the fd is borrowed from `socket`,
    // open for the call's duration.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    crate::cvt(ret as libc::c_long).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    #[test]
    fn a_reader_is_not_ready_until_the_low_water_mark_is_queued() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        set_recv_low_water(&reader, 8).unwrap();
        let ready = |r: &TcpStream| {
            let mut fds = [libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one live pollfd, its count passed.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 200) == 1 }
        };
        writer.write_all(b"1234").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!ready(&reader), "ready with 4 of 8 bytes queued");
        writer.write_all(b"5678").unwrap();
        assert!(ready(&reader), "not ready with 8 bytes queued");
        let mut got = [0u8; 8];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"12345678");
        set_recv_low_water(&reader, 0).unwrap();
    }
}
