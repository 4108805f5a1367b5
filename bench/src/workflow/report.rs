//! The workflow benchmark's medians, ratios and targets: the table it prints and
//! `results.json`.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Args, Run};

/// The targets: remote fork at least this much faster than pickle through Redis at
/// the largest N, and the first validator's start within this factor of a local fork's.
pub const TARGET_REDUCTION: f64 = 0.86;
pub const TARGET_FIRST_START_RATIO: f64 = 2.0;

/// The name each method has in results.json (`{name}_ms`, `{name}_first_start_ms`).
pub fn name(method: &str) -> &'static str {
    match method {
        "mitosis" => "mitosis",
        "mitosis-staged" => "mitosis_staged",
        "mitosis-filled" => "mitosis_filled",
        "redis" => "pickle_redis",
        "files" => "files",
        "fork" => "local_fork",
        _ => "other",
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians of one method over the rounds of one (size, N).
#[derive(Debug, Clone, Default)]
pub struct MethodSummary {
    pub total_ms: Option<f64>,
    pub first_start_ms: Option<f64>,
    pub handoff_ms: Option<f64>,
    /// Per validator (all rounds): private dirty and PSS at the end of its rule, in MiB.
    pub private_dirty_mib: Option<f64>,
    pub pss_mib: Option<f64>,
    /// Per validator phases (ms): state (fetch + unpickle, or nothing), import, rule.
    pub import_ms: Option<f64>,
    pub state_ms: Option<f64>,
    pub rule_ms: Option<f64>,
    /// Remote fork only, per validator: the daemon's start of it (ms), its page faults, the
    /// pages fetched from the producer's host for it and the time spent fetching (ms).
    pub resume_ms: Option<f64>,
    pub faults: Option<f64>,
    pub pages_fetched: Option<f64>,
    pub fetch_ms: Option<f64>,
    /// Remote fork: the prepare in the daemon (ms) and the pages the seed had.
    pub prepare_daemon_ms: Option<f64>,
    pub seed_pages: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub data_mib: f64,
    pub table_mib: f64,
    pub validators: usize,
    pub rounds: usize,
    pub reference_ms: f64,
    pub verdicts_match: bool,
    pub methods: Vec<(String, MethodSummary)>,
}

impl Summary {
    pub fn method(&self, m: &str) -> Option<&MethodSummary> {
        self.methods.iter().find(|(k, _)| k == m).map(|(_, s)| s)
    }

    /// 1 - mitosis / redis (end to end).
    pub fn reduction_vs_redis(&self) -> Option<f64> {
        self.reduction_of("mitosis")
    }

    /// 1 - `method` / redis (end to end).
    pub fn reduction_of(&self, method: &str) -> Option<f64> {
        let m = self.method(method)?.total_ms?;
        let r = self.method("redis")?.total_ms?;
        Some(1.0 - m / r)
    }

    /// First validator's start: mitosis / local fork.
    pub fn first_start_ratio(&self) -> Option<f64> {
        let m = self.method("mitosis")?.first_start_ms?;
        let f = self.method("fork")?.first_start_ms?;
        Some(m / f)
    }
}

fn detail(runs: &[&Run], method: &str, f: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    median(
        runs.iter()
            .filter_map(|r| r.methods.get(method))
            .flat_map(|m| m.validators.iter().filter_map(&f))
            .collect(),
    )
}

pub fn summarize(runs: &[Run], methods: &[String]) -> Vec<Summary> {
    let mut keys: Vec<(f64, usize)> = Vec::new();
    for r in runs {
        if !keys.contains(&(r.data_mib, r.validators)) {
            keys.push((r.data_mib, r.validators));
        }
    }
    keys.iter()
        .map(|&(mib, n)| {
            let group: Vec<&Run> = runs
                .iter()
                .filter(|r| r.data_mib == mib && r.validators == n)
                .collect();
            let per = |m: &str, f: fn(&super::MethodRun) -> Option<f64>| {
                median(
                    group
                        .iter()
                        .filter_map(|r| r.methods.get(m).and_then(f))
                        .collect(),
                )
            };
            let methods = methods
                .iter()
                .map(|m| {
                    let s = MethodSummary {
                        total_ms: per(m, |x| Some(x.total_ms)),
                        first_start_ms: per(m, |x| x.first_start_ms),
                        handoff_ms: per(m, |x| Some(x.handoff_ms)),
                        private_dirty_mib: detail(&group, m, |v| {
                            Some(v["mem"]["Private_Dirty"].as_f64()? / 1024.0)
                        }),
                        pss_mib: detail(&group, m, |v| Some(v["mem"]["Pss"].as_f64()? / 1024.0)),
                        import_ms: detail(&group, m, |v| v["phases"]["import_ms"].as_f64()),
                        state_ms: detail(&group, m, |v| v["phases"]["state_ms"].as_f64()),
                        rule_ms: detail(&group, m, |v| v["phases"]["rule_ms"].as_f64()),
                        resume_ms: detail(&group, m, |v| {
                            Some(v["daemon"]["start"]["total_us"].as_f64()? / 1e3)
                        }),
                        faults: detail(&group, m, |v| v["daemon"]["faults"]["faults"].as_f64()),
                        pages_fetched: detail(&group, m, |v| {
                            v["daemon"]["faults"]["pages_fetched"].as_f64()
                        }),
                        fetch_ms: detail(&group, m, |v| {
                            Some(v["daemon"]["faults"]["fetch_us"].as_f64()? / 1e3)
                        }),
                        prepare_daemon_ms: per(m, |x| Some(x.prepare["total_us"].as_f64()? / 1e3)),
                        seed_pages: per(m, |x| x.prepare["seed_pages"].as_f64()),
                    };
                    (m.clone(), s)
                })
                .collect();
            Summary {
                data_mib: mib,
                table_mib: median(
                    group
                        .iter()
                        .flat_map(|r| r.methods.values().map(|m| m.table_mib))
                        .collect(),
                )
                .unwrap_or(mib),
                validators: n,
                rounds: group.len(),
                reference_ms: group.first().map_or(f64::NAN, |r| r.reference_ms),
                verdicts_match: group.iter().all(|r| r.verdicts_match()),
                methods,
            }
        })
        .collect()
}

fn f(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".to_owned(), |v| format!("{v:.digits$}"))
}

/// The targets, each with whether it is met: the reduction at the largest N of each size,
/// the first-start ratio for every row.
/// The remote-fork methods, each measured against the targets.
const REMOTE_FORK: [&str; 3] = ["mitosis", "mitosis-staged", "mitosis-filled"];
/// Memory per validator "only what it writes": within this factor of a local fork's child,
/// which holds exactly what it wrote.
pub const TARGET_PRIVATE_VS_FORK: f64 = 1.1;

pub fn targets(summary: &[Summary]) -> Vec<Value> {
    let mut out = Vec::new();
    let largest = summary.iter().map(|s| s.validators).max().unwrap_or(0);
    for s in summary {
        if s.validators == largest {
            for m in REMOTE_FORK {
                if let Some(red) = s.reduction_of(m) {
                    out.push(json!({
                        "target": format!("remote fork ({m}) >= {:.0}% faster than pickle through Redis, {} validators, {} MiB",
                                          TARGET_REDUCTION * 100.0, s.validators, s.data_mib),
                        "measured": red, "met": red >= TARGET_REDUCTION,
                    }));
                }
            }
            if let Some(red) = s.reduction_of("fork") {
                out.push(json!({
                    "target": format!("  floor: local fork against pickle through Redis, {} validators, {} MiB",
                                      s.validators, s.data_mib),
                    "measured": red, "met": null,
                }));
            }
            let fork = s.method("fork").and_then(|x| x.private_dirty_mib);
            for m in REMOTE_FORK {
                if let (Some(mine), Some(fork)) =
                    (s.method(m).and_then(|x| x.private_dirty_mib), fork)
                {
                    let ratio = mine / fork;
                    out.push(json!({
                        "target": format!("memory per validator ({m}): private dirty <= {TARGET_PRIVATE_VS_FORK}x a local fork's, {} validators, {} MiB",
                                          s.validators, s.data_mib),
                        "measured": ratio, "met": ratio <= TARGET_PRIVATE_VS_FORK,
                    }));
                }
            }
        }
        if let Some(r) = s.first_start_ratio() {
            out.push(json!({
                "target": format!("first validator's start <= {TARGET_FIRST_START_RATIO}x a local fork's, {} validators, {} MiB",
                                  s.validators, s.data_mib),
                "measured": r, "met": r <= TARGET_FIRST_START_RATIO,
            }));
        }
    }
    out
}

pub fn print(summary: &[Summary], runs: &[Run]) {
    println!(
        "\nEnd to end, from the loaded state to the aggregated report (medians of {} round(s), ms):",
        summary.first().map_or(0, |s| s.rounds)
    );
    println!(
        "{:>8} {:>5} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7} | {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} | {:>6}",
        "data MiB",
        "N",
        "mitosis",
        "staged",
        "filled",
        "redis",
        "files",
        "fork",
        "1 proc",
        "vs redis",
        "stg/redis",
        "fil/redis",
        "fork/redis",
        "vs files",
        "vs fork",
        "match"
    );
    let pct = |r: Option<f64>| {
        r.map_or("-".into(), |r| {
            if r >= 0.0 {
                format!("-{:.0}%", r * 100.0)
            } else {
                format!("+{:.0}%", -r * 100.0)
            }
        })
    };
    for s in summary {
        let t = |m: &str| s.method(m).and_then(|x| x.total_ms);
        let ratio = |m: &str| Some(t("mitosis")? / t(m)?);
        println!(
            "{:>8} {:>5} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7.0} | {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} | {:>6}",
            format!("{:.0} ({:.1})", s.data_mib, s.table_mib),
            s.validators,
            f(t("mitosis"), 0),
            f(t("mitosis-staged"), 0),
            f(t("mitosis-filled"), 0),
            f(t("redis"), 0),
            f(t("files"), 0),
            f(t("fork"), 0),
            s.reference_ms,
            pct(s.reduction_vs_redis()),
            pct(s.reduction_of("mitosis-staged")),
            pct(s.reduction_of("mitosis-filled")),
            pct(s.reduction_of("fork")),
            f(ratio("files"), 2),
            f(ratio("fork"), 2),
            if s.verdicts_match { "yes" } else { "NO" }
        );
    }
    println!(
        "\nFirst validator's start after the state is loaded (medians, ms), and the hand-off:"
    );
    println!(
        "{:>8} {:>5} | {:>8} {:>8} {:>6} | {:>12} {:>12} {:>12}",
        "data MiB", "N", "mitosis", "fork", "ratio", "prepare", "redis SET", "file write"
    );
    for s in summary {
        let g = |m: &str| s.method(m).and_then(|x| x.first_start_ms);
        let h = |m: &str| s.method(m).and_then(|x| x.handoff_ms);
        println!(
            "{:>8} {:>5} | {:>8} {:>8} {:>6} | {:>12} {:>12} {:>12}",
            s.data_mib,
            s.validators,
            f(g("mitosis"), 1),
            f(g("fork"), 1),
            f(s.first_start_ratio(), 2),
            f(h("mitosis"), 1),
            f(h("redis"), 1),
            f(h("files"), 1)
        );
    }
    println!(
        "\nPer validator (medians over validators and rounds): memory at the end of its rule (MiB), phases (ms):"
    );
    println!(
        "{:>8} {:>5} {:>14} | {:>13} {:>8} | {:>8} {:>8} {:>8}",
        "data MiB", "N", "method", "private dirty", "PSS", "import", "state", "rule"
    );
    for s in summary {
        for (m, x) in &s.methods {
            println!(
                "{:>8} {:>5} {:>14} | {:>13} {:>8} | {:>8} {:>8} {:>8}",
                s.data_mib,
                s.validators,
                m,
                f(x.private_dirty_mib, 1),
                f(x.pss_mib, 1),
                f(x.import_ms, 0),
                f(x.state_ms, 1),
                f(x.rule_ms, 1)
            );
        }
    }
    println!(
        "\nRemote fork (medians): the producer's prepare in its daemon and the pages it had; per validator, the daemon's start of it and its page faults:"
    );
    println!(
        "{:>8} {:>5} {:>14} | {:>12} {:>10} | {:>10} {:>8} {:>13} {:>9}",
        "data MiB",
        "N",
        "method",
        "prepare (d)",
        "seed pages",
        "resume ms",
        "faults",
        "pages fetched",
        "fetch ms"
    );
    for (s, m, x) in summary.iter().flat_map(|s| {
        REMOTE_FORK
            .into_iter()
            .filter_map(move |m| Some((s, m, s.method(m)?)))
    }) {
        println!(
            "{:>8} {:>5} {:>14} | {:>12} {:>10} | {:>10} {:>8} {:>13} {:>9}",
            s.data_mib,
            s.validators,
            m,
            f(x.prepare_daemon_ms, 1),
            f(x.seed_pages, 0),
            f(x.resume_ms, 1),
            f(x.faults, 0),
            f(x.pages_fetched, 0),
            f(x.fetch_ms, 1)
        );
    }
    println!("\nTargets (issue 21):");
    for t in targets(summary) {
        println!(
            "  {:<90} {:>7.3}  {}",
            t["target"].as_str().unwrap_or(""),
            t["measured"].as_f64().unwrap_or(f64::NAN),
            match t["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "(floor)",
            }
        );
    }
    let bad: Vec<&Run> = runs.iter().filter(|r| !r.verdicts_match()).collect();
    for r in bad {
        for (m, x) in &r.methods {
            if x.digest.as_deref() != Some(&r.reference_digest) {
                println!(
                    "  {} MiB, {} validators, round {}: {m}'s verdicts differ from the single-process run's ({:?} vs {}) {}",
                    r.data_mib,
                    r.validators,
                    r.round + 1,
                    x.digest,
                    r.reference_digest,
                    x.failures.join("; ")
                );
            }
        }
    }
}

pub fn write_json(
    path: &Path,
    args: &Args,
    python: &str,
    runs: &[Run],
    summary: &[Summary],
) -> Result<()> {
    let runs: Vec<Value> = runs
        .iter()
        .map(|r| {
            let mut v = json!({
                "validators": r.validators,
                "data_mib": r.data_mib,
                "round": r.round,
                "single_process_ms": r.reference_ms,
                "verdicts_match": r.verdicts_match(),
                "reference_digest": r.reference_digest,
            });
            for (m, x) in &r.methods {
                v[format!("{}_ms", name(m))] = json!(x.total_ms);
                v[format!("{}_first_start_ms", name(m))] = json!(x.first_start_ms);
            }
            v["methods"] = r
                .methods
                .iter()
                .map(|(m, x)| {
                    (
                        m.clone(),
                        json!({
                            "total_ms": x.total_ms,
                            "first_start_ms": x.first_start_ms,
                            "handoff_ms": x.handoff_ms,
                            "load_ms": x.load_ms,
                            "table_mib": x.table_mib,
                            "digest": x.digest,
                            "failures": x.failures,
                            "validators": x.validators,
                            "prepare": x.prepare,
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
            v
        })
        .collect();
    let summary_json: Vec<Value> = summary
        .iter()
        .map(|s| {
            json!({
                "data_mib": s.data_mib,
                "table_mib": s.table_mib,
                "validators": s.validators,
                "rounds": s.rounds,
                "single_process_ms": s.reference_ms,
                "verdicts_match": s.verdicts_match,
                "reduction_vs_redis": s.reduction_vs_redis(),
                "reduction_vs_redis_staged": s.reduction_of("mitosis-staged"),
                "reduction_vs_redis_filled": s.reduction_of("mitosis-filled"),
                "reduction_vs_redis_local_fork": s.reduction_of("fork"),
                "first_start_ratio_vs_local_fork": s.first_start_ratio(),
                "methods": s.methods.iter().map(|(m, x)| (m.clone(), json!({
                    "total_ms": x.total_ms,
                    "first_start_ms": x.first_start_ms,
                    "handoff_ms": x.handoff_ms,
                    "private_dirty_mib_per_validator": x.private_dirty_mib,
                    "pss_mib_per_validator": x.pss_mib,
                    "import_ms": x.import_ms,
                    "state_ms": x.state_ms,
                    "rule_ms": x.rule_ms,
                    "resume_ms": x.resume_ms,
                    "faults_per_validator": x.faults,
                    "pages_fetched_per_validator": x.pages_fetched,
                    "fetch_ms_per_validator": x.fetch_ms,
                    "prepare_in_daemon_ms": x.prepare_daemon_ms,
                    "seed_pages": x.seed_pages,
                }))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let doc = json!({
        "benchmark": "mitosis-bench workflow (FINRA trade validation)",
        "settings": {
            "validators": args.validators,
            "data_mib": args.data_mib,
            "rounds": args.rounds,
            "methods": args.methods,
            "hosts": args.hosts,
            "seed": args.seed,
            "profile": args.profile,
            "python": python,
            "argv": std::env::args().collect::<Vec<_>>(),
            "definitions": {
                "total_ms": "producer's state loaded -> aggregated report (hand-off, all validators, aggregation)",
                "first_start_ms": "state loaded -> the first validator's first instruction (mitosis: fork_prepare + resume; fork: os.fork; baselines: pickle + store + process start, before imports)",
                "memory": "a validator's smaps_rollup at the end of its rule",
            },
        },
        "runs": runs,
        "summary": summary_json,
        "targets": targets(summary),
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(total_ms: f64, private_dirty_mib: f64) -> MethodSummary {
        MethodSummary {
            total_ms: Some(total_ms),
            private_dirty_mib: Some(private_dirty_mib),
            ..MethodSummary::default()
        }
    }

    #[test]
    fn every_remote_fork_method_meets_or_misses_the_targets_on_its_own() {
        let s = Summary {
            data_mib: 16.0,
            table_mib: 16.0,
            validators: 32,
            rounds: 1,
            reference_ms: 900.0,
            verdicts_match: true,
            methods: vec![
                ("mitosis".into(), method(2000.0, 69.0)),
                ("mitosis-filled".into(), method(1300.0, 40.0)),
                ("redis".into(), method(10000.0, 74.0)),
                ("fork".into(), method(1000.0, 40.0)),
            ],
        };
        let t = targets(&[s]);
        let find = |what: &str| {
            t.iter()
                .find(|t| t["target"].as_str().unwrap().contains(what))
                .unwrap_or_else(|| panic!("no target {what}: {t:?}"))
        };
        assert_eq!(find("(mitosis) >= 86%")["met"], false);
        assert_eq!(find("(mitosis-filled) >= 86%")["met"], true);
        assert_eq!(find("floor: local fork")["met"], Value::Null);
        assert_eq!(find("memory per validator (mitosis)")["met"], false);
        assert_eq!(find("memory per validator (mitosis-filled)")["met"], true);
        assert!(
            !t.iter()
                .any(|t| t["target"].as_str().unwrap().contains("staged"))
        );
    }
}
