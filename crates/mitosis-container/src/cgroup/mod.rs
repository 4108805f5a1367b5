//! Cgroups for lean containers, on cgroup v1, v2, or a mix of both.
//!
//! Each controller we use (memory, cpu, pids) comes from a writable v1 mount that carries it if
//! there is one, else from the v2 mount whose `cgroup.controllers` lists it: hybrid hosts often
//! mount a v2 tree that has none of them. A daemon instance keeps its cgroups under
//! `<mount>/mitosis/<instance>` in every mount it uses, so a restarted daemon finds (and removes)
//! what its crashed predecessor left, and other instances' cgroups are never touched.
//!
//! [`mountinfo`] finds the mounts, [`v1`] and [`v2`] hold what differs between the versions
//! (file names, value formats, enabling controllers), and [`common`] the rest.

mod common;
mod mountinfo;
mod v1;
mod v2;

pub use common::{Cgroup, CgroupError, Hierarchy, Limits, Version};

/// Temporary directories standing in for cgroup directories, for tests without root.
#[cfg(test)]
mod test_util {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the temporary directory, removed on drop.
    pub(super) struct TmpDir(pub(super) PathBuf);

    impl TmpDir {
        /// With an empty file for each of `files`, as the kernel shows a cgroup's files.
        pub(super) fn with_files(tag: &str, files: &[&str]) -> TmpDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("mitosis-cgroup-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            for file in files {
                fs::write(dir.join(file), "").unwrap();
            }
            TmpDir(dir)
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The trimmed text of `dir/file`.
    pub(super) fn read(dir: &Path, file: &str) -> String {
        let path = dir.join(file);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }
}

/// Against the host's real cgroups: these need root.
#[cfg(test)]
mod tests {
    use super::common::{BaseDir, TOP};
    use super::mountinfo::{self, MOUNTINFO};
    use super::*;
    use std::fs;
    use std::io::Write as _;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Says why a test does not run, or runs only in part. Straight to stderr: the harness
    /// keeps what a passing test prints with eprintln!, which would make a skip look like a pass.
    fn skip(why: &str) {
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    }

    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            skip("needs root");
        }
        root
    }

    fn instance() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Removes everything the test made, even when it fails half way.
    struct Guard(Hierarchy);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.remove_leftovers();
            self.0.remove_base();
        }
    }

    /// Kills and reaps its process whatever happens.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper() -> Child {
        Child(
            Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    fn detect() -> Guard {
        Guard(Hierarchy::detect(&instance()).expect("detect"))
    }

    #[test]
    fn creates_with_limits() {
        if !root() {
            return;
        }
        let h = detect();
        for c in ["memory", "cpu", "pids"] {
            if h.0.version_of(c).is_none() {
                skip(&format!("in part: no {c} controller ({})", h.0.describe()));
            }
        }
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            cpu_period_us: None,
            cpu_shares: Some(512),
            pids: Some(64),
        };
        let limits = Limits {
            memory_bytes: limits
                .memory_bytes
                .filter(|_| h.0.version_of("memory").is_some()),
            cpu_quota_us: limits
                .cpu_quota_us
                .filter(|_| h.0.version_of("cpu").is_some()),
            cpu_shares: limits
                .cpu_shares
                .filter(|_| h.0.version_of("cpu").is_some()),
            pids: limits.pids.filter(|_| h.0.version_of("pids").is_some()),
            ..limits
        };
        let cg = h.0.create("c", &limits).expect("create");
        assert_eq!(cg.name(), "c");
        assert_eq!(h.0.names(), vec!["c"]);
        assert!(matches!(
            h.0.create("c", &limits),
            Err(CgroupError::Exists { .. })
        ));
        for d in &cg.dirs {
            let p = &d.path;
            let has = |c| d.controllers.contains(&c);
            match d.version {
                Version::V1 => {
                    if has("memory") {
                        assert_eq!(read(&p.join("memory.limit_in_bytes")), "67108864");
                        let memsw = p.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            assert_eq!(read(&memsw), "67108864");
                        }
                    }
                    if has("cpu") {
                        assert_eq!(read(&p.join("cpu.cfs_quota_us")), "50000");
                        assert_eq!(read(&p.join("cpu.cfs_period_us")), "100000");
                        assert_eq!(read(&p.join("cpu.shares")), "512");
                    }
                }
                Version::V2 => {
                    if has("memory") {
                        assert_eq!(read(&p.join("memory.max")), "67108864");
                    }
                    if has("cpu") {
                        assert_eq!(read(&p.join("cpu.max")), "50000 100000");
                        assert_eq!(read(&p.join("cpu.weight")), "20");
                    }
                }
            }
            if has("pids") {
                assert_eq!(read(&p.join("pids.max")), "64");
            }
        }
        if h.0.version_of("memory").is_some() {
            assert_eq!(cg.memory_limit(), Some(64 << 20));
            assert_eq!(cg.oom_kills(), 0);
        }
        let unlimited = h.0.create("u", &Limits::default()).expect("create u");
        assert_eq!(unlimited.memory_limit(), None);
        let paths: Vec<PathBuf> = cg.dirs.iter().map(|d| d.path.clone()).collect();
        cg.destroy().expect("destroy");
        unlimited.destroy().expect("destroy u");
        assert!(paths.iter().all(|p| !p.exists()));
        assert!(h.0.names().is_empty());
        h.0.remove_base();
        assert!(h.0.dirs.iter().all(|d| !d.path.exists()));
    }

    #[test]
    fn failed_create_rolls_back() {
        if !root() {
            return;
        }
        let h = detect();
        if h.0.version_of("pids").is_none() {
            skip("no pids controller");
            return;
        }
        // A bogus value only the kernel rejects, in the last controller written.
        let limits = Limits {
            pids: Some(i64::MAX),
            ..Limits::default()
        };
        let err = h.0.create("r", &limits).unwrap_err();
        assert!(matches!(err, CgroupError::Write { .. }), "{err}");
        assert!(h.0.names().is_empty());
    }

    #[test]
    fn add_lists_and_destroy_kills() {
        if !root() {
            return;
        }
        let h = detect();
        let cg = h.0.create("a", &Limits::default()).expect("create");
        let mut child = sleeper();
        let pid = child.0.id() as i32;
        cg.add(pid).expect("add");
        assert_eq!(cg.pids(), vec![pid]);
        assert!(matches!(cg.add(0), Err(CgroupError::InvalidPid(0))));
        let paths: Vec<PathBuf> = cg.dirs.iter().map(|d| d.path.clone()).collect();
        cg.destroy().expect("destroy");
        assert!(paths.iter().all(|p| !p.exists()));
        let status = child.0.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn removes_leftovers() {
        if !root() {
            return;
        }
        let name = instance();
        let h = Guard(Hierarchy::detect(&name).expect("detect"));
        let cg = h.0.create("left", &Limits::default()).expect("create");
        let mut child = sleeper();
        cg.add(child.0.id() as i32).expect("add");
        drop(cg); // the daemon "crashes"
        let again = Hierarchy::detect(&name).expect("detect again");
        assert_eq!(again.names(), vec!["left"]);
        assert_eq!(again.remove_leftovers().expect("remove"), 1);
        assert!(again.names().is_empty());
        let status = child.0.wait().expect("wait");
        assert!(!status.success());
        again.remove_base();
    }

    #[test]
    fn counts_oom_kills() {
        if !root() {
            return;
        }
        let h = detect();
        if h.0.version_of("memory").is_none() {
            skip("no memory controller");
            return;
        }
        let limits = Limits {
            memory_bytes: Some(32 << 20),
            ..Limits::default()
        };
        let cg = h.0.create("oom", &limits).expect("create");
        // Waits on stdin so that it is in the cgroup before it allocates; tail keeps all of a
        // newline-free input, so it needs 300 MiB.
        let mut child = Child(
            Command::new("sh")
                .args(["-c", "read x; head -c 300M /dev/zero | tail"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sh"),
        );
        cg.add(child.0.id() as i32).expect("add");
        let mut stdin = child.0.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("write stdin");
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "not killed within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success());
        assert!(cg.oom_kills() >= 1, "oom_kills = {}", cg.oom_kills());
        cg.destroy().expect("destroy");
    }

    /// The v2 paths (subtree_control, cgroup.kill) on whatever v2 mount this host has, even one
    /// without our controllers, as on hybrid hosts.
    #[test]
    fn v2_add_and_destroy() {
        if !root() {
            return;
        }
        let text = fs::read_to_string(MOUNTINFO).expect("read mountinfo");
        let Some(mount) = mountinfo::parse(&text)
            .into_iter()
            .find(|m| m.version == Version::V2 && m.writable)
        else {
            skip("no cgroup v2 mount");
            return;
        };
        let base = mount.path.join(TOP).join(instance());
        fs::create_dir_all(&base).expect("mkdir base");
        let h = Guard(Hierarchy {
            dirs: vec![BaseDir {
                version: Version::V2,
                path: base.clone(),
                controllers: Vec::new(),
            }],
        });
        let cg = h.0.create("k", &Limits::default()).expect("create");
        let mut child = sleeper();
        let pid = child.0.id() as i32;
        cg.add(pid).expect("add");
        assert_eq!(cg.pids(), vec![pid]);
        assert_eq!(cg.oom_kills(), 0);
        cg.destroy().expect("destroy");
        assert!(!base.join("k").exists());
        assert!(!child.0.wait().expect("wait").success());
        h.0.remove_base();
        assert!(!base.exists());
    }
}
