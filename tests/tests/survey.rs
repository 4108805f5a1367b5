//! End to end: everything a process can read about itself (/proc/self/status, limits and
//! stat, prctl getters, scheduling, /proc/self files, its special mappings), compared between
//! a seed and its child on another host. Each difference is either what the rule allows (its
//! pid, its connections, the resumer's stdio) or listed in docs/limits.md with its reason.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;

use common::*;

/// What differs by design or by a documented limit, by key prefix, with the reason.
const EXPECTED: &[(&str, &str)] = &[
    ("status.Pid", "its pid"),
    ("status.Tgid", "its pid"),
    ("status.PPid", "its parent: the daemon of its host"),
    ("status.NSpid", "its pid"),
    ("status.NStgid", "its pid"),
    ("stat.4", "its parent: the daemon of its host"),
    ("ns.net", "its host's network"),
    (
        "ns.mnt",
        "its host's mounts (each testbed host has its own)",
    ),
    (
        "prctl.pdeathsig",
        "docs/limits.md: SIGKILL ties the child to its host's daemon",
    ),
    (
        "status.Vm",
        "docs/limits.md: memory arrives on demand (VmRSS, VmHWM), peaks are history",
    ),
    ("status.Rss", "docs/limits.md: memory arrives on demand"),
    ("stat.24", "docs/limits.md: memory arrives on demand (rss)"),
    (
        "stat.10",
        "docs/limits.md: the child's own page faults (minflt)",
    ),
    ("status.voluntary_ctxt_switches", "the child's own history"),
    (
        "status.nonvoluntary_ctxt_switches",
        "the child's own history",
    ),
    ("stat.22", "docs/limits.md: start time, the child's own"),
    ("stat.39", "the CPU it last ran on"),
    (
        "stat.9",
        "docs/limits.md: PF_FORKNOEXEC, a child is a fork that has not exec'd",
    ),
    (
        "status.FDSize",
        "docs/limits.md: the descriptor table is at least its stub's",
    ),
];

fn parse(lines: &str) -> BTreeMap<String, String> {
    lines
        .lines()
        .take_while(|l| *l != "end")
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_child_sees_itself_as_its_seed_did() {
    let tb = testbed(2);
    let mut seed = Seed::start(tb.host(0).command(env!("SELFVIEW_BIN")));
    let handle = prepare(&tb, 0, seed.pid());
    let mut said = String::new();
    writeln_seed(&mut seed, "check");
    loop {
        let mut line = String::new();
        seed.stdout.read_line(&mut line).expect("seed answer");
        if line.is_empty() || line == "end\n" {
            break;
        }
        said.push_str(&line);
    }
    let out = cli(&tb, 1, &["resume", &handle], "check\n");
    assert!(
        out.status.success(),
        "child: {}\n{}",
        stderr(&out),
        tb.host(1).daemon_log()
    );
    let (want, got) = (parse(&said), parse(&stdout(&out)));
    eprintln!(
        "special mappings: seed {:?} child {:?}",
        want.get("maps.special"),
        got.get("maps.special")
    );
    let mut unexpected = Vec::new();
    for key in want
        .keys()
        .chain(got.keys().filter(|k| !want.contains_key(*k)))
    {
        let (w, g) = (want.get(key), got.get(key));
        if w == g {
            continue;
        }
        let line = format!("{key}: seed {w:?} child {g:?}");
        match EXPECTED.iter().find(|(prefix, _)| key.starts_with(prefix)) {
            Some((_, why)) => eprintln!("expected: {line} ({why})"),
            None => unexpected.push(line),
        }
    }
    drop(seed);
    teardown(tb);
    assert!(
        unexpected.is_empty(),
        "differences:\n{}",
        unexpected.join("\n")
    );
}

fn writeln_seed(seed: &mut Seed, line: &str) {
    use std::io::Write;
    writeln!(seed.stdin, "{line}").expect("write to seed");
}
