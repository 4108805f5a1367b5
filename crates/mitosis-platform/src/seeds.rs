//! One seed per function for the whole cluster.
//!
//! A function's seed is prepared from its bundle when the function is created (in the
//! background; the first call waits for it if it is not ready) on the host the policy picks,
//! and made again, on another host, when its host's daemon is gone or no longer has it.
//! Each function has a lock of its own for making its seed: calls of other functions never
//! wait on it, and calls of the function wait only while there is no seed to fork from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mitosis_client::ErrorKind;
use mitosis_descriptor::Handle;

use crate::error::CallError;
use crate::hosts::Hosts;
use crate::metrics::Metrics;
use crate::model::Func;
use crate::policy::Policy;

/// A function's seed.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed {
    /// The host that serves it.
    pub host: usize,
    /// Its handle (a secret: never logged).
    pub handle: String,
    /// The bundle it was made from (a changed image makes a new seed).
    pub image: String,
    /// Its id and its host's page-server address, as daemons list its replicas.
    pub seed_id: u64,
    pub seed_addr: String,
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Seed({}/{} on host {})",
            self.seed_addr, self.seed_id, self.host
        )
    }
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Seed>>,
    /// Held while the seed is made, so one function's calls make it once.
    making: tokio::sync::Mutex<()>,
}

impl Slot {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Seed>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Seeds {
    hosts: Arc<Hosts>,
    policy: Arc<dyn Policy>,
    ready_timeout: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    metrics: Metrics,
}

impl Seeds {
    pub fn new(
        hosts: Arc<Hosts>,
        policy: Arc<dyn Policy>,
        ready_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Seeds {
            metrics,
            hosts,
            policy,
            ready_timeout,
            slots: Mutex::default(),
        }
    }

    fn slot(&self, fn_id: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(fn_id.to_owned())
            .or_default()
            .clone()
    }

    /// The function's seed, if one is ready.
    pub fn current(&self, fn_id: &str) -> Option<Seed> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.get(fn_id).and_then(|s| s.current().clone())
    }

    /// The function's seed: the one it has if its host is up and it is of the function's
    /// image, else a new one.
    pub async fn get(&self, f: &Func) -> Result<Seed, CallError> {
        self.get_replacing(f, None).await
    }

    /// Like [`Seeds::get`], but `lost` (a seed a daemon said is gone) is not good enough.
    pub async fn replace(&self, f: &Func, lost: &Seed) -> Result<Seed, CallError> {
        self.get_replacing(f, Some(lost)).await
    }

    async fn get_replacing(&self, f: &Func, lost: Option<&Seed>) -> Result<Seed, CallError> {
        let slot = self.slot(&f.id);
        if let Some(seed) = self.usable(&slot, f, lost) {
            return Ok(seed);
        }
        let _making = slot.making.lock().await;
        // Made by another call while this one waited?
        if let Some(seed) = self.usable(&slot, f, lost) {
            return Ok(seed);
        }
        let old = slot.current().take();
        if let Some(old) = old {
            tracing::info!(function = %f.id, ?old, "replacing the seed");
            self.metrics.seeds_replaced.inc();
            self.drop_in_background(old);
        }
        let seed = self.make(f, lost.map(|s| s.host)).await?;
        *slot.current() = Some(seed.clone());
        Ok(seed)
    }

    fn usable(&self, slot: &Slot, f: &Func, lost: Option<&Seed>) -> Option<Seed> {
        let current = slot.current();
        let seed = current.as_ref()?;
        (seed.image == f.image && Some(seed) != lost && self.hosts.get(seed.host).is_up())
            .then(|| seed.clone())
    }

    /// Prepares `f`'s bundle on the host the policy picks; a host whose daemon fails is
    /// skipped for the next, a bundle the daemon refuses fails at once.
    async fn make(&self, f: &Func, avoid: Option<usize>) -> Result<Seed, CallError> {
        let mut excluded: Vec<usize> = avoid.into_iter().collect();
        let mut avoided_once = avoid.is_none();
        let mut last_error = String::from("no host is up");
        loop {
            let views = self.hosts.views(None, &excluded);
            let Some(host) = self.policy.seed_host(&views) else {
                // The host to avoid is better than none: its daemon may be back.
                if !avoided_once {
                    avoided_once = true;
                    excluded.retain(|h| Some(*h) != avoid);
                    continue;
                }
                return Err(CallError::Seed(last_error));
            };
            let name = self.hosts.get(host).spec.name.clone();
            let t0 = Instant::now();
            let prepared = self
                .hosts
                .reach(host)
                .prepare_bundle(&f.image, self.ready_timeout)
                .await;
            match prepared {
                Ok((handle, _stats)) => {
                    let parsed: Handle = handle
                        .parse()
                        .map_err(|e| CallError::Seed(format!("the daemon's handle: {e}")))?;
                    let seed = Seed {
                        host,
                        handle,
                        image: f.image.clone(),
                        seed_id: parsed.seed_id,
                        seed_addr: parsed.host.to_string(),
                    };
                    tracing::info!(function = %f.id, host = %name, ?seed, elapsed = ?t0.elapsed(), "seed ready");
                    self.metrics.seeds_made.inc();
                    return Ok(seed);
                }
                Err(err) => {
                    let host_at_fault =
                        err.kind().is_none() || matches!(err.kind(), Some(ErrorKind::Unavailable));
                    if !host_at_fault {
                        return Err(CallError::Seed(format!("{}: {err}", f.image)));
                    }
                    tracing::warn!(host = %name, "preparing {}: {err}", f.image);
                    if err.kind().is_none() {
                        self.hosts.mark_down(host, &err.to_string());
                    }
                    last_error = format!("host {name}: {err}");
                    excluded.push(host);
                }
            }
        }
    }

    /// Starts making `f`'s seed now, so that its first call finds it ready.
    pub fn prepare_in_background(self: &Arc<Self>, f: Func) {
        let seeds = self.clone();
        tokio::spawn(async move {
            if let Err(e) = seeds.get(&f).await {
                tracing::warn!(function = %f.id, "seed: {e}");
            }
        });
    }

    /// Forgets the function's seed and drops it on its host.
    pub async fn remove(&self, fn_id: &str) {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(fn_id);
        if let Some(slot) = slot {
            // Wait for a seed being made, so it is not left behind.
            let _making = slot.making.lock().await;
            let seed = slot.current().take();
            if let Some(seed) = seed {
                self.drop_seed(seed).await;
            }
        }
    }

    fn drop_in_background(&self, seed: Seed) {
        let hosts = self.hosts.clone();
        tokio::spawn(async move { drop_on_host(&hosts, &seed).await });
    }

    async fn drop_seed(&self, seed: Seed) {
        drop_on_host(&self.hosts, &seed).await;
    }

    /// Drops every seed (on shutdown).
    pub async fn drop_all(&self) {
        let ids: Vec<String> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.remove(&id).await;
        }
    }
}

async fn drop_on_host(hosts: &Hosts, seed: &Seed) {
    if let Err(e) = hosts.reach(seed.host).drop_seed(&seed.handle).await {
        // Its host is gone, or already lost it: nothing is left to drop.
        tracing::debug!(?seed, "dropping a seed: {e}");
    }
}
