//! What only a shared store has: hosts under leases, seeds attached to their host's lease,
//! and claims on making a seed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{EtcdStore, INSTANCE_REFRESH, INSTANCE_TTL, OP_TIMEOUT, bounded, decode};
use crate::error::StoreError;
use crate::store::{HostRecord, SeedRecord};

/// A host's lease: its entry and its seeds go this long after its last refresh.
pub const HOST_TTL: i64 = 3;

/// The leases of the hosts this instance registers, each behind a lock of its own so that one
/// host's slow refresh does not hold another's.
pub(super) type HostLeases = HashMap<String, Arc<tokio::sync::Mutex<Option<HostLease>>>>;

pub(super) struct HostLease {
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl HostLease {
    /// Refreshes the lease; false if it expired (or etcd did not say in time).
    async fn refresh(&mut self) -> bool {
        let asked = async {
            self.keeper.keep_alive().await?;
            self.stream.message().await
        };
        matches!(
            tokio::time::timeout(OP_TIMEOUT, asked).await,
            Ok(Ok(Some(r))) if r.ttl() > 0
        )
    }
}

/// Whose entry a host has after [`EtcdStore::publish_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// This instance's lease: it refreshes it.
    Mine,
    /// Another instance registered it and keeps it alive.
    Other(String),
}

/// Keeps this instance's lease alive; grants a new one if it ever expired (etcd was out of
/// reach longer than its TTL: the claims made under the old one are gone anyway).
pub(super) async fn keep_instance_lease(client: Client, lease: Arc<AtomicI64>) {
    let mut kept: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)> = None;
    loop {
        tokio::time::sleep(INSTANCE_REFRESH).await;
        let id = lease.load(Ordering::Relaxed);
        if kept.as_ref().is_none_or(|k| k.0 != id) {
            kept = tokio::time::timeout(OP_TIMEOUT, client.clone().lease_keep_alive(id))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|(k, s)| (id, k, s));
        }
        let alive = match kept.as_mut() {
            Some((_, keeper, stream)) => {
                let asked = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(OP_TIMEOUT, asked).await {
                    Ok(Ok(Some(r))) => Some(r.ttl() > 0),
                    // etcd out of reach: try again at the next tick.
                    _ => None,
                }
            }
            None => None,
        };
        match alive {
            Some(true) => {}
            Some(false) => {
                tracing::warn!("the instance's etcd lease expired: taking a new one");
                if let Ok(Ok(g)) =
                    tokio::time::timeout(OP_TIMEOUT, client.clone().lease_grant(INSTANCE_TTL, None))
                        .await
                {
                    lease.store(g.id(), Ordering::Relaxed);
                }
                kept = None;
            }
            None => kept = None,
        }
    }
}

impl EtcdStore {
    fn host_slot(&self, name: &str) -> Arc<tokio::sync::Mutex<Option<HostLease>>> {
        self.inner
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Registers or refreshes `host` (called after each successful poll of its daemon): its
    /// entry under a lease of this instance's, refreshed here, with its current load. A host
    /// another instance registered is left to it.
    pub async fn publish_host(&self, mut host: HostRecord) -> Result<Registered, StoreError> {
        host.registered_by = self.instance().to_owned();
        let key = self.key(&["hosts", &host.name]);
        let json = serde_json::to_vec(&host)?;
        let slot = self.host_slot(&host.name);
        let mut held = slot.lock().await;
        if let Some(lease) = held.as_mut() {
            if lease.refresh().await {
                // Still ours? (An entry gone with an expired lease is made again below.)
                let txn = Txn::new()
                    .when([Compare::lease(key.clone(), CompareOp::Equal, lease.id)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        json.clone(),
                        Some(PutOptions::new().with_lease(lease.id)),
                    )]);
                if self.txn(txn).await?.succeeded() {
                    return Ok(Registered::Mine);
                }
            }
            *held = None;
        }
        if let Some(kv) = bounded("get", self.client().get(key.clone(), None))
            .await?
            .kvs()
            .first()
        {
            let other: HostRecord = decode(kv.value())?;
            return Ok(Registered::Other(other.registered_by));
        }
        let id = bounded("lease", self.client().lease_grant(HOST_TTL, None))
            .await?
            .id();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                json,
                Some(PutOptions::new().with_lease(id)),
            )]);
        if !self.txn(txn).await?.succeeded() {
            let _ = bounded("revoke", self.client().lease_revoke(id)).await;
            return Ok(Registered::Other(String::from("another instance")));
        }
        let (keeper, stream) = bounded("keepalive", self.client().lease_keep_alive(id)).await?;
        *held = Some(HostLease { id, keeper, stream });
        tracing::info!(host = %host.name, "registered the host in etcd");
        Ok(Registered::Mine)
    }

    /// Every registered host.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.list("hosts").await
    }

    pub async fn seed(&self, fn_id: String) -> Result<Option<SeedRecord>, StoreError> {
        self.get_json(self.key(&["seeds", &fn_id])).await
    }

    /// Records `seed` under its host's lease, so that it goes with its host; false if the
    /// function is gone. [`StoreError::Unregistered`] if its host has no entry.
    pub async fn put_seed(&self, seed: SeedRecord) -> Result<bool, StoreError> {
        let host_key = self.key(&["hosts", &seed.host]);
        let fn_key = self.key(&["fns", &seed.fn_id]);
        let got = bounded("get", self.client().get(host_key.clone(), None)).await?;
        let Some(lease) = got.kvs().first().map(|kv| kv.lease()) else {
            return Err(StoreError::Unregistered(seed.host));
        };
        let txn = Txn::new()
            .when([
                Compare::lease(host_key, CompareOp::Equal, lease),
                Compare::version(fn_key.clone(), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(
                self.key(&["seeds", &seed.fn_id]),
                serde_json::to_vec(&seed)?,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(
                fn_key,
                Some(GetOptions::new().with_count_only()),
            )]);
        // A lease that expired between the read and the put fails the put itself.
        let done = match self.txn(txn).await {
            Err(StoreError::Etcd(etcd_client::Error::GRpcStatus(s)))
                if s.message().contains("lease not found") =>
            {
                return Err(StoreError::Unregistered(seed.host));
            }
            r => r?,
        };
        if done.succeeded() {
            return Ok(true);
        }
        match done.op_responses().first() {
            Some(TxnOpResponse::Get(g)) if g.count() > 0 => {
                Err(StoreError::Unregistered(seed.host))
            }
            _ => Ok(false),
        }
    }

    pub async fn take_seed(&self, fn_id: String) -> Result<Option<SeedRecord>, StoreError> {
        let deleted = bounded(
            "delete",
            self.client().delete(
                self.key(&["seeds", &fn_id]),
                Some(DeleteOptions::new().with_prev_key()),
            ),
        )
        .await?;
        deleted
            .prev_kvs()
            .first()
            .map(|kv| decode(kv.value()))
            .transpose()
    }

    /// Claims the making of `fn_id`'s seed: true if no other instance holds the claim. The
    /// claim hangs on this instance's lease, so a dead instance's claim expires.
    pub async fn claim_seed(&self, fn_id: &str) -> Result<bool, StoreError> {
        let key = self.key(&["making", fn_id]);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.instance(),
                Some(PutOptions::new().with_lease(self.instance_lease())),
            )])
            .or_else([TxnOp::get(key, None)]);
        let done = self.txn(txn).await?;
        if done.succeeded() {
            return Ok(true);
        }
        // Already ours (a claim this instance did not release).
        Ok(matches!(
            done.op_responses().first(),
            Some(TxnOpResponse::Get(g))
                if g.kvs().first().is_some_and(|kv| kv.value() == self.instance().as_bytes())
        ))
    }

    pub async fn release_seed(&self, fn_id: &str) -> Result<(), StoreError> {
        let key = self.key(&["making", fn_id]);
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.instance(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await?;
        Ok(())
    }
}

/// How long to wait between looks at a seed another instance is making.
pub const CLAIM_POLL: Duration = Duration::from_millis(200);
