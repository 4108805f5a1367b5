//! `mitosis-bench`: remote fork against the baselines, side by side, for five Python seeds.
//! `mitosis-bench loadspike`: the platform's start policies under one load spike
//! ([`loadspike`]).
//! `mitosis-bench workflow`: the FINRA trade-validation workflow, its state handed to its
//! validators by remote fork against pickle through Redis, shared files and local fork
//! ([`workflow`]).
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
//! - mitosis first child (profile, learning) and (profile): two new processes of the seed's
//!   program per sample, prepared under a profile (`prepare --profile`), a child of each on
//!   host 1: the first child teaches the profile, the second starts with it (profile.rs);
//! - mitosis cold host: a child on host 1, which has no replica of the seed, while its working
//!   set was recorded by the first children on host 2;
//! - mitosis warm host: children on host 1, which holds the seed's replica;
//! - mitosis warm host (CLI): the same through `mitosis resume`, to show the CLI's own cost;
//! - with `--tls`, mitosis cold host and warm host (mTLS): the same two rows on a second
//!   three-host testbed whose daemons use mutual TLS (a CA and host certificates made at
//!   start with rcgen), with the ratio of each to its plain row;
//! - CRIU (when a `criu` on PATH passes `criu check`): `criu restore` on host 1 of a dump of
//!   the seed; and CRIU's lazy migration to a new host: per child, a lazy dump of the seed on
//!   host 0 serving its memory over TCP, restored on host 1 with `criu lazy-pages` fetching
//!   from it (criu.rs).
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
mod fetch;
mod json;
mod loadspike;
mod many;
mod methods;
mod output;
mod pipe;
mod platform;
mod procs;
mod profile;
mod remote;
mod report;
mod results;
mod seeds;
mod stats;
mod targets;
mod throughput;
mod transfer;
mod workflow;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use mitosis_testbed::{DaemonConfig, Host, Testbed, TestbedConfig, pki};

use cli::Mitosis;
use daemon::Origin;
use procs::{Server, on_path, run_ok};
use remote::{Remote, Row, gave_up};
use results::{
    CRIU, CRIU_LAZY, MITOSIS_COLD, MITOSIS_COLD_TLS, MITOSIS_WARM, MITOSIS_WARM_CLI,
    MITOSIS_WARM_TLS, Method, SeedResult,
};
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
    /// Samples of the first-child, cold-host and CRIU lazy migration rows: each builds host
    /// 1's replica, or moves the seed's memory to host 1.
    #[arg(long, default_value_t = 10)]
    cold_samples: usize,
    /// The seeds to run, comma-separated.
    #[arg(
        long,
        default_value = "hello,numpy,numpy-as-written,image,json,bigheap,container"
    )]
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
    /// Also prepare this many seeds of the first seed in the list, and start their first
    /// children on a new host, one after the other and all at once (0: skip).
    #[arg(long, default_value_t = 0, value_name = "N")]
    many_seeds: usize,
    /// Also run the cold-host and warm-host rows between daemons with mutual TLS
    /// (`mitosisd --tls-*`), on a second testbed with a throwaway CA, and print each beside
    /// its plain row.
    #[arg(long)]
    tls: bool,
    /// Instead of the seed rows: calls through the platform's API (warm host, cold host,
    /// Fn-style cold start of --bundle; --children samples each), and calls/s with
    /// --concurrency clients for --throughput-secs beside the local-fork ceiling.
    #[arg(long)]
    platform: bool,
}

fn main() {
    // `mitosis-bench loadspike ...`: the load-spike experiment (loadspike/mod.rs).
    let mut argv: Vec<String> = std::env::args().collect();
    let result = if argv.get(1).map(String::as_str) == Some("loadspike") {
        argv.remove(0);
        loadspike::main(argv)
    } else if argv.get(1).map(String::as_str) == Some("workflow") {
        argv.remove(0);
        workflow::main(argv)
    } else if argv.get(1).map(String::as_str) == Some("transfer") {
        argv.remove(0);
        transfer::main(argv)
    } else if argv.get(1).map(String::as_str) == Some("fetch") {
        argv.remove(0);
        fetch::main(argv)
    } else {
        run(Args::parse())
    };
    match result {
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
    match &criu_ok {
        Err(why) => println!("  criu: not available ({why}), skipped"),
        Ok(criu) => {
            if let Err(why) = &criu.lazy {
                println!("  criu lazy migration: not available ({why}), skipped");
            }
            for note in &criu.notes {
                println!("  criu: {note}");
            }
        }
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
    if args.platform {
        let run = platform::run(
            &testbed,
            &args.bundle,
            args.children,
            args.concurrency,
            args.throughput_secs,
        )?;
        platform::print(&run);
        return Ok(0);
    }
    let remote = Remote {
        mitosis: &mitosis,
        seed_host: testbed.host(0),
        child_hosts: [testbed.host(1), testbed.host(2)],
        warmup: args.warmup,
    };
    let tls_testbed = match args.tls {
        true => Some(TlsTestbed::new(&daemon, &testbed)?),
        false => None,
    };
    let tls_remote = tls_testbed.as_ref().map(|t| Remote {
        mitosis: &mitosis,
        seed_host: t.testbed.host(0),
        child_hosts: [t.testbed.host(1), t.testbed.host(2)],
        warmup: args.warmup,
    });
    let mut results = Vec::new();
    for seed in &seeds {
        let result = bench_seed(
            &args,
            seed,
            &remote,
            tls_remote.as_ref(),
            &testbed,
            &criu_ok,
        );
        report::seed_table(&result);
        results.push(result);
    }
    let many = match (args.many_seeds, seeds.first()) {
        (0, _) | (_, None) => None,
        (n, Some(seed)) => {
            eprintln!("[{}] {n} seeds at once", seed.name);
            match many::run(seed, &remote, n) {
                Ok(m) => Some((seed.name, m)),
                Err(e) => {
                    println!("  many seeds: {e:#}");
                    None
                }
            }
        }
    };
    for testbed in [Some(testbed), tls_testbed.map(|t| t.testbed)]
        .into_iter()
        .flatten()
    {
        if let Err(err) = testbed.teardown() {
            eprintln!("mitosis-bench: teardown: {err}");
        }
    }

    report::summary(&results);
    if let Some((name, m)) = &many {
        many::report(name, m);
    }
    output::write(&args, &results, &out_dir, &criu_ok)?;
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    Ok(if results.iter().any(SeedResult::failed) {
        1
    } else {
        0
    })
}

/// A second three-host testbed whose daemons use mutual TLS, with a CA and host certificates
/// made for it (kept in the plain testbed's directory, removed with it).
struct TlsTestbed {
    testbed: Testbed,
}

impl TlsTestbed {
    fn new(daemon: &std::path::Path, plain: &Testbed) -> Result<TlsTestbed> {
        let dir = plain.dir().join("pki");
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Both testbeds use the same addresses, each on a bridge of its own.
        let addrs: Vec<_> = plain.hosts().iter().map(|h| h.addr().into()).collect();
        pki::TestCa::new("mitosis-bench CA")
            .and_then(|ca| ca.write_hosts(&dir, &addrs))
            .context("making the CA and host certificates")?;
        let mut config = DaemonConfig::new(daemon, DAEMON_PORT);
        config.extra_args = pki::daemon_args(&dir);
        let testbed = Testbed::new(TestbedConfig::new(3).with_daemon(config))
            .context("building the testbed of TLS daemons")?;
        println!(
            "  testbed {}: the same hosts, daemons with mutual TLS (--tls-cert/--tls-key/--tls-ca)",
            testbed.id()
        );
        Ok(TlsTestbed { testbed })
    }
}

/// Starts the seed on `host` (a bundle's is started by its daemon at each prepare).
fn start_seed<'a>(seed: &'a Seed, host: &Host) -> Result<(Option<Server>, Origin<'a>), String> {
    match &seed.bundle {
        Some(bundle) => Ok((None, Origin::Bundle(&bundle.dir))),
        None => match Server::start(seed.command(host, &[])) {
            Ok(server) => {
                let pid = server.pid();
                Ok((Some(server), Origin::Process(pid)))
            }
            Err(err) => Err(format!("starting the seed: {err:#}")),
        },
    }
}

/// Runs every method for one seed. Failures are recorded in the result, never returned.
fn bench_seed(
    args: &Args,
    seed: &Seed,
    remote: &Remote,
    tls_remote: Option<&Remote>,
    testbed: &Testbed,
    criu_ok: &Result<criu::Criu, String>,
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
    if seed.bundle.is_none() {
        step("starting the seed on host 0".to_owned());
    }
    let (server, origin) = match start_seed(seed, remote.seed_host) {
        Ok(started) => started,
        Err(err) => {
            out.error = Some(err);
            return out;
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
    step(format!(
        "mitosis first child of a program seen before: {} x (two new processes under a profile, a child of each on host 1)",
        args.cold_samples
    ));
    let samples = (args.warmup, args.cold_samples);
    profile::first_children(remote, seed, origin, samples, &pairs, &mut out);
    step("prepare once, working set recorded by the first children on host 2".to_owned());
    match remote.prepare_recorded(origin) {
        Ok(handle) => {
            let tls = tls_remote.and_then(|tls| prepare_tls(seed, tls, &mut out));
            remote_rows(args, remote, &handle, tls.as_ref(), &pairs, &mut out);
            if let Err(err) = daemon::drop_seed(remote.seed_host, &handle) {
                eprintln!("  warning: {err:#}");
            }
            if let Some(tls) = tls {
                if let Err(err) = daemon::drop_seed(tls.remote.seed_host, &tls.handle) {
                    eprintln!("  warning: {err:#}");
                }
            }
        }
        Err(why) => {
            let tls_rows = tls_remote.map(|_| [TLS_COLD, TLS_WARM]);
            for (key, label) in [
                (MITOSIS_COLD, "mitosis cold host"),
                (MITOSIS_WARM, "mitosis warm host"),
                (MITOSIS_WARM_CLI, "mitosis warm host (CLI)"),
            ]
            .into_iter()
            .chain(tls_rows.into_iter().flatten())
            {
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

    criu_rows(
        seed,
        remote,
        testbed,
        criu_ok,
        (n, args.cold_samples, warmup),
        &pairs,
        &mut out,
    );
    out
}

/// The CRIU rows of one seed: restores on host 1 of one dump of the seed (`n` samples), then
/// lazy migrations from host 0 to host 1 (`lazy_n` samples); skipped, with the reason, where
/// CRIU cannot run them.
fn criu_rows(
    seed: &Seed,
    remote: &Remote,
    testbed: &Testbed,
    criu_ok: &Result<criu::Criu, String>,
    (n, lazy_n, warmup): (usize, usize, usize),
    pairs: &[methods::Pair],
    out: &mut SeedResult,
) {
    let skip = |why: String| {
        [
            Method::skipped(CRIU, criu::LABEL, why.clone()),
            Method::skipped(CRIU_LAZY, criu::LAZY_LABEL, why),
        ]
    };
    let criu = match criu_ok {
        Err(why) => {
            return out
                .methods
                .extend(skip(format!("not available ({why}), skipped")));
        }
        Ok(_) if seed.bundle.is_some() => {
            return out.methods.extend(skip(
                "not run for a containerized seed: its daemon starts it in a container of its \
                 own (namespaces, rootfs), which the bench does not set up for CRIU"
                    .to_owned(),
            ));
        }
        Ok(criu) => criu,
    };
    let [host1, _] = remote.child_hosts;
    let step = |what: String| eprintln!("[{}] {what}", seed.name);
    let gave_up = |key, label, what: String| {
        let mut m = Method::new(key, label);
        m.fail(what);
        m.gave_up = true;
        m
    };
    step(
        "criu: the seed on host 0 as pid 1 of a pid namespace, in a session of its own".to_owned(),
    );
    let running = match criu::Running::start(remote.seed_host, seed) {
        Ok(running) => running,
        Err(err) => {
            let why = format!("starting the seed for criu: {err:#}");
            out.methods.push(gave_up(CRIU, criu::LABEL, why.clone()));
            out.methods.push(gave_up(CRIU_LAZY, criu::LAZY_LABEL, why));
            return;
        }
    };
    step(format!(
        "criu: dump of the seed on host 0, {n} restores on host 1"
    ));
    let dir = testbed.dir().join(format!("criu-{}", seed.name));
    out.methods
        .push(match running.dump(remote.seed_host, &dir) {
            Ok(dumped) => {
                out.criu_dump = Some(dumped.dump_time());
                dumped.restore_all(&running, host1, warmup, n, pairs)
            }
            Err(err) => gave_up(CRIU, criu::LABEL, format!("dump: {err:#}")),
        });
    if let Err(why) = &criu.lazy {
        out.methods.push(Method::skipped(
            CRIU_LAZY,
            criu::LAZY_LABEL,
            format!("not available ({why}), skipped"),
        ));
        return;
    }
    step(format!(
        "criu lazy migration: {lazy_n} x (lazy dump on host 0 serving {}:{}, lazy-pages + restore on host 1)",
        remote.seed_host.addr(),
        criu::LAZY_PORT
    ));
    let (method, setup) = running.lazy_all(
        remote.seed_host,
        host1,
        &testbed.dir().join(format!("criu-lazy-{}", seed.name)),
        (warmup, lazy_n),
        pairs,
    );
    out.methods.push(method);
    out.criu_lazy_dump = setup.dump;
    out.criu_lazy_daemon = setup.daemon;
}

/// The TLS testbed's copy of the seed for `--tls`: started and prepared there, its working
/// set recorded on that testbed's host 2 as for the plain rows.
struct TlsSeed<'r, 'a> {
    remote: &'r Remote<'a>,
    handle: String,
    /// The seed process (none for a bundle's, which its daemon runs).
    _server: Option<Server>,
}

const TLS_COLD: (&str, &str) = (MITOSIS_COLD_TLS, "mitosis cold host (mTLS)");
const TLS_WARM: (&str, &str) = (MITOSIS_WARM_TLS, "mitosis warm host (mTLS)");

/// The seed on the TLS testbed, or `None` with its rows given up in `out`.
fn prepare_tls<'r, 'a>(
    seed: &Seed,
    remote: &'r Remote<'a>,
    out: &mut SeedResult,
) -> Option<TlsSeed<'r, 'a>> {
    eprintln!(
        "[{}] mTLS: the seed on host 0 of the TLS testbed, prepared once, working set recorded on its host 2",
        out.name
    );
    let prepared = start_seed(seed, remote.seed_host)
        .and_then(|(server, origin)| Ok((server, remote.prepare_recorded(origin)?)));
    match prepared {
        Ok((server, handle)) => Some(TlsSeed {
            remote,
            handle,
            _server: server,
        }),
        Err(why) => {
            for (key, label) in [TLS_COLD, TLS_WARM] {
                out.methods
                    .push(gave_up(key, label, format!("mTLS: {why}")));
            }
            None
        }
    }
}

/// The rows of one prepared `handle` whose working set is recorded: cold host, warm host
/// (in-process, then through the CLI) and children/s; with `tls`, the cold and warm rows of
/// its seed too, each sampled in turn with its plain row.
fn remote_rows(
    args: &Args,
    remote: &Remote,
    handle: &str,
    tls: Option<&TlsSeed>,
    pairs: &[methods::Pair],
    out: &mut SeedResult,
) {
    let (n, name) = (args.children, out.name);
    let step = |what: String| eprintln!("[{name}] {what}");
    let rows = |(key, label): (&'static str, &'static str), (tls_key, tls_label)| {
        let mut rows = vec![Row {
            remote,
            handle,
            key,
            label,
        }];
        rows.extend(tls.map(|tls| Row {
            remote: tls.remote,
            handle: &tls.handle,
            key: tls_key,
            label: tls_label,
        }));
        rows
    };
    let in_turn = if tls.is_some() {
        ", in turn with the same between TLS daemons"
    } else {
        ""
    };
    step(format!(
        "mitosis cold host: {} x (child on host 1, then evict its replica){in_turn}",
        args.cold_samples
    ));
    let cold = rows((MITOSIS_COLD, "mitosis cold host"), TLS_COLD);
    let mut cold = remote::cold_hosts(&cold, pairs, args.cold_samples).into_iter();
    step(format!(
        "mitosis warm host: {n} children on host 1{in_turn}"
    ));
    let warm = rows((MITOSIS_WARM, "mitosis warm host"), TLS_WARM);
    let mut warm = remote::warm_hosts(&warm, pairs, n).into_iter();
    out.replica_pages = remote.replica_pages(handle);
    for (method, numbers) in [&mut cold, &mut warm]
        .into_iter()
        .flat_map(|rows| rows.next())
    {
        match method.key {
            MITOSIS_COLD => out.cold = numbers,
            _ => out.warm = numbers,
        }
        out.methods.push(method);
    }
    if let Some(bytes) = out.cold.served.and_then(|s| s.per_child()) {
        step(format!(
            "transfer floor: {} x {:.1} MiB over TCP from host 0 to host 1",
            args.cold_samples,
            bytes as f64 / (1 << 20) as f64
        ));
        transfer::floor(
            remote.seed_host,
            remote.child_hosts[0],
            bytes,
            (args.warmup, args.cold_samples),
            out,
        );
    }
    let requests = args.cold_samples * 5;
    step(format!(
        "page requests: {requests} x {:?} pages from host 1, each beside its bytes over TCP",
        fetch::BLOCKS
    ));
    fetch::rows(
        remote.seed_host,
        remote.child_hosts[0],
        handle,
        (args.warmup, requests),
        out,
    );
    step(format!(
        "mitosis warm host (CLI): {n} x `mitosis resume` on host 1"
    ));
    remote.warm_host_cli(handle, pairs, n, out);
    remote.spawn_floor(n, out);
    // The TLS rows after the plain ones in the table.
    for (method, numbers) in cold.chain(warm) {
        match method.key {
            MITOSIS_COLD_TLS => out.cold_tls = numbers,
            _ => out.warm_tls = numbers,
        }
        out.methods.push(method);
    }
    if args.throughput_secs > 0.0 {
        step(format!(
            "children/s: {} resume loops on hosts 1 and 2 for {} s",
            args.concurrency, args.throughput_secs
        ));
        out.throughput =
            Some(remote.throughput(handle, pairs, args.concurrency, args.throughput_secs));
    }
}
