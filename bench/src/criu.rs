//! The CRIU baseline: dump a running seed once (`--leave-running`), then restore the images
//! once per child, with the child's stdin and stdout inherited from the benchmark.
//!
//! To keep restores from clashing with the still running seed's pid, the seed runs as pid 1 of
//! its own pid namespace (`unshare --pid --fork`), so every restore recreates that namespace.
//! Images are restored on the same machine, from the dump directory: no transfer cost is counted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mitosis_testbed::Host;

use crate::methods::{Pair, is_right, schedule};
use crate::procs::{Server, on_path, run_ok, run_timed};
use crate::results::{CRIU, Method};
use crate::seeds::Seed;

/// The label of the CRIU method in the report.
pub const LABEL: &str = "criu restore (same machine)";

/// Whether a working `criu` is on PATH (`criu check` succeeds); the reason if not.
pub fn available() -> Result<(), String> {
    if !on_path("criu") {
        return Err("not on PATH".to_owned());
    }
    if !on_path("unshare") {
        return Err(
            "`unshare` (util-linux) is needed to run the seed in a pid namespace".to_owned(),
        );
    }
    match Command::new("criu")
        .arg("check")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            Err(format!(
                "`criu check` failed: {}",
                last.unwrap_or("").trim()
            ))
        }
        Err(err) => Err(format!("`criu check` could not run: {err}")),
    }
}

/// A dumped seed, ready to be restored.
pub struct Dumped {
    dir: PathBuf,
    /// The `pipe:[INODE]` names of the seed's stdin and stdout.
    stdin_key: String,
    stdout_key: String,
    dump: Duration,
    /// The still running seed (killed on drop).
    _seed: Server,
}

/// Starts a seed in its own pid namespace on `host` and dumps it into `dir`.
pub fn dump(host: &Host, seed: &Seed, dir: &Path) -> Result<Dumped> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = host.command("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--"])
        .arg(seed.python())
        .args(seed.argv(&[]))
        // criu reopens /dev/null by itself; an external pipe on fd 2 would need inheriting.
        .stderr(Stdio::null());
    let seed = Server::start(cmd)?;
    let pid = only_child(seed.pid())?;
    let stdin_key = fd_key(pid, 0)?;
    let stdout_key = fd_key(pid, 1)?;

    let mut cmd = host.command("criu");
    cmd.args(["dump", "--leave-running", "--shell-job", "-t"])
        .arg(pid.to_string())
        .arg("-D")
        .arg(dir)
        .arg("-o")
        .arg("dump.log");
    let (dump, _, _) = run_ok(cmd).map_err(|err| {
        let log = fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
        err.context(format!(
            "criu dump failed; end of dump.log:\n{}",
            tail(&log)
        ))
    })?;
    Ok(Dumped {
        dir: dir.to_owned(),
        stdin_key,
        stdout_key,
        dump,
        _seed: seed,
    })
}

impl Dumped {
    /// How long the dump took.
    pub fn dump_time(&self) -> Duration {
        self.dump
    }

    /// Restores the images on `host` once per sample (after `warmup` unmeasured restores);
    /// times spawn of `criu restore` to answer.
    pub fn restore_all(
        &self,
        host: &Host,
        warmup: usize,
        samples: usize,
        pairs: &[Pair],
    ) -> Method {
        let mut method = Method::new(CRIU, LABEL);
        for (i, (req, want)) in schedule(warmup, samples, pairs).enumerate() {
            method.attempted += usize::from(want.is_some());
            let log = format!("restore-{i}.log");
            let mut cmd = host.command("criu");
            cmd.args(["restore", "--shell-job", "-D"])
                .arg(&self.dir)
                .arg("-o")
                .arg(&log)
                .arg("--inherit-fd")
                .arg(format!("fd[0]:{}", self.stdin_key))
                .arg("--inherit-fd")
                .arg(format!("fd[1]:{}", self.stdout_key));
            let what = match run_timed(cmd, &req) {
                Err(err) => format!("{req}: {err:#}"),
                Ok(run) if run.answer.is_empty() => {
                    let log_path = self.dir.join(&log);
                    let text = fs::read_to_string(&log_path).unwrap_or_default();
                    format!(
                        "{req}: no answer (status {}): {}; end of {}:\n{}",
                        run.status,
                        run.stderr.trim(),
                        log_path.display(),
                        tail(&text)
                    )
                }
                Ok(run) if is_right(&run.answer, want) => {
                    if want.is_some() {
                        method.latencies.push(run.latency);
                    }
                    continue;
                }
                Ok(run) => format!(
                    "{req}: answer {:?} (expected {})",
                    run.answer,
                    want.unwrap_or("an answer")
                ),
            };
            if method.fail(what) {
                break;
            }
        }
        method
    }
}

/// The one child of `pid` (the seed under `unshare --fork`).
fn only_child(pid: u32) -> Result<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let children: Vec<u32> = text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    match children.as_slice() {
        [child] => Ok(*child),
        other => bail!("expected one child of unshare ({pid}), found {other:?}"),
    }
}

/// What `/proc/PID/fd/FD` points to, e.g. `pipe:[1234]`.
fn fd_key(pid: u32, fd: u32) -> Result<String> {
    let link = format!("/proc/{pid}/fd/{fd}");
    let target = fs::read_link(&link).with_context(|| format!("reading {link}"))?;
    Ok(target.to_string_lossy().into_owned())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
