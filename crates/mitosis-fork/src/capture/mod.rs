//! Reading a stopped seed's kernel state: its threads (with their credentials), its
//! process-wide settings, and its descriptors.

pub mod children;
pub mod creds;
pub mod fds;
mod memfiles;
pub mod process;
pub mod threads;
pub mod timers;
pub mod vmflags;
