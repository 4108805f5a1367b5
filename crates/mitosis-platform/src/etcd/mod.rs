//! The shared store: the cluster's state in etcd, for several platform instances.
//!
//! Keys live under a prefix (`/mitosis` by default), values are JSON:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `P/apps/{id}` | an app | |
//! | `P/app-names/{name}` | its id: the name's uniqueness | |
//! | `P/fns/{id}` | a function | |
//! | `P/fn-names/{app_id}/{name}` | its id: unique per app | |
//! | `P/triggers/{id}`, `P/trigger-names/{app_id}/{name}`, `P/trigger-routes/{app_id}/{type}{source}` | a trigger, and its id: name and route unique per app ([`triggers`]) | |
//! | `P/hosts/{name}` | a [`HostRecord`]: endpoint and load | the host's (TTL 3 s) |
//! | `P/seeds/{fn_id}` | a [`SeedRecord`]: handle and host | its host's |
//! | `P/making/{fn_id}` | the instance making the seed | that instance's (TTL 10 s) |
//!
//! Names are claimed in the transaction that creates the record, comparing the name key's
//! create revision with 0, so two instances never both create one. A seed's key is attached
//! to its host's lease: when the host stops being refreshed (its daemon no longer answers),
//! its entry and its seeds drop out on their own. Every request is bounded by a timeout: a
//! slow etcd fails an API request, it never stalls the runtime.

mod cluster;
pub mod local;
mod triggers;

pub use cluster::{CLAIM_POLL, HOST_TTL, Registered};

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp,
    TxnOpResponse,
};
use serde::de::DeserializeOwned;

use crate::error::StoreError;
use crate::model::{App, Func};
use crate::store::Insert;
use crate::workflow::Workflow;

/// How long one request to etcd may take.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// An instance's lease, which its claims on making seeds hang on: a dead instance's claims
/// expire after this.
const INSTANCE_TTL: i64 = 10;
/// How often the instance's lease is refreshed.
const INSTANCE_REFRESH: Duration = Duration::from_secs(3);
/// How often a transaction is tried again when the records it compared changed meanwhile.
const TXN_ATTEMPTS: usize = 5;

/// How to reach etcd (the flags of `mitosis-platform serve`).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` (or `https://` with `ca`).
    pub endpoints: Vec<String>,
    /// Where the keys live; instances that share a cluster share it.
    pub prefix: String,
    /// etcd's own authentication: a user and the file holding its password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// TLS: the CA that signed etcd's certificate, and this client's certificate and key
    /// (PEM files) when etcd asks for client certificates.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: "/mitosis".into(),
            user: None,
            password_file: None,
            ca: None,
            cert: None,
            key: None,
        }
    }

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| {
                StoreError::Etcd(etcd_client::Error::InvalidArgs(format!(
                    "{}: {e}",
                    p.display()
                )))
            })
        };
        let mut o = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), OP_TIMEOUT);
        if let Some(user) = &self.user {
            let password = match &self.password_file {
                Some(p) => read(p)?.trim_end_matches(['\r', '\n']).to_owned(),
                None => String::new(),
            };
            o = o.with_user(user, password);
        }
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            o = o.with_tls(tls);
        }
        Ok(o)
    }
}

/// The store in etcd; cheap to clone (one connection, shared).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    /// This instance's id, the value of its claims.
    instance: String,
    /// This instance's lease (made again if it ever expires).
    lease: Arc<AtomicI64>,
    refresher: tokio::task::JoinHandle<()>,
    /// The leases of the hosts this instance registers, one lock per host.
    hosts: Mutex<cluster::HostLeases>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Runs one etcd request within [`OP_TIMEOUT`].
async fn bounded<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StoreError::Timeout(what)),
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_json::from_slice(bytes)?)
}

impl EtcdStore {
    /// Connects, and takes this instance's lease (kept alive by a task until dropped).
    pub async fn connect(options: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        let connect = Client::connect(&options.endpoints, Some(options.connect_options()?));
        let client = bounded("connect", connect).await?;
        let granted = bounded("lease", client.clone().lease_grant(INSTANCE_TTL, None)).await?;
        let lease = Arc::new(AtomicI64::new(granted.id()));
        let refresher = tokio::spawn(cluster::keep_instance_lease(client.clone(), lease.clone()));
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                client,
                prefix: options.prefix.trim_end_matches('/').to_owned(),
                instance: crate::ids::ulid(),
                lease,
                refresher,
                hosts: Mutex::default(),
            }),
        })
    }

    /// This platform instance's id (in its claims and the hosts it registers).
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    fn client(&self) -> Client {
        self.inner.client.clone()
    }

    fn instance_lease(&self) -> i64 {
        self.inner.lease.load(Ordering::Relaxed)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.inner.prefix.clone();
        for p in parts {
            k.push('/');
            k.push_str(p);
        }
        k
    }

    async fn get_json<T: DeserializeOwned>(&self, key: String) -> Result<Option<T>, StoreError> {
        let got = bounded("get", self.client().get(key, None)).await?;
        got.kvs().first().map(|kv| decode(kv.value())).transpose()
    }

    /// Every record under `P/{dir}/`, in key order.
    async fn list<T: DeserializeOwned>(&self, dir: &str) -> Result<Vec<T>, StoreError> {
        let prefix = self.key(&[dir, ""]);
        let got = bounded(
            "list",
            self.client()
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        got.kvs().iter().map(|kv| decode(kv.value())).collect()
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        bounded("txn", self.client().txn(txn)).await
    }

    pub async fn insert_app(&self, app: App) -> Result<Insert, StoreError> {
        let name = self.key(&["app-names", &app.name]);
        let txn = Txn::new()
            .when([Compare::create_revision(name.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    self.key(&["apps", &app.id]),
                    serde_json::to_vec(&app)?,
                    None,
                ),
                TxnOp::put(name, app.id.clone(), None),
            ]);
        Ok(if self.txn(txn).await?.succeeded() {
            Insert::Done
        } else {
            Insert::NameTaken
        })
    }

    /// Writes `json` at `key` if a record is there.
    async fn replace(&self, key: String, json: Vec<u8>) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(key, json, None)]);
        Ok(self.txn(txn).await?.succeeded())
    }

    pub async fn update_app(&self, app: App) -> Result<bool, StoreError> {
        self.replace(self.key(&["apps", &app.id]), serde_json::to_vec(&app)?)
            .await
    }

    pub async fn app(&self, id: String) -> Result<Option<App>, StoreError> {
        self.get_json(self.key(&["apps", &id])).await
    }

    pub async fn apps(&self, name: Option<String>) -> Result<Vec<App>, StoreError> {
        match name {
            None => self.list("apps").await,
            Some(name) => {
                let id: Option<String> = bounded(
                    "get",
                    self.client().get(self.key(&["app-names", &name]), None),
                )
                .await?
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                match id {
                    Some(id) => Ok(self.app(id).await?.into_iter().collect()),
                    None => Ok(Vec::new()),
                }
            }
        }
    }

    /// Deletes the app, its name and its functions in one transaction, which holds only if
    /// no function changed since they were read (one made in the app meanwhile would be left
    /// without its app): else it is tried again.
    pub async fn delete_app(&self, id: String) -> Result<Option<Vec<String>>, StoreError> {
        let app_key = self.key(&["apps", &id]);
        let fns_prefix = self.key(&["fns", ""]);
        for _ in 0..TXN_ATTEMPTS {
            let got = bounded(
                "get",
                self.client().txn(Txn::new().and_then([
                    TxnOp::get(app_key.clone(), None),
                    TxnOp::get(fns_prefix.clone(), Some(GetOptions::new().with_prefix())),
                ])),
            )
            .await?;
            let revision = got.header().map_or(0, |h| h.revision());
            let mut responses = got.op_responses().into_iter();
            let (Some(TxnOpResponse::Get(app)), Some(TxnOpResponse::Get(fns))) =
                (responses.next(), responses.next())
            else {
                return Err(StoreError::Contended("delete_app"));
            };
            let Some(app_kv) = app.kvs().first() else {
                return Ok(None);
            };
            let app: App = decode(app_kv.value())?;
            let fns: Vec<Func> = fns
                .kvs()
                .iter()
                .map(|kv| decode::<Func>(kv.value()))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|f| f.app_id == id)
                .collect();
            let mut ops = vec![
                TxnOp::delete(app_key.clone(), None),
                TxnOp::delete(self.key(&["app-names", &app.name]), None),
            ];
            for f in &fns {
                ops.push(TxnOp::delete(self.key(&["fns", &f.id]), None));
                ops.push(TxnOp::delete(self.key(&["fn-names", &id, &f.name]), None));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(app_key.clone(), CompareOp::Equal, app_kv.mod_revision()),
                    Compare::mod_revision(fns_prefix.clone(), CompareOp::Less, revision + 1)
                        .with_prefix(),
                ])
                .and_then(ops);
            if self.txn(txn).await?.succeeded() {
                let ids: Vec<String> = fns.into_iter().map(|f| f.id).collect();
                self.delete_triggers_of(&ids).await?;
                return Ok(Some(ids));
            }
        }
        Err(StoreError::Contended("delete_app"))
    }

    pub async fn insert_fn(&self, f: Func) -> Result<Insert, StoreError> {
        let app = self.key(&["apps", &f.app_id]);
        let name = self.key(&["fn-names", &f.app_id, &f.name]);
        let txn = Txn::new()
            .when([
                Compare::version(app.clone(), CompareOp::Greater, 0),
                Compare::create_revision(name.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(self.key(&["fns", &f.id]), serde_json::to_vec(&f)?, None),
                TxnOp::put(name, f.id.clone(), None),
            ])
            // Which compare failed: the app's existence says.
            .or_else([TxnOp::get(app, Some(GetOptions::new().with_count_only()))]);
        let done = self.txn(txn).await?;
        if done.succeeded() {
            return Ok(Insert::Done);
        }
        let app_count = match done.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.count(),
            _ => 0,
        };
        Ok(if app_count == 0 {
            Insert::NoApp
        } else {
            Insert::NameTaken
        })
    }

    pub async fn update_fn(&self, f: Func) -> Result<bool, StoreError> {
        self.replace(self.key(&["fns", &f.id]), serde_json::to_vec(&f)?)
            .await
    }

    pub async fn func(&self, id: String) -> Result<Option<Func>, StoreError> {
        self.get_json(self.key(&["fns", &id])).await
    }

    /// Functions, filtered here: a listing reads every function (a cluster's functions are
    /// few enough; an index per app would be the next step).
    pub async fn fns(
        &self,
        app_id: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<Func>, StoreError> {
        let all: Vec<Func> = self.list("fns").await?;
        Ok(all
            .into_iter()
            .filter(|f| app_id.as_ref().is_none_or(|a| *a == f.app_id))
            .filter(|f| name.as_ref().is_none_or(|n| *n == f.name))
            .collect())
    }

    pub async fn delete_fn(&self, id: String) -> Result<bool, StoreError> {
        let deleted = self
            .delete_indexed(self.key(&["fns", &id]), "delete_fn", |f: &Func| {
                vec![self.key(&["fn-names", &f.app_id, &f.name])]
            })
            .await?;
        if deleted {
            self.delete_triggers_of(&[id]).await?;
        }
        Ok(deleted)
    }

    /// Deletes the record at `key` and the index keys (`index_of` it: its name's, ...), if
    /// the record did not change since it was read; false if there is none.
    async fn delete_indexed<T: DeserializeOwned>(
        &self,
        key: String,
        what: &'static str,
        index_of: impl Fn(&T) -> Vec<String>,
    ) -> Result<bool, StoreError> {
        for _ in 0..TXN_ATTEMPTS {
            let got = bounded("get", self.client().get(key.clone(), None)).await?;
            let Some(kv) = got.kvs().first() else {
                return Ok(false);
            };
            let record: T = decode(kv.value())?;
            let deletes = std::iter::once(key.clone())
                .chain(index_of(&record))
                .map(|k| TxnOp::delete(k, None));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then(deletes.collect::<Vec<_>>());
            if self.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(StoreError::Contended(what))
    }

    /// Adds a workflow and its name in one transaction; false if the name is taken.
    pub async fn insert_workflow(&self, wf: Workflow) -> Result<bool, StoreError> {
        let name = self.key(&["workflow-names", &wf.name]);
        let txn = Txn::new()
            .when([Compare::create_revision(name.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    self.key(&["workflows", &wf.id]),
                    serde_json::to_vec(&wf)?,
                    None,
                ),
                TxnOp::put(name, wf.id.clone(), None),
            ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    pub async fn workflow(&self, id: String) -> Result<Option<Workflow>, StoreError> {
        self.get_json(self.key(&["workflows", &id])).await
    }

    pub async fn workflows(&self) -> Result<Vec<Workflow>, StoreError> {
        self.list("workflows").await
    }

    /// Deletes a workflow and its name, if the record did not change since it was read.
    pub async fn delete_workflow(&self, id: String) -> Result<bool, StoreError> {
        self.delete_indexed(
            self.key(&["workflows", &id]),
            "delete_workflow",
            |wf: &Workflow| vec![self.key(&["workflow-names", &wf.name])],
        )
        .await
    }

    /// Deletes every key under this store's prefix (tests, and a cluster started afresh).
    pub async fn clear(&self) -> Result<(), StoreError> {
        let prefix = self.key(&[""]);
        bounded(
            "delete",
            self.client()
                .delete(prefix, Some(DeleteOptions::new().with_prefix())),
        )
        .await?;
        Ok(())
    }
}
