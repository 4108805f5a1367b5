//! Stubs started ahead of need: starting one (fork + exec of a daemon with many mappings, then
//! the dynamic loader) costs 1-2 ms, which a host that has never seen a seed would otherwise pay
//! before anything else can happen.
//!
//! A thread of the pool's own starts them, so that no build waits behind a start: a stub taken
//! is replaced at once, even when builds come back to back. A pooled stub runs untraced,
//! blocked reading its setup (from which it learns its directory and root, so one stub fits
//! any seed); the tracer thread seizes it when it takes it. Stubs die with the thread that
//! started them (PR_SET_PDEATHSIG), so that thread lives as long as the pool.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use mitosis_sys::pidfd;

use super::build::{self, RestoreError, Spawned, Started};

/// How long the starter waits after a stub failed to start before it tries again.
const RETRY: Duration = Duration::from_secs(1);

pub struct StubPool {
    shared: Arc<Shared>,
    starter: Option<JoinHandle<()>>,
}

struct Shared {
    stub: PathBuf,
    size: usize,
    state: Mutex<State>,
    /// Signalled when a stub was taken, and when the pool closes.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    ready: Vec<Started>,
    closed: bool,
}

impl StubPool {
    /// A pool of up to `size` waiting stubs of binary `stub`, filled from now on.
    pub fn new(stub: &Path, size: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            stub: stub.to_path_buf(),
            size,
            state: Mutex::default(),
            wake: Condvar::new(),
        });
        let starter = thread::Builder::new().name("stub-starter".into()).spawn({
            let shared = shared.clone();
            move || shared.keep_filled()
        })?;
        Ok(StubPool {
            shared,
            starter: Some(starter),
        })
    }

    /// A waiting stub, traced by the calling thread: a pooled one if one is still alive, else
    /// one started now.
    pub(crate) fn take(&self) -> Result<Spawned, RestoreError> {
        let pooled = {
            let mut state = self.shared.lock();
            let mut alive = None;
            while let Some(started) = state.ready.pop() {
                // One that died while waiting (killed by someone) is reaped and skipped.
                match pidfd::try_reap(&started.pidfd) {
                    Ok(None) => {
                        alive = Some(started);
                        break;
                    }
                    // Reaped just now: its pid may already be another process's.
                    Ok(Some(_)) => {}
                    Err(_) => started.kill(),
                }
            }
            alive
        };
        self.shared.wake.notify_one();
        match pooled {
            Some(started) => started.seize(),
            None => {
                tracing::debug!("no stub waiting: starting one now");
                build::start(&self.shared.stub)?.seize()
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("stub pool lock")
    }

    /// The starter thread: tops the pool up whenever a stub was taken, until it closes.
    fn keep_filled(&self) {
        let mut state = self.lock();
        loop {
            if state.closed {
                state.ready.drain(..).for_each(Started::kill);
                return;
            }
            if state.ready.len() >= self.size {
                state = self.wake.wait(state).expect("stub pool lock");
                continue;
            }
            drop(state);
            let t = std::time::Instant::now();
            let started = build::start(&self.stub);
            tracing::debug!(
                us = t.elapsed().as_micros() as u64,
                "stub started for the pool"
            );
            state = self.lock();
            match started {
                Ok(started) => state.ready.push(started),
                Err(e) => {
                    tracing::warn!("starting a stub for the pool: {e}");
                    state = self
                        .wake
                        .wait_timeout(state, RETRY)
                        .expect("stub pool lock")
                        .0;
                }
            }
        }
    }
}

impl Drop for StubPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(starter) = self.starter.take() {
            let _ = starter.join();
        }
    }
}
