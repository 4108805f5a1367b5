//! Which ids a child's process and threads get, and how their runtime learns them.
//!
//! A child in a container has a pid namespace of its own, empty but for the container's
//! init: there its process and threads take the ids the seed's had in the seed's own
//! container (`clone3`'s `set_tid`), so a runtime that keeps the ids it read (Go's threads,
//! musl's) finds them right. Elsewhere the ids are the host's and taken (by the seed itself,
//! by another child), so a child's are new and only glibc learns them ([`tid_flags`];
//! docs/limits.md).

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

/// The clone flags that give a child's thread its seed thread's tid address: the kernel clears
/// the word there (and wakes its waiters) when the thread exits, as it would have for the
/// seed's; and writes the new thread's id there at creation where the seed's runtime kept its
/// id (glibc: so libc knows the thread's new id), not where it kept something else (musl).
pub(super) fn tid_flags(seed: &Thread) -> i32 {
    match (seed.tid_address, seed.tid_at_address) {
        (0, _) => 0,
        (_, true) => libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID,
        (_, false) => libc::CLONE_CHILD_CLEARTID,
    }
}

/// A clone injected with `call`: under the seed's own id first where asked (`own`: the
/// address of its `clone_args`), then, where that id is taken or none is asked, as
/// `clone(flags, sp, 0, tid_address)`. Says whether the own id was taken.
pub(super) fn clone_as_seed(
    mut call: impl FnMut(i64, [u64; 6]) -> Result<SyscallResult, RestoreError>,
    own: Option<u64>,
    [flags, sp, tid_address]: [u64; 3],
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
    let r = call(libc::SYS_clone, [flags, sp, 0, tid_address, 0, 0])?;
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
        let main = clone_args(&mut data, libc::CLONE_PARENT | tid_flags(main), main, None);
        let threads = others
            .iter()
            .map(|t| {
                // The kernel starts the thread at `stack + stack_size`: the seed thread's own
                // stack pointer, as `clone`'s new stack would.
                let sp = words_to_regs(&t.regs).rsp;
                clone_args(&mut data, THREAD_FLAGS | tid_flags(t), t, Some(sp))
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

/// One `struct clone_args` asking for `t`'s own id (a one-level `set_tid`), its tid address
/// handed on as [`tid_flags`] says.
fn clone_args(data: &mut Batch, flags: i32, t: &Thread, sp: Option<u64>) -> Arg {
    const STACK_LEN: u64 = 16;
    let set_tid = data.bytes(&t.own_tid.to_ne_bytes());
    let (stack, stack_size) = match sp {
        Some(sp) => (sp - STACK_LEN, STACK_LEN),
        None => (0, 0),
    };
    data.words(vec![
        Arg::Val(flags as u32 as u64),
        Arg::Val(0),
        Arg::Val(t.tid_address),
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
        t.tid_at_address = tid_address != 0;
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
    fn an_unknown_id_asks_for_none() {
        assert!(OwnIds::new(&[thread(0, 0, 0x7000)]).is_none());
    }
}
