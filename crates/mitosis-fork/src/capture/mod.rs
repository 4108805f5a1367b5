//! Reading a stopped seed's kernel state: its threads, its process-wide settings, and its
//! descriptors.

pub mod fds;
pub mod process;
pub mod threads;
