//! The one small layer where mitosis talks to the kernel.
//!
//! Every raw system call the project makes lives here behind a safe function, so the rest of the
//! workspace is plain safe Rust. Each module wraps one kernel facility.

pub mod alloc;
pub mod fdpass;
pub mod mem;
pub mod ns;
pub mod pidfd;
pub mod ptrace;
pub mod sock;
pub mod task;
pub mod uffd;
pub mod unix_socket;

/// The page size mitosis works in; x86_64 base pages.
pub const PAGE_SIZE: u64 = 4096;

/// Converts a `-1`/errno style return into `io::Result`.
pub(crate) fn cvt(ret: libc::c_long) -> std::io::Result<libc::c_long> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
