//! The cluster's state: apps, functions, and each function's seed (its handle and host).
//!
//! Two backends with the same semantics: SQLite ([`sqlite`]) when the platform runs as one
//! instance (nothing to install), etcd ([`crate::etcd`]) when several instances share the
//! cluster (and workflows: a workflow's name is unique too). Names are unique (an app's; a
//! function's or a trigger's within its app, and a trigger's route too), deleting an app
//! deletes its functions and deleting a function its triggers, and every record is its JSON. Only etcd is *shared*: it also holds the hosts
//! (under leases) and the claims on making a seed, so that one seed per function serves the
//! whole cluster whichever instance takes the call.

pub mod sqlite;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::etcd::{EtcdOptions, EtcdStore};
use crate::model::{App, Func};
use crate::trigger::Trigger;
use crate::workflow::Workflow;
pub use sqlite::SqliteStore;

/// What an insert can run into besides the store failing.
#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    Done,
    /// The name is taken (in its app, for a function).
    NameTaken,
    /// A function's app does not exist.
    NoApp,
}

/// What writing a trigger can run into besides the store failing.
#[derive(Debug, PartialEq, Eq)]
pub enum TriggerWrite {
    Done,
    /// Its app has a trigger of that name.
    NameTaken,
    /// Its app has a trigger of that type and source.
    SourceTaken,
    /// Its function is not in its app (or gone; for an update, the trigger is).
    NoFn,
}

/// A function's seed as the store keeps it: enough for any instance to fork from it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRecord {
    pub fn_id: String,
    /// The name of the host that serves it.
    pub host: String,
    /// A secret: never logged (the `Debug` below leaves it out).
    pub handle: String,
    pub image: String,
    pub seed_id: u64,
    pub seed_addr: String,
}

impl std::fmt::Debug for SeedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SeedRecord({} on {}: {}/{})",
            self.fn_id, self.host, self.seed_addr, self.seed_id
        )
    }
}

/// A host as registered in a shared store: its daemon's endpoint and its last load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// How to reach its daemon's control protocol (today a unix socket's path).
    pub endpoint: String,
    /// Its page server's address.
    pub listen: String,
    pub children_running: u64,
    /// Ids of the seeds it serves, and how many replicas of others' seeds it holds.
    pub seeds: Vec<u64>,
    pub replicas: usize,
    /// The platform instance that polls it and keeps its lease.
    pub registered_by: String,
}

/// Which store to open.
#[derive(Debug, Clone)]
pub enum StoreSpec {
    Memory,
    Sqlite(PathBuf),
    Etcd(EtcdOptions),
}

#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Etcd(EtcdStore),
}

impl Store {
    /// The SQLite store in the file at `path` (made if missing).
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(SqliteStore::open(path)?))
    }

    /// A store that lives as long as this process.
    pub fn in_memory() -> Result<Store, StoreError> {
        Ok(Store::Sqlite(SqliteStore::in_memory()?))
    }

    /// Opens `spec`'s store (connects to etcd: inside a tokio runtime).
    pub async fn open_spec(spec: &StoreSpec) -> Result<Store, StoreError> {
        match spec {
            StoreSpec::Memory => Self::in_memory(),
            StoreSpec::Sqlite(path) => Self::open(path),
            StoreSpec::Etcd(options) => Ok(Store::Etcd(EtcdStore::connect(options).await?)),
        }
    }

    /// Whether other platform instances share this store (and so its seeds and hosts).
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Etcd(_))
    }

    /// The shared store, if this is one.
    pub fn etcd(&self) -> Option<&EtcdStore> {
        match self {
            Store::Etcd(e) => Some(e),
            Store::Sqlite(_) => None,
        }
    }
}

/// Each operation on whichever backend.
macro_rules! dispatch {
    ($(pub async fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Store {
            $(pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, StoreError> {
                match self {
                    Store::Sqlite(s) => s.$name($($arg),*).await,
                    Store::Etcd(s) => s.$name($($arg),*).await,
                }
            })*
        }
    };
}

dispatch! {
    pub async fn insert_app(&self, app: App) -> Insert;
    pub async fn update_app(&self, app: App) -> bool;
    pub async fn app(&self, id: String) -> Option<App>;
    pub async fn apps(&self, name: Option<String>) -> Vec<App>;
    pub async fn delete_app(&self, id: String) -> Option<Vec<String>>;
    pub async fn insert_fn(&self, f: Func) -> Insert;
    pub async fn update_fn(&self, f: Func) -> bool;
    pub async fn func(&self, id: String) -> Option<Func>;
    pub async fn fns(&self, app_id: Option<String>, name: Option<String>) -> Vec<Func>;
    pub async fn delete_fn(&self, id: String) -> bool;
    pub async fn seed(&self, fn_id: String) -> Option<SeedRecord>;
    pub async fn put_seed(&self, seed: SeedRecord) -> bool;
    pub async fn take_seed(&self, fn_id: String) -> Option<SeedRecord>;
    pub async fn insert_workflow(&self, wf: Workflow) -> bool;
    pub async fn workflow(&self, id: String) -> Option<Workflow>;
    pub async fn workflows(&self) -> Vec<Workflow>;
    pub async fn delete_workflow(&self, id: String) -> bool;
    pub async fn insert_trigger(&self, t: Trigger) -> TriggerWrite;
    pub async fn update_trigger(&self, t: Trigger) -> TriggerWrite;
    pub async fn trigger(&self, id: String) -> Option<Trigger>;
    pub async fn triggers(&self, q: TriggerQuery) -> Vec<Trigger>;
    pub async fn delete_trigger(&self, id: String) -> bool;
}

/// Which triggers a listing wants: every field given must match.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TriggerQuery {
    pub app_id: Option<String>,
    pub fn_id: Option<String>,
    pub name: Option<String>,
    /// With `kind`, the one trigger at a route.
    pub source: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

impl TriggerQuery {
    pub fn matches(&self, t: &Trigger) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.app_id, &t.app_id)
            && is(&self.fn_id, &t.fn_id)
            && is(&self.name, &t.name)
            && is(&self.source, &t.source)
            && is(&self.kind, &t.kind)
    }
}

impl Store {
    /// Claims the making of `fn_id`'s seed for this instance: true if no other instance is
    /// making it. One instance has nobody to share with.
    pub async fn claim_seed(&self, fn_id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(true),
            Store::Etcd(e) => e.claim_seed(fn_id).await,
        }
    }

    /// Gives the claim up (the seed is recorded, or making it failed).
    pub async fn release_seed(&self, fn_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Etcd(e) => e.release_seed(fn_id).await,
        }
    }
}
