//! The CRIU baselines, with the `criu` found on PATH (skipped, with the reason, when there is
//! none or `criu check` fails):
//!
//! - **restore**: dump the running seed once (`--leave-running`), then restore the images once
//!   per child on host 1, read from the dump directory: no transfer cost is counted.
//! - **lazy migration** (CRIU's own peer for a new host): per child, `criu dump --lazy-pages`
//!   of the running seed on host 0, which then serves the seed's memory over TCP on host 0's
//!   address (the dump is the page server of a lazy migration); on host 1, `criu lazy-pages
//!   --page-server` connects to it and `criu restore --lazy-pages` starts the child, whose
//!   pages are fetched on fault (and the rest in the background). Timed from the spawn of the
//!   restore to the child's answer; the dump until it serves and the lazy-pages daemon until
//!   it is ready are reported beside the row. The small non-memory images are read from the
//!   dump directory, not copied.
//!
//! Restored children get the benchmark's pipes as stdin and stdout (`--inherit-fd`). To keep
//! restores from clashing with the still running seed's pid, the seed runs as pid 1 of its own
//! pid namespace (`unshare --pid --fork`), so every restore recreates that namespace; it runs
//! in a session of its own (`setsid`), as CRIU wants the session leader inside the dumped tree.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mitosis_testbed::Host;

use crate::methods::{Pair, is_right, schedule};
use crate::procs::{STEP_TIMEOUT, Server, on_path, run_ok, run_timed};
use crate::results::{CRIU, CRIU_LAZY, Method};
use crate::seeds::Seed;

/// The label of the CRIU restore method in the report.
pub const LABEL: &str = "criu restore (same machine)";
/// The label of the CRIU lazy migration method.
pub const LAZY_LABEL: &str = "criu lazy migration (TCP)";
/// The port the lazy dump serves pages on, on the seed host's address.
pub const LAZY_PORT: u16 = 7171;
/// The pipe CRIU's lazy page server tees pages through: 819 pages
/// (`PIPE_MAX_SIZE` in criu/include/page-pipe.h), rounded up to a power of two by the kernel.
/// Without CAP_SYS_RESOURCE a pipe may not exceed fs.pipe-max-size, and the server then
/// fails on its first request of more than 16 pages ("tee: 65536").
pub const LAZY_PIPE_BYTES: u64 = 4 << 20;
/// CAP_SYS_RESOURCE's bit in a capability set.
const CAP_SYS_RESOURCE: u32 = 24;

/// What the installed CRIU can do here.
#[derive(Debug, Clone)]
pub struct Criu {
    /// Whether lazy migration can run, or why not.
    pub lazy: Result<(), String>,
    /// Things worth knowing about the numbers (printed at start).
    pub notes: Vec<String>,
}

/// Whether a working `criu` is on PATH (`criu check` succeeds), with what it can do; the
/// reason if not.
pub fn available() -> Result<Criu, String> {
    if !on_path("criu") {
        return Err("not on PATH".to_owned());
    }
    for (tool, why) in [
        ("unshare", "to run the seed in a pid namespace"),
        ("setsid", "to run the seed in a session of its own"),
    ] {
        if !on_path(tool) {
            return Err(format!("`{tool}` (util-linux) is needed {why}"));
        }
    }
    let check = criu_check(&[])?;
    let mut notes = Vec::new();
    if check.contains("Can't keep kdat cache") {
        notes.push(
            "criu keeps no cache of its kernel probes here (its run directory is not a tmpfs): \
             every criu command probes the kernel again (about 0.1 s); build it with \
             RUNDIR=<a tmpfs directory> to compare at its best"
                .to_owned(),
        );
    }
    let lazy = criu_check(&["--feature", "uffd-noncoop"])
        .map(drop)
        .map_err(|why| format!("no non-cooperative userfaultfd: {why}"))
        .and_then(|()| {
            let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
            let pipe_max = fs::read_to_string("/proc/sys/fs/pipe-max-size").unwrap_or_default();
            lazy_pipes(&status, &pipe_max)
        });
    Ok(Criu { lazy, notes })
}

/// Runs `criu check ARGS`; its stderr if it passes, the reason if not.
fn criu_check(args: &[&str]) -> Result<String, String> {
    match Command::new("criu")
        .arg("check")
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                Ok(text)
            } else {
                let last = text.lines().rev().find(|l| !l.trim().is_empty());
                Err(format!(
                    "`criu check` failed: {}",
                    last.unwrap_or("").trim()
                ))
            }
        }
        Err(err) => Err(format!("`criu check` could not run: {err}")),
    }
}

/// Whether CRIU's lazy page server can make its tee pipe: with CAP_SYS_RESOURCE (in the
/// `CapEff:` line of /proc/self/status), or with fs.pipe-max-size (`pipe_max`) large enough.
pub fn lazy_pipes(proc_status: &str, pipe_max: &str) -> Result<(), String> {
    let cap_eff = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    if cap_eff.is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0) {
        return Ok(());
    }
    match pipe_max.trim().parse::<u64>() {
        Ok(max) if max >= LAZY_PIPE_BYTES => Ok(()),
        got => Err(format!(
            "its page server needs {LAZY_PIPE_BYTES}-byte pipes: without CAP_SYS_RESOURCE, \
             fs.pipe-max-size must be at least that (it is {}; `sysctl -w \
             fs.pipe-max-size={LAZY_PIPE_BYTES}`)",
            got.map_or_else(|_| "unreadable".to_owned(), |m| m.to_string())
        )),
    }
}

/// The command line of the seed under CRIU: pid 1 of a pid namespace of its own (killed
/// with `unshare`), in a session of its own.
pub fn seed_argv(python: &str, argv: Vec<OsString>) -> Vec<OsString> {
    let mut out: Vec<OsString> = ["--pid", "--fork", "--kill-child", "--", "setsid", python]
        .iter()
        .map(OsString::from)
        .collect();
    out.extend(argv);
    out
}

/// `criu dump` of `pid` into `dir`: `--leave-running`; with `lazy`, `--lazy-pages` serving
/// the memory on `addr:port` and telling readiness on fd 1.
pub fn dump_args(pid: u32, dir: &Path, lazy: Option<(&str, u16)>) -> Vec<OsString> {
    let mut args = strings(&["dump", "--leave-running", "-t", &pid.to_string()]);
    args.extend([OsString::from("-D"), dir.into()]);
    args.extend(strings(&["-o", "dump.log"]));
    if let Some((addr, port)) = lazy {
        args.extend(strings(&[
            "--lazy-pages",
            "--address",
            addr,
            "--port",
            &port.to_string(),
            "--status-fd",
            "1",
        ]));
    }
    args
}

/// `criu lazy-pages` for the images in `dir`, fetching from the page server at `addr:port`,
/// telling readiness on fd 1.
pub fn lazy_pages_args(dir: &Path, addr: &str, port: u16) -> Vec<OsString> {
    let mut args = strings(&["lazy-pages", "--page-server", "--address", addr, "--port"]);
    args.push(port.to_string().into());
    args.extend([OsString::from("-D"), dir.into()]);
    args.extend(strings(&["-o", "lazy-pages.log", "--status-fd", "1"]));
    args
}

/// `criu restore` of the images in `dir` (with `lazy`, its memory from the lazy-pages daemon),
/// logging to `log` there, with stdin and stdout replacing the seed's pipes `stdin_key` and
/// `stdout_key`.
pub fn restore_args(
    dir: &Path,
    log: &str,
    lazy: bool,
    stdin_key: &str,
    stdout_key: &str,
) -> Vec<OsString> {
    let mut args = vec![OsString::from("restore"), "-D".into(), dir.into()];
    if lazy {
        args.push("--lazy-pages".into());
    }
    args.extend(strings(&[
        "-o",
        log,
        "--inherit-fd",
        &format!("fd[0]:{stdin_key}"),
        "--inherit-fd",
        &format!("fd[1]:{stdout_key}"),
    ]));
    args
}

fn strings(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// The seed running for CRIU on its host (killed on drop).
pub struct Running {
    pid: u32,
    /// The `pipe:[INODE]` names of the seed's stdin and stdout.
    stdin_key: String,
    stdout_key: String,
    _seed: Server,
}

/// A dump of the seed, ready to be restored (its directory removed on drop).
pub struct Dumped {
    dir: PathBuf,
    dump: Duration,
}

/// What a lazy migration spends before its restore starts, per measured sample.
#[derive(Debug, Clone, Default)]
pub struct LazySetup {
    /// From the spawn of `criu dump --lazy-pages` until it serves pages.
    pub dump: Vec<Duration>,
    /// From the spawn of `criu lazy-pages` until it is ready for the restore.
    pub daemon: Vec<Duration>,
}

impl Running {
    /// Starts the seed on `host` in a pid namespace and session of its own.
    pub fn start(host: &Host, seed: &Seed) -> Result<Running> {
        let mut cmd = host.command("unshare");
        cmd.args(seed_argv(seed.python(), seed.argv(&[])))
            // criu reopens /dev/null by itself; an external pipe on fd 2 would need inheriting.
            .stderr(Stdio::null());
        let server = Server::start(cmd)?;
        let pid = only_child(server.pid())?;
        Ok(Running {
            pid,
            stdin_key: fd_key(pid, 0)?,
            stdout_key: fd_key(pid, 1)?,
            _seed: server,
        })
    }

    /// Dumps the seed into `dir` (left running).
    pub fn dump(&self, host: &Host, dir: &Path) -> Result<Dumped> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Removes the directory if the dump fails.
        let mut dumped = Dumped {
            dir: dir.to_owned(),
            dump: Duration::ZERO,
        };
        let mut cmd = host.command("criu");
        cmd.args(dump_args(self.pid, dir, None));
        (dumped.dump, _, _) = run_ok(cmd).map_err(|err| {
            err.context(format!(
                "criu dump failed; end of dump.log:\n{}",
                log_tail(dir, "dump.log")
            ))
        })?;
        Ok(dumped)
    }

    /// Lazy migrations of the seed from `seed_host` to `child_host`, once per sample (after
    /// `warmup` unmeasured ones), each through a directory of its own under `dir` (removed
    /// after it); times spawn of `criu restore --lazy-pages` to answer.
    pub fn lazy_all(
        &self,
        seed_host: &Host,
        child_host: &Host,
        dir: &Path,
        (warmup, samples): (usize, usize),
        pairs: &[Pair],
    ) -> (Method, LazySetup) {
        let mut method = Method::new(CRIU_LAZY, LAZY_LABEL);
        let mut setup = LazySetup::default();
        for (i, (req, want)) in schedule(warmup, samples, pairs).enumerate() {
            method.attempted += usize::from(want.is_some());
            let sample = dir.join(format!("lazy-{i}"));
            let outcome = self.lazy_once(seed_host, child_host, &sample, &req, want);
            // Best effort: a failed sample's directory may hold nothing.
            let _ = fs::remove_dir_all(&sample);
            match outcome {
                Ok((latency, dump, daemon)) => {
                    if want.is_some() {
                        method.latencies.push(latency);
                        setup.dump.push(dump);
                        setup.daemon.push(daemon);
                    }
                }
                Err(err) => {
                    if method.fail(format!("{req}: {err:#}")) {
                        break;
                    }
                }
            }
        }
        (method, setup)
    }

    /// One lazy migration through `dir`: (restore to answer, dump until serving, lazy-pages
    /// daemon until ready). Every criu process it starts has ended when it returns.
    fn lazy_once(
        &self,
        seed_host: &Host,
        child_host: &Host,
        dir: &Path,
        req: &str,
        want: Option<&str>,
    ) -> Result<(Duration, Duration, Duration)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let addr = seed_host.addr().to_string();
        let mut cmd = seed_host.command("criu");
        cmd.args(dump_args(self.pid, dir, Some((&addr, LAZY_PORT))));
        let (mut dump, dump_ready) = Daemon::start(cmd, "criu dump --lazy-pages", dir, "dump.log")?;
        let mut cmd = child_host.command("criu");
        cmd.args(lazy_pages_args(dir, &addr, LAZY_PORT));
        let (mut lazy, lazy_ready) = Daemon::start(cmd, "criu lazy-pages", dir, "lazy-pages.log")?;

        let mut cmd = child_host.command("criu");
        cmd.args(restore_args(
            dir,
            "restore.log",
            true,
            &self.stdin_key,
            &self.stdout_key,
        ));
        let run = run_timed(cmd, req);
        // The child has exited (its stdin closed); the daemon pulls what is left and ends,
        // then the dump lets the seed run again.
        let lazy_end = lazy.wait();
        let dump_end = dump.wait();
        let run = run?;
        if !is_right(&run.answer, want) {
            bail!(
                "answer {:?} (expected {}), status {}: {}; end of restore.log:\n{}",
                run.answer,
                want.unwrap_or("an answer"),
                run.status,
                run.stderr.trim(),
                log_tail(dir, "restore.log")
            );
        }
        lazy_end?;
        dump_end?;
        Ok((run.latency, dump_ready, lazy_ready))
    }
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
        seed: &Running,
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
            cmd.args(restore_args(
                &self.dir,
                &log,
                false,
                &seed.stdin_key,
                &seed.stdout_key,
            ));
            let what = match run_timed(cmd, &req) {
                Err(err) => format!("{req}: {err:#}"),
                Ok(run) if run.answer.is_empty() => format!(
                    "{req}: no answer (status {}): {}; end of {}:\n{}",
                    run.status,
                    run.stderr.trim(),
                    self.dir.join(&log).display(),
                    log_tail(&self.dir, &log)
                ),
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

impl Drop for Dumped {
    fn drop(&mut self) {
        // The images can be as large as the seed's memory.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A criu process that tells on its stdout (`--status-fd 1`) when it is ready, and then runs
/// on; killed and reaped on drop if it has not ended.
struct Daemon {
    child: Option<Child>,
    what: &'static str,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` and waits (at most [`STEP_TIMEOUT`]) until it is ready; returns it and the
    /// time that took.
    fn start(
        mut cmd: Command,
        what: &'static str,
        dir: &Path,
        log: &str,
    ) -> Result<(Daemon, Duration)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let t = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut daemon = Daemon {
            child: Some(child),
            what,
            log: dir.join(log),
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut byte = [0u8; 1];
            // Ready is one byte; EOF first means it ended without being ready.
            let _ = tx.send(matches!(stdout.read(&mut byte), Ok(1)));
        });
        match rx.recv_timeout(STEP_TIMEOUT) {
            Ok(true) => Ok((daemon, t.elapsed())),
            Ok(false) => {
                let status = daemon.wait().err();
                bail!(
                    "{what} ended before it was ready{}",
                    status.map_or_else(String::new, |e| format!(": {e:#}"))
                )
            }
            Err(_) => {
                daemon.kill();
                bail!(
                    "{what} was not ready within {STEP_TIMEOUT:?} (killed); end of its log:\n{}",
                    daemon.log_tail()
                )
            }
        }
    }

    /// Waits (at most [`STEP_TIMEOUT`]) for it to end; fails if it failed or had to be killed.
    fn wait(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let deadline = Instant::now() + STEP_TIMEOUT;
        let status = loop {
            match child.try_wait().context("waiting for criu")? {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => break None,
                None => thread::sleep(Duration::from_millis(1)),
            }
        };
        match status {
            Some(status) => {
                self.child = None;
                if !status.success() {
                    bail!(
                        "{} failed ({status}); end of its log:\n{}",
                        self.what,
                        self.log_tail()
                    );
                }
                Ok(())
            }
            None => {
                self.kill();
                bail!(
                    "{} did not end within {STEP_TIMEOUT:?} (killed); end of its log:\n{}",
                    self.what,
                    self.log_tail()
                )
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
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

fn log_tail(dir: &Path, log: &str) -> String {
    tail(&fs::read_to_string(dir.join(log)).unwrap_or_default())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[OsString]) -> Vec<&str> {
        args.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn command_lines() {
        let seed = seed_argv("python3", vec!["hello_fn.py".into()]);
        assert_eq!(
            words(&seed),
            [
                "--pid",
                "--fork",
                "--kill-child",
                "--",
                "setsid",
                "python3",
                "hello_fn.py"
            ]
        );
        let dir = Path::new("/tmp/criu-x");
        assert_eq!(
            words(&dump_args(42, dir, None)),
            [
                "dump",
                "--leave-running",
                "-t",
                "42",
                "-D",
                "/tmp/criu-x",
                "-o",
                "dump.log"
            ]
        );
        let lazy = dump_args(42, dir, Some(("10.77.0.1", 7171)));
        assert_eq!(
            words(&lazy)[8..],
            [
                "--lazy-pages",
                "--address",
                "10.77.0.1",
                "--port",
                "7171",
                "--status-fd",
                "1"
            ]
        );
        assert_eq!(
            words(&lazy_pages_args(dir, "10.77.0.1", 7171)),
            [
                "lazy-pages",
                "--page-server",
                "--address",
                "10.77.0.1",
                "--port",
                "7171",
                "-D",
                "/tmp/criu-x",
                "-o",
                "lazy-pages.log",
                "--status-fd",
                "1"
            ]
        );
        let restore = restore_args(dir, "r.log", true, "pipe:[1]", "pipe:[2]");
        assert_eq!(
            words(&restore),
            [
                "restore",
                "-D",
                "/tmp/criu-x",
                "--lazy-pages",
                "-o",
                "r.log",
                "--inherit-fd",
                "fd[0]:pipe:[1]",
                "--inherit-fd",
                "fd[1]:pipe:[2]"
            ]
        );
        let plain = restore_args(dir, "r.log", false, "pipe:[1]", "pipe:[2]");
        assert!(!words(&plain).contains(&"--lazy-pages"));
        assert_eq!(plain.len(), restore.len() - 1);
    }

    #[test]
    fn lazy_pipes_need_cap_sys_resource_or_a_large_pipe_max() {
        let without = "Name:\tbench\nCapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n";
        let with = "CapEff:\t000001ffffffffff\n";
        assert_eq!(lazy_pipes(with, "1048576\n"), Ok(()));
        assert_eq!(lazy_pipes(without, "4194304\n"), Ok(()));
        let why = lazy_pipes(without, "1048576\n").unwrap_err();
        assert!(why.contains("it is 1048576"), "{why}");
        assert!(why.contains("fs.pipe-max-size=4194304"), "{why}");
        assert!(lazy_pipes("", "").unwrap_err().contains("unreadable"));
        assert!(lazy_pipes("CapEff:\tzz\n", "4194303").is_err());
    }
}
