//! Rebuilding a seed as a child process on this host.

mod batch;
mod build;
pub mod confine;
mod continuation;
mod ids;
mod kernel_state;
mod plan;
pub mod protocol;
pub mod replica;
mod stub_pool;
pub mod trampoline;
mod zombies;

pub use build::{RestoreError, StreamedPages, UFFD_FEATURES};
pub use confine::HostCreds;
pub use plan::{ContainerRoot, MapStep, Plan, PlanError, bootstrap_pages, plan};
pub use stub_pool::StubPool;
