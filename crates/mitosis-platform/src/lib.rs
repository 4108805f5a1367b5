//! A serverless platform on remote fork (milestone 1 of "A serverless platform on remote
//! fork"): users deploy functions and invoke them through Fn's v2 API (and OpenFaaS's
//! `/function/NAME`), and one seed per function serves the whole cluster.
//!
//! - [`api`]: the HTTP API (axum), Fn's JSON shapes and error bodies.
//! - [`store`]: apps, functions and seed records: SQLite for one instance, or
//!   [`etcd`] shared by several (with the hosts, under leases).
//! - [`hosts`]: the daemons of the cluster and what their status says (polled off the API's
//!   threads, so a slow host never stalls a request).
//! - [`policy`]: where seeds live and where each call runs, behind a trait.
//! - [`seeds`]: one seed per function, made again elsewhere when its host is gone.
//! - [`invoke`]: one call: a child resumed through a host's daemon, stdin/stdout on pipes.
//! - [`metrics`]: `GET /metrics` for Prometheus.
//! - [`workflow`]: DAGs of stages the platform runs, fanning out as children of a stage's
//!   process that prepared itself through its [`channel`], and in.
//! - [`dashboard`]: `GET /dashboard`, a live web page of all of it, and the calls' history.
//! - [`Platform`]: all of it together.

pub mod api;
pub mod background;
pub mod channel;
pub mod daemon;
pub mod dashboard;
mod error;
pub mod etcd;
pub mod hosts;
pub mod http_contract;
pub mod ids;
pub mod instances;
pub mod invoke;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod seeds;
pub mod store;
pub mod trigger;
pub mod workflow;

#[cfg(test)]
mod test_http;

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use error::{ApiError, CallError, StoreError};
pub use hosts::{HostSpec, Hosts};
pub use policy::{LoadAware, Policy, Strategy};

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
    /// Admission control: most calls of this platform at once on one host (`None`: no
    /// limit); a call finding every host full waits for room, up to its function's timeout.
    pub max_calls_per_host: Option<usize>,
    /// Every new seed has every other host build its replica at once, so that no call pays
    /// for a cold host (remote fork's autoscaling; a replica's memory on each host).
    pub prime_replicas: bool,
    /// How calls start, for functions whose annotation does not say
    /// ([`policy::POLICY_ANNOTATION`]).
    pub strategy: Strategy,
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
            strategy: Strategy::RemoteFork,
            max_calls_per_host: None,
            prime_replicas: true,
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
    /// Idle instances of keep-warm (`fn-cache`) functions.
    pub instances: Arc<instances::Instances>,
    pub policy: Arc<dyn Policy>,
    pub metrics: metrics::Metrics,
    /// What `GET /metrics` renders: `metrics` and the hosts' calls in flight.
    pub registry: prometheus_client::registry::Registry,
    /// The calls of each function over the last 30 minutes (`GET /dashboard`).
    pub history: dashboard::History,
    /// Room for detached calls (Fn's `Fn-Invoke-Type: detached`) in flight.
    pub detached: Arc<tokio::sync::Semaphore>,
}

/// Detached calls one platform instance runs at once; more are refused (503), so callers
/// that never wait cannot pile up bodies without bound.
pub const DETACHED_CALLS: usize = 256;

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
        let hosts = Hosts::new(hosts, store.etcd().cloned(), config.remote.clone());
        hosts.set_call_limit(config.max_calls_per_host);
        hosts.clone().start_polling(config.poll_interval);
        let metrics = metrics::Metrics::default();
        let seeds = Arc::new(seeds::Seeds::new(
            store.clone(),
            hosts.clone(),
            policy.clone(),
            config.seed_ready_timeout,
            metrics.clone(),
        ));
        seeds.set_priming(config.prime_replicas);
        let instances = Arc::new(instances::Instances::default());
        instances.start_reaping();
        Arc::new(Platform {
            config,
            store,
            instances,
            registry: metrics.registry(hosts.clone()),
            hosts,
            seeds,
            policy,
            metrics,
            history: dashboard::History::default(),
            detached: Arc::new(tokio::sync::Semaphore::new(DETACHED_CALLS)),
        })
    }

    /// Drops every seed this platform prepared (on shutdown), unless other instances share
    /// them: then they stay for those (and go with their function, or their host). Idle
    /// instances end.
    pub async fn shutdown(&self) {
        for (fn_id, _) in self.instances.counts() {
            self.instances.remove(&fn_id);
        }
        if !self.store.is_shared() {
            self.seeds.drop_all().await;
        }
    }

    /// How `f`'s calls start.
    pub fn strategy(&self, f: &model::Func) -> Strategy {
        Strategy::of(&f.annotations, self.config.strategy)
    }

    /// A function was created, or its image changed: its seeds are made now, in the
    /// background, so that its first call finds them warm.
    pub fn deployed(self: &Arc<Self>, f: &model::Func) {
        match self.strategy(f) {
            Strategy::RemoteFork => self.seeds.prepare_in_background(f.clone()),
            Strategy::LocalFork => self.seeds.prepare_everywhere_in_background(f.clone()),
            // Nothing is kept before a call: Fn starts instances when calls come.
            Strategy::FnCache | Strategy::Cold => {}
        }
    }

    /// A function was deleted: its seeds and idle instances go.
    pub async fn removed(&self, fn_id: &str) {
        self.history.forget(fn_id);
        self.instances.remove(fn_id);
        self.seeds.remove(fn_id).await;
    }
}

/// How a call's process came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Forked from a seed (remote or local fork).
    Fork,
    /// Started afresh from the bundle for this call (a cold start).
    Cold,
    /// An idle instance, reused (keep-warm).
    Warm,
}

impl Start {
    pub fn name(self) -> &'static str {
        match self {
            Start::Fork => "fork",
            Start::Cold => "cold",
            Start::Warm => "warm",
        }
    }
}

/// A call's answer, and where it ran.
#[derive(Debug)]
pub struct Invoked {
    pub call_id: String,
    /// The name of the host whose daemon ran the child.
    pub host: String,
    pub start: Start,
    pub answer: invoke::Answer,
}

/// What a workflow stage adds to a call (see [`workflow`]).
pub struct StageCall {
    /// The process's channel to the platform (its fd 3), to prepare itself through.
    pub channel: channel::Channel,
    /// For a stage that forks from an earlier stage's process: that process's seed, instead
    /// of the function's.
    pub from: Option<seeds::Seed>,
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
        self.invoke_as(ids::ulid(), f, input, None).await
    }

    /// [`Platform::invoke`] as call `call_id` (the caller's, to answer it even on failure);
    /// with `http`, the request to forward to a function of the HTTP contract (`input` is its
    /// body).
    pub async fn invoke_as(
        self: &Arc<Self>,
        call_id: String,
        f: &model::Func,
        input: axum::body::Bytes,
        http: Option<http_contract::HttpRequest>,
    ) -> Result<Invoked, CallError> {
        let span = tracing::info_span!("call", %call_id, function = %f.id);
        let running = self.history.begin(&f.id);
        let result = self
            .attempts(f, input, http, call_id)
            .instrument(span.clone())
            .await;
        running.finish(dashboard::Outcome::of(&result));
        if let Err(e) = &result {
            span.in_scope(|| tracing::info!("call failed: {e}"));
        }
        result
    }

    async fn attempts(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
        http: Option<http_contract::HttpRequest>,
        call_id: String,
    ) -> Result<Invoked, CallError> {
        let strategy = self.strategy(f);
        if http.is_some() && matches!(strategy, Strategy::Cold | Strategy::FnCache) {
            return Err(CallError::BadInput(format!(
                "the http contract runs with the remote-fork or local-fork policy, not {strategy}"
            )));
        }
        match strategy {
            Strategy::RemoteFork => self.forked(f, input, http, call_id, false, None).await,
            Strategy::LocalFork => self.forked(f, input, http, call_id, true, None).await,
            Strategy::Cold => self.cold(f, input, call_id).await,
            Strategy::FnCache => self.cached(f, input, call_id).await,
        }
    }

    /// The host for a call of `f` (a child of `seed`, or with `local_seeds` the hosts with
    /// seeds of their own, or a new instance), counted there. With an admission limit and
    /// every host that could take it full, waits for room until the function's timeout.
    async fn place(
        &self,
        f: &model::Func,
        seed: Option<&seeds::Seed>,
        local_seeds: Option<&[usize]>,
        excluded: &[usize],
    ) -> Result<(usize, hosts::InFlight), CallError> {
        let deadline = tokio::time::Instant::now() + Self::timeout(f);
        let freed = self.hosts.freed();
        loop {
            // Registered before the views are read: a call ending in between still wakes us.
            let room = freed.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let mut views = self.hosts.views(seed, f.memory, excluded);
            if let Some(ready) = local_seeds {
                // Where the function has a seed of its own, a call is a plain local fork.
                for v in &mut views {
                    v.has_seed = ready.contains(&v.index);
                    v.has_replica = v.has_seed;
                }
            }
            if let Some(policy::Placement::Host { host }) = self.policy.place_call(&views) {
                // Another call may have taken the last room since the views were read.
                if let Some(counted) = self.hosts.try_start_call(host) {
                    return Ok((host, counted));
                }
                continue;
            }
            if !views.iter().any(|h| h.up && h.fits && h.full) {
                return Err(no_host(&views, f));
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(CallError::NoHost(format!(
                    "every host is at its limit of calls, for the function's {} s",
                    f.timeout
                )));
            }
        }
    }

    fn timeout(f: &model::Func) -> Duration {
        Duration::from_secs(u64::from(f.timeout))
    }

    /// A cold start of `f`, whose warm-up may take up to its timeout (a call never waits
    /// longer than that) or the seeds' limit, whichever is shorter.
    /// Every cold start is made here, and counted (`cold_starts_total`).
    fn cold_launch(&self, f: &model::Func) -> invoke::Launch {
        self.metrics
            .cold_starts
            .get_or_create(&metrics::PolicyLabels {
                fn_id: f.id.clone(),
                fn_name: f.name.clone(),
                policy: self.strategy(f).name(),
            })
            .inc();
        invoke::Launch::Cold {
            bundle: f.image.clone().into(),
            memory_mib: f.memory,
            ready: self.config.seed_ready_timeout.min(Self::timeout(f)),
        }
    }

    /// One instance of a workflow stage: a child of the function's seed (or of `stage.from`)
    /// with its channel to the platform. A function whose policy starts processes cold or
    /// keeps them runs as any call, without a channel (it cannot prepare itself).
    pub async fn invoke_stage(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
        stage: StageCall,
    ) -> Result<Invoked, CallError> {
        let call_id = ids::ulid();
        let span = tracing::info_span!("call", %call_id, function = %f.id, stage = %stage.channel.stage, index = stage.channel.index);
        let strategy = self.strategy(f);
        let run = async {
            match (&stage.from, strategy) {
                (Some(_), _) | (None, Strategy::RemoteFork) => {
                    self.forked(f, input, None, call_id, false, Some(stage))
                        .await
                }
                (None, Strategy::LocalFork) => {
                    self.forked(f, input, None, call_id, true, Some(stage))
                        .await
                }
                (None, Strategy::Cold) => self.cold(f, input, call_id).await,
                (None, Strategy::FnCache) => self.cached(f, input, call_id).await,
            }
        };
        let result = run.instrument(span.clone()).await;
        if let Err(e) = &result {
            span.in_scope(|| tracing::info!("stage call failed: {e}"));
        }
        result
    }

    /// A child of the function's seed: its one seed for the cluster, or (`local`) the own
    /// seed of the host the call goes to; for a workflow stage, with its channel, and for a
    /// stage forked from an earlier one, a child of that one's seed.
    async fn forked(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
        http: Option<http_contract::HttpRequest>,
        call_id: String,
        local: bool,
        stage: Option<StageCall>,
    ) -> Result<Invoked, CallError> {
        let from = stage.as_ref().and_then(|s| s.from.clone());
        let forking = from.is_some();
        let local = local && !forking;
        let mut seed = match from {
            Some(made) => Some(made),
            None if local => None,
            None => Some(self.seeds.get(f).await?),
        };
        let mut excluded = Vec::new();
        let mut last = None;
        for _ in 0..CALL_ATTEMPTS {
            let local_seeds = local.then(|| self.seeds.local_hosts(&f.id));
            let placed = self
                .place(f, seed.as_ref(), local_seeds.as_deref(), &excluded)
                .await;
            let (host, _counted) = match placed {
                Ok(placed) => placed,
                Err(e) => return Err(last.unwrap_or(e)),
            };
            let current = match &seed {
                Some(s) if !local => s.clone(),
                _ => match self.seeds.get_on(f, host).await {
                    Ok(s) => s,
                    Err(e) => {
                        excluded.push(host);
                        last = Some(e);
                        continue;
                    }
                },
            };
            let spec = self.hosts.get(host).spec.clone();
            let call = invoke::Call {
                endpoint: spec.endpoint.clone(),
                remote: self.hosts.remote().cloned(),
                host: spec.name.clone(),
                launch: invoke::Launch::Fork {
                    handle: current.handle.clone(),
                    memory_mib: f.memory,
                },
                http: http.clone(),
                input: input.clone(),
                timeout: Self::timeout(f),
                max_output: self.config.max_output,
                channel: stage.as_ref().map(|s| (host, s.channel.clone())),
            };
            match invoke::run(call).await {
                Ok(answer) => {
                    tracing::debug!(host = %spec.name, elapsed = ?answer.elapsed, "call done");
                    return Ok(Invoked {
                        call_id,
                        host: spec.name,
                        start: Start::Fork,
                        answer,
                    });
                }
                Err(e) if e.host_failed() => {
                    self.hosts.mark_down(host, &e.to_string());
                    excluded.push(host);
                    last = Some(e);
                }
                // A stage's process's seed is made once: lost, the stage fails.
                Err(e) if forking && (e.seed_lost() || e.seed_unreachable()) => return Err(e),
                Err(e) if e.seed_lost() => {
                    tracing::warn!("seed lost: {e}");
                    // Its host may be gone with it: poll it now rather than at the next tick.
                    self.hosts.poll(current.host).await;
                    if local {
                        self.seeds.replace_on(f, &current).await?;
                    } else {
                        seed = Some(self.seeds.replace(f, &current).await?);
                    }
                    last = Some(e);
                }
                Err(e) if e.seed_unreachable() => {
                    // Made again only if its host is down: a host that answers late still
                    // serves the seed to other calls' children.
                    self.hosts.poll(current.host).await;
                    if !self.hosts.get(current.host).is_up() {
                        tracing::warn!("seed's host down: {e}");
                        seed = Some(self.seeds.replace(f, &current).await?);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| CallError::NoHost("no host is up".into())))
    }

    /// A new instance from the bundle for this call alone.
    async fn cold(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
        call_id: String,
    ) -> Result<Invoked, CallError> {
        let mut excluded = Vec::new();
        let mut last = None;
        for _ in 0..CALL_ATTEMPTS {
            let (host, _counted) = match self.place(f, None, None, &excluded).await {
                Ok(placed) => placed,
                Err(e) => return Err(last.unwrap_or(e)),
            };
            let spec = self.hosts.get(host).spec.clone();
            let call = invoke::Call {
                endpoint: spec.endpoint.clone(),
                remote: self.hosts.remote().cloned(),
                host: spec.name.clone(),
                launch: self.cold_launch(f),
                http: None,
                input: input.clone(),
                timeout: Self::timeout(f),
                max_output: self.config.max_output,
                channel: None,
            };
            match invoke::run(call).await {
                Ok(answer) => {
                    return Ok(Invoked {
                        call_id,
                        host: spec.name,
                        start: Start::Cold,
                        answer,
                    });
                }
                Err(e) if e.host_failed() => {
                    self.hosts.mark_down(host, &e.to_string());
                    excluded.push(host);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| CallError::NoHost("no host is up".into())))
    }

    /// Fn's keep-warm: an idle instance if there is one; else one is started cold (and kept),
    /// and the call takes whichever comes first, that one or another that becomes idle
    /// meanwhile (then the new one joins the idle ones when it is ready), as Fn's agent does.
    async fn cached(
        self: &Arc<Self>,
        f: &model::Func,
        input: axum::body::Bytes,
        call_id: String,
    ) -> Result<Invoked, CallError> {
        let t0 = std::time::Instant::now();
        if let Some(answered) = self.on_idle_instance(f, &input, &call_id, t0).await? {
            return Ok(answered);
        }
        let mut excluded = Vec::new();
        let mut last = None;
        for _ in 0..CALL_ATTEMPTS {
            let (host, counted) = match self.place(f, None, None, &excluded).await {
                Ok(placed) => placed,
                Err(e) => return Err(last.unwrap_or(e)),
            };
            let spec = self.hosts.get(host).spec.clone();
            let (tx, mut started) = tokio::sync::oneshot::channel();
            let (platform, fn_id) = (self.clone(), f.id.clone());
            let (launch, image) = (self.cold_launch(f), f.image.clone());
            let idle_timeout = Duration::from_secs(u64::from(f.idle_timeout));
            let endpoint = spec.endpoint.clone();
            let name = spec.name.clone();
            tokio::spawn(async move {
                let made =
                    instances::Instance::start(host, &name, &endpoint, launch, image, idle_timeout)
                        .await;
                drop(counted);
                // The call took another instance meanwhile: this one waits for the next.
                if let Err(Ok((instance, _))) = tx.send(made) {
                    platform.instances.put_back(&fn_id, instance);
                }
            });
            let freed = self.instances.freed(&f.id);
            let made = loop {
                // Registered before looking: an instance freed in between still wakes us.
                let idle = freed.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if let Some(answered) = self.on_idle_instance(f, &input, &call_id, t0).await? {
                    return Ok(answered);
                }
                tokio::select! {
                    made = &mut started => break made,
                    () = &mut idle => {}
                }
            };
            let (mut instance, stats) = match made {
                Ok(Ok(made)) => made,
                Ok(Err(e)) if e.host_failed() => {
                    self.hosts.mark_down(host, &e.to_string());
                    excluded.push(host);
                    last = Some(e);
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(CallError::Io(std::io::Error::other("the start was lost"))),
            };
            let _counted = self.hosts.start_call(host);
            let output = instance
                .call(&input, Self::timeout(f), self.config.max_output)
                .await?;
            self.instances.put_back(&f.id, instance);
            return Ok(Invoked {
                call_id,
                host: spec.name,
                start: Start::Cold,
                answer: instances::answer(output, stats, t0),
            });
        }
        Err(last.unwrap_or_else(|| CallError::NoHost("no host is up".into())))
    }

    /// The call on an idle instance of `f`, if there is one (one that died meanwhile is
    /// skipped for the next).
    async fn on_idle_instance(
        &self,
        f: &model::Func,
        input: &axum::body::Bytes,
        call_id: &str,
        t0: std::time::Instant,
    ) -> Result<Option<Invoked>, CallError> {
        let up = |h: usize| self.hosts.get(h).is_up();
        while let Some(mut instance) = self.instances.take(&f.id, &f.image, up) {
            let host = instance.host;
            let _counted = self.hosts.start_call(host);
            match instance
                .call(input, Self::timeout(f), self.config.max_output)
                .await
            {
                Ok(output) => {
                    self.instances.put_back(&f.id, instance);
                    return Ok(Some(Invoked {
                        call_id: call_id.to_owned(),
                        host: self.hosts.get(host).spec.name.clone(),
                        start: Start::Warm,
                        answer: instances::answer(output, Default::default(), t0),
                    }));
                }
                Err(CallError::Crashed(why)) if instance.served > 0 => {
                    tracing::info!("an idle instance is gone ({why}): the next one");
                }
                Err(e @ CallError::BadInput(_)) => {
                    // Refused before anything reached it: the instance is as it was.
                    self.instances.put_back(&f.id, instance);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// Why no host could take a call of `f`: none up, or none with room for its memory.
pub(crate) fn no_host(views: &[policy::HostView], f: &model::Func) -> CallError {
    if views.iter().any(|h| h.up) {
        CallError::NoHost(format!(
            "no host has the function's {} MiB of memory available",
            f.memory
        ))
    } else {
        CallError::NoHost("no host is up".into())
    }
}
