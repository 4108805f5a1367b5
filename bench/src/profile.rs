//! First children of a program seen before: per sample, new processes of the seed's program
//! on host 0, one after the other, each prepared under a profile of that sample's own
//! (`prepare --profile`), each with one child on host 1. The first process's child shows the
//! profile every page it touches (`first child (profile, learning)`); each later one starts
//! with what the profile learned so far, carried over to its own layout, and adds what it
//! touched besides; the last of [`RUNS`] is measured (`first child (profile)`). Two runs of
//! a program touch different pages here and there (CPython's hashes are salted per process,
//! so its dicts and sets differ), so the profile needs a few runs to cover what the next one
//! touches. Beside the `first child` row, a program never seen, they show what a profile
//! costs once and saves after.

use crate::daemon::{self, Origin};
use crate::methods::{Pair, schedule};
use crate::procs::Server;
use crate::remote::{Child, Remote};
use crate::results::{MITOSIS_FIRST_LEARNING, MITOSIS_FIRST_PROFILE, Method, SeedResult, Served};
use crate::seeds::Seed;

/// Processes per sample: the learning one, those in between, the measured one.
const RUNS: usize = 4;

/// One new process of `seed` on the seed's host, prepared under `profile`, and its child on
/// host 1 with `req`; the pages carried over with it. The seed is dropped and the process
/// ended after.
fn one(
    remote: &Remote,
    seed: &Seed,
    profile: &str,
    (req, want): (&str, Option<&str>),
) -> Result<(Child, u64), String> {
    let mut server = Server::start(seed.command(remote.seed_host, &[]))
        .map_err(|e| format!("starting the seed: {e:#}"))?;
    let prepared = daemon::prepare_profiled(remote.seed_host, server.pid(), profile)
        .map_err(|e| format!("{e:#}"));
    let result = prepared.and_then(|(handle, carried)| {
        let child = remote.child(remote.child_hosts[0], &handle, req, want);
        if let Err(err) = daemon::drop_seed(remote.seed_host, &handle) {
            eprintln!("  warning: {err:#}");
        }
        child.map(|c| (c, carried))
    });
    server.kill();
    result
}

/// Both profile rows for `seed` (a process the bench starts; not a bundle).
pub fn first_children(
    remote: &Remote,
    seed: &Seed,
    origin: Origin,
    (warmup, samples): (usize, usize),
    pairs: &[Pair],
    out: &mut SeedResult,
) {
    let mut learning = Method::new(
        MITOSIS_FIRST_LEARNING,
        "mitosis first child (profile, learning)",
    );
    let mut carried = Method::new(MITOSIS_FIRST_PROFILE, "mitosis first child (profile)");
    if let Origin::Bundle(_) = origin {
        let why = "a bundle's seed is started by the daemon: no second process to carry to";
        learning.skipped = Some(why.into());
        carried.skipped = Some(why.into());
        out.methods.extend([learning, carried]);
        return;
    }
    let (mut served_learning, mut served_carried) = (Served::default(), Served::default());
    for (i, (req, want)) in schedule(warmup, samples, pairs).enumerate() {
        let profile = format!("bench/{}/{}/{i}", seed.name, std::process::id());
        let request = (req.as_str(), want);
        let gave_up = remote.tally(
            &mut learning,
            &mut out.first_learning,
            &mut served_learning,
            want.is_some(),
            || one(remote, seed, &profile, request).map(|(c, _)| c),
        );
        if gave_up {
            break;
        }
        let between = (2..RUNS).try_for_each(|_| one(remote, seed, &profile, request).map(|_| ()));
        if let Err(err) = between {
            carried.attempted += usize::from(want.is_some());
            if carried.fail(format!("an earlier run: {err}")) {
                break;
            }
            continue;
        }
        let mut pages = None;
        let gave_up = gave_up
            || remote.tally(
                &mut carried,
                &mut out.first_profile,
                &mut served_carried,
                want.is_some(),
                || {
                    one(remote, seed, &profile, request).map(|(c, n)| {
                        pages = Some(n);
                        c
                    })
                },
            );
        if want.is_some() {
            out.carried_pages.extend(pages);
        }
        if gave_up {
            break;
        }
    }
    out.first_learning.served = Some(served_learning);
    out.first_profile.served = Some(served_carried);
    out.methods.extend([learning, carried]);
}
