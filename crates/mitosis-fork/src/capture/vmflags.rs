//! Mapping flags only smaps shows (locked, grows down, may be made writable, DONTFORK), and
//! the cheap checks that say whether reading smaps (milliseconds) is called for.

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::ptrace::Tracee;

use crate::procfs::{self, MapsEntry};

/// Whether the seed has state only smaps shows: memory locked (VmLck, read first: cheap), or a
/// read-only shared file mapping whose file's open mode [`shared_file_writable`] cannot tell.
pub fn needs_smaps(pid: i32, maps: &[MapsEntry]) -> bool {
    let mode_unknown = maps
        .iter()
        .any(|m| read_only_shared_file(m) && shared_file_writable(pid, m).is_none());
    mode_unknown || procfs::locked_kib(pid).map_or(true, |kib| kib > 0)
}

/// A shared mapping of a file, not writable now: the seed may make it writable only if it
/// opened the file for writing.
pub fn read_only_shared_file(m: &MapsEntry) -> bool {
    m.shared && !m.write && m.inode != 0 && m.name.starts_with('/')
}

/// Whether the file behind `m` in process `pid` was opened for writing, so that a shared
/// mapping of it may be made writable (smaps' `mw`): the mode of its /proc/PID/map_files link
/// is the open file's (read: 0400, read-write: 0600), a stat where smaps walks every page of
/// every mapping (milliseconds: glibc maps its gconv cache so in every Python). `None` if
/// the link cannot be read.
pub fn shared_file_writable(pid: i32, m: &MapsEntry) -> Option<bool> {
    use std::os::unix::fs::PermissionsExt;
    let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let meta = std::fs::symlink_metadata(link).ok()?;
    Some(meta.permissions().mode() & 0o200 != 0)
}

/// The kernel's default `stack_guard_gap`: a mapping grows down only while this much stays
/// free below it.
const GUARD_GAP: u64 = 256 * PAGE_SIZE;

/// Whether the twin may have a MAP_GROWSDOWN mapping besides the main stack. Only an
/// anonymous mapping with the guard gap free below it could grow (mmap packs most together:
/// a process has a few such candidates). For each, the twin (which never runs) is asked for
/// a page right below it: mmap refuses that hint only within a growsdown mapping's guard gap.
/// Any doubt (a failed probe) answers yes: smaps then says.
pub fn grows_down_in_twin(twin: &mut Tracee, insn: u64, maps: &[MapsEntry]) -> bool {
    let candidates = maps.iter().enumerate().filter(|(i, m)| {
        let below = i.checked_sub(1).map_or(0, |j| maps[j].end);
        m.name.is_empty()
            && !m.shared
            && m.inode == 0
            && (m.read || m.write)
            && m.start.saturating_sub(below) >= GUARD_GAP
    });
    for (_, m) in candidates {
        let hint = m.start - PAGE_SIZE;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let args = [hint, PAGE_SIZE, libc::PROT_NONE as u64, flags, u64::MAX, 0];
        let Ok(got) = twin.syscall(insn, libc::SYS_mmap, args) else {
            return true;
        };
        if got.ret < 0 {
            return true;
        }
        let unmap = [got.ret as u64, PAGE_SIZE, 0, 0, 0, 0];
        let unmapped = twin.syscall(insn, libc::SYS_munmap, unmap);
        if got.ret as u64 != hint || !unmapped.is_ok_and(|r| r.ret == 0) {
            return true;
        }
    }
    false
}

/// What the seed's smaps says of its mappings, and the DONTFORK ranges let into the twin.
pub struct VmaFlags<'a> {
    pub dont_fork: &'a [(u64, u64)],
    /// Sorted by address; empty when smaps was not read.
    pub smaps: &'a [procfs::SmapsVma],
}

impl VmaFlags<'_> {
    /// The seed's smaps entry covering `m`, if smaps was read.
    pub fn of(&self, m: &MapsEntry) -> Option<&procfs::SmapsVma> {
        let i = self.smaps.partition_point(|s| s.end <= m.start);
        self.smaps
            .get(i)
            .filter(|s| s.start <= m.start && m.end <= s.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Maps `file` shared and read-only; returns its maps line's entry.
    fn map_shared_read_only(file: &std::fs::File) -> MapsEntry {
        // SAFETY: a new read-only shared mapping of an open file at an address the kernel
        // picks; it stays mapped until the test process exits.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let maps = procfs::parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        maps.unwrap()
            .into_iter()
            .find(|m| m.start == at as u64)
            .expect("the mapping")
    }

    #[test]
    fn a_shared_mappings_file_mode_reads_as_smaps_mw_says() {
        let path = std::env::temp_dir().join(format!("vmflags-mw-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; PAGE_SIZE as usize]).unwrap();
        let read_write = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_only = std::fs::File::open(&path).unwrap();
        let (rw, ro) = (
            map_shared_read_only(&read_write),
            map_shared_read_only(&read_only),
        );
        std::fs::remove_file(&path).unwrap();
        assert!(read_only_shared_file(&rw) && read_only_shared_file(&ro));
        let me = std::process::id() as i32;
        // Reading map_files needs CAP_SYS_ADMIN: without it the answer is "unknown" (smaps).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_eq!(shared_file_writable(me, &rw), None);
            return;
        }
        assert_eq!(shared_file_writable(me, &rw), Some(true));
        assert_eq!(shared_file_writable(me, &ro), Some(false));
    }
}
