//! End to end: a child on another host forks, and its own children (and theirs) read seed
//! memory it never touched: each fault goes through the fault path of the process that made
//! it (as root).

mod common;

use std::time::Duration;

use common::resumed::Resumed;
use common::*;

const FORKER_BIN: &str = env!("FORKER_BIN");
/// The forker's region, in MiB and in pages.
const REGION_MIB: u64 = 32;
const REGION_PAGES: u64 = REGION_MIB * 256;

/// The forker fixture started and prepared on host 0: the seed, its own `sum` answer and the
/// handle.
fn prepared_forker(tb: &mitosis_testbed::Testbed) -> (Seed, String, String) {
    let mut cmd = tb.host(0).command(FORKER_BIN);
    cmd.arg(REGION_MIB.to_string());
    let mut seed = Seed::start(cmd);
    let sum = seed.send("sum");
    assert!(sum.ends_with(&format!(" pages {REGION_PAGES}")), "{sum}");
    let handle = prepare(tb, 0, seed.pid());
    (seed, sum, handle)
}

#[test]
fn a_childs_own_children_read_the_seeds_memory_as_the_seed_does() {
    let tb = testbed(2);
    let (seed, sum, handle) = prepared_forker(&tb);
    // A first child builds host 1's replica; its fork reads nothing of the region.
    let out = cli(&tb, 1, &["resume", &handle], "spawn 1\nexit 0\n");
    assert_eq!(stdout(&out), "forked exit 0\n", "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(200));
    let fds_before = daemon_fds(&tb, 1);

    // A grandchild reads the whole region, which neither the child nor the replica has: every
    // page is a fault of the grandchild's own, fetched from host 0. Then a chain three deep,
    // whose last process faults through the handler its parent's fork made.
    let out = cli(
        &tb,
        1,
        &["resume", "--stats", &handle],
        "fork 1\nfork 3\nexit 0\n",
    );
    assert_eq!(
        stdout(&out),
        format!("{sum} depth 1\nforked exit 0\n{sum} depth 3\nforked exit 0\n"),
        "stderr: {}\n{}",
        stderr(&out),
        tb.host(1).daemon_log()
    );
    assert_eq!(out.status.code(), Some(0));
    // The faults of a child's children count as its own.
    assert!(
        resume_stat(&out, "pages_fetched") >= 2 * REGION_PAGES,
        "{}",
        stderr(&out)
    );
    // Each forked process was found, so that it could be killed if its source failed.
    let log = tb.host(1).daemon_log();
    assert!(!log.contains("was not found"), "{log}");
    // Their handlers end with them: the daemon holds none of their userfaultfds.
    assert!(
        eventually(Duration::from_secs(5), || daemon_fds(&tb, 1) == fds_before),
        "host 1's daemon holds {} descriptors, {fds_before} before the forks",
        daemon_fds(&tb, 1)
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn a_grandchild_whose_page_source_dies_is_killed_not_left_waiting() {
    let tb = testbed(2);
    let (seed, _sum, handle) = prepared_forker(&tb);
    let mut child = Resumed::start(&tb, 1, &["resume", &handle]);
    // Once through the fork path, so that the child itself needs no page it lacks again.
    child.expect("spawn 1", "forked exit 0");
    tb.host(0).kill_daemon().unwrap();
    // The grandchild's first page of the region cannot be fetched: it is killed, never handed
    // zeros or left waiting, and its parent sees it die.
    child.expect("fork 1", "forked signal 9");
    assert!(
        tb.host(1)
            .daemon_log()
            .lines()
            .any(|l| l.contains("killing a forked child") && l.contains("page source lost")),
        "{}",
        child.log_tail()
    );
    child.send("exit 0");
    child.finish_ok();
    drop(seed);
    teardown(tb);
}
