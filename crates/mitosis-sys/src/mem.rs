//! Reading and writing another process's memory, and asking which of its pages exist.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

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
    mem: File,
    pagemap: File,
}

impl RemoteMemory {
    /// Opens `pid`'s memory; the caller must be allowed to ptrace it.
    pub fn open(pid: i32, writable: bool) -> io::Result<Self> {
        let mem = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(format!("/proc/{pid}/mem"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
        Ok(RemoteMemory { mem, pagemap })
    }

    /// Reads exactly `buf.len()` bytes at `addr`.
    pub fn read_exact(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read_exact_at(buf, addr)
    }

    /// Writes all of `buf` at `addr`, breaking copy-on-write like a debugger does.
    pub fn write_all(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        self.mem.write_all_at(buf, addr)
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
