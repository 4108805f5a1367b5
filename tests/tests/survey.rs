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

/// The special mappings (vDSO, vvar, vsyscall) of `pid`, as /proc/PID/maps names them, with
/// their sizes, in order.
fn special_maps(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().nth(5)?;
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            let pages =
                (u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?) / 4096;
            (name.starts_with("[v")).then(|| format!("{a} {name}:{pages}"))
        })
        .collect()
}

#[test]
fn the_vdso_and_vvar_mappings_are_the_seeds() {
    for (bin, args) in [
        (env!("SELFVIEW_BIN").to_string(), vec![]),
        (
            "python3".to_string(),
            vec![concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python/seed_fn.py").to_string()],
        ),
        (
            "node".to_string(),
            vec![concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node/fn.js").to_string()],
        ),
    ] {
        let tb = testbed(2);
        let mut cmd = tb.host(0).command(&bin);
        cmd.args(&args);
        let seed = Seed::start(cmd);
        let handle = prepare(&tb, 0, seed.pid());
        let (cli_child, stdin) = spawn_cli(&tb, 1, &["resume", &handle]);
        let child = running_child(&tb, 1, seed.pid());
        let (want, got) = (special_maps(seed.pid()), special_maps(child));
        drop(stdin);
        let _ = wait_output(cli_child, std::time::Duration::from_secs(20));
        drop(seed);
        teardown(tb);
        assert_eq!(got, want, "{bin}");
    }
}

/// The child of `seed` running on `host`: a process of the host's daemon with the seed's
/// name that is not its replica, and no longer traced (a replica always is).
fn running_child(tb: &mitosis_testbed::Testbed, host: usize, seed: i32) -> i32 {
    let daemon = tb.host(host).daemon_pid().expect("the host's daemon");
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let name = comm(seed);
    let mut found = None;
    assert!(
        eventually(std::time::Duration::from_secs(20), || {
            let replicas = replica_pids(tb, host);
            found = processes_with_parent(daemon)
                .into_iter()
                .find(|&p| !replicas.contains(&p) && comm(p) == name && !traced(p));
            found.is_some()
        }),
        "no child of the seed on host {host}"
    );
    found.expect("found")
}

fn traced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
}
