//! `mitosis-bench loadspike`: one load spike, the same arrivals replayed against each start
//! policy of the platform (remote-fork, fn-cache, local-fork, cold), on one testbed.
//!
//! The load is a synthetic spike (steady low rate, a burst, idle) or an Azure Functions
//! trace ([`trace`]), compressed in time and capped in rate ([`arrivals`]); calls are sent
//! open loop ([`runner`]) while [`memory`] samples the PSS of every function process.
//! [`report`] writes `results.json` and prints the table, [`plots`] draws the PNGs.

pub mod arrivals;
pub mod interrupt;
pub mod memory;
pub mod plots;
pub mod report;
pub mod runner;
pub mod trace;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use mitosis_platform::{Config, HostSpec};
use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig};
use serde_json::json;

use arrivals::{Profile, Replay, Rng, Spike};
use memory::Daemon;
use runner::{Function, Runner};

const DAEMON_PORT: u16 = 7070;
const POLICIES: [&str; 4] = ["remote-fork", "fn-cache", "local-fork", "cold"];

/// Replay one load spike against every start policy of the platform (needs root).
///
/// Without --trace the load is the synthetic spike: --base-rate calls/s for --base-secs,
/// --spike-factor times that for --spike-secs, then --idle-secs of nothing.
#[derive(Parser, Debug)]
#[command(name = "mitosis-bench loadspike")]
pub struct Args {
    /// An Azure Functions trace (2019 per-minute counts or 2021 per-invocation rows).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// The trace's format, azure2019 or azure2021 [default: from its header].
    #[arg(long)]
    pub format: Option<trace::Format>,
    /// 2019 format: replay only this function (1-based data row) [default: all rows summed].
    #[arg(long)]
    pub row: Option<usize>,
    /// First trace minute replayed (0-based).
    #[arg(long, default_value_t = 0)]
    pub start_minute: usize,
    /// Trace minutes replayed [default: all from --start-minute].
    #[arg(long)]
    pub minutes: Option<usize>,
    /// Time compression: one trace minute lasts this many seconds.
    #[arg(long, default_value_t = 2.0)]
    pub minute_secs: f64,
    /// Every trace count times this.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// No interval's rate above this many calls per second (trace or spike).
    #[arg(long, default_value_t = 30.0)]
    pub rate_cap: f64,
    /// Synthetic spike: the steady rate (calls/s) and how long it lasts.
    #[arg(long, default_value_t = 1.0)]
    pub base_rate: f64,
    #[arg(long, default_value_t = 15.0)]
    pub base_secs: f64,
    /// Synthetic spike: the burst's rate as a multiple of the steady one, and its length.
    #[arg(long, default_value_t = 20.0)]
    pub spike_factor: f64,
    #[arg(long, default_value_t = 4.0)]
    pub spike_secs: f64,
    /// Synthetic spike: seconds without calls after the burst.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
    /// The policies, comma-separated, run in this order on the same arrivals.
    #[arg(long, default_value = "remote-fork,fn-cache,local-fork,cold")]
    pub policies: String,
    /// Run the policies this many times, in turn (the machine's load drifts).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Simulated hosts.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// The random seed of the arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The function: its OCI bundle, memory (MiB), timeout and idle_timeout (s, Fn's).
    #[arg(long, default_value = "/var/lib/mitosis/bundles/python")]
    pub bundle: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    #[arg(long, default_value_t = 120)]
    pub timeout: u32,
    #[arg(long, default_value_t = 30)]
    pub idle_timeout: u32,
    /// The request line every call sends. The default asks for about 150 ms, the original
    /// system's image function: 12 ms of image work here, then 150 ms waiting as for a
    /// storage service (`io_ms`; `{"n": 3}` alone is the image work without the wait).
    #[arg(long, default_value = r#"{"n": 3, "io_ms": 150}"#)]
    pub request: String,
    /// Unmeasured calls before each replay (they wait for the seeds).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Memory sampling period, ms.
    #[arg(long, default_value_t = 250)]
    pub sample_ms: u64,
    /// Where results.json and the PNGs go [default: target/loadspike].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The TrueType font of the plots.
    #[arg(long, default_value = plots::DEFAULT_FONT)]
    pub font: PathBuf,
    /// Skip the plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Directory holding mitosisd, mitosis-stub and mitosis-init [default: this binary's].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// The load as a rate profile, and a line saying what it is.
fn profile(args: &Args) -> Result<(Profile, String)> {
    anyhow::ensure!(args.rate_cap > 0.0, "--rate-cap must be above 0");
    match &args.trace {
        Some(path) => {
            anyhow::ensure!(args.minute_secs > 0.0, "--minute-secs must be above 0");
            let t = trace::read(path, args.format, args.row)
                .with_context(|| format!("reading the trace {}", path.display()))?
                .window(args.start_minute, args.minutes);
            anyhow::ensure!(t.total() > 0, "no invocations in the replayed minutes");
            let replay = Replay {
                minute_secs: args.minute_secs,
                scale: args.scale,
                cap: args.rate_cap,
            };
            let what = format!(
                "trace {} ({} minutes from minute {}, {} invocations; a minute in {} s, x{}, cap {}/s)",
                path.display(),
                t.counts.len(),
                args.start_minute,
                t.total(),
                args.minute_secs,
                args.scale,
                args.rate_cap
            );
            Ok((replay.profile(&t), what))
        }
        None => {
            let spike = Spike {
                base_rate: args.base_rate,
                base_secs: args.base_secs,
                factor: args.spike_factor,
                spike_secs: args.spike_secs,
                idle_secs: args.idle_secs,
            };
            let what = format!(
                "synthetic spike: {}/s for {} s, {}x for {} s, idle {} s (cap {}/s)",
                args.base_rate,
                args.base_secs,
                args.spike_factor,
                args.spike_secs,
                args.idle_secs,
                args.rate_cap
            );
            Ok((spike.profile(args.rate_cap), what))
        }
    }
}

/// `name` in `dir`, the directory of the workspace's binaries (the workflow bench's too).
pub(crate) fn sibling(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found (build with `cargo build --release --workspace --bins`, or --bin-dir)",
        path.display()
    );
    Ok(path.canonicalize()?)
}

pub fn main(argv: impl IntoIterator<Item = String>) -> Result<i32> {
    run(&Args::parse_from(argv))
}

pub fn run(args: &Args) -> Result<i32> {
    let started = Instant::now();
    let policies: Vec<&str> = args.policies.split(',').map(str::trim).collect();
    for p in &policies {
        anyhow::ensure!(
            POLICIES.contains(p),
            "unknown policy {p:?}: one of {POLICIES:?}"
        );
    }
    anyhow::ensure!(args.hosts > 0, "--hosts must be at least 1");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        args.bundle.join("config.json").is_file(),
        "no OCI bundle at {} (scripts/setup.sh makes it)",
        args.bundle.display()
    );
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => exe.parent().context("no directory")?.to_owned(),
    };
    let daemon = sibling(&bin_dir, "mitosisd")?;
    sibling(&bin_dir, "mitosis-stub")?;
    sibling(&bin_dir, "mitosis-init")?;
    let out_dir = match (&args.out_dir, bin_dir.parent()) {
        (Some(d), _) => d.clone(),
        (None, Some(target)) => target.join("loadspike"),
        (None, None) => PathBuf::from("loadspike"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let (profile, what) = profile(args)?;
    let arrivals = arrivals::arrivals(&profile, &mut Rng::new(args.seed));
    anyhow::ensure!(!arrivals.is_empty(), "the load has no arrivals");
    println!("mitosis-bench loadspike");
    println!("  load: {what}");
    println!(
        "  {} calls ({:.0} expected) over {:.1} s (peak {:.1}/s), open loop, seed {}; policies {}",
        arrivals.len(),
        profile.expected(),
        profile.secs(),
        profile.peak(),
        args.seed,
        policies.join(", ")
    );

    interrupt::catch();
    let testbed = Testbed::new(
        TestbedConfig::new(args.hosts).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)),
    )
    .context("building the testbed (needs root and iproute2)")?;
    println!("  testbed {}: {} hosts", testbed.id(), args.hosts);
    let result = run_on(args, &testbed, &policies, &profile, &arrivals, &out_dir);
    if let Err(e) = testbed.teardown() {
        eprintln!("mitosis-bench loadspike: teardown: {e}");
    }
    if interrupt::stopped() {
        eprintln!("mitosis-bench loadspike: interrupted; torn down");
        return Ok(130);
    }
    let code = result?;
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    Ok(code)
}

fn run_on(
    args: &Args,
    testbed: &Testbed,
    policies: &[&str],
    profile: &Profile,
    arrivals: &[Duration],
    out_dir: &Path,
) -> Result<i32> {
    let daemons = testbed
        .hosts()
        .iter()
        .map(|h| {
            Ok(Daemon {
                pid: h.daemon_pid().context("a host without its daemon")?,
                socket: h.socket_path().to_owned(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // A cold start may take as long as the call may (Fn waits for a container within the
    // call's timeout), not the platform's default 60 s: under a storm of cold starts on two
    // cores they take tens of seconds, and a call failed at 60 s would measure the limit.
    let config = Config {
        seed_ready_timeout: Duration::from_secs(u64::from(args.timeout)),
        ..Config::default()
    };
    let api =
        mitosis_platform::background::Background::start(config, HostSpec::of_testbed(testbed))
            .context("starting the platform")?;
    let runner = Runner {
        api: api.addr,
        app_id: Runner::create_app(api.addr, "loadspike")?,
        daemons,
        sample_every: Duration::from_millis(args.sample_ms.max(10)),
        warmup_calls: args.warmup.unwrap_or(args.hosts),
        function: Function {
            bundle: &args.bundle,
            memory_mib: args.memory,
            timeout_s: args.timeout,
            idle_timeout_s: args.idle_timeout,
            request: &args.request,
        },
        expected: std::sync::Mutex::new(None),
    };
    let mut runs = Vec::new();
    for (round, policy) in (0..args.rounds).flat_map(|r| policies.iter().map(move |p| (r, p))) {
        let t = Instant::now();
        eprintln!(
            "[{policy}] round {}: replaying {} calls",
            round + 1,
            arrivals.len()
        );
        let mut run = runner.run(policy, arrivals, profile.secs())?;
        if interrupt::stopped() {
            anyhow::bail!("interrupted");
        }
        run.round = round;
        let s = report::summarize(&[&run]);
        eprintln!(
            "[{policy}] done in {:.1} s: p50 {:.0} ms, p99 {:.0} ms, {} cold, {} failed",
            t.elapsed().as_secs_f64(),
            s.p50_ms,
            s.p99_ms,
            s.cold_starts,
            s.failed
        );
        if let Some(c) = run.calls.iter().find(|c| !c.ok()) {
            eprintln!(
                "[{policy}] first failure: {} {}",
                c.status,
                c.error.as_deref().unwrap_or("")
            );
        }
        runs.push(run);
    }
    drop(api);

    report::print(&runs);
    let settings = json!({
        "load": profile.intervals.iter().map(|i| json!([i.secs, i.rate])).collect::<Vec<_>>(),
        "arrivals": arrivals.len(),
        "seed": args.seed,
        "rounds": args.rounds,
        "hosts": args.hosts,
        "trace": args.trace,
        "function": {"bundle": args.bundle, "memory": args.memory, "timeout": args.timeout,
                     "idle_timeout": args.idle_timeout, "request": args.request},
        "argv": std::env::args().collect::<Vec<_>>(),
    });
    let json_path = out_dir.join("results.json");
    report::write_json(&json_path, settings, &runs)?;
    std::fs::write(out_dir.join("results.md"), report::markdown(&runs))?;
    println!("\n  wrote {}", json_path.display());
    if !args.no_plots {
        for p in plots::draw(out_dir, &args.font, &runs, arrivals)? {
            println!("  wrote {}", p.display());
        }
    }
    // Calls that failed under the load (a policy's timeouts) are a result, in the table and
    // results.json, not a failure of the benchmark.
    Ok(0)
}
