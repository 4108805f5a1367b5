//! Pipes for a child's stdio, and reading lines from one with a deadline (poll, no thread).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// A pipe: `(read end, write end)`, both close-on-exec (the benchmark spawns processes while
/// other threads hold pipes, which must not leak into them).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The lines arriving on the read end of a pipe.
pub struct PipeLines {
    pipe: File,
    buf: Vec<u8>,
}

impl PipeLines {
    pub fn new(read_end: OwnedFd) -> Self {
        Self {
            pipe: File::from(read_end),
            buf: Vec::new(),
        }
    }

    /// The next line without its newline (what is left at EOF counts as one); `None` at EOF.
    /// Fails with `TimedOut` if nothing completes a line by `deadline`.
    pub fn next(&mut self, deadline: Instant) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.pipe.as_fd(), PollFlags::POLLIN)];
            let ready = match poll(&mut fds, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if ready == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no line in time"));
            }
            let mut chunk = [0u8; 4096];
            match self.pipe.read(&mut chunk)? {
                0 if self.buf.is_empty() => return Ok(None),
                0 => {
                    let rest = std::mem::take(&mut self.buf);
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// What is in a pipe now, without waiting for more (its writers may still hold it open).
pub fn read_available(read_end: OwnedFd) -> String {
    let mut bytes = Vec::new();
    let nonblocking =
        nix::fcntl::fcntl(&read_end, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    if nonblocking.is_ok() {
        // Stops at EOF, or with WouldBlock when the pipe is empty.
        let _ = File::from(read_end).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn lines_eof_and_timeout() {
        let (r, w) = pipe().unwrap();
        let mut w = File::from(w);
        let mut lines = PipeLines::new(r);
        w.write_all(b"one\ntwo\nthr").unwrap();
        let soon = || Instant::now() + Duration::from_millis(50);
        assert_eq!(lines.next(soon()).unwrap().as_deref(), Some("one"));
        assert_eq!(lines.next(soon()).unwrap().as_deref(), Some("two"));
        let err = lines.next(soon()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(w);
        assert_eq!(lines.next(soon()).unwrap().as_deref(), Some("thr"));
        assert_eq!(lines.next(soon()).unwrap(), None);

        let (r, w) = pipe().unwrap();
        File::from(w.try_clone().unwrap())
            .write_all(b"oops\n")
            .unwrap();
        // A writer still holds it open: what is there comes back at once.
        assert_eq!(read_available(r), "oops\n");
        drop(w);
    }
}
