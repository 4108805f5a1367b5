//! `GET /metrics` (`mitosisd --metrics ADDR`): the daemon's metrics in the OpenMetrics text
//! format, for Prometheus.
//!
//! What the daemon already counts for `mitosis status` ([`crate::Counters`], the replica
//! cache, the container pool) is read at scrape time by a collector rather than counted a
//! second time; only what nothing counted yet (per-seed children, resume latencies, child
//! faults) lives in [`Metrics`], updated once per resume and once per exit, never per page.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mitosis_container::pool::PoolStats;
use mitosis_descriptor::Handle;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::Daemon;

/// What OpenMetrics scrapers ask for and get.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A seed, as children's labels name it: its id is unique on its host only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeedLabels {
    pub seed: u64,
    pub seed_host: String,
}

impl SeedLabels {
    pub fn of(handle: &Handle) -> Self {
        SeedLabels {
            seed: handle.seed_id,
            seed_host: handle.host.to_string(),
        }
    }
}

/// Whether this host had the seed's replica (warm) or built it for this resume (cold).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: &'static str,
}

impl HostLabels {
    pub fn of(cached: bool) -> Self {
        HostLabels {
            host: if cached { "warm" } else { "cold" },
        }
    }
}

fn resume_histogram() -> Histogram {
    // 100 µs to ~3.3 s: a warm fork is under a millisecond, a cold build of a large seed
    // over a slow link takes seconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Metrics nothing else counts; cheap to clone (each is shared).
#[derive(Clone)]
pub struct Metrics {
    pub children_started: Family<SeedLabels, Counter>,
    pub children_running: Family<SeedLabels, Gauge>,
    /// Resumes that failed, and children the daemon killed (page source lost, out of memory).
    pub children_failed: Family<SeedLabels, Counter>,
    pub resume_seconds: HistogramFamily<HostLabels>,
    pub child_faults: Counter,
    pub child_pages_fetched: Counter,
    /// Pages replicas took in from their seeds' hosts in the background ([`crate::fill`]).
    pub replica_pages_filled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            children_started: Family::default(),
            children_running: Family::default(),
            children_failed: Family::default(),
            resume_seconds: Family::new_with_constructor(resume_histogram),
            child_faults: Counter::default(),
            child_pages_fetched: Counter::default(),
            replica_pages_filled: Counter::default(),
        }
    }
}

impl Metrics {
    /// A registry of these metrics and of what `daemon` counts for its status.
    pub fn registry(&self, daemon: Arc<Daemon>) -> Registry {
        let mut r = Registry::with_prefix("mitosisd");
        self.register(&mut r);
        r.register_collector(Box::new(StatusCollector(daemon)));
        r
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "children_started",
            "Children resumed on this host, by seed",
            self.children_started.clone(),
        );
        r.register(
            "children_running",
            "Children running on this host now, by seed",
            self.children_running.clone(),
        );
        r.register(
            "children_failed",
            "Resumes that failed and children the daemon killed, by seed",
            self.children_failed.clone(),
        );
        r.register_with_unit(
            "resume",
            "From the resume request to the child running: host=cold built the seed's replica, \
             host=warm had it",
            Unit::Seconds,
            self.resume_seconds.clone(),
        );
        r.register(
            "child_faults",
            "Page faults of children that exited",
            self.child_faults.clone(),
        );
        r.register(
            "child_pages_fetched",
            "Pages children that exited fetched from their seed's host",
            self.child_pages_fetched.clone(),
        );
        r.register(
            "replica_pages_filled",
            "Pages replicas took in from their seeds' hosts in the background, between children",
            self.replica_pages_filled.clone(),
        );
    }
}

/// Reads the daemon's own counters, replica cache and container pool at each scrape.
struct StatusCollector(Arc<Daemon>);

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One value per bundle of the container pool.
fn pool_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    is_counter: bool,
    stats: &[PoolStats],
    value: impl Fn(&PoolStats) -> u64,
) -> std::fmt::Result {
    let kind = if is_counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for s in stats {
        let labels = [("bundle", s.bundle.display().to_string())];
        let me = m.encode_family(&labels)?;
        if is_counter {
            ConstCounter::new(value(s)).encode(me)?;
        } else {
            ConstGauge::new(value(s) as i64).encode(me)?;
        }
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let d = &self.0;
        let c = &d.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut e,
            "page_server_bytes",
            "Page bytes this host's page server sent to peers",
            load(&c.bytes_served),
        )?;
        gauge(
            &mut e,
            "peer_connections",
            "Page-server connections open now",
            load(&c.peer_connections),
        )?;
        {
            let refused = ConstCounter::new(0u64);
            let mut m = e.encode_descriptor(
                "peer_refused",
                "Page-server connections refused: reason=limit (over the connection limits), \
                 reason=tls (failed TLS handshake)",
                None,
                refused.metric_type(),
            )?;
            for (reason, v) in [
                ("limit", load(&c.peer_refused)),
                ("tls", load(&c.peer_tls_refused)),
            ] {
                let labels = [("reason", reason)];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "seeds",
            "Seeds prepared on this host",
            d.registry.all().len() as u64,
        )?;
        let lines = d.cache.lines();
        gauge(
            &mut e,
            "replicas",
            "Replicas of seeds in this host's cache",
            lines.len() as u64,
        )?;
        gauge(
            &mut e,
            "replica_pages",
            "Pages the cached replicas hold",
            lines.iter().map(|l| l.pages).sum(),
        )?;
        if let Ok(containers) = d.containers() {
            let stats = containers.pool.stats();
            let ready = |s: &PoolStats| s.ready as u64;
            let help = "Empty containers ready for children, by bundle";
            pool_family(&mut e, "container_pool_ready", help, false, &stats, ready)?;
            let help = "Containers made, by bundle";
            pool_family(&mut e, "container_pool_made", help, true, &stats, |s| {
                s.made
            })?;
            let help = "Containers children took, by bundle";
            pool_family(&mut e, "container_pool_taken", help, true, &stats, |s| {
                s.taken
            })?;
            let help = "Takes that found the pool empty and made one on the spot, by bundle";
            pool_family(&mut e, "container_pool_misses", help, true, &stats, |s| {
                s.misses
            })?;
        }
        Ok(())
    }
}

/// The registry in OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    match render(&registry) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves `GET /metrics` (and `/healthz`, `/readyz`) on `listener` until the daemon exits.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, health: Arc<crate::health::Health>) {
    let registry = Arc::new(daemon.metrics.registry(daemon.clone()));
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(registry)
        .merge(crate::health::router(health));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_parses_as_prometheus_exposition() {
        let m = Metrics::default();
        let seed = SeedLabels {
            seed: 7,
            seed_host: "10.0.0.1:7070".into(),
        };
        m.children_started.get_or_create(&seed).inc();
        m.children_running.get_or_create(&seed).inc();
        m.children_failed.get_or_create(&seed).inc();
        m.resume_seconds
            .get_or_create(&HostLabels::of(false))
            .observe(0.120);
        m.resume_seconds
            .get_or_create(&HostLabels::of(true))
            .observe(0.0008);
        m.child_faults.inc_by(12);
        let mut r = Registry::with_prefix("mitosisd");
        m.register(&mut r);
        let text = render(&r).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");

        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let find = |name: &str, label: Option<(&str, &str)>| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .unwrap_or_else(|| panic!("{name} {label:?} missing from:\n{text}"))
                .value
                .clone()
        };
        // OpenMetrics names a counter's family without `_total`, which prometheus-parse
        // (Prometheus text) then reads as untyped: the values are what is checked.
        use prometheus_parse::Value;
        let num = |v: Value| match v {
            Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => n,
            other => panic!("not a number: {other:?}"),
        };
        let seed7 = Some(("seed", "7"));
        assert_eq!(num(find("mitosisd_children_started_total", seed7)), 1.0);
        assert_eq!(num(find("mitosisd_children_failed_total", seed7)), 1.0);
        assert_eq!(num(find("mitosisd_children_running", seed7)), 1.0);
        assert_eq!(num(find("mitosisd_child_faults_total", None)), 12.0);
        for host in ["cold", "warm"] {
            match find("mitosisd_resume_seconds", Some(("host", host))) {
                Value::Histogram(buckets) => {
                    assert_eq!(buckets.last().unwrap().count, 1.0, "{host}")
                }
                other => panic!("resume_seconds {host}: {other:?}"),
            }
            let count = find("mitosisd_resume_seconds_count", Some(("host", host)));
            assert_eq!(num(count), 1.0);
        }
    }
}
