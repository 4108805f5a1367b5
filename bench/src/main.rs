//! `mitosis-bench`: remote fork against the baselines, for a warmed numpy Python function.
//!
//! In one run, on a two-host testbed, it measures for `examples/python/seed_fn.py`:
//!
//! - cold start: `python3 seed_fn.py --once` on host 1, spawn to answer;
//! - local fork: `seed_fn.py --fork-server` on host 0, request written to answer read;
//! - mitosis remote fork: a seed on host 0, prepared once, `mitosis resume` on host 1, spawn of
//!   the CLI to the child's answer (plus the daemon-side resume time from `--stats`);
//! - CRIU (when `criu check` passes): `criu dump --leave-running` of a seed, then
//!   `criu restore` once per child on host 1, spawn to answer.
//!
//! Every answer is checked against the cold start's answer to the same request.

mod criu;
mod procs;
mod stats;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mitosis_testbed::{DaemonConfig, Host, Testbed, TestbedConfig};

use procs::{Server, on_path, run_ok, run_timed, same_answer};
use stats::{Summary, median, median_u64, ms, ratio};

/// The port the testbed's daemons listen on.
const DAEMON_PORT: u16 = 7070;
/// Failed children after which the mitosis section gives up.
const MAX_FAILURES: usize = 5;

/// Benchmark mitosis remote fork against cold start, local fork and CRIU.
///
/// Needs root (network namespaces, ptrace, userfaultfd).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Samples per method (remote children, local forks, cold starts, criu restores).
    #[arg(long, default_value_t = 50)]
    children: usize,
    /// Directory holding mitosisd, mitosis-stub and mitosis [default: this binary's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The seed script [default: $MITOSIS_EXAMPLES/python/seed_fn.py, else
    /// examples/python/seed_fn.py next to the build directory or the current directory].
    #[arg(long)]
    script: Option<PathBuf>,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Fresh seeds to prepare for the prepare-time median (the last one serves the children).
    #[arg(long, default_value_t = 5)]
    prepares: usize,
    /// Unmeasured runs of every method before its samples.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Pin the benchmark and everything it starts (daemons, seeds, children) to these CPUs,
    /// with `taskset -c` (e.g. `2,3` or `0-1`).
    #[arg(long, value_name = "CPUS")]
    pin: Option<String>,
}

fn main() {
    match run(Args::parse()) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("mitosis-bench: {err:#}");
            std::process::exit(1);
        }
    }
}

/// The paths the benchmark needs.
struct Setup {
    mitosis: PathBuf,
    script: PathBuf,
    python: String,
}

fn run(args: Args) -> Result<i32> {
    anyhow::ensure!(args.children > 0, "--children must be at least 1");
    anyhow::ensure!(args.prepares > 0, "--prepares must be at least 1");
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => exe
            .parent()
            .context("this binary has no directory")?
            .to_owned(),
    };
    let bin = |name: &str| -> Result<PathBuf> {
        let path = bin_dir.join(name);
        anyhow::ensure!(
            path.is_file(),
            "{} not found (build with `cargo build --release` and pass --bin-dir)",
            path.display()
        );
        Ok(path.canonicalize()?)
    };
    let daemon = bin("mitosisd")?;
    bin("mitosis-stub")?;
    let setup = Setup {
        mitosis: bin("mitosis")?,
        script: find_script(args.script.as_deref(), &bin_dir)?,
        python: args.python.clone(),
    };

    if let Some(cpus) = &args.pin {
        anyhow::ensure!(on_path("taskset"), "--pin needs `taskset` (util-linux)");
        let mut cmd = Command::new("taskset");
        cmd.args(["-a", "-p", "-c", cpus])
            .arg(std::process::id().to_string());
        run_ok(cmd).context("pinning with taskset")?;
    }

    let n = args.children;
    let requests: Vec<String> = (1..=n).map(request).collect();
    let warmup: Vec<String> = (0..args.warmup).map(|i| request(1000 + i)).collect();

    println!("mitosis-bench");
    println!(
        "  seed: {} {} (numpy, single-threaded BLAS)",
        setup.python,
        setup.script.display()
    );
    println!(
        "  bins: {}   samples per method: {n}   warm-up runs: {}   pinned: {}",
        bin_dir.display(),
        args.warmup,
        args.pin.as_deref().unwrap_or("no")
    );

    let testbed =
        Testbed::new(TestbedConfig::new(2).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)))
            .context("building the two-host testbed (needs root and iproute2)")?;
    let (src, dst) = (testbed.host(0), testbed.host(1));
    println!(
        "  testbed {}: seed host {}, child host {}",
        testbed.id(),
        src.addr(),
        dst.addr()
    );
    println!();

    let result = bench(&args, &setup, &testbed, src, dst, &warmup, &requests);
    if let Err(err) = testbed.teardown() {
        eprintln!("mitosis-bench: teardown: {err}");
    }
    result
}

/// `{"n": i}`.
fn request(i: usize) -> String {
    format!("{{\"n\": {i}}}")
}

/// Finds the seed script.
fn find_script(given: Option<&Path>, bin_dir: &Path) -> Result<PathBuf> {
    const REL: &str = "python/seed_fn.py";
    let mut candidates = Vec::new();
    if let Some(path) = given {
        candidates.push(path.to_owned());
    } else {
        if let Some(dir) = std::env::var_os("MITOSIS_EXAMPLES") {
            candidates.push(PathBuf::from(dir).join(REL));
        }
        candidates.push(bin_dir.join("../../examples").join(REL));
        candidates.push(PathBuf::from("examples").join(REL));
    }
    for candidate in &candidates {
        if candidate.is_file() {
            return candidate
                .canonicalize()
                .with_context(|| format!("resolving {}", candidate.display()));
        }
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    bail!(
        "seed_fn.py not found (tried {}); pass --script or set MITOSIS_EXAMPLES",
        tried.join(", ")
    )
}

/// What the mitosis section measured.
#[derive(Default)]
struct MitosisResult {
    /// Wall time of `mitosis prepare`, per fresh seed.
    prepare_wall: Vec<Duration>,
    /// Daemon-reported prepare time and seed stop time, per seed.
    prepare_us: Vec<u64>,
    stopped_us: Vec<u64>,
    /// The `--stats` line of the last prepare.
    prepare_line: String,
    /// Spawn of `mitosis resume` to the child's answer, for children that answered right.
    latency: Vec<Duration>,
    /// Per child: daemon-side resume time, faults, pages fetched, round trips.
    resume_us: Vec<u64>,
    faults: Vec<u64>,
    pages: Vec<u64>,
    fetches: Vec<u64>,
    /// Children that failed or answered wrongly, with what they printed.
    failures: Vec<String>,
    aborted: bool,
}

fn bench(
    args: &Args,
    setup: &Setup,
    testbed: &Testbed,
    src: &Host,
    dst: &Host,
    warmup: &[String],
    requests: &[String],
) -> Result<i32> {
    let n = requests.len();

    // Cold start on the child host; its answers are the expected ones.
    eprintln!("[1/4] cold start: {n} x `python3 seed_fn.py --once` on host 1");
    let mut cold = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    for (i, req) in warmup.iter().chain(requests).enumerate() {
        let mut cmd = dst.command(&setup.python);
        cmd.arg(&setup.script).arg("--once");
        let run = run_timed(cmd, req)?;
        if run.status != 0 || run.answer.is_empty() {
            bail!(
                "cold start failed (status {}): {}",
                run.status,
                run.stderr.trim()
            );
        }
        if i >= warmup.len() {
            cold.push(run.latency);
            expected.push(run.answer);
        }
    }

    // Local fork on the seed host.
    eprintln!("[2/4] local fork: `seed_fn.py --fork-server` on host 0, {n} requests");
    let mut local = Vec::with_capacity(n);
    let mut local_wrong = Vec::new();
    {
        let mut cmd = src.command(&setup.python);
        cmd.arg(&setup.script).arg("--fork-server");
        let mut server = Server::start(cmd)?;
        for req in warmup {
            server.request(req)?;
        }
        for (req, want) in requests.iter().zip(&expected) {
            let (elapsed, answer) = server.request(req)?;
            if !same_answer(&answer, want) {
                local_wrong.push(answer);
            }
            local.push(elapsed);
        }
    }

    eprintln!(
        "[3/4] mitosis: {} prepare(s) on host 0, {n} remote children on host 1",
        args.prepares
    );
    let mitosis = bench_mitosis(args, setup, src, dst, warmup, requests, &expected)?;

    let criu = match criu::available() {
        Err(why) => {
            eprintln!("[4/4] criu: not available ({why}), skipped");
            None
        }
        Ok(()) => {
            eprintln!("[4/4] criu: dump of a seed on host 0, {n} restores on host 1");
            let result = criu::dump(
                src,
                &setup.python,
                &setup.script,
                &testbed.dir().join("criu"),
            )
            .and_then(|dumped| dumped.restore_all(dst, warmup, requests, &expected));
            match result {
                Ok(result) => Some(Ok(result)),
                Err(err) => Some(Err(format!("{err:#}"))),
            }
        }
    };

    // Report.
    println!(
        "{:<34} {:>11} {:>11} {:>11} {:>11} {:>8}",
        "latency (spawn/request to answer)", "median", "p90", "p99", "min", "samples"
    );
    let row = |name: &str, samples: &[Duration]| match Summary::of(samples) {
        Some(s) => println!(
            "{name:<34} {:>11} {:>11} {:>11} {:>11} {:>8}",
            ms(s.median),
            ms(s.p90),
            ms(s.p99),
            ms(s.min),
            s.samples
        ),
        None => println!("{name:<34} {:>11}", "-"),
    };
    let resume: Vec<Duration> = mitosis
        .resume_us
        .iter()
        .map(|&us| Duration::from_micros(us))
        .collect();
    row("cold start (python3 --once)", &cold);
    row("local fork (os.fork)", &local);
    row("mitosis remote fork", &mitosis.latency);
    row("  daemon-side resume (--stats)", &resume);
    let criu_restores = match &criu {
        None => {
            println!("criu: not available, skipped");
            Vec::new()
        }
        Some(Err(err)) => {
            println!("criu: failed: {err}");
            Vec::new()
        }
        Some(Ok(result)) => {
            row("criu restore (same machine)", &result.restores);
            result.restores.clone()
        }
    };

    println!();
    let prepare_us: Vec<Duration> = mitosis
        .prepare_us
        .iter()
        .map(|&us| Duration::from_micros(us))
        .collect();
    let stopped: Vec<Duration> = mitosis
        .stopped_us
        .iter()
        .map(|&us| Duration::from_micros(us))
        .collect();
    println!(
        "mitosis prepare ({} fresh seed{}): median {} wall (CLI included), {} in the daemon, seed stopped {}",
        mitosis.prepare_wall.len(),
        if mitosis.prepare_wall.len() == 1 {
            ""
        } else {
            "s"
        },
        opt_ms(median(&mitosis.prepare_wall)),
        opt_ms(median(&prepare_us)),
        opt_ms(median(&stopped))
    );
    if !mitosis.prepare_line.is_empty() {
        println!(
            "  last: {}",
            mitosis.prepare_line.trim_start_matches("mitosis: ")
        );
    }
    if let Some(Ok(result)) = &criu {
        println!("criu dump (--leave-running, 1 seed): {}", ms(result.dump));
    }
    println!(
        "mitosis children (median): {} page faults, {} pages fetched in {} round trips",
        opt_num(median_u64(&mitosis.faults)),
        opt_num(median_u64(&mitosis.pages)),
        opt_num(median_u64(&mitosis.fetches))
    );

    println!();
    println!("ratios of medians:");
    let med = |s: &[Duration]| median(s).unwrap_or_default();
    let (cold_m, local_m, remote_m) = (med(&cold), med(&local), med(&mitosis.latency));
    println!(
        "  cold start / mitosis remote fork   {:>8.1}x",
        ratio(cold_m, remote_m)
    );
    println!(
        "  mitosis remote fork / local fork   {:>8.1}x",
        ratio(remote_m, local_m)
    );
    if !criu_restores.is_empty() {
        println!(
            "  criu restore / mitosis remote fork {:>8.1}x",
            ratio(med(&criu_restores), remote_m)
        );
    }

    println!();
    let mut bad = false;
    let ok_children = mitosis.latency.len();
    println!(
        "answers: mitosis {ok_children}/{n} correct, local fork {}/{n} correct{}",
        n - local_wrong.len(),
        match &criu {
            Some(Ok(r)) => format!(", criu {}/{n} correct", n - r.wrong.len()),
            _ => String::new(),
        }
    );
    if mitosis.aborted {
        println!("mitosis: gave up after {MAX_FAILURES} failed children");
    }
    for failure in mitosis.failures.iter().take(MAX_FAILURES) {
        bad = true;
        println!("mitosis child failed: {failure}");
    }
    for answer in local_wrong.iter().take(3) {
        bad = true;
        println!("local fork answered wrongly: {answer}");
    }
    if let Some(Ok(r)) = &criu {
        for answer in r.wrong.iter().take(3) {
            bad = true;
            println!("criu child answered wrongly: {answer}");
        }
    }
    Ok(if bad { 1 } else { 0 })
}

fn bench_mitosis(
    args: &Args,
    setup: &Setup,
    src: &Host,
    dst: &Host,
    warmup: &[String],
    requests: &[String],
    expected: &[String],
) -> Result<MitosisResult> {
    let mut result = MitosisResult::default();
    let cli = |host: &Host| {
        let mut cmd = host.command(&setup.mitosis);
        cmd.arg("--socket").arg(host.socket_path());
        cmd
    };

    // Fresh seeds, each prepared once; all but the last are dropped again.
    let mut kept = None;
    for i in 0..args.prepares {
        let mut cmd = src.command(&setup.python);
        cmd.arg(&setup.script);
        let seed = Server::start(cmd)?;
        let mut cmd = cli(src);
        cmd.args(["prepare", "--pid", &seed.pid().to_string(), "--stats"]);
        let (wall, stdout, stderr) = run_ok(cmd).context("mitosis prepare")?;
        let handle = stdout.lines().next().unwrap_or("").trim().to_owned();
        anyhow::ensure!(!handle.is_empty(), "mitosis prepare printed no handle");
        result.prepare_wall.push(wall);
        if let Some(line) = stderr.lines().find(|l| l.starts_with("mitosis: prepared")) {
            result.prepare_us.extend(number_after(line, "prepared in "));
            result
                .stopped_us
                .extend(number_after(line, "seed stopped "));
            result.prepare_line = line.to_owned();
        }
        if i + 1 == args.prepares {
            kept = Some((seed, handle));
        } else {
            let mut cmd = cli(src);
            cmd.args(["drop", &handle]);
            run_ok(cmd).context("mitosis drop")?;
        }
    }
    let (seed, handle) = kept.expect("at least one prepare");

    for (i, req) in warmup.iter().chain(requests).enumerate() {
        let measured = i.checked_sub(warmup.len());
        let mut cmd = cli(dst);
        cmd.args(["resume", &handle, "--stats"]);
        let run = match run_timed(cmd, req) {
            Ok(run) => run,
            Err(err) => {
                result.failures.push(format!("{req}: {err:#}"));
                if result.failures.len() >= MAX_FAILURES {
                    result.aborted = true;
                    break;
                }
                continue;
            }
        };
        let Some(index) = measured else { continue };
        let right = run.status == 0 && same_answer(&run.answer, &expected[index]);
        if !right {
            result.failures.push(format!(
                "{req}: status {}, answer {:?} (expected {}), stderr:\n    {}",
                run.status,
                run.answer,
                expected[index],
                run.stderr.trim_end().replace('\n', "\n    ")
            ));
            if result.failures.len() >= MAX_FAILURES {
                result.aborted = true;
                break;
            }
            continue;
        }
        result.latency.push(run.latency);
        if let Some(line) = run
            .stderr
            .lines()
            .find(|l| l.starts_with("mitosis: resume "))
        {
            result.resume_us.extend(number_after(line, "resume "));
            result.faults.extend(number_after(line, "faults "));
            result.pages.extend(number_after(line, "fetched "));
            result.fetches.extend(number_after(line, " pages in "));
        }
    }

    let mut cmd = cli(src);
    cmd.args(["drop", &handle]);
    // Best effort: the testbed goes away next anyway.
    let _ = run_ok(cmd);
    drop(seed);
    Ok(result)
}

/// The decimal number right after the first `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), ms)
}

fn opt_num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stats_lines() {
        let resume = "mitosis: resume 14600us (connect 100us, descriptor 200us, spawn 300us, restore 400us, eager pages 12); faults 321 (zero 20), fetched 300 pages in 17 round trips, 9000us";
        assert_eq!(number_after(resume, "resume "), Some(14600));
        assert_eq!(number_after(resume, "faults "), Some(321));
        assert_eq!(number_after(resume, "fetched "), Some(300));
        assert_eq!(number_after(resume, " pages in "), Some(17));
        let prepare = "mitosis: prepared in 28566us (seed stopped 1330us), 255 mappings, 4201 pages, descriptor 36511 bytes";
        assert_eq!(number_after(prepare, "prepared in "), Some(28566));
        assert_eq!(number_after(prepare, "seed stopped "), Some(1330));
        assert_eq!(number_after(prepare, "nothing "), None);
    }
}
