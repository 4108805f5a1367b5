//! `GET /metrics`: the platform's metrics in the OpenMetrics text format, for Prometheus.
//!
//! Calls are counted by function and outcome, timed per function; calls in flight are read
//! from the hosts' own counts at scrape time (the scheduler's, not a second count).

use std::sync::Arc;

use axum::http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::hosts::Hosts;

/// A call's start: `fork`, `cold` or `warm` ([`crate::Start`]), and the function's policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabels {
    pub fn_id: String,
    pub fn_name: String,
    pub policy: &'static str,
    pub start: &'static str,
}

/// A function and its start policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub fn_id: String,
    pub fn_name: String,
    pub policy: &'static str,
}

/// What OpenMetrics scrapers ask for and get.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A function: its id, and its name for people (unique within its app only).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FnLabels {
    pub fn_id: String,
    pub fn_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub fn_id: String,
    pub fn_name: String,
    /// `ok`, `4xx` or `5xx`.
    pub outcome: &'static str,
}

/// A workflow and how its run ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkflowLabels {
    pub workflow_id: String,
    pub workflow_name: String,
    /// `ok`, `4xx` or `5xx`.
    pub outcome: &'static str,
}

/// A workflow.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkflowNameLabels {
    pub workflow_id: String,
    pub workflow_name: String,
}

/// The outcome label of an answer's status.
pub fn outcome(status: StatusCode) -> &'static str {
    if status.is_client_error() {
        "4xx"
    } else if status.is_server_error() {
        "5xx"
    } else {
        "ok"
    }
}

fn call_histogram() -> Histogram {
    // 1 ms to ~65 s: a warm call takes milliseconds, a function may run up to 300 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The platform's metrics; cheap to clone (each is shared).
#[derive(Clone)]
pub struct Metrics {
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Family<FnLabels, Histogram, fn() -> Histogram>,
    /// Answered calls by how their process started (the cold starts a policy paid).
    pub starts: Family<StartLabels, Counter>,
    /// Processes started cold from the bundle, whether or not the call that asked for one
    /// ended up answered by it (fn-cache gives a waiting call the first instance freed).
    pub cold_starts: Family<PolicyLabels, Counter>,
    pub seeds_made: Counter,
    /// Seeds made again: their host or daemon lost them, or the function's image changed.
    pub seeds_replaced: Counter,
    /// Workflow runs by outcome, and their time.
    pub workflow_runs: Family<WorkflowLabels, Counter>,
    pub workflow_seconds: Family<WorkflowNameLabels, Histogram, fn() -> Histogram>,
    /// Seeds workflow stages' processes made of themselves (each dropped with its run).
    pub stage_seeds_made: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(call_histogram),
            starts: Family::default(),
            cold_starts: Family::default(),
            seeds_made: Counter::default(),
            seeds_replaced: Counter::default(),
            workflow_runs: Family::default(),
            workflow_seconds: Family::new_with_constructor(call_histogram),
            stage_seeds_made: Counter::default(),
        }
    }
}

impl Metrics {
    /// A registry of these metrics and of `hosts`' calls in flight.
    pub fn registry(&self, hosts: Arc<Hosts>) -> Registry {
        let mut r = Registry::with_prefix("mitosis_platform");
        self.register(&mut r);
        r.register_collector(Box::new(InFlight(hosts)));
        r
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "calls",
            "Calls by function and outcome (ok, 4xx, 5xx)",
            self.calls.clone(),
        );
        r.register_with_unit(
            "call",
            "Calls' time from the request to the answer, by function",
            Unit::Seconds,
            self.call_seconds.clone(),
        );
        r.register(
            "call_starts",
            "Answered calls by how their process started: fork, cold (from the bundle) or warm (a kept instance)",
            self.starts.clone(),
        );
        r.register(
            "cold_starts",
            "Processes started cold from the bundle, by function and policy (used by their call or kept)",
            self.cold_starts.clone(),
        );
        r.register("seeds_made", "Seeds prepared", self.seeds_made.clone());
        r.register(
            "seeds_replaced",
            "Seeds made again in place of a lost or outdated one",
            self.seeds_replaced.clone(),
        );
        r.register(
            "workflow_runs",
            "Workflow runs by workflow and outcome (ok, 4xx, 5xx)",
            self.workflow_runs.clone(),
        );
        r.register_with_unit(
            "workflow_run",
            "Workflow runs' time from the request to the answer, by workflow",
            Unit::Seconds,
            self.workflow_seconds.clone(),
        );
        r.register(
            "stage_seeds_made",
            "Seeds workflow stages' processes made of themselves (fork_prepare through the platform)",
            self.stage_seeds_made.clone(),
        );
    }
}

struct InFlight(Arc<Hosts>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

impl Collector for InFlight {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let kind = ConstGauge::new(0i64).metric_type();
        let mut m = e.encode_descriptor(
            "calls_in_flight",
            "This platform's calls running now, by host",
            None,
            kind,
        )?;
        for host in self.0.report() {
            let labels = [("host", host.name)];
            ConstGauge::new(host.inflight as i64).encode(m.encode_family(&labels)?)?;
        }
        let mut m = e.encode_descriptor("host_up", "Whether a host's daemon is up", None, kind)?;
        for host in self.0.report() {
            let labels = [("host", host.name)];
            ConstGauge::new(i64::from(host.up)).encode(m.encode_family(&labels)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::HostSpec;

    #[test]
    fn the_text_parses_as_prometheus_exposition() {
        let m = Metrics::default();
        let f = FnLabels {
            fn_id: "01J".into(),
            fn_name: "thumbs".into(),
        };
        for status in [StatusCode::OK, StatusCode::OK, StatusCode::GATEWAY_TIMEOUT] {
            m.calls
                .get_or_create(&CallLabels {
                    fn_id: f.fn_id.clone(),
                    fn_name: f.fn_name.clone(),
                    outcome: outcome(status),
                })
                .inc();
            m.call_seconds.get_or_create(&f).observe(0.02);
        }
        m.seeds_made.inc();
        let hosts = Hosts::new(
            vec!["h0=/run/h0.sock".parse::<HostSpec>().unwrap()],
            None,
            None,
        );
        let _running = hosts.start_call(0);
        let text = render(&m.registry(hosts.clone())).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");

        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| {
            let s = parsed
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
                })
                .unwrap_or_else(|| panic!("{name} {labels:?} missing from:\n{text}"));
            // OpenMetrics names a counter's family without `_total`, which prometheus-parse
            // (Prometheus text) then reads as untyped: the values are what is checked.
            match s.value {
                prometheus_parse::Value::Counter(n)
                | prometheus_parse::Value::Gauge(n)
                | prometheus_parse::Value::Untyped(n) => n,
                ref other => panic!("{name}: {other:?}"),
            }
        };
        let thumbs = ("fn_name", "thumbs");
        assert_eq!(
            value("mitosis_platform_calls_total", &[thumbs, ("outcome", "ok")]),
            2.0
        );
        assert_eq!(
            value(
                "mitosis_platform_calls_total",
                &[thumbs, ("outcome", "5xx")]
            ),
            1.0
        );
        assert_eq!(value("mitosis_platform_call_seconds_count", &[thumbs]), 3.0);
        assert_eq!(value("mitosis_platform_seeds_made_total", &[]), 1.0);
        assert_eq!(value("mitosis_platform_seeds_replaced_total", &[]), 0.0);
        assert_eq!(
            value("mitosis_platform_calls_in_flight", &[("host", "h0")]),
            1.0
        );
    }
}
