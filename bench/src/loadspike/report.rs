//! Per-policy figures, the targets of the issue, results.json and the printed table.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Value, json};

use super::memory::Sample;
use super::runner::PolicyRun;

/// What results.json says of one policy.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub policy: String,
    /// Repetitions the figures are over.
    pub rounds: usize,
    pub invocations: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Processes started cold from the bundle during the replays (the platform's count:
    /// fn-cache starts one for a call that finds no idle instance, even when that call then
    /// takes another instance freed first).
    pub cold_starts: usize,
    /// Answered calls whose process started cold for them (`Mitosis-Start: cold`).
    pub cold_calls: usize,
    pub warm_starts: usize,
    pub forks: usize,
    pub mean_pss_mib: f64,
    pub peak_pss_mib: f64,
    /// PSS integrated over the run, MiB x s: the memory "summed over the run" (mean of the
    /// rounds).
    pub pss_mib_s: f64,
    pub peak_processes: usize,
    /// Most processes running the function at once (seeds, children, kept instances).
    pub peak_instances: usize,
    pub peak_seeds: usize,
    pub peak_replicas: usize,
    /// Seconds from the replay's start to the last answer (mean of the rounds).
    pub secs: f64,
    /// Calls sent more than 50 ms after their time (the load generator fell behind).
    pub late_sends: usize,
    /// The machine's 1-minute load average as the replay started (mean of the rounds).
    pub loadavg: f64,
}

/// Nearest-rank percentile of sorted `xs` (0 if empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Trapezoid integral of PSS over the samples, MiB x s.
pub fn integral(samples: &[Sample]) -> f64 {
    samples
        .windows(2)
        .map(|w| (w[1].t - w[0].t) * (w[0].pss_mib + w[1].pss_mib) / 2.0)
        .sum()
}

/// One policy over its rounds: latencies over every call of every round, failed ones too
/// (request to error: a failure is not faster than the calls that waited for it); memory
/// (mean, MiB·s) the mean of the rounds', peaks the highest.
pub fn summarize(runs: &[&PolicyRun]) -> Summary {
    let calls = || runs.iter().flat_map(|r| r.calls.iter());
    let mut all: Vec<f64> = calls().map(|c| c.latency_ms).collect();
    all.sort_by(f64::total_cmp);
    let starts = |kind: &str| calls().filter(|c| c.start == kind).count();
    let n = runs.len().max(1) as f64;
    let (mut area, mut mean) = (0.0, 0.0);
    for r in runs {
        let s = &r.samples;
        let span = s.last().map_or(0.0, |l| l.t) - s.first().map_or(0.0, |f| f.t);
        let a = integral(s);
        area += a / n;
        mean += if span > 0.0 { a / span / n } else { 0.0 };
    }
    let samples = || runs.iter().flat_map(|r| r.samples.iter());
    Summary {
        policy: runs.first().map(|r| r.policy.clone()).unwrap_or_default(),
        rounds: runs.len(),
        invocations: calls().count(),
        failed: calls().filter(|c| !c.ok()).count(),
        p50_ms: percentile(&all, 50.0),
        p90_ms: percentile(&all, 90.0),
        p99_ms: percentile(&all, 99.0),
        p999_ms: percentile(&all, 99.9),
        max_ms: all.last().copied().unwrap_or(0.0),
        cold_starts: runs.iter().map(|r| r.cold_started).sum(),
        cold_calls: starts("cold"),
        warm_starts: starts("warm"),
        forks: starts("fork"),
        mean_pss_mib: mean,
        peak_pss_mib: samples().map(|x| x.pss_mib).fold(0.0, f64::max),
        pss_mib_s: area,
        peak_processes: samples().map(|x| x.processes).max().unwrap_or(0),
        peak_instances: samples().map(|x| x.instances).max().unwrap_or(0),
        peak_seeds: samples().map(|x| x.seeds).max().unwrap_or(0),
        peak_replicas: samples().map(|x| x.replicas).max().unwrap_or(0),
        secs: runs.iter().map(|r| r.secs).sum::<f64>() / n,
        late_sends: calls().filter(|c| c.late_ms > 50.0).count(),
        loadavg: runs.iter().map(|r| r.loadavg).sum::<f64>() / n,
    }
}

/// The runs grouped by policy, in the order the policies first ran.
pub fn by_policy(runs: &[PolicyRun]) -> Vec<Vec<&PolicyRun>> {
    let mut out: Vec<Vec<&PolicyRun>> = Vec::new();
    for r in runs {
        match out.iter_mut().find(|g| g[0].policy == r.policy) {
            Some(g) => g.push(r),
            None => out.push(vec![r]),
        }
    }
    out
}

/// The targets, where both sides ran: (what, met, how far).
pub fn targets(summaries: &[Summary]) -> Vec<(String, bool, String)> {
    let get = |p: &str| summaries.iter().find(|s| s.policy == p);
    let mut out = Vec::new();
    if let (Some(r), Some(c)) = (get("remote-fork"), get("fn-cache")) {
        let cut = 1.0 - r.p99_ms / c.p99_ms;
        out.push((
            "remote-fork p99 >= 89% lower than fn-cache".to_owned(),
            cut >= 0.89,
            format!(
                "{:.0} vs {:.0} ms: {:.1}% lower",
                r.p99_ms,
                c.p99_ms,
                cut * 100.0
            ),
        ));
        let ratio = c.pss_mib_s / r.pss_mib_s;
        out.push((
            "remote-fork memory over the run >= 10x less than fn-cache".to_owned(),
            ratio >= 10.0,
            format!(
                "{:.0} vs {:.0} MiB·s: {ratio:.2}x less",
                r.pss_mib_s, c.pss_mib_s
            ),
        ));
    }
    if let (Some(r), Some(l)) = (get("remote-fork"), get("local-fork")) {
        let ratio = r.p99_ms / l.p99_ms;
        out.push((
            "remote-fork p99 within 1.5x of local-fork".to_owned(),
            ratio <= 1.5,
            format!(
                "{:.0} vs {:.0} ms: {ratio:.2}x; seeds {} vs {}",
                r.p99_ms, l.p99_ms, r.peak_seeds, l.peak_seeds
            ),
        ));
    }
    out
}

/// The table: one line per policy (all rounds), then one per round when there are several.
pub fn print(runs: &[PolicyRun]) {
    let groups = by_policy(runs);
    let summaries: Vec<Summary> = groups.iter().map(|g| summarize(g)).collect();
    print_table(&summaries);
    if groups.iter().any(|g| g.len() > 1) {
        println!("\n  each round:");
        let rounds: Vec<Summary> = runs
            .iter()
            .map(|r| {
                let mut s = summarize(&[r]);
                s.policy = format!("{} #{}", r.policy, r.round + 1);
                s
            })
            .collect();
        print_table(&rounds);
    }
    println!();
    for (what, met, detail) in targets(&summaries) {
        println!(
            "  [{}] {what}: {detail}",
            if met { "met" } else { "NOT met" }
        );
    }
}

fn print_table(summaries: &[Summary]) {
    println!();
    println!(
        "{:<15} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9} {:>9} {:>10} {:>6} {:>6}",
        "policy",
        "calls",
        "failed",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "cold",
        "warm",
        "fork",
        "mean MiB",
        "peak MiB",
        "MiB·s",
        "inst.",
        "load"
    );
    for s in summaries {
        println!(
            "{:<15} {:>6} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>6} {:>6} {:>9.1} {:>9.1} {:>10.0} {:>6} {:>6.1}",
            s.policy,
            s.invocations,
            s.failed,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.cold_starts,
            s.warm_starts,
            s.forks,
            s.mean_pss_mib,
            s.peak_pss_mib,
            s.pss_mib_s,
            s.peak_instances,
            s.loadavg
        );
    }
}

/// The markdown table of the README: each policy over all rounds, then each round.
pub fn markdown(runs: &[PolicyRun]) -> String {
    let mut out = String::from(
        "| policy | calls | failed | p50 ms | p90 ms | p99 ms | p99.9 ms | cold starts | mean PSS MiB | peak PSS MiB | MiB·s | peak instances (seeds, replicas) | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let groups = by_policy(runs);
    let mut rows: Vec<Summary> = groups.iter().map(|g| summarize(g)).collect();
    if groups.iter().any(|g| g.len() > 1) {
        for s in &mut rows {
            s.policy = format!("**{}** (all)", s.policy);
        }
        rows.extend(runs.iter().map(|r| {
            let mut s = summarize(&[r]);
            s.policy = format!("{} #{}", r.policy, r.round + 1);
            s
        }));
    }
    for s in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.0} | {} ({}, {}) | {:.1} |\n",
            s.policy,
            s.invocations,
            s.failed,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.cold_starts,
            s.mean_pss_mib,
            s.peak_pss_mib,
            s.pss_mib_s,
            s.peak_instances,
            s.peak_seeds,
            s.peak_replicas,
            s.loadavg
        ));
    }
    out
}

/// results.json: the run's settings, each policy's summary (keyed by policy) with each
/// round's summary, calls and samples, and the targets.
pub fn write_json(path: &Path, settings: Value, runs: &[PolicyRun]) -> Result<()> {
    let mut policies = serde_json::Map::new();
    let mut summaries = Vec::new();
    for group in by_policy(runs) {
        let s = summarize(&group);
        let mut v = serde_json::to_value(&s)?;
        let mut rounds = Vec::new();
        for r in &group {
            let mut round = serde_json::to_value(summarize(&[*r]))?;
            let obj = round.as_object_mut().context("a summary is an object")?;
            obj.insert("round".into(), json!(r.round));
            obj.insert("calls".into(), serde_json::to_value(&r.calls)?);
            obj.insert("samples".into(), serde_json::to_value(&r.samples)?);
            rounds.push(round);
        }
        let obj = v.as_object_mut().context("a summary is an object")?;
        obj.insert("per_round".into(), Value::Array(rounds));
        policies.insert(s.policy.clone(), v);
        summaries.push(s);
    }
    let targets: Vec<Value> = targets(&summaries)
        .into_iter()
        .map(|(what, met, detail)| json!({"target": what, "met": met, "detail": detail}))
        .collect();
    let doc = json!({"settings": settings, "policies": policies, "targets": targets});
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&xs, 99.9), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
    }

    #[test]
    fn memory_is_integrated_over_time() {
        let s = |t: f64, pss_mib: f64| Sample {
            t,
            pss_mib,
            processes: 0,
            instances: 0,
            seeds: 0,
            replicas: 0,
            children: 0,
        };
        assert_eq!(integral(&[s(0.0, 10.0), s(1.0, 30.0), s(3.0, 30.0)]), 80.0);
    }
}
