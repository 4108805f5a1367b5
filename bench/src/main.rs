//! `mitosis-bench`: remote fork against the baselines, side by side, for five Python seeds.
//!
//! On a three-host testbed (seed on host 0), for each seed of `examples/python/` (`hello`,
//! `numpy`, `image`, `json`, `bigheap`, and `container`: image_fn.py of the OCI bundle made by
//! setup, seed and children in containers, baselines in its rootfs) it measures spawn to
//! answer of:
//!
//! - cold start: `python3 SEED --once` on host 1;
//! - local fork: `SEED --fork-server` on host 0, request written to answer read;
//! - mitosis first child: a fresh prepare of the seed, then a child on host 1: nothing is
//!   recorded anywhere yet;
//! - mitosis cold host: a child on host 1, which has no replica of the seed, while its working
//!   set was recorded by the first children on host 2;
//! - mitosis warm host: children on host 1, which holds the seed's replica;
//! - mitosis warm host (CLI): the same through `mitosis resume`, to show the CLI's own cost;
//! - CRIU (when `criu check` passes): `criu restore` of a dump of the seed on host 1.
//!
//! The mitosis rows but the CLI one start children in this process over the daemon's socket
//! (`mitosis-client`), as a platform would: the clock runs from the Resume request to the
//! answer line, as the local fork's runs from the request to the answer. Also reported: the
//! `--stats` breakdown, the private memory of each child, the bytes the seed's host served,
//! children per second with concurrent in-process resumes on hosts 1 and 2, and the targets
//! of the issue under work (targets.rs). Every answer is checked against the cold start's
//! answer to the same request. Results go to a JSON file and a PNG bar chart (drawn by
//! `bench/plot.py` with Pillow).

mod child;
mod cli;
mod criu;
mod daemon;
mod json;
mod methods;
mod output;
mod pipe;
mod procs;
mod remote;
mod report;
mod results;
mod seeds;
mod stats;
mod targets;
mod throughput;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig};

use cli::Mitosis;
use daemon::Origin;
use procs::{Server, on_path, run_ok};
use remote::{Remote, gave_up};
use results::{CRIU, MITOSIS_COLD, MITOSIS_WARM, MITOSIS_WARM_CLI, Method, SeedResult};
use seeds::Seed;

/// The port the testbed's daemons listen on.
const DAEMON_PORT: u16 = 7070;

/// Benchmark mitosis remote fork against cold start, local fork and CRIU, for five seeds.
///
/// Needs root (network namespaces, ptrace, userfaultfd).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Samples per method (cold starts, local forks, warm-host children, criu restores).
    #[arg(long, default_value_t = 50)]
    children: usize,
    /// Samples of the first-child and cold-host rows: each builds host 1's replica.
    #[arg(long, default_value_t = 10)]
    cold_samples: usize,
    /// The seeds to run, comma-separated.
    #[arg(long, default_value = "hello,numpy,image,json,bigheap,container")]
    seeds: String,
    /// The OCI bundle of the `container` seed (made by scripts/setup.sh); skipped if absent.
    #[arg(long, default_value = "/var/lib/mitosis/bundles/python")]
    bundle: PathBuf,
    /// Heap of the bigheap seed, in MiB.
    #[arg(long, default_value_t = 1024)]
    bigheap_mib: u64,
    /// Unmeasured runs of every method before its samples.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seconds of concurrent resumes for the children/s figure (0: skip).
    #[arg(long, default_value_t = 5.0)]
    throughput_secs: f64,
    /// Concurrent resume loops (threads) in the children/s run (split across hosts 1 and 2).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Where bench-results.json and bench-results.png go [default: target/bench-results].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Pin the benchmark and everything it starts (daemons, seeds, children) to these CPUs,
    /// with `taskset -c` (e.g. `2,3` or `0-1`).
    #[arg(long, value_name = "CPUS")]
    pin: Option<String>,
    /// Directory holding mitosisd, mitosis-stub and mitosis [default: this binary's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The examples/python directory [default: $MITOSIS_EXAMPLES/python, else found next to
    /// the build or source tree].
    #[arg(long)]
    examples: Option<PathBuf>,
    /// Python interpreter (needs numpy and Pillow).
    #[arg(long, default_value = "python3")]
    python: String,
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

fn run(args: Args) -> Result<i32> {
    anyhow::ensure!(args.children > 0, "--children must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(args.bigheap_mib > 0, "--bigheap-mib must be at least 1");
    let started = Instant::now();
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
    let mitosis = Mitosis {
        bin: bin("mitosis")?,
    };
    let examples = seeds::find_examples(args.examples.as_deref(), &bin_dir)?;
    let mut seeds = Vec::new();
    for name in seeds::parse_list(&args.seeds)? {
        if name == "container" {
            if !args.bundle.join("config.json").is_file() {
                println!(
                    "  container: no bundle at {} (scripts/setup.sh makes it), skipped",
                    args.bundle.display()
                );
                continue;
            }
            seeds.push(Seed::container(&args.bundle)?);
        } else {
            seeds.push(Seed::new(name, &examples, &args.python, args.bigheap_mib)?);
        }
    }
    let out_dir = match (&args.out_dir, bin_dir.parent()) {
        (Some(dir), _) => dir.clone(),
        (None, Some(target)) => target.join("bench-results"),
        (None, None) => PathBuf::from("bench-results"),
    };

    if let Some(cpus) = &args.pin {
        anyhow::ensure!(on_path("taskset"), "--pin needs `taskset` (util-linux)");
        let mut cmd = Command::new("taskset");
        cmd.args(["-a", "-p", "-c", cpus])
            .arg(std::process::id().to_string());
        run_ok(cmd).context("pinning with taskset")?;
    }

    println!("mitosis-bench");
    println!(
        "  seeds: {} in {} ({}; bigheap {} MiB)",
        args.seeds,
        examples.display(),
        args.python,
        args.bigheap_mib
    );
    println!(
        "  samples: {} per method, {} cold-host, {} warm-up   throughput: {} loops for {} s   pinned: {}",
        args.children,
        args.cold_samples,
        args.warmup,
        args.concurrency,
        args.throughput_secs,
        args.pin.as_deref().unwrap_or("no")
    );
    let criu_ok = criu::available();
    if let Err(why) = &criu_ok {
        println!("  criu: not available ({why}), skipped");
    }
    let testbed =
        Testbed::new(TestbedConfig::new(3).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)))
            .context("building the three-host testbed (needs root and iproute2)")?;
    println!(
        "  testbed {}: seed host {}, child hosts {} (all samples) and {} (working set, throughput)",
        testbed.id(),
        testbed.host(0).addr(),
        testbed.host(1).addr(),
        testbed.host(2).addr()
    );
    let remote = Remote {
        mitosis: &mitosis,
        seed_host: testbed.host(0),
        child_hosts: [testbed.host(1), testbed.host(2)],
        warmup: args.warmup,
    };
    let mut results = Vec::new();
    for seed in &seeds {
        let result = bench_seed(&args, seed, &remote, &testbed, &criu_ok);
        report::seed_table(&result);
        results.push(result);
    }
    if let Err(err) = testbed.teardown() {
        eprintln!("mitosis-bench: teardown: {err}");
    }

    report::summary(&results);
    output::write(&args, &results, &out_dir, &criu_ok)?;
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    Ok(if results.iter().any(SeedResult::failed) {
        1
    } else {
        0
    })
}

/// Runs every method for one seed. Failures are recorded in the result, never returned.
fn bench_seed(
    args: &Args,
    seed: &Seed,
    remote: &Remote,
    testbed: &Testbed,
    criu_ok: &Result<(), String>,
) -> SeedResult {
    let mut out = SeedResult::new(seed.name, seed.what);
    let (n, warmup) = (args.children, args.warmup);
    let [host1, _] = remote.child_hosts;
    let step = |what: String| eprintln!("[{}] {what}", seed.name);

    let rootfs = match &seed.bundle {
        Some(b) => format!(" in {} (chroot)", b.rootfs.display()),
        None => String::new(),
    };
    step(format!(
        "cold start: {n} x `{} --once` on host 1{rootfs}",
        seed.script.display()
    ));
    let (cold, pairs) = methods::cold_start(seed, host1, warmup, n);
    out.methods.push(cold);
    if pairs.is_empty() {
        out.error = Some("no cold start answered: nothing to check answers against".to_owned());
        return out;
    }

    step(format!(
        "local fork: {n} requests to `--fork-server` on host 0"
    ));
    let (local, private) = methods::local_fork(seed, remote.seed_host, warmup, n, &pairs);
    out.methods.push(local);
    out.local_private_kib = private;

    // A bundle's seed is started by the daemon at each prepare, in a container of its own.
    let (server, origin) = match &seed.bundle {
        Some(bundle) => (None, Origin::Bundle(&bundle.dir)),
        None => {
            step("starting the seed on host 0".to_owned());
            match Server::start(seed.command(remote.seed_host, &[])) {
                Ok(server) => {
                    let pid = server.pid();
                    (Some(server), Origin::Process(pid))
                }
                Err(err) => {
                    out.error = Some(format!("starting the seed: {err:#}"));
                    return out;
                }
            }
        }
    };
    let fresh = match origin {
        Origin::Process(_) => "fresh prepare on host 0",
        Origin::Bundle(_) => "the bundle started and prepared on host 0",
    };
    step(format!(
        "mitosis first child: {} x ({fresh}, child on host 1)",
        args.cold_samples
    ));
    remote.first_child(origin, &pairs, args.cold_samples, &mut out);
    step("prepare once, working set recorded by the first children on host 2".to_owned());
    match remote.prepare_recorded(origin) {
        Ok(handle) => {
            remote_rows(args, remote, &handle, &pairs, &mut out);
            if let Err(err) = daemon::drop_seed(remote.seed_host, &handle) {
                eprintln!("  warning: {err:#}");
            }
        }
        Err(why) => {
            for (key, label) in [
                (MITOSIS_COLD, "mitosis cold host"),
                (MITOSIS_WARM, "mitosis warm host"),
                (MITOSIS_WARM_CLI, "mitosis warm host (CLI)"),
            ] {
                out.methods.push(gave_up(key, label, why.clone()));
            }
        }
    }
    if args.throughput_secs > 0.0 {
        step(format!(
            "local fork children/s: `--fork-pool {}` on host 0 for {} s",
            args.concurrency, args.throughput_secs
        ));
        out.local_throughput = Some(methods::local_fork_throughput(
            seed,
            remote.seed_host,
            &pairs,
            args.concurrency,
            args.throughput_secs,
        ));
    }
    drop(server);

    out.methods.push(match criu_ok {
        Err(why) => Method::skipped(CRIU, criu::LABEL, format!("not available ({why}), skipped")),
        Ok(()) if seed.bundle.is_some() => Method::skipped(
            CRIU,
            criu::LABEL,
            "not run for a containerized seed".to_owned(),
        ),
        Ok(()) => {
            step(format!(
                "criu: dump of the seed on host 0, {n} restores on host 1"
            ));
            let dir = testbed.dir().join(format!("criu-{}", seed.name));
            match criu::dump(remote.seed_host, seed, &dir) {
                Ok(dumped) => {
                    out.criu_dump = Some(dumped.dump_time());
                    dumped.restore_all(host1, warmup, n, &pairs)
                }
                Err(err) => {
                    let mut m = Method::new(CRIU, criu::LABEL);
                    m.fail(format!("dump: {err:#}"));
                    m.gave_up = true;
                    m
                }
            }
        }
    });
    out
}

/// The rows of one prepared `handle` whose working set is recorded: cold host, warm host
/// (in-process, then through the CLI) and children/s.
fn remote_rows(
    args: &Args,
    remote: &Remote,
    handle: &str,
    pairs: &[methods::Pair],
    out: &mut SeedResult,
) {
    let (n, name) = (args.children, out.name);
    let step = |what: String| eprintln!("[{name}] {what}");
    step(format!(
        "mitosis cold host: {} x (child on host 1, then evict its replica)",
        args.cold_samples
    ));
    remote.cold_host(handle, pairs, args.cold_samples, out);
    step(format!("mitosis warm host: {n} children on host 1"));
    remote.warm_host(handle, pairs, n, out);
    step(format!(
        "mitosis warm host (CLI): {n} x `mitosis resume` on host 1"
    ));
    remote.warm_host_cli(handle, pairs, n, out);
    if args.throughput_secs > 0.0 {
        step(format!(
            "children/s: {} resume loops on hosts 1 and 2 for {} s",
            args.concurrency, args.throughput_secs
        ));
        out.throughput =
            Some(remote.throughput(handle, pairs, args.concurrency, args.throughput_secs));
    }
}
