//! End to end: seeds on one simulated host, children on another (as root).

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

#[test]
fn child_on_another_host_sees_the_seeds_memory_as_prepared() {
    let tb = testbed(2);
    let dir = Scratch::new("memory");
    let mut seed = memcheck_seed(&tb, 0, &dir.0);
    let handle = prepare(&tb, 0, seed.pid());
    // Writes after prepare must stay invisible to children.
    assert_eq!(seed.send("mutate"), "mutated");

    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "stderr: {}\nhost1: {}",
        stderr(&out),
        tb.host(1).daemon_log()
    );
    assert_eq!(out.status.code(), Some(0));

    // The seed ran on and sees its own writes.
    assert!(seed.send("verify").starts_with("FAIL heap"));
    drop(seed);
    teardown(tb);
}

#[test]
fn child_can_grow_remap_and_discard_memory() {
    let tb = testbed(2);
    let dir = Scratch::new("exercise");
    let seed = memcheck_seed(&tb, 0, &dir.0);
    let handle = prepare(&tb, 0, seed.pid());
    let out = cli(&tb, 1, &["resume", &handle], "exercise\nexercise\nverify\n");
    assert_eq!(
        stdout(&out),
        format!("exercised\nexercised\nok 11 {MEMCHECK_DIGEST}\n"),
        "stderr: {}",
        stderr(&out)
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn one_seed_serves_many_children_and_runs_on() {
    let tb = testbed(3);
    let dir = Scratch::new("many");
    let mut seed = memcheck_seed(&tb, 0, &dir.0);
    let handle = prepare(&tb, 0, seed.pid());
    // Descriptors of host 1's daemon, less its TCP connections: the peer connection pool
    // grows with concurrency up to its bound, which is no leak.
    let daemon_fds = || {
        let pid = tb.host(1).daemon_pid().unwrap();
        let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
        let tcp_inodes: Vec<String> = tcp
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(9).map(|i| format!("socket:[{i}]")))
            .collect();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| !tcp_inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .count()
    };
    let run_batch = || {
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..6)
                .map(|i| {
                    let (tb, handle) = (&tb, &handle);
                    s.spawn(move || cli(tb, 1 + i % 2, &["resume", handle], "verify\n"))
                })
                .collect();
            for run in runs {
                let out = run.join().expect("child thread");
                assert_eq!(
                    stdout(&out),
                    format!("ok 11 {MEMCHECK_DIGEST}\n"),
                    "stderr: {}",
                    stderr(&out)
                );
            }
        });
        // Let the daemon finish with the children that just exited.
        std::thread::sleep(Duration::from_millis(200));
    };
    // The first batch builds host 1's replica and fills its connection pool.
    run_batch();
    let fds_before = daemon_fds();
    run_batch();
    // Finished children leave no process and no descriptor behind in the daemon.
    assert_eq!(
        daemon_fds(),
        fds_before,
        "host 1's daemon leaked descriptors"
    );
    // The only stub processes left are the daemon's replica of the seed and its pool of
    // waiting stubs (at most `--stub-pool`, 2): those still run the stub's own program, so
    // they have its command line, which a replica's replaced memory no longer holds.
    let daemon = tb.host(1).daemon_pid().unwrap();
    let (waiting, stubs): (Vec<i32>, Vec<i32>) = stub_processes()
        .into_iter()
        .filter(|pid| is_child_of(*pid, daemon))
        .partition(|pid| {
            !std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        });
    assert_eq!(
        stubs,
        replica_pids(&tb, 1),
        "stub processes besides the replica"
    );
    assert!(waiting.len() <= 2, "stub pool overgrown: {waiting:?}");
    // A child on the seed's own host too.
    let out = cli(&tb, 0, &["resume", &handle], "verify\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Dropping the seed kills its twin and leaves the seed no zombie child.
    let out = cli(&tb, 0, &["drop", &handle], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        seed.children().trim(),
        "",
        "the seed still has children after drop"
    );
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert!(stderr(&out).contains("no seed"), "{}", stderr(&out));
    // The seed, stopped briefly at prepare and at drop, is intact.
    assert_eq!(seed.send("verify"), format!("ok 11 {MEMCHECK_DIGEST}"));
    drop(seed);
    teardown(tb);
}

#[test]
fn exit_status_and_signals_pass_through() {
    let tb = testbed(2);
    let dir = Scratch::new("status");
    let seed = memcheck_seed(&tb, 0, &dir.0);
    let handle = prepare(&tb, 0, seed.pid());

    let out = cli(&tb, 1, &["resume", &handle], "exit 7\n");
    assert_eq!(out.status.code(), Some(7));

    // A child waiting on stdin; SIGTERM to the command reaches the child.
    let (resume, mut input) = spawn_cli(&tb, 1, &["resume", &handle]);
    input.write_all(b"echo\nhello from the child\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(resume.id() as i32, libc::SIGTERM) };
    let out = wait_output(resume, Duration::from_secs(30));
    drop(input);
    assert_eq!(stdout(&out), "hello from the child\n");
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        stderr(&out)
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tb = testbed(2);
    let dir = Scratch::new("bad");
    let seed = memcheck_seed(&tb, 0, &dir.0);
    let handle = prepare(&tb, 0, seed.pid());

    let expect_err = |host: usize, args: &[&str], needle: &str| {
        let out = cli(&tb, host, args, "verify\n");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
        assert!(stdout(&out).is_empty());
    };
    let wrong_key = format!("{}{}", &handle[..handle.len() - 4], "0000");
    expect_err(1, &["resume", &wrong_key], "wrong key");
    expect_err(1, &["resume", "mitosis://nonsense"], "malformed handle");
    let other_seed = handle.replacen("/1/", "/99/", 1);
    expect_err(1, &["resume", &other_seed], "no seed 99");
    let nowhere = handle.replacen("10.77.0.1:7070", "10.77.0.1:7999", 1);
    expect_err(1, &["resume", &nowhere], "cannot reach host");
    expect_err(0, &["prepare", "--pid", "999999999"], "no process with pid");

    // The original handle still works after all that.
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    drop(seed);
    teardown(tb);
}

#[test]
fn child_whose_page_source_dies_is_killed_with_a_reason() {
    let tb = testbed(2);
    let dir = Scratch::new("dead");
    let seed = memcheck_seed(&tb, 0, &dir.0);
    let handle = prepare(&tb, 0, seed.pid());

    let (resume, mut input) = spawn_cli(&tb, 1, &["resume", &handle]);
    // Let the child start and block on its stdin, then take the seed's host away.
    std::thread::sleep(Duration::from_millis(500));
    tb.host(0).kill_daemon().unwrap();
    input.write_all(b"verify\n").unwrap();
    let out = wait_output(resume, Duration::from_secs(30));
    drop(input);
    let err = stderr(&out);
    assert!(err.contains("child killed: page source lost"), "{err}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{err}");
    assert!(
        !stdout(&out).contains("ok 11"),
        "the child must not run on with zero-filled memory"
    );
    drop(seed);
    teardown(tb);
}
