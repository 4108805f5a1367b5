//! Containers made ahead of time, so that a child only has to join one.
//!
//! Creating a container (five namespaces, a cgroup, mounts, an init) takes milliseconds; a
//! child must not wait for that. One worker thread keeps `target` empty containers ready for
//! every bundle this host has run, refills the pool as children take them, and destroys used
//! ones off the children's path.
//!
//! Off their path in time too: making or destroying a container takes the cgroup and namespace
//! locks a fork takes (and, on a small host, the other CPU). Run beside a child's start, it
//! made the replica's clone several times slower (0.7-4 ms against 0.65). So while a child is
//! starting ([`Starting`]), the worker only makes a container for a queue that has none ready,
//! and destroys nothing unless [`DESTROY_BACKLOG`] used ones are waiting (under sustained
//! load, children are always starting).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::cgroup::Hierarchy;
use crate::container::{Container, ContainerError, Contents};
use crate::spec::Bundle;

/// Used containers left waiting while children start; beyond it they are destroyed anyway.
pub const DESTROY_BACKLOG: usize = 16;

/// Per-bundle counters, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub bundle: PathBuf,
    pub ready: usize,
    pub made: u64,
    pub taken: u64,
    /// Takes that found the pool empty and made a container on the spot.
    pub misses: u64,
    /// Mean time to make one container, µs.
    pub make_us: u64,
}

pub struct Pool {
    shared: Arc<Shared>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    hierarchy: Arc<Hierarchy>,
    init_exe: PathBuf,
    target: usize,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    queues: HashMap<[u8; 32], Queue>,
    to_destroy: Vec<Container>,
    next: u64,
    stopping: bool,
    /// Children starting in containers taken from the pool (live [`Starting`]s).
    starting: usize,
}

/// A container taken for a child.
pub struct Taken {
    pub container: Container,
    /// It came ready-made from the pool (not made on the spot).
    pub pooled: bool,
    /// Holds the worker back until dropped: drop it once the child has started.
    pub starting: Starting,
}

/// A child is starting; while one is, the pool's worker keeps out of its way.
pub struct Starting {
    shared: Arc<Shared>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.shared.lock().starting -= 1;
        self.shared.wake.notify_all();
    }
}

struct Queue {
    bundle: Arc<Bundle>,
    ready: VecDeque<Container>,
    /// Being made by the worker right now.
    making: usize,
    /// Making one failed: wait for the next take before trying again.
    broken: bool,
    made: u64,
    taken: u64,
    misses: u64,
    make_us_total: u64,
}

impl Pool {
    /// A pool keeping `target` containers ready per bundle (0: make them on demand only).
    pub fn new(hierarchy: Arc<Hierarchy>, init_exe: PathBuf, target: usize) -> Pool {
        let shared = Arc::new(Shared {
            hierarchy,
            init_exe,
            target,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let worker = std::thread::Builder::new()
            .name("container-pool".into())
            .spawn({
                let shared = shared.clone();
                move || shared.work()
            })
            .expect("spawning the pool's thread");
        Pool {
            shared,
            worker: Mutex::new(Some(worker)),
        }
    }

    pub fn hierarchy(&self) -> &Arc<Hierarchy> {
        &self.shared.hierarchy
    }

    /// A ready container of `bundle`; made on the spot if none is ready.
    pub fn take(&self, bundle: &Arc<Bundle>) -> Result<Taken, ContainerError> {
        let (name, starting) = {
            let mut state = self.shared.lock();
            if state.stopping {
                return Err(ContainerError::Init("the daemon is shutting down".into()));
            }
            let queue = state
                .queues
                .entry(bundle.digest)
                .or_insert_with(|| Queue::new(bundle.clone()));
            queue.taken += 1;
            queue.broken = false;
            let popped = queue.ready.pop_front();
            if popped.is_none() {
                queue.misses += 1;
            }
            // Counted from here; dropped with a failed make too, which releases the worker.
            state.starting += 1;
            let starting = Starting {
                shared: self.shared.clone(),
            };
            self.shared.wake.notify_all();
            match popped {
                Some(container) => {
                    return Ok(Taken {
                        container,
                        pooled: true,
                        starting,
                    });
                }
                None => (state.name(), starting),
            }
        };
        let container = self.shared.make(bundle, &name)?;
        Ok(Taken {
            container,
            pooled: false,
            starting,
        })
    }

    /// Hands back a used container, destroyed in the background.
    pub fn release(&self, container: Container) {
        let mut state = self.shared.lock();
        if state.stopping {
            drop(state);
            destroy(container);
            return;
        }
        state.to_destroy.push(container);
        self.shared.wake.notify_all();
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        let state = self.shared.lock();
        let mut out: Vec<PoolStats> = state
            .queues
            .values()
            .map(|q| PoolStats {
                bundle: q.bundle.dir.clone(),
                ready: q.ready.len(),
                made: q.made,
                taken: q.taken,
                misses: q.misses,
                make_us: q.make_us_total / q.made.max(1),
            })
            .collect();
        out.sort_by(|a, b| a.bundle.cmp(&b.bundle));
        out
    }

    /// Containers waiting to be destroyed.
    pub fn releasing(&self) -> usize {
        self.shared.lock().to_destroy.len()
    }
}

impl Pool {
    /// Destroys every container the pool holds; the pool makes no more.
    pub fn shutdown(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        let worker = self.worker.lock().expect("pool worker lock").take();
        if let Some(worker) = worker {
            let _ = worker.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Queue {
    fn new(bundle: Arc<Bundle>) -> Queue {
        Queue {
            bundle,
            ready: VecDeque::new(),
            making: 0,
            broken: false,
            made: 0,
            taken: 0,
            misses: 0,
            make_us_total: 0,
        }
    }
}

impl State {
    fn name(&mut self) -> String {
        self.next += 1;
        format!("c{}", self.next)
    }
}

enum Job {
    Destroy(Container),
    Make(Arc<Bundle>, String),
    Stop,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("pool lock")
    }

    fn make(&self, bundle: &Bundle, name: &str) -> Result<Container, ContainerError> {
        let hostname = format!("{}-{name}", bundle.hostname);
        Container::create(
            &self.hierarchy,
            &self.init_exe,
            bundle,
            name,
            &hostname,
            Contents::Empty,
        )
    }

    fn next_job(&self) -> Job {
        let mut state = self.lock();
        loop {
            if state.stopping {
                return Job::Stop;
            }
            // Refill first: a child may be waiting; used containers only cost memory.
            let (target, starting) = (self.target, state.starting > 0);
            let short = state
                .queues
                .values_mut()
                .find(|q| !q.broken && wants_more(q.ready.len() + q.making, target, starting));
            if let Some(q) = short {
                q.making += 1;
                let bundle = q.bundle.clone();
                let name = state.name();
                return Job::Make(bundle, name);
            }
            if may_destroy(state.to_destroy.len(), starting)
                && let Some(c) = state.to_destroy.pop()
            {
                return Job::Destroy(c);
            }
            state = self.wake.wait(state).expect("pool lock");
        }
    }

    fn work(&self) {
        loop {
            match self.next_job() {
                Job::Stop => break,
                Job::Destroy(c) => destroy(c),
                Job::Make(bundle, name) => {
                    let t0 = Instant::now();
                    let made = self.make(&bundle, &name);
                    let us = t0.elapsed().as_micros() as u64;
                    let mut state = self.lock();
                    let q = state
                        .queues
                        .get_mut(&bundle.digest)
                        .expect("queues only grow");
                    q.making -= 1;
                    match made {
                        Ok(c) => {
                            q.made += 1;
                            q.make_us_total += us;
                            q.ready.push_back(c);
                        }
                        Err(e) => {
                            // Don't spin on a bundle that cannot start: the next take retries.
                            tracing::warn!(
                                "pool: making a container of {}: {e}",
                                bundle.dir.display()
                            );
                            q.broken = true;
                        }
                    }
                }
            }
        }
        let mut state = self.lock();
        let mut all: Vec<Container> = std::mem::take(&mut state.to_destroy);
        for q in state.queues.values_mut() {
            all.extend(q.ready.drain(..));
        }
        drop(state);
        all.into_iter().for_each(destroy);
    }
}

/// Whether a queue with `have` containers ready or being made needs another: up to `target`,
/// but only its first one while a child is starting.
fn wants_more(have: usize, target: usize, starting: bool) -> bool {
    let want = if starting { target.min(1) } else { target };
    have < want
}

/// Whether the worker may destroy one of `backlog` used containers now.
fn may_destroy(backlog: usize, starting: bool) -> bool {
    backlog > 0 && (!starting || backlog >= DESTROY_BACKLOG)
}

fn destroy(c: Container) {
    let name = c.name().to_string();
    if let Err(e) = c.destroy() {
        tracing::warn!("destroying container {name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::{DESTROY_BACKLOG, may_destroy, wants_more};

    #[test]
    fn refills_to_the_target_when_no_child_is_starting() {
        assert!(wants_more(0, 4, false));
        assert!(wants_more(3, 4, false));
        assert!(!wants_more(4, 4, false));
    }

    #[test]
    fn only_an_empty_queue_is_refilled_while_a_child_starts() {
        assert!(wants_more(0, 4, true));
        assert!(!wants_more(1, 4, true));
        assert!(!wants_more(3, 4, true));
    }

    #[test]
    fn a_pool_of_zero_never_makes_ahead() {
        assert!(!wants_more(0, 0, false));
        assert!(!wants_more(0, 0, true));
    }

    #[test]
    fn used_containers_wait_for_starting_children_up_to_a_backlog() {
        assert!(!may_destroy(0, false));
        assert!(may_destroy(1, false));
        assert!(!may_destroy(1, true));
        assert!(!may_destroy(DESTROY_BACKLOG - 1, true));
        assert!(may_destroy(DESTROY_BACKLOG, true));
    }
}
