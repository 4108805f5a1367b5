//! The printed report: one table per seed, then a summary across seeds.

use std::time::Duration;

use crate::results::{
    COLD_START, CRIU, CRIU_LAZY, LOCAL_FORK, MITOSIS_COLD, MITOSIS_COLD_TLS, MITOSIS_FIRST,
    MITOSIS_FIRST_PROFILE, MITOSIS_WARM, MITOSIS_WARM_CLI, MITOSIS_WARM_TLS, STATS_KEYS,
    SeedResult, Throughput,
};
use crate::stats::{Summary, median, median_u64, ms};
use crate::targets;

/// How many failures of one method are printed.
const SHOWN_FAILURES: usize = 3;

/// Prints the table of one seed.
pub fn seed_table(r: &SeedResult) {
    println!();
    println!("== {} ({}) ==", r.name, r.what);
    if let Some(err) = &r.error {
        println!("stopped early: {err}");
    }
    println!(
        "{:<30} {:>11} {:>11} {:>11} {:>13} {:>9}",
        "spawn to answer", "median", "p90", "p99", "vs local fork", "ok/tried"
    );
    for m in &r.methods {
        if let Some(why) = &m.skipped {
            println!("{:<30} {why}", m.label);
            continue;
        }
        let ok = format!("{}/{}", m.latencies.len(), m.attempted);
        match Summary::of(&m.latencies) {
            Some(s) => println!(
                "{:<30} {:>11} {:>11} {:>11} {:>13} {:>9}",
                m.label,
                ms(s.median),
                ms(s.p90),
                ms(s.p99),
                r.vs_local(m.key)
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x")),
                ok
            ),
            None => println!("{:<30} {:>11} {:>48}", m.label, "-", ok),
        }
    }

    if !r.prepares.is_empty() {
        let walls: Vec<Duration> = r.prepares.iter().map(|p| p.wall).collect();
        let (daemon, stopped) = r.prepare_medians_us();
        println!(
            "mitosis prepare (median of {}): {} wall, {} in the daemon, seed stopped {}",
            walls.len(),
            opt_ms(median(&walls)),
            opt_us(daemon),
            opt_us(stopped)
        );
    }
    if let Some(cells) = tls_cost(r) {
        println!("mTLS between daemons (medians): {cells}");
    }
    let rows = [
        ("  first child", &r.first),
        ("  first child (profile, learning)", &r.first_learning),
        ("  first child (profile)", &r.first_profile),
        ("  cold host", &r.cold),
        ("  warm host", &r.warm),
        ("  cold host (mTLS)", &r.cold_tls),
        ("  warm host (mTLS)", &r.warm_tls),
    ];
    if rows.iter().any(|(_, n)| !n.stats.is_empty()) {
        print!("{:<30}", "--stats medians");
        for key in STATS_KEYS {
            print!(" {key:>13}");
        }
        println!();
        for (label, numbers) in rows {
            if numbers.stats.is_empty() && (label.ends_with("(mTLS)") || label.contains("profile"))
            {
                continue;
            }
            print!("{label:<30}");
            for key in STATS_KEYS {
                let v = SeedResult::stat_median(&numbers.stats, key);
                print!(
                    " {:>13}",
                    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
                );
            }
            println!();
        }
    }
    if let Some((take, join, both)) = r.containerizing_us() {
        println!(
            "containerizing a child (warm host, median): {both} us = taking a container {take} us + joining it {join} us (part of fork_us)"
        );
    }
    let kib = |v: &[u64]| median_u64(v).map_or_else(|| "-".to_owned(), mib_of_kib);
    println!(
        "private memory per child (median): local fork {}, mitosis warm host {}, cold host {}, first child {}",
        kib(&r.local_private_kib),
        kib(&r.warm.private_kib),
        kib(&r.cold.private_kib),
        kib(&r.first.private_kib)
    );
    let served = |s: Option<crate::results::Served>| match s {
        Some(s) => format!(
            "{} over {} children ({}/child)",
            bytes(s.bytes),
            s.children,
            s.per_child().map_or_else(|| "-".to_owned(), bytes)
        ),
        None => "-".to_owned(),
    };
    println!(
        "bytes served by the seed's host: first child {}; cold host {}; warm host {}",
        served(r.first.served),
        served(r.cold.served),
        served(r.warm.served)
    );
    let cpu = |s: Option<crate::results::Served>| {
        s.and_then(|s| s.cpu_us_per_child())
            .map_or_else(|| "-".to_owned(), |us| format!("{us:.0} us"))
    };
    println!(
        "CPU of the seed's host's daemon per child: first child {}; cold host {}; warm host {}",
        cpu(r.first.served),
        cpu(r.cold.served),
        cpu(r.warm.served)
    );
    if let Some(pages) = r.replica_pages {
        println!(
            "warm host replica: {pages} pages ({}) fetched from the seed",
            bytes(pages * 4096)
        );
    }
    // Seconds, children, children/s, median latency and failures of a children/s run.
    let figures = |t: &Throughput| {
        format!(
            "{:.1} s: {} children, {:.1} children/s, median {}, {} failed",
            t.elapsed.as_secs_f64(),
            t.children,
            t.per_sec(),
            opt_ms(median(&t.latencies)),
            t.failures.len()
        )
    };
    if let Some(t) = &r.throughput {
        println!(
            "throughput: {} concurrent in-process resume loops on {} hosts for {}",
            t.concurrency,
            t.hosts,
            figures(t)
        );
    }
    if let Some(t) = &r.local_throughput {
        println!(
            "local fork throughput: {} children at once from one seed for {}",
            t.concurrency,
            figures(t)
        );
    }
    if let Some(d) = r.criu_dump {
        println!("criu dump (--leave-running): {}", ms(d));
    }
    if !r.criu_lazy_dump.is_empty() {
        println!(
            "criu lazy migration, before the restore (medians, not in its row): lazy dump until serving {}, lazy-pages daemon until ready {}",
            opt_ms(median(&r.criu_lazy_dump)),
            opt_ms(median(&r.criu_lazy_daemon))
        );
    }
    if let Some(x) = r.criu_lazy_vs_cold() {
        println!("mitosis cold (new) host vs criu lazy migration: {x:.1}x faster");
    }
    for m in &r.methods {
        if m.gave_up {
            println!("{}: gave up after {} failures", m.label, m.failures.len());
        }
        for f in m.failures.iter().take(SHOWN_FAILURES) {
            println!("{} failed: {}", m.label, shorten(f));
        }
    }
    for (what, t) in [
        ("throughput", &r.throughput),
        ("local fork throughput", &r.local_throughput),
    ] {
        for f in t
            .iter()
            .flat_map(|t| t.failures.iter().take(SHOWN_FAILURES))
        {
            println!("{what} child failed: {}", shorten(f));
        }
    }
}

/// Prints the summary across seeds: medians in ms, with the ratio to the local fork, then
/// the targets and whether each is met.
pub fn summary(results: &[SeedResult]) {
    println!();
    println!(
        "summary: median spawn-to-answer in ms (x local fork); children/s with concurrent resumes, and with as many concurrent local forks"
    );
    let columns = [
        (COLD_START, "cold start"),
        (LOCAL_FORK, "local fork"),
        (MITOSIS_FIRST, "first child"),
        (MITOSIS_FIRST_PROFILE, "first (profile)"),
        (MITOSIS_COLD, "cold host"),
        (MITOSIS_WARM, "warm host"),
        (MITOSIS_WARM_CLI, "warm (CLI)"),
        (CRIU, "criu restore"),
        (CRIU_LAZY, "criu lazy"),
    ];
    print!("{:<9}", "seed");
    for (_, title) in columns {
        print!(" {title:>16}");
    }
    println!(" {:>11} {:>11}", "children/s", "local/s");
    let per_sec = |t: &Option<Throughput>| {
        t.as_ref()
            .map_or_else(|| "-".to_owned(), |t| format!("{:.1}", t.per_sec()))
    };
    for r in results {
        print!("{:<9}", r.name);
        for (key, _) in columns {
            print!(" {:>16}", cell(r, key));
        }
        println!(
            " {:>11} {:>11}",
            per_sec(&r.throughput),
            per_sec(&r.local_throughput)
        );
    }
    let tls: Vec<(&str, String)> = results
        .iter()
        .filter_map(|r| Some((r.name, tls_cost(r)?)))
        .collect();
    if !tls.is_empty() {
        println!();
        println!("mTLS between daemons: medians, and the ratio to plain daemons");
        for (name, cells) in tls {
            println!("{name:<9} {cells}");
        }
    }
    println!();
    println!("targets (prepare: medians of the first-child prepares)");
    for r in results {
        for t in targets::of(r) {
            println!(
                "{:<9} {:<40} {:>8} {:>12}  {}",
                r.name,
                t.what,
                t.goal,
                t.shown(),
                t.verdict()
            );
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.name)
        .collect();
    if failed.is_empty() {
        println!("all answers matched the cold start's");
    } else {
        println!("failures in: {} (see the tables above)", failed.join(", "));
    }
}

/// What mutual TLS between daemons costs the cold and warm hosts: each TLS row's median
/// beside its plain row's; `None` without TLS rows.
fn tls_cost(r: &SeedResult) -> Option<String> {
    let rows = [
        ("cold host", MITOSIS_COLD, MITOSIS_COLD_TLS),
        ("warm host", MITOSIS_WARM, MITOSIS_WARM_TLS),
    ];
    r.method(MITOSIS_COLD_TLS)?;
    let cells: Vec<String> = rows
        .iter()
        .map(|&(what, plain, tls)| {
            let median = |key| r.method(key).and_then(|m| m.median());
            match (median(tls), median(plain), r.vs_plain(tls)) {
                (Some(t), Some(p), Some(x)) => {
                    format!("{what} {} vs {} plain ({x:.2}x)", ms(t), ms(p))
                }
                (t, p, _) => format!("{what} {} vs {} plain", opt_ms(t), opt_ms(p)),
            }
        })
        .collect();
    Some(cells.join("; "))
}

/// One summary cell: the median (and ratio to the local fork), or why there is none.
fn cell(r: &SeedResult, key: &str) -> String {
    match r.method(key) {
        Some(m) if m.skipped.is_some() => "skipped".to_owned(),
        Some(m) => match (m.median(), r.vs_local(key)) {
            (Some(d), Some(x)) if key != LOCAL_FORK => {
                format!("{:.2} ({x:.1}x)", d.as_secs_f64() * 1e3)
            }
            (Some(d), _) => format!("{:.2}", d.as_secs_f64() * 1e3),
            (None, _) => "failed".to_owned(),
        },
        None => "-".to_owned(),
    }
}

/// A failure message cut to a readable length (the JSON file has all of it).
fn shorten(text: &str) -> String {
    const MAX: usize = 400;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{} [...]", &text[..end]),
        None => text.to_owned(),
    }
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), ms)
}

fn opt_us(us: Option<u64>) -> String {
    us.map_or_else(|| "-".to_owned(), |us| ms(Duration::from_micros(us)))
}

fn mib_of_kib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

/// A byte count in B, KiB or MiB.
pub fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(mib_of_kib(1536), "1.50 MiB");
        assert_eq!(shorten("short"), "short");
        assert_eq!(shorten(&"x".repeat(500)).len(), 400 + " [...]".len());
    }
}
