//! End to end: seeds on one simulated host, children on another (as root).

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

#[test]
fn child_on_another_host_sees_the_seeds_memory_as_prepared() {
    let tb = testbed(2);
    let (_dir, mut seed, handle) = prepared_memcheck(&tb, "memory");
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
    let (_dir, seed, handle) = prepared_memcheck(&tb, "exercise");
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
    let (_dir, mut seed, handle) = prepared_memcheck(&tb, "many");
    // Descriptors of host 1's daemon, less its TCP connections: the peer connection pool
    // grows with concurrency up to its bound, which is no leak.
    let daemon_fds = || daemon_fds(&tb, 1);
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
        // The daemon is done with the children that just exited.
        for host in [1, 2] {
            assert!(eventually(Duration::from_secs(10), || {
                status_value(&tb, host, "children running") == Some(0)
            }));
        }
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
    // they have its command line, where a replica has its seed's.
    let daemon = tb.host(1).daemon_pid().unwrap();
    let stub_cmdline = format!("{}\0", bin("mitosis-stub").display()).into_bytes();
    let (waiting, stubs): (Vec<i32>, Vec<i32>) = stub_processes()
        .into_iter()
        .filter(|pid| is_child_of(*pid, daemon))
        .partition(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default() == stub_cmdline
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
    let (_dir, seed, handle) = prepared_memcheck(&tb, "status");

    let out = cli(&tb, 1, &["resume", &handle], "exit 7\n");
    assert_eq!(out.status.code(), Some(7));

    // A child waiting on stdin; SIGTERM to the command reaches the child.
    let (resume, mut input) = spawn_cli(&tb, 1, &["resume", &handle]);
    input.write_all(b"echo\nhello from the child\n").unwrap();
    wait_for_child_reading_stdin(&tb, 1);
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
    let (_dir, seed, handle) = prepared_memcheck(&tb, "bad");

    // Each with its exit code (docs/operations.md).
    let expect_err = |host: usize, args: &[&str], needle: &str, code: i32| {
        let out = cli(&tb, host, args, "verify\n");
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
        assert!(stdout(&out).is_empty());
    };
    let wrong_key = format!("{}{}", &handle[..handle.len() - 4], "0000");
    expect_err(1, &["resume", &wrong_key], "wrong key", 77);
    expect_err(1, &["resume", "mitosis://nonsense"], "malformed handle", 65);
    let other_seed = handle.replacen("/1/", "/99/", 1);
    expect_err(1, &["resume", &other_seed], "no seed 99", 67);
    let nowhere = handle.replacen("10.77.0.1:7070", "10.77.0.1:7999", 1);
    expect_err(1, &["resume", &nowhere], "cannot reach host", 68);
    expect_err(
        0,
        &["prepare", "--pid", "999999999"],
        "no process with pid",
        66,
    );

    // A platform matches on the kind of each failure, not on its words.
    use mitosis_client::{Client, ErrorKind};
    let kind_of = |host: usize, handle: &str| {
        let client = Client::connect(tb.host(host).socket_path()).unwrap();
        client.inspect(handle).err().and_then(|e| e.kind())
    };
    assert_eq!(kind_of(1, &wrong_key), Some(ErrorKind::WrongKey));
    assert_eq!(kind_of(0, &wrong_key), Some(ErrorKind::WrongKey));
    assert_eq!(kind_of(1, &other_seed), Some(ErrorKind::NoSuchSeed));
    assert_eq!(kind_of(1, &nowhere), Some(ErrorKind::Unreachable));
    assert_eq!(
        kind_of(1, "mitosis://nonsense"),
        Some(ErrorKind::BadRequest)
    );
    let client = Client::connect(tb.host(0).socket_path()).unwrap();
    let err = client.prepare_pid(999_999_999).unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NoSuchProcess));

    // The original handle still works after all that.
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    drop(seed);
    teardown(tb);
}

#[test]
fn child_whose_page_source_dies_is_killed_with_a_reason() {
    let tb = testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "dead");

    let (resume, mut input) = spawn_cli(&tb, 1, &["resume", &handle]);
    // The child starts and blocks on its stdin; then the seed's host goes away.
    wait_for_child_reading_stdin(&tb, 1);
    tb.host(0).kill_daemon().unwrap();
    input.write_all(b"verify\n").unwrap();
    let out = wait_output(resume, Duration::from_secs(30));
    drop(input);
    let err = stderr(&out);
    assert!(err.contains("child killed: page source lost"), "{err}");
    // 79: page source lost, not the child's own end (docs/operations.md).
    assert_eq!(out.status.code(), Some(79), "{err}");
    assert!(
        !stdout(&out).contains("ok 11"),
        "the child must not run on with zero-filled memory"
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn packed_bootstrap_pages_rebuild_the_same_memory() {
    // The raw stream (the default) is what every other test goes through.
    let tb = testbed_with(2, &["--bootstrap-codec", "lz4"]);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "packed");
    for _ in 0..2 {
        let out = cli(&tb, 1, &["resume", &handle], "verify\n");
        assert_eq!(
            stdout(&out),
            format!("ok 11 {MEMCHECK_DIGEST}\n"),
            "stderr: {}",
            stderr(&out)
        );
        assert_eq!(cli(&tb, 1, &["evict", &handle], "").status.code(), Some(0));
    }
    drop(seed);
    teardown(tb);
}

#[test]
fn a_bootstrap_cut_short_fails_the_child_cleanly() {
    let tb = testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "cut");
    let daemon = tb.host(1).daemon_pid().expect("host 1's daemon");
    let stubs = || {
        let mut s: Vec<i32> = stub_processes()
            .into_iter()
            .filter(|&p| is_child_of(p, daemon))
            .collect();
        s.sort();
        s
    };
    // Host 1 starts its stub pool (2 stubs) when it starts; wait until it is full.
    assert!(eventually(Duration::from_secs(10), || stubs().len() == 2));
    let idle_stubs = stubs().len();

    // Host 1 reaches the seed through a proxy on host 0 that ends the connection a few pages
    // into the bootstrap's page stream, as a seed host that dies mid-transfer would.
    let (proxy, proxying) = cutting_proxy(&tb, 3 * 4096 + 100, false);
    let real = tb.host(0).listen_addr().to_string();
    let cut = handle.replacen(&real, &proxy.to_string(), 1);
    let out = cli(&tb, 1, &["resume", &cut], "verify\n");
    proxying.join().expect("the proxy cut a bootstrap");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(err.contains("came short"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
    assert!(stdout(&out).is_empty());
    assert!(replica_pids(&tb, 1).is_empty(), "no replica may be left");
    // The stub that was to become the replica is gone; the pool is full again.
    assert!(
        eventually(Duration::from_secs(5), || stubs().len() == idle_stubs),
        "stubs of host 1: {:?}, expected {idle_stubs}",
        stubs()
    );

    // The host's pooled connections are fine: the real handle works.
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "stderr: {}",
        stderr(&out)
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn a_bootstrap_that_stalls_fails_the_child_in_bounded_time() {
    let tb = testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "stall");

    // The seed's host stays connected but stops sending a few pages into the page stream, as
    // a host that hangs would: the child fails after the request timeout (5 s), never waits on.
    let (proxy, proxying) = cutting_proxy(&tb, 3 * 4096 + 100, true);
    let real = tb.host(0).listen_addr().to_string();
    let stalled = handle.replacen(&real, &proxy.to_string(), 1);
    let started = std::time::Instant::now();
    let out = cli(&tb, 1, &["resume", &stalled], "verify\n");
    let took = started.elapsed();
    proxying.join().expect("the proxy stalled a bootstrap");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(err.contains("came short"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
    assert!(took < Duration::from_secs(20), "the child waited {took:?}");
    assert!(replica_pids(&tb, 1).is_empty(), "no replica may be left");

    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "stderr: {}",
        stderr(&out)
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn a_stalled_bootstrap_holds_up_no_other_seeds_resume() {
    let tb = testbed(2);
    let (_dir_x, seed_x, handle_x) = prepared_memcheck(&tb, "hol-x");
    let (_dir_y, seed_y, handle_y) = prepared_memcheck(&tb, "hol-y");
    // Seed Y's host hangs mid-bootstrap towards host 1 (through a proxy): host 1 builds Y's
    // replica and waits for its pages, up to the request timeout.
    let (tx, stalled) = std::sync::mpsc::channel();
    let (proxy, proxying) = stalling_proxy(&tb, 3 * 4096 + 100, true, Some(tx));
    let real = tb.host(0).listen_addr().to_string();
    let y = handle_y.replacen(&real, &proxy.to_string(), 1);
    let waiting_y = std::thread::scope(|s| {
        let waiting_y = s.spawn(|| cli(&tb, 1, &["resume", &y], "verify\n"));
        stalled
            .recv_timeout(Duration::from_secs(20))
            .expect("the proxy stalls Y's bootstrap");
        // Meanwhile a child of seed X starts on host 1, replica and all, while Y still waits.
        let out = cli(&tb, 1, &["resume", &handle_x], "verify\n");
        assert_eq!(
            stdout(&out),
            format!("ok 11 {MEMCHECK_DIGEST}\n"),
            "stderr: {}",
            stderr(&out)
        );
        assert!(
            !waiting_y.is_finished(),
            "X's child started only once Y's stalled bootstrap gave up: head-of-line blocking"
        );
        waiting_y.join().expect("Y's resume")
    });
    proxying.join().expect("the proxy stalled a bootstrap");
    assert_eq!(waiting_y.status.code(), Some(70), "{}", stderr(&waiting_y));
    drop((seed_x, seed_y));
    teardown(tb);
}

/// A TCP proxy on host 0, in front of its daemon, for one connection at a time: the hello,
/// requests and answers pass whole, except a bootstrap's, of which only the first frame and then `keep`
/// bytes pass. Then both connections are closed and the proxy stops (its thread ends, so
/// nothing holds host 0's namespace at teardown); with `stall`, the proxy first holds them
/// open, sending nothing more, until the client closes its end.
fn cutting_proxy(
    tb: &mitosis_testbed::Testbed,
    keep: usize,
    stall: bool,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    stalling_proxy(tb, keep, stall, None)
}

/// [`cutting_proxy`], telling `stalled` once it holds the bootstrap back.
fn stalling_proxy(
    tb: &mitosis_testbed::Testbed,
    keep: usize,
    stall: bool,
    stalled: Option<std::sync::mpsc::Sender<()>>,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    const BOOTSTRAP_TAG: u8 = 3;
    let netns = std::fs::File::open(tb.host(0).netns_path()).expect("host 0's netns");
    let upstream = tb.host(0).listen_addr();
    let (tx, rx) = std::sync::mpsc::channel();
    let proxying = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an fd we hold open for the call.
        let joined = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "joining host 0's netns");
        drop(netns);
        let listener = TcpListener::bind((upstream.ip(), 0)).expect("proxy binds");
        tx.send(listener.local_addr().unwrap()).unwrap();
        let limit = Some(Duration::from_secs(20));
        let frame = |from: &mut TcpStream| -> Option<Vec<u8>> {
            let mut len = [0u8; 4];
            from.read_exact(&mut len).ok()?;
            let mut body = vec![0; u32::from_le_bytes(len) as usize];
            from.read_exact(&mut body).ok()?;
            Some([&len[..], &body].concat())
        };
        for client in listener.incoming() {
            let mut client = client.expect("proxy accepts");
            let mut server = TcpStream::connect(upstream).expect("proxy connects");
            for s in [&client, &server] {
                s.set_read_timeout(limit).unwrap();
            }
            // The server's hello (its nonce) goes first.
            let hello = frame(&mut server).expect("a hello");
            client.write_all(&hello).expect("proxy passes the hello");
            while let Some(request) = frame(&mut client) {
                server.write_all(&request).expect("proxy forwards");
                let answer = frame(&mut server).expect("an answer");
                client.write_all(&answer).expect("proxy answers");
                if answer.get(4) == Some(&BOOTSTRAP_TAG) {
                    let mut part = vec![0; keep];
                    server.read_exact(&mut part).expect("pages");
                    client.write_all(&part).expect("proxy passes pages");
                    if let Some(stalled) = &stalled {
                        let _ = stalled.send(());
                    }
                    // Until the client gives up (end of file), or the read limit passes.
                    while stall && matches!(client.read(&mut [0; 4096]), Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    });
    (rx.recv().expect("proxy address"), proxying)
}

#[test]
fn a_daemon_crash_leaves_no_zombie_twin_behind() {
    let tb = testbed(1);
    let (_dir, mut seed, _handle) = prepared_memcheck(&tb, "crash");
    let twin: i32 = seed.children().trim().parse().expect("one twin");
    // SIGKILL: the daemon cannot clean up; the kernel kills the twin with its tracer and the
    // twin stays a zombie of the seed, which never waits for it.
    tb.host(0).kill_daemon().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            common::procfs::task_state(twin, twin) == Some('Z')
        }),
        "the twin did not die with its daemon"
    );
    // The next daemon reaps it from the ledger its predecessor kept.
    tb.host(0).start_daemon().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || seed.children().trim().is_empty()),
        "the seed still has a zombie child {twin}: {}",
        tb.host(0).daemon_log()
    );
    // Logged once the reaping job returns, just after the zombie is gone.
    assert!(eventually(Duration::from_secs(5), || {
        tb.host(0)
            .daemon_log()
            .contains("reaped the twins a previous daemon left")
    }));
    // The seed was stopped for it and runs on intact.
    assert_eq!(seed.send("verify"), format!("ok 11 {MEMCHECK_DIGEST}"));
    drop(seed);
    teardown(tb);
}
