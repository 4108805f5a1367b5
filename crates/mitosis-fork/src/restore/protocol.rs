//! Messages between the daemon and `mitosis-stub` over their socketpair (fd 3 in the stub).
//!
//! Daemon -> stub: [`Setup`]; stub -> daemon: [`Ready`] with the new userfaultfd attached;
//! daemon -> stub: [`Go`]; the stub then jumps into the trampoline and never answers again.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use mitosis_frame as frame;
use mitosis_sys::fdpass;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The descriptor number the stub finds its channel on.
pub const CHANNEL_FD: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Every descriptor the stub itself keeps is moved to this number or above, clear of the
    /// seed's descriptor numbers; the trampoline closes them all at the end. The channel is
    /// at exactly this number.
    pub work_fd_base: i32,
    /// A container's rootfs: the stub chroots into it before opening anything, so the seed's
    /// paths resolve against the same files the seed saw.
    pub root: Option<String>,
    /// The working directory to take (inside `root` when there is one).
    pub cwd: Option<String>,
    pub opens: Vec<OpenSpec>,
}

/// A file the child needs: a mapping's file, the executable, or one of the seed's open files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSpec {
    pub path: String,
    /// `path` is the host's (a file a bundle binds into its container): opened before the
    /// stub enters the container's root.
    pub host_path: bool,
    pub flags: i32,
    /// Install at this number (a seed's open file); `None` for a working fd.
    pub target_fd: Option<i32>,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ready {
    /// The fd number of each open, in order.
    Opened(Vec<i32>),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Go {
    /// Where to map the trampoline: code page first, then `data`.
    pub at: u64,
    pub code: Vec<u8>,
    /// Records first, then the structures they point to.
    pub data: Vec<u8>,
    pub records: u64,
    /// The descriptor that comes with this message (a socket streaming the bootstrap pages)
    /// goes to this number, where the records read it.
    pub pages_fd: Option<i32>,
}

/// Sends `msg` as one frame with `fds` attached to its first byte.
pub fn send_with_fds<T: Serialize>(
    chan: &mut UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> io::Result<()> {
    let bytes = frame::encode(msg);
    let sent = fdpass::send(chan.as_raw_fd(), &bytes, fds)?;
    chan.write_all(&bytes[sent..])
}

/// Reads one frame that may carry descriptors.
pub fn recv_with_fds<T: DeserializeOwned>(chan: &mut UnixStream) -> io::Result<(T, Vec<OwnedFd>)> {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(msg) = frame::try_decode(&buf).map_err(io::Error::other)? {
            return Ok((msg, fds));
        }
        let (n, mut got) = fdpass::recv(chan.as_raw_fd(), &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other end closed the channel",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        fds.append(&mut got);
    }
}
