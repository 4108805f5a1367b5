//! Lean containers: seeds from an OCI bundle, children in pooled containers on another host.
//!
//! Uses the Debian Python bundle `scripts/setup.sh` builds; each test writes its own
//! config.json over that bundle's rootfs.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use mitosis_testbed::Testbed;

const ROOTFS: &str = "/var/lib/mitosis/bundles/python/rootfs";

/// A bundle directory whose config runs `args` over the shared rootfs with `resources`.
fn bundle(scratch: &Scratch, args: &[&str], resources: &str) -> PathBuf {
    assert!(
        Path::new(ROOTFS).join("usr/bin/python3").exists(),
        "{ROOTFS} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    let dir = scratch.0.join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let config = format!(
        r#"{{"ociVersion": "1.0.2",
  "process": {{"args": [{}], "cwd": "/opt/mitosis", "user": {{"uid": 0, "gid": 0}},
              "env": ["PATH=/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1"]}},
  "root": {{"path": "{ROOTFS}", "readonly": true}},
  "hostname": "fn",
  "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "mount"}}, {{"type": "uts"}},
                          {{"type": "ipc"}}, {{"type": "network"}}],
            "maskedPaths": ["/proc/kcore"],
            "resources": {resources}}}}}"#,
        args.join(", ")
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir
}

/// Python a probe starts with: `outcome(f)` is "ok" if `f()` returns, else the name of the
/// errno it raised.
const OUTCOME: &str = r#"
import errno
def outcome(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
"#;

fn with_outcome(probe: &str) -> String {
    format!("{OUTCOME}{probe}")
}

/// Replaces `from` (which must be there) with `to` in the bundle's config.json.
fn edit_config(dir: &Path, from: &str, to: &str) {
    let path = dir.join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains(from), "{from} is not in {config}");
    std::fs::write(path, config.replace(from, to)).unwrap();
}

/// Prepares the bundle in `dir` on host 0; `rounds` times, a child on each host answers
/// `input` with `want`.
fn bundle_children_answer(dir: &Path, input: &str, want: &serde_json::Value, rounds: usize) {
    let tb = testbed(2);
    let handle = prepare_bundle(&tb, 0, dir);
    for _ in 0..rounds {
        children_answer(&tb, &handle, input, want);
    }
    teardown(tb);
}

fn probe_bundle(scratch: &Scratch, resources: &str) -> PathBuf {
    bundle(scratch, &["python3", "/opt/mitosis/probe_fn.py"], resources)
}

const LIMITS: &str = r#"{"memory": {"limit": 134217728}, "pids": {"limit": 32}}"#;

fn prepare_bundle(tb: &Testbed, host: usize, dir: &Path) -> String {
    let out = cli(
        tb,
        host,
        &["prepare", "--bundle", dir.to_str().unwrap()],
        "",
    );
    assert!(
        out.status.success(),
        "prepare --bundle failed: {}\n{}",
        stderr(&out),
        tb.host(host).daemon_log()
    );
    stdout(&out).trim().to_string()
}

/// The JSON answer a child printed (its one stdout line).
fn answer(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "child failed: {}", stderr(out));
    serde_json::from_str(stdout(out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

fn status_line(tb: &Testbed, host: usize, prefix: &str) -> String {
    stdout(&cli(tb, host, &["status"], ""))
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_default()
        .to_string()
}

/// `key N` from the pool's status line of this host.
fn pool_stat(tb: &Testbed, host: usize, key: &str) -> u64 {
    let line = status_line(tb, host, "container pool ");
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == key)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// The container inits in the cgroups of `host`'s daemon (named after its socket path).
fn inits_of(tb: &Testbed, host: usize) -> Vec<i32> {
    let instance = tb
        .host(host)
        .socket_path()
        .to_string_lossy()
        .trim_matches('/')
        .replace(['/', '.'], "-");
    init_processes()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&format!("/mitosis/{instance}/")))
        })
        .collect()
}

/// Processes of the container init binary.
fn init_processes() -> Vec<i32> {
    processes_of("mitosis-init")
}

#[test]
fn children_on_another_host_run_isolated_in_the_bundle() {
    let scratch = Scratch::new("ct-iso");
    let dir = probe_bundle(&scratch, LIMITS);
    let tb = testbed(2);
    let handle = prepare_bundle(&tb, 0, &dir);
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();

    // A sibling runs meanwhile: neither may see the other.
    let (sibling, mut sibling_in) = spawn_cli(&tb, 1, &["resume", &handle]);
    let whoami = cli(
        &tb,
        1,
        &["resume", &handle, "--stats"],
        "{\"op\": \"whoami\"}\n",
    );
    let me = answer(&whoami);
    assert!(
        resume_stat(&whoami, "container_us") > 0,
        "the child joined a container"
    );
    let pid = me["pid"].as_i64().unwrap();
    assert_eq!(
        me["pids"],
        serde_json::json!([1, pid]),
        "sees only its init and itself"
    );
    let hostname = me["hostname"].as_str().unwrap();
    assert!(hostname.starts_with("fn-"), "{hostname}");
    assert_ne!(hostname, host_name.trim());
    assert_eq!(me["cwd"], "/opt/mitosis");
    let root: Vec<&str> = me["root_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(root.contains(&"opt") && !root.contains(&"work"), "{root:?}");

    let release = cli(
        &tb,
        1,
        &["resume", &handle],
        "{\"op\": \"read\", \"path\": \"/etc/os-release\"}\n",
    );
    assert!(
        answer(&release)["text"]
            .as_str()
            .unwrap()
            .contains("Debian GNU/Linux 12")
    );
    let second = answer(&cli(&tb, 1, &["resume", &handle], "{\"op\": \"whoami\"}\n"));
    assert_ne!(
        second["hostname"], me["hostname"],
        "each child has its own hostname"
    );

    writeln!(sibling_in, "{{\"op\": \"whoami\"}}").unwrap();
    drop(sibling_in);
    let sib = answer(&wait_output(sibling, Duration::from_secs(30)));
    assert_eq!(sib["pids"].as_array().unwrap().len(), 2, "{sib}");
    assert_ne!(sib["hostname"], me["hostname"]);

    let out = cli(&tb, 0, &["drop", &handle], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(eventually(Duration::from_secs(10), || {
        status_line(&tb, 0, "container cgroups") == "container cgroups 0"
    }));
    teardown(tb);
}

#[test]
fn a_child_over_its_memory_limit_is_killed_and_its_sibling_lives_on() {
    let scratch = Scratch::new("ct-oom");
    let dir = probe_bundle(&scratch, r#"{"memory": {"limit": 67108864}}"#);
    let tb = testbed(2);
    let handle = prepare_bundle(&tb, 0, &dir);

    let (sibling, mut sibling_in) = spawn_cli(&tb, 1, &["resume", &handle]);
    writeln!(sibling_in, "{{\"op\": \"alloc\", \"mib\": 16}}").unwrap();
    let hog = cli(
        &tb,
        1,
        &["resume", &handle],
        "{\"op\": \"alloc\", \"mib\": 200}\n",
    );
    assert_eq!(hog.status.code(), Some(137), "{}", stderr(&hog));
    assert!(stderr(&hog).contains("out of memory"), "{}", stderr(&hog));
    assert!(stdout(&hog).is_empty());

    writeln!(sibling_in, "{{\"n\": 7}}").unwrap();
    drop(sibling_in);
    let out = wait_output(sibling, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("\"allocated\": 16"));
    assert!(lines[1].contains("hello #7"));
    teardown(tb);
}

#[test]
fn bad_bundles_fail_before_anything_starts() {
    let scratch = Scratch::new("ct-bad");
    let tb = testbed(1);
    let inits_before = init_processes().len();
    let check = |dir: &Path, want: &str| {
        let out = cli(
            &tb,
            0,
            &[
                "prepare",
                "--bundle",
                dir.to_str().unwrap(),
                "--ready-timeout",
                "20",
            ],
            "",
        );
        assert_eq!(out.status.code(), Some(78), "{}", stdout(&out));
        assert!(
            stderr(&out).contains(want),
            "{:?} should mention {want:?}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "one line: {}",
            stderr(&out)
        );
        assert_eq!(status_line(&tb, 0, "seeds"), "seeds 0");
        assert_eq!(
            status_line(&tb, 0, "container cgroups"),
            "container cgroups 0"
        );
    };
    let dir = probe_bundle(&scratch, LIMITS);
    std::fs::write(
        dir.join("config.json"),
        "{\"ociVersion\": \"1.0.2\", \"process\": ",
    )
    .unwrap();
    check(&dir, "not a valid OCI config");

    let dir = probe_bundle(&scratch, LIMITS);
    edit_config(&dir, ROOTFS, "/nonexistent/rootfs");
    check(&dir, "rootfs /nonexistent/rootfs is not a directory");

    let dir = probe_bundle(
        &scratch,
        r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 2097152}]}"#,
    );
    check(&dir, "hugepageLimits is not supported");

    let dir = bundle(&scratch, &["no-such-program"], LIMITS);
    check(&dir, "no-such-program: command not found in the container");

    let dir = bundle(
        &scratch,
        &["python3", "-c", "print('bye'); raise SystemExit(3)"],
        LIMITS,
    );
    check(&dir, "exited before it was warm; it wrote: bye");

    check(&scratch.0.join("missing"), "missing");
    assert!(
        eventually(Duration::from_secs(5), || init_processes().len()
            <= inits_before),
        "container inits left running"
    );
    teardown(tb);
}

#[test]
fn two_hundred_children_leave_nothing_behind() {
    let scratch = Scratch::new("ct-200");
    let dir = probe_bundle(&scratch, LIMITS);
    let tb = testbed_with(2, &["--container-pool", "3"]);
    let handle = prepare_bundle(&tb, 0, &dir);
    // Four resumers at a time, 50 children each.
    std::thread::scope(|s| {
        for w in 0..4 {
            let (tb, handle) = (&tb, &handle);
            s.spawn(move || {
                for i in 0..50 {
                    let n = w * 1000 + i;
                    let out = cli(tb, 1, &["resume", handle], &format!("{{\"n\": {n}}}\n"));
                    assert!(
                        stdout(&out).contains(&format!("hello #{n}")),
                        "{}",
                        stderr(&out)
                    );
                }
            });
        }
    });
    assert_eq!(pool_stat(&tb, 1, "taken"), 200);
    assert!(eventually(Duration::from_secs(20), || {
        status_line(&tb, 1, "containers releasing") == "containers releasing 0"
            && pool_stat(&tb, 1, "ready") == 3
    }));
    // What is left on host 1: the pool's three containers and the replica, nothing else.
    assert_eq!(
        status_line(&tb, 1, "container cgroups"),
        "container cgroups 3"
    );
    assert_eq!(
        status_line(&tb, 1, "children running"),
        "children running 0"
    );
    assert_eq!(replica_pids(&tb, 1).len(), 1);
    assert_eq!(inits_of(&tb, 1).len(), 3, "only the pool's inits");
    teardown(tb);
}

#[test]
fn the_pool_refills_under_a_burst() {
    let scratch = Scratch::new("ct-burst");
    let dir = probe_bundle(&scratch, LIMITS);
    let tb = testbed_with(2, &["--container-pool", "2"]);
    let handle = prepare_bundle(&tb, 0, &dir);
    let first = cli(&tb, 1, &["resume", &handle], "{\"n\": 1}\n");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(eventually(Duration::from_secs(10), || pool_stat(
        &tb, 1, "ready"
    ) == 2));

    // Eight children at once, each holding its container until its input arrives.
    let burst: Vec<_> = (0..8)
        .map(|_| spawn_cli(&tb, 1, &["resume", &handle]))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || status_line(
            &tb,
            1,
            "children running"
        ) == "children running 8"),
        "{}",
        status_line(&tb, 1, "children running")
    );
    for (i, (child, mut input)) in burst.into_iter().enumerate() {
        writeln!(input, "{{\"n\": {i}}}").unwrap();
        drop(input);
        let out = wait_output(child, Duration::from_secs(30));
        assert!(
            stdout(&out).contains(&format!("hello #{i}")),
            "{}",
            stderr(&out)
        );
    }
    assert!(eventually(Duration::from_secs(10), || pool_stat(
        &tb, 1, "ready"
    ) == 2));
    let (made, taken, misses, ready) = (
        pool_stat(&tb, 1, "made"),
        pool_stat(&tb, 1, "taken"),
        pool_stat(&tb, 1, "misses"),
        pool_stat(&tb, 1, "ready"),
    );
    assert_eq!(taken, 9);
    assert!(misses >= 1, "a burst of 8 over a pool of 2 must outrun it");
    // Every container the pool made was either taken or is ready now.
    assert_eq!(
        made,
        taken - misses + ready,
        "made {made} taken {taken} misses {misses}"
    );
    teardown(tb);
}

#[test]
fn a_restarted_daemon_removes_what_a_crashed_one_left() {
    let scratch = Scratch::new("ct-crash");
    let dir = probe_bundle(&scratch, LIMITS);
    let tb = testbed_with(2, &["--container-pool", "2"]);
    let handle = prepare_bundle(&tb, 0, &dir);
    let out = cli(&tb, 1, &["resume", &handle], "{\"n\": 1}\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(eventually(Duration::from_secs(10), || {
        pool_stat(&tb, 1, "ready") == 2 && inits_of(&tb, 1).len() == 2
    }));

    tb.host(1).kill_daemon().unwrap();
    let left = inits_of(&tb, 1);
    assert_eq!(
        left.len(),
        2,
        "the crash leaves the pool's containers: {left:?}"
    );
    tb.host(1).start_daemon().unwrap();
    assert_eq!(
        status_line(&tb, 1, "container cgroups"),
        "container cgroups 0"
    );
    assert!(
        left.iter().all(|p| !alive(*p)),
        "{left:?} survived the restart"
    );
    assert_eq!(
        inits_of(&tb, 0).len(),
        1,
        "host 0's seed container is untouched"
    );
    let again = cli(&tb, 1, &["resume", &handle], "{\"n\": 2}\n");
    assert!(stdout(&again).contains("hello #2"), "{}", stderr(&again));
    teardown(tb);
}

/// Runs `bundle` cold through `host`'s daemon with `input` on stdin and `memory_mib`: its
/// stdout, stderr and how it ended.
fn start_cold(
    tb: &Testbed,
    host: usize,
    bundle: &Path,
    memory_mib: Option<u64>,
    input: &str,
) -> (String, mitosis_client::Exited) {
    use std::io::Read;
    use std::os::fd::AsFd;
    let (in_r, mut in_w) = pipe();
    let (mut out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let running = mitosis_client::Client::connect(tb.host(host).socket_path())
        .unwrap()
        .with_timeout(Duration::from_secs(60))
        .unwrap()
        .start(
            bundle,
            memory_mib,
            None,
            in_r.as_fd(),
            out_w.as_fd(),
            err_w.as_fd(),
        )
        .unwrap_or_else(|e| panic!("start: {e}\n{}", tb.host(host).daemon_log()));
    drop((in_r, out_w, err_w));
    in_w.write_all(input.as_bytes()).unwrap();
    drop(in_w);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    (out, running.wait().unwrap())
}

/// A pipe's read and write ends (close-on-exec).
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array it is given.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just made by pipe2 and are owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

#[test]
fn a_cold_start_runs_the_bundle_afresh_within_the_memory_asked() {
    use std::io::Read;
    use std::os::fd::AsFd;
    let scratch = Scratch::new("ct-cold");
    let dir = probe_bundle(&scratch, "{}");
    let tb = testbed(1);
    let (out, exited) = start_cold(&tb, 0, &dir, None, "{\"op\": \"whoami\"}\n{\"n\": 4}\n");
    assert_eq!(exited.status, 0, "{exited:?}");
    // A fresh process: it starts up (says `ready`) before it reads the requests.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "ready");
    let who: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    // Its own container: the bundle's hostname, pid 2 under the container's init.
    assert_eq!(who["hostname"], "fn", "{who}");
    assert_eq!(who["pid"], 2, "{who}");
    assert!(lines[2].contains("hello #4"), "{out}");

    // 64 MiB asked of a bundle without a limit: 16 fit, 200 are killed with the reason.
    let (out, exited) = start_cold(
        &tb,
        0,
        &dir,
        Some(64),
        "{\"op\": \"alloc\", \"mib\": 16}\n{\"op\": \"alloc\", \"mib\": 200}\n",
    );
    assert_eq!(exited.status, 137, "{exited:?} {out}");
    let reason = exited.reason.unwrap_or_default();
    assert!(
        reason.contains("out of memory") && reason.contains("64 MiB"),
        "{reason}"
    );
    assert!(out.contains("\"allocated\": 16"), "{out}");

    // Warm: it answers once the process waits on stdin, its start-up output already written.
    let (in_r, mut in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let running = mitosis_client::Client::connect(tb.host(0).socket_path())
        .unwrap()
        .start(
            &dir,
            None,
            Some(Duration::from_secs(30)),
            in_r.as_fd(),
            out_w.as_fd(),
            err_w.as_fd(),
        )
        .unwrap();
    drop((in_r, out_w, err_w));
    // SAFETY: fcntl on an fd this function owns; no memory is passed.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&out_r),
            libc::F_SETFL,
            libc::O_NONBLOCK,
        )
    };
    let mut early = [0u8; 256];
    let n = (&out_r).read(&mut early).unwrap();
    assert_eq!(&early[..n], b"ready\n");
    in_w.write_all(b"{\"n\": 9}\n").unwrap();
    drop(in_w);
    assert_eq!(running.wait().unwrap().status, 0);

    // A missing bundle is refused before anything starts.
    let missing = mitosis_client::Client::connect(tb.host(0).socket_path())
        .unwrap()
        .start(
            &scratch.0.join("nothing-here"),
            None,
            None,
            std::io::stdin().as_fd(),
            std::io::stdout().as_fd(),
            std::io::stderr().as_fd(),
        );
    let err = missing.err().expect("a missing bundle starts nothing");
    assert_eq!(
        err.kind(),
        Some(mitosis_client::ErrorKind::Unsupported),
        "{err}"
    );
    // Nothing is left: no container of this daemon.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !inits_of(&tb, 0).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // (cold starts take no pooled container, and none was resumed here).
    assert_eq!(inits_of(&tb, 0), Vec::<i32>::new());
    teardown(tb);
}

/// A child on another host, then one on the seed's own, each asked `input`, answer `want`.
fn children_answer(tb: &Testbed, handle: &str, input: &str, want: &serde_json::Value) {
    for host in [1, 0] {
        let me = answer(&cli(tb, host, &["resume", handle], input));
        assert_eq!(&me, want, "host {host}");
    }
}

/// A program in the bundle that starts a process (gone before its thread starts, so the
/// thread's id leaves a gap), then a thread; asked, it signals that thread with
/// `pthread_kill`, which glibc sends to the id it keeps for the thread.
const THREAD_SIGNAL: &str = r#"
import json, os, signal, subprocess, sys, threading, time
subprocess.run(["true"], check=True)
got = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: got.set())
worker = threading.Thread(target=threading.Event().wait, daemon=True)
worker.start()
for line in sys.stdin:
    got.clear()
    try:
        signal.pthread_kill(worker.ident, signal.SIGUSR1)
        sent = "ok"
    except OSError as e:
        sent = type(e).__name__
    # The handler runs on the main thread, between bytecodes, once the worker took the
    # signal: a blocking wait on the main thread would not notice.
    deadline = time.monotonic() + 5
    while not got.is_set() and time.monotonic() < deadline:
        time.sleep(0.005)
    # Ids as the seed read them (cached by threading) against the ones the kernel has.
    ids = sorted([threading.main_thread().native_id, worker.native_id])
    tasks = sorted(int(t) for t in os.listdir("/proc/self/task"))
    print(json.dumps({"sent": sent, "handled": got.is_set(), "seed_ids": ids == tasks}),
          flush=True)
"#;

/// A container child's process and threads take their seed's ids in its container (here
/// the seed's thread came after a process that was gone: a gap), so what the seed read of
/// them still holds, and glibc's `pthread_kill` reaches the thread.
#[test]
fn a_container_childs_threads_keep_their_seeds_ids() {
    let scratch = Scratch::new("ct-tids");
    let dir = bundle(&scratch, &["python3", "-c", THREAD_SIGNAL], LIMITS);
    let tb = testbed(2);
    let handle = prepare_bundle(&tb, 0, &dir);
    let want = serde_json::json!({"sent": "ok", "handled": true, "seed_ids": true});
    children_answer(&tb, &handle, "signal\n", &want);
    teardown(tb);
}

/// A bundle whose rootfs holds nothing but the Go example (static) at /fn.
fn go_bundle(scratch: &Scratch, bin: &Path) -> PathBuf {
    let dir = scratch.0.join("go-bundle");
    let rootfs = dir.join("rootfs");
    for sub in ["proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy(bin, rootfs.join("fn")).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["/fn"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": []},
        "root": {"path": rootfs, "readonly": true},
        "hostname": "fn",
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                                 {"type": "ipc"}, {"type": "network"}]}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// A Go function in a bundle of nothing but itself. Go stops every goroutine for a
/// collection by signalling the thread of one that runs without making calls, by the id it
/// read when the thread started: a container child's threads have their seed's ids (the
/// pid-gap test above checks that for any runtime), so a goroutine spinning until another
/// sets a flag is stopped, and the flag set. A bare child, whose ids are new, never ends it
/// (docs/limits.md).
#[test]
fn a_go_childs_collection_stops_a_spinning_goroutine_in_a_container() {
    let (scratch, bin) = build_go_example();
    let dir = go_bundle(&scratch, &bin);
    let tb = testbed(2);
    let handle = prepare_bundle(&tb, 0, &dir);
    let out = cli(
        &tb,
        1,
        &["resume", &handle],
        "{\"spin\": true}\n{\"n\": 7}\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let answers: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0]["spin"], "done");
    assert_eq!(answers[1]["n"], 7);
    assert_eq!(answers[1]["gc"], true);
    assert_eq!(answers[1]["ticking"], true);
    teardown(tb);
}

/// Reports what the process may do, and whether it can bind a privileged port.
const PRIVILEGES: &str = r#"
import json, os, resource, socket, sys
for line in sys.stdin:
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 80))
        bound = True
    except PermissionError:
        bound = False
    s.close()
    print(json.dumps({
        "uid": os.getuid(), "groups": sorted(os.getgroups()),
        "caps": {k: status[k].strip() for k in ("CapBnd", "CapPrm", "CapEff", "CapAmb")},
        "nnp": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
        "umask": status["Umask"].strip(), "oom": open("/proc/self/oom_score_adj").read().strip(),
        "ttl": open("/proc/sys/net/ipv4/ip_default_ttl").read().strip(),
        "msgmax": open("/proc/sys/kernel/msgmax").read().strip(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "bound_80": bound,
    }), flush=True)
"#;

/// A bundle's supplementary groups, umask, OOM score adjustment, capabilities, resource
/// limits, no_new_privs, seccomp profile and namespaced kernel parameters are its process's,
/// and its children's: a user who may bind port 80 through an ambient capability, and
/// nothing more.
#[test]
fn a_bundles_process_settings_privileges_and_sysctls_reach_its_children() {
    let scratch = Scratch::new("ct-privs");
    let dir = bundle(&scratch, &["python3", "-c", PRIVILEGES], LIMITS);
    edit_config(
        &dir,
        r#""user": {"uid": 0, "gid": 0}"#,
        r#""user": {"uid": 1000, "gid": 1000, "additionalGids": [4, 100], "umask": 23},
               "noNewPrivileges": true, "oomScoreAdj": 200,
               "capabilities": {"bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                                "permitted": ["CAP_NET_BIND_SERVICE"],
                                "inheritable": ["CAP_NET_BIND_SERVICE"],
                                "effective": ["CAP_NET_BIND_SERVICE"],
                                "ambient": ["CAP_NET_BIND_SERVICE"]},
               "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}]"#,
    );
    // With no_new_privs the profile loads last, as the unprivileged user.
    edit_config(
        &dir,
        r#""linux": {"#,
        r#""linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["acct"], "action": "SCMP_ACT_ERRNO"}]},
               "sysctl": {"net.ipv4.ip_default_ttl": "42", "kernel.msgmax": "4096"},"#,
    );
    let want = serde_json::json!({
        "uid": 1000,
        "groups": [4, 100],
        "caps": {"CapBnd": "0000000000000420", "CapPrm": "0000000000000400",
                 "CapEff": "0000000000000400", "CapAmb": "0000000000000400"},
        "nnp": "1",
        "seccomp": "2",
        "umask": "0027",
        "oom": "200",
        "ttl": "42",
        "msgmax": "4096",
        "nofile": [256, 512],
        "bound_80": true,
    });
    bundle_children_answer(&dir, "?\n", &want, 1);
}

/// Reads what the bundle's own mounts give: a file kept open since before the prepare, one
/// mapped and one read afresh from a read-only bind of a host directory, a bound host file,
/// a tmpfs of its own with its size, and what writing to each does; and whether a file the
/// seed kept open in its own tmpfs is open.
const OWN_MOUNTS: &str = r#"
import json, mmap, os, sys
kept = open("/mnt/table.txt")
mapped = mmap.mmap(os.open("/mnt/table.txt", os.O_RDONLY), 0, prot=mmap.PROT_READ)
own = open("/media/seed.txt", "w")
for line in sys.stdin:
    kept.seek(0)
    fresh = open("/mnt/table.txt").read()
    tmp = os.statvfs("/media")
    with open("/media/mine.txt", "w") as f:
        f.write(line)
    print(json.dumps({
        "kept": kept.read(), "fresh": fresh, "motd": open("/etc/motd").read(),
        "scratch_bytes": tmp.f_blocks * tmp.f_frsize, "scratch_kept": open("/media/mine.txt").read(),
        "data_write": outcome(lambda: open("/mnt/new.txt", "w").close()), "scratch_mode": oct(os.stat("/media").st_mode & 0o7777),
        "mapped": mapped[:].decode(), "own_file": outcome(lambda: os.fstat(own.fileno())),
    }), flush=True)
"#;

/// A bundle's own mounts (a read-only bind of a host directory, a bind of a host file, a
/// tmpfs with its options; over paths the rootfs has, which a test must not add to the
/// shared rootfs) are made in its seed's container and in every child's; a file the
/// seed kept open or mapped from a bind reads the same in its children, and one it kept open
/// in its own tmpfs, which its children do not share, is closed in them.
#[test]
fn a_bundles_bind_and_tmpfs_mounts_are_in_its_childrens_containers() {
    let scratch = Scratch::new("ct-mounts");
    let data = scratch.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("table.txt"), "ticker,price\n").unwrap();
    std::fs::write(scratch.0.join("motd"), "hello from the host\n").unwrap();
    let dir = bundle(
        &scratch,
        &["python3", "-c", &with_outcome(OWN_MOUNTS)],
        LIMITS,
    );
    let mounts = serde_json::json!([
        {"destination": "/mnt", "type": "bind", "source": data,
         "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": "/etc/motd", "type": "none", "source": "../motd",
         "options": ["bind", "ro"]},
        {"destination": "/media", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "size=4m", "mode=1777"]},
    ]);
    edit_config(
        &dir,
        r#""hostname": "fn","#,
        &format!(r#""hostname": "fn", "mounts": {mounts},"#),
    );
    let want = serde_json::json!({
        "kept": "ticker,price\n", "fresh": "ticker,price\n", "motd": "hello from the host\n",
        "scratch_bytes": 4 << 20, "scratch_kept": "q\n", "data_write": "EROFS",
        "scratch_mode": "0o1777", "mapped": "ticker,price\n", "own_file": "EBADF",
    });
    bundle_children_answer(&dir, "q\n", &want, 1);
    assert!(
        !data.join("new.txt").exists(),
        "a child wrote through a read-only bind"
    );
}

/// Makes device nodes where a container may write, and opens them.
const DEVICE_NODES: &str = r#"
import json, os, stat, sys
opens = lambda path: outcome(lambda: os.close(os.open(path, os.O_RDONLY)))
for n, line in enumerate(sys.stdin):
    made = {}
    for d in ("/dev", "/tmp", "/dev/shm"):
        node = f"{d}/null-{os.getpid()}-{n}"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made[d] = opens(node)
        os.unlink(node)
    print(json.dumps({"made": made, "dev_null": opens("/dev/null")}), flush=True)
"#;

/// With CAP_MKNOD, a container's process still opens no device node it made: there is no
/// device cgroup, so every filesystem it can write is nodev (only the standard nodes, bound
/// from the host, open).
#[test]
fn device_nodes_a_container_makes_do_not_open() {
    let scratch = Scratch::new("ct-nodev");
    let dir = bundle(
        &scratch,
        &["python3", "-c", &with_outcome(DEVICE_NODES)],
        LIMITS,
    );
    let caps = r#""capabilities": {"bounding": ["CAP_MKNOD"], "effective": ["CAP_MKNOD"],
                   "permitted": ["CAP_MKNOD"]},"#;
    edit_config(
        &dir,
        r#""cwd": "/opt/mitosis","#,
        &format!(r#""cwd": "/opt/mitosis", {caps}"#),
    );
    let want = serde_json::json!({
        "made": {"/dev": "EACCES", "/tmp": "EACCES", "/dev/shm": "EACCES"},
        "dev_null": "ok",
    });
    bundle_children_answer(&dir, "?\n", &want, 1);
}

/// Maps a file of its container's /dev/shm shared, as POSIX shared memory is, and keeps it
/// open; asked, reads the mapping, writes through the descriptor and reads the mapping again.
const SHM_MAPPING: &str = r#"
import json, mmap, os, sys
fd = os.open("/dev/shm/table", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
m[:6] = b"prices"
for line in sys.stdin:
    kept = outcome(lambda: os.fstat(fd))
    before = m[:6].decode()
    os.pwrite(fd, b"child!", 0)
    print(json.dumps({"mapped": before, "fd": kept, "after_write": m[:6].decode()}), flush=True)
"#;

/// POSIX shared memory (a file in the container's own /dev/shm, which children do not share)
/// comes to each child as a memfd with the seed's content: its descriptor and its mapping
/// are one object there, and a child's writes stay its own (the next child reads the seed's).
#[test]
fn posix_shared_memory_comes_to_container_children_as_a_memfd_with_its_content() {
    let scratch = Scratch::new("ct-shm");
    let dir = bundle(
        &scratch,
        &["python3", "-c", &with_outcome(SHM_MAPPING)],
        LIMITS,
    );
    let want = serde_json::json!({"mapped": "prices", "fd": "ok", "after_write": "child!"});
    bundle_children_answer(&dir, "?\n", &want, 1);
}

/// Writes a cache into /tmp, a segment name into /dev/shm and a file into the bundle's own
/// tmpfs while it warms up; asked, reads them, then writes its own file in /tmp.
const TMPFS_WRITER: &str = r#"
import json, os, sys
os.makedirs("/tmp/cache/deep")
with open("/tmp/cache/model.txt", "w") as f:
    f.write("weights v1")
os.chmod("/tmp/cache/model.txt", 0o640)
os.symlink("cache/model.txt", "/tmp/latest")
with open("/dev/shm/segment", "wb") as f:
    f.write(b"shared")
with open("/media/notes", "w") as f:
    f.write("seed notes")
for n, line in enumerate(sys.stdin):
    print(json.dumps({
        "model": open("/tmp/latest").read(),
        "mode": oct(os.stat("/tmp/cache/model.txt").st_mode & 0o777),
        "deep": os.path.isdir("/tmp/cache/deep"),
        "segment": open("/dev/shm/segment", "rb").read().decode(),
        "notes": open("/media/notes").read(),
        "others": sorted(os.listdir("/tmp")),
    }), flush=True)
    with open(f"/tmp/child-{os.getpid()}", "w") as f:
        f.write("mine")
"#;

/// A child's container starts with what its seed's container held in its own tmpfs mounts
/// (/tmp, /dev/shm, the bundle's) when it was prepared: files, modes, directories and
/// symlinks; what one child writes there its siblings do not see.
#[test]
fn a_container_childs_tmpfs_starts_with_what_its_seed_wrote() {
    let scratch = Scratch::new("ct-tmpfs");
    let dir = bundle(&scratch, &["python3", "-c", TMPFS_WRITER], LIMITS);
    let media =
        r#"{"destination": "/media", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}"#;
    edit_config(
        &dir,
        r#""hostname": "fn","#,
        &format!(r#""hostname": "fn", "mounts": [{media}],"#),
    );
    let want = serde_json::json!({
        "model": "weights v1", "mode": "0o640", "deep": true, "segment": "shared",
        "notes": "seed notes", "others": ["cache", "latest"],
    });
    // Two children on each host: the second does not see the first's file.
    bundle_children_answer(&dir, "?\n", &want, 2);
}

/// What a podman-style config gives: a bound file and directory, a namespaced kernel
/// parameter, a call its default-deny seccomp profile leaves out, and the capabilities.
const PODMAN_PROBE: &str = r#"
import json, os, sys
for line in sys.stdin:
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    print(json.dumps({
        "resolv": open("/etc/resolv.conf").read(), "secret": open("/srv/token").read(),
        "ping": open("/proc/sys/net/ipv4/ping_group_range").read().split(),
        "getpriority": outcome(lambda: os.getpriority(os.PRIO_PROCESS, 0)),
        "seccomp": status["Seccomp"].strip(), "cap_eff": status["CapEff"].strip(),
        "umask": status["Umask"].strip(),
    }), flush=True)
"#;

/// A config as podman writes one (its bind mounts, annotations, cgroups path, sysctl, rlimits,
/// umask, and a default-deny seccomp profile allowing every call this kernel's headers name
/// but one) runs in its seed and in children on both hosts.
#[test]
fn a_bundle_as_podman_writes_it_runs_in_its_children() {
    let scratch = Scratch::new("ct-podman");
    let dir = scratch.0.join("bundle");
    std::fs::create_dir_all(scratch.0.join("secrets")).unwrap();
    std::fs::write(scratch.0.join("secrets/token"), "s3cret").unwrap();
    std::fs::write(scratch.0.join("resolv.conf"), "nameserver 10.0.0.53\n").unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let header = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
        .expect("the kernel's syscall header (linux-libc-dev, with libc6-dev)");
    let allowed: Vec<&str> = header
        .lines()
        .filter_map(|l| l.strip_prefix("#define __NR_")?.split_whitespace().next())
        .filter(|name| *name != "getpriority")
        .collect();
    assert!(allowed.len() > 300, "{} syscalls", allowed.len());
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT",
    ];
    let bind = ["bind", "rprivate"];
    let config = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 0, "gid": 0, "umask": 18, "additionalGids": [0]},
            "args": ["python3", "-c", with_outcome(PODMAN_PROBE)],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "container=podman", "HOME=/root"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "oomScoreAdj": 0
        },
        "root": {"path": ROOTFS, "readonly": true},
        "hostname": "podmanfn",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["rprivate", "nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/dev/shm", "type": "bind",
             "source": scratch.0.join("secrets"), "options": ["bind", "private", "nodev"]},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": scratch.0.join("resolv.conf"), "options": bind},
            {"destination": "/srv", "type": "bind", "source": scratch.0.join("secrets"),
             "options": ["bind", "rprivate", "ro"]}
        ],
        "annotations": {"io.container.manager": "libpod",
                        "org.opencontainers.image.stopSignal": "15"},
        "linux": {
            "sysctl": {"net.ipv4.ping_group_range": "0 0"},
            "resources": {"pids": {"limit": 2048}},
            "cgroupsPath": "machine.slice:libpod:fn",
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                        "syscalls": [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]},
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"]
        }
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let want = serde_json::json!({
        "resolv": "nameserver 10.0.0.53\n", "secret": "s3cret", "ping": ["0", "0"],
        "getpriority": "ENOSYS", "seccomp": "2",
        // The eleven capabilities podman gives.
        "cap_eff": "00000000800405fb", "umask": "0022",
    });
    bundle_children_answer(&dir, "?\n", &want, 1);
}

/// What the bundle's seccomp profile lets through: mkdir, IPv6 and IPv4 sockets, and the
/// filter count the kernel shows.
const SECCOMP_PROBE: &str = r#"
import json, os, socket, sys
for n, line in enumerate(sys.stdin):
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    print(json.dumps({
        "mkdir": outcome(lambda: os.mkdir(f"/tmp/d{os.getpid()}-{n}")),
        "inet6": outcome(lambda: socket.socket(socket.AF_INET6).close()),
        "inet": outcome(lambda: socket.socket(socket.AF_INET).close()),
        "seccomp": status["Seccomp"].strip(), "filters": status["Seccomp_filters"].strip(),
        "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    }), flush=True)
"#;

/// A bundle's seccomp profile (linux.seccomp, compiled with libseccomp) confines its seed and
/// every child: a call it refuses fails with its errno, a rule on an argument refuses only
/// what matches, and what it allows works. A config that lists no capabilities gets none.
#[test]
fn a_bundles_seccomp_profile_confines_its_children() {
    let scratch = Scratch::new("ct-seccomp");
    let dir = bundle(
        &scratch,
        &["python3", "-c", &with_outcome(SECCOMP_PROBE)],
        LIMITS,
    );
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
             "args": [{"index": 0, "value": 10, "op": "SCMP_CMP_EQ"}]},
        ],
    });
    edit_config(
        &dir,
        r#""linux": {"#,
        &format!(r#""linux": {{"seccomp": {profile}, "#),
    );
    let want = serde_json::json!({
        "mkdir": "EACCES", "inet6": "EAFNOSUPPORT", "inet": "ok",
        "seccomp": "2", "filters": "1",
        // No capabilities listed: none, as runc gives, though the process is root.
        "cap_eff": "0000000000000000", "cap_bnd": "0000000000000000",
    });
    bundle_children_answer(&dir, "?\n", &want, 1);
}

/// Reports the mounts `runc spec` lists beyond the standard ones, its pty and capabilities.
const RUNC_SPEC_PROBE: &str = r#"
import json, os, sys
for line in sys.stdin:
    mounts = {}
    for l in open("/proc/self/mountinfo"):
        left, right = l.split(" - ")
        point, opts = left.split()[4], left.split()[5]
        mounts[point] = (right.split()[0], opts.split(",")[0])
    master, slave = os.openpty()
    os.write(master, b"ping\n")
    echoed = os.read(slave, 16)
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    print(json.dumps({
        "pts": mounts.get("/dev/pts"), "mqueue": mounts.get("/dev/mqueue"),
        "cgroup": mounts.get("/sys/fs/cgroup"), "pty": echoed.decode(),
        "cap_bnd": status["CapBnd"].strip(), "nnp": status["NoNewPrivs"].strip(),
    }), flush=True)
"#;

/// A bundle's config as `runc spec` writes it (but for a terminal, which a function has not):
/// its extra mounts (a devpts of its own, the message queues, cgroup2 read-only), its
/// capabilities (ambient ones it does not make inheritable), limit and no_new_privs, masked
/// and read-only paths, device rule and cgroup namespace. Its seed and children run.
#[test]
fn a_bundle_as_runc_spec_writes_it_runs_in_its_children() {
    let scratch = Scratch::new("ct-runc");
    let dir = scratch.0.join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    let nosuid = ["nosuid", "noexec", "nodev"];
    let config = serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["python3", "-c", RUNC_SPEC_PROBE],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                             "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": ROOTFS, "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": nosuid},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"]
        }
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let want = serde_json::json!({
        "pts": ["devpts", "rw"], "mqueue": ["mqueue", "rw"], "cgroup": ["cgroup2", "ro"],
        "pty": "ping\n",
        // CAP_AUDIT_WRITE (29), CAP_KILL (5), CAP_NET_BIND_SERVICE (10).
        "cap_bnd": "0000000020000420", "nnp": "1",
    });
    bundle_children_answer(&dir, "?\n", &want, 1);
}
