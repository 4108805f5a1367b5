//! The schema of bench-results.json, which `bench/plot.py` reads. Fields are written in
//! declaration order; `None` and non-finite numbers are written as `null`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::targets::Target;

/// The whole file.
#[derive(Debug, Serialize)]
pub struct Results {
    pub config: Config,
    pub machine: Machine,
    pub seeds: Vec<Seed>,
}

/// The command line's numbers.
#[derive(Debug, Serialize)]
pub struct Config {
    pub children: usize,
    pub cold_samples: usize,
    pub warmup: usize,
    pub bigheap_mib: u64,
    pub throughput_secs: f64,
    pub concurrency: usize,
    pub pin: Option<String>,
    /// Whether the cold and warm host rows were also run between TLS daemons.
    pub tls: bool,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    /// Why CRIU could not run, if it could not.
    pub criu: Option<String>,
    /// Why CRIU's lazy migration could not run, if CRIU could but it could not.
    pub criu_lazy: Option<String>,
}

/// One seed's results.
#[derive(Debug, Serialize)]
pub struct Seed {
    pub name: &'static str,
    pub what: &'static str,
    pub error: Option<String>,
    pub methods: Vec<Method>,
    pub prepare: Prepare,
    /// Medians of the children's `--stats` numbers, by key (sorted).
    pub stats_medians: PerPhase<BTreeMap<&'static str, Option<u64>>>,
    /// The first-child rows of a program prepared under a profile.
    pub profile: Profile,
    /// The same for the rows between TLS daemons (empty without `--tls`).
    pub mtls_stats_medians: TlsPhases<BTreeMap<&'static str, Option<u64>>>,
    pub private_kib_median: PrivateKib,
    pub bytes_served: PerPhase<Option<Served>>,
    pub warm_replica_pages: Option<u64>,
    pub throughput: Option<Throughput>,
    pub local_fork_throughput: Option<Throughput>,
    pub criu_dump_ms: Option<f64>,
    /// Medians over the lazy migrations: the dump until it served pages, the child host's
    /// lazy-pages daemon until ready (neither counted in the row, which starts at restore).
    pub criu_lazy_dump_median_ms: Option<f64>,
    pub criu_lazy_daemon_median_ms: Option<f64>,
    pub targets: Vec<Target>,
    /// Every failed sample, as "method: what went wrong".
    pub failures: Vec<String>,
}

/// One method's spawn-to-answer latencies.
#[derive(Debug, Serialize)]
pub struct Method {
    pub key: &'static str,
    pub label: &'static str,
    pub samples: usize,
    pub attempted: usize,
    pub failures: usize,
    pub gave_up: bool,
    pub skipped: Option<String>,
    pub median_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub min_ms: Option<f64>,
    pub vs_local_fork: Option<f64>,
    /// A row between TLS daemons: its median over the same row's between plain daemons.
    pub vs_plain: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Prepare {
    pub samples: usize,
    pub wall_median_ms: Option<f64>,
    pub daemon_median_ms: Option<f64>,
    pub seed_stopped_median_ms: Option<f64>,
    pub last_line: Option<String>,
}

/// Something measured in each mitosis phase.
#[derive(Debug, Serialize)]
pub struct PerPhase<T> {
    pub first_child: T,
    pub cold_host: T,
    pub warm_host: T,
}

/// The first children of new processes of a seed's program under a profile: the one that
/// learned, the next one that started with it (their `--stats` medians), and the pages
/// carried to the next.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub learning_stats_medians: BTreeMap<&'static str, Option<u64>>,
    pub carried_stats_medians: BTreeMap<&'static str, Option<u64>>,
    pub carried_pages_median: Option<u64>,
}

/// Something measured in the phases run between TLS daemons too.
#[derive(Debug, Serialize)]
pub struct TlsPhases<T> {
    pub cold_host: T,
    pub warm_host: T,
}

/// Median private memory of a child, in KiB; keyed as the methods are.
#[derive(Debug, Serialize)]
pub struct PrivateKib {
    pub local_fork: Option<u64>,
    pub mitosis_first_child: Option<u64>,
    pub mitosis_cold_host: Option<u64>,
    pub mitosis_warm_host: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Served {
    pub bytes: u64,
    pub children: usize,
    pub per_child: Option<u64>,
    /// CPU time of the seed's host's daemon per child, µs.
    pub seed_host_cpu_us_per_child: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub concurrency: usize,
    pub hosts: usize,
    pub secs: f64,
    pub children: usize,
    pub children_per_sec: f64,
    pub failures: usize,
    pub median_ms: Option<f64>,
}

/// `results` as indented text (two spaces per level), with a final newline.
pub fn pretty(results: &Results) -> serde_json::Result<String> {
    let mut text = serde_json::to_string_pretty(results)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Prepared;
    use crate::results::{
        self, COLD_START, LOCAL_FORK, MITOSIS_COLD, MITOSIS_FIRST, MITOSIS_WARM, MITOSIS_WARM_TLS,
        SeedResult,
    };
    use serde_json::Value;
    use std::time::Duration;

    /// A seed's results with something in every field.
    fn sample() -> SeedResult {
        let ms = Duration::from_millis;
        let mut r = SeedResult::new("container", "a \"seed\"\nin a container");
        let mut local = results::Method::new(LOCAL_FORK, "local fork");
        local.latencies = vec![ms(2), ms(1), ms(3)];
        local.attempted = 3;
        let mut warm = results::Method::new(MITOSIS_WARM, "mitosis warm host");
        warm.latencies = vec![Duration::from_micros(2500), ms(3)];
        warm.attempted = 3;
        warm.fail("timed out".into());
        let mut warm_tls = results::Method::new(MITOSIS_WARM_TLS, "mitosis warm host (mTLS)");
        warm_tls.latencies = vec![ms(3), ms(3)];
        warm_tls.attempted = 2;
        r.methods = vec![
            results::Method::skipped(COLD_START, "cold start", "no rootfs".into()),
            local,
            warm,
            warm_tls,
        ];
        r.warm_tls
            .stats
            .push([("fork_us", 950)].into_iter().collect());
        r.prepares.push(Prepared {
            handle: "h".into(),
            wall: Duration::from_micros(1500),
            daemon_us: 900,
            stopped_us: 400,
            line: "mitosis: prepared in 900us".into(),
        });
        r.local_private_kib = vec![100, 300, 200];
        r.first
            .stats
            .push([("fork_us", 700), ("faults", 3)].into_iter().collect());
        for (take, join) in [(20, 150), (30, 200)] {
            r.warm.stats.push(
                [("container_us", take), ("join_us", join), ("fork_us", 900)]
                    .into_iter()
                    .collect(),
            );
        }
        r.warm.private_kib = vec![64];
        r.warm.served = Some(results::Served {
            bytes: 4096 * 3,
            children: 2,
            cpu_ns: 50_000,
        });
        r.replica_pages = Some(42);
        let mut t = results::Throughput::new(4, 2);
        t.elapsed = ms(2000);
        t.children = 2401;
        t.failures.push("refused".into());
        t.latencies = vec![ms(1), ms(2)];
        r.throughput = Some(t);
        r.criu_dump = Some(Duration::from_micros(12_345));
        r.criu_lazy_dump = vec![ms(90), ms(70), ms(80)];
        r.criu_lazy_daemon = vec![ms(40)];
        r
    }

    fn document(seeds: &[SeedResult]) -> Value {
        let results = Results {
            config: Config {
                children: 50,
                cold_samples: 10,
                warmup: 1,
                bigheap_mib: 1024,
                throughput_secs: 5.0,
                concurrency: 4,
                pin: None,
                tls: true,
            },
            machine: Machine {
                cpus: 2,
                kernel: "6.1.0".into(),
                criu: Some("criu: not found".into()),
                criu_lazy: None,
            },
            seeds: seeds.iter().map(SeedResult::to_json).collect(),
        };
        let text = pretty(&results).unwrap();
        assert!(text.ends_with("}\n"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
    }

    /// The keys of object `v`, sorted.
    fn keys(v: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"))
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        keys
    }

    fn sorted(mut keys: Vec<&str>) -> Vec<&str> {
        keys.sort();
        keys
    }

    #[test]
    fn parses_with_the_expected_keys() {
        let doc = document(&[sample(), SeedResult::new("hello", "empty")]);
        assert_eq!(keys(&doc), ["config", "machine", "seeds"]);
        assert_eq!(
            keys(&doc["config"]),
            sorted(vec![
                "children",
                "cold_samples",
                "warmup",
                "bigheap_mib",
                "throughput_secs",
                "concurrency",
                "pin",
                "tls",
            ])
        );
        assert_eq!(
            keys(&doc["machine"]),
            ["cpus", "criu", "criu_lazy", "kernel"]
        );
        let seed = &doc["seeds"][0];
        assert_eq!(
            keys(seed),
            sorted(vec![
                "name",
                "what",
                "error",
                "methods",
                "prepare",
                "stats_medians",
                "profile",
                "mtls_stats_medians",
                "private_kib_median",
                "bytes_served",
                "warm_replica_pages",
                "throughput",
                "local_fork_throughput",
                "criu_dump_ms",
                "criu_lazy_dump_median_ms",
                "criu_lazy_daemon_median_ms",
                "targets",
                "failures",
            ])
        );
        assert_eq!(seed["name"], "container");
        assert_eq!(seed["what"], "a \"seed\"\nin a container");
        let method_keys = sorted(vec![
            "key",
            "label",
            "samples",
            "attempted",
            "failures",
            "gave_up",
            "skipped",
            "median_ms",
            "p90_ms",
            "p99_ms",
            "min_ms",
            "vs_local_fork",
            "vs_plain",
        ]);
        let methods = seed["methods"].as_array().unwrap();
        assert!(methods.iter().all(|m| keys(m) == method_keys));
        // What plot.py reads: each method's key and median.
        let medians: Vec<(&Value, &Value)> = methods
            .iter()
            .map(|m| (&m["key"], &m["median_ms"]))
            .collect();
        assert_eq!(
            medians,
            [
                (&Value::from(COLD_START), &Value::Null),
                (&Value::from(LOCAL_FORK), &Value::from(2.0)),
                (&Value::from(MITOSIS_WARM), &Value::from(2.5)),
                (&Value::from(MITOSIS_WARM_TLS), &Value::from(3.0)),
            ]
        );
        assert_eq!(methods[2]["vs_local_fork"], 1.25);
        assert_eq!(methods[2]["vs_plain"], Value::Null);
        assert_eq!(methods[3]["vs_plain"], 1.2);
        assert_eq!(
            keys(&seed["mtls_stats_medians"]),
            ["cold_host", "warm_host"]
        );
        assert_eq!(seed["mtls_stats_medians"]["warm_host"]["fork_us"], 950);
        assert_eq!(methods[0]["skipped"], "no rootfs");
        assert_eq!(
            keys(&seed["prepare"]),
            sorted(vec![
                "samples",
                "wall_median_ms",
                "daemon_median_ms",
                "seed_stopped_median_ms",
                "last_line",
            ])
        );
        assert_eq!(seed["prepare"]["seed_stopped_median_ms"], 0.4);
        let phases = ["cold_host", "first_child", "warm_host"];
        assert_eq!(keys(&seed["stats_medians"]), phases);
        assert_eq!(
            keys(&seed["stats_medians"]["first_child"]),
            ["faults", "fork_us"]
        );
        assert_eq!(seed["stats_medians"]["warm_host"]["container_us"], 20);
        assert_eq!(
            keys(&seed["stats_medians"]["cold_host"]),
            Vec::<&str>::new()
        );
        assert_eq!(
            keys(&seed["private_kib_median"]),
            sorted(vec![LOCAL_FORK, MITOSIS_FIRST, MITOSIS_COLD, MITOSIS_WARM])
        );
        assert_eq!(seed["private_kib_median"][LOCAL_FORK], 200);
        assert_eq!(keys(&seed["bytes_served"]), phases);
        assert_eq!(seed["bytes_served"]["first_child"], Value::Null);
        assert_eq!(
            keys(&seed["bytes_served"]["warm_host"]),
            [
                "bytes",
                "children",
                "per_child",
                "seed_host_cpu_us_per_child"
            ]
        );
        assert_eq!(seed["bytes_served"]["warm_host"]["per_child"], 6144);
        assert_eq!(
            seed["bytes_served"]["warm_host"]["seed_host_cpu_us_per_child"],
            25.0
        );
        let throughput = &seed["throughput"];
        assert_eq!(
            keys(throughput),
            sorted(vec![
                "concurrency",
                "hosts",
                "secs",
                "children",
                "children_per_sec",
                "failures",
                "median_ms",
            ])
        );
        assert_eq!(throughput["children_per_sec"], 1200.5);
        assert_eq!(seed["local_fork_throughput"], Value::Null);
        assert_eq!(seed["criu_dump_ms"], 12.345);
        assert_eq!(seed["criu_lazy_dump_median_ms"], 80.0);
        assert_eq!(seed["criu_lazy_daemon_median_ms"], 40.0);
        assert_eq!(
            keys(&seed["profile"]),
            sorted(vec![
                "learning_stats_medians",
                "carried_stats_medians",
                "carried_pages_median",
            ])
        );
        let targets = seed["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 13, "with the containerizing target");
        assert!(
            targets
                .iter()
                .all(|t| keys(t) == sorted(vec!["key", "what", "goal", "value", "unit", "met"]))
        );
        assert_eq!(
            seed["failures"],
            serde_json::json!(["mitosis_warm_host: timed out", "throughput: refused"])
        );

        // A seed that measured nothing has nulls and empty lists, but every key.
        let empty = &doc["seeds"][1];
        assert_eq!(keys(empty), keys(seed));
        assert_eq!(empty["methods"], serde_json::json!([]));
        assert_eq!(empty["throughput"], Value::Null);
        assert_eq!(empty["prepare"]["wall_median_ms"], Value::Null);
    }

    #[test]
    fn writes_in_declaration_order_with_nulls() {
        let text = pretty(&Results {
            config: Config {
                children: 1,
                cold_samples: 1,
                warmup: 0,
                bigheap_mib: 1,
                throughput_secs: f64::NAN,
                concurrency: 1,
                pin: Some("0-1".into()),
                tls: false,
            },
            machine: Machine {
                cpus: 2,
                kernel: String::new(),
                criu: None,
                criu_lazy: Some("no uffd".into()),
            },
            seeds: Vec::new(),
        })
        .unwrap();
        let want = r#"{
  "config": {
    "children": 1,
    "cold_samples": 1,
    "warmup": 0,
    "bigheap_mib": 1,
    "throughput_secs": null,
    "concurrency": 1,
    "pin": "0-1",
    "tls": false
  },
  "machine": {
    "cpus": 2,
    "kernel": "",
    "criu": null,
    "criu_lazy": "no uffd"
  },
  "seeds": []
}
"#;
        assert_eq!(text, want);
    }
}
