//! Reading and writing another process's memory, and asking which of its pages exist.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
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

/// Pages in one state, `[start, end)`, as PAGEMAP_SCAN reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateRun {
    pub start: u64,
    pub end: u64,
    pub state: PageState,
}

/// `struct pm_scan_arg` (linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` (linux/fs.h).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc000_0000
    | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Regions returned per ioctl; a fuller answer continues where the walk stopped.
const SCAN_BATCH: usize = 1024;

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

    /// Reads each `(addr, buffer)` piece in full, one pread of /proc/PID/mem each.
    ///
    /// Not process_vm_readv, though it reads many scattered pieces in one call: it pins the
    /// pages it reads (FOLL_PIN), and since Linux 5.19 pinning an anonymous page that a fork
    /// shares makes the process copy it first (a "unshare" fault). A twin or a replica shares
    /// every page with its seed or its children, so each page served that way cost a page of
    /// memory more and about 1.5 µs. /proc/PID/mem only gets the page (FOLL_GET).
    pub fn read_pieces(&self, pieces: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (addr, buf) in pieces.iter_mut() {
            self.mem.read_exact_at(buf, *addr)?;
        }
        Ok(())
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

impl RemoteMemory {
    /// The pages that exist (resident or swapped) in `[start, end)`, as runs in address
    /// order, or `None` if the kernel has no PAGEMAP_SCAN (before 6.7). The kernel walks
    /// the page tables once and returns runs, where reading pagemap returns 8 bytes for
    /// every page of every mapping, present or not.
    pub fn existing_runs(&self, start: u64, end: u64) -> io::Result<Option<Vec<StateRun>>> {
        let mut runs = Vec::new();
        let mut regions = [PageRegion::default(); SCAN_BATCH];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: at,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: SCAN_BATCH as u64,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE,
                ..PmScanArg::default()
            };
            // `vec` points to `vec_len` writable page_regions, which outlive the call.
            // SAFETY: `arg` is a pm_scan_arg of its declared size; `vec` is valid as above.
            let ret = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::ENOTTY) | Some(libc::EINVAL) if runs.is_empty() => Ok(None),
                    _ => Err(err),
                };
            }
            runs.extend(regions[..ret as usize].iter().map(|r| StateRun {
                start: r.start,
                end: r.end,
                state: PageState {
                    present: r.categories & PAGE_IS_PRESENT != 0,
                    swapped: r.categories & PAGE_IS_SWAPPED != 0,
                    file: r.categories & PAGE_IS_FILE != 0,
                },
            }));
            if arg.walk_end <= at {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            at = arg.walk_end;
        }
        Ok(Some(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh private anonymous read-write mapping of `len` bytes, none of it touched.
    fn fresh_anonymous(len: usize) -> *mut libc::c_void {
        // SAFETY: a new mapping at an address the kernel picks; nothing else refers to it.
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
        base
    }

    /// Sets the protection of the page at `addr`, one of a test's own mappings.
    fn protect_page(addr: u64, prot: libc::c_int) {
        // SAFETY: `addr` is a page of a mapping the calling test made and still owns.
        let ret = unsafe { libc::mprotect(addr as *mut libc::c_void, PAGE_SIZE as usize, prot) };
        assert_eq!(ret, 0);
    }

    #[test]
    fn pieces_land_in_writable_and_read_only_memory() {
        let len = 2 * PAGE_SIZE as usize;
        let base = fresh_anonymous(len);
        let addr = base as u64;
        // The second page read-only: process_vm_writev refuses it, /proc/PID/mem does not.
        protect_page(addr + PAGE_SIZE, libc::PROT_READ);
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

    #[test]
    fn pieces_are_read_past_what_process_vm_readv_refuses() {
        let len = 3 * PAGE_SIZE as usize;
        let base = fresh_anonymous(len);
        let addr = base as u64;
        for page in 0..3u64 {
            // SAFETY: a page of the mapping above.
            unsafe { *((addr + page * PAGE_SIZE + 8) as *mut u8) = page as u8 + 1 };
        }
        // The middle page unreadable: process_vm_readv would stop there, /proc/PID/mem does not.
        protect_page(addr + PAGE_SIZE, libc::PROT_NONE);
        let memory = RemoteMemory::open(std::process::id() as i32, false).unwrap();
        let (mut a, mut b, mut c) = ([0u8; 16], [0u8; 16], [0u8; 16]);
        memory
            .read_pieces(&mut [
                (addr, &mut a[..]),
                (addr + PAGE_SIZE, &mut b[..]),
                (addr + 2 * PAGE_SIZE, &mut c[..]),
            ])
            .unwrap();
        assert_eq!((a[8], b[8], c[8]), (1, 2, 3));
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(base, len) };
        let mut gone = [0u8; 16];
        assert!(memory.read_pieces(&mut [(addr, &mut gone[..])]).is_err());
    }

    /// The private dirty memory of process `pid`, in kB.
    fn private_dirty_kb(pid: i32) -> u64 {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
        let line = rollup
            .lines()
            .find(|l| l.starts_with("Private_Dirty:"))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn reading_a_forked_copy_leaves_its_pages_shared() {
        let pages = 256;
        let len = pages * PAGE_SIZE as usize;
        let base = fresh_anonymous(len);
        let addr = base as u64;
        for page in 0..pages as u64 {
            // SAFETY: a page of the mapping above.
            unsafe { *((addr + page * PAGE_SIZE) as *mut u8) = page as u8 };
        }
        let (parked, wake) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only blocks in read(2) and exits: async-signal-safe calls only.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let mut byte = [0u8; 1];
                let _ = nix::unistd::read(&parked, &mut byte);
                // SAFETY: leaving the forked copy without running anything of the parent's.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let before = private_dirty_kb(child.as_raw());
        let memory = RemoteMemory::open(child.as_raw(), false).unwrap();
        let mut copy = vec![0u8; len];
        let mut pieces: Vec<(u64, &mut [u8])> = copy
            .chunks_mut(PAGE_SIZE as usize)
            .enumerate()
            .map(|(i, buf)| (addr + i as u64 * PAGE_SIZE, buf))
            .collect();
        memory.read_pieces(&mut pieces).unwrap();
        let after = private_dirty_kb(child.as_raw());
        nix::unistd::write(&wake, b"x").unwrap();
        nix::sys::wait::waitpid(child, None).unwrap();
        assert!(
            copy.chunks(PAGE_SIZE as usize)
                .enumerate()
                .all(|(i, p)| p[0] == i as u8)
        );
        // A pinning read would have made the child copy all 1 MiB it shares with us.
        assert!(
            after < before + 256,
            "private dirty {before} kB -> {after} kB"
        );
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        assert_eq!(unsafe { libc::munmap(base, len) }, 0);
    }

    #[test]
    fn scanned_runs_agree_with_pagemap() {
        let pages = 64;
        let len = pages * PAGE_SIZE as usize;
        let base = fresh_anonymous(len);
        let addr = base as u64;
        // Pages 3..6, 9, and 40..64 written: three runs.
        for page in (3..6).chain([9]).chain(40..64) {
            // SAFETY: a page of the mapping above.
            unsafe { *((addr + page * PAGE_SIZE) as *mut u8) = 1 };
        }
        let memory = RemoteMemory::open(std::process::id() as i32, false).unwrap();
        let Some(runs) = memory.existing_runs(addr, addr + len as u64).unwrap() else {
            return; // a kernel before 6.7: nothing to compare
        };
        let per_page = memory.page_states(addr, pages).unwrap();
        let mut from_runs = vec![false; pages];
        for r in &runs {
            assert!(r.state.present && !r.state.file, "{r:?}");
            for page in (r.start - addr) / PAGE_SIZE..(r.end - addr) / PAGE_SIZE {
                from_runs[page as usize] = true;
            }
        }
        let existing: Vec<bool> = per_page.iter().map(|s| s.exists()).collect();
        assert_eq!(from_runs, existing);
        assert_eq!(runs.len(), 3);
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        assert_eq!(unsafe { libc::munmap(base, len) }, 0);
    }
}
