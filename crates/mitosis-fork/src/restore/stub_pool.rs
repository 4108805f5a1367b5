//! Stubs started ahead of need: starting one (fork + exec of a daemon with many mappings, then
//! the dynamic loader) costs 1-2 ms, which a host that has never seen a seed would otherwise pay
//! before anything else can happen.
//!
//! A pooled stub is traced and blocked reading its setup; it learns its directory and root
//! from that setup, so one stub fits any seed. Tracer thread only, like every tracee.

use std::path::{Path, PathBuf};

use mitosis_sys::pidfd;

use super::build::{self, RestoreError, Spawned};

pub struct StubPool {
    stub: PathBuf,
    size: usize,
    ready: Vec<Spawned>,
}

impl StubPool {
    /// A pool of up to `size` waiting stubs of binary `stub` (empty until [`refill`]).
    ///
    /// [`refill`]: StubPool::refill
    pub fn new(stub: &Path, size: usize) -> Self {
        StubPool {
            stub: stub.to_path_buf(),
            size,
            ready: Vec::with_capacity(size),
        }
    }

    /// A waiting stub: a pooled one if one is still alive, else a new one.
    pub(crate) fn take(&mut self) -> Result<Spawned, RestoreError> {
        while let Some(spawned) = self.ready.pop() {
            // One that died while waiting (killed by someone) is reaped and skipped.
            match pidfd::try_reap(&spawned.pidfd) {
                Ok(None) => return Ok(spawned),
                _ => spawned.kill(),
            }
        }
        build::spawn(&self.stub)
    }

    /// Starts stubs until the pool is full.
    pub fn refill(&mut self) -> Result<(), RestoreError> {
        while self.ready.len() < self.size {
            self.ready.push(build::spawn(&self.stub)?);
        }
        Ok(())
    }
}

impl Drop for StubPool {
    fn drop(&mut self) {
        for spawned in self.ready.drain(..) {
            spawned.kill();
        }
    }
}
