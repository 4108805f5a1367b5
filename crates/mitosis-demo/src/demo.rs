//! The primitive demo (`--primitive`): remote-fork a warmed Python function across two
//! simulated hosts through the `mitosis` CLI.
//!
//! It builds a two-host testbed (network namespaces with a mitosisd each), starts
//! `examples/python/seed_fn.py` on host 0, waits until it has imported numpy and built its warm
//! state, prepares it as a seed, and resumes children of it on host 1, one request each. Every
//! answer is checked against a cold `seed_fn.py --once` run of the same request, and the remote
//! fork latency is compared with a local `os.fork()` and with a cold start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mitosis_testbed::lines::{LineServer, run_timed};
use mitosis_testbed::{DaemonConfig, Host, Testbed, TestbedConfig};

/// The port the testbed's daemons listen on.
const DAEMON_PORT: u16 = 7070;
/// The interpreter running the seed.
const PYTHON: &str = "python3";

#[derive(clap::Parser)]
#[command(
    version,
    about = "Deploy a Python function on mitosis-platform over simulated hosts, call it from concurrent clients and report where each call ran and how long it took (as root)."
)]
pub struct DemoArgs {
    /// Calls through the platform's API (after the first), spread over the clients.
    #[arg(long, default_value_t = 40)]
    pub calls: usize,
    /// Concurrent client threads.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Simulated hosts under the platform.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Cold starts of the function (distinct requests: the expected answers, and the baseline).
    #[arg(long, default_value_t = 5)]
    pub cold: usize,
    /// Instead: the remote-fork primitive through the `mitosis` CLI, across two hosts.
    #[arg(long)]
    pub primitive: bool,
    /// Children to resume on the second host (with --primitive).
    #[arg(long, default_value_t = 20)]
    pub children: usize,
    /// The function's OCI bundle (made by scripts/setup.sh); with --primitive, the
    /// containerized part is skipped if it is absent.
    #[arg(long, default_value = "/var/lib/mitosis/bundles/python")]
    pub bundle: PathBuf,
}

pub fn run(args: DemoArgs) -> Result<i32> {
    anyhow::ensure!(args.children > 0, "--children must be at least 1");
    let me = std::env::current_exe().context("locating the mitosis-demo binary")?;
    let exe = sibling(&me, "mitosis")?;
    let daemon = sibling(&exe, "mitosisd")?;
    sibling(&exe, "mitosis-stub")?;
    let script = find_script(&exe)?;
    let n = args.children;

    println!("mitosis demo: remote fork of a warmed Python function ({n} children)");
    println!("  seed:    {PYTHON} {}", script.display());
    println!("  daemons: {}", daemon.display());

    let started = Instant::now();
    let testbed =
        Testbed::new(TestbedConfig::new(2).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)))
            .context("building the two-host testbed (this needs root and iproute2)")?;
    let (src, dst) = (testbed.host(0), testbed.host(1));
    println!(
        "- testbed {} up in {}: host 0 = {} (seed), host 1 = {} (children)",
        testbed.id(),
        ms(started.elapsed()),
        src.addr(),
        dst.addr()
    );

    let mut result = demo(&exe, &script, src, dst, n);
    if result.as_ref().is_ok_and(|code| *code == 0) {
        result = if args.bundle.join("config.json").is_file() {
            crate::demo_bundle::run(&exe, &args.bundle, src, dst, n)
        } else {
            println!(
                "\n(no bundle at {}: containerized part skipped)",
                args.bundle.display()
            );
            Ok(0)
        };
    }
    // Python processes are killed by their guards inside `demo`; now the namespaces go.
    if let Err(err) = testbed.teardown() {
        eprintln!("mitosis demo: teardown: {err}");
    }
    result
}

/// Everything between testbed setup and teardown; returns the exit code.
fn demo(exe: &Path, script: &Path, src: &Host, dst: &Host, n: usize) -> Result<i32> {
    let requests: Vec<String> = (1..=n).map(|i| format!("{{\"n\": {i}}}")).collect();

    // Cold starts on host 1 give both the baseline and the expected answers.
    println!(
        "- {n} cold starts of `{PYTHON} seed_fn.py --once` on host 1 (expected answers + baseline)"
    );
    let mut cold = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    for request in &requests {
        let (elapsed, answer) = cold_start(dst, script, request)?;
        cold.push(elapsed);
        expected.push(answer);
    }

    // The seed: a warmed runtime on host 0, blocked reading its stdin.
    let t = Instant::now();
    let mut seed = start_server(src, script, &[])?;
    println!(
        "- seed started on host 0 (pid {}), ready after {}",
        seed.pid(),
        ms(t.elapsed())
    );

    let t = Instant::now();
    let output = src
        .command(exe)
        .arg("--socket")
        .arg(src.socket_path())
        .args(["prepare", "--pid", &seed.pid().to_string(), "--stats"])
        .stdin(Stdio::null())
        .output()
        .context("running mitosis prepare")?;
    let prepare_wall = t.elapsed();
    let prepare_err = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "mitosis prepare failed ({}):\n{}",
            output.status,
            prepare_err.trim_end()
        );
    }
    let handle = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    anyhow::ensure!(!handle.is_empty(), "mitosis prepare printed no handle");
    let prepare_stats = prepare_err
        .lines()
        .find(|l| l.starts_with("mitosis: prepared"))
        .unwrap_or("")
        .to_owned();
    println!(
        "- prepared in {} (wall, incl. CLI start): handle {}",
        ms(prepare_wall),
        short(&handle)
    );
    if !prepare_stats.is_empty() {
        println!("    {}", prepare_stats.trim_start_matches("mitosis: "));
    }

    // Remote children on host 1, one after the other.
    println!(
        "- resuming {n} children on host 1 (`mitosis resume HANDLE --stats`, one request each)"
    );
    let mut remote = Vec::with_capacity(n);
    let mut daemon_resume = Vec::new();
    let mut failures = 0;
    for (i, (request, want)) in requests.iter().zip(&expected).enumerate() {
        let child = remote_child(exe, dst, &handle, request)?;
        let verdict = check(&child.answer, want);
        let line = child.stats.as_deref().unwrap_or("");
        let resume = stat(line, "resume_us");
        let ok = verdict.is_ok() && child.status == 0;
        let faults = format!(
            "{} host, fork {}us, {} faults, {} pages in {} round trips",
            if stat(line, "cached") == Some(1) {
                "warm"
            } else {
                "cold"
            },
            stat(line, "fork_us").unwrap_or(0),
            stat(line, "faults").unwrap_or(0),
            stat(line, "pages_fetched").unwrap_or(0),
            stat(line, "fetches").unwrap_or(0),
        );
        println!(
            "    child {:>3}: {:>10}  daemon resume {:>10}  pid {:>7}  {:<5}  {faults}",
            i + 1,
            ms(child.elapsed),
            resume.map_or_else(|| "-".to_owned(), |us| ms(Duration::from_micros(us))),
            pid_of(&child.answer).unwrap_or_else(|| "?".to_owned()),
            if ok { "ok" } else { "WRONG" }
        );
        if !ok {
            failures += 1;
            if let Err(why) = verdict {
                println!("      {why}");
            }
            if child.status != 0 {
                println!("      mitosis resume exited with status {}", child.status);
            }
            for line in child.stderr.lines() {
                println!("      stderr: {line}");
            }
        }
        remote.push(child.elapsed);
        daemon_resume.extend(resume.map(Duration::from_micros));
    }
    drop_seed(exe, src, &handle);
    seed.kill();

    // Local fork baseline: the same runtime forking itself per request on host 0.
    println!("- local fork baseline: `seed_fn.py --fork-server` on host 0, {n} requests");
    let mut server = start_server(src, script, &["--fork-server"])?;
    let mut local = Vec::with_capacity(n);
    for (request, want) in requests.iter().zip(&expected) {
        let (elapsed, answer) = server.request(request)?;
        if let Err(why) = check(&answer, want) {
            bail!("the local fork server answered wrongly: {why}");
        }
        local.push(elapsed);
    }
    server.kill();

    // Summary.
    println!();
    println!(
        "{:<28} {:>11} {:>11} {:>11} {:>8}",
        "", "median", "p99", "min", "samples"
    );
    // The first child builds host 1's replica of the seed; the others fork from it.
    let (first, warm) = remote.split_at(remote.len().min(1));
    let warm_resume = daemon_resume.get(1..).unwrap_or(&[]);
    let rows: [(&str, &[Duration]); 5] = [
        ("remote fork, cold host", first),
        ("remote fork, warm host", warm),
        ("  of which daemon resume", warm_resume),
        ("local fork (os.fork)", &local),
        ("cold start (python3)", &cold),
    ];
    for (name, samples) in rows {
        if samples.is_empty() {
            println!("{name:<28} {:>11}", "-");
            continue;
        }
        println!(
            "{name:<28} {:>11} {:>11} {:>11} {:>8}",
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 99.0)),
            ms(percentile(samples, 0.0)),
            samples.len()
        );
    }
    println!(
        "{:<28} {:>11} {:>11} {:>11} {:>8}",
        "prepare (wall)",
        ms(prepare_wall),
        "",
        "",
        1
    );
    let (remote_med, local_med, cold_med) = (
        percentile(if warm.is_empty() { first } else { warm }, 50.0),
        percentile(&local, 50.0),
        percentile(&cold, 50.0),
    );
    println!();
    println!(
        "cold start / remote fork (warm host):  {:>7.1}x",
        ratio(cold_med, remote_med)
    );
    println!(
        "remote fork (warm host) / local fork:  {:>7.1}x",
        ratio(remote_med, local_med)
    );
    println!(
        "(remote fork = spawn of `mitosis resume` on host 1 to the child's answer; local fork = request"
    );
    println!(
        " written to the fork server to answer read; cold start = spawn of python3 to answer)"
    );

    if failures > 0 {
        println!();
        println!("mitosis demo: {failures} of {n} children answered wrongly or failed");
        return Ok(1);
    }
    println!();
    println!("all {n} children answered correctly");
    Ok(0)
}

/// `mitosis drop HANDLE` on `host`, best effort: the daemons are torn down right after anyway.
pub(crate) fn drop_seed(exe: &Path, host: &Host, handle: &str) {
    let _ = host
        .command(exe)
        .arg("--socket")
        .arg(host.socket_path())
        .arg("drop")
        // The handle is a secret: in the environment, not on the command line.
        .env("MITOSIS_HANDLE", handle)
        .stdin(Stdio::null())
        .output();
}

/// `name` next to `exe`, which must exist.
pub(crate) fn sibling(exe: &Path, name: &str) -> Result<PathBuf> {
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{name} not found next to {} (looked for {})",
        exe.display(),
        path.display()
    );
    Ok(path)
}

/// Finds `examples/python/seed_fn.py`.
fn find_script(exe: &Path) -> Result<PathBuf> {
    const REL: &str = "python/seed_fn.py";
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("MITOSIS_EXAMPLES") {
        candidates.push(PathBuf::from(dir).join(REL));
    }
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("../../examples").join(REL));
    }
    candidates.push(PathBuf::from("examples").join(REL));
    for candidate in &candidates {
        if candidate.is_file() {
            return candidate
                .canonicalize()
                .with_context(|| format!("resolving {}", candidate.display()));
        }
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    bail!(
        "examples/python/seed_fn.py not found (tried {}); set MITOSIS_EXAMPLES to the examples directory",
        tried.join(", ")
    )
}

/// Starts the script on `host` (the seed, or the fork server) and waits for its `ready` line.
fn start_server(host: &Host, script: &Path, extra: &[&str]) -> Result<LineServer> {
    let mut cmd = host.command(PYTHON);
    cmd.arg(script).args(extra).stderr(Stdio::inherit());
    LineServer::start(cmd).with_context(|| format!("starting {PYTHON} {}", script.display()))
}

/// Runs `seed_fn.py --once` with `request` on stdin; returns spawn-to-answer time and the answer.
fn cold_start(host: &Host, script: &Path, request: &str) -> Result<(Duration, String)> {
    let mut cmd = host.command(PYTHON);
    cmd.arg(script).arg("--once");
    let run = run_timed(cmd, request)?;
    anyhow::ensure!(
        !run.answer.is_empty(),
        "the cold start printed no answer ({}):\n{}",
        run.status,
        run.stderr
    );
    anyhow::ensure!(
        run.status == 0,
        "the cold start exited with status {}:\n{}",
        run.status,
        run.stderr
    );
    Ok((run.latency, run.answer))
}

/// One remote child's run.
pub(crate) struct RemoteChild {
    pub elapsed: Duration,
    pub answer: String,
    pub status: i32,
    pub stderr: String,
    pub stats: Option<String>,
}

/// Runs `mitosis resume HANDLE --stats` on `host` with `request` on stdin.
pub(crate) fn remote_child(
    exe: &Path,
    host: &Host,
    handle: &str,
    request: &str,
) -> Result<RemoteChild> {
    let mut cmd = host.command(exe);
    cmd.arg("--socket")
        .arg(host.socket_path())
        .args(["resume", "--stats"])
        .env("MITOSIS_HANDLE", handle);
    let run = run_timed(cmd, request)?;
    let stats = run
        .stderr
        .lines()
        .find(|l| l.starts_with("mitosis: stats "))
        .map(str::to_owned);
    Ok(RemoteChild {
        elapsed: run.latency,
        answer: run.answer,
        status: run.status,
        stderr: run.stderr,
        stats,
    })
}

/// Compares an answer with the expected one, ignoring the `pid` field.
pub(crate) fn check(got: &str, want: &str) -> Result<(), String> {
    if got.is_empty() {
        return Err("no answer".to_owned());
    }
    if without_pid(got) == without_pid(want) {
        Ok(())
    } else {
        Err(format!("answer {got}\n      expected {want} (pid aside)"))
    }
}

/// The answer line with its `"pid": N` field removed.
fn without_pid(answer: &str) -> String {
    let Some(start) = answer.find("\"pid\":") else {
        return answer.to_owned();
    };
    let rest = answer[start + "\"pid\":".len()..].trim_start();
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let rest = rest[digits..].trim_start();
    let rest = rest.strip_prefix(',').map_or(rest, str::trim_start);
    format!("{}{}", &answer[..start], rest)
}

/// The `pid` field of an answer.
fn pid_of(answer: &str) -> Option<String> {
    let rest = answer[answer.find("\"pid\":")? + "\"pid\":".len()..].trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

/// The daemon-side resume time from a `mitosis: resume NNNus (...)` line.
/// The value of `key` in a `mitosis: stats key=value ...` line.
pub(crate) fn stat(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix("mitosis: stats ")?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The `p`-th percentile (nearest rank) of `samples`; `p = 0` is the minimum.
pub(crate) fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank: ceil(p/100 * n), at least 1.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A handle shortened for display.
pub(crate) fn short(handle: &str) -> String {
    if handle.len() > 48 {
        format!("{}...", &handle[..48])
    } else {
        handle.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_ignored() {
        let a = r#"{"label": "label-05", "n": 5, "norm": 1.5, "pid": 23235, "sum": -2.5}"#;
        let b = r#"{"label": "label-05", "n": 5, "norm": 1.5, "pid": 7, "sum": -2.5}"#;
        assert_eq!(without_pid(a), without_pid(b));
        assert_eq!(
            without_pid(a),
            r#"{"label": "label-05", "n": 5, "norm": 1.5, "sum": -2.5}"#
        );
        assert_eq!(pid_of(a).as_deref(), Some("23235"));
        assert!(check(a, b).is_ok());
        assert!(check(&a.replace("-2.5", "-2.6"), b).is_err());
    }

    #[test]
    fn parses_resume_stats() {
        let line = "mitosis: stats resume_us=1234 cached=1 fork_us=900";
        assert_eq!(stat(line, "resume_us"), Some(1234));
        assert_eq!(stat(line, "cached"), Some(1));
        assert_eq!(stat(line, "fork"), None);
        assert_eq!(stat("something else", "resume_us"), None);
    }

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s, 0.0), Duration::from_millis(1));
    }
}
