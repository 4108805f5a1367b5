//! Shared helpers for the privileged end-to-end tests: simulated hosts, seeds, and the CLI.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig};

pub mod api;
pub mod browser;
pub mod capture;
pub mod machine;
pub mod metrics;
pub mod procfs;
pub mod resumed;

pub const MEMCHECK_BIN: &str = env!("MEMCHECK_BIN");
/// The digest memcheck's `verify` prints for intact memory (deterministic, layout-free).
pub const MEMCHECK_DIGEST: &str = "afad17bc446f66b4";

/// target/<profile>/, where the workspace's binaries are (this test runs from .../deps/).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        path.display()
    );
    path
}

/// Two (or more) hosts, each running mitosisd.
pub fn testbed(hosts: usize) -> Testbed {
    testbed_with(hosts, &[])
}

/// Hosts whose daemons get `daemon_args` too.
pub fn testbed_with(hosts: usize, daemon_args: &[&str]) -> Testbed {
    testbed_custom(hosts, |daemon| {
        daemon.extra_args = daemon_args.iter().map(|a| a.to_string()).collect();
    })
}

/// Hosts whose daemons are configured by `configure`.
pub fn testbed_custom(hosts: usize, configure: impl FnOnce(&mut DaemonConfig)) -> Testbed {
    bin("mitosis-stub");
    let mut daemon = DaemonConfig::new(bin("mitosisd"), 7070);
    configure(&mut daemon);
    Testbed::new(TestbedConfig::new(hosts).with_daemon(daemon)).expect("testbed")
}

/// Runs `f` on a thread of its own inside `host`'s network namespace (threads it starts are
/// there too), as a process of that host would.
pub fn in_netns<T: Send + 'static>(
    host: &mitosis_testbed::Host,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let netns = std::fs::File::open(host.netns_path()).expect("the host's netns");
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an fd we hold open for the call.
        let joined = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "joining a host's netns");
        drop(netns);
        f()
    })
}

/// A `/proc/PID/status` value in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let value = procfs::status_of(&format!("/proc/{pid}/status"), key);
    value
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{key} of {pid}: {value:?}"))
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mitosis-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running seed process with its stdin and stdout held by the test.
pub struct Seed {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
}

impl Seed {
    /// Starts `cmd` and waits for a first line starting with `ready`.
    pub fn start(mut cmd: Command) -> Seed {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("seed starts");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("seed output");
        assert!(line.starts_with("ready"), "seed said {line:?}");
        Seed {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn send(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to seed");
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("seed answer");
        out.trim_end().to_string()
    }

    /// Pids of the seed's children (a leftover twin would show up here).
    pub fn children(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", self.pid(), self.pid()))
            .unwrap_or_default()
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the memcheck fixture in `host`.
pub fn memcheck_seed(tb: &Testbed, host: usize, dir: &Path) -> Seed {
    let mut cmd = tb.host(host).command(MEMCHECK_BIN);
    cmd.arg(dir);
    Seed::start(cmd)
}

/// The memcheck fixture started in host 0 of `tb` with a scratch directory tagged `tag`, and
/// prepared there: the directory (removed when dropped), the seed and its handle.
pub fn prepared_memcheck(tb: &Testbed, tag: &str) -> (Scratch, Seed, String) {
    let dir = Scratch::new(tag);
    let seed = memcheck_seed(tb, 0, &dir.0);
    let handle = prepare(tb, 0, seed.pid());
    (dir, seed, handle)
}

/// Runs the CLI against `host`'s daemon with `stdin` as input.
pub fn cli(tb: &Testbed, host: usize, args: &[&str], stdin: &str) -> Output {
    let mut cmd = tb.host(host).command(bin("mitosis"));
    cmd.arg("--socket")
        .arg(tb.host(host).socket_path())
        .args(args);
    run_with_input(&mut cmd, stdin)
}

/// Runs `cmd` with `input` on its stdin (written by a thread of its own, so a command that
/// writes much before it reads cannot block on us), killed after 60 s; its output.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} starts: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = wait_output(child, Duration::from_secs(60));
    let _ = writer.join();
    out
}

/// Waits for `child` (killing it after `limit`) and collects its output.
pub fn wait_output(child: Child, limit: Duration) -> Output {
    let pid = child.id() as i32;
    let guard = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // SAFETY: kill(2) with a pid and a signal; harmless if the process is gone.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("cli output");
    drop(guard);
    out
}

/// `mitosis prepare` on `host`; returns the handle.
pub fn prepare(tb: &Testbed, host: usize, pid: i32) -> String {
    let out = cli(tb, host, &["prepare", "--pid", &pid.to_string()], "");
    assert!(
        out.status.success(),
        "prepare failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tb.host(host).daemon_log()
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Processes of the stub binary still alive (children that were never cleaned up).
pub fn stub_processes() -> Vec<i32> {
    processes_of("mitosis-stub")
}

/// Live processes running the binary `name`.
pub fn processes_of(name: &str) -> Vec<i32> {
    procfs::all_pids()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.ends_with(name))
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// Asserts the testbed tears down completely.
pub fn teardown(tb: Testbed) {
    let id = tb.id().to_string();
    tb.teardown().expect("teardown");
    let left = mitosis_testbed::leftovers(&id);
    assert!(left.is_empty(), "leftovers after teardown: {left:?}");
}

/// True if `pid`'s parent is `parent`.
pub fn is_child_of(pid: i32, parent: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
        })
        == Some(parent)
}

/// Pids of the replicas host `host`'s daemon holds, from `mitosis status`, sorted.
pub fn replica_pids(tb: &Testbed, host: usize) -> Vec<i32> {
    let out = cli(tb, host, &["status"], "");
    let mut pids: Vec<i32> = stdout(&out)
        .lines()
        .filter(|l| l.starts_with("replica "))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect();
    pids.sort();
    pids
}

/// `mitosis status` of host `host`: the value after `key` on the line starting with `key`.
pub fn status_value(tb: &Testbed, host: usize, key: &str) -> Option<u64> {
    let out = cli(tb, host, &["status"], "");
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// The value of `key` in the `mitosis: stats` line `resume --stats` printed.
pub fn resume_stat(out: &Output, key: &str) -> u64 {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.starts_with("mitosis: stats "))
        .unwrap_or_else(|| panic!("no stats line in: {err}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in: {line}"))
}

/// True while process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Polls `cond` every 50 ms for up to `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Starts the CLI against `host`'s daemon with piped stdio; returns it and its stdin, held
/// open so the test decides when the child sees its input and EOF.
pub fn spawn_cli(tb: &Testbed, host: usize, args: &[&str]) -> (Child, ChildStdin) {
    let mut cmd = tb.host(host).command(bin("mitosis"));
    cmd.arg("--socket")
        .arg(tb.host(host).socket_path())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("cli starts");
    let stdin = child.stdin.take().expect("stdin");
    (child, stdin)
}

/// Waits (up to 20 s) until a child of `host`'s daemon blocks reading its stdin: a resumed
/// child that started and waits for input. Panics if none does.
pub fn wait_for_child_reading_stdin(tb: &Testbed, host: usize) -> i32 {
    let daemon = tb.host(host).daemon_pid().expect("the host's daemon");
    let reading = || {
        processes_with_parent(daemon).into_iter().find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                .is_ok_and(|s| s.split_whitespace().take(2).eq(["0", "0x0"]))
        })
    };
    let mut found = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            found = reading();
            found.is_some()
        }),
        "no child of host {host}'s daemon reads its stdin"
    );
    found.expect("found")
}

/// Pids whose parent is `parent`.
pub fn processes_with_parent(parent: u32) -> Vec<i32> {
    procfs::all_pids()
        .filter(|&pid| is_child_of(pid, parent))
        .collect()
}

/// Descriptors of `host`'s daemon, less its TCP connections (its pooled connections to peers
/// come and go).
pub fn daemon_fds(tb: &mitosis_testbed::Testbed, host: usize) -> usize {
    let pid = tb.host(host).daemon_pid().expect("the daemon runs");
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let tcp: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(9).map(|i| format!("socket:[{i}]")))
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| !tcp.iter().any(|i| target.as_os_str() == i.as_str()))
        .count()
}

/// A file of examples/.
pub fn example(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(rel)
}

/// `java` with the options a JVM seed runs with: no perf data file (a shared file mapping),
/// no class-data-sharing archive, and fixed GC and compiler thread counts (so the JVM does not
/// add threads between the seed's prepare and a child's answer).
pub fn java(classes: &Path, host: Option<(&Testbed, usize)>) -> Command {
    let mut cmd = match host {
        Some((tb, h)) => tb.host(h).command("java"),
        None => Command::new("java"),
    };
    cmd.args([
        "-XX:-UsePerfData",
        "-Xshare:off",
        "-XX:-UseDynamicNumberOfGCThreads",
        "-XX:-UseDynamicNumberOfCompilerThreads",
        "-cp",
    ])
    .arg(classes)
    .arg("Fn");
    cmd
}

/// examples/java/Fn.java compiled into a scratch directory.
pub fn compile_java() -> Scratch {
    let classes = Scratch::new("java");
    let out = Command::new("javac")
        .arg("-d")
        .arg(&classes.0)
        .arg(example("java/Fn.java"))
        .output()
        .expect("javac (scripts/setup.sh installs a JDK)");
    assert!(out.status.success(), "javac: {}", stderr(&out));
    classes
}

/// examples/go/fn.go built (standard library only, Go's build cache in the scratch dir):
/// the scratch dir, and the binary in it.
pub fn build_go_example() -> (Scratch, PathBuf) {
    let dir = Scratch::new("go");
    let bin = dir.0.join("fn");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(example("go/fn.go"))
        .env("GOCACHE", dir.0.join("cache"))
        // Static: it runs in a bundle's rootfs of nothing but itself too.
        .env("CGO_ENABLED", "0")
        .output()
        .expect("go (scripts/setup.sh installs golang-go)");
    assert!(out.status.success(), "go build: {}", stderr(&out));
    (dir, bin)
}

/// The rootfs of the Python bundle scripts/setup.sh makes (shared, read-only, by the test
/// bundles below).
pub const PYTHON_ROOTFS: &str = "/var/lib/mitosis/bundles/python/rootfs";

/// An OCI bundle `scratch/name` over [`PYTHON_ROOTFS`] running `args` as root in its own
/// namespaces, with `memory_mib` and `pids` as its limits.
pub fn python_bundle(
    scratch: &Scratch,
    name: &str,
    args: &[&str],
    memory_mib: u64,
    pids: u64,
) -> PathBuf {
    let dir = scratch.0.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/",
                    "user": {"uid": 0, "gid": 0},
                    "env": ["PATH=/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1"]},
        "root": {"path": PYTHON_ROOTFS, "readonly": true},
        "hostname": "fn",
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                                 {"type": "ipc"}, {"type": "network"}],
                  "maskedPaths": ["/proc/kcore"],
                  "resources": {"memory": {"limit": memory_mib << 20}, "pids": {"limit": pids}}}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}
