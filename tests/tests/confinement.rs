//! A child has exactly its seed's credentials and confinement: ids, groups, capability sets,
//! no_new_privs and each thread's seccomp filters (as root: the seed drops them itself).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

const CONFINED_BIN: &str = env!("CONFINED_BIN");

/// The confined fixture in `host`, writing probes into `dir`.
fn confined_seed(tb: &mitosis_testbed::Testbed, host: usize, dir: &Scratch) -> Seed {
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = tb.host(host).command(CONFINED_BIN);
    cmd.arg(&dir.0);
    Seed::start(cmd)
}

/// The value of `key=` in the part of `line` that describes `who` ("main:" or "worker:").
fn field<'a>(line: &'a str, who: &str, key: &str) -> &'a str {
    let part = line.split_once(&format!("{who}:")).expect(who).1;
    let part = part.split(" worker:").next().unwrap();
    part.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} for {who} in {line}"))
}

#[test]
fn a_child_on_another_host_is_exactly_as_confined_as_its_seed() {
    let tb = testbed(2);
    let dir = Scratch::new("confined");
    let mut seed = confined_seed(&tb, 0, &dir);
    let seed_says = seed.send("status");
    // What the seed did to itself, as the kernel reports it.
    for who in ["main", "worker"] {
        assert_eq!(field(&seed_says, who, "uid"), "65534,65534,65534,65534");
        assert_eq!(field(&seed_says, who, "gid"), "65534,65534,65534,65534");
        assert_eq!(field(&seed_says, who, "eff"), "0000000000000000");
        assert_eq!(field(&seed_says, who, "prm"), "0000000000000000");
        assert_eq!(field(&seed_says, who, "bnd"), "0000000000000000");
        assert_eq!(field(&seed_says, who, "nnp"), "1");
        assert_eq!(field(&seed_says, who, "seccomp"), "2");
        assert_eq!(field(&seed_says, who, "chroot"), "EXDEV");
    }
    assert_eq!(field(&seed_says, "main", "filters"), "2");
    // Process flags a program can read back.
    for flag in ["thp=1", "subreaper=1", "persona=0x40000"] {
        assert!(seed_says.contains(flag), "{flag} in {seed_says}");
    }
    assert_eq!(field(&seed_says, "main", "slack"), "12345");
    assert_eq!(field(&seed_says, "worker", "slack"), "23456");
    assert_eq!(field(&seed_says, "main", "mkdir"), "EPERM");
    assert_eq!(field(&seed_says, "worker", "filters"), "1");
    assert_eq!(field(&seed_says, "worker", "mkdir"), "ok");

    let handle = prepare(&tb, 0, seed.pid());
    // The handle's key stays off the command line: in the environment here.
    let mut resume = tb.host(1).command(bin("mitosis"));
    resume
        .arg("--socket")
        .arg(tb.host(1).socket_path())
        .arg("resume")
        .env("MITOSIS_HANDLE", &handle)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = resume.spawn().unwrap();
    let key = handle.rsplit('/').next().unwrap().to_string();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&key));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"status\n").unwrap();
    }
    let out = wait_output(child, std::time::Duration::from_secs(60));
    assert_eq!(
        stdout(&out).trim_end(),
        seed_says,
        "the child differs from its seed; stderr: {}\nhost 1: {}",
        stderr(&out),
        tb.host(1).daemon_log()
    );
    assert_eq!(out.status.code(), Some(0));

    // The seed itself was left as it was.
    assert_eq!(seed.send("status"), seed_says);

    // inspect shows the credentials children get (the handle read from a file), not the key.
    let file = dir.0.join("seed.handle");
    std::fs::write(&file, format!("{handle}\n")).unwrap();
    let out = cli(
        &tb,
        1,
        &["inspect", "--handle-file", file.to_str().unwrap()],
        "",
    );
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!report.contains(&key), "{report}");
    assert_eq!(
        report
            .matches("uid 65534/65534/65534/65534 gid 65534/65534/65534/65534 groups [] caps eff 0x0 prm 0x0 inh 0x0 bnd 0x0 amb 0x0")
            .count(),
        2,
        "{report}"
    );
    assert!(
        report.contains("no_new_privs yes seccomp 2 filters"),
        "{report}"
    );
    assert!(
        report.contains("no_new_privs yes seccomp 1 filters"),
        "{report}"
    );
    assert!(report.contains("dumpable 0"), "{report}");
    drop(seed);
    teardown(tb);
}

#[test]
fn a_local_child_is_as_confined_as_its_seed() {
    let tb = testbed(1);
    let dir = Scratch::new("confined-local");
    let mut seed = confined_seed(&tb, 0, &dir);
    let seed_says = seed.send("status");
    let handle = prepare(&tb, 0, seed.pid());
    let out = cli(&tb, 0, &["resume", &handle], "status\nstatus\n");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [seed_says.as_str(); 2],
        "stderr: {}\nhost 0: {}",
        stderr(&out),
        tb.host(0).daemon_log()
    );
    drop(seed);
    teardown(tb);
}
