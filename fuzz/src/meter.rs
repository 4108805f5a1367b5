//! A global allocator that keeps each thread's peak of live heap bytes, so a target can check
//! that a decoder allocated no more than its input justifies.
//!
//! Per thread, because `cargo test` runs targets on several threads at once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Meter;

#[global_allocator]
static METER: Meter = Meter;

thread_local! {
    // Const-initialized without Drop: no lazy registration, so safe inside the allocator.
    // Signed: memory allocated before a measurement may be freed during it.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes as isize;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - bytes as isize));
}

// SAFETY: every call goes to System unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Both blocks may be live during the move: count the new one before freeing the old.
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

/// Runs `f` and returns its result with the most heap bytes it had live at once on this thread.
pub fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_what_is_live_at_once() {
        let (_, peak) = super::peak(|| {
            let a = vec![0u8; 1000];
            drop(a);
            let b = vec![0u8; 3000];
            let c = vec![0u8; 500];
            b.len() + c.len()
        });
        assert!((3500..3600).contains(&peak), "{peak}");
        let (v, peak) = super::peak(|| vec![1u64; 10]);
        assert_eq!((v.len(), peak), (10, 80));
    }
}
