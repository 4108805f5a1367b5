//! The demo's containerized part: the same remote fork, with the function in an OCI bundle.
//!
//! Host 0's daemon starts the bundle's function (Debian's python3 with numpy and Pillow,
//! `image_fn.py`) in a container and prepares it once it waits for input. Each child on host 1
//! runs in a container of the bundle taken from host 1's pool. Answers are checked against
//! cold starts of the same function in the same rootfs.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mitosis_container::Bundle;
use mitosis_testbed::Host;

use mitosis_testbed::lines::run_timed;

use crate::demo::{check, drop_seed, ms, percentile, remote_child, short, stat};

/// The bundle's function started cold in its rootfs on `host` (chroot, its environment, one
/// request with `--once`): how long it took and its answer.
pub(crate) fn cold_start(
    host: &Host,
    bundle: &Bundle,
    request: &str,
) -> Result<(Duration, String)> {
    let mut cmd = host.command("chroot");
    cmd.arg(&bundle.rootfs)
        .arg("env")
        .arg("-i")
        .args(&bundle.env)
        .args(&bundle.args)
        .arg("--once")
        .current_dir("/");
    let run = run_timed(cmd, request)?;
    if run.status != 0 || run.answer.is_empty() {
        bail!(
            "a cold start in the rootfs failed ({}):\n{}",
            run.status,
            run.stderr
        );
    }
    Ok((run.latency, run.answer))
}

pub fn run(exe: &Path, dir: &Path, src: &Host, dst: &Host, n: usize) -> Result<i32> {
    let bundle = Bundle::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    println!();
    println!(
        "mitosis demo, containerized: OCI bundle {} (`{}`)",
        dir.display(),
        bundle.args.join(" ")
    );
    let requests: Vec<String> = (1..=n).map(|i| format!("{{\"n\": {i}}}")).collect();

    // Expected answers: the same function started cold in the same rootfs on host 1.
    let cold_runs = n.min(5);
    println!("- {cold_runs} cold starts in the bundle's rootfs on host 1 (expected answers)");
    let mut cold = Vec::new();
    let mut expected = Vec::new();
    for request in &requests[..cold_runs] {
        let (latency, answer) = cold_start(dst, &bundle, request)?;
        cold.push(latency);
        expected.push(answer);
    }

    let t = Instant::now();
    let output = src
        .command(exe)
        .arg("--socket")
        .arg(src.socket_path())
        .args(["prepare", "--bundle"])
        .arg(dir)
        .arg("--stats")
        .stdin(Stdio::null())
        .output()
        .context("running mitosis prepare --bundle")?;
    let wall = t.elapsed();
    let err = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("mitosis prepare --bundle failed:\n{}", err.trim_end());
    }
    let handle = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!(
        "- seed started in a container on host 0, warm and prepared in {} (wall): {}",
        ms(wall),
        short(&handle)
    );
    for line in err.lines() {
        println!("    {}", line.trim_start_matches("mitosis: "));
    }

    println!("- resuming {n} children on host 1, each in a container of its own");
    let mut remote = Vec::new();
    let (mut taking, mut joining, mut containerizing) = (Vec::new(), Vec::new(), Vec::new());
    let mut failures = 0;
    for (i, request) in requests.iter().enumerate() {
        let child = remote_child(exe, dst, &handle, request)?;
        let line = child.stats.as_deref().unwrap_or("");
        let verdict = match expected.get(i) {
            Some(want) => check(&child.answer, want),
            None if child.answer.is_empty() => Err("no answer".to_owned()),
            None => Ok(()),
        };
        let ok = verdict.is_ok() && child.status == 0;
        let (take, join) = (
            stat(line, "container_us").unwrap_or(0),
            stat(line, "join_us").unwrap_or(0),
        );
        println!(
            "    child {:>3}: {:>10}  fork {:>5}us (join {:>4}us)  container {:>5}us ({})  {}",
            i + 1,
            ms(child.elapsed),
            stat(line, "fork_us").unwrap_or(0),
            join,
            take,
            if stat(line, "container_pooled") == Some(1) {
                "pooled"
            } else {
                "made now"
            },
            if ok { "ok" } else { "WRONG" }
        );
        if !ok {
            failures += 1;
            if let Err(why) = verdict {
                println!("      {why}");
            }
            for line in child.stderr.lines() {
                println!("      stderr: {line}");
            }
        }
        remote.push(child.elapsed);
        taking.push(Duration::from_micros(take));
        joining.push(Duration::from_micros(join));
        containerizing.push(Duration::from_micros(take + join));
    }
    drop_seed(exe, src, &handle);

    let warm = remote.get(1..).unwrap_or(&[]);
    println!();
    println!(
        "{:<37} {:>11} {:>11} {:>8}",
        "containerized", "median", "p99", "samples"
    );
    let rows: [(&str, &[Duration]); 6] = [
        ("remote fork, cold host", &remote[..1]),
        ("remote fork, warm host", warm),
        ("  of which containerizing", &containerizing),
        ("    taking a container from the pool", &taking),
        ("    joining it (namespaces, cgroup)", &joining),
        ("cold start in the rootfs (chroot)", &cold),
    ];
    for (name, samples) in rows {
        if samples.is_empty() {
            continue;
        }
        println!(
            "{name:<37} {:>11} {:>11} {:>8}",
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 99.0)),
            samples.len()
        );
    }
    if failures > 0 {
        println!(
            "mitosis demo: {failures} of {n} containerized children answered wrongly or failed"
        );
        return Ok(1);
    }
    println!(
        "all {n} containerized children answered correctly (the first {cold_runs} checked against cold starts)"
    );
    Ok(0)
}
