//! The cluster's hosts: each a daemon's control endpoint (its unix socket, or its TCP
//! listener with mutual TLS), what its last status said, and the calls this platform has
//! running there.
//!
//! Each host is polled by a task of its own (with a timeout), so a host that hangs delays
//! only its own view. A host whose daemon fails a poll
//! or a call is down until a poll succeeds again.
//!
//! With a shared store (etcd), the hosts given to this instance are registered there after
//! each successful poll, under a lease of this instance's that only those polls refresh (see
//! [`crate::etcd`]); the hosts other instances registered are found there and polled too, and
//! count as down once their entry is gone.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use mitosis_client::{DaemonStatus, Endpoint, Remote};

use crate::daemon::Reach;
use crate::etcd::EtcdStore;
use crate::policy::HostView;
use crate::seeds::Seed;
use crate::store::HostRecord;

/// How long a status may take before the host counts as down.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// A host as given on the command line: `NAME=/path/to/mitosisd.sock` (or `unix:/path`),
/// or `NAME=tcp://IP:PORT` (its daemon's `--control-listen`, mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    pub endpoint: Endpoint,
}

impl HostSpec {
    /// Every host of a simulated cluster, named `h0`, `h1`... by index, by its unix socket.
    pub fn of_testbed(tb: &mitosis_testbed::Testbed) -> Vec<HostSpec> {
        tb.hosts()
            .iter()
            .map(|h| HostSpec {
                name: format!("h{}", h.index()),
                endpoint: Endpoint::Unix(h.socket_path().to_owned()),
            })
            .collect()
    }

    /// The same hosts by their daemons' TCP control listeners on `port` (each daemon runs
    /// with `--control-listen` on its address and that port).
    pub fn of_testbed_tcp(tb: &mitosis_testbed::Testbed, port: u16) -> Vec<HostSpec> {
        tb.hosts()
            .iter()
            .map(|h| HostSpec {
                name: format!("h{}", h.index()),
                endpoint: Endpoint::Tcp((h.addr(), port).into()),
            })
            .collect()
    }
}

impl FromStr for HostSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((name, endpoint)) if !name.is_empty() => Ok(HostSpec {
                name: name.to_owned(),
                endpoint: endpoint.parse().map_err(|e| format!("{s:?}: {e}"))?,
            }),
            _ => Err(format!(
                "{s:?}: expected NAME=/path/to/mitosisd.sock or NAME=tcp://IP:PORT"
            )),
        }
    }
}

/// What the last poll of a host found.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Not polled yet: counted as up, so the first calls need not wait for a poll.
    polled: bool,
    up: bool,
    error: Option<String>,
    status: Option<DaemonStatus>,
    /// This platform's calls on the host when the status was asked.
    inflight_at_poll: u64,
}

pub struct Host {
    pub spec: HostSpec,
    seen: Mutex<Seen>,
    /// Calls of this platform running there now (exact, unlike the polled status).
    inflight: AtomicU64,
    /// Given to this instance (which polls it and registers it in a shared store), not found
    /// in the store.
    pub local: bool,
    /// Whether its entry is in the shared store (always, for a local host).
    registered: AtomicBool,
}

impl Host {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Only plain assignments happen under the lock: a poisoned one is still whole.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_up(&self) -> bool {
        let seen = self.seen();
        (!seen.polled || seen.up) && self.registered.load(Ordering::Relaxed)
    }

    fn new(spec: HostSpec, local: bool) -> Host {
        Host {
            spec,
            seen: Mutex::default(),
            inflight: AtomicU64::new(0),
            local,
            registered: AtomicBool::new(true),
        }
    }
}

/// Counts a call as running on its host while it lives.
pub struct InFlight(Arc<Host>, Arc<tokio::sync::Notify>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        // A call waiting for room (admission control) may take this one's.
        self.1.notify_waiters();
    }
}

/// One line per host for people: `name socket up|down children N seeds N replicas N`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostReport {
    pub name: String,
    pub socket: String,
    pub up: bool,
    /// Given to this instance, or found in the shared store.
    pub local: bool,
    pub registered: bool,
    pub error: Option<String>,
    pub listen: Option<String>,
    pub children_running: u64,
    pub inflight: u64,
    pub seeds: usize,
    pub replicas: usize,
    /// The CPUs its daemon may use and its memory available, by its last status (`None`:
    /// not polled yet).
    pub cpus: Option<u64>,
    pub memory_available_mib: Option<u64>,
}

pub struct Hosts {
    /// Only ever grows (a host's index is its name's for good): a host that goes is down.
    hosts: RwLock<Vec<Arc<Host>>>,
    /// The shared store the local hosts are registered in and the others found in.
    shared: Option<EtcdStore>,
    /// How TCP endpoints are reached (none: only unix sockets work).
    remote: Option<Remote>,
    /// Most calls of this platform at once on one host (0: no limit).
    call_limit: AtomicU64,
    /// Notified whenever a call ends, for calls waiting for room.
    freed: Arc<tokio::sync::Notify>,
}

impl Hosts {
    pub fn new(
        specs: Vec<HostSpec>,
        shared: Option<EtcdStore>,
        remote: Option<Remote>,
    ) -> Arc<Hosts> {
        Arc::new(Hosts {
            remote,
            call_limit: AtomicU64::new(0),
            freed: Arc::default(),
            hosts: RwLock::new(
                specs
                    .into_iter()
                    .map(|spec| Arc::new(Host::new(spec, true)))
                    .collect(),
            ),
            shared,
        })
    }

    fn all(&self) -> Vec<Arc<Host>> {
        self.hosts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Hosts a poll found up (and registered), by name: readiness needs one (`/readyz`).
    pub fn polled_up(&self) -> Vec<String> {
        self.all()
            .iter()
            .filter(|h| {
                let seen = h.seen();
                seen.polled && seen.up && h.registered.load(Ordering::Relaxed)
            })
            .map(|h| h.spec.name.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.hosts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, index: usize) -> Arc<Host> {
        self.hosts.read().unwrap_or_else(PoisonError::into_inner)[index].clone()
    }

    /// How to reach host `index`'s daemon.
    pub fn reach(&self, index: usize) -> Reach {
        Reach {
            endpoint: self.get(index).spec.endpoint.clone(),
            remote: self.remote.clone(),
        }
    }

    /// How TCP endpoints are reached.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The index of the host named `name`, if it is known.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.hosts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .position(|h| h.spec.name == name)
    }

    /// Polls every host every `interval`, each on a task of its own; with a shared store,
    /// looks for the hosts other instances registered as often.
    pub fn start_polling(self: Arc<Self>, interval: Duration) {
        for index in 0..self.len() {
            self.clone().spawn_poller(index, interval);
        }
        if self.shared.is_some() {
            let hosts = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    hosts.clone().discover(interval).await;
                }
            });
        }
    }

    fn spawn_poller(self: Arc<Self>, index: usize, interval: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.poll(index).await;
            }
        });
    }

    /// Reads the registered hosts: new ones are added (and polled), the others' entries
    /// say whether they are still registered. If etcd does not answer, nothing changes.
    async fn discover(self: Arc<Self>, interval: Duration) {
        let Some(shared) = &self.shared else { return };
        let records = match shared.hosts().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("listing the registered hosts: {e}");
                return;
            }
        };
        for record in &records {
            if self.index_of(&record.name).is_none() {
                let endpoint = match record.endpoint.parse() {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(host = %record.name, "its endpoint in etcd: {e}");
                        continue;
                    }
                };
                let spec = HostSpec {
                    name: record.name.clone(),
                    endpoint,
                };
                tracing::info!(host = %spec.name, "found a host in etcd");
                let index = {
                    let mut hosts = self.hosts.write().unwrap_or_else(PoisonError::into_inner);
                    hosts.push(Arc::new(Host::new(spec, false)));
                    hosts.len() - 1
                };
                self.clone().spawn_poller(index, interval);
            }
        }
        for host in self.all().iter().filter(|h| !h.local) {
            let now = records.iter().any(|r| r.name == host.spec.name);
            if host.registered.swap(now, Ordering::Relaxed) != now {
                tracing::info!(host = %host.spec.name, registered = now, "host's entry in etcd");
            }
        }
    }

    /// Asks host `index` for its status and records what came back; a local host that
    /// answered is registered (or its lease refreshed) in the shared store.
    pub async fn poll(&self, index: usize) {
        let host = self.get(index);
        let inflight_at_poll = host.inflight.load(Ordering::Relaxed);
        let result = self
            .reach(index)
            .status(STATUS_TIMEOUT)
            .await
            .map_err(|e| e.to_string());
        // Published after the status is recorded: a slow etcd delays the entry, not the view.
        let record = match (&result, &self.shared) {
            (Ok(status), Some(_)) if host.local => Some(HostRecord {
                name: host.spec.name.clone(),
                endpoint: host.spec.endpoint.to_string(),
                listen: status.listen.clone(),
                children_running: status.children_running,
                seeds: status.seeds.iter().map(|s| s.id).collect(),
                replicas: status.replicas.len(),
                registered_by: String::new(),
            }),
            _ => None,
        };
        self.record_poll(&host, result, inflight_at_poll);
        if let (Some(record), Some(shared)) = (record, &self.shared) {
            if let Err(e) = shared.publish_host(record).await {
                tracing::warn!(host = %host.spec.name, "registering the host in etcd: {e}");
            }
        }
    }

    fn record_poll(
        &self,
        host: &Host,
        result: Result<DaemonStatus, String>,
        inflight_at_poll: u64,
    ) {
        let mut seen = host.seen();
        let was_up = !seen.polled || seen.up;
        seen.polled = true;
        match result {
            Ok(status) => {
                if !seen.up {
                    tracing::info!(host = %host.spec.name, "host is up");
                }
                seen.up = true;
                seen.error = None;
                seen.status = Some(status);
                seen.inflight_at_poll = inflight_at_poll;
            }
            Err(e) => {
                if was_up {
                    tracing::warn!(host = %host.spec.name, "host is down: {e}");
                }
                seen.up = false;
                seen.error = Some(e);
            }
        }
    }

    /// Marks a host down after a failed call (until a poll finds it up).
    pub fn mark_down(&self, index: usize, why: &str) {
        let host = self.get(index);
        let mut seen = host.seen();
        if !seen.polled || seen.up {
            tracing::warn!(host = %host.spec.name, "host is down: {why}");
        }
        seen.polled = true;
        seen.up = false;
        seen.error = Some(why.to_owned());
    }

    /// Counts a call on host `index` until the guard drops.
    pub fn start_call(&self, index: usize) -> InFlight {
        let host = self.get(index);
        host.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(host, self.freed.clone())
    }

    /// Like [`Hosts::start_call`], but only if the host is under the call limit.
    pub fn try_start_call(&self, index: usize) -> Option<InFlight> {
        let host = self.get(index);
        let limit = self.call_limit.load(Ordering::Relaxed);
        let taken = host
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| InFlight(host, self.freed.clone()))
    }

    /// Admission control: at most `limit` calls of this platform at once per host (`None`:
    /// no limit); calls over it wait for room.
    pub fn set_call_limit(&self, limit: Option<usize>) {
        self.call_limit
            .store(limit.map_or(0, |l| l.max(1) as u64), Ordering::Relaxed);
    }

    /// Notified whenever a call ends (for calls waiting for room).
    pub fn freed(&self) -> Arc<tokio::sync::Notify> {
        self.freed.clone()
    }

    /// The hosts as the policy sees them, for `seed` (which hosts have its replica) or for a
    /// new seed, of a function of `need_mib` MiB (a host with less memory available does
    /// not fit); `excluded` hosts count as down.
    pub fn views(&self, seed: Option<&Seed>, need_mib: u64, excluded: &[usize]) -> Vec<HostView> {
        self.all()
            .iter()
            .enumerate()
            .map(|(index, host)| {
                let registered = host.registered.load(Ordering::Relaxed);
                let seen = host.seen();
                let inflight = host.inflight.load(Ordering::Relaxed);
                let status = seen.status.as_ref();
                let has_replica = seed.is_some_and(|seed| {
                    status.is_some_and(|s| {
                        s.replicas
                            .iter()
                            .any(|r| r.seed == seed.seed_id && r.host == seed.seed_addr)
                    })
                });
                HostView {
                    index,
                    up: (!seen.polled || seen.up) && registered && !excluded.contains(&index),
                    // Children of others (the poll's count less this platform's calls
                    // then) and this platform's calls now: the poll is older than the calls.
                    running: status.map_or(0, |s| {
                        s.children_running.saturating_sub(seen.inflight_at_poll)
                    }) + inflight,
                    inflight,
                    seeds: status.map_or(0, |s| s.seeds.len()),
                    has_seed: seed.is_some_and(|seed| seed.host == index),
                    has_replica,
                    full: {
                        let limit = self.call_limit.load(Ordering::Relaxed);
                        limit > 0 && inflight >= limit
                    },
                    memory_available_mib: status.map(|s| s.memory_available_mib),
                    // Unknown (not polled yet, or a daemon that does not say) fits.
                    fits: status
                        .map(|s| s.memory_available_mib)
                        .filter(|m| *m > 0)
                        .is_none_or(|m| m >= need_mib),
                }
            })
            .collect()
    }

    pub fn report(&self) -> Vec<HostReport> {
        self.all()
            .iter()
            .map(|host| {
                let registered = host.registered.load(Ordering::Relaxed);
                let seen = host.seen();
                let status = seen.status.as_ref();
                HostReport {
                    name: host.spec.name.clone(),
                    socket: host.spec.endpoint.to_string(),
                    up: (!seen.polled || seen.up) && registered,
                    local: host.local,
                    registered,
                    error: seen.error.clone(),
                    listen: status.map(|s| s.listen.clone()),
                    children_running: status.map_or(0, |s| s.children_running),
                    inflight: host.inflight.load(Ordering::Relaxed),
                    seeds: status.map_or(0, |s| s.seeds.len()),
                    replicas: status.map_or(0, |s| s.replicas.len()),
                    cpus: status.map(|s| s.cpus),
                    memory_available_mib: status.map(|s| s.memory_available_mib),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_specs_parse() {
        let h: HostSpec = "h0=/run/mitosis/mitosisd.sock".parse().unwrap();
        assert_eq!(h.name, "h0");
        assert_eq!(
            h.endpoint,
            Endpoint::Unix("/run/mitosis/mitosisd.sock".into())
        );
        let h: HostSpec = "h1=tcp://10.0.0.2:7071".parse().unwrap();
        assert_eq!(h.endpoint, Endpoint::Tcp("10.0.0.2:7071".parse().unwrap()));
        assert!("h0=".parse::<HostSpec>().is_err());
        assert!("h0=tcp://name:1".parse::<HostSpec>().is_err());
        assert!("h0".parse::<HostSpec>().is_err());
        assert!("=/x".parse::<HostSpec>().is_err());
    }
}
