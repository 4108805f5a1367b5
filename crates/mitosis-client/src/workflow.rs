//! Forking from inside a function: [`fork_prepare`] returns twice, like `fork()`, once in the
//! process that called it (with the seed's handle) and once in every child resumed from it
//! (with the child's index and the argument its resumer gave). The design is in
//! docs/workflows.md; in short:
//!
//! - the caller asks its host's daemon to prepare *the caller itself* (`PrepareCaller`) and
//!   blocks reading the answer: the seed is captured inside that read;
//! - the parent's read then returns `Prepared`; a child's read is restarted on a descriptor
//!   that no longer exists (a connection to the daemon reaches outside the seed, so children
//!   never get it): it fails with `EBADF`, and the child's pid is not the parent's;
//! - the child then reads its role from its stdin: one header line
//!   `MITOSIS-CHILD 1 INDEX LEN SOCKLEN\n`, `LEN` bytes of argument and `SOCKLEN` bytes of the
//!   control socket of the daemon that made it (its host's: where its own `fork_prepare` and
//!   resumes go), written first by the resumer ([`child_header`], [`resume_child`]); the rest
//!   of stdin is the function's own input.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::thread;

use mitosis_sys::fdpass;
use mitosis_transport::FrameError;
use mitosis_transport::control::{Event, Request};
use mitosis_transport::frame;
use thiserror::Error;

use crate::{Client, DaemonError};

/// What starts a child's stdin: the role header's first word and version.
pub const HEADER_MAGIC: &str = "MITOSIS-CHILD 1";
/// The longest header line (magic, index, length, newline).
const MAX_HEADER_LINE: usize = 64;
/// The largest argument a child reads: larger state belongs in memory, forked.
pub const MAX_ARG: usize = 64 << 20;
/// The daemon's connection is moved to this descriptor or above, clear of the numbers a child
/// is handed (0, 1, 2 and a listening socket at 3), so a child's restarted read finds nothing.
const CONTROL_FD_MIN: i32 = 10;

/// The platform's channel (docs/workflows.md, "On the platform"): a workflow stage's process
/// gets, as fd 3, a unix stream socket to the platform with this greeting waiting on it. Its
/// `fork_prepare` sends [`PLATFORM_PREPARE`] there instead of asking a daemon (a function
/// never holds a daemon's control socket), and the platform, which holds the daemons'
/// connections, prepares the process where it runs and answers one line:
/// `PREPARED TOKEN` or `ERROR KIND MESSAGE` (`KIND` as [`crate::ErrorKind`]'s names).
pub const PLATFORM_GREETING: &[u8] = b"MITOSIS-PLATFORM 1\n";
/// The descriptor the platform's channel is at when a stage's process starts.
pub const PLATFORM_FD: i32 = 3;
/// What a process sends on the platform's channel to be prepared where it is.
pub const PLATFORM_PREPARE: &[u8] = b"PREPARE\n";
/// The longest line either side sends on the platform's channel.
pub const PLATFORM_MAX_LINE: usize = 1024;

/// Where `fork_prepare` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forked {
    /// In the caller: the seed's handle (a secret: it opens the caller's memory).
    Parent { handle: String },
    /// In a child: its index and argument, from its resumer.
    Child {
        index: u64,
        arg: Vec<u8>,
        /// The control socket of the daemon that made this child, if its resumer said.
        socket: Option<PathBuf>,
    },
}

/// Why `fork_prepare` or `resume_child` failed.
#[derive(Debug, Error)]
pub enum ForkError {
    /// No daemon at the socket: the program does not run on a mitosis host (or may not reach
    /// its daemon). The caller runs on, unprepared.
    #[error("not on a mitosis host: cannot reach mitosisd at {}: {err}", path.display())]
    NoHost { path: PathBuf, err: io::Error },
    /// The daemon refused or failed the prepare or the resume.
    #[error("mitosisd: {0}")]
    Daemon(DaemonError),
    /// Talking to the daemon failed.
    #[error("mitosisd connection: {0}")]
    Connection(String),
    /// A child found no valid role header on its stdin (resumed without one).
    #[error("resumed child: no role header on stdin: {0}")]
    Header(String),
    /// Running a child's stdio failed.
    #[error("child stdio: {0}")]
    Stdio(io::Error),
    /// The platform refused or failed the prepare (`kind` as the daemon's error kinds).
    #[error("the platform: {message} ({kind})")]
    Platform { kind: String, message: String },
}

impl From<crate::Error> for ForkError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Daemon(d) => ForkError::Daemon(d),
            crate::Error::Connect { path, err } => ForkError::NoHost { path, err },
            other => ForkError::Connection(other.to_string()),
        }
    }
}

/// The control socket of this host's daemon: `MITOSIS_SOCKET`, else the default path.
pub fn default_socket() -> PathBuf {
    std::env::var_os("MITOSIS_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/mitosis/mitosisd.sock"))
}

/// Prepares the calling process as a seed through the daemon at `socket`; returns in the
/// caller (`Parent`) and again in every child resumed from it (`Child`). The caller runs on
/// once prepared; its later writes never reach its children.
pub fn fork_prepare(socket: &Path) -> Result<Forked, ForkError> {
    fork_prepare_profiled(socket, None)
}

/// As [`fork_prepare`], a seed of the program named `profile` if one is given: its first
/// children's hosts get the pages that earlier seeds of that profile had their children touch.
pub fn fork_prepare_profiled(socket: &Path, profile: Option<&str>) -> Result<Forked, ForkError> {
    let before = std::process::id();
    let stream = UnixStream::connect(socket).map_err(|err| ForkError::NoHost {
        path: socket.to_owned(),
        err,
    })?;
    let moved = fdpass::dup_at_least(&stream, CONTROL_FD_MIN).map_err(ForkError::Stdio)?;
    drop(stream);
    let mut stream = UnixStream::from(moved);
    let bytes = frame::encode(&match profile {
        Some(name) => Request::PrepareProfiled {
            pid: None,
            profile: name.to_owned(),
        },
        None => Request::PrepareCaller,
    });
    stream
        .write_all(&bytes)
        .map_err(|e| ForkError::Connection(e.to_string()))?;
    // The prepare point: the daemon captures this process while it waits here.
    let answer: Result<Event, FrameError> = frame::read_blocking(&mut stream);
    if std::process::id() != before || is_gone(&answer) {
        // A child: the number is free (or someone else's), never close it.
        let _ = stream.into_raw_fd();
        let role = read_role(&mut stdin_file()?)?;
        return Ok(Forked::Child {
            index: role.index,
            arg: role.arg,
            socket: role.socket,
        });
    }
    match answer {
        Ok(Event::Prepared { handle, .. }) => Ok(Forked::Parent { handle }),
        Ok(Event::Error(e)) => Err(ForkError::Daemon(e)),
        Ok(other) => Err(ForkError::Connection(format!(
            "unexpected answer: {other:?}"
        ))),
        Err(e) => Err(ForkError::Connection(e.to_string())),
    }
}

/// The platform's channel this process took (moved to [`CONTROL_FD_MIN`] or above), if any.
static CHANNEL: Mutex<Option<RawFd>> = Mutex::new(None);

/// Prepares the calling process where it runs: through the platform's channel when it runs
/// as a stage of a mitosis-platform workflow ([`platform_channel`]), else through its host's
/// daemon ([`default_socket`]). Returns twice, as [`fork_prepare`] does.
pub fn fork_prepare_here() -> Result<Forked, ForkError> {
    match platform_channel() {
        Some(fd) => {
            // SAFETY: the channel's descriptor is this module's (taken by `platform_channel`,
            // never closed while recorded), open for the borrow.
            let channel = unsafe { BorrowedFd::borrow_raw(fd) };
            let forked = fork_prepare_through(channel);
            if matches!(forked, Ok(Forked::Child { .. })) {
                // The descriptor was the parent's: a child has none.
                *CHANNEL.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            forked
        }
        None => fork_prepare(&default_socket()),
    }
}

/// The platform's channel, if this process was given one: fd [`PLATFORM_FD`], a connected
/// unix stream socket with [`PLATFORM_GREETING`] waiting on it. Takes it the first time (moves
/// it to fd 10 or above, where a child's restarted read finds nothing, and reads the greeting);
/// then answers the same descriptor.
pub fn platform_channel() -> Option<RawFd> {
    let mut taken = CHANNEL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(fd) = *taken {
        return Some(fd);
    }
    // Open and a socket? (Asked of /proc: no descriptor is touched that is not there.)
    let target = std::fs::read_link(format!("/proc/self/fd/{PLATFORM_FD}")).ok()?;
    if !target.to_string_lossy().starts_with("socket:") {
        return None;
    }
    // SAFETY: fd 3 is open (just seen in /proc) and only borrowed to duplicate it.
    let dup = unsafe { BorrowedFd::borrow_raw(PLATFORM_FD) }
        .try_clone_to_owned()
        .ok()?;
    let probe = UnixStream::from(dup);
    // A unix socket (not another family), connected, the greeting waiting.
    probe.local_addr().ok()?;
    let mut greeting = [0u8; PLATFORM_GREETING.len()];
    let peeked = fdpass::peek_now(probe.as_raw_fd(), &mut greeting).ok()?;
    if peeked != greeting.len() || greeting != PLATFORM_GREETING {
        return None;
    }
    let moved = fdpass::dup_at_least(&probe, CONTROL_FD_MIN).ok()?;
    drop(probe);
    // SAFETY: fd 3 is the platform's channel (checked above), which this process takes over
    // (a copy lives at `moved`); nothing else of this process owns that number.
    drop(unsafe { OwnedFd::from_raw_fd(PLATFORM_FD) });
    let mut channel = File::from(moved);
    channel.read_exact(&mut greeting).ok()?;
    let fd = channel.into_raw_fd();
    *taken = Some(fd);
    Some(fd)
}

/// [`fork_prepare`] through the platform's `channel`: sends [`PLATFORM_PREPARE`] and blocks
/// reading the answer line; the platform prepares this process meanwhile.
pub fn fork_prepare_through(channel: BorrowedFd<'_>) -> Result<Forked, ForkError> {
    let before = std::process::id();
    let owned = channel
        .try_clone_to_owned()
        .map_err(|e| ForkError::Connection(format!("the platform's channel: {e}")))?;
    let raw = channel.as_raw_fd();
    // Reads and writes go to `raw` itself: a child's restarted read must find that number
    // gone, not a duplicate of it.
    drop(owned);
    // SAFETY: `raw` is `channel`, open for this call; the File is never dropped (its number
    // is given back with `into_raw_fd` on every path).
    let mut file = unsafe { File::from_raw_fd(raw) };
    let result = exchange(&mut file, before);
    let _ = file.into_raw_fd();
    result
}

fn exchange(file: &mut File, before: u32) -> Result<Forked, ForkError> {
    file.write_all(PLATFORM_PREPARE)
        .map_err(|e| ForkError::Connection(format!("the platform's channel: {e}")))?;
    // The prepare point: the platform has this process captured while it waits here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match file.read(&mut byte) {
            Err(e) if e.raw_os_error() == Some(EBADF) || std::process::id() != before => {
                // A child: the channel was its parent's.
                let role = read_role(&mut stdin_file()?)?;
                return Ok(Forked::Child {
                    index: role.index,
                    arg: role.arg,
                    socket: role.socket,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ForkError::Connection(format!(
                    "the platform's channel: {e}"
                )));
            }
            Ok(0) => {
                return Err(ForkError::Connection(
                    "the platform closed its channel".into(),
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= PLATFORM_MAX_LINE => {
                return Err(ForkError::Connection(
                    "the platform's answer is too long".into(),
                ));
            }
            Ok(_) => line.push(byte[0]),
        }
    }
    let line = String::from_utf8_lossy(&line);
    let mut words = line.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("PREPARED"), Some(token), None) => Ok(Forked::Parent {
            handle: token.to_owned(),
        }),
        (Some("ERROR"), Some(kind), Some(message)) => Err(ForkError::Platform {
            kind: kind.to_owned(),
            message: message.to_owned(),
        }),
        _ => Err(ForkError::Connection(format!(
            "unexpected answer from the platform: {line:?}"
        ))),
    }
}

/// The read failed because its descriptor is gone: only a child's can be.
fn is_gone(answer: &Result<Event, FrameError>) -> bool {
    matches!(answer, Err(FrameError::Io(e)) if e.raw_os_error() == Some(EBADF))
}

/// EBADF on Linux, every architecture (this crate does not link libc itself).
const EBADF: i32 = 9;

/// Fd 0 as a file of its own (a duplicate: no buffer of ours holds bytes past the header).
fn stdin_file() -> Result<File, ForkError> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| ForkError::Header(format!("no stdin: {e}")))?;
    Ok(File::from(fd))
}

/// The header a resumer writes first on a child's stdin.
pub fn child_header(index: u64, arg: &[u8], socket: Option<&Path>) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let socket = socket.map_or(&[][..], |s| s.as_os_str().as_bytes());
    let mut h = format!("{HEADER_MAGIC} {index} {} {}\n", arg.len(), socket.len()).into_bytes();
    h.extend_from_slice(arg);
    h.extend_from_slice(socket);
    h
}

/// What a child reads from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub index: u64,
    pub arg: Vec<u8>,
    pub socket: Option<PathBuf>,
}

/// Reads a role header and its argument from `input`, byte by byte up to the newline so that
/// nothing after the argument is consumed.
pub fn read_role(input: &mut impl Read) -> Result<Role, ForkError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = input
            .read(&mut byte)
            .map_err(|e| ForkError::Header(e.to_string()))?;
        if n == 0 {
            return Err(ForkError::Header("stdin ended before the header".into()));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_HEADER_LINE {
            return Err(ForkError::Header("header line too long".into()));
        }
    }
    let line = String::from_utf8(line).map_err(|_| ForkError::Header("not text".into()))?;
    let rest = line
        .strip_prefix(HEADER_MAGIC)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| ForkError::Header(format!("{line:?} does not start {HEADER_MAGIC:?}")))?;
    let mut words = rest.split(' ');
    let (Some(index), Some(len), Some(sock_len), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(ForkError::Header(format!(
            "{line:?}: expected INDEX LEN SOCKLEN"
        )));
    };
    let sock_len: usize = sock_len
        .parse()
        .ok()
        .filter(|&n| n <= 4096)
        .ok_or_else(|| ForkError::Header(format!("bad socket length {sock_len:?}")))?;
    let index: u64 = index
        .parse()
        .map_err(|_| ForkError::Header(format!("bad index {index:?}")))?;
    let len: usize = len
        .parse()
        .map_err(|_| ForkError::Header(format!("bad length {len:?}")))?;
    if len > MAX_ARG {
        return Err(ForkError::Header(format!(
            "argument of {len} bytes, over {MAX_ARG}"
        )));
    }
    let mut arg = vec![0u8; len];
    input
        .read_exact(&mut arg)
        .map_err(|e| ForkError::Header(format!("reading the argument: {e}")))?;
    let mut socket = vec![0u8; sock_len];
    input
        .read_exact(&mut socket)
        .map_err(|e| ForkError::Header(format!("reading the socket path: {e}")))?;
    let socket = (!socket.is_empty()).then(|| {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(socket))
    });
    Ok(Role { index, arg, socket })
}

/// What a child did, as a subprocess API reports it.
#[derive(Debug, Clone)]
pub struct ChildOutput {
    /// Shell-style: the exit code, or 128 + N if killed by signal N.
    pub status: i32,
    /// Why the daemon killed it, if it did.
    pub reason: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Starts child `index` of the seed behind `handle` through the daemon at `socket` (its host
/// is where the child runs), with `arg` as its argument and `input` after it on its stdin;
/// waits for it to exit.
pub fn resume_child(
    socket: &Path,
    handle: &str,
    index: u64,
    arg: &[u8],
    input: &[u8],
) -> Result<ChildOutput, ForkError> {
    // Socket pairs stand in for pipes (std's pipe is newer than this workspace's MSRV).
    let (stdin_r, mut stdin_w) = UnixStream::pair().map_err(ForkError::Stdio)?;
    let (mut out_r, out_w) = UnixStream::pair().map_err(ForkError::Stdio)?;
    let (mut err_r, err_w) = UnixStream::pair().map_err(ForkError::Stdio)?;
    let running = Client::connect(socket)?.resume(
        handle,
        stdin_r.as_fd(),
        out_w.as_fd(),
        err_w.as_fd(),
        None,
    )?;
    drop((stdin_r, out_w, err_w));
    let mut feed = child_header(index, arg, Some(socket));
    feed.extend_from_slice(input);
    // A child that exits without reading all of it closes the pipe: that is its business.
    let writer = thread::spawn(move || {
        let _ = stdin_w.write_all(&feed);
    });
    let errs = thread::spawn(move || {
        let mut v = Vec::new();
        err_r.read_to_end(&mut v).map(|_| v)
    });
    let mut stdout = Vec::new();
    out_r.read_to_end(&mut stdout).map_err(ForkError::Stdio)?;
    let stderr = errs
        .join()
        .map_err(|_| ForkError::Stdio(io::Error::other("stderr reader panicked")))?
        .map_err(ForkError::Stdio)?;
    let _ = writer.join();
    let exited = running.wait()?;
    Ok(ChildOutput {
        status: exited.status,
        reason: exited.reason,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_header_reads_back_and_leaves_the_rest() {
        let mut input = child_header(7, b"a\nb c", Some(Path::new("/run/m.sock")));
        input.extend_from_slice(b"the function's own input");
        let mut cursor = io::Cursor::new(input);
        let role = read_role(&mut cursor).unwrap();
        assert_eq!((role.index, &role.arg[..]), (7, &b"a\nb c"[..]));
        assert_eq!(role.socket.as_deref(), Some(Path::new("/run/m.sock")));
        let mut rest = String::new();
        cursor.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "the function's own input");
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [
            &b""[..],
            b"hello\n",
            b"MITOSIS-CHILD 2 0 0 0\n",
            b"MITOSIS-CHILD 1 x 0 0\n",
            b"MITOSIS-CHILD 1 0 99999999999 0\n",
            b"MITOSIS-CHILD 1 0 5 0\nab",
            b"MITOSIS-CHILD 1 0 0 0 extra\n",
            b"MITOSIS-CHILD 1 0 0\n",
        ] {
            let r = read_role(&mut io::Cursor::new(bad.to_vec()));
            assert!(matches!(r, Err(ForkError::Header(_))), "{bad:?}: {r:?}");
        }
    }

    /// The platform's side of one exchange, on a thread: what it read, and what it answered.
    fn platform(answer: &'static [u8]) -> (UnixStream, thread::JoinHandle<Vec<u8>>) {
        let (theirs, mut ours) = UnixStream::pair().unwrap();
        let served = thread::spawn(move || {
            let mut asked = vec![0u8; PLATFORM_PREPARE.len()];
            ours.read_exact(&mut asked).unwrap();
            ours.write_all(answer).unwrap();
            asked
        });
        (theirs, served)
    }

    #[test]
    fn through_the_platform_the_parent_gets_its_token_or_the_refusal() {
        let (channel, served) = platform(b"PREPARED load/0\n");
        let forked = fork_prepare_through(channel.as_fd()).unwrap();
        assert_eq!(served.join().unwrap(), PLATFORM_PREPARE);
        assert_eq!(
            forked,
            Forked::Parent {
                handle: "load/0".into()
            }
        );
        let (channel, _served) = platform(b"ERROR Unsupported multi-hop is unavailable\n");
        match fork_prepare_through(channel.as_fd()) {
            Err(ForkError::Platform { kind, message }) => {
                assert_eq!(kind, "Unsupported");
                assert_eq!(message, "multi-hop is unavailable");
            }
            other => panic!("{other:?}"),
        }
        let (channel, _served) = platform(b"nonsense\n");
        assert!(matches!(
            fork_prepare_through(channel.as_fd()),
            Err(ForkError::Connection(_))
        ));
    }

    #[test]
    fn outside_a_mitosis_host_prepare_says_so() {
        let r = fork_prepare(Path::new("/nonexistent/mitosisd.sock"));
        assert!(matches!(r, Err(ForkError::NoHost { .. })), "{r:?}");
    }
}
