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
    (
        "status.SigQ.queued",
        "signals queued for the whole user (every root process here), not the process's own",
    ),
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
    // History the kernel keeps per process: the child's own, as after fork().
    (
        "stat.14",
        "CPU time is the child's own, as after fork() (utime)",
    ),
    ("stat.15", "CPU time is the child's own (stime)"),
    ("stat.16", "CPU time is the child's own (cutime)"),
    ("stat.17", "CPU time is the child's own (cstime)"),
    ("stat.12", "the child's own page faults (majflt)"),
    ("stat.11", "the child's own page faults (cminflt)"),
    ("stat.13", "the child's own page faults (cmajflt)"),
    (
        "stat.23",
        "docs/limits.md: memory arrives on demand (vsize peaks)",
    ),
    ("stat.43", "CPU time is the child's own (guest time)"),
    ("stat.44", "CPU time is the child's own (cguest time)"),
    ("stat.42", "the child's own block I/O delays"),
];

/// The keys whose values differ between the seed's view (`want`) and the child's (`got`)
/// that [`EXPECTED`] does not allow (each allowed one is printed, with why).
fn differences(
    what: &str,
    want: &BTreeMap<String, String>,
    got: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut unexpected = Vec::new();
    for key in want
        .keys()
        .chain(got.keys().filter(|k| !want.contains_key(*k)))
    {
        let (w, g) = (want.get(key), got.get(key));
        if w == g {
            continue;
        }
        let line = format!("{what} {key}: seed {w:?} child {g:?}");
        if w.is_some_and(|w| w == OUTSIDE_PIPE) && g.is_none() {
            eprintln!("expected: {line} (README: connections to the outside are closed)");
            continue;
        }
        match EXPECTED.iter().find(|(prefix, _)| allows(prefix, key)) {
            Some((_, why)) => eprintln!("expected: {line} ({why})"),
            None => unexpected.push(line),
        }
    }
    unexpected
}

/// Whether the entry `prefix` of [`EXPECTED`] covers `key`: a stat field by its number
/// exactly (`stat.4` is not `stat.41`), anything else by prefix (`status.Vm` covers VmRSS).
fn allows(prefix: &str, key: &str) -> bool {
    match prefix.strip_prefix("stat.") {
        Some(_) => key == prefix,
        None => key.starts_with(prefix),
    }
}

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
    let unexpected = differences("", &want, &got);
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

/// What /proc says of `pid` from outside: status, limits, stat (fields numbered as in
/// proc(5)), the per-process files a program reads of itself, its namespaces, its mappings
/// (without device and inode) and its descriptors from 3 up (0-2 are the resumer's stdio).
fn proc_view(pid: i32) -> BTreeMap<String, String> {
    let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
    let text = |f: &str| String::from_utf8_lossy(&read(f)).into_owned();
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut v = BTreeMap::new();
    for line in text("status").lines() {
        if let Some((k, val)) = line.split_once(':') {
            // SigQ is "queued/limit": the count is the whole user's, the limit the process's.
            if let ("SigQ", Some((queued, limit))) = (k, val.trim().split_once('/')) {
                v.insert("status.SigQ.queued".into(), queued.into());
                v.insert("status.SigQ.limit".into(), limit.into());
                continue;
            }
            v.insert(format!("status.{k}"), words(val));
        }
    }
    for line in text("limits").lines().skip(1) {
        let (name, values) = line.split_at(line.len().min(26));
        v.insert(format!("limits.{}", name.trim()), words(values));
    }
    let stat = text("stat");
    if let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) {
        v.insert("stat.2".into(), stat[open + 1..close].to_owned());
        for (i, field) in stat[close + 1..].split_whitespace().enumerate() {
            v.insert(format!("stat.{}", i + 3), field.to_owned());
        }
    }
    for f in [
        "comm",
        "personality",
        "timerslack_ns",
        "oom_score_adj",
        "coredump_filter",
        "sessionid",
        "loginuid",
        "cgroup",
    ] {
        v.insert(format!("file.{f}"), text(f).trim().to_owned());
    }
    for f in ["cmdline", "environ"] {
        v.insert(format!("file.{f}"), format!("{:?}", read(f)));
    }
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/ns")) {
        for e in dir.flatten() {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            let name = e.file_name().to_string_lossy().into_owned();
            v.insert(format!("ns.{name}"), target.display().to_string());
        }
    }
    for (i, m) in merged_maps(&text("maps")).iter().enumerate() {
        v.insert(format!("maps.{i:03}"), m.clone());
    }
    for fd in common::procfs::fd_numbers(pid)
        .into_iter()
        .filter(|&fd| fd > 2)
    {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        let info = text(&format!("fdinfo/{fd}"));
        let flags = info
            .lines()
            .filter(|l| l.starts_with("pos:") || l.starts_with("flags:"))
            .map(words)
            .collect::<Vec<_>>()
            .join(" ");
        // Pipes and sockets are named by inode, which a recreated one cannot keep.
        let target = target.display().to_string();
        if target.starts_with("pipe:") && held_elsewhere(pid, &target) {
            // A connection to the outside (the test harness's): closed in a child on purpose.
            v.insert(format!("fd.{fd}"), OUTSIDE_PIPE.to_owned());
            continue;
        }
        let kind = target.split(":[").next().unwrap_or("").to_owned();
        v.insert(format!("fd.{fd}"), format!("{kind} {flags}"));
    }
    v
}

/// /proc/PID/maps as `start-end perms offset name`, adjacent entries that continue each
/// other (same permissions and name, the offset running on) merged: a child's mapping that
/// the seed had pages in only part of shows as two, the part served through userfaultfd and
/// the rest (docs/limits.md).
fn merged_maps(maps: &str) -> Vec<String> {
    struct Entry {
        start: u64,
        end: u64,
        perms: String,
        offset: u64,
        name: String,
    }
    let mut out: Vec<Entry> = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some((a, b)) = f.first().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let hex = |x: &str| u64::from_str_radix(x, 16).unwrap_or(0);
        let e = Entry {
            start: hex(a),
            end: hex(b),
            perms: f.get(1).copied().unwrap_or("").to_owned(),
            offset: hex(f.get(2).copied().unwrap_or("0")),
            name: f.get(5).copied().unwrap_or("").to_owned(),
        };
        if let Some(last) = out.last_mut() {
            let anon = e.name.is_empty() || e.name.starts_with('[');
            let continues = last.end == e.start
                && last.perms == e.perms
                && last.name == e.name
                && !e.name.starts_with("[v")
                && (anon || last.offset + (last.end - last.start) == e.offset);
            if continues {
                last.end = e.end;
                continue;
            }
        }
        out.push(e);
    }
    out.iter()
        .map(|e| {
            format!(
                "{:x}-{:x} {} {:x} {}",
                e.start, e.end, e.perms, e.offset, e.name
            )
        })
        .collect()
}

/// A descriptor of a pipe another process holds too.
const OUTSIDE_PIPE: &str = "pipe to the outside";

/// Whether a process other than `pid` holds the pipe `target` (`pipe:[INODE]`).
fn held_elsewhere(pid: i32, target: &str) -> bool {
    common::procfs::all_pids().filter(|&p| p != pid).any(|p| {
        std::fs::read_dir(format!("/proc/{p}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == target))
        })
    })
}

#[test]
fn runtime_seeds_and_their_children_read_the_same_in_proc() {
    let classes = compile_java();
    let python = example("python/seed_fn.py");
    let node = example("node/fn.js");
    let mut failures = Vec::new();
    for runtime in ["python", "node", "java"] {
        let tb = testbed(2);
        let cmd = match runtime {
            "python" => {
                let mut c = tb.host(0).command("python3");
                c.arg(&python);
                c
            }
            "node" => {
                let mut c = tb.host(0).command("node");
                c.arg(&node);
                c
            }
            _ => java(&classes.0, Some((&tb, 0))),
        };
        let seed = Seed::start(cmd);
        let handle = prepare(&tb, 0, seed.pid());
        let (cli_child, stdin) = spawn_cli(&tb, 1, &["resume", &handle]);
        let child = running_child(&tb, 1, seed.pid());
        // Both idle, blocked reading stdin.
        common::procfs::wait_until_idle(child, std::time::Duration::from_secs(10));
        let (want, got) = (proc_view(seed.pid()), proc_view(child));
        drop(stdin);
        let _ = wait_output(cli_child, std::time::Duration::from_secs(20));
        drop(seed);
        teardown(tb);
        failures.extend(differences(runtime, &want, &got));
    }
    assert!(failures.is_empty(), "differences:\n{}", failures.join("\n"));
}
