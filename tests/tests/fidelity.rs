//! End to end: a child continues exactly where its seed was. Each fixture sets up one kind of
//! state, and answers `check` with what its own code observes of it; a child forked onto
//! another host must answer the same.

mod common;

use common::*;
use std::process::Output;

/// Starts `bin` on host 0, prepares it, and returns what the seed and then its child on host
/// 1 answer to `check`.
fn seed_and_child(bin: &str, args: &[&str]) -> (String, String) {
    let (want, got, _) = seed_and_child_resumed(bin, args, &[]);
    (want, got)
}

/// [`seed_and_child`] with `flags` for the child's `mitosis resume`; also its output.
fn seed_and_child_resumed(bin: &str, args: &[&str], flags: &[&str]) -> (String, String, Output) {
    let tb = testbed(2);
    let mut cmd = tb.host(0).command(bin);
    cmd.args(args);
    let mut seed = Seed::start(cmd);
    let handle = prepare(&tb, 0, seed.pid());
    let want = seed.send("check");
    let resume = [&["resume"], flags, &[handle.as_str()]].concat();
    let out = cli(&tb, 1, &resume, "check\n");
    let got = stdout(&out).trim_end().to_string();
    assert!(
        out.status.success(),
        "child: {}\n{}",
        stderr(&out),
        tb.host(1).daemon_log()
    );
    drop(seed);
    teardown(tb);
    (want, got, out)
}

#[test]
fn pipes_keep_their_flags_size_and_content() {
    let (seed, child) = seed_and_child(env!("PIPES_BIN"), &[]);
    assert!(seed.contains("size=262144 len=204800"), "{seed}");
    assert_eq!(child, seed);
}

#[test]
fn memfds_deleted_files_and_fifos_come_along() {
    let dir = Scratch::new("memfiles");
    let (seed, child) = seed_and_child(env!("MEMFILES_BIN"), &[dir.0.to_str().unwrap()]);
    assert!(
        seed.contains("memfd_coherent=1 ghost_coherent=1") && seed.contains("'through the fifo'"),
        "{seed}"
    );
    assert_eq!(child, seed);
}

#[test]
fn the_command_line_and_environment_read_the_same() {
    let (seed, child) = seed_and_child(env!("CMDLINE_BIN"), &["--an-arg", "another"]);
    assert!(seed.contains("=worker|||||"), "{seed}");
    assert_eq!(child, seed);
}

#[test]
fn a_shared_file_mapping_keeps_the_access_its_file_was_opened_with() {
    let dir = Scratch::new("mapflags-rw");
    let (seed, child) = seed_and_child(env!("MAPFLAGS_BIN"), &["rwfile", dir.0.to_str().unwrap()]);
    assert!(seed.contains("mprotect=0 errno=0 wrote=1 mw=1"), "{seed}");
    assert_eq!(child, seed);
}

#[test]
fn locked_memory_stays_locked() {
    let (seed, child) = seed_and_child(env!("MAPFLAGS_BIN"), &["locked"]);
    assert!(
        seed.contains("VmLck=24 kB mlock_lo=1 map_locked_lo=1"),
        "{seed}"
    );
    assert_eq!(child, seed);
}

#[test]
fn a_growsdown_mapping_still_grows() {
    let (seed, child) = seed_and_child(env!("MAPFLAGS_BIN"), &["growsdown"]);
    assert!(seed.contains("gd=1 grew=1 value=1"), "{seed}");
    assert_eq!(child, seed);
}

/// Pages in many small mappings side by side (one page each, read-write and read-only in
/// turn): each lands in its own mapping, and a fault brings its block's pages from the
/// neighbouring mappings too, not one page per round trip.
#[test]
fn pages_of_many_small_mappings_land_in_their_own_and_come_a_block_at_a_time() {
    let (want, got, out) = seed_and_child_resumed(env!("MAPFLAGS_BIN"), &["small"], &["--stats"]);
    assert!(want.starts_with("small: maps=2048 bad=0 "), "{want}");
    assert_eq!(got, want);
    // A first child fetches blocks of 64 pages: 32 blocks hold the 2,048 pages. One fault
    // per mapping would be 2,048.
    let faults = resume_stat(&out, "faults");
    assert!((1..=256).contains(&faults), "{faults} faults");
}

#[test]
fn exited_children_are_there_to_reap() {
    let (seed, child) = seed_and_child(env!("ZOMBIES_BIN"), &[]);
    assert!(
        seed.contains("exit=7 signal=15 sigchld_pending=0")
            && seed.contains("end=No child processes"),
        "{seed}"
    );
    assert_eq!(child, seed);
}

/// musl keeps its thread-list lock where glibc keeps a thread's id (the clear-child-tid
/// address), and the id in its thread descriptor. A child whose threads got their new ids
/// written at that address found the lock held forever (its first `pthread_create` hung);
/// one whose descriptors kept the seed's ids sent its `raise` and `pthread_kill` to the
/// seed's threads.
#[test]
fn a_musl_programs_child_starts_joins_and_signals_its_own_threads() {
    let (seed, child) = seed_and_child(env!("MUSLTHREADS_BIN"), &[]);
    assert_eq!(
        seed,
        "sums=126306,251650,377153,505247 worker=144 mutex=0,EDEADLK,0 raised=1 killed=0,1"
    );
    assert_eq!(child, seed);
}
