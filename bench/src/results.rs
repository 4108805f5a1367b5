//! What one seed's benchmark measured, and its JSON form.

use std::time::Duration;

use crate::daemon::{ChildStats, Prepared};
use crate::json;
use crate::stats::{Summary, median, median_u64, ratio};
use crate::targets;

/// Failed samples after which a method gives up.
pub const MAX_FAILURES: usize = 3;

/// The `--stats` keys the report shows (all of them go to the JSON file).
pub const STATS_KEYS: [&str; 7] = [
    "resume_us",
    "attach_us",
    "build_us",
    "fork_us",
    "faults",
    "fetches",
    "pages_fetched",
];

/// Keys of the methods, in report order.
pub const COLD_START: &str = "cold_start";
pub const LOCAL_FORK: &str = "local_fork";
pub const MITOSIS_FIRST: &str = "mitosis_first_child";
pub const MITOSIS_COLD: &str = "mitosis_cold_host";
pub const MITOSIS_WARM: &str = "mitosis_warm_host";
pub const MITOSIS_WARM_CLI: &str = "mitosis_warm_host_cli";
/// A new process of the seed's program per sample, prepared under a profile of its own
/// (`prepare --profile`): its first child, which teaches the profile its working set; then
/// the first child of the next process of the program, which starts with what it learned.
pub const MITOSIS_FIRST_LEARNING: &str = "mitosis_first_child_profile_learning";
pub const MITOSIS_FIRST_PROFILE: &str = "mitosis_first_child_profile";
/// Spawning a command that answers at once, as the CLI row spawns `mitosis`: the floor under
/// any command-line client.
pub const SPAWN_FLOOR: &str = "spawn_floor";
/// Moving a cold-host child's bootstrap bytes over TCP between the hosts, nothing else.
pub const TRANSFER_FLOOR: &str = "transfer_floor";
/// One page request of 16 and of 64 pages over the daemons' protocol (`fetch.rs`), and the
/// same bytes over raw TCP.
pub const PAGE_REQUEST: [&str; 2] = ["page_request_16", "page_request_64"];
pub const PAGE_REQUEST_TCP: [&str; 2] = ["page_request_16_tcp", "page_request_64_tcp"];
/// The cold and warm host rows again, between daemons with mutual TLS (`--tls`).
pub const MITOSIS_COLD_TLS: &str = "mitosis_cold_host_tls";
pub const MITOSIS_WARM_TLS: &str = "mitosis_warm_host_tls";
pub const CRIU: &str = "criu";
/// CRIU's lazy migration to a new host (its page server over TCP).
pub const CRIU_LAZY: &str = "criu_lazy";

/// Spawn-to-answer samples of one method.
#[derive(Debug, Clone)]
pub struct Method {
    pub key: &'static str,
    pub label: &'static str,
    /// Latencies of the samples that answered right.
    pub latencies: Vec<Duration>,
    /// Samples tried (warm-up runs not counted).
    pub attempted: usize,
    /// What went wrong, per failed sample.
    pub failures: Vec<String>,
    pub gave_up: bool,
    /// Why the method did not run at all.
    pub skipped: Option<String>,
}

impl Method {
    /// A row of `samples` latencies measured in one go after `warmup`, or why there are none.
    pub fn measured(
        key: &'static str,
        label: &'static str,
        (warmup, samples): (usize, usize),
        took: anyhow::Result<Vec<Duration>>,
    ) -> Self {
        let mut method = Method::new(key, label);
        method.attempted = samples;
        match took {
            Ok(took) => method.latencies = took.into_iter().skip(warmup).collect(),
            Err(e) => {
                method.fail(format!("{e:#}"));
            }
        }
        method
    }

    pub fn new(key: &'static str, label: &'static str) -> Self {
        Self {
            key,
            label,
            latencies: Vec::new(),
            attempted: 0,
            failures: Vec::new(),
            gave_up: false,
            skipped: None,
        }
    }

    pub fn skipped(key: &'static str, label: &'static str, why: String) -> Self {
        Self {
            skipped: Some(why),
            ..Self::new(key, label)
        }
    }

    /// Records a failed sample; true once the method should give up.
    pub fn fail(&mut self, what: String) -> bool {
        self.failures.push(what);
        self.gave_up = self.failures.len() >= MAX_FAILURES;
        self.gave_up
    }

    pub fn median(&self) -> Option<Duration> {
        median(&self.latencies)
    }
}

/// Bytes the seed's host served over a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub bytes: u64,
    pub children: usize,
    /// CPU time the seed's host's daemon spent meanwhile, ns.
    pub cpu_ns: u64,
}

impl Served {
    pub fn per_child(&self) -> Option<u64> {
        (self.children > 0).then(|| self.bytes / self.children as u64)
    }

    /// The seed host daemon's CPU time per child, µs.
    pub fn cpu_us_per_child(&self) -> Option<f64> {
        (self.children > 0).then(|| self.cpu_ns as f64 / 1e3 / self.children as f64)
    }
}

/// What the measured children of one mitosis row reported besides their latency.
#[derive(Debug, Clone, Default)]
pub struct ChildNumbers {
    /// Their `--stats` numbers.
    pub stats: Vec<ChildStats>,
    /// Their private memory (KiB), read after they answered.
    pub private_kib: Vec<u64>,
    pub served: Option<Served>,
}

/// Concurrent closed loops of children: `resume`s of a warm handle, or local forks.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    pub concurrency: usize,
    pub hosts: usize,
    pub elapsed: Duration,
    /// Children that answered right.
    pub children: usize,
    pub failures: Vec<String>,
    pub latencies: Vec<Duration>,
}

impl Throughput {
    /// An empty run of `concurrency` loops on `hosts` hosts.
    pub fn new(concurrency: usize, hosts: usize) -> Self {
        Throughput {
            concurrency,
            hosts,
            ..Throughput::default()
        }
    }

    pub fn per_sec(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.children as f64 / self.elapsed.as_secs_f64()
        }
    }
}

/// Everything measured for one seed.
#[derive(Debug, Clone)]
pub struct SeedResult {
    pub name: &'static str,
    pub what: &'static str,
    pub methods: Vec<Method>,
    /// The fresh prepares of the first-child samples.
    pub prepares: Vec<Prepared>,
    /// Private memory (KiB) of each local fork child, measured after it answered.
    pub local_private_kib: Vec<u64>,
    pub first: ChildNumbers,
    /// The profile rows ([`MITOSIS_FIRST_LEARNING`], [`MITOSIS_FIRST_PROFILE`]) and the
    /// pages carried to each second process.
    pub first_learning: ChildNumbers,
    pub first_profile: ChildNumbers,
    pub carried_pages: Vec<u64>,
    pub cold: ChildNumbers,
    pub warm: ChildNumbers,
    /// The cold and warm host rows between daemons with mutual TLS.
    pub cold_tls: ChildNumbers,
    pub warm_tls: ChildNumbers,
    /// Pages the warm host's replica held after the warm phase.
    pub replica_pages: Option<u64>,
    pub throughput: Option<Throughput>,
    /// Local forks from one warm seed, with the same concurrency.
    pub local_throughput: Option<Throughput>,
    pub criu_dump: Option<Duration>,
    /// Per measured lazy migration: the lazy dump until it served pages, and the child host's
    /// lazy-pages daemon until it was ready (both before the restore the row times).
    pub criu_lazy_dump: Vec<Duration>,
    pub criu_lazy_daemon: Vec<Duration>,
    /// Bytes of the transfer floor row (a cold-host child's share of what was served).
    pub transfer_bytes: Option<u64>,
    /// Why the seed's run stopped early, if it did.
    pub error: Option<String>,
}

impl SeedResult {
    pub fn new(name: &'static str, what: &'static str) -> Self {
        Self {
            name,
            what,
            methods: Vec::new(),
            prepares: Vec::new(),
            local_private_kib: Vec::new(),
            first: ChildNumbers::default(),
            first_learning: ChildNumbers::default(),
            first_profile: ChildNumbers::default(),
            carried_pages: Vec::new(),
            cold: ChildNumbers::default(),
            warm: ChildNumbers::default(),
            cold_tls: ChildNumbers::default(),
            warm_tls: ChildNumbers::default(),
            replica_pages: None,
            throughput: None,
            local_throughput: None,
            criu_dump: None,
            criu_lazy_dump: Vec::new(),
            criu_lazy_daemon: Vec::new(),
            transfer_bytes: None,
            error: None,
        }
    }

    pub fn method(&self, key: &str) -> Option<&Method> {
        self.methods.iter().find(|m| m.key == key)
    }

    /// The median of `key` over the given `--stats` numbers.
    pub fn stat_median(stats: &[ChildStats], key: &str) -> Option<u64> {
        let values: Vec<u64> = stats.iter().filter_map(|s| s.get(key).copied()).collect();
        median_u64(&values)
    }

    /// For a containerized seed, medians over its warm-host children of taking a container,
    /// joining it, and both (per child), in microseconds; `None` for a seed in no container.
    pub fn containerizing_us(&self) -> Option<(u64, u64, u64)> {
        let children: Vec<(u64, u64)> = self
            .warm
            .stats
            .iter()
            .map(|s| (stat(s, "container_us"), stat(s, "join_us")))
            .filter(|&(take, join)| take + join > 0)
            .collect();
        let of =
            |f: fn(&(u64, u64)) -> u64| median_u64(&children.iter().map(f).collect::<Vec<_>>());
        Some((of(|c| c.0)?, of(|c| c.1)?, of(|c| c.0 + c.1)?))
    }

    /// Medians of the prepares: (in the daemon, seed stopped), in microseconds.
    pub fn prepare_medians_us(&self) -> (Option<u64>, Option<u64>) {
        let daemon: Vec<u64> = self.prepares.iter().map(|p| p.daemon_us).collect();
        let stopped: Vec<u64> = self.prepares.iter().map(|p| p.stopped_us).collect();
        (median_u64(&daemon), median_u64(&stopped))
    }

    /// Median latency of `key` divided by the local fork's.
    pub fn vs_local(&self, key: &str) -> Option<f64> {
        let local = self.method(LOCAL_FORK)?.median()?;
        let this = self.method(key)?.median()?;
        Some(ratio(this, local))
    }

    /// CRIU's lazy migration median over mitosis's cold (new) host median: how many times
    /// faster a child on a new host starts.
    pub fn criu_lazy_vs_cold(&self) -> Option<f64> {
        let cold = self.method(MITOSIS_COLD)?.median()?;
        let lazy = self.method(CRIU_LAZY)?.median()?;
        Some(ratio(lazy, cold)).filter(|x| x.is_finite())
    }

    /// For a row between TLS daemons: its median latency divided by the same row's between
    /// plain daemons.
    pub fn vs_plain(&self, key: &str) -> Option<f64> {
        let plain = match key {
            MITOSIS_COLD_TLS => MITOSIS_COLD,
            MITOSIS_WARM_TLS => MITOSIS_WARM,
            _ => return None,
        };
        let plain = self.method(plain)?.median()?;
        Some(ratio(self.method(key)?.median()?, plain))
    }

    /// Whether anything failed.
    pub fn failed(&self) -> bool {
        self.error.is_some()
            || self.methods.iter().any(|m| !m.failures.is_empty())
            || [&self.throughput, &self.local_throughput]
                .into_iter()
                .flatten()
                .any(|t| !t.failures.is_empty())
    }

    pub fn to_json(&self) -> json::Seed {
        let methods = self
            .methods
            .iter()
            .map(|m| {
                let s = Summary::of(&m.latencies);
                let at = |f: fn(&Summary) -> Duration| s.as_ref().map(|s| ms_f(f(s)));
                json::Method {
                    key: m.key,
                    label: m.label,
                    samples: m.latencies.len(),
                    attempted: m.attempted,
                    failures: m.failures.len(),
                    gave_up: m.gave_up,
                    skipped: m.skipped.clone(),
                    median_ms: at(|s| s.median),
                    p90_ms: at(|s| s.p90),
                    p99_ms: at(|s| s.p99),
                    min_ms: at(|s| s.min),
                    vs_local_fork: self.vs_local(m.key),
                    vs_plain: self.vs_plain(m.key),
                }
            })
            .collect();
        let (daemon_us, stopped_us) = self.prepare_medians_us();
        let us_as_ms = |us: Option<u64>| us.map(|us| us as f64 / 1e3);
        let walls: Vec<Duration> = self.prepares.iter().map(|p| p.wall).collect();
        let stats_medians = |stats: &[ChildStats]| {
            let keys = stats.iter().flat_map(|s| s.keys().copied());
            keys.map(|k| (k, Self::stat_median(stats, k))).collect()
        };
        let served = |s: &Option<Served>| {
            s.map(|s| json::Served {
                bytes: s.bytes,
                children: s.children,
                per_child: s.per_child(),
                seed_host_cpu_us_per_child: s.cpu_us_per_child(),
            })
        };
        let failures: Vec<String> = self
            .methods
            .iter()
            .flat_map(|m| m.failures.iter().map(move |f| format!("{}: {f}", m.key)))
            .chain(
                self.throughput
                    .iter()
                    .flat_map(|t| t.failures.iter().map(|f| format!("throughput: {f}"))),
            )
            .chain(self.local_throughput.iter().flat_map(|t| {
                t.failures
                    .iter()
                    .map(|f| format!("local fork throughput: {f}"))
            }))
            .collect();
        json::Seed {
            name: self.name,
            what: self.what,
            error: self.error.clone(),
            methods,
            prepare: json::Prepare {
                samples: self.prepares.len(),
                wall_median_ms: median(&walls).map(ms_f),
                daemon_median_ms: us_as_ms(daemon_us),
                seed_stopped_median_ms: us_as_ms(stopped_us),
                last_line: self.prepares.last().map(|p| p.line.clone()),
            },
            stats_medians: json::PerPhase {
                first_child: stats_medians(&self.first.stats),
                cold_host: stats_medians(&self.cold.stats),
                warm_host: stats_medians(&self.warm.stats),
            },
            profile: json::Profile {
                learning_stats_medians: stats_medians(&self.first_learning.stats),
                carried_stats_medians: stats_medians(&self.first_profile.stats),
                carried_pages_median: median_u64(&self.carried_pages),
            },
            mtls_stats_medians: json::TlsPhases {
                cold_host: stats_medians(&self.cold_tls.stats),
                warm_host: stats_medians(&self.warm_tls.stats),
            },
            private_kib_median: json::PrivateKib {
                local_fork: median_u64(&self.local_private_kib),
                mitosis_first_child: median_u64(&self.first.private_kib),
                mitosis_cold_host: median_u64(&self.cold.private_kib),
                mitosis_warm_host: median_u64(&self.warm.private_kib),
            },
            bytes_served: json::PerPhase {
                first_child: served(&self.first.served),
                cold_host: served(&self.cold.served),
                warm_host: served(&self.warm.served),
            },
            warm_replica_pages: self.replica_pages,
            throughput: self.throughput.as_ref().map(throughput_json),
            local_fork_throughput: self.local_throughput.as_ref().map(throughput_json),
            criu_dump_ms: self.criu_dump.map(ms_f),
            criu_lazy_dump_median_ms: median(&self.criu_lazy_dump).map(ms_f),
            criu_lazy_daemon_median_ms: median(&self.criu_lazy_daemon).map(ms_f),
            targets: targets::of(self),
            failures,
        }
    }
}

fn throughput_json(t: &Throughput) -> json::Throughput {
    json::Throughput {
        concurrency: t.concurrency,
        hosts: t.hosts,
        secs: ms_f(t.elapsed) / 1e3,
        children: t.children,
        children_per_sec: (t.per_sec() * 100.0).round() / 100.0,
        failures: t.failures.len(),
        median_ms: median(&t.latencies).map(ms_f),
    }
}

/// Milliseconds as a number, to the microsecond.
pub fn ms_f(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// A child's `key`, 0 if it did not report it.
fn stat(s: &ChildStats, key: &str) -> u64 {
    s.get(key).copied().unwrap_or(0)
}
