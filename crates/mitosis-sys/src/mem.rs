//! Reading and writing another process's memory, and asking which of its pages exist.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_writev};
use nix::unistd::Pid;

use crate::PAGE_SIZE;

/// A page's entry in /proc/PID/pagemap, reduced to what mitosis needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageState {
    /// Resident in RAM.
    pub present: bool,
    /// Swapped out (still content the process owns).
    pub swapped: bool,
    /// A page-cache page or shared anonymous page, as opposed to a private anonymous one.
    pub file: bool,
}

impl PageState {
    fn from_entry(e: u64) -> Self {
        PageState {
            present: e & (1 << 63) != 0,
            swapped: e & (1 << 62) != 0,
            file: e & (1 << 61) != 0,
        }
    }

    /// The process holds content for this page (resident or in swap).
    pub fn exists(self) -> bool {
        self.present || self.swapped
    }
}

/// An open view of a process's memory through /proc: `mem` for bytes, `pagemap` for page states.
///
/// /proc/PID/mem is used rather than process_vm_readv because it also reads pages the process
/// has mprotect'ed to PROT_NONE, which a child may later make readable again.
pub struct RemoteMemory {
    pid: i32,
    mem: File,
    pagemap: File,
}

/// Pieces one process_vm_writev takes (IOV_MAX).
const IOV_MAX: usize = 1024;

impl RemoteMemory {
    /// Opens `pid`'s memory; the caller must be allowed to ptrace it.
    pub fn open(pid: i32, writable: bool) -> io::Result<Self> {
        let mem = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(format!("/proc/{pid}/mem"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
        Ok(RemoteMemory { pid, mem, pagemap })
    }

    /// Reads exactly `buf.len()` bytes at `addr`.
    pub fn read_exact(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read_exact_at(buf, addr)
    }

    /// Writes all of `buf` at `addr`, breaking copy-on-write like a debugger does.
    pub fn write_all(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        self.mem.write_all_at(buf, addr)
    }

    /// Writes each `(addr, bytes)` piece: up to [`IOV_MAX`] of them per process_vm_writev
    /// (one syscall, one copy), and a piece it refuses (a read-only mapping: unlike a debugger
    /// it does not force) through `mem`.
    pub fn write_pieces(&self, pieces: &[(u64, &[u8])]) -> io::Result<()> {
        let mut rest = pieces;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(IOV_MAX)];
            let local: Vec<IoSlice> = batch.iter().map(|(_, b)| IoSlice::new(b)).collect();
            let remote: Vec<RemoteIoVec> = batch
                .iter()
                .map(|&(addr, b)| RemoteIoVec {
                    base: addr as usize,
                    len: b.len(),
                })
                .collect();
            let written = match process_vm_writev(Pid::from_raw(self.pid), &local, &remote) {
                Ok(n) => n,
                Err(Errno::EFAULT) => 0,
                Err(e) => return Err(e.into()),
            };
            // Whole pieces written, then the one it stopped in (if any) the slow way.
            let (mut done, mut left) = (0, written);
            while done < batch.len() && left >= batch[done].1.len() {
                left -= batch[done].1.len();
                done += 1;
            }
            if let Some(&(addr, bytes)) = batch.get(done) {
                self.write_all(addr + left as u64, &bytes[left..])?;
                done += 1;
            }
            rest = &rest[done..];
        }
        Ok(())
    }

    /// Page states for the `pages` pages starting at page-aligned `start`.
    pub fn page_states(&self, start: u64, pages: usize) -> io::Result<Vec<PageState>> {
        let mut raw = vec![0u8; pages * 8];
        self.pagemap
            .read_exact_at(&mut raw, start / PAGE_SIZE * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| PageState::from_entry(u64::from_ne_bytes(c.try_into().expect("8 bytes"))))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_land_in_writable_and_read_only_memory() {
        let len = 2 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let addr = base as u64;
        // The second page read-only: process_vm_writev refuses it, /proc/PID/mem does not.
        // SAFETY: the second page of the mapping made above.
        let ro = unsafe {
            libc::mprotect(
                (addr + PAGE_SIZE) as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::PROT_READ,
            )
        };
        assert_eq!(ro, 0);
        let memory = RemoteMemory::open(std::process::id() as i32, true).unwrap();
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        memory
            .write_pieces(&[(addr, &a), (addr + PAGE_SIZE, &b), (addr + 100, &c)])
            .unwrap();
        // SAFETY: the mapping above, still mapped and readable.
        let view = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        assert_eq!(&view[..16], &a);
        assert_eq!(&view[100..116], &c);
        assert_eq!(&view[PAGE_SIZE as usize..PAGE_SIZE as usize + 16], &b);
        // SAFETY: unmapping the mapping made above; `view` is not used after.
        assert_eq!(unsafe { libc::munmap(base, len) }, 0);
    }
}
