//! How each call of a function starts ([`Strategy`]) and on which host ([`Policy`]).
//!
//! The default strategy forks every call remotely from the function's one seed; the others
//! are what platforms do without remote fork, so that the load-spike experiment compares
//! them on one platform: Fn's keep-warm (an instance started cold when none is idle, reused
//! until its `idle_timeout`), local fork (a seed on every host, children only from their
//! host's own), and a cold start per call. [`LoadAware`] picks the host for all of them.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The annotation that sets a function's strategy (else the platform's `--policy`).
pub const POLICY_ANNOTATION: &str = "mitosis.io/policy";

/// How a function's calls start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// A child of the function's one seed in the cluster, on any host (remote fork).
    #[default]
    RemoteFork,
    /// Fn's policy: a call takes an idle instance of the function if there is one, else
    /// starts one cold; a finished instance waits for the next call until `idle_timeout`.
    /// Instances answer one line per request line (the line contract of the examples).
    FnCache,
    /// A seed of the function on every host; a call is a child of its host's own seed.
    LocalFork,
    /// A new instance started cold for every call, ended after it.
    Cold,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::RemoteFork,
        Strategy::FnCache,
        Strategy::LocalFork,
        Strategy::Cold,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::RemoteFork => "remote-fork",
            Strategy::FnCache => "fn-cache",
            Strategy::LocalFork => "local-fork",
            Strategy::Cold => "cold",
        }
    }

    /// The function's own (its annotation), else `default`. An annotation that names no
    /// strategy is refused when the function is created or updated.
    pub fn of(
        annotations: &std::collections::BTreeMap<String, serde_json::Value>,
        default: Strategy,
    ) -> Strategy {
        annotations
            .get(POLICY_ANNOTATION)
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Strategy::ALL.iter().map(|k| k.name()).collect();
                format!("unknown policy {s:?}: one of {}", names.join(", "))
            })
    }
}

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
    /// It runs as many calls of this platform as the admission limit allows: calls wait.
    pub full: bool,
    /// Its memory available, by its last status (`None`: not known yet).
    pub memory_available_mib: Option<u64>,
    /// It has room for the function's memory (or its room is not known): policies place
    /// nothing on a host without.
    pub fits: bool,
}

/// Where one call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// On `host`: a child of the seed its view describes (remote or local fork), or a new
    /// instance (keep-warm with none idle, cold).
    Host { host: usize },
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
    /// The up host with room for the function (and, for a call, under the admission limit)
    /// with the lowest `score`, ties broken by a rotating start.
    fn least(
        &self,
        hosts: &[HostView],
        call: bool,
        score: impl Fn(&HostView) -> u64,
    ) -> Option<usize> {
        let n = hosts.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &hosts[(start + i) % n])
            .filter(|h| h.up && h.fits && !(call && h.full))
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
        self.least(hosts, false, |h| {
            (h.seeds as u64) << 32 | h.running.min(u32::MAX as u64)
        })
    }

    fn place_call(&self, hosts: &[HostView]) -> Option<Placement> {
        let penalty = self.cold_penalty;
        self.least(hosts, true, |h| {
            h.running
                + if h.has_replica || h.has_seed {
                    0
                } else {
                    penalty
                }
        })
        .map(|host| Placement::Host { host })
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
            full: false,
            memory_available_mib: None,
            fits: true,
        }
    }

    fn picked(p: &LoadAware, hosts: &[HostView]) -> usize {
        match p.place_call(hosts) {
            Some(Placement::Host { host }) => host,
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
    fn hosts_without_room_for_the_function_get_nothing() {
        let p = LoadAware::default();
        let mut hosts = vec![host(0, 0, true), host(1, 4, true)];
        hosts[0].fits = false;
        assert_eq!(picked(&p, &hosts), 1);
        hosts[1].fits = false;
        assert_eq!(p.place_call(&hosts), None);
        assert_eq!(p.seed_host(&hosts), None);
    }

    #[test]
    fn seeds_go_where_there_are_fewest() {
        let p = LoadAware::default();
        let mut hosts = vec![host(0, 0, false), host(1, 5, false)];
        hosts[0].seeds = 2;
        assert_eq!(p.seed_host(&hosts), Some(1));
    }
}

#[cfg(test)]
mod strategy_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategies_by_name_and_annotation() {
        for k in Strategy::ALL {
            assert_eq!(k.name().parse::<Strategy>(), Ok(k));
        }
        let err = "warm".parse::<Strategy>().unwrap_err();
        assert!(
            err.contains("remote-fork, fn-cache, local-fork, cold"),
            "{err}"
        );
        let mut a = std::collections::BTreeMap::new();
        assert_eq!(Strategy::of(&a, Strategy::Cold), Strategy::Cold);
        a.insert(POLICY_ANNOTATION.to_owned(), json!("fn-cache"));
        assert_eq!(Strategy::of(&a, Strategy::Cold), Strategy::FnCache);
    }
}
