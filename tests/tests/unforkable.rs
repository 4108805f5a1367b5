//! Seeds mitosis cannot fork are refused with the reason, and run on as they were: a thread
//! stuck in uninterruptible sleep, and memory that belongs to a kernel object.

mod common;

use std::time::Duration;

use common::procfs::{task_ids, task_state};
use common::*;

/// A Python seed that can put itself in states mitosis must refuse:
///   "vfork" -> a thread clones a child that shares its memory and pauses (CLONE_VM |
///              CLONE_VFORK), so the thread waits in the kernel, uninterruptibly, until the
///              child exits.
///   "perf"  -> maps a perf event's ring buffer (anon_inode:[perf_event]); "unmap" undoes it.
///   other   -> "pong <pid>".
const SEED: &str = r#"
import ctypes, mmap, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
stack = mmap.mmap(-1, 1 << 16)
top = ctypes.addressof(ctypes.c_char.from_buffer(stack)) + (1 << 16)
ring = None
def vfork_and_wait():
    pause = ctypes.cast(libc.pause, ctypes.c_void_p).value
    child = libc.clone(ctypes.c_void_p(pause), ctypes.c_void_p(top), 0x100 | 0x4000 | 17, None)
    os.waitpid(child, 0)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "vfork":
        threading.Thread(target=vfork_and_wait, daemon=True).start()
        print("vforking", flush=True)
    elif cmd == "perf":
        attr = (ctypes.c_uint32 * 32)()
        attr[0], attr[1], attr[2] = 1, 128, 9  # software event, attr size, dummy counter
        fd = libc.syscall(298, attr, 0, -1, -1, 8)
        if fd < 0:
            print("perf failed", ctypes.get_errno(), flush=True)
            continue
        ring = mmap.mmap(fd, 2 * mmap.PAGESIZE)
        os.close(fd)
        print("mapped", flush=True)
    elif cmd == "unmap":
        ring.close()
        print("unmapped", flush=True)
    else:
        print("pong", os.getpid(), flush=True)
"#;

/// `prepare --pid` of the seed fails with one line naming `reason`, and prints no handle.
fn assert_refused(tb: &mitosis_testbed::Testbed, pid: i32, reason: &str) {
    let out = cli(tb, 0, &["prepare", "--pid", &pid.to_string()], "");
    let err = stderr(&out);
    // 78: refused at prepare (docs/operations.md's exit codes).
    assert_eq!(
        out.status.code(),
        Some(78),
        "{reason}: {err} {}",
        stdout(&out)
    );
    assert!(
        err.contains(reason),
        "the error must say {reason:?}: {err:?}"
    );
    assert!(err.contains("cannot"), "{err:?}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err:?}");
    assert!(stdout(&out).is_empty(), "no handle");
}

/// Tasks of `pid` in state D.
fn uninterruptible(pid: i32) -> Vec<i32> {
    task_ids(pid)
        .into_iter()
        .filter(|&tid| task_state(pid, tid) == Some('D'))
        .collect()
}

#[test]
fn seeds_that_cannot_be_forked_are_refused_and_run_on() {
    let tb = testbed(2);
    let mut cmd = tb.host(0).command("python3");
    cmd.args(["-c", SEED]);
    let mut seed = Seed::start(cmd);
    let pid = seed.pid();
    let pong = format!("pong {pid}");

    // A thread waiting for its vfork child.
    assert_eq!(seed.send("vfork"), "vforking");
    assert!(
        eventually(Duration::from_secs(5), || uninterruptible(pid).len() == 1),
        "a thread of the seed should be in uninterruptible sleep"
    );
    let stuck = uninterruptible(pid)[0];
    assert_refused(&tb, pid, "uninterruptible sleep");
    assert_eq!(
        seed.send("ping"),
        pong,
        "the seed answers after the refusal"
    );
    assert_eq!(uninterruptible(pid), [stuck], "the thread still waits");
    // A twin would be the main thread's child (the vfork child is the other thread's).
    assert!(seed.children().trim().is_empty(), "no twin left");
    // Its child gone (and reaped), the thread returns and ends.
    let vforked: i32 = std::fs::read_to_string(format!("/proc/{pid}/task/{stuck}/children"))
        .expect("children")
        .trim()
        .parse()
        .expect("the vfork child");
    // SAFETY: kill(2) with a pid we just read and a valid signal.
    assert_eq!(unsafe { libc::kill(vforked, libc::SIGKILL) }, 0);
    assert!(eventually(Duration::from_secs(5), || {
        uninterruptible(pid).is_empty() && seed.children().trim().is_empty()
    }));

    // A perf event's ring buffer mapped.
    assert_eq!(seed.send("perf"), "mapped");
    assert_refused(&tb, pid, "anon_inode:[perf_event]");
    assert_eq!(seed.send("ping"), pong);
    assert!(seed.children().trim().is_empty(), "no twin left");

    // Without either, the same seed forks, and the child runs.
    assert_eq!(seed.send("unmap"), "unmapped");
    let handle = prepare(&tb, 0, pid);
    let out = cli(&tb, 1, &["resume", &handle], "ping\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let answer = stdout(&out);
    assert!(
        answer.starts_with("pong ") && answer.trim() != pong,
        "the child answers as itself: {answer:?}"
    );
    drop(seed);
    teardown(tb);
}
