//! Where a function's seed lives and how each call runs: a policy behind a trait.
//!
//! The default, [`LoadAware`], forks every call remotely from the function's one seed, on the
//! least loaded host. Fn's keep-warm (a hot container per function, reused until its
//! `idle_timeout`) and local fork (children only on the seed's host) are other policies: a
//! later issue compares them. [`Placement`] says how a call starts, so such policies add
//! variants there and the platform's invoker a way to run them.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A host as a policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub index: usize,
    /// Its daemon answered its last poll (and did not just fail this call).
    pub up: bool,
    /// Children running there: this platform's calls in flight there, and the other
    /// children the daemon's last status counted.
    pub running: u64,
    /// This platform's calls in flight there.
    pub inflight: u64,
    /// Seeds the host serves.
    pub seeds: usize,
    /// The host serves the function's seed.
    pub has_seed: bool,
    /// The host has a replica of the function's seed (its next child there is a plain fork).
    pub has_replica: bool,
}

/// How one call starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// A child of the function's seed, resumed by the daemon of `host`.
    RemoteFork { host: usize },
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;

    /// The host for a function's new seed, among those up.
    fn seed_host(&self, hosts: &[HostView]) -> Option<usize>;

    /// How one call of a function whose seed is described in `hosts` runs.
    fn place_call(&self, hosts: &[HostView]) -> Option<Placement>;
}

/// Remote fork per call, on the host with the fewest children running; a host without the
/// seed's replica counts `cold_penalty` children more (its first child builds the replica).
/// Ties go round-robin, so equal hosts share the calls.
#[derive(Debug)]
pub struct LoadAware {
    pub cold_penalty: u64,
    next: AtomicUsize,
}

impl Default for LoadAware {
    fn default() -> Self {
        LoadAware {
            cold_penalty: 1,
            next: AtomicUsize::new(0),
        }
    }
}

impl LoadAware {
    /// The up host with the lowest `score`, ties broken by a rotating start.
    fn least(&self, hosts: &[HostView], score: impl Fn(&HostView) -> u64) -> Option<usize> {
        let n = hosts.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &hosts[(start + i) % n])
            .filter(|h| h.up)
            .min_by_key(|h| score(h))
            .map(|h| h.index)
    }
}

impl Policy for LoadAware {
    fn name(&self) -> &'static str {
        "remote-fork (load-aware)"
    }

    fn seed_host(&self, hosts: &[HostView]) -> Option<usize> {
        // Room first (fewest seeds), then load.
        self.least(hosts, |h| {
            (h.seeds as u64) << 32 | h.running.min(u32::MAX as u64)
        })
    }

    fn place_call(&self, hosts: &[HostView]) -> Option<Placement> {
        let penalty = self.cold_penalty;
        self.least(hosts, |h| {
            h.running
                + if h.has_replica || h.has_seed {
                    0
                } else {
                    penalty
                }
        })
        .map(|host| Placement::RemoteFork { host })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(index: usize, running: u64, has_replica: bool) -> HostView {
        HostView {
            index,
            up: true,
            running,
            inflight: running,
            seeds: 0,
            has_seed: false,
            has_replica,
        }
    }

    fn picked(p: &LoadAware, hosts: &[HostView]) -> usize {
        match p.place_call(hosts) {
            Some(Placement::RemoteFork { host }) => host,
            None => panic!("no placement"),
        }
    }

    #[test]
    fn calls_go_to_the_least_loaded_host_that_is_up() {
        let p = LoadAware::default();
        let mut hosts = vec![host(0, 3, true), host(1, 1, true), host(2, 0, true)];
        assert_eq!(picked(&p, &hosts), 2);
        hosts[2].up = false;
        assert_eq!(picked(&p, &hosts), 1);
        for h in &mut hosts {
            h.up = false;
        }
        assert_eq!(p.place_call(&hosts), None);
    }

    #[test]
    fn a_replica_is_worth_the_penalty_and_ties_rotate() {
        let p = LoadAware::default();
        let hosts = [host(0, 1, true), host(1, 1, false)];
        assert_eq!(picked(&p, &hosts), 0);
        let hosts = [host(0, 1, true), host(1, 0, false)];
        // 1 + 0 against 0 + 1: a tie, shared.
        let picks: std::collections::BTreeSet<usize> = (0..4).map(|_| picked(&p, &hosts)).collect();
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn seeds_go_where_there_are_fewest() {
        let p = LoadAware::default();
        let mut hosts = vec![host(0, 0, false), host(1, 5, false)];
        hosts[0].seeds = 2;
        assert_eq!(p.seed_host(&hosts), Some(1));
    }
}
