//! End to end with real runtimes, multi-threaded: the pthreads fixture (threads, TLS, signal
//! state, pipes, eventfd, epoll, rlimits), numpy with OpenBLAS threads, Node.js and the JVM,
//! plus an HTTP function that serves on the socket `mitosis resume --listen` hands it. Seeds
//! run on host 0, children on host 1 (as root).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::procfs::*;
use common::resumed::{LINE_TIMEOUT, Resumed};
use common::*;
use mitosis_testbed::Testbed;
use serde_json::Value;

const THREADS_BIN: &str = env!("THREADS_BIN");

// ---- the C fixture -------------------------------------------------------------------------

const WORKERS: [&str; 3] = ["w-cond", "w-sleep", "w-pipe"];

/// A `state` answer of the threads fixture as key -> value.
fn parse_state(line: &str) -> BTreeMap<String, String> {
    let rest = line
        .strip_prefix("state ")
        .unwrap_or_else(|| panic!("not a state line: {line:?}"));
    rest.split_whitespace()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("{kv:?} in {line:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A state without what differs between processes (pid, thread ids), and without the thread
/// names (checked on their own, see [`assert_thread_names`]).
fn without_ids(state: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    state
        .iter()
        .filter(|(k, _)| *k != "pid" && !k.ends_with(".tid") && !k.ends_with(".comm"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn tid_of(state: &BTreeMap<String, String>, thread: &str) -> i32 {
    state[&format!("{thread}.tid")].parse().expect("tid")
}

/// The fixture's state as fixture/threads.c sets it up (what a `state` must say in the seed
/// and in every child).
fn assert_fixture_state(state: &BTreeMap<String, String>, who: &str) {
    let expect = |key: &str, value: &str| {
        assert_eq!(
            state.get(key).map(String::as_str),
            Some(value),
            "{who}: {key} in {state:?}"
        );
    };
    expect("threads", "4");
    expect("umask", "0027");
    expect("nofile", "777");
    expect("epoll", "eventfd+pipe");
    expect("eventfd", "5");
    expect("pipe", "hello");
    expect("stream", "ping+echo");
    expect("dgram", "a,bb");
    expect("timer", "7s+armed");
    expect("expired", "1");
    expect("sigfd", "xcpu");
    expect("devnull", "ok");
    expect("sigpipe", "ign");
    expect("usr1", "handler+restart+onstack+usr2");
    expect("usr2main", "blocked");
    let threads = [
        ("main", "main/100/42", "12", "none", "nearest"),
        ("w-cond", "w-cond/101/43", "10+36", "none", "down"),
        ("w-sleep", "w-sleep/102/44", "-", "own", "up"),
        ("w-pipe", "w-pipe/103/45", "10+28", "none", "zero"),
    ];
    for (name, tls, mask, alt, fe) in threads {
        expect(&format!("{name}.tls"), tls);
        expect(&format!("{name}.mask"), mask);
        expect(&format!("{name}.alt"), alt);
        expect(&format!("{name}.fe"), fe);
        expect(&format!("{name}.stack"), "ok");
        // glibc registers rseq and a robust list for every thread: both must stay registered.
        expect(&format!("{name}.rseq"), "ok");
        assert!(
            state[&format!("{name}.robust")].starts_with('+'),
            "{who}: {name} has no robust list: {state:?}"
        );
    }
    let tids: BTreeSet<i32> = ["main"]
        .iter()
        .chain(WORKERS.iter())
        .map(|t| tid_of(state, t))
        .collect();
    assert_eq!(tids.len(), 4, "{who}: thread ids not distinct: {state:?}");
    assert_eq!(
        tid_of(state, "main").to_string(),
        state["pid"],
        "{who}: main's tid"
    );
}

/// Each thread's name (its comm, as the thread itself reads it) is the seed thread's.
fn assert_thread_names(child: &BTreeMap<String, String>, seed: &BTreeMap<String, String>) {
    let names = |state: &BTreeMap<String, String>| -> Vec<(String, String)> {
        state
            .iter()
            .filter(|(k, _)| k.ends_with(".comm"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(names(child), names(seed), "thread names (comm)");
    assert_eq!(seed["w-cond.comm"], "w-cond");
}

/// Each thread's blocked mask as the kernel has it, by the thread's name in `state`.
fn masks_by_name(pid: i32, state: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    ["main"]
        .iter()
        .chain(WORKERS.iter())
        .map(|t| {
            let tid = tid_of(state, t);
            let mask = status_of(&format!("/proc/{pid}/task/{tid}/status"), "SigBlk");
            (t.to_string(), mask)
        })
        .collect()
}

fn threads_seed(tb: &Testbed) -> Seed {
    Seed::start(tb.host(0).command(THREADS_BIN))
}

#[test]
fn c_fixture_child_keeps_every_thread_and_its_kernel_state() {
    let tb = testbed(2);
    let mut seed = threads_seed(&tb);
    let seed_state = parse_state(&seed.send("state"));
    assert_fixture_state(&seed_state, "seed");
    assert_eq!(task_ids(seed.pid()).len(), 4);
    let seed_process = process_state(seed.pid());
    let seed_masks = masks_by_name(seed.pid(), &seed_state);
    // What the fixture opens: two pipes, the eventfd, the epoll set, /dev/null, two
    // socketpairs, the timerfd, the signalfd and the expired timerfd.
    let seed_fds: Vec<String> = (3..=16).map(|fd| describe_fd(seed.pid(), fd)).collect();
    let handle = prepare(&tb, 0, seed.pid());

    let mut child = Resumed::start(&tb, 1, &["resume", &handle]);
    let state = parse_state(&child.ask("state"));
    assert_fixture_state(&state, "child");
    assert_eq!(
        without_ids(&state),
        without_ids(&seed_state),
        "the child's state differs from the seed's"
    );
    let pid: i32 = state["pid"].parse().unwrap();
    child.child_pid = Some(pid);
    assert_ne!(pid, seed.pid(), "the child is its own process");
    // Every thread answered from a live thread of the child (its own kernel thread).
    let reported: BTreeSet<i32> = ["main"]
        .iter()
        .chain(WORKERS.iter())
        .map(|t| tid_of(&state, t))
        .collect();
    assert_eq!(reported, task_ids(pid), "threads that answered vs /proc");
    assert!(
        reported.is_disjoint(&task_ids(seed.pid())),
        "child threads must not be the seed's"
    );
    // Kernel state, read while the child waits for input (checked at the end).
    let child_process = process_state(pid);
    let child_masks = masks_by_name(pid, &state);
    let child_fds: Vec<String> = (3..=16).map(|fd| describe_fd(pid, fd)).collect();
    let foreign = foreign_fds(pid, seed.pid());

    // All four threads fault in pages of memory the child never read, at the same time.
    child.expect("touch", "touched 16777216 by 4 threads ok");

    // SIGUSR1 to the command reaches the child; a thread that leaves it unblocked runs the
    // handler (the kernel prefers the main thread).
    child.signal(libc::SIGUSR1);
    let line = child.line("the SIGUSR1 handler's line");
    let on_main = format!("usr1 on main tid {pid} altstack no");
    let on_sleeper = format!(
        "usr1 on w-sleep tid {} altstack yes",
        tid_of(&state, "w-sleep")
    );
    assert!(
        line == on_main || line == on_sleeper,
        "handler line {line:?}"
    );
    // The interrupted read restarted (SA_RESTART) and the state is unchanged.
    assert_eq!(parse_state(&child.ask("state")), state);

    child.finish_ok();

    // The seed runs on, untouched.
    let after = parse_state(&seed.send("state"));
    assert_eq!(after, seed_state);

    assert_eq!(
        child_process, seed_process,
        "signal dispositions, umask or rlimits differ"
    );
    assert_eq!(child_masks, seed_masks, "per-thread signal masks");
    assert_eq!(
        child_fds, seed_fds,
        "descriptors 3..=16 (kind, flags, contents)"
    );
    assert!(
        foreign.is_empty(),
        "descriptors of the child's own: {foreign:?}"
    );
    assert_thread_names(&state, &seed_state);
    drop(seed);
    teardown(tb);
}

#[test]
fn c_fixture_child_threads_take_directed_signals_and_can_be_joined() {
    let tb = testbed(2);
    let mut seed = threads_seed(&tb);
    let handle = prepare(&tb, 0, seed.pid());

    // Children on the other host and on the seed's own host, alive at the same time.
    let mut children = [
        Resumed::start(&tb, 1, &["resume", &handle]),
        Resumed::start(&tb, 0, &["resume", &handle]),
    ];
    for child in &mut children {
        let state = parse_state(&child.ask("state"));
        assert_fixture_state(&state, "child");
        let pid: i32 = state["pid"].parse().unwrap();
        child.child_pid = Some(pid);
        // pthread_kill goes through the thread id glibc keeps for the thread: the signal
        // must reach that very thread of the child, on its alternate stack.
        let sleeper = tid_of(&state, "w-sleep");
        child.expect(
            "kill",
            &format!("usr1 on w-sleep tid {sleeper} altstack yes"),
        );
        // Joining needs each thread's clear-child-tid; the robust mutex w-pipe dies holding
        // needs its robust list (and glibc's idea of its tid).
        child.expect("join", "joined 3 threads=1 robust=EOWNERDEAD");
        assert_eq!(task_ids(pid).len(), 1, "threads left after join");
        // Pages are still served once threads have exited (this memory was never read).
        child.expect("touch", "touched 16777216 by 1 threads ok");
        // New threads in the child: created, faulting, exiting (some stacks unmapped), joined.
        child.expect("spawn 12", "spawned 12 ok");
        let state = parse_state(&child.ask("state"));
        assert_eq!(state["threads"], "1");
        assert_eq!(state["main.tls"], "main/100/42");
        assert_eq!(state["pipe"], "hello");
    }
    for child in children {
        child.finish_ok();
    }

    // The seed answers the same (with its own threads, which are all still there).
    let state = parse_state(&seed.send("state"));
    assert_fixture_state(&state, "seed");
    assert_eq!(
        seed.send("kill"),
        format!(
            "usr1 on w-sleep tid {} altstack yes",
            tid_of(&state, "w-sleep")
        )
    );
    assert_eq!(seed.send("join"), "joined 3 threads=1 robust=EOWNERDEAD");
    drop(seed);
    teardown(tb);
}

/// Holds thread `tid` ptrace-seized (it keeps running) from a thread of the test; dropping it
/// ends that thread, which detaches the tracee (ptrace belongs to the tracing thread).
struct Tracer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tracer {
    fn seize(tid: i32) -> Tracer {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: PTRACE_SEIZE takes a tid and no pointers (addr and data are 0).
            let rc = unsafe {
                libc::ptrace(
                    libc::PTRACE_SEIZE,
                    tid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            let err = std::io::Error::last_os_error();
            let _ = ready_tx.send((rc == 0).then_some(()).ok_or(err));
            // Until the test drops the sender.
            let _ = stop_rx.recv();
        });
        ready_rx
            .recv()
            .expect("tracer thread")
            .unwrap_or_else(|e| panic!("PTRACE_SEIZE {tid}: {e}"));
        Tracer {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn prepare_of_a_traced_seed_is_refused_and_the_seed_runs_on() {
    let tb = testbed(2);
    let mut seed = threads_seed(&tb);
    let seed_state = parse_state(&seed.send("state"));
    let seed_pid = seed.pid().to_string();
    let expect_refused = |what: &str| {
        let out = cli(&tb, 0, &["prepare", "--pid", &seed_pid], "");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{what}: {err}");
        assert!(
            err.contains("already traced"),
            "{what}: the error must name the reason: {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "{what}: one-line error: {err:?}");
        assert!(stdout(&out).is_empty(), "{what}: no handle");
    };

    // Traced as a whole (its main thread, whose tracer /proc/PID/status shows).
    let tracer = Tracer::seize(seed.pid());
    expect_refused("main thread traced");
    assert!(alive(seed.pid()), "the seed must survive a refused prepare");
    drop(tracer);
    assert_eq!(parse_state(&seed.send("state")), seed_state);

    // Only one of its other threads traced (as a debugger attached to one thread would).
    let tracer = Tracer::seize(tid_of(&seed_state, "w-pipe"));
    expect_refused("one worker traced");
    drop(tracer);
    assert_eq!(parse_state(&seed.send("state")), seed_state);
    assert_eq!(
        seed.children().trim(),
        "",
        "a refused prepare leaves no twin"
    );

    // Once the tracer is gone, the same seed can be prepared and forked.
    let handle = prepare(&tb, 0, seed.pid());
    let out = cli(&tb, 1, &["resume", &handle], "state\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let state = parse_state(stdout(&out).trim_end());
    assert_eq!(without_ids(&state), without_ids(&seed_state));
    drop(seed);
    teardown(tb);
}

// ---- JSON-line runtimes: numpy with BLAS threads, Node.js, Perl, Go, the JVM -----------------

/// A JSON answer without the fields that differ between processes.
fn comparable(answer: &str) -> Value {
    let mut v: Value =
        serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: not JSON: {answer:?}"));
    let obj = v.as_object_mut().expect("an object");
    obj.remove("pid");
    obj.remove("threads");
    assert!(!obj.contains_key("error"), "error answer: {answer}");
    v
}

fn field(answer: &str, key: &str) -> i64 {
    let v: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no {key} in {answer}"))
}

/// Runs `cmd` (a cold `--once` run of the same function) with `request` on stdin; its last
/// line, comparable.
fn cold_answer(mut cmd: Command, request: &str) -> Value {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{request}\n").as_bytes())
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    comparable(stdout(&out).lines().last().expect("an answer"))
}

/// The seed from `seed` on host 0, prepared; a child on host 1 answers `requests` like a cold
/// run (`cold`) would, with as many threads as the seed had, the seed's signal dispositions,
/// masks, umask and rlimits; a SIGUSR1 to `mitosis resume` runs the child's handler.
fn children_behave_like_the_runtime(
    tb: &Testbed,
    seed: Command,
    cold: impl Fn(&str) -> Value,
    requests: &[i64],
) {
    let request = |n: i64| format!("{{\"n\": {n}}}");
    let expected: BTreeMap<i64, Value> = requests.iter().map(|&n| (n, cold(&request(n)))).collect();
    let mut seed = Seed::start(seed);
    let seed_threads = task_ids(seed.pid()).len();
    assert!(
        seed_threads > 1,
        "the seed is meant to be multi-threaded: {seed_threads} thread(s)"
    );
    let seed_process = process_state(seed.pid());
    let seed_masks = thread_masks(seed.pid());
    let handle = prepare(tb, 0, seed.pid());

    let mut child = Resumed::start(tb, 1, &["resume", &handle]);
    let first = child.ask(&request(requests[0]));
    let pid = field(&first, "pid") as i32;
    child.child_pid = Some(pid);
    assert_ne!(pid, seed.pid(), "the child is its own process: {first}");
    assert!(alive(pid), "the child runs while it waits for input");
    assert_eq!(
        field(&first, "threads") as usize,
        seed_threads,
        "the child's threads (its own count): {first}"
    );
    assert_eq!(task_ids(pid).len(), seed_threads, "the child's threads");
    assert_eq!(comparable(&first), expected[&requests[0]]);
    // Kernel state, read while the child waits for input (checked at the end).
    let child_process = process_state(pid);
    let child_masks = thread_masks(pid);
    let foreign = foreign_fds(pid, seed.pid());

    wait_until_idle(pid, LINE_TIMEOUT);
    child.signal(libc::SIGUSR1);
    assert_eq!(child.line("the SIGUSR1 handler's line"), "usr1");

    for &n in &requests[1..] {
        let answer = child.ask(&request(n));
        assert_eq!(field(&answer, "pid") as i32, pid);
        assert_eq!(comparable(&answer), expected[&n], "n={n}");
    }
    child.finish_ok();

    // The seed runs on and answers the same.
    let answer = seed.send(&request(requests[0]));
    assert_eq!(field(&answer, "pid") as i32, seed.pid());
    assert_eq!(comparable(&answer), expected[&requests[0]]);

    assert_eq!(
        child_process, seed_process,
        "signal dispositions, umask or rlimits differ"
    );
    assert_eq!(child_masks, seed_masks, "per-thread signal masks");
    assert!(
        foreign.is_empty(),
        "descriptors of the child's own: {foreign:?}"
    );
}

/// [`children_behave_like_the_runtime`] for an example script run by `interpreter` that has a
/// `--once` mode.
fn script_children_behave_like_the_function(
    interpreter: &str,
    example_path: &str,
    requests: &[i64],
) {
    let script = example(example_path);
    let tb = testbed(2);
    let mut seed = tb.host(0).command(interpreter);
    seed.arg(&script);
    children_behave_like_the_runtime(
        &tb,
        seed,
        |request| {
            let mut cmd = Command::new(interpreter);
            cmd.arg(&script).arg("--once");
            cold_answer(cmd, request)
        },
        requests,
    );
    teardown(tb);
}

#[test]
fn numpy_with_blas_threads_child_answers_like_the_function() {
    script_children_behave_like_the_function("python3", "python/threaded_fn.py", &[3, 0, 17, 250]);
}

/// asyncio's loop wakes through a socketpair inside the process (its self-pipe): a child whose
/// socketpair were closed would never see its executor's results or its signals.
#[test]
fn asyncio_child_wakes_its_loop_through_the_carried_socketpair() {
    script_children_behave_like_the_function("python3", "python/asyncio_fn.py", &[4, 0, -7, 1234]);
}

#[test]
fn node_child_answers_like_the_function() {
    script_children_behave_like_the_function("node", "node/fn.js", &[5, -3, 0, 4242]);
}

/// Perl's ithreads: the answer needs the worker thread (an interpreter of its own, fed through
/// queues) alive in the child, and Perl's deferred signals run the SIGUSR1 handler between ops.
#[test]
fn perl_child_answers_like_the_function() {
    script_children_behave_like_the_function("perl", "perl/fn.pl", &[5, -3, 0, 77777]);
}

/// Go's runtime is its own, not libc's: threads from raw clone calls, its own signal
/// forwarding (os/signal), timers and netpoller, a garbage collector that stops every
/// goroutine, and goroutines scheduled over the recreated threads.
#[test]
fn go_child_answers_like_the_function() {
    let (_dir, bin) = build_go_example();
    let tb = testbed(2);
    children_behave_like_the_runtime(
        &tb,
        tb.host(0).command(&bin),
        |request| {
            let mut cmd = Command::new(&bin);
            cmd.arg("--once");
            cold_answer(cmd, request)
        },
        &[5, -3, 0, 77777],
    );
    teardown(tb);
}

#[test]
fn jvm_child_answers_like_the_function() {
    let classes = compile_java();
    let tb = testbed(2);
    children_behave_like_the_runtime(
        &tb,
        java(&classes.0, Some((&tb, 0))),
        |request| {
            let mut cmd = java(&classes.0, None);
            cmd.arg("--once");
            cold_answer(cmd, request)
        },
        &[5, -3, 999, 1234567],
    );
    teardown(tb);
}

// ---- an HTTP function on the socket the resumer listens on -------------------------------------

/// GETs `urls` in order with `python3` (a command for it, e.g. in a host's network namespace),
/// retrying while nothing listens yet; one body per line.
fn http_get(mut python3: Command, urls: &[String]) -> Output {
    const CLIENT: &str = r#"
import sys, time, urllib.request
for url in sys.argv[1:]:
    deadline = time.monotonic() + 20
    while True:
        try:
            body = urllib.request.urlopen(url, timeout=20).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sys.stdout.write(body.decode())
    sys.stdout.flush()
"#;
    python3
        .arg("-c")
        .arg(CLIENT)
        .args(urls)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_output(python3.spawn().expect("python3"), Duration::from_secs(90))
}

/// What http_fn.py answers to GET `path`, computed by a cold run (`--answer`), comparable.
fn cold_http_answer(path: &str) -> Value {
    let mut cold = Command::new("python3");
    cold.arg(example("python/http_fn.py"))
        .arg("--answer")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(cold.spawn().expect("python3"), Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    comparable(stdout(&out).trim_end())
}

/// True if a TCP connection to `addr` from `host` is refused.
fn refused(tb: &Testbed, host: usize, addr: &str) -> bool {
    let (ip, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = tb.host(host).command("python3");
    cmd.args([
        "-c",
        "import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\nexcept ConnectionRefusedError:\n    sys.exit(0)\nsys.exit(1)",
        ip,
        port,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let out = wait_output(cmd.spawn().expect("python3"), Duration::from_secs(30));
    out.status.success()
}

#[test]
fn http_child_serves_on_the_socket_resume_listens_on() {
    let script = example("python/http_fn.py");
    let tb = testbed(2);
    let mut seed_cmd = tb.host(0).command("python3");
    seed_cmd.arg(&script);
    let seed = Seed::start(seed_cmd);
    let handle = prepare(&tb, 0, seed.pid());

    let addr = format!("{}:18080", tb.host(1).addr());
    let mut child = Resumed::start(&tb, 1, &["resume", "--listen", &addr, &handle]);
    child.send("serve 3");
    let paths = ["/", "/orders/42?x=1", "/"];
    let urls: Vec<String> = paths.iter().map(|p| format!("http://{addr}{p}")).collect();
    let got = http_get(tb.host(1).command("python3"), &urls);
    assert!(
        got.status.success(),
        "GETs failed: {}\n{}",
        stderr(&got),
        child.note()
    );
    let bodies: Vec<String> = stdout(&got).lines().map(str::to_string).collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    let pid = field(&bodies[0], "pid");
    assert_ne!(pid, seed.pid() as i64, "served by the child, not the seed");
    for (path, body) in paths.iter().zip(&bodies) {
        assert_eq!(field(body, "pid"), pid, "one child serves them all");
        assert_eq!(comparable(body), cold_http_answer(path), "GET {path}");
    }

    // After N requests the child exits 0, and nothing listens on the address any more.
    child.finish_ok();
    assert!(
        refused(&tb, 1, &addr),
        "{addr} still accepts connections after the child exited"
    );
    assert!(alive(seed.pid()), "the seed runs on");
    drop(seed);
    teardown(tb);
}

// ---- the seeds on their own, without mitosis: what the children are held to -------------------

#[test]
fn threads_fixture_answers_its_protocol() {
    let mut seed = Seed::start(Command::new(THREADS_BIN));
    let pid = seed.pid();
    let state = parse_state(&seed.send("state"));
    assert_fixture_state(&state, "fixture");
    assert_eq!(state["pid"], pid.to_string());
    for name in WORKERS {
        assert_eq!(state[&format!("{name}.comm")], name);
    }
    let tids: BTreeSet<i32> = ["main"]
        .iter()
        .chain(WORKERS.iter())
        .map(|t| tid_of(&state, t))
        .collect();
    assert_eq!(
        tids,
        task_ids(pid),
        "the threads that answered are the process's"
    );
    // The masks the threads report are the kernel's (SIGUSR1 10, SIGUSR2 12, SIGWINCH 28,
    // SIGRTMIN+2 36).
    let masks = masks_by_name(pid, &state);
    assert_eq!(masks["main"], "0000000000000800");
    assert_eq!(masks["w-cond"], "0000000800000200");
    assert_eq!(masks["w-sleep"], "0000000000000000");
    assert_eq!(masks["w-pipe"], "0000000008000200");
    let mask = |key| u64::from_str_radix(&status_of(&format!("/proc/{pid}/status"), key), 16);
    assert_ne!(
        mask("SigIgn").unwrap() & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE ignored"
    );
    assert_ne!(
        mask("SigCgt").unwrap() & (1 << (libc::SIGUSR1 - 1)),
        0,
        "SIGUSR1 caught"
    );

    assert_eq!(seed.send("touch"), "touched 16777216 by 4 threads ok");
    assert_eq!(seed.send("spawn 12"), "spawned 12 ok");
    let sleeper = tid_of(&state, "w-sleep");
    assert_eq!(
        seed.send("kill"),
        format!("usr1 on w-sleep tid {sleeper} altstack yes")
    );
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    let mut line = String::new();
    seed.stdout.read_line(&mut line).expect("handler line");
    let line = line.trim_end();
    assert!(
        line == format!("usr1 on main tid {pid} altstack no")
            || line == format!("usr1 on w-sleep tid {sleeper} altstack yes"),
        "{line:?}"
    );
    assert_eq!(
        parse_state(&seed.send("state")),
        state,
        "state is repeatable"
    );

    assert_eq!(seed.send("join"), "joined 3 threads=1 robust=EOWNERDEAD");
    assert_eq!(seed.send("touch"), "touched 16777216 by 1 threads ok");
    assert_eq!(seed.send("spawn 3"), "spawned 3 ok");
    let after = parse_state(&seed.send("state"));
    assert_eq!(after["threads"], "1");
    assert_eq!(after["main.tls"], "main/100/42");
    assert!(!after.contains_key("w-cond.tls"));
    assert_eq!(seed.send("kill"), "kill failed no thread");
    assert_eq!(seed.send("bogus"), "unknown");
    writeln!(seed.stdin, "exit 7").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            seed.child
                .try_wait()
                .is_ok_and(|s| s.and_then(|s| s.code()) == Some(7))
        }),
        "exit 7"
    );
}

/// A seed started directly answers like a cold run, has more than one thread, and prints
/// `usr1` on SIGUSR1.
fn seed_answers_like_cold_runs(seed: Command, cold: impl Fn(&str) -> Value, n: i64) {
    let mut seed = Seed::start(seed);
    let threads = task_ids(seed.pid()).len();
    assert!(threads > 1, "{threads} thread(s)");
    let request = format!("{{\"n\": {n}}}");
    let answer = seed.send(&request);
    assert_eq!(field(&answer, "pid"), seed.pid() as i64, "{answer}");
    assert_eq!(field(&answer, "threads") as usize, threads, "{answer}");
    assert_eq!(comparable(&answer), cold(&request));
    wait_until_idle(seed.pid(), LINE_TIMEOUT);
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(seed.pid(), libc::SIGUSR1) }, 0);
    let mut line = String::new();
    seed.stdout.read_line(&mut line).expect("usr1 line");
    assert_eq!(line, "usr1\n");
    assert_eq!(comparable(&seed.send(&request)), cold(&request));
}

#[test]
fn runtime_seeds_answer_like_cold_runs() {
    let py = example("python/threaded_fn.py");
    let mut seed = Command::new("python3");
    seed.arg(&py);
    seed_answers_like_cold_runs(
        seed,
        |request| {
            let mut cmd = Command::new("python3");
            cmd.arg(&py).arg("--once");
            cold_answer(cmd, request)
        },
        7,
    );

    let js = example("node/fn.js");
    let mut seed = Command::new("node");
    seed.arg(&js);
    seed_answers_like_cold_runs(
        seed,
        |request| {
            let mut cmd = Command::new("node");
            cmd.arg(&js).arg("--once");
            cold_answer(cmd, request)
        },
        7,
    );

    let classes = compile_java();
    seed_answers_like_cold_runs(
        java(&classes.0, None),
        |request| {
            let mut cmd = java(&classes.0, None);
            cmd.arg("--once");
            cold_answer(cmd, request)
        },
        7,
    );
}

#[test]
fn http_seed_serves_on_an_inherited_fd_3() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("python3");
    cmd.arg(example("python/http_fn.py"));
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // already there: only clear close-on-exec
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut seed = Seed::start(cmd);
    drop(listener);
    writeln!(seed.stdin, "serve 2").unwrap();
    let paths = ["/a", "/b/c"];
    let urls: Vec<String> = paths.iter().map(|p| format!("http://{addr}{p}")).collect();
    let got = http_get(Command::new("python3"), &urls);
    assert!(got.status.success(), "{}", stderr(&got));
    let text = stdout(&got);
    let bodies: Vec<&str> = text.lines().collect();
    assert_eq!(bodies.len(), 2);
    for (path, body) in paths.iter().zip(&bodies) {
        assert_eq!(field(body, "pid"), seed.pid() as i64);
        assert_eq!(comparable(body), cold_http_answer(path), "GET {path}");
    }
    assert!(
        eventually(Duration::from_secs(10), || {
            seed.child
                .try_wait()
                .is_ok_and(|s| s.and_then(|s| s.code()) == Some(0))
        }),
        "http_fn.py exits 0 after serving"
    );
}
