//! Lean containers for seeds and children.
//!
//! A function is an OCI bundle ([`spec`]). Its seed runs in a container of its own; each child
//! joins a container made ahead of time by the host's [`pool`]: a small init process
//! (`mitosis-init`) that is pid 1 of fresh pid, mount, uts, ipc and net namespaces with the
//! bundle's rootfs as its root, and [`cgroup`]s that carry the bundle's limits.

pub mod cgroup;
pub mod container;
pub mod fastmove;
pub mod fields;
pub mod init;
pub mod mounts;
pub mod pool;
pub mod privileges;
pub mod seccomp;
pub mod seed;
pub mod spec;
pub mod tmpfs;

pub use container::{Container, ContainerError, Contents};
pub use spec::{Bundle, BundleError};
