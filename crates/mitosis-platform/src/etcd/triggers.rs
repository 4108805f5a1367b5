//! Triggers in etcd: `P/triggers/{id}` (the record), `P/trigger-names/{app_id}/{name}` and
//! `P/trigger-routes/{app_id}/{type}{source}` (its id: the name's and the route's uniqueness
//! in the app), all written in one transaction that also checks the function is still there.
//! A function's triggers are deleted after it (`delete_triggers_of`): until then a call on one
//! finds no function (404).

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::{EtcdStore, TXN_ATTEMPTS, bounded, decode};
use crate::error::StoreError;
use crate::model::Func;
use crate::store::{TriggerQuery, TriggerWrite};
use crate::trigger::Trigger;

impl EtcdStore {
    fn trigger_key(&self, id: &str) -> String {
        self.key(&["triggers", id])
    }

    fn trigger_name_key(&self, t: &Trigger) -> String {
        self.key(&["trigger-names", &t.app_id, &t.name])
    }

    fn trigger_route_key(&self, t: &Trigger) -> String {
        // The source starts with '/': it is the key's last part and its own separator.
        format!(
            "{}{}",
            self.key(&["trigger-routes", &t.app_id, &t.kind]),
            t.source
        )
    }

    /// Adds a trigger, if its function is in its app and its name and route are free there.
    pub async fn insert_trigger(&self, t: Trigger) -> Result<TriggerWrite, StoreError> {
        let fn_key = self.key(&["fns", &t.fn_id]);
        let got = bounded("get", self.client().get(fn_key.clone(), None)).await?;
        let Some(fn_kv) = got.kvs().first() else {
            return Ok(TriggerWrite::NoFn);
        };
        if decode::<Func>(fn_kv.value())?.app_id != t.app_id {
            return Ok(TriggerWrite::NoFn);
        }
        let (name, route) = (self.trigger_name_key(&t), self.trigger_route_key(&t));
        let count = Some(GetOptions::new().with_count_only());
        let txn = Txn::new()
            .when([
                Compare::mod_revision(fn_key.clone(), CompareOp::Equal, fn_kv.mod_revision()),
                Compare::create_revision(name.clone(), CompareOp::Equal, 0),
                Compare::create_revision(route.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(self.trigger_key(&t.id), serde_json::to_vec(&t)?, None),
                TxnOp::put(name.clone(), t.id.clone(), None),
                TxnOp::put(route, t.id.clone(), None),
            ])
            // Which compare failed: the function's and the name's presence say.
            .or_else([TxnOp::get(fn_key, count.clone()), TxnOp::get(name, count)]);
        let done = self.txn(txn).await?;
        if done.succeeded() {
            return Ok(TriggerWrite::Done);
        }
        let counts: Vec<i64> = done
            .op_responses()
            .iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.count(),
                _ => 0,
            })
            .collect();
        Ok(match counts[..] {
            [0, _] => TriggerWrite::NoFn,
            [_, n] if n > 0 => TriggerWrite::NameTaken,
            _ => TriggerWrite::SourceTaken,
        })
    }

    /// Rewrites a trigger, moving its route if the source changed and the new one is free.
    pub async fn update_trigger(&self, t: Trigger) -> Result<TriggerWrite, StoreError> {
        let key = self.trigger_key(&t.id);
        for _ in 0..TXN_ATTEMPTS {
            let got = bounded("get", self.client().get(key.clone(), None)).await?;
            let Some(kv) = got.kvs().first() else {
                return Ok(TriggerWrite::NoFn);
            };
            let old: Trigger = decode(kv.value())?;
            let unchanged = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
            let put = TxnOp::put(key.clone(), serde_json::to_vec(&t)?, None);
            let (old_route, new_route) = (self.trigger_route_key(&old), self.trigger_route_key(&t));
            let txn = if old_route == new_route {
                Txn::new().when([unchanged]).and_then([put])
            } else {
                Txn::new()
                    .when([
                        unchanged,
                        Compare::create_revision(new_route.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        put,
                        TxnOp::delete(old_route, None),
                        TxnOp::put(new_route.clone(), t.id.clone(), None),
                    ])
                    .or_else([TxnOp::get(
                        new_route,
                        Some(GetOptions::new().with_count_only()),
                    )])
            };
            let done = self.txn(txn).await?;
            if done.succeeded() {
                return Ok(TriggerWrite::Done);
            }
            if let Some(TxnOpResponse::Get(g)) = done.op_responses().first()
                && g.count() > 0
            {
                return Ok(TriggerWrite::SourceTaken);
            }
        }
        Err(StoreError::Contended("update_trigger"))
    }

    pub async fn trigger(&self, id: String) -> Result<Option<Trigger>, StoreError> {
        self.get_json(self.trigger_key(&id)).await
    }

    /// Triggers matching `q`, in name order (Fn's), filtered here as functions are.
    pub async fn triggers(&self, q: TriggerQuery) -> Result<Vec<Trigger>, StoreError> {
        let mut all: Vec<Trigger> = self.list("triggers").await?;
        all.retain(|t| q.matches(t));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Deletes a trigger and its name and route, if it did not change since it was read.
    pub async fn delete_trigger(&self, id: String) -> Result<bool, StoreError> {
        self.delete_indexed(self.trigger_key(&id), "delete_trigger", |t: &Trigger| {
            vec![self.trigger_name_key(t), self.trigger_route_key(t)]
        })
        .await
    }

    /// Deletes the triggers of functions that are gone.
    pub(super) async fn delete_triggers_of(&self, fn_ids: &[String]) -> Result<(), StoreError> {
        let all: Vec<Trigger> = self.list("triggers").await?;
        for t in all.into_iter().filter(|t| fn_ids.contains(&t.fn_id)) {
            self.delete_trigger(t.id).await?;
        }
        Ok(())
    }
}
