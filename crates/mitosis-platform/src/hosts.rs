//! The cluster's hosts: each a daemon's control endpoint (its unix socket, or its TCP
//! listener with mutual TLS), what its last status said, and the calls this platform has
//! running there.
//!
//! Each host is polled by a task of its own (with a timeout), so a host that hangs delays
//! only its own view. A host whose daemon fails a poll
//! or a call is down until a poll succeeds again.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mitosis_client::{DaemonStatus, Endpoint, Remote};

use crate::daemon::Reach;

use crate::policy::HostView;
use crate::seeds::Seed;

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
}

impl Host {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Only plain assignments happen under the lock: a poisoned one is still whole.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_up(&self) -> bool {
        let seen = self.seen();
        !seen.polled || seen.up
    }
}

/// Counts a call as running on its host while it lives.
pub struct InFlight(Arc<Hosts>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.hosts[self.1]
            .inflight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// One line per host for people: `name socket up|down children N seeds N replicas N`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostReport {
    pub name: String,
    pub socket: String,
    pub up: bool,
    pub error: Option<String>,
    pub listen: Option<String>,
    pub children_running: u64,
    pub inflight: u64,
    pub seeds: usize,
    pub replicas: usize,
}

pub struct Hosts {
    hosts: Vec<Host>,
    /// How TCP endpoints are reached (none: only unix sockets work).
    remote: Option<Remote>,
}

impl Hosts {
    pub fn new(specs: Vec<HostSpec>, remote: Option<Remote>) -> Arc<Hosts> {
        Arc::new(Hosts {
            remote,
            hosts: specs
                .into_iter()
                .map(|spec| Host {
                    spec,
                    seen: Mutex::default(),
                    inflight: AtomicU64::new(0),
                })
                .collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn get(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// How to reach host `index`'s daemon.
    pub fn reach(&self, index: usize) -> Reach<'_> {
        Reach {
            endpoint: &self.hosts[index].spec.endpoint,
            remote: self.remote.as_ref(),
        }
    }

    /// How TCP endpoints are reached.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// Polls every host every `interval`, each on a task of its own.
    pub fn start_polling(self: Arc<Self>, interval: Duration) {
        for index in 0..self.hosts.len() {
            let hosts = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    hosts.poll(index).await;
                }
            });
        }
    }

    /// Asks host `index` for its status and records what came back.
    pub async fn poll(&self, index: usize) {
        let inflight_at_poll = self.hosts[index].inflight.load(Ordering::Relaxed);
        let result = self
            .reach(index)
            .status(STATUS_TIMEOUT)
            .await
            .map_err(|e| e.to_string());
        let host = &self.hosts[index];
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
        let host = &self.hosts[index];
        let mut seen = host.seen();
        if !seen.polled || seen.up {
            tracing::warn!(host = %host.spec.name, "host is down: {why}");
        }
        seen.polled = true;
        seen.up = false;
        seen.error = Some(why.to_owned());
    }

    /// Counts a call on host `index` until the guard drops.
    pub fn start_call(self: &Arc<Self>, index: usize) -> InFlight {
        self.hosts[index].inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone(), index)
    }

    /// The hosts as the policy sees them, for `seed` (which hosts have its replica) or for a
    /// new seed; `excluded` hosts count as down.
    pub fn views(&self, seed: Option<&Seed>, excluded: &[usize]) -> Vec<HostView> {
        self.hosts
            .iter()
            .enumerate()
            .map(|(index, host)| {
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
                    up: (!seen.polled || seen.up) && !excluded.contains(&index),
                    // Children of others (the poll's count less this platform's calls
                    // then) and this platform's calls now: the poll is older than the calls.
                    running: status.map_or(0, |s| {
                        s.children_running.saturating_sub(seen.inflight_at_poll)
                    }) + inflight,
                    inflight,
                    seeds: status.map_or(0, |s| s.seeds.len()),
                    has_seed: seed.is_some_and(|seed| seed.host == index),
                    has_replica,
                }
            })
            .collect()
    }

    pub fn report(&self) -> Vec<HostReport> {
        self.hosts
            .iter()
            .map(|host| {
                let seen = host.seen();
                let status = seen.status.as_ref();
                HostReport {
                    name: host.spec.name.clone(),
                    socket: host.spec.endpoint.to_string(),
                    up: !seen.polled || seen.up,
                    error: seen.error.clone(),
                    listen: status.map(|s| s.listen.clone()),
                    children_running: status.map_or(0, |s| s.children_running),
                    inflight: host.inflight.load(Ordering::Relaxed),
                    seeds: status.map_or(0, |s| s.seeds.len()),
                    replicas: status.map_or(0, |s| s.replicas.len()),
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
        assert!("h0".parse::<HostSpec>().is_err());
        assert!("=/x".parse::<HostSpec>().is_err());
        assert!("h0=".parse::<HostSpec>().is_err());
        assert!("h0=tcp://name:1".parse::<HostSpec>().is_err());
    }
}
