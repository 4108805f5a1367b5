//! A serverless platform on remote fork (milestone 1 of "A serverless platform on remote
//! fork"): users deploy functions and invoke them through Fn's v2 API (and OpenFaaS's
//! `/function/NAME`), and one seed per function serves the whole cluster.
//!
//! - [`api`]: the HTTP API (axum), Fn's JSON shapes and error bodies.
//! - [`store`]: apps and functions in an embedded SQLite database.
//! - [`hosts`]: the daemons of the cluster and what their status says (polled off the API's
//!   threads, so a slow host never stalls a request).
//! - [`policy`]: where seeds live and where each call runs, behind a trait.
//! - [`seeds`]: one seed per function, made again elsewhere when its host is gone.
//! - [`invoke`]: one call: a child resumed through a host's daemon, stdin/stdout on pipes.
//! - [`metrics`]: `GET /metrics` for Prometheus.
//! - [`Platform`]: all of it together.

pub mod api;
pub mod background;
pub mod daemon;
mod error;
pub mod hosts;
pub mod ids;
pub mod invoke;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod seeds;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use error::{ApiError, CallError, StoreError};
pub use hosts::{HostSpec, Hosts};
pub use policy::{LoadAware, Policy};

/// What the platform is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Request bodies over this many bytes are refused with 413.
    pub max_body: usize,
    /// Answers over this many bytes fail the call (502).
    pub max_output: usize,
    /// How long a seed may take to become warm (start, import, block on stdin).
    pub seed_ready_timeout: Duration,
    /// How often each daemon's status is asked.
    pub poll_interval: Duration,
    /// How daemons at `tcp://` endpoints are reached (mutual TLS): needed for those hosts.
    pub remote: Option<mitosis_client::Remote>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_body: 1 << 20,
            max_output: 16 << 20,
            seed_ready_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            remote: None,
        }
    }
}

/// The platform: store, hosts, seeds and the policy that places calls.
pub struct Platform {
    pub config: Config,
    pub store: store::Store,
    pub hosts: Arc<Hosts>,
    pub seeds: Arc<seeds::Seeds>,
    pub policy: Arc<dyn Policy>,
    pub metrics: metrics::Metrics,
    /// What `GET /metrics` renders: `metrics` and the hosts' calls in flight.
    pub registry: prometheus_client::registry::Registry,
}

impl Platform {
    /// A platform over `hosts` with the default policy (remote fork per call, load-aware).
    /// Starts polling the hosts: call it inside a tokio runtime.
    pub fn new(config: Config, store: store::Store, hosts: Vec<HostSpec>) -> Arc<Self> {
        Self::with_policy(config, store, hosts, Arc::new(LoadAware::default()))
    }

    pub fn with_policy(
        config: Config,
        store: store::Store,
        hosts: Vec<HostSpec>,
        policy: Arc<dyn Policy>,
    ) -> Arc<Self> {
        let hosts = Hosts::new(hosts, config.remote.clone());
        hosts.clone().start_polling(config.poll_interval);
        let metrics = metrics::Metrics::default();
        let seeds = Arc::new(seeds::Seeds::new(
            hosts.clone(),
            policy.clone(),
            config.seed_ready_timeout,
            metrics.clone(),
        ));
        Arc::new(Platform {
            config,
            store,
            registry: metrics.registry(hosts.clone()),
            hosts,
            seeds,
            policy,
            metrics,
        })
    }

    /// Drops every seed this platform prepared (on shutdown).
    pub async fn shutdown(&self) {
        self.seeds.drop_all().await;
    }
}

/// A call's answer, and where it ran.
#[derive(Debug)]
pub struct Invoked {
    pub call_id: String,
    /// The name of the host whose daemon ran the child.
    pub host: String,
    pub answer: invoke::Answer,
}

/// How often one call is tried again after a failure of a host or a lost seed.
const CALL_ATTEMPTS: usize = 3;

impl Platform {
    /// Runs one call of `f` with `input` on its stdin, where the policy places it. A host
    /// whose daemon fails the resume is skipped, and a seed its daemon says is gone is made
    /// again (elsewhere) and the call tried once more: the child never ran in those cases.
    /// Every log line of the call carries its id and function (a span).
    pub async fn invoke(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
    ) -> Result<Invoked, CallError> {
        self.invoke_as(ids::ulid(), f, input).await
    }

    /// [`Platform::invoke`] as call `call_id` (the caller's, to answer it even on failure).
    pub async fn invoke_as(
        self: &Arc<Self>,
        call_id: String,
        f: &model::Func,
        input: axum::body::Bytes,
    ) -> Result<Invoked, CallError> {
        let span = tracing::info_span!("call", %call_id, function = %f.id);
        let result = self
            .attempts(f, input, call_id)
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            span.in_scope(|| tracing::info!("call failed: {e}"));
        }
        result
    }

    async fn attempts(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
        call_id: String,
    ) -> Result<Invoked, CallError> {
        let mut seed = self.seeds.get(f).await?;
        let mut excluded = Vec::new();
        let mut last = None;
        for _ in 0..CALL_ATTEMPTS {
            let views = self.hosts.views(Some(&seed), &excluded);
            let host = match self.policy.place_call(&views) {
                Some(policy::Placement::RemoteFork { host }) => host,
                None => {
                    return Err(last.unwrap_or_else(|| CallError::NoHost("no host is up".into())));
                }
            };
            let spec = self.hosts.get(host).spec.clone();
            let _counted = self.hosts.start_call(host);
            let call = invoke::Call {
                endpoint: spec.endpoint.clone(),
                remote: self.hosts.remote().cloned(),
                host: spec.name.clone(),
                handle: seed.handle.clone(),
                input: input.clone(),
                timeout: Duration::from_secs(u64::from(f.timeout)),
                max_output: self.config.max_output,
            };
            match invoke::run(call).await {
                Ok(answer) => {
                    tracing::debug!(host = %spec.name, elapsed = ?answer.elapsed, "call done");
                    return Ok(Invoked {
                        call_id,
                        host: spec.name,
                        answer,
                    });
                }
                Err(e) if e.host_failed() => {
                    self.hosts.mark_down(host, &e.to_string());
                    excluded.push(host);
                    last = Some(e);
                }
                Err(e) if e.seed_lost() => {
                    tracing::warn!("seed lost: {e}");
                    // Its host may be gone with it: poll it now rather than at the next tick.
                    self.hosts.poll(seed.host).await;
                    seed = self.seeds.replace(f, &seed).await?;
                    last = Some(e);
                }
                Err(e) if e.seed_unreachable() => {
                    // Made again only if its host is down: a host that answers late still
                    // serves the seed to other calls' children.
                    self.hosts.poll(seed.host).await;
                    if !self.hosts.get(seed.host).is_up() {
                        tracing::warn!("seed's host down: {e}");
                        seed = self.seeds.replace(f, &seed).await?;
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| CallError::NoHost("no host is up".into())))
    }
}
