//! Messages between the daemon and `mitosis-stub` over their socketpair (fd 3 in the stub).
//!
//! Daemon -> stub: [`Setup`]; stub -> daemon: [`Ready`] with the new userfaultfd attached;
//! daemon -> stub: [`Go`]; the stub then jumps into the trampoline and never answers again.

use serde::{Deserialize, Serialize};

/// The descriptor number the stub finds its channel on.
pub const CHANNEL_FD: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Every descriptor the stub itself keeps is moved to this number or above, clear of the
    /// seed's descriptor numbers; the trampoline closes them all at the end. The channel is
    /// at exactly this number.
    pub work_fd_base: i32,
    /// A container's rootfs: the stub chroots into it before opening anything, so the seed's
    /// paths resolve against the same files the seed saw.
    pub root: Option<String>,
    /// The working directory to take (inside `root` when there is one).
    pub cwd: Option<String>,
    pub opens: Vec<OpenSpec>,
}

/// A file the child needs: a mapping's file, the executable, or one of the seed's open files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSpec {
    pub path: String,
    pub flags: i32,
    /// Install at this number (a seed's open file); `None` for a working fd.
    pub target_fd: Option<i32>,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ready {
    /// The fd number of each open, in order.
    Opened(Vec<i32>),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Go {
    /// Where to map the trampoline: code page first, then `data`.
    pub at: u64,
    pub code: Vec<u8>,
    /// Records first, then the structures they point to.
    pub data: Vec<u8>,
    pub records: u64,
}
