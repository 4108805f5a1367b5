//! cgroup v1: a hierarchy per controller (or a few comounted), each with its own files.

use std::path::Path;

use super::common::{CgroupError, DEFAULT_PERIOD_US, Limits, write_file, write_pids};

/// The memory limit the kernel enforces, in bytes.
pub(super) const MEMORY_LIMIT: &str = "memory.limit_in_bytes";
/// Holds the "oom_kill N" counter.
pub(super) const OOM_COUNTERS: &str = "memory.oom_control";
/// v1 reports "no limit" as `PAGE_COUNTER_MAX * PAGE_SIZE`, just under `i64::MAX` (how far
/// under depends on the page size); anything above this is unlimited.
pub(super) const UNLIMITED: u64 = i64::MAX as u64 - (1 << 20);

/// Writes the limits that the `controllers` of the v1 cgroup at `dir` enforce.
pub(super) fn write_limits(
    dir: &Path,
    controllers: &[&str],
    l: &Limits,
) -> Result<(), CgroupError> {
    if controllers.contains(&"memory")
        && let Some(bytes) = l.memory_bytes
    {
        let bytes = bytes.to_string();
        // memsw must stay >= the memory limit, so the memory limit goes first.
        write_file(&dir.join(MEMORY_LIMIT), &bytes)?;
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_file(&memsw, &bytes)?;
        }
    }
    if controllers.contains(&"cpu") {
        if l.cpu_quota_us.is_some() || l.cpu_period_us.is_some() {
            let period = l.cpu_period_us.unwrap_or(DEFAULT_PERIOD_US);
            write_file(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
            if let Some(q) = l.cpu_quota_us {
                let q = if q < 0 {
                    "-1".to_string()
                } else {
                    q.to_string()
                };
                write_file(&dir.join("cpu.cfs_quota_us"), &q)?;
            }
        }
        if let Some(shares) = l.cpu_shares {
            write_file(&dir.join("cpu.shares"), &shares.to_string())?;
        }
    }
    if controllers.contains(&"pids") {
        write_pids(dir, l)?;
    }
    Ok(())
}

/// Asks that children be accounted to `dir` (a directory just made under a v1 mount). Older
/// kernels do so only with use_hierarchy; newer ones always do and may refuse the write.
pub(super) fn use_hierarchy(dir: &Path) {
    let path = dir.join("memory.use_hierarchy");
    if path.exists() {
        let _ = write_file(&path, "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::test_util::{TmpDir, read};

    /// Every file the kernel would show in a v1 cgroup with all three controllers, empty.
    fn cgroup(memsw: bool) -> TmpDir {
        let mut files = vec![
            MEMORY_LIMIT,
            "cpu.cfs_period_us",
            "cpu.cfs_quota_us",
            "cpu.shares",
            "pids.max",
        ];
        if memsw {
            files.push("memory.memsw.limit_in_bytes");
        }
        TmpDir::with_files("v1", &files)
    }

    #[test]
    fn writes_all_limits() {
        let dir = cgroup(true);
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            cpu_period_us: None,
            cpu_shares: Some(512),
            pids: Some(64),
        };
        write_limits(&dir.0, &["memory", "cpu", "pids"], &limits).unwrap();
        assert_eq!(read(&dir.0, MEMORY_LIMIT), "67108864");
        assert_eq!(read(&dir.0, "memory.memsw.limit_in_bytes"), "67108864");
        assert_eq!(read(&dir.0, "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&dir.0, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&dir.0, "cpu.shares"), "512");
        assert_eq!(read(&dir.0, "pids.max"), "64");
    }

    #[test]
    fn writes_unlimited_and_skips_what_is_unset() {
        let dir = cgroup(false);
        let limits = Limits {
            cpu_quota_us: Some(-5),
            cpu_period_us: Some(20_000),
            pids: Some(-1),
            ..Limits::default()
        };
        write_limits(&dir.0, &["memory", "cpu", "pids"], &limits).unwrap();
        assert_eq!(read(&dir.0, "cpu.cfs_period_us"), "20000");
        assert_eq!(read(&dir.0, "cpu.cfs_quota_us"), "-1");
        assert_eq!(read(&dir.0, "pids.max"), "max");
        for untouched in [MEMORY_LIMIT, "cpu.shares"] {
            assert_eq!(read(&dir.0, untouched), "", "{untouched}");
        }
        // No memsw file (swap accounting off): not created.
        assert!(!dir.0.join("memory.memsw.limit_in_bytes").exists());
    }

    #[test]
    fn writes_only_its_controllers() {
        let dir = cgroup(true);
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            cpu_shares: Some(2),
            pids: Some(10),
            ..Limits::default()
        };
        write_limits(&dir.0, &["cpu"], &limits).unwrap();
        assert_eq!(read(&dir.0, "cpu.shares"), "2");
        assert_eq!(read(&dir.0, MEMORY_LIMIT), "");
        assert_eq!(read(&dir.0, "pids.max"), "");
    }

    #[test]
    fn missing_file_is_an_error() {
        let dir = TmpDir::with_files("v1-missing", &[]);
        let limits = Limits {
            pids: Some(10),
            ..Limits::default()
        };
        let err = write_limits(&dir.0, &["pids"], &limits).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Write { path, value, .. }
                if path == &dir.0.join("pids.max") && value == "10"),
            "{err}"
        );
        assert!(
            !dir.0.join("pids.max").exists(),
            "a kernel file was created"
        );
    }

    #[test]
    fn sets_use_hierarchy_if_present() {
        let with = TmpDir::with_files("v1-hier", &["memory.use_hierarchy"]);
        use_hierarchy(&with.0);
        assert_eq!(read(&with.0, "memory.use_hierarchy"), "1");
        let without = TmpDir::with_files("v1-nohier", &[]);
        use_hierarchy(&without.0);
        assert!(!without.0.join("memory.use_hierarchy").exists());
    }
}
