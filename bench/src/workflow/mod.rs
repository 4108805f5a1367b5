//! `mitosis-bench workflow`: the FINRA trade-validation workflow (examples/python/finra),
//! its state handed to N validators by remote fork (all at once, or staged: one per host
//! first), by pickle through Redis, by a pickle file on a shared path, and by local
//! `os.fork()`, on one three-host testbed.
//!
//! For each data size and each N, a single-process run of the same rules gives the verdicts
//! every method must reproduce; then each round runs every method once (their order rotates
//! from round to round, the machine's load drifts), each with a fresh producer on host 0 and
//! its validators on the other hosts, round robin. Redis (Debian's `redis-server`) is started
//! here in host 0's namespace and torn down with the testbed. [`report`] prints the medians
//! and writes `results.json`.

pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use mitosis_testbed::lines::read_all;
use mitosis_testbed::redis::Redis;
use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig};
use serde_json::Value;

use crate::loadspike::{interrupt, sibling};

const DAEMON_PORT: u16 = 7070;
const REDIS_PORT: u16 = 6379;
/// The methods, in the order of the first round.
pub const METHODS: [&str; 6] = [
    "mitosis",
    "redis",
    "files",
    "fork",
    "mitosis-staged",
    "mitosis-filled",
];

/// The FINRA workflow: remote fork against pickle through Redis, shared files and local
/// fork (needs root, redis-server and a python3 with pandas and redis).
#[derive(Parser, Debug)]
#[command(name = "mitosis-bench workflow")]
pub struct Args {
    /// Validators per run, comma-separated.
    #[arg(long, default_value = "1,8,32")]
    pub validators: String,
    /// Market-data sizes in MiB (of the DataFrame in memory), comma-separated.
    #[arg(long, default_value = "16,64")]
    pub data_mib: String,
    /// Rounds: every method runs once per round, for each size and N.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The methods, comma-separated: mitosis (every validator resumed at once),
    /// mitosis-staged (one per host first, then the rest from the replicas it filled),
    /// mitosis-filled (each host's replica filled with the whole producer first, then every
    /// validator forked from it), redis, files, fork.
    #[arg(
        long,
        default_value = "mitosis,mitosis-staged,mitosis-filled,redis,files,fork"
    )]
    pub methods: String,
    /// Simulated hosts: the producer on host 0, validators on the others.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Producers prepare under a profile per method, size and number of validators
    /// (`fork_prepare(profile=...)`): from the second round on, the validators' hosts get
    /// what the previous rounds' validators touched first before they start.
    #[arg(long)]
    pub profile: bool,
    /// Seed of the generated market data and portfolio.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Python interpreter (with pandas and redis) [default: the first of python3 and
    /// /usr/bin/python3 that has them].
    #[arg(long)]
    pub python: Option<String>,
    /// The Redis server program.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// The examples/python directory [default: found next to the build or source tree].
    #[arg(long)]
    pub examples: Option<PathBuf>,
    /// Where results.json goes [default: target/workflow].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Directory holding mitosisd and mitosis-stub [default: this binary's directory].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Seconds one producer run may take before it is killed (a failed run).
    #[arg(long, default_value_t = 600)]
    pub run_timeout: u64,
}

/// One producer's result line (`{"role": "result", ...}` of finra.py).
#[derive(Debug, Clone)]
pub struct MethodRun {
    pub total_ms: f64,
    pub first_start_ms: Option<f64>,
    pub handoff_ms: f64,
    pub load_ms: f64,
    pub table_mib: f64,
    pub digest: Option<String>,
    pub failures: Vec<String>,
    /// Per validator: the phases (ms) and memory (KiB) it reported.
    pub validators: Vec<Value>,
    /// Remote fork: the daemon's figures for the producer's prepare.
    pub prepare: Value,
}

/// All methods of one (size, N, round).
#[derive(Debug, Clone)]
pub struct Run {
    pub validators: usize,
    pub data_mib: f64,
    pub round: usize,
    pub reference_ms: f64,
    pub reference_digest: String,
    pub methods: BTreeMap<String, MethodRun>,
}

impl Run {
    /// Every method's aggregated verdicts equal the single-process run's.
    pub fn verdicts_match(&self) -> bool {
        self.methods
            .values()
            .all(|m| m.failures.is_empty() && m.digest.as_deref() == Some(&self.reference_digest))
    }
}

pub fn main(argv: impl IntoIterator<Item = String>) -> Result<i32> {
    run(&Args::parse_from(argv))
}

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse()
                .map_err(|_| anyhow::anyhow!("--{what}: {x:?} is not a number"))
        })
        .collect()
}

/// The interpreter: `given`, else the first of python3 and /usr/bin/python3 with pandas and
/// redis; resolved to its executable (a pyenv shim would add its own start-up to every
/// baseline validator).
pub fn find_python(given: Option<&str>) -> Result<String> {
    let candidates: Vec<&str> = match given {
        Some(p) => vec![p],
        None => vec!["python3", "/usr/bin/python3"],
    };
    let mut why = Vec::new();
    for p in candidates {
        let out = Command::new(p)
            .args([
                "-c",
                "import sys, pandas, numpy, redis; print(sys.executable)",
            ])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                return Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned());
            }
            Ok(o) => why.push(format!(
                "{p}: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("failed")
            )),
            Err(e) => why.push(format!("{p}: {e}")),
        }
    }
    bail!(
        "no Python with pandas, numpy and redis ({}); scripts/setup.sh installs python3-pandas and python3-redis",
        why.join("; ")
    )
}

pub fn run(args: &Args) -> Result<i32> {
    let started = Instant::now();
    let sizes: Vec<f64> = list(&args.data_mib, "data-mib")?;
    let counts: Vec<usize> = list(&args.validators, "validators")?;
    let methods: Vec<String> = args
        .methods
        .split(',')
        .map(|m| m.trim().to_owned())
        .collect();
    for m in &methods {
        anyhow::ensure!(
            METHODS.contains(&m.as_str()),
            "unknown method {m:?}: one of {METHODS:?}"
        );
    }
    anyhow::ensure!(
        !sizes.is_empty() && sizes.iter().all(|s| *s > 0.0),
        "--data-mib: sizes above 0"
    );
    anyhow::ensure!(
        !counts.is_empty() && counts.iter().all(|n| *n > 0),
        "--validators: counts above 0"
    );
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(args.hosts > 0, "--hosts must be at least 1");
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => exe.parent().context("no directory")?.to_owned(),
    };
    let daemon = sibling(&bin_dir, "mitosisd")?;
    sibling(&bin_dir, "mitosis-stub")?;
    let examples = crate::seeds::find_examples(args.examples.as_deref(), &bin_dir)?;
    let script = examples.join("finra/finra.py");
    anyhow::ensure!(script.is_file(), "{} not found", script.display());
    let client = examples
        .join("../../clients/python")
        .canonicalize()
        .context("clients/python (the mitosis library) beside examples/")?;
    let python = find_python(args.python.as_deref())?;
    let out_dir = match (&args.out_dir, bin_dir.parent()) {
        (Some(d), _) => d.clone(),
        (None, Some(target)) => target.join("workflow"),
        (None, None) => PathBuf::from("workflow"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    println!("mitosis-bench workflow");
    println!(
        "  FINRA trade validation ({}): sizes {:?} MiB, validators {:?}, {} rounds, methods {}",
        script.display(),
        sizes,
        counts,
        args.rounds,
        methods.join(",")
    );
    println!("  python {python}; redis {}", args.redis_server);

    interrupt::catch();
    let testbed = Testbed::new(
        TestbedConfig::new(args.hosts).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)),
    )
    .context("building the testbed (needs root and iproute2)")?;
    let result = (|| {
        let redis = Redis::start(
            &args.redis_server,
            testbed.host(0),
            REDIS_PORT,
            &testbed.dir().join("redis"),
        )
        .context("starting redis-server in host 0 (scripts/setup.sh installs redis-server)")?;
        println!(
            "  testbed {}: producer on host 0 ({}), validators on {} host(s); redis {} (pid {})",
            testbed.id(),
            testbed.host(0).addr(),
            args.hosts.saturating_sub(1).max(1),
            redis.addr(),
            redis.pid().unwrap_or(0)
        );
        let bench = Bench {
            testbed: &testbed,
            python: &python,
            script: &script,
            client: &client,
            redis: redis.addr().to_string(),
            shared: testbed.dir().join("shared"),
            seed: args.seed,
            timeout: Duration::from_secs(args.run_timeout),
            profile: args.profile,
        };
        std::fs::create_dir_all(&bench.shared)?;
        let runs = bench.all(&sizes, &counts, &methods, args.rounds);
        redis.stop();
        runs
    })();
    if let Err(e) = testbed.teardown() {
        eprintln!("mitosis-bench workflow: teardown: {e}");
    }
    if interrupt::stopped() {
        eprintln!("mitosis-bench workflow: interrupted; torn down");
        return Ok(130);
    }
    let runs = result?;
    let summary = report::summarize(&runs, &methods);
    report::print(&summary, &runs);
    let path = out_dir.join("results.json");
    report::write_json(&path, args, &python, &runs, &summary)?;
    println!("\n  wrote {}", path.display());
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    Ok(if runs.iter().all(Run::verdicts_match) {
        0
    } else {
        1
    })
}

struct Bench<'a> {
    testbed: &'a Testbed,
    python: &'a str,
    script: &'a Path,
    client: &'a Path,
    redis: String,
    shared: PathBuf,
    seed: u64,
    timeout: Duration,
    profile: bool,
}

impl Bench<'_> {
    fn all(
        &self,
        sizes: &[f64],
        counts: &[usize],
        methods: &[String],
        rounds: usize,
    ) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        for &mib in sizes {
            for &n in counts {
                let reference = self.producer(&["reference".into()], mib, n)?;
                let reference_digest = reference["report"]["digest"]
                    .as_str()
                    .context("the reference run's digest")?
                    .to_owned();
                let reference_ms = reference["total_ms"].as_f64().unwrap_or(f64::NAN);
                eprintln!(
                    "[{mib} MiB, {n} validators] single process: {reference_ms:.0} ms, digest {reference_digest}"
                );
                for round in 0..rounds {
                    let mut run = Run {
                        validators: n,
                        data_mib: mib,
                        round,
                        reference_ms,
                        reference_digest: reference_digest.clone(),
                        methods: BTreeMap::new(),
                    };
                    for k in 0..methods.len() {
                        if interrupt::stopped() {
                            bail!("interrupted");
                        }
                        let method = &methods[(k + round) % methods.len()];
                        let m = self.method(method, mib, n)?;
                        eprintln!(
                            "[{mib} MiB, {n} validators] round {}: {method} {:.0} ms (first validator at {} ms){}",
                            round + 1,
                            m.total_ms,
                            m.first_start_ms
                                .map_or("-".to_owned(), |f| format!("{f:.1}")),
                            if m.digest.as_deref() == Some(&reference_digest) {
                                String::new()
                            } else {
                                format!(
                                    "  VERDICTS DIFFER ({:?} vs {reference_digest}; {})",
                                    m.digest,
                                    m.failures.join("; ")
                                )
                            }
                        );
                        run.methods.insert(method.clone(), m);
                    }
                    runs.push(run);
                }
            }
        }
        Ok(runs)
    }

    fn method(&self, method: &str, mib: f64, n: usize) -> Result<MethodRun> {
        let tb = self.testbed;
        let others: Vec<usize> = if tb.hosts().len() > 1 {
            (1..tb.hosts().len()).collect()
        } else {
            vec![0]
        };
        let socks: Vec<String> = others
            .iter()
            .map(|&h| tb.host(h).socket_path().display().to_string())
            .collect();
        let netns: Vec<String> = others
            .iter()
            .map(|&h| tb.host(h).netns_path().display().to_string())
            .collect();
        let mut args = vec![
            "run".to_owned(),
            "--method".into(),
            method.into(),
            "--hosts".into(),
            socks.join(","),
            "--netns".into(),
            netns.join(","),
            "--redis".into(),
            self.redis.clone(),
            "--shared-dir".into(),
            self.shared.display().to_string(),
            "--python".into(),
            self.python.into(),
        ];
        if self.profile {
            args.extend(["--profile".into(), format!("finra/{method}/{mib}/{n}")]);
        }
        let v = self.producer(&args, mib, n)?;
        let failures = v["failed"]
            .as_array()
            .map(|f| {
                f.iter()
                    .map(|x| {
                        format!(
                            "validator {} ({}): {}: {}",
                            x["index"], x["spec"], x["why"], x["error"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(MethodRun {
            total_ms: v["total_ms"].as_f64().context("total_ms")?,
            first_start_ms: v["first_start_ms"].as_f64(),
            handoff_ms: v["handoff_ms"].as_f64().unwrap_or(0.0),
            load_ms: v["load_ms"].as_f64().unwrap_or(0.0),
            table_mib: v["data_mib"].as_f64().unwrap_or(0.0),
            digest: v["report"]["digest"].as_str().map(str::to_owned),
            failures,
            validators: v["validators_detail"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            prepare: v["prepare"].clone(),
        })
    }

    /// Runs finra.py with `args` on host 0; its last `result`/`reference` line, with the
    /// `failed` lines gathered under "failed".
    fn producer(&self, args: &[String], mib: f64, n: usize) -> Result<Value> {
        let host = self.testbed.host(0);
        let mut cmd = host.command(self.python);
        cmd.arg(self.script)
            .args(args)
            .args(["--data-mib", &mib.to_string()])
            .args(["--validators", &n.to_string()])
            .args(["--seed", &self.seed.to_string()])
            .env("PYTHONPATH", self.client)
            .env("MITOSIS_SOCKET", host.socket_path())
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let (status, stdout, stderr) = run_with_timeout(cmd, self.timeout)?;
        let mut result = None;
        let mut failed = Vec::new();
        for line in stdout.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            match v["role"].as_str() {
                Some("result" | "reference") => result = Some(v),
                Some("failed") => failed.push(v),
                _ => {}
            }
        }
        let Some(mut v) = result else {
            bail!(
                "finra.py {} ({mib} MiB, {n} validators) gave no result (status {status}):\n{}",
                args.first().map_or("", String::as_str),
                stderr.trim_end()
            );
        };
        v["failed"] = Value::Array(failed);
        Ok(v)
    }
}

/// Runs `cmd` to its end (killed after `limit`): status, stdout, stderr.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Result<(i32, String, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    let stdout = read_all(child.stdout.take().expect("piped"));
    let stderr = read_all(child.stderr.take().expect("piped"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(limit) {
        Ok(s) => s.context("waiting for the producer")?,
        Err(_) => {
            let _ = crate::procs::kill_and_wait_reaped(pid);
            bail!("{cmd:?} did not finish within {limit:?} (killed)");
        }
    };
    let code = mitosis_testbed::lines::shell_status(status);
    Ok((
        code,
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    ))
}
