//! One seed per function for the whole cluster.
//!
//! A function's seed is prepared from its bundle when the function is created (in the
//! background; the first call waits for it if it is not ready) on the host the policy picks,
//! and made again, on another host, when its host's daemon is gone or no longer has it.
//! Each function has a lock of its own for making its seed: calls of other functions never
//! wait on it, and calls of the function wait only while there is no seed to fork from.
//!
//! Seeds are recorded in the store. With a shared one (etcd) that makes one seed per function
//! for the whole cluster: an instance without a usable seed first takes the recorded one,
//! and only makes one after claiming the making (one instance at a time; a dead instance's
//! claim expires); the others wait for its record. A seed's record goes with its host's
//! lease, so a dead host's seeds are made again elsewhere by whoever needs them next.
//!
//! The local-fork policy keeps a seed of the function on every host instead: those are this
//! instance's own (not recorded), one slot per (function, host).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mitosis_client::ErrorKind;
use mitosis_descriptor::Handle;

use crate::error::{CallError, StoreError};
use crate::etcd::CLAIM_POLL;
use crate::hosts::Hosts;
use crate::metrics::Metrics;
use crate::model::Func;
use crate::policy::Policy;
use crate::store::{SeedRecord, Store};

/// How long a seed's host may take to appear in the shared store before the seed is kept
/// by this instance alone (its first registration follows its first poll).
const RECORD_WAIT: Duration = Duration::from_secs(3);

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

/// A function's id, and the host of a seed of that host alone (local fork) or none (the
/// function's one seed for the cluster).
type SlotKey = (String, Option<usize>);

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
    store: Store,
    hosts: Arc<Hosts>,
    policy: Arc<dyn Policy>,
    ready_timeout: Duration,
    slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
    metrics: Metrics,
    /// Prime every other host with a replica of each new seed (see [`Seeds::set_priming`]).
    priming: std::sync::atomic::AtomicBool,
}

impl Seeds {
    pub fn new(
        store: Store,
        hosts: Arc<Hosts>,
        policy: Arc<dyn Policy>,
        ready_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Seeds {
            store,
            metrics,
            hosts,
            policy,
            ready_timeout,
            slots: Mutex::default(),
            priming: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn slot(&self, key: SlotKey) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone()
    }

    /// The function's seed (for the whole cluster), if one is ready.
    pub fn current(&self, fn_id: &str) -> Option<Seed> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .get(&(fn_id.to_owned(), None))
            .and_then(|s| s.current().clone())
    }

    /// The hosts where the function has a seed of their own ready (local fork).
    pub fn local_hosts(&self, fn_id: &str) -> Vec<usize> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .filter(|((id, host), slot)| id == fn_id && host.is_some() && slot.current().is_some())
            .filter_map(|((_, host), _)| *host)
            .collect()
    }

    /// The function's own seed on `host` (local fork): made there if it has none.
    pub async fn get_on(&self, f: &Func, host: usize) -> Result<Seed, CallError> {
        self.get_local(f, host, None).await
    }

    /// Like [`Seeds::get_on`], but `lost` is not good enough.
    pub async fn replace_on(&self, f: &Func, lost: &Seed) -> Result<Seed, CallError> {
        self.get_local(f, lost.host, Some(lost)).await
    }

    async fn get_local(
        &self,
        f: &Func,
        host: usize,
        lost: Option<&Seed>,
    ) -> Result<Seed, CallError> {
        let slot = self.slot((f.id.clone(), Some(host)));
        if let Some(seed) = self.usable(&slot, f, lost) {
            return Ok(seed);
        }
        let _making = slot.making.lock().await;
        if let Some(seed) = self.usable(&slot, f, lost) {
            return Ok(seed);
        }
        if let Some(old) = slot.current().take() {
            self.metrics.seeds_replaced.inc();
            self.drop_in_background(old);
        }
        let seed = self.prepare_on(f, host).await.map_err(|(e, _)| e)?;
        *slot.current() = Some(seed.clone());
        Ok(seed)
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
        let slot = self.slot((f.id.clone(), None));
        if let Some(seed) = self.usable(&slot, f, lost) {
            return Ok(seed);
        }
        let _making = slot.making.lock().await;
        // Made by another call while this one waited?
        if let Some(seed) = self.usable(&slot, f, lost) {
            return Ok(seed);
        }
        let deadline = Instant::now() + self.ready_timeout + Duration::from_secs(30);
        loop {
            // The recorded seed: another instance's, or this one's before a restart.
            let recorded = self.store.seed(f.id.clone()).await?;
            let known = recorded.as_ref().map(|r| self.of_record(r));
            if let Some(Some(seed)) = &known {
                if self.is_usable(seed, f, lost) {
                    tracing::debug!(function = %f.id, ?seed, "using the recorded seed");
                    *slot.current() = Some(seed.clone());
                    return Ok(seed.clone());
                }
            }
            // A record on a host not found here yet: its host has an entry (the record is
            // under its lease), so the next look at the registered hosts finds it.
            let unknown_host = matches!(known, Some(None));
            if !unknown_host && self.store.claim_seed(&f.id).await? {
                let made = self.make_and_record(f, lost, recorded, &slot).await;
                if let Err(e) = self.store.release_seed(&f.id).await {
                    // It expires with this instance's lease.
                    tracing::warn!(function = %f.id, "releasing the claim on its seed: {e}");
                }
                return made;
            }
            if Instant::now() > deadline {
                return Err(CallError::Seed(
                    "another platform instance is making the seed, and it is not ready yet".into(),
                ));
            }
            tokio::time::sleep(CLAIM_POLL).await;
        }
    }

    /// Makes a new seed in place of this instance's and the recorded one (dropped: they are
    /// unusable), and records it. Called with the claim held.
    async fn make_and_record(
        &self,
        f: &Func,
        lost: Option<&Seed>,
        recorded: Option<SeedRecord>,
        slot: &Slot,
    ) -> Result<Seed, CallError> {
        let mut old: Vec<Seed> = slot.current().take().into_iter().collect();
        if let Some(r) = recorded.as_ref().and_then(|r| self.of_record(r)) {
            if !old.contains(&r) {
                old.push(r);
            }
        }
        let avoid = lost
            .or(old.first())
            .map(|s| s.host)
            .filter(|h| lost.is_some() || !self.hosts.get(*h).is_up());
        if !old.is_empty() || recorded.is_some() {
            tracing::info!(function = %f.id, ?old, "replacing the seed");
            self.metrics.seeds_replaced.inc();
        }
        for seed in old {
            self.drop_in_background(seed);
        }
        let seed = self.make(f, avoid).await?;
        self.record(f, &seed).await?;
        *slot.current() = Some(seed.clone());
        if self.priming.load(std::sync::atomic::Ordering::Relaxed) {
            prime(self.hosts.clone(), seed.clone());
        }
        Ok(seed)
    }

    /// Whether each new seed (one for the cluster) has every other host that is up build its
    /// replica at once, in the background, so that no call pays for building one: the
    /// platform's autoscaling of remote fork, at the cost of a replica's memory per host.
    pub fn set_priming(&self, on: bool) {
        self.priming.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records `seed` in the store. Its host may not be registered yet (its first poll is
    /// on its way): waits a little, then keeps the seed for this instance alone.
    async fn record(&self, f: &Func, seed: &Seed) -> Result<(), CallError> {
        let record = SeedRecord {
            fn_id: f.id.clone(),
            host: self.hosts.get(seed.host).spec.name.clone(),
            handle: seed.handle.clone(),
            image: seed.image.clone(),
            seed_id: seed.seed_id,
            seed_addr: seed.seed_addr.clone(),
        };
        let t0 = Instant::now();
        loop {
            match self.store.put_seed(record.clone()).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    self.drop_in_background(seed.clone());
                    return Err(CallError::Seed("the function was deleted".into()));
                }
                Err(StoreError::Unregistered(_)) if t0.elapsed() < RECORD_WAIT => {
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                Err(e) => {
                    tracing::warn!(function = %f.id, "recording its seed (kept here only): {e}");
                    return Ok(());
                }
            }
        }
    }

    /// The seed of a record, if its host is known here.
    fn of_record(&self, r: &SeedRecord) -> Option<Seed> {
        Some(Seed {
            host: self.hosts.index_of(&r.host)?,
            handle: r.handle.clone(),
            image: r.image.clone(),
            seed_id: r.seed_id,
            seed_addr: r.seed_addr.clone(),
        })
    }

    fn usable(&self, slot: &Slot, f: &Func, lost: Option<&Seed>) -> Option<Seed> {
        let current = slot.current();
        let seed = current.as_ref()?;
        self.is_usable(seed, f, lost).then(|| seed.clone())
    }

    fn is_usable(&self, seed: &Seed, f: &Func, lost: Option<&Seed>) -> bool {
        seed.image == f.image && Some(seed) != lost && self.hosts.get(seed.host).is_up()
    }

    /// Prepares `f`'s bundle on the host the policy picks; a host whose daemon fails is
    /// skipped for the next, a bundle the daemon refuses fails at once.
    async fn make(&self, f: &Func, avoid: Option<usize>) -> Result<Seed, CallError> {
        let mut excluded: Vec<usize> = avoid.into_iter().collect();
        let mut avoided_once = avoid.is_none();
        let mut last_error = None;
        loop {
            let views = self.hosts.views(None, f.memory, &excluded);
            let Some(host) = self.policy.seed_host(&views) else {
                // The host to avoid is better than none: its daemon may be back.
                if !avoided_once {
                    avoided_once = true;
                    excluded.retain(|h| Some(*h) != avoid);
                    continue;
                }
                // No host failed it: none could take it (down, or no room).
                return Err(match last_error {
                    Some(why) => CallError::Seed(why),
                    None => crate::no_host(&views, f),
                });
            };
            match self.prepare_on(f, host).await {
                Ok(seed) => return Ok(seed),
                Err((e, false)) => return Err(e),
                Err((e, true)) => {
                    last_error = Some(e.to_string());
                    excluded.push(host);
                }
            }
        }
    }

    /// Prepares `f`'s bundle on `host`. On failure, whether the host is at fault (its daemon
    /// failed, not the bundle).
    async fn prepare_on(&self, f: &Func, host: usize) -> Result<Seed, (CallError, bool)> {
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
                    .map_err(|e| (CallError::Seed(format!("the daemon's handle: {e}")), false))?;
                let seed = Seed {
                    host,
                    handle,
                    image: f.image.clone(),
                    seed_id: parsed.seed_id,
                    seed_addr: parsed.host.to_string(),
                };
                tracing::info!(function = %f.id, host = %name, ?seed, elapsed = ?t0.elapsed(), "seed ready");
                self.metrics.seeds_made.inc();
                Ok(seed)
            }
            Err(err) => {
                let host_at_fault =
                    err.kind().is_none() || matches!(err.kind(), Some(ErrorKind::Unavailable));
                if !host_at_fault {
                    return Err((CallError::Seed(format!("{}: {err}", f.image)), false));
                }
                tracing::warn!(host = %name, "preparing {}: {err}", f.image);
                if err.kind().is_none() {
                    self.hosts.mark_down(host, &err.to_string());
                }
                Err((CallError::Seed(format!("host {name}: {err}")), true))
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

    /// Starts making `f`'s seed on every host that is up (local fork).
    pub fn prepare_everywhere_in_background(self: &Arc<Self>, f: Func) {
        for view in self.hosts.views(None, f.memory, &[]) {
            if !view.up {
                continue;
            }
            let (seeds, f) = (self.clone(), f.clone());
            tokio::spawn(async move {
                if let Err(e) = seeds.get_on(&f, view.index).await {
                    tracing::warn!(function = %f.id, host = view.index, "local seed: {e}");
                }
            });
        }
    }

    /// Forgets the function's seeds (its record too) and drops them on their hosts.
    pub async fn remove(&self, fn_id: &str) {
        let removed: Vec<Arc<Slot>> = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let keys: Vec<SlotKey> = slots
                .keys()
                .filter(|(id, _)| id == fn_id)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| slots.remove(k)).collect()
        };
        let mut seeds = Vec::new();
        for slot in &removed {
            // Wait for a seed being made, so it is not left behind.
            let _making = slot.making.lock().await;
            seeds.extend(slot.current().take());
        }
        match self.store.take_seed(fn_id.to_owned()).await {
            Ok(Some(r)) => seeds.extend(self.of_record(&r).filter(|s| !seeds.contains(s))),
            Ok(None) => {}
            Err(e) => tracing::warn!(function = %fn_id, "forgetting its seed's record: {e}"),
        }
        for seed in seeds {
            self.drop_seed(seed).await;
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
        let mut ids: Vec<String> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids.dedup();
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

/// How long priming one host may take (building a replica is milliseconds; a host that
/// takes longer is busy, and its first call builds it instead).
const PRIME_TIMEOUT: Duration = Duration::from_secs(30);

/// Has every up host other than `seed`'s build its replica, each on a task of its own.
fn prime(hosts: Arc<Hosts>, seed: Seed) {
    for view in hosts.views(Some(&seed), 0, &[]) {
        if !view.up || view.has_seed || view.has_replica {
            continue;
        }
        let (hosts, seed) = (hosts.clone(), seed.clone());
        tokio::spawn(async move {
            let primed = hosts
                .reach(view.index)
                .replicate(&seed.handle, PRIME_TIMEOUT)
                .await;
            match primed {
                Ok(()) => tracing::debug!(host = view.index, ?seed, "primed"),
                Err(e) => tracing::info!(host = view.index, ?seed, "priming: {e}"),
            }
        });
    }
}
