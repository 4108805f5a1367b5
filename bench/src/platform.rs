//! `mitosis-bench --platform`: calls through the platform's API (Fn's `POST /invoke`), beside
//! an Fn-style cold start of the same bundle and the local-fork ceiling, in one run.
//!
//! Three testbed hosts, the platform in this process on a loopback port, a function of the
//! bundle (`remote-fork`) and the same bundle as a `cold` function. A placement pinned by the
//! benchmark puts each measured call where the row says:
//! - warm host: host 1, which holds the seed's replica (its first call, unmeasured, built it);
//! - cold host: host 2, its replica evicted before every call, so each call builds it again
//!   from the seed's host (as a host that has never seen the function);
//! - Fn-style cold start: the `cold` function on host 1: a container started from the bundle,
//!   the runtime and its imports, then the request (what Fn does without a warm container).
//!
//! Then calls per second through the API from `--concurrency` clients for
//! `--throughput-secs` (placement: the platform's own, load-aware), beside the ceiling of
//! forking on this machine: the bundle's own runtime forking a child per request
//! (`--fork-pool`), fed as fast as it answers, with no API, container or daemon.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mitosis_platform::policy::{HostView, Placement, Policy};
use mitosis_platform::{Config, HostSpec, LoadAware};
use mitosis_testbed::Testbed;
use serde_json::{Value, json};

use crate::stats::{Summary, ms, ratio};

/// Placement pinned to one host, or the platform's own when unpinned.
struct Pinned {
    host: AtomicUsize,
    auto: LoadAware,
}

const UNPINNED: usize = usize::MAX;

impl Policy for Pinned {
    fn name(&self) -> &'static str {
        "bench (pinned)"
    }

    fn seed_host(&self, hosts: &[HostView]) -> Option<usize> {
        // The seed on host 0, as in the other benchmarks.
        hosts.first().filter(|h| h.up).map(|h| h.index)
    }

    fn place_call(&self, hosts: &[HostView]) -> Option<Placement> {
        match self.host.load(Ordering::Relaxed) {
            UNPINNED => self.auto.place_call(hosts),
            host => hosts
                .get(host)
                .filter(|h| h.up)
                .map(|h| Placement::Host { host: h.index }),
        }
    }
}

/// What the run measured.
pub struct PlatformRun {
    pub warm: Vec<Duration>,
    pub cold_host: Vec<Duration>,
    pub cold_start: Vec<Duration>,
    pub calls_per_s: f64,
    pub ceiling_per_s: f64,
}

/// An HTTP client of the API, with keep-alive.
struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    fn json(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let reply = self
            .agent
            .request(method, &url)
            .send_json(body)
            .with_context(|| format!("{method} {path}"))?;
        Ok(reply.into_json()?)
    }

    /// One call: its time from request to answer, and the host that ran it.
    fn invoke(&self, fn_id: &str, body: &str) -> Result<(Duration, String)> {
        let t = Instant::now();
        let reply = self
            .agent
            .post(&format!("{}/invoke/{fn_id}", self.base))
            .send_string(body);
        let reply = match reply {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                bail!(
                    "call answered {code}: {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => return Err(e.into()),
        };
        let host = reply.header("Mitosis-Host").unwrap_or("?").to_owned();
        let text = reply.into_string()?;
        let took = t.elapsed();
        ensure!(text.contains("\"n\""), "unexpected answer: {text}");
        Ok((took, host))
    }
}

fn request(i: usize) -> String {
    format!("{{\"n\": {}}}", i % 97)
}

/// Runs the platform rows on `tb` (three hosts) with `bundle`, `samples` calls per row.
pub fn run(
    tb: &Testbed,
    bundle: &Path,
    samples: usize,
    concurrency: usize,
    secs: f64,
) -> Result<PlatformRun> {
    ensure!(tb.hosts().len() >= 3, "the platform rows need three hosts");
    let pinned = Arc::new(Pinned {
        host: AtomicUsize::new(0),
        auto: LoadAware::default(),
    });
    let served = mitosis_platform::background::Background::start_with_policy(
        Config::default(),
        HostSpec::of_testbed(tb),
        &mitosis_platform::store::StoreSpec::Memory,
        pinned.clone(),
    )
    .context("starting the platform")?;
    let api = Api {
        base: format!("http://{}", served.addr),
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build(),
    };
    let app = api.json("POST", "/v2/apps", json!({"name": "bench"}))?;
    let deploy = |name: &str, policy: &str| -> Result<String> {
        let f = api.json(
            "POST",
            "/v2/fns",
            json!({"name": name, "app_id": app["id"], "image": bundle, "memory": 512,
                   "annotations": {"mitosis.io/policy": policy}}),
        )?;
        Ok(f["id"].as_str().context("a function id")?.to_owned())
    };
    let forked = deploy("forked", "remote-fork")?;
    let cold = deploy("cold", "cold")?;
    // The first call waits for the seed (host 0); host 1's first builds its replica.
    api.invoke(&forked, &request(0)).context("the first call")?;
    pinned.host.store(1, Ordering::Relaxed);
    api.invoke(&forked, &request(0))
        .context("host 1's first call")?;

    let mut warm = Vec::new();
    for i in 0..samples {
        warm.push(api.invoke(&forked, &request(i))?.0);
    }
    let handle = served
        .platform
        .seeds
        .current(&forked)
        .context("the function has no seed")?
        .handle;
    pinned.host.store(2, Ordering::Relaxed);
    let mut cold_host = Vec::new();
    for i in 0..samples {
        let evicted = mitosis_client::Client::connect(tb.host(2).socket_path())?.evict(&handle);
        // None there yet (the first call) is as good as evicted.
        if let Err(e) = evicted
            && !e.to_string().contains("no replica")
        {
            return Err(e.into());
        }
        cold_host.push(api.invoke(&forked, &request(i))?.0);
    }
    pinned.host.store(1, Ordering::Relaxed);
    let mut cold_start = Vec::new();
    for i in 0..samples {
        cold_start.push(api.invoke(&cold, &request(i))?.0);
    }

    // Calls per second through the API, placed by the platform.
    pinned.host.store(UNPINNED, Ordering::Relaxed);
    let api = Arc::new(api);
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let clients: Vec<_> = (0..concurrency)
        .map(|c| {
            let (api, forked, done) = (api.clone(), forked.clone(), done.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut i = c;
                while Instant::now() < deadline {
                    api.invoke(&forked, &request(i))?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += concurrency;
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let calls_per_s = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    drop(served);
    let ceiling_per_s = fork_ceiling(tb, bundle, concurrency, secs)?;
    Ok(PlatformRun {
        warm,
        cold_host,
        cold_start,
        calls_per_s,
        ceiling_per_s,
    })
}

/// Children per second of the bundle's runtime forking one per request (`--fork-pool N`)
/// in its rootfs on host 1, fed a request per answer: no API, no container, no daemon.
fn fork_ceiling(tb: &Testbed, bundle: &Path, concurrency: usize, secs: f64) -> Result<f64> {
    let config: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let rootfs = bundle.join(config["root"]["path"].as_str().context("root.path")?);
    let args: Vec<String> = config["process"]["args"]
        .as_array()
        .context("process.args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let mut cmd: Command = tb.host(1).command("chroot");
    cmd.arg(&rootfs)
        .args([
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE=1",
        ])
        .args(&args)
        .args(["--fork-pool", &concurrency.to_string()])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting the fork-pool baseline")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    ensure!(line.trim() == "ready", "the baseline said {line:?}");
    // Keep `concurrency` requests outstanding, as many clients would.
    let mut sent = 0;
    for _ in 0..concurrency {
        writeln!(stdin, "{}", request(sent))?;
        sent += 1;
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mut answered = 0usize;
    while Instant::now() < deadline {
        line.clear();
        ensure!(stdout.read_line(&mut line)? > 0, "the baseline ended early");
        answered += 1;
        writeln!(stdin, "{}", request(sent))?;
        sent += 1;
    }
    let rate = answered as f64 / t0.elapsed().as_secs_f64();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    Ok(rate)
}

/// The rows as the bench prints them.
pub fn print(run: &PlatformRun) {
    println!();
    println!("platform: calls through the API (POST /invoke, keep-alive, sequential)");
    println!(
        "  {:<46} {:>10} {:>10} {:>10} {:>7}",
        "", "median", "p99", "min", "samples"
    );
    let row = |what: &str, s: &[Duration]| {
        if let Some(x) = Summary::of(s) {
            println!(
                "  {:<46} {:>10} {:>10} {:>10} {:>7}",
                what,
                ms(x.median),
                ms(x.p99),
                ms(x.min),
                x.samples
            );
        }
    };
    row("warm host (replica there)", &run.warm);
    row(
        "cold host (replica evicted before each call)",
        &run.cold_host,
    );
    row(
        "Fn-style cold start (container from bundle)",
        &run.cold_start,
    );
    if let (Some(w), Some(c), Some(f)) = (
        Summary::of(&run.warm),
        Summary::of(&run.cold_host),
        Summary::of(&run.cold_start),
    ) {
        println!(
            "  cold start / warm host: {:.1}x; cold start / cold host: {:.1}x (medians)",
            ratio(f.median, w.median),
            ratio(f.median, c.median)
        );
    }
    println!(
        "  calls/s through the API: {:.1}; the local fork ceiling (the runtime's own fork per request, no API): {:.1}/s ({:.0}%)",
        run.calls_per_s,
        run.ceiling_per_s,
        100.0 * run.calls_per_s / run.ceiling_per_s
    );
}
