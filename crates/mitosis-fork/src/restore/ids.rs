//! Which ids a child's process and threads get, and how their runtime learns them.
//!
//! A child in a container has a pid namespace of its own, empty but for the container's
//! init: there its process and threads take the ids the seed's had in the seed's own
//! container (`clone3`'s `set_tid`), so a runtime that keeps the ids it read (Go's threads,
//! musl's) finds them right. Elsewhere the ids are the host's and taken (by the seed itself,
//! by another child), so a child's are new, and only the runtimes that keep them where we can
//! find them learn them: glibc and musl ([`tid_clone`]; docs/limits.md).

use mitosis_descriptor::Thread;
use mitosis_sys::ptrace::SyscallResult;

use super::RestoreError;
use super::batch::{Arg, Batch};
use crate::regs::words_to_regs;

/// `struct clone_args` up to `set_tid_size` (`CLONE_ARGS_SIZE_VER1`, Linux 5.5).
pub(super) const CLONE_ARGS_LEN: u64 = 80;

/// The clone flags of a thread of a child.
pub(super) const THREAD_FLAGS: i32 = libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM;

/// The clone flags and child-tid address of a child's thread: the kernel writes the new
/// thread's id where the seed's runtime keeps it (`tid_cache`), and clears the seed thread's
/// tid address (waking its waiters) when the thread exits, as it would have for the seed's.
/// One address serves both: where they differ (musl), the id is written at clone and the
/// thread registers its tid address itself ([`sets_own_tid_address`]).
pub(super) fn tid_clone(seed: &Thread) -> (i32, u64) {
    match (seed.tid_cache, seed.tid_address) {
        (0, 0) => (0, 0),
        (0, clear) => (libc::CLONE_CHILD_CLEARTID, clear),
        (cache, clear) if cache == clear => {
            (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID, cache)
        }
        (cache, _) => (libc::CLONE_CHILD_SETTID, cache),
    }
}

/// The thread registers its tid address with `set_tid_address` in its batch: its clone
/// could not ([`tid_clone`]).
pub(crate) fn sets_own_tid_address(seed: &Thread) -> bool {
    seed.tid_cache != 0 && seed.tid_address != 0 && seed.tid_cache != seed.tid_address
}

/// A clone injected with `call`: under the seed's own id first where asked (`own`: the
/// address of its `clone_args`), then, where that id is taken or none is asked, as
/// `clone(flags, sp, 0, child_tid)`. Says whether the own id was taken.
pub(super) fn clone_as_seed(
    mut call: impl FnMut(i64, [u64; 6]) -> Result<SyscallResult, RestoreError>,
    own: Option<u64>,
    [flags, sp, child_tid]: [u64; 3],
) -> Result<(SyscallResult, bool), RestoreError> {
    if let Some(args) = own {
        let r = call(libc::SYS_clone3, [args, CLONE_ARGS_LEN, 0, 0, 0, 0])?;
        if r.ret > 0 {
            return Ok((r, true));
        }
        tracing::debug!(
            errno = -r.ret,
            "the seed's own id refused; a new one instead"
        );
    }
    let r = call(libc::SYS_clone, [flags, sp, 0, child_tid, 0, 0])?;
    Ok((r, false))
}

/// The `clone_args` that start a container child's process (from the replica, as its
/// sibling) and each of its other threads under their seed's own ids: data the replica keeps
/// with its batches, which a fork of it has at the same addresses.
pub(super) struct OwnIds {
    data: Batch,
    main: Arg,
    threads: Vec<Arg>,
}

/// Where [`OwnIds`]' arguments are once placed: the process's, then each other thread's.
#[derive(Debug, Clone)]
pub(super) struct PlacedIds {
    pub main: u64,
    pub threads: Vec<u64>,
}

impl OwnIds {
    /// The arguments for `threads` (the main thread first), or none where an id is unknown.
    pub fn new(threads: &[Thread]) -> Option<Self> {
        if threads.iter().any(|t| t.own_tid <= 0) {
            return None;
        }
        let mut data = Batch::default();
        let (main, others) = threads.split_first()?;
        // CLONE_PARENT takes the replica's exit signal; clone3 wants none given with it.
        let main = clone_args(&mut data, libc::CLONE_PARENT, main, None);
        let threads = others
            .iter()
            .map(|t| {
                // The kernel starts the thread at `stack + stack_size`: the seed thread's own
                // stack pointer, as `clone`'s new stack would.
                let sp = words_to_regs(&t.regs).rsp;
                clone_args(&mut data, THREAD_FLAGS, t, Some(sp))
            })
            .collect();
        Some(OwnIds {
            data,
            main,
            threads,
        })
    }

    /// The data to place with the replica's batches.
    pub fn batch(&self) -> &Batch {
        &self.data
    }

    pub fn place(&self, at: u64) -> PlacedIds {
        PlacedIds {
            main: self.data.address_of(at, self.main),
            threads: self
                .threads
                .iter()
                .map(|&a| self.data.address_of(at, a))
                .collect(),
        }
    }
}

/// One `struct clone_args` asking for `t`'s own id (a one-level `set_tid`), its tid
/// addresses handed on as [`tid_clone`] says.
fn clone_args(data: &mut Batch, flags: i32, t: &Thread, sp: Option<u64>) -> Arg {
    const STACK_LEN: u64 = 16;
    let (tid_flags, child_tid) = tid_clone(t);
    let flags = flags | tid_flags;
    let set_tid = data.bytes(&t.own_tid.to_ne_bytes());
    let (stack, stack_size) = match sp {
        Some(sp) => (sp - STACK_LEN, STACK_LEN),
        None => (0, 0),
    };
    data.words(vec![
        Arg::Val(flags as u32 as u64),
        Arg::Val(0),
        Arg::Val(child_tid),
        Arg::Val(0),
        Arg::Val(0),
        Arg::Val(stack),
        Arg::Val(stack_size),
        Arg::Val(0),
        set_tid,
        Arg::Val(1),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(own_tid: i32, tid_address: u64, rsp: u64) -> Thread {
        let mut t = super::super::plan::sample(Vec::new(), &[]).threads[0].clone();
        t.own_tid = own_tid;
        t.tid_address = tid_address;
        t.tid_cache = tid_address;
        t.regs[19] = rsp;
        t
    }

    #[test]
    fn each_thread_asks_for_its_own_id_on_its_own_stack() {
        let threads = [thread(2, 0x1000, 0x7000), thread(7, 0x2000, 0x9000)];
        let ids = OwnIds::new(&threads).expect("ids known");
        let at = 0x10_0000;
        let bytes = ids.batch().encode(at);
        let placed = ids.place(at);
        let word = |addr: u64, i: u64| {
            let off = (addr - at + 8 * i) as usize;
            u64::from_ne_bytes(bytes[off..off + 8].try_into().unwrap())
        };
        let set_tid = |addr: u64| {
            let off = (word(addr, 8) - at) as usize;
            i32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap())
        };
        let main = placed.main;
        let settid = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(word(main, 0), libc::CLONE_PARENT as u64 | settid);
        assert_eq!(
            (word(main, 2), word(main, 4), word(main, 5)),
            (0x1000, 0, 0)
        );
        assert_eq!((set_tid(main), word(main, 9)), (2, 1));
        let other = placed.threads[0];
        assert_eq!(word(other, 0), THREAD_FLAGS as u64 | settid);
        assert_eq!(
            word(other, 5) + word(other, 6),
            0x9000,
            "starts at its own sp"
        );
        assert_eq!(set_tid(other), 7);
    }

    #[test]
    fn the_id_goes_where_the_runtime_keeps_it_and_the_tid_address_stays() {
        let mut t = thread(7, 0x1000, 0x9000);
        let both = libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID;
        assert_eq!(tid_clone(&t), (both, 0x1000), "glibc: one address for both");
        assert!(!sets_own_tid_address(&t));
        t.tid_cache = 0x7000 + 48;
        assert_eq!(
            tid_clone(&t),
            (libc::CLONE_CHILD_SETTID, 0x7030),
            "musl: the id"
        );
        assert!(
            sets_own_tid_address(&t),
            "and the lock registered by the thread"
        );
        t.tid_cache = 0;
        assert_eq!(tid_clone(&t), (libc::CLONE_CHILD_CLEARTID, 0x1000));
        t.tid_address = 0;
        assert_eq!(tid_clone(&t), (0, 0), "Go: nothing");
    }

    #[test]
    fn an_unknown_id_asks_for_none() {
        assert!(OwnIds::new(&[thread(0, 0, 0x7000)]).is_none());
    }
}
