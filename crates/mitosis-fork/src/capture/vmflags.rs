//! Mapping flags only smaps shows (locked, grows down, may be made writable, DONTFORK), and
//! the cheap checks that say whether reading smaps (milliseconds) is called for.

use mitosis_sys::PAGE_SIZE;
use mitosis_sys::ptrace::Tracee;

use crate::procfs::{self, MapsEntry};

/// Whether the seed has state only smaps shows: memory locked (VmLck, read first: cheap), or a
/// read-only shared file mapping (the file may be open read-write).
pub fn needs_smaps(pid: i32, maps: &[MapsEntry]) -> bool {
    let read_only_shared_file = maps
        .iter()
        .any(|m| m.shared && !m.write && m.inode != 0 && m.name.starts_with('/'));
    read_only_shared_file || procfs::locked_kib(pid).map_or(true, |kib| kib > 0)
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
