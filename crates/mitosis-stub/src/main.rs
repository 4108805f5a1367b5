//! `mitosis-stub`: the process that becomes a child.
//!
//! Started by the daemon with the resumer's stdio and a channel on fd 3. It opens the files the
//! child needs and creates the userfaultfd (both must happen inside the child), sends the fd to
//! the daemon, then jumps into the trampoline, which replaces this program's whole address space
//! with the seed's. It never returns; the daemon, tracing it, takes over at the trampoline's end.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use mitosis_fork::restore::protocol::{self, CHANNEL_FD, Go, OpenSpec, Ready, Setup};
use mitosis_frame::{self as frame, FrameError};
use mitosis_sys::fdpass;
use mitosis_sys::uffd::Userfaultfd;
use thiserror::Error;

/// Why the stub could not become a child; the daemon gets it as text in [`Ready::Failed`].
#[derive(Debug, Error)]
enum StubError {
    #[error("closing inherited fds: {0}")]
    CloseInherited(io::Error),
    #[error("reading setup: {0}")]
    Setup(FrameError),
    #[error("moving fd {fd}: {source}")]
    Move { fd: i32, source: io::Error },
    #[error("fd {0} is taken")]
    Taken(i32),
    #[error("entering the container's root {root}: {source}")]
    Root { root: String, source: io::Error },
    #[error("opening {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("creating userfaultfd: {0}")]
    Uffd(io::Error),
    #[error("sending userfaultfd: {0}")]
    SendUffd(io::Error),
    #[error("reading go: {0}")]
    Go(io::Error),
    #[error("no page stream came with go")]
    NoPageStream,
    #[error("placing the page stream at fd {fd}: {source}")]
    PageStream { fd: i32, source: io::Error },
    #[error("cannot map the trampoline at {at:#x}: {source}")]
    Trampoline { at: u64, source: io::Error },
}

fn main() {
    // SAFETY: the daemon placed our end of the channel on CHANNEL_FD before exec; nothing else in this process owns it.
    let mut chan = unsafe { UnixStream::from_raw_fd(CHANNEL_FD) };
    let Err(why) = run(&mut chan);
    // The daemon reads this as the reason the child could not start. `chan` is the channel
    // wherever `run` left it: fd 3 may be one of the seed's files by now.
    let _ = chan.write_all(&frame::encode(&Ready::Failed(why.to_string())));
    std::process::exit(70);
}

/// Prepares the child and jumps into the trampoline; returns only if that fails. `chan` follows
/// the channel when it moves.
fn run(chan: &mut UnixStream) -> Result<Infallible, StubError> {
    // Whatever else the daemon had open without close-on-exec must not reach a child.
    // SAFETY: close_range on numbers above the channel, which this process does not use.
    if unsafe { libc::syscall(libc::SYS_close_range, CHANNEL_FD + 1, u32::MAX, 0) } < 0 {
        return Err(StubError::CloseInherited(io::Error::last_os_error()));
    }
    let setup: Setup = frame::read_blocking(chan).map_err(StubError::Setup)?;
    // Keep our own fds clear of the numbers the seed's files go to. The channel takes exactly
    // `work_fd_base`: a replica keeps it there to receive each child's stdio. Replacing the
    // handle closes fd 3, which a seed's file may take next.
    *chan = UnixStream::from(dup_above(chan.as_fd(), setup.work_fd_base)?);
    if chan.as_raw_fd() != setup.work_fd_base {
        return Err(StubError::Taken(setup.work_fd_base));
    }
    // Files a bundle binds into its container are opened at their host paths first; the
    // rest once inside the container's root. Each keeps its place in the list.
    let open_spec = |spec: &OpenSpec| {
        open(spec, setup.work_fd_base).map_err(|source| StubError::Open {
            path: spec.path.clone(),
            source,
        })
    };
    let mut fds: Vec<Option<i32>> = setup
        .opens
        .iter()
        .map(|spec| spec.host_path.then(|| open_spec(spec)).transpose())
        .collect::<Result<_, _>>()?;
    if let Some(root) = &setup.root {
        enter_root(root, setup.cwd.as_deref()).map_err(|source| StubError::Root {
            root: root.clone(),
            source,
        })?;
    } else if let Some(cwd) = setup.cwd.as_deref().and_then(|d| CString::new(d).ok()) {
        // The seed's directory, if this host has it; else the stub stays in /.
        // SAFETY: chdir reads the NUL-terminated path we own for the call's duration.
        unsafe { libc::chdir(cwd.as_ptr()) };
    }
    for (fd, spec) in fds.iter_mut().zip(&setup.opens) {
        if fd.is_none() {
            *fd = Some(open_spec(spec)?);
        }
    }
    let fds: Vec<i32> = fds.into_iter().flatten().collect();
    let uffd = Userfaultfd::create().map_err(StubError::Uffd)?;
    // Created at the lowest free number; a work fd like the others, so the trampoline closes it.
    let uffd = move_above(uffd.into_raw_fd(), setup.work_fd_base)?;
    fdpass::send(
        chan.as_raw_fd(),
        &frame::encode(&Ready::Opened(fds)),
        &[uffd],
    )
    .map_err(StubError::SendUffd)?;
    let (go, handed): (Go, _) = protocol::recv_with_fds(chan).map_err(StubError::Go)?;
    if let Some(target) = go.pages_fd {
        let pages = handed.first().ok_or(StubError::NoPageStream)?;
        place_at(pages.as_raw_fd(), target)?;
    }
    drop(handed);
    jump(&go)
}

/// Duplicates `fd` onto `target` (close-on-exec), which must be free.
fn place_at(fd: i32, target: i32) -> Result<(), StubError> {
    // SAFETY: F_GETFD only queries the number; an error means it is free.
    if unsafe { libc::fcntl(target, libc::F_GETFD) } >= 0 {
        return Err(StubError::Taken(target));
    }
    // SAFETY: dup3 onto a number just checked to be free; both are plain integers.
    if unsafe { libc::dup3(fd, target, libc::O_CLOEXEC) } < 0 {
        return Err(StubError::PageStream {
            fd: target,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// chroot into `root`, then into `cwd` there (or its top if `cwd` is missing).
fn enter_root(root: &str, cwd: Option<&str>) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let root = c(root)?;
    // SAFETY: chroot and chdir read the NUL-terminated paths we own for the call's duration.
    unsafe {
        if libc::chroot(root.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        let top = c("/")?;
        let dir = cwd.map(c).transpose()?;
        if dir.is_none_or(|d| libc::chdir(d.as_ptr()) < 0) && libc::chdir(top.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens `spec`; a seed's file lands on its own number, a working fd above `base`.
fn open(spec: &OpenSpec, base: i32) -> io::Result<i32> {
    let path = std::ffi::CString::new(spec.path.as_str())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let cloexec = spec.flags & libc::O_CLOEXEC;
    // SAFETY: `path` is a valid NUL-terminated string.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            (spec.flags & !libc::O_CLOEXEC) | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let Some(target) = spec.target_fd else {
        return move_above(fd, base).map_err(io::Error::other);
    };
    if fd != target {
        // SAFETY: dup3 onto a number we chose; both are plain integers.
        if unsafe { libc::dup3(fd, target, cloexec) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is ours and no longer needed.
        unsafe { libc::close(fd) };
    } else if cloexec == 0 {
        // SAFETY: clearing FD_CLOEXEC on our own fd.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
    // SAFETY: seeking our own fd.
    if unsafe { libc::lseek(target, spec.offset as libc::off_t, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

/// A duplicate of `fd` at the lowest free number ≥ `base` (close-on-exec).
fn dup_above(fd: BorrowedFd, base: i32) -> Result<OwnedFd, StubError> {
    // SAFETY: fcntl on an fd the caller holds open.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) };
    if dup < 0 {
        return Err(StubError::Move {
            fd: fd.as_raw_fd(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Moves our own `fd` to the lowest free number ≥ `base` (close-on-exec).
fn move_above(fd: i32, base: i32) -> Result<i32, StubError> {
    // SAFETY: the caller owns `fd` and hands it over; the OwnedFd closes it once duplicated.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(dup_above(fd.as_fd(), base)?.into_raw_fd())
}

/// Maps the trampoline and runs it. Returns only if the trampoline cannot be mapped: it
/// unmaps this program.
fn jump(go: &Go) -> Result<Infallible, StubError> {
    const PAGE: usize = 4096;
    let data_len = go.data.len().div_ceil(PAGE) * PAGE;
    let len = PAGE + data_len;
    let failed = |source: io::Error| StubError::Trampoline { at: go.at, source };
    if go.code.len() > PAGE {
        return Err(failed(io::Error::other("the code is over a page long")));
    }
    // SAFETY: a fresh anonymous mapping at an address the daemon chose to be free here and in the seed; MAP_FIXED_NOREPLACE fails rather than clobber anything.
    let at = unsafe {
        libc::mmap(
            go.at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(failed(io::Error::last_os_error()));
    }
    if at as u64 != go.at {
        // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
        return Err(failed(io::Error::other(format!("mapped at {at:p}"))));
    }
    // SAFETY: the mapping is `len` bytes, writable; code fits the first page and data the rest.
    unsafe {
        std::ptr::copy_nonoverlapping(go.code.as_ptr(), at.cast::<u8>(), go.code.len());
        std::ptr::copy_nonoverlapping(go.data.as_ptr(), at.cast::<u8>().add(PAGE), go.data.len());
    }
    // SAFETY: the first page of our own fresh mapping becomes read-only and executable.
    if unsafe { libc::mprotect(at, PAGE, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    // SAFETY: the first page now holds the trampoline, which follows the C calling convention for its two arguments (records, count) and never returns.
    let trampoline: extern "C" fn(*const u8, u64) -> ! = unsafe { std::mem::transmute(at) };
    // SAFETY: the records live in the mapped data area right after the code page.
    trampoline(unsafe { at.cast::<u8>().add(PAGE) }, go.records)
}
