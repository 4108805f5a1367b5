//! userfaultfd: a file descriptor that receives another address space's page faults.
//!
//! Hand-written ioctls over libc (as cloud-hypervisor does) instead of a bindgen-based crate.
//! The fd is created inside the process whose memory it serves and then passed to the daemon;
//! every ioctl acts on the creator's address space, whichever process issues it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use crate::cvt;

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// Deliver fork events with a new uffd for the child's copy of the address space.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// Deliver mremap events so moved ranges keep their source.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Deliver madvise(DONTNEED/REMOVE) events: those pages become zero, not the seed's.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Deliver munmap events.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// The kernel's `struct uffd_msg`: an event byte, padding, and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawMsg {
    event: u8,
    _reserved: [u8; 7],
    arg: [u64; 3],
}

/// One message read from a userfaultfd.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page at `addr` (not page aligned).
    PageFault { addr: u64 },
    /// The address space was forked; `uffd` serves the new copy.
    Fork { uffd: Userfaultfd },
    /// `[from, from+len)` moved to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `[start, end)` was discarded (madvise) and now reads as zero.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
}

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl PartialEq for Userfaultfd {
    fn eq(&self, other: &Self) -> bool {
        self.fd.as_raw_fd() == other.fd.as_raw_fd()
    }
}
impl Eq for Userfaultfd {}

/// Result of a copy or zero-fill: the page was placed, or something else placed it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Done,
    AlreadyPresent,
}

/// What [`Userfaultfd::copy`] placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Every page of the range is in place; `present` of them were there already and were
    /// left as they were.
    All { present: u64 },
    /// The process's layout was changing (a fork, mremap, munmap or madvise whose event is not
    /// read yet): the first `placed` bytes are in, the rest must be tried again.
    LayoutChanging { placed: u64 },
}

/// What one UFFDIO_COPY call did, read from its return value, its `copy` field and errno.
#[derive(Debug, PartialEq, Eq)]
enum CopyStep {
    /// Everything asked for is in.
    Done,
    /// This many bytes went in, then the kernel stopped (a present page or a layout change
    /// after them): go on after them.
    Partial(u64),
    /// The first page is there already.
    Present,
    /// Nothing went in: the layout is changing.
    Changing,
    Failed(i32),
}

fn copy_step(ret: libc::c_int, copied: i64, errno: i32) -> CopyStep {
    if ret == 0 {
        return CopyStep::Done;
    }
    if copied > 0 {
        return CopyStep::Partial(copied as u64);
    }
    match errno {
        libc::EEXIST => CopyStep::Present,
        libc::EAGAIN => CopyStep::Changing,
        e => CopyStep::Failed(e),
    }
}

impl Userfaultfd {
    /// Creates a userfaultfd for the calling process's address space (non-blocking, cloexec).
    pub fn create() -> io::Result<Self> {
        // SAFETY: userfaultfd takes only flags.
        let fd = cvt(unsafe {
            libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK)
        })?;
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Userfaultfd { fd })
    }

    /// Wraps a userfaultfd received from another process.
    pub fn from_owned(fd: OwnedFd) -> Self {
        Userfaultfd { fd }
    }

    /// Negotiates the API with `features`; must be the first ioctl, done once.
    pub fn handshake(&self, features: u64) -> io::Result<()> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid uffdio_api the kernel reads and writes.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API, &mut api) } as libc::c_long)?;
        Ok(())
    }

    /// Routes missing-page faults in `[start, start+len)` to this fd.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: `reg` is a valid uffdio_register the kernel reads and writes.
        let ret = unsafe { libc::ioctl(fd, UFFDIO_REGISTER, &mut reg) };
        cvt(ret as libc::c_long)?;
        Ok(())
    }

    /// Stops routing faults (and unmap events) of `[start, start+len)` to this fd.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        let fd = self.fd.as_raw_fd();
        // SAFETY: `range` is a valid uffdio_range the kernel only reads.
        let ret = unsafe { libc::ioctl(fd, UFFDIO_UNREGISTER, &mut range) };
        cvt(ret as libc::c_long)?;
        Ok(())
    }

    /// Atomically places `data` (whole pages) at `dst`, page by page, and wakes the faulting
    /// threads. Pages already present are left as they are and the rest still go in: the
    /// kernel stops a copy at the first present page (reporting EAGAIN with what it copied).
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<Copied> {
        let (mut at, mut present) = (0u64, 0u64);
        let len = data.len() as u64;
        while at < len {
            let mut c = UffdioCopy {
                dst: dst + at,
                src: data[at as usize..].as_ptr() as u64,
                len: len - at,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `c` is valid; `src` points to `len - at` readable bytes of `data` (alive).
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            match copy_step(ret, c.copy, errno) {
                CopyStep::Done => return Ok(Copied::All { present }),
                CopyStep::Partial(bytes) => at += bytes,
                CopyStep::Present => {
                    at += crate::PAGE_SIZE;
                    present += 1;
                }
                CopyStep::Changing => return Ok(Copied::LayoutChanging { placed: at }),
                CopyStep::Failed(e) => return Err(io::Error::from_raw_os_error(e)),
            }
        }
        Ok(Copied::All { present })
    }

    /// Maps zero pages over `[dst, dst+len)` and wakes the faulting threads.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<Fill> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `z` is a valid uffdio_zeropage the kernel reads and writes.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        fill_result(ret)
    }

    /// Reads one event; `Ok(None)` when none is pending.
    pub fn read_event(&self) -> io::Result<Option<Event>> {
        let mut msg = RawMsg {
            event: 0,
            _reserved: [0; 7],
            arg: [0; 3],
        };
        // SAFETY: reading into a properly sized, writable uffd_msg buffer.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut msg as *mut RawMsg).cast(),
                std::mem::size_of::<RawMsg>(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        let [a, b, c] = msg.arg;
        Ok(Some(match msg.event {
            // pagefault: { u64 flags; u64 address; u32 ptid }
            EVENT_PAGEFAULT => Event::PageFault { addr: b },
            EVENT_FORK => {
                // SAFETY: the kernel installed this fd into our table while delivering the event.
                let fd = unsafe { OwnedFd::from_raw_fd(a as u32 as i32) };
                Event::Fork {
                    uffd: Userfaultfd { fd },
                }
            }
            EVENT_REMAP => Event::Remap {
                from: a,
                to: b,
                len: c,
            },
            EVENT_REMOVE => Event::Remove { start: a, end: b },
            EVENT_UNMAP => Event::Unmap { start: a, end: b },
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown userfaultfd event {other:#x}"),
                ));
            }
        }))
    }
}

fn fill_result(ret: libc::c_int) -> io::Result<Fill> {
    if ret == 0 {
        return Ok(Fill::Done);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(Fill::AlreadyPresent),
        _ => Err(err),
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Userfaultfd {
    fn into_raw_fd(self) -> std::os::fd::RawFd {
        self.fd.into_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_step_reads_the_kernels_three_ways_of_stopping() {
        assert_eq!(copy_step(0, 8192, 0), CopyStep::Done);
        // Stopped at a present page or a layout change after some pages: EAGAIN with a count.
        assert_eq!(copy_step(-1, 4096, libc::EAGAIN), CopyStep::Partial(4096));
        assert_eq!(
            copy_step(-1, -(libc::EEXIST as i64), libc::EEXIST),
            CopyStep::Present
        );
        assert_eq!(
            copy_step(-1, -(libc::EAGAIN as i64), libc::EAGAIN),
            CopyStep::Changing
        );
        assert_eq!(
            copy_step(-1, -(libc::ESRCH as i64), libc::ESRCH),
            CopyStep::Failed(libc::ESRCH)
        );
        // Refused before any copy (the count left at 0).
        assert_eq!(
            copy_step(-1, 0, libc::EINVAL),
            CopyStep::Failed(libc::EINVAL)
        );
    }

    /// On our own memory (as root): a copy over a range with a page already in place fills
    /// the others and leaves that one as it was.
    #[test]
    fn a_copy_goes_on_past_a_page_already_in_place() {
        let page = crate::PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping nobody else knows of.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let uffd = Userfaultfd::create().expect("userfaultfd (run as root)");
        uffd.handshake(0).unwrap();
        uffd.register(at as u64, 4 * page as u64).unwrap();
        let early = vec![7u8; page];
        assert_eq!(
            uffd.copy(at as u64 + page as u64, &early).unwrap(),
            Copied::All { present: 0 }
        );
        let data: Vec<u8> = (0..4).flat_map(|i| vec![i as u8 + 1; page]).collect();
        assert_eq!(
            uffd.copy(at as u64, &data).unwrap(),
            Copied::All { present: 1 }
        );
        // SAFETY: all four pages are in place now, so reading them cannot fault.
        let seen = unsafe { std::slice::from_raw_parts(at as *const u8, 4 * page) };
        let firsts: Vec<u8> = seen.chunks(page).map(|p| p[0]).collect();
        assert_eq!(firsts, [1, 7, 3, 4]);
        assert!(seen.chunks(page).all(|p| p.iter().all(|&b| b == p[0])));
        drop(uffd);
        // SAFETY: unmapping the mapping made above, no longer referenced.
        assert_eq!(unsafe { libc::munmap(at, 4 * page) }, 0);
    }
}
