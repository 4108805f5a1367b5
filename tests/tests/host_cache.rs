//! The per-host cache (replicas), working-set replay and pooled peer connections, across
//! simulated hosts. Needs root.

mod common;

use std::io::Write;
use std::process::Output;
use std::time::Duration;

use common::*;

fn verify_ok() -> String {
    format!("ok 11 {MEMCHECK_DIGEST}\n")
}

/// Replica lines of host `host`'s status: (seed id, pid, pages).
fn replicas(tb: &mitosis_testbed::Testbed, host: usize) -> Vec<(u64, i32, u64)> {
    let out = cli(tb, host, &["status"], "");
    stdout(&out)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.first() == Some(&"replica")).then(|| {
                let id = w[1].split('@').next().unwrap().parse().unwrap();
                (id, w[3].parse().unwrap(), w[5].parse().unwrap())
            })
        })
        .collect()
}

fn seed_id(handle: &str) -> u64 {
    handle.split('/').nth(3).unwrap().parse().unwrap()
}

#[test]
fn replicas_are_evicted_over_budget_and_dropped_with_their_seed() {
    // One memcheck replica holds about 25 MiB: a 40 MiB cache holds one, not two.
    let tb = testbed_with(2, &["--cache-mib", "40"]);
    let (dir_a, dir_b) = (Scratch::new("evict-a"), Scratch::new("evict-b"));
    let mut seed_a = memcheck_seed(&tb, 0, &dir_a.0);
    let seed_b = memcheck_seed(&tb, 0, &dir_b.0);
    let (a, b) = (prepare(&tb, 0, seed_a.pid()), prepare(&tb, 0, seed_b.pid()));

    let out = cli(&tb, 1, &["resume", &a], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    let cached = replicas(&tb, 1);
    assert_eq!(cached.len(), 1);
    let (id, replica_a, pages) = cached[0];
    assert_eq!(id, seed_id(&a));
    assert!(
        pages > 4000,
        "the replica holds what the child read: {pages}"
    );

    // B's replica pushes the cache over budget: A's, least recently used, goes.
    let served = status_value(&tb, 0, "bytes served").unwrap();
    let out = cli(&tb, 1, &["resume", &b], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    let cached = replicas(&tb, 1);
    assert_eq!(
        cached.iter().map(|r| r.0).collect::<Vec<_>>(),
        [seed_id(&b)]
    );
    assert!(
        eventually(Duration::from_secs(5), || !alive(replica_a)),
        "the evicted replica's process is gone"
    );

    // A child of A still works: its replica is built again, from the seed's host again.
    let out = cli(&tb, 1, &["resume", &a, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "cached"), 0);
    assert!(status_value(&tb, 0, "bytes served").unwrap() > served);
    assert_eq!(
        replicas(&tb, 1).iter().map(|r| r.0).collect::<Vec<_>>(),
        [seed_id(&a)]
    );

    // Dropping A on its host takes its replica away on host 1 too.
    let replica_a = replicas(&tb, 1)[0].1;
    let out = cli(&tb, 0, &["drop", &a], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        eventually(Duration::from_secs(10), || replicas(&tb, 1).is_empty()),
        "replica of a dropped seed still listed"
    );
    assert!(eventually(Duration::from_secs(5), || !alive(replica_a)));
    let out = cli(&tb, 1, &["resume", &a], "verify\n");
    assert!(stderr(&out).contains("no seed"), "{}", stderr(&out));
    assert_eq!(seed_a.send("verify"), verify_ok().trim());
    drop((seed_a, seed_b));
    teardown(tb);
}

#[test]
fn working_set_replay_then_pages_outside_it() {
    let tb = testbed(3);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "ws");

    // The first child only starts and exits: a small working set gets recorded.
    let out = cli(&tb, 1, &["resume", &handle, "--stats"], "exit 7\n");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "working_set_pages"), 0);

    // Host 2 has never seen the seed: it replays that working set in one go, then the child
    // reads all of its memory, most of it outside the set, on demand.
    let out = cli(&tb, 2, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "cached"), 0);
    assert!(resume_stat(&out, "working_set_pages") > 0);
    assert!(resume_stat(&out, "pages_fetched") > 1000);
    // The working set came first: the faults outside it bring blocks of 16 pages at most.
    let (fetched, fetches) = (
        resume_stat(&out, "pages_fetched"),
        resume_stat(&out, "fetches"),
    );
    assert!(
        fetched <= 16 * fetches,
        "{fetched} pages in {fetches} fetches"
    );

    // A second child on host 2 is forked from the replica, which now holds everything.
    let out = cli(&tb, 2, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "cached"), 1);
    assert_eq!(resume_stat(&out, "descriptor_us"), 0);
    drop(seed);
    teardown(tb);
}

#[test]
fn a_first_child_with_no_working_set_to_go_by_fetches_larger_blocks_per_fault() {
    let tb = testbed(3);
    let verify = |host: usize, handle: &str| {
        let out = cli(&tb, host, &["resume", handle, "--stats"], "verify\n");
        assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
        (
            resume_stat(&out, "pages_fetched"),
            resume_stat(&out, "fetches"),
        )
    };
    // Seed A's first child on host 1 records a small working set; host 2 gets it first, and
    // its child's faults outside it bring blocks of 16 pages.
    let (_dir_a, seed_a, handle_a) = prepared_memcheck(&tb, "learn-a");
    let out = cli(&tb, 1, &["resume", &handle_a, "--stats"], "exit 7\n");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let (known_pages, known_fetches) = verify(2, &handle_a);
    // Seed B (the same program) has nothing recorded: its first child's faults are all there
    // is to go by, and bring blocks of 64, in far fewer requests for the same reads.
    let (_dir_b, seed_b, handle_b) = prepared_memcheck(&tb, "learn-b");
    let (learning_pages, learning_fetches) = verify(1, &handle_b);
    assert!(known_pages > 1000 && learning_pages > 1000);
    assert!(
        learning_fetches * 2 < known_fetches,
        "blocks of 64: {learning_pages} pages in {learning_fetches} fetches; of 16: \
         {known_pages} in {known_fetches}"
    );
    drop((seed_a, seed_b));
    teardown(tb);
}

/// Prepares `pid` on host 0 as a seed of `profile`: its handle and the pages carried over.
fn prepare_profiled(tb: &mitosis_testbed::Testbed, pid: i32, profile: &str) -> (String, u64) {
    let args = [
        "prepare",
        "--pid",
        &pid.to_string(),
        "--profile",
        profile,
        "--json",
    ];
    let out = cli(tb, 0, &args, "");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("prepare --json");
    let handle = v["handle"].as_str().expect("handle").to_owned();
    (
        handle,
        v["stats"]["carried_pages"].as_u64().expect("carried_pages"),
    )
}

/// The start of process `pid`'s brk heap.
fn heap_start(pid: i32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let line = maps.lines().find(|l| l.ends_with("[heap]"))?;
    line.split('-').next().map(str::to_owned)
}

#[test]
fn a_program_prepared_again_under_its_profile_gives_its_first_child_what_the_last_one_learned() {
    let tb = testbed(3);
    let verify = |host: usize, handle: &str| {
        let out = cli(&tb, host, &["resume", handle, "--stats"], "verify\n");
        assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
        (
            resume_stat(&out, "fetches"),
            resume_stat(&out, "working_set_pages"),
        )
    };
    // Seed A: nothing to carry yet. Its first child reads all of it; being a seed of a
    // profile, it shows its replica each page it touches, and the seed's host records them.
    // Dropping A leaves them to the profile.
    let dir_a = Scratch::new("profile-a");
    let seed_a = memcheck_seed(&tb, 0, &dir_a.0);
    let (handle_a, carried) = prepare_profiled(&tb, seed_a.pid(), "memcheck");
    assert_eq!(carried, 0, "a profile never used carries nothing");
    let (reads_a, _) = verify(1, &handle_a);
    assert!(reads_a > 1000, "{reads_a} reads: not page by page");
    let out = cli(&tb, 0, &["drop", &handle_a], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let heap_a = heap_start(seed_a.pid());
    drop(seed_a);

    // Seed B: another run of the same program, laid out elsewhere where ASLR is on.
    let dir_b = Scratch::new("profile-b");
    let seed_b = memcheck_seed(&tb, 0, &dir_b.0);
    let aslr = std::fs::read_to_string("/proc/sys/kernel/randomize_va_space")
        .is_ok_and(|v| v.trim() == "2");
    if aslr {
        assert_ne!(
            heap_a,
            heap_start(seed_b.pid()),
            "two runs, one heap address"
        );
    }
    let (handle_b, carried) = prepare_profiled(&tb, seed_b.pid(), "memcheck");
    // verify reads about 6,000 pages: the first 1,024 were learned one by one, and of the
    // rest the page each fault asked for.
    assert!(
        (1000..3000).contains(&carried),
        "{carried} pages carried over\n{}",
        tb.host(0).daemon_log()
    );
    // Its first child, on a host that saw neither seed, gets them before it runs (less the
    // few that are its own eager pages too), and every byte right.
    let (_, bootstrap_b) = verify(2, &handle_b);
    assert!(
        bootstrap_b >= carried * 9 / 10,
        "{bootstrap_b} pages sent of {carried} carried"
    );

    // Seed C: the same program without a profile: nothing is carried, and its children show
    // their replica nothing page by page.
    let dir_c = Scratch::new("profile-c");
    let seed_c = memcheck_seed(&tb, 0, &dir_c.0);
    let handle_c = prepare(&tb, 0, seed_c.pid());
    let (reads_c, bootstrap_c) = verify(1, &handle_c);
    assert!(bootstrap_c < 1000, "{bootstrap_c} pages without a profile");
    assert!(reads_c < 500, "{reads_c} reads without a profile");

    // Another name carries nothing; a name that is not one is refused with the reason.
    let (_, carried) = prepare_profiled(&tb, seed_b.pid(), "other");
    assert_eq!(carried, 0);
    let pid = seed_b.pid().to_string();
    let out = cli(&tb, 0, &["prepare", "--pid", &pid, "--profile", "a b"], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("profile name"), "{}", stderr(&out));
    drop((seed_b, seed_c));
    teardown(tb);
}

#[test]
fn pooled_connections_survive_a_peer_restart() {
    let tb = testbed(2);
    let (_dir, mut seed, handle) = prepared_memcheck(&tb, "restart");
    // A first child that touches little: the next one still needs pages from the seed's host
    // (a first child's faults bring whole blocks into the replica).
    let out = cli(&tb, 1, &["resume", &handle], "exit 7\n");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let pool_line = format!("pool {}:7070", tb.host(0).addr());
    assert!(status_value(&tb, 1, &format!("{pool_line} idle")).unwrap() >= 1);

    // A child in flight when the seed's host restarts fails cleanly.
    let (resume, mut input) = spawn_cli(&tb, 1, &["resume", &handle, "--stats"]);
    wait_for_child_reading_stdin(&tb, 1);
    tb.host(0).kill_daemon().unwrap();
    tb.host(0).start_daemon().unwrap();
    input.write_all(b"exercise\n").unwrap();
    drop(input);
    let out = wait_output(resume, Duration::from_secs(30));
    let err = stderr(&out);
    assert!(err.contains("child killed: page source lost"), "{err}");
    // 79: page source lost, not the child's own end (docs/operations.md).
    assert_eq!(out.status.code(), Some(79), "{err}");

    // The seed changes and is prepared again on the restarted daemon (same seed id, new
    // key). Host 1's pooled connections reconnect by themselves, and its old replica, which
    // holds the old pages, is never used for the new seed.
    assert_eq!(seed.send("mutate"), "mutated");
    let again = prepare(&tb, 0, seed.pid());
    assert_eq!(seed_id(&again), seed_id(&handle));
    let out = cli(&tb, 1, &["resume", &again, "--stats"], "verify\n");
    assert!(
        stdout(&out).contains("failed"),
        "child saw stale memory: {}",
        stdout(&out)
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "cached"), 0);
    assert!(status_value(&tb, 1, &format!("{pool_line} idle")).unwrap() >= 1);
    drop(seed);
    teardown(tb);
}

/// Host 1's replica pages of `handle`'s seed, once they stop changing for a second.
fn settled_pages(tb: &mitosis_testbed::Testbed, handle: &str) -> u64 {
    let id = seed_id(handle);
    let pages = || {
        replicas(tb, 1)
            .into_iter()
            .find(|r| r.0 == id)
            .map_or(0, |r| r.2)
    };
    let mut last = pages();
    let mut stable_since = std::time::Instant::now();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        let now = pages();
        if now != last {
            (last, stable_since) = (now, std::time::Instant::now());
        } else if stable_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    last
}

/// A child on host 1 that runs `mutate` (writes 1 MiB of region 8, and heap and sparse pages) and exits.
fn mutate_then_exit(tb: &mitosis_testbed::Testbed, handle: &str) -> Output {
    let out = cli(tb, 1, &["resume", handle, "--stats"], "mutate\nexit 0\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "mutated\n");
    out
}

#[test]
fn a_warm_child_that_fetched_starts_a_background_fill_and_later_children_fetch_nothing() {
    let tb = testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "fill");
    // The first child builds the replica and reads nothing: no fill (it was not warm).
    let out = cli(&tb, 1, &["resume", &handle], "exit 0\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let built = settled_pages(&tb, &handle);

    // A warm child writes 1 MiB the replica did not have: fetched, and the fill starts.
    let out = mutate_then_exit(&tb, &handle);
    assert_eq!(resume_stat(&out, "cached"), 1);
    assert!(resume_stat(&out, "pages_fetched") >= 16);
    let filled = settled_pages(&tb, &handle);
    assert!(
        filled > built + 4000,
        "the replica took in the rest of the seed: {built} then {filled} pages"
    );
    // Filled 2 MiB stretches are huge pages now (the seed's 8 MiB written run of its sparse
    // region holds four), so forks of the replica copy fewer page-table entries.
    let replica = replicas(&tb, 1)[0].1;
    let rollup = std::fs::read_to_string(format!("/proc/{replica}/smaps_rollup")).unwrap();
    let huge_kib: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    assert!(huge_kib >= 8192, "{rollup}");

    // The next child reads every region and fetches only its shared anonymous mapping
    // (512 KiB, 128 pages), which each child maps afresh: the rest is in the replica.
    let out = cli(&tb, 1, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert!(
        resume_stat(&out, "pages_fetched") <= 128,
        "{}",
        stderr(&out)
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn the_background_fill_stays_within_the_cache_budget() {
    // 8 MiB: 2048 pages, under the memcheck seed's 25 MiB.
    let tb = testbed_with(2, &["--cache-mib", "8"]);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "fill-budget");
    let out = cli(&tb, 1, &["resume", &handle], "exit 0\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mutate_then_exit(&tb, &handle);
    let fetched = resume_stat(&out, "pages_fetched");
    let filled = settled_pages(&tb, &handle);
    assert!(filled <= 2048, "over the budget: {filled} pages");
    assert!(
        filled > fetched + 512,
        "the fill took in pages up to the budget: {filled} pages, {fetched} fetched by the child"
    );
    // Children still read everything right: the rest comes on demand.
    let out = cli(&tb, 1, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert!(resume_stat(&out, "pages_fetched") > 0);
    drop(seed);
    teardown(tb);
}

#[test]
fn no_background_fill_turns_it_off() {
    let tb = testbed_with(2, &["--no-background-fill"]);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "no-fill");
    let out = cli(&tb, 1, &["resume", &handle], "exit 0\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mutate_then_exit(&tb, &handle);
    let after = settled_pages(&tb, &handle);
    let out2 = cli(&tb, 1, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out2), verify_ok(), "{}", stderr(&out2));
    assert!(
        resume_stat(&out2, "pages_fetched") > 1000,
        "without the fill, verify fetches what no child read ({after} pages held after {} fetched)",
        resume_stat(&out, "pages_fetched")
    );
    drop(seed);
    teardown(tb);
}

#[test]
fn a_replica_maps_zero_pages_in_the_gaps_between_the_seeds_pages_so_children_do_not_fault_there() {
    // Without the background fill, so the replica holds only what children made it hold.
    let tb = testbed_with(2, &["--no-background-fill"]);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "gaps");
    // The first child builds the replica; its sparse region's never-touched pages between the
    // seed's (registered with userfaultfd with them) get zero pages there meanwhile.
    let out = cli(&tb, 1, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    // A warm child writes into one of those zero pages (sparse page 1): its own copy.
    mutate_then_exit(&tb, &handle);
    // The next one reads all the gaps as zeros (the write above did not reach it) without
    // a single zero fault: about 12,000 without the zero pages.
    let out = cli(&tb, 1, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "zero_faults"), 0, "{}", stderr(&out));
    drop(seed);
    teardown(tb);
}

#[test]
fn a_fill_request_brings_the_whole_seed_in_before_the_children_that_then_fetch_nothing() {
    let tb = testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "wholefill");
    // Before any child: the replica is built and takes in every page of the seed.
    let out = cli(&tb, 1, &["fill", "--handle-file", "-"], &handle);
    assert!(out.status.success(), "{}", stderr(&out));
    let pages = replicas(&tb, 1)
        .into_iter()
        .find(|r| r.0 == seed_id(&handle))
        .expect("a replica on host 1")
        .2;
    // memcheck's seed has about 6,400 pages of its own; all are in.
    assert!(pages > 6000, "{pages} pages in the replica");
    // The first child, which reads every region, fetches only its shared anonymous mapping
    // (128 pages), which each child maps afresh.
    let out = cli(&tb, 1, &["resume", &handle, "--stats"], "verify\n");
    assert_eq!(stdout(&out), verify_ok(), "{}", stderr(&out));
    assert_eq!(resume_stat(&out, "cached"), 1, "{}", stderr(&out));
    assert!(
        resume_stat(&out, "pages_fetched") <= 128,
        "{}",
        stderr(&out)
    );
    // Nor does it fault on the gaps between the seed's pages (the sparse region's untouched
    // pages): the filled replica maps the zero page there.
    assert_eq!(resume_stat(&out, "zero_faults"), 0, "{}", stderr(&out));
    // Once the seed is dropped, a fill is refused with the reason.
    let out = cli(&tb, 0, &["drop", &handle], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = mitosis_client::Client::connect(tb.host(1).socket_path())
        .expect("host 1's daemon")
        .fill(&handle)
        .expect_err("a fill of a dropped seed");
    assert_eq!(
        refused.kind(),
        Some(mitosis_client::ErrorKind::NoSuchSeed),
        "{refused}"
    );
    drop(seed);
    teardown(tb);
}
