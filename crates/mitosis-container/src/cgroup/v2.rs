//! cgroup v2: one tree, where a cgroup gets only the controllers its parent enables for its
//! children.

use std::fs;
use std::path::Path;

use super::common::{CONTROLLERS, CgroupError, DEFAULT_PERIOD_US, Limits, write_file, write_pids};

/// The memory limit, in bytes or "max".
pub(super) const MEMORY_LIMIT: &str = "memory.max";
/// Holds the "oom_kill N" counter.
pub(super) const OOM_COUNTERS: &str = "memory.events";
const SUBTREE_CONTROL: &str = "cgroup.subtree_control";

/// Writes the limits that the `controllers` of the v2 cgroup at `dir` enforce.
pub(super) fn write_limits(
    dir: &Path,
    controllers: &[&str],
    l: &Limits,
) -> Result<(), CgroupError> {
    if controllers.contains(&"memory")
        && let Some(bytes) = l.memory_bytes
    {
        write_file(&dir.join(MEMORY_LIMIT), &bytes.to_string())?;
        // No swapping around the limit (v1 gets the same from memsw).
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
    }
    if controllers.contains(&"cpu") {
        if l.cpu_quota_us.is_some() || l.cpu_period_us.is_some() {
            let period = l.cpu_period_us.unwrap_or(DEFAULT_PERIOD_US);
            let quota = match l.cpu_quota_us {
                Some(q) if q >= 0 => q.to_string(),
                _ => "max".to_string(),
            };
            write_file(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
        }
        if let Some(shares) = l.cpu_shares {
            write_file(
                &dir.join("cpu.weight"),
                &shares_to_weight(shares).to_string(),
            )?;
        }
    }
    if controllers.contains(&"pids") {
        write_pids(dir, l)?;
    }
    Ok(())
}

/// Asks `dir` to enable `controller` for its children. Errors are left to
/// [`enabled`] to notice: the write is refused e.g. where the controller is missing.
pub(super) fn enable(dir: &Path, controller: &str) {
    let _ = write_file(&dir.join(SUBTREE_CONTROL), &format!("+{controller}"));
}

/// Whether `dir` enables `controller` for its children.
pub(super) fn enabled(dir: &Path, controller: &str) -> bool {
    let text = fs::read_to_string(dir.join(SUBTREE_CONTROL)).unwrap_or_default();
    parse_controllers(&text).contains(&controller)
}

/// SIGKILLs the whole subtree at `dir` at once, including processes forking right now, where
/// the kernel has cgroup.kill (5.14+). Best effort: the caller kills pid by pid anyway.
pub(super) fn kill(dir: &Path) {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists()
        && let Err(e) = write_file(&kill_file, "1")
    {
        tracing::debug!(err = %e, "cgroup.kill");
    }
}

/// The controllers we use among those listed in a cgroup.controllers or cgroup.subtree_control.
pub(super) fn parse_controllers(text: &str) -> Vec<&'static str> {
    CONTROLLERS
        .into_iter()
        .filter(|c| text.split_whitespace().any(|w| w == *c))
        .collect()
}

/// v1 cpu.shares (2..=262144) to v2 cpu.weight (1..=10000), as runc converts it.
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::test_util::{TmpDir, read};

    /// Every file the kernel would show in a v2 cgroup with all three controllers, empty.
    fn cgroup(swap: bool) -> TmpDir {
        let mut files = vec![MEMORY_LIMIT, "cpu.max", "cpu.weight", "pids.max"];
        if swap {
            files.push("memory.swap.max");
        }
        TmpDir::with_files("v2", &files)
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
        assert_eq!(read(&dir.0, "memory.swap.max"), "0");
        assert_eq!(read(&dir.0, "cpu.max"), "50000 100000");
        assert_eq!(read(&dir.0, "cpu.weight"), "20");
        assert_eq!(read(&dir.0, "pids.max"), "64");
    }

    #[test]
    fn writes_unlimited_and_skips_what_is_unset() {
        let dir = cgroup(false);
        let limits = Limits {
            cpu_period_us: Some(20_000),
            pids: Some(-1),
            ..Limits::default()
        };
        write_limits(&dir.0, &["memory", "cpu", "pids"], &limits).unwrap();
        assert_eq!(read(&dir.0, "cpu.max"), "max 20000");
        assert_eq!(read(&dir.0, "pids.max"), "max");
        for untouched in [MEMORY_LIMIT, "cpu.weight"] {
            assert_eq!(read(&dir.0, untouched), "", "{untouched}");
        }
        let negative = Limits {
            cpu_quota_us: Some(-1),
            ..Limits::default()
        };
        write_limits(&dir.0, &["cpu"], &negative).unwrap();
        assert_eq!(read(&dir.0, "cpu.max"), "max 100000");
        assert!(!dir.0.join("memory.swap.max").exists());
    }

    #[test]
    fn writes_only_its_controllers() {
        let dir = cgroup(true);
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            cpu_shares: Some(1024),
            pids: Some(10),
            ..Limits::default()
        };
        write_limits(&dir.0, &["memory", "pids"], &limits).unwrap();
        assert_eq!(read(&dir.0, MEMORY_LIMIT), "1073741824");
        assert_eq!(read(&dir.0, "pids.max"), "10");
        assert_eq!(read(&dir.0, "cpu.weight"), "");
    }

    #[test]
    fn missing_file_is_an_error() {
        let dir = TmpDir::with_files("v2-missing", &[]);
        let limits = Limits {
            cpu_shares: Some(100),
            ..Limits::default()
        };
        let err = write_limits(&dir.0, &["cpu"], &limits).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Write { path, value, .. }
                if path == &dir.0.join("cpu.weight") && value == "4"),
            "{err}"
        );
    }

    #[test]
    fn enables_and_kills_through_files() {
        let dir = TmpDir::with_files("v2-files", &[SUBTREE_CONTROL, "cgroup.kill"]);
        enable(&dir.0, "pids");
        assert_eq!(read(&dir.0, SUBTREE_CONTROL), "+pids");
        // The kernel would now list "pids"; a plain file keeps what was written.
        assert!(!enabled(&dir.0, "pids"));
        fs::write(dir.0.join(SUBTREE_CONTROL), "cpu pids\n").unwrap();
        assert!(enabled(&dir.0, "pids"));
        assert!(!enabled(&dir.0, "memory"));
        kill(&dir.0);
        assert_eq!(read(&dir.0, "cgroup.kill"), "1");
        // Before 5.14 there is no cgroup.kill; nothing is created then.
        let old = TmpDir::with_files("v2-old", &[]);
        enable(&old.0, "cpu");
        kill(&old.0);
        assert!(!enabled(&old.0, "cpu"));
        assert!(fs::read_dir(&old.0).unwrap().next().is_none());
    }

    #[test]
    fn parses_controllers() {
        let all = "cpuset cpu io memory hugetlb pids rdma misc\n";
        assert_eq!(parse_controllers(all), vec!["memory", "cpu", "pids"]);
        assert_eq!(parse_controllers("cpuset io\n"), Vec::<&str>::new());
        assert_eq!(parse_controllers(""), Vec::<&str>::new());
        // Only whole words: "+memory" is what we write, not what the kernel lists.
        assert_eq!(parse_controllers("+memory cpuacct"), Vec::<&str>::new());
    }

    #[test]
    fn shares_to_weight_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }
}
