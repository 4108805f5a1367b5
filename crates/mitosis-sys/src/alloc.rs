//! The C allocator's thresholds, for a process that moves page buffers all day.

/// Below this, freed memory stays in the process's heap instead of going back to the kernel.
const TRIM_THRESHOLD: libc::c_int = 16 << 20;
/// Above this, an allocation is a mapping of its own (unmapped when freed).
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

/// Keeps the buffers of page requests (up to 1 MiB each, several per fault) in the heap once
/// freed. By default glibc maps each buffer over 128 KiB afresh and unmaps it when freed, or
/// trims the heap under it, so every request paid page faults (about 2 µs a page here) and
/// an munmap or madvise: a 50-page fetch took 640 µs, 384 with these thresholds. At most
/// [`TRIM_THRESHOLD`] of freed memory stays per arena; larger buffers still go back.
pub fn keep_page_buffers() {
    // SAFETY: mallopt only sets two of glibc's malloc parameters; called before the process
    // has threads, it races with no allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
