//! Hierarchies and cgroups on temporary trees, without root.
use super::*;
use crate::cgroup::test_util::{TmpDir, read};

#[test]
fn parses_oom_counters() {
    let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
    assert_eq!(parse_counter(v1, "oom_kill"), Some(3));
    let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
    assert_eq!(parse_counter(v2, "oom_kill"), Some(1));
    assert_eq!(parse_counter("oom_group_kill 4\n", "oom_kill"), None);
}

#[test]
fn formats_pid() {
    let mut buf = [0; 12];
    assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
    assert_eq!(format_pid(i32::MIN, &mut buf), b"-2147483648");
}

#[test]
fn names_are_single_components() {
    for bad in ["", ".", "..", "a/b", "/a", "a\0"] {
        assert!(matches!(check_name(bad), Err(CgroupError::InvalidName(_))));
    }
    assert!(check_name("c-12.seed").is_ok());
}

fn fake(dirs: &[(&[&'static str], Version)]) -> Hierarchy {
    Hierarchy {
        dirs: dirs
            .iter()
            .map(|(controllers, version)| BaseDir {
                version: *version,
                path: "/nonexistent".into(),
                controllers: controllers.to_vec(),
            })
            .collect(),
    }
}

#[test]
fn describes() {
    let v1 = fake(&[
        (&["memory"], Version::V1),
        (&["cpu"], Version::V1),
        (&["pids"], Version::V1),
    ]);
    assert_eq!(v1.describe(), "cgroup v1 (memory, cpu, pids)");
    let v2 = fake(&[(&["memory", "pids"], Version::V2)]);
    assert_eq!(v2.describe(), "cgroup v2 (memory, pids), no cpu");
    let mixed = fake(&[
        (&["memory"], Version::V1),
        (&["cpu"], Version::V1),
        (&["pids"], Version::V2),
    ]);
    assert_eq!(mixed.describe(), "memory v1, cpu v1, pids v2");
    assert_eq!(
        fake(&[]).describe(),
        "no cgroups, no memory, no cpu, no pids"
    );
    assert_eq!(
        mixed.controllers(),
        vec![
            ("memory", Version::V1),
            ("cpu", Version::V1),
            ("pids", Version::V2)
        ]
    );
}

#[test]
fn check_rejects_unavailable_controller() {
    let h = fake(&[(&["memory"], Version::V1), (&["pids"], Version::V1)]);
    let memory = Limits {
        memory_bytes: Some(1 << 30),
        pids: Some(10),
        ..Limits::default()
    };
    assert!(h.check(&memory).is_ok());
    let cpu = Limits {
        cpu_shares: Some(512),
        ..memory.clone()
    };
    let err = h.check(&cpu).unwrap_err();
    assert!(matches!(
        err,
        CgroupError::Unenforceable {
            limit: "cpu_shares",
            controller: "cpu"
        }
    ));
    assert_eq!(
        err.to_string(),
        "cpu_shares needs the cpu controller, which this host does not have"
    );
    // Nothing is created when check fails (the fake base does not exist).
    assert!(matches!(
        h.create("x", &cpu),
        Err(CgroupError::Unenforceable { .. })
    ));
    let all = fake(&[(&["memory", "cpu", "pids"], Version::V2)]);
    let bad_period = Limits {
        cpu_period_us: Some(10),
        ..Limits::default()
    };
    assert!(matches!(
        all.check(&bad_period),
        Err(CgroupError::Invalid { .. })
    ));
    let bad_quota = Limits {
        cpu_quota_us: Some(999),
        ..Limits::default()
    };
    assert!(matches!(
        all.check(&bad_quota),
        Err(CgroupError::Invalid {
            limit: "cpu_quota_us",
            ..
        })
    ));
    let unlimited = Limits {
        cpu_quota_us: Some(-1),
        cpu_period_us: Some(1_000_000),
        ..Limits::default()
    };
    assert!(all.check(&unlimited).is_ok());
}

// ---- on temporary directories standing in for cgroup mounts ----

fn mountinfo_line(fstype: &str, path: &Path, options: &str, super_options: &str) -> String {
    format!(
        "40 31 0:40 / {} {options} - {fstype} {fstype} {super_options}\n",
        path.display()
    )
}

#[test]
fn detects_v1_mounts() {
    let root = TmpDir::with_files("detect-v1", &[]);
    let (mempids, cpu) = (root.0.join("memory,pids"), root.0.join("cpu,cpuacct"));
    let readonly = root.0.join("ro-cpu");
    for dir in [&mempids, &cpu, &readonly] {
        fs::create_dir(dir).unwrap();
    }
    let text = mountinfo_line("cgroup", &readonly, "ro,relatime", "rw,cpu")
        + &mountinfo_line("cgroup", &mempids, "rw,relatime", "rw,memory,pids")
        + &mountinfo_line("cgroup", &cpu, "rw,relatime", "rw,cpu,cpuacct");
    let mounts = mountinfo::mounts(&text);
    let h = Hierarchy::from_mounts(&mounts, "inst").unwrap();
    assert_eq!(h.describe(), "cgroup v1 (memory, cpu, pids)");
    // Comounted controllers share one base.
    let bases: Vec<(&Path, &[&str])> = h
        .dirs
        .iter()
        .map(|d| (d.path.as_path(), d.controllers.as_slice()))
        .collect();
    let (mempids_base, cpu_base) = (mempids.join("mitosis/inst"), cpu.join("mitosis/inst"));
    assert_eq!(
        bases,
        vec![
            (mempids_base.as_path(), &["memory", "pids"][..]),
            (cpu_base.as_path(), &["cpu"][..])
        ]
    );
    assert!(mempids_base.is_dir() && cpu_base.is_dir());
    assert!(!readonly.join(TOP).exists());
    // Idempotent: a restarted daemon finds the same bases.
    let again = Hierarchy::from_mounts(&mounts, "inst").unwrap();
    assert_eq!(again.dirs.len(), 2);
    h.remove_base();
    assert!(!mempids_base.exists() && mempids.join(TOP).is_dir());
}

#[test]
fn v2_mount_that_cannot_enable_is_passed_over() {
    let root = TmpDir::with_files("detect-v2", &[]);
    let (unified, memory) = (root.0.join("unified"), root.0.join("memory"));
    fs::create_dir(&unified).unwrap();
    fs::create_dir(&memory).unwrap();
    fs::write(unified.join("cgroup.controllers"), "memory pids\n").unwrap();
    fs::write(unified.join("cgroup.subtree_control"), "").unwrap();
    let text = mountinfo_line("cgroup2", &unified, "rw", "rw")
        + &mountinfo_line("cgroup", &memory, "rw", "rw,memory");
    let h = Hierarchy::from_mounts(&mountinfo::mounts(&text), "inst").unwrap();
    // A real v2 root would now list pids in its children's subtree_control; a plain
    // directory does not, as when the kernel refuses to enable it.
    assert_eq!(h.describe(), "cgroup v1 (memory), no cpu, no pids");
    assert_eq!(read(&unified, "cgroup.subtree_control"), "+pids");
    assert!(unified.join("mitosis/inst").is_dir());
}

/// A hierarchy of one v1 base under `root`, serving `controllers`; its directory is made
/// on the first create.
fn tmp_hierarchy(root: &TmpDir, controllers: &[&'static str]) -> Hierarchy {
    Hierarchy {
        dirs: vec![BaseDir {
            version: Version::V1,
            path: root.0.join("mitosis/inst"),
            controllers: controllers.to_vec(),
        }],
    }
}

#[test]
fn failed_create_rolls_back() {
    let root = TmpDir::with_files("create", &[]);
    let h = tmp_hierarchy(&root, &["memory"]);
    let limits = Limits {
        memory_bytes: Some(1 << 20),
        ..Limits::default()
    };
    // A plain directory has no memory.limit_in_bytes, unlike a cgroup.
    let err = h.create("c", &limits).unwrap_err();
    let base = root.0.join("mitosis/inst");
    assert!(
        matches!(&err, CgroupError::Write { path, .. } if path == &base.join("c/memory.limit_in_bytes")),
        "{err}"
    );
    // Nor cgroup.procs.
    let err = h.create("d", &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, CgroupError::Open { path, .. } if path == &base.join("d/cgroup.procs")),
        "{err}"
    );
    assert!(base.is_dir(), "the base was not made again");
    assert!(h.names().is_empty());
    // One that exists is refused and left alone: it is not ours to remove.
    fs::create_dir(base.join("e")).unwrap();
    assert!(matches!(
        h.create("e", &Limits::default()),
        Err(CgroupError::Exists { .. })
    ));
    assert_eq!(h.names(), vec!["e"]);
    assert!(matches!(
        h.create("../e", &Limits::default()),
        Err(CgroupError::InvalidName(_))
    ));
}

/// A cgroup in each of `dirs` under `root`, each with an empty cgroup.procs.
fn tmp_cgroup(root: &TmpDir, dirs: &[(&str, Version, &[&'static str])]) -> Cgroup {
    let dirs = dirs
        .iter()
        .map(|(name, version, controllers)| {
            let path = root.0.join(name);
            fs::create_dir_all(&path).unwrap();
            fs::write(path.join("cgroup.procs"), "").unwrap();
            CgDir::open(*version, path, controllers.to_vec()).unwrap()
        })
        .collect();
    Cgroup {
        name: "c".into(),
        dirs,
    }
}

#[test]
fn add_writes_each_controller() {
    let root = TmpDir::with_files("add", &[]);
    let cg = tmp_cgroup(
        &root,
        &[
            ("memory/c", Version::V1, &["memory"]),
            ("unified/c", Version::V2, &["cpu", "pids"]),
        ],
    );
    cg.add(4_194_304).unwrap();
    assert_eq!(read(&root.0.join("memory/c"), "cgroup.procs"), "4194304");
    assert_eq!(read(&root.0.join("unified/c"), "cgroup.procs"), "4194304");
    for bad in [0, -1] {
        assert!(matches!(cg.add(bad), Err(CgroupError::InvalidPid(p)) if p == bad));
    }
    // Members are read from every controller and from nested cgroups.
    let nested = root.0.join("unified/c/n");
    fs::create_dir(&nested).unwrap();
    fs::write(nested.join("cgroup.procs"), "7\n12\n").unwrap();
    assert_eq!(cg.pids(), vec![7, 12, 4_194_304]);
}

#[test]
fn add_reports_the_failed_write() {
    let root = TmpDir::with_files("add-fail", &[]);
    let mut cg = tmp_cgroup(&root, &[("c", Version::V2, &["pids"])]);
    // As the kernel refuses a move (e.g. pids.max reached), /dev/full refuses every write.
    cg.dirs[0].procs = OpenOptions::new().write(true).open("/dev/full").unwrap();
    let err = cg.add(5).unwrap_err();
    assert!(
        matches!(&err, CgroupError::Write { path, value, .. }
            if path == &root.0.join("c/cgroup.procs") && value == "5"),
        "{err}"
    );
}

#[test]
fn reads_memory_limit_and_oom_kills() {
    let root = TmpDir::with_files("memory", &[]);
    let v1 = tmp_cgroup(&root, &[("v1", Version::V1, &["memory"])]);
    let v1_dir = root.0.join("v1");
    assert_eq!(v1.memory_limit(), None, "no file");
    assert_eq!(v1.oom_kills(), 0, "no file");
    fs::write(v1_dir.join(v1::MEMORY_LIMIT), "67108864\n").unwrap();
    fs::write(
        v1_dir.join(v1::OOM_COUNTERS),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .unwrap();
    assert_eq!(v1.memory_limit(), Some(64 << 20));
    assert_eq!(v1.oom_kills(), 3);
    // v1's "unlimited" with 4 KiB and 64 KiB pages.
    for unlimited in ["9223372036854771712\n", "9223372036854710272\n"] {
        fs::write(v1_dir.join(v1::MEMORY_LIMIT), unlimited).unwrap();
        assert_eq!(v1.memory_limit(), None, "{unlimited}");
    }

    let v2 = tmp_cgroup(&root, &[("v2", Version::V2, &["memory", "pids"])]);
    let v2_dir = root.0.join("v2");
    fs::write(v2_dir.join(v2::MEMORY_LIMIT), "max\n").unwrap();
    fs::write(
        v2_dir.join(v2::OOM_COUNTERS),
        "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
    )
    .unwrap();
    assert_eq!(v2.memory_limit(), None);
    assert_eq!(v2.oom_kills(), 1);
    fs::write(v2_dir.join(v2::MEMORY_LIMIT), "1048576\n").unwrap();
    assert_eq!(v2.memory_limit(), Some(1 << 20));

    let no_memory = tmp_cgroup(&root, &[("cpu", Version::V1, &["cpu"])]);
    fs::write(root.0.join("cpu").join(v1::MEMORY_LIMIT), "4096\n").unwrap();
    assert_eq!(no_memory.memory_limit(), None);
    assert_eq!(no_memory.oom_kills(), 0);
}

#[test]
fn destroy_and_leftovers_remove_nested_dirs() {
    let root = TmpDir::with_files("destroy", &[]);
    let cg = tmp_cgroup(&root, &[("a/c", Version::V1, &["memory"])]);
    // A kernel's cgroup directory can be removed with its files; a plain one cannot.
    fs::remove_file(root.0.join("a/c/cgroup.procs")).unwrap();
    fs::create_dir_all(root.0.join("a/c/n1/n2")).unwrap();
    cg.destroy().unwrap();
    assert!(!root.0.join("a/c").exists());

    let h = tmp_hierarchy(&root, &["pids"]);
    let base = root.0.join("mitosis/inst");
    fs::create_dir_all(base.join("l1")).unwrap();
    fs::create_dir_all(base.join("l2/nested")).unwrap();
    assert_eq!(h.names(), vec!["l1", "l2"]);
    assert_eq!(h.remove_leftovers().unwrap(), 2);
    assert!(h.names().is_empty());
    // rmdir's other errors are reported, not waited out.
    fs::create_dir_all(base.join("l3")).unwrap();
    fs::write(base.join("l3/junk"), "").unwrap();
    assert!(matches!(
        h.remove_leftovers(),
        Err(CgroupError::Remove { path, .. }) if path == base.join("l3")
    ));
}

#[test]
fn lowers_the_memory_limit_never_raises_it() {
    let root = TmpDir::with_files("lower", &[]);
    let v2 = tmp_cgroup(&root, &[("v2", Version::V2, &["memory"])]);
    let limit = root.0.join("v2").join(v2::MEMORY_LIMIT);
    fs::write(&limit, "max\n").unwrap();
    v2.lower_memory_limit(64 << 20).unwrap();
    assert_eq!(fs::read_to_string(&limit).unwrap(), "67108864");
    // 256 MiB is above 64 MiB: left as it is.
    v2.lower_memory_limit(256 << 20).unwrap();
    assert_eq!(fs::read_to_string(&limit).unwrap(), "67108864");

    let v1 = tmp_cgroup(&root, &[("v1", Version::V1, &["memory"])]);
    let v1_dir = root.0.join("v1");
    // Written in place as the kernel's files are: the longer old value's tail stays here.
    fs::write(v1_dir.join(v1::MEMORY_LIMIT), "268435456").unwrap();
    fs::write(v1_dir.join("memory.memsw.limit_in_bytes"), "268435456").unwrap();
    v1.lower_memory_limit(32 << 20).unwrap();
    for file in [v1::MEMORY_LIMIT, "memory.memsw.limit_in_bytes"] {
        let text = fs::read_to_string(v1_dir.join(file)).unwrap();
        assert!(text.starts_with("33554432"), "{file}: {text}");
    }

    let no_memory = tmp_cgroup(&root, &[("cpu", Version::V1, &["cpu"])]);
    assert!(matches!(
        no_memory.lower_memory_limit(1 << 20),
        Err(CgroupError::Unenforceable { .. })
    ));
}
