//! Fast cgroup moves.
//!
//! Moving a process into a cgroup takes the kernel's global threadgroup lock for writing, and
//! that waits for an RCU grace period: 10-26 ms per child measured here, far more than the
//! rest of a container join. While some hierarchy is mounted with `favordynmods`, the lock
//! stays in the mode where writers don't wait (a move then costs about 50 µs; forks and exits
//! pay slightly more). The daemon mounts a small named v1 hierarchy with that option in a
//! mount namespace of its own, so nothing shows on the host and it goes with the daemon.

use std::io;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// Moves the caller into its own mount namespace (host mounts still propagate in) and mounts
/// the `favordynmods` hierarchy on `dir`. Must run before the process starts threads.
pub fn favor_dynamic_moves(dir: &Path) -> io::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none).map_err(io::Error::from)?;
    std::fs::create_dir_all(dir)?;
    mount(
        Some("cgroup"),
        dir,
        Some("cgroup"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("none,name=mitosis-favordynmods,favordynmods"),
    )
    .map_err(io::Error::from)
}
