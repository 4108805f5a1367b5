//! The per-host cache: one replica per seed, shared by every child of that seed on this host.
//!
//! Bounded by the pages the replicas have fetched; over the bound, the least recently used
//! replicas are evicted (a replica with children still running lives on until they end, but is
//! never used again). A seed that is dropped takes its replica with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mitosis_descriptor::KEY_LEN;
use mitosis_transport::peer::SeedRef;
use tokio::sync::OnceCell;

use crate::replica::Entry;

/// A seed, named by its host, id and key: a seed id a restarted host gives out again comes
/// with a new key, so it never finds the old seed's replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeedKey {
    pub host: SocketAddr,
    pub id: u64,
    pub key: [u8; KEY_LEN],
}

impl SeedKey {
    pub fn seed_ref(&self) -> SeedRef {
        SeedRef {
            id: self.id,
            key: self.key,
        }
    }
}

type Slot = Arc<OnceCell<Arc<Entry>>>;

pub struct HostCache {
    slots: Mutex<HashMap<SeedKey, Slot>>,
    budget_pages: u64,
}

/// One line of the cache's state, for status and tests.
#[derive(Debug, Clone)]
pub struct CacheLine {
    pub key: SeedKey,
    pub pid: i32,
    pub pages: u64,
    pub children: u64,
}

impl HostCache {
    pub fn new(budget_pages: u64) -> Self {
        HostCache {
            slots: Mutex::new(HashMap::new()),
            budget_pages,
        }
    }

    /// The replica of `key`, built by `build` if there is none. Concurrent callers for the
    /// same seed wait for one build; a failed build leaves nothing behind.
    pub async fn get_or_build<F, Fut, E>(
        &self,
        key: SeedKey,
        build: F,
    ) -> Result<(Arc<Entry>, bool), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, E>>,
    {
        let slot = self
            .slots
            .lock()
            .expect("cache lock")
            .entry(key)
            .or_default()
            .clone();
        let mut built = false;
        let entry = slot
            .get_or_try_init(|| async {
                built = true;
                build().await.map(Arc::new)
            })
            .await?
            .clone();
        *entry.last_used.lock().expect("entry lock") = Instant::now();
        Ok((entry, built))
    }

    /// The replica of `key`, if this host has one ready.
    pub fn get(&self, key: SeedKey) -> Option<Arc<Entry>> {
        let slot = self.slots.lock().expect("cache lock").get(&key)?.clone();
        let entry = slot.get()?.clone();
        *entry.last_used.lock().expect("entry lock") = Instant::now();
        Some(entry)
    }

    /// Forgets the replica of `key` (its process ends with its last child).
    pub fn remove(&self, key: SeedKey) -> bool {
        self.slots
            .lock()
            .expect("cache lock")
            .remove(&key)
            .is_some()
    }

    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.slots
            .lock()
            .expect("cache lock")
            .values()
            .filter_map(|s| s.get().cloned())
            .collect()
    }

    pub fn keys(&self) -> Vec<SeedKey> {
        self.entries().iter().map(|e| e.key).collect()
    }

    /// Whether `key`'s replica is still this cache's (not evicted, its seed not dropped).
    pub fn holds(&self, key: SeedKey) -> bool {
        self.slots.lock().expect("cache lock").contains_key(&key)
    }

    /// Pages the replicas may still take in before the cache is over its budget.
    pub fn room_pages(&self) -> u64 {
        let held: u64 = self.entries().iter().map(|e| e.pages()).sum();
        self.budget_pages.saturating_sub(held)
    }

    /// Evicts least recently used replicas, never `keep`, until the cache is within budget.
    pub fn evict_over_budget(&self, keep: SeedKey) -> Vec<SeedKey> {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.pages()).sum();
        entries.sort_by_key(|e| *e.last_used.lock().expect("entry lock"));
        let mut evicted = Vec::new();
        for entry in entries {
            if total <= self.budget_pages {
                break;
            }
            if entry.key == keep {
                continue;
            }
            total -= entry.pages();
            self.remove(entry.key);
            tracing::info!(seed = entry.key.id, host = %entry.key.host, "replica evicted");
            evicted.push(entry.key);
        }
        evicted
    }

    pub fn lines(&self) -> Vec<CacheLine> {
        let mut lines: Vec<CacheLine> = self
            .entries()
            .iter()
            .map(|e| CacheLine {
                key: e.key,
                pid: e.pid,
                pages: e.pages(),
                children: e.children.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        lines.sort_by_key(|l| l.key);
        lines
    }
}
