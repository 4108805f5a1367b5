//! Rebuilding a seed as a child process on this host.

mod build;
mod plan;
pub mod protocol;
pub mod replica;
pub mod trampoline;

pub use build::{Child, RestoreError, UFFD_FEATURES, build};
pub use plan::{MapStep, Plan, PlanError, plan};
