//! A child continues exactly where its seed was: what the seed's own code observes at the
//! prepare point (signal handlers and waits, pending signals, timers, thread names and
//! parent-death signals), a child forked onto another host observes the same.

mod common;

use std::time::Duration;

use common::*;

const SIGSTATE_BIN: &str = env!("SIGSTATE_BIN");

/// Whether `pid` waits in epoll_wait (or epoll_pwait).
fn in_epoll(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .is_ok_and(|s| matches!(s.split_whitespace().next(), Some("232" | "281")))
}

/// The sigstate fixture in `host` in `mode`, prepared there once its main thread waits in
/// `syscall` (a number as /proc/PID/syscall shows it): the seed and its handle.
fn prepared(tb: &mitosis_testbed::Testbed, mode: &str, waits_in: &[&str]) -> (Seed, String) {
    let mut cmd = tb.host(0).command(SIGSTATE_BIN);
    cmd.arg(mode);
    let seed = Seed::start(cmd);
    let pid = seed.pid();
    let waiting = || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
            s.split_whitespace()
                .next()
                .is_some_and(|n| waits_in.contains(&n))
        })
    };
    assert!(
        eventually(Duration::from_secs(10), waiting),
        "the seed never waits"
    );
    let handle = prepare(tb, 0, pid);
    (seed, handle)
}

/// Resumes `handle` on host 1 with `input`; the child's stdout lines, after checking its exit.
fn child_says(tb: &mitosis_testbed::Testbed, handle: &str, input: &str) -> Vec<String> {
    let out = cli(tb, 1, &["resume", handle], input);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}\nhost 1: {}",
        stdout(&out),
        stderr(&out),
        tb.host(1).daemon_log()
    );
    stdout(&out).lines().map(str::to_string).collect()
}

#[test]
fn a_child_waiting_in_epoll_runs_its_sigterm_handler() {
    let tb = testbed(2);
    // Prepared while it waits in epoll_wait: the child starts there.
    let (mut seed, handle) = prepared(&tb, "epoll", &["232", "281"]);

    let (resume, input) = spawn_cli(&tb, 1, &["resume", &handle]);
    let daemon = tb.host(1).daemon_pid().expect("host 1's daemon");
    let child_in_epoll = || processes_with_parent(daemon).into_iter().any(in_epoll);
    assert!(
        eventually(Duration::from_secs(20), child_in_epoll),
        "no child waits in epoll_wait; host 1: {}",
        tb.host(1).daemon_log()
    );
    // SAFETY: signalling our own child process (resume passes SIGTERM to the child).
    unsafe { libc::kill(resume.id() as i32, libc::SIGTERM) };
    let out = wait_output(resume, Duration::from_secs(30));
    drop(input);
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines, ["term"], "stderr: {}", stderr(&out));
    assert_eq!(out.status.code(), Some(43), "{}", stderr(&out));

    // The seed does the same.
    // SAFETY: signalling the seed, our own child process.
    unsafe { libc::kill(seed.pid(), libc::SIGTERM) };
    let mut line = String::new();
    std::io::BufRead::read_line(&mut seed.stdout, &mut line).unwrap();
    assert_eq!(line, "term\n");
    assert_eq!(seed.child.wait().unwrap().code(), Some(43));
    teardown(tb);
}

#[test]
fn pending_signals_and_their_siginfo_are_carried() {
    let tb = testbed(2);
    // Prepared while the main thread reads stdin.
    let (mut seed, handle) = prepared(&tb, "pending", &["0"]);
    let child = child_says(&tb, &handle, "status\ndrain\nstatus\n");
    let seed_says = [seed.send("status"), seed.send("drain"), seed.send("status")];
    // The main thread's parent-death signal ties a child to the daemon that serves its pages.
    let child: Vec<String> = child
        .iter()
        .map(|l| l.replace("pdeathsig=9", "pdeathsig=0"))
        .collect();
    assert_eq!(child[0], seed_says[0]);
    assert_eq!(child[2], seed_says[2]);
    // The seed reaps its exited child; the child reaps its own, made again with its status.
    let (seed_drained, seed_waits) = seed_says[1].split_once(" wait=").unwrap();
    assert_eq!(seed_waits, "child status=5");
    let (child_drained, child_waits) = child[1].split_once(" wait=").unwrap();
    assert_eq!(child_drained, seed_drained);
    assert_eq!(child_waits, seed_waits);
    teardown(tb);
}

/// The `key=value` words of a status line.
fn words(line: &str) -> std::collections::BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A timer's "left/period" in seconds.
fn times(v: &str) -> (f64, f64) {
    let (left, period) = v.split_once('/').unwrap_or_else(|| panic!("{v}"));
    (left.parse().unwrap(), period.parse().unwrap())
}

#[test]
fn timers_are_carried_with_their_ids_and_time_left() {
    let tb = testbed(2);
    let (mut seed, handle) = prepared(&tb, "timers", &["0"]);
    let child = child_says(&tb, &handle, "status\n");
    let seed_says = seed.send("status");
    eprintln!("seed:  {seed_says}\nchild: {}", child[0]);
    let (seed_w, child_w) = (words(&seed_says), words(&child[0]));
    assert_eq!(
        seed_w.keys().collect::<Vec<_>>(),
        child_w.keys().collect::<Vec<_>>()
    );
    // Ids 1 and 2 exist, 0 and 3 do not, in both.
    for absent in ["timer0", "timer3"] {
        assert_eq!(child_w[absent], "EINVAL");
        assert_eq!(seed_w[absent], "EINVAL");
    }
    // Same periods; the child's time left is at most the seed's at the prepare point and
    // within a few seconds of it (the seed's own timers ran on meanwhile).
    for (key, full) in [
        ("real", 1000.0),
        ("virtual", 2000.0),
        ("prof", 3000.0),
        ("timer1", 4000.0),
        ("timer2", 5000.0),
    ] {
        let (s, c) = (times(&seed_w[key]), times(&child_w[key]));
        assert_eq!(s.1, c.1, "{key}: {seed_says} / {}", child[0]);
        // CPU-time timers are kept at tick granularity: a little over is the kernel rounding.
        assert!(
            c.0 <= full + 0.1 && c.0 > full - 10.0,
            "{key}: {}",
            child[0]
        );
    }
    // The timerfd: 50 us, then every 4 s; it expired once before the prepare.
    let (tfd_left, tfd_period) = times(&child_w["timerfd"]);
    assert_eq!(tfd_period, 4.0);
    assert!(tfd_left > 0.0 && tfd_left <= 4.0, "{}", child[0]);
    assert_eq!(child_w["ticks"], "1");
    assert_eq!(seed_w["ticks"], "1");
    teardown(tb);
}

#[test]
fn thread_names_and_parent_death_signals_are_carried() {
    let tb = testbed(2);
    let (mut seed, handle) = prepared(&tb, "prctl", &["0"]);
    let child = child_says(&tb, &handle, "status\n");
    let seed_says = seed.send("status");
    assert!(
        seed_says.starts_with("main: name=sig-main pdeathsig=12 "),
        "{seed_says}"
    );
    assert!(
        seed_says.contains("worker: name=sig-worker pdeathsig=1 "),
        "{seed_says}"
    );
    // The main thread's parent-death signal stays SIGKILL: it ties the child to the daemon
    // that serves its pages.
    assert_eq!(child[0], seed_says.replace("pdeathsig=12", "pdeathsig=9"));
    teardown(tb);
}
