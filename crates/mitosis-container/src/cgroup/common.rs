//! The parts that don't depend on the cgroup version: errors, the limits model, which version
//! serves which controller ([`Hierarchy`]), and moving processes in and out of a [`Cgroup`].

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{mountinfo, v1, v2};

/// The controllers containers' limits need, in the order they are reported.
pub(super) const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// Directory under each mount that holds all instances' bases.
pub(super) const TOP: &str = "mitosis";
/// CFS period the kernel uses by default; used when only a quota is given.
pub(super) const DEFAULT_PERIOD_US: u64 = 100_000;
/// How long `destroy` waits for killed members to leave.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const DRAIN_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {0:?}")]
    InvalidName(String),
    #[error("invalid pid {0}")]
    InvalidPid(i32),
    #[error("{limit} needs the {controller} controller, which this host does not have")]
    Unenforceable {
        limit: &'static str,
        controller: &'static str,
    },
    #[error("{limit} = {value} is out of range: {why}")]
    Invalid {
        limit: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("creating {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cgroup {} already exists", path.display())]
    Exists { path: PathBuf },
    #[error("opening {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("writing {value} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("removing {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("{} still has processes after {}s", path.display(), DRAIN_TIMEOUT.as_secs())]
    Busy { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// Resource limits of one container; `None` leaves the kernel's default (unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// v1 `memory.limit_in_bytes` and, when present, `memory.memsw.limit_in_bytes` (so swap can't
    /// be used to exceed it); v2 `memory.max` and, when present, `memory.swap.max = 0`.
    pub memory_bytes: Option<u64>,
    /// CFS quota per period; negative means unlimited.
    pub cpu_quota_us: Option<i64>,
    /// CFS period; 100000 when only the quota is given.
    pub cpu_period_us: Option<u64>,
    /// v1 `cpu.shares`; v2 `cpu.weight` converted as runc does.
    pub cpu_shares: Option<u64>,
    /// `pids.max`; negative means unlimited.
    pub pids: Option<i64>,
}

/// One base directory `<mount>/mitosis/<instance>` and the controllers we use from it (a v2 base,
/// or a v1 mount with several controllers comounted, serves more than one).
#[derive(Debug)]
pub(super) struct BaseDir {
    pub(super) version: Version,
    pub(super) path: PathBuf,
    pub(super) controllers: Vec<&'static str>,
}

/// Where this daemon instance keeps its cgroups: for every controller in use, `<mount>/mitosis/<instance>`.
#[derive(Debug)]
pub struct Hierarchy {
    pub(super) dirs: Vec<BaseDir>,
}

impl Hierarchy {
    /// Detects controllers and creates the instance's base directories (idempotent). `instance` is a
    /// file-name-safe string chosen by the daemon (unique per daemon; the same after a restart).
    pub fn detect(instance: &str) -> Result<Hierarchy, CgroupError> {
        check_name(instance)?;
        Hierarchy::from_mounts(&mountinfo::read()?, instance)
    }

    /// [`Hierarchy::detect`] among `mounts`.
    pub(super) fn from_mounts(
        mounts: &[mountinfo::CgMount],
        instance: &str,
    ) -> Result<Hierarchy, CgroupError> {
        let mut dirs: Vec<BaseDir> = Vec::new();
        for controller in CONTROLLERS {
            for (version, mount) in mountinfo::candidates(mounts, controller) {
                let Some(path) = prepare_base(version, mount, instance, controller)? else {
                    continue;
                };
                match dirs.iter_mut().find(|d| d.path == path) {
                    Some(d) => d.controllers.push(controller),
                    None => dirs.push(BaseDir {
                        version,
                        path,
                        controllers: vec![controller],
                    }),
                }
                break;
            }
        }
        let h = Hierarchy { dirs };
        tracing::debug!(instance, cgroups = %h.describe(), "cgroup hierarchy");
        Ok(h)
    }

    /// One line for status, e.g. "cgroup v1 (memory, cpu, pids)", "memory v1, cpu v1, pids v2",
    /// or "cgroup v2 (memory, pids), no cpu".
    pub fn describe(&self) -> String {
        let used = self.controllers();
        let missing: Vec<String> = CONTROLLERS
            .iter()
            .filter(|c| !used.iter().any(|(u, _)| u == *c))
            .map(|c| format!("no {c}"))
            .collect();
        let mut parts = Vec::new();
        match used.first() {
            None => parts.push("no cgroups".to_string()),
            Some((_, v)) if used.iter().all(|(_, u)| u == v) => {
                let names: Vec<&str> = used.iter().map(|(c, _)| *c).collect();
                parts.push(format!("cgroup {v} ({})", names.join(", ")));
            }
            Some(_) => parts.extend(used.iter().map(|(c, v)| format!("{c} {v}"))),
        }
        parts.extend(missing);
        parts.join(", ")
    }

    /// Every controller used and its version.
    pub fn controllers(&self) -> Vec<(&'static str, Version)> {
        CONTROLLERS
            .iter()
            .filter_map(|c| self.version_of(c).map(|v| (*c, v)))
            .collect()
    }

    pub(super) fn version_of(&self, controller: &str) -> Option<Version> {
        self.dirs
            .iter()
            .find(|d| d.controllers.contains(&controller))
            .map(|d| d.version)
    }

    /// Errors if `limits` sets something no available controller can enforce (before anything is
    /// created), or a value the kernel would reject.
    pub fn check(&self, limits: &Limits) -> Result<(), CgroupError> {
        let wanted = [
            ("memory_bytes", limits.memory_bytes.is_some(), "memory"),
            ("cpu_quota_us", limits.cpu_quota_us.is_some(), "cpu"),
            ("cpu_period_us", limits.cpu_period_us.is_some(), "cpu"),
            ("cpu_shares", limits.cpu_shares.is_some(), "cpu"),
            ("pids", limits.pids.is_some(), "pids"),
        ];
        for (limit, set, controller) in wanted {
            if set && self.version_of(controller).is_none() {
                return Err(CgroupError::Unenforceable { limit, controller });
            }
        }
        if let Some(p) = limits.cpu_period_us
            && !(1_000..=1_000_000).contains(&p)
        {
            return Err(CgroupError::Invalid {
                limit: "cpu_period_us",
                value: p.to_string(),
                why: "must be 1000..=1000000",
            });
        }
        if let Some(q) = limits.cpu_quota_us
            && (0..1_000).contains(&q)
        {
            return Err(CgroupError::Invalid {
                limit: "cpu_quota_us",
                value: q.to_string(),
                why: "must be at least 1000, or negative for no limit",
            });
        }
        Ok(())
    }

    /// Creates cgroup `name` (a single path component) under the base in every available controller
    /// and writes `limits`. On any failure removes what it created and returns the error.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        check_name(name)?;
        self.check(limits)?;
        let mut created = Vec::new();
        match self.create_dirs(name, limits, &mut created) {
            Ok(dirs) => Ok(Cgroup {
                name: name.to_string(),
                dirs,
            }),
            Err(e) => {
                // Nothing has joined yet, so plain rmdir undoes it.
                for path in created.iter().rev() {
                    if let Err(err) = fs::remove_dir(path) {
                        tracing::warn!(path = %path.display(), %err, "cgroup rollback");
                    }
                }
                Err(e)
            }
        }
    }

    fn create_dirs(
        &self,
        name: &str,
        limits: &Limits,
        created: &mut Vec<PathBuf>,
    ) -> Result<Vec<CgDir>, CgroupError> {
        let mut dirs = Vec::with_capacity(self.dirs.len());
        self.ensure_base()?;
        for base in &self.dirs {
            let path = base.path.join(name);
            // mkdir, not create_dir_all: EEXIST is how a second create of one name is refused.
            match fs::create_dir(&path) {
                Ok(()) => created.push(path.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(CgroupError::Exists { path });
                }
                Err(source) => return Err(CgroupError::Create { path, source }),
            }
            write_limits(&path, base.version, &base.controllers, limits)?;
            dirs.push(CgDir::open(base.version, path, base.controllers.clone())?);
        }
        Ok(dirs)
    }

    /// The names of the cgroups now under the base (sorted).
    pub fn names(&self) -> Vec<String> {
        let mut names = BTreeSet::new();
        for base in &self.dirs {
            let Ok(entries) = fs::read_dir(&base.path) else {
                continue;
            };
            for entry in entries.flatten() {
                // The base also holds the controllers' files; cgroups are its directories.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names.into_iter().collect()
    }

    /// Kills every process in every cgroup under the base and removes those cgroups: what a crashed
    /// daemon with the same instance left. Returns how many cgroups it removed.
    pub fn remove_leftovers(&self) -> Result<usize, CgroupError> {
        let mut removed = 0;
        let mut first_err = None;
        for name in self.names() {
            let paths: Vec<(PathBuf, Version)> = self
                .dirs
                .iter()
                .map(|d| (d.path.join(&name), d.version))
                .collect();
            match remove_cgroup(&paths) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(cgroup = name, err = %e, "leftover cgroup");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(removed),
            Some(e) => Err(e),
        }
    }

    /// Makes the base directories again if [`Hierarchy::remove_base`] removed them: a daemon
    /// keeps no cgroup directory while it has no container.
    fn ensure_base(&self) -> Result<(), CgroupError> {
        for base in self.dirs.iter().filter(|b| !b.path.is_dir()) {
            let (Some(top), Some(instance)) = (base.path.parent(), base.path.file_name()) else {
                continue;
            };
            let Some(mount) = top.parent() else { continue };
            for controller in &base.controllers {
                prepare_base(base.version, mount, &instance.to_string_lossy(), controller)?;
            }
        }
        Ok(())
    }

    /// Removes the instance's base directories if empty (daemon shutdown). Best effort. The shared
    /// `mitosis` directory stays: other instances may be using it.
    pub fn remove_base(&self) {
        for base in &self.dirs {
            if let Err(err) = fs::remove_dir(&base.path) {
                tracing::debug!(path = %base.path.display(), %err, "cgroup base not removed");
            }
        }
    }
}

/// The cgroup in one base directory, with its `cgroup.procs` held open for `add`.
#[derive(Debug)]
pub(super) struct CgDir {
    pub(super) version: Version,
    pub(super) path: PathBuf,
    pub(super) controllers: Vec<&'static str>,
    procs: File,
}

impl CgDir {
    fn open(
        version: Version,
        path: PathBuf,
        controllers: Vec<&'static str>,
    ) -> Result<CgDir, CgroupError> {
        let procs_path = path.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| CgroupError::Open {
                path: procs_path,
                source,
            })?;
        Ok(CgDir {
            version,
            path,
            controllers,
            procs,
        })
    }
}

/// One container's cgroup, in each controller. Dropping it does NOT remove it (call destroy).
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    pub(super) dirs: Vec<CgDir>,
}

impl Cgroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves `pid` into the cgroup in every controller: one write(2) per controller to the
    /// `cgroup.procs` opened at create, as this is on the hot path.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        // "0" would move the writer, i.e. the daemon itself.
        if pid <= 0 {
            return Err(CgroupError::InvalidPid(pid));
        }
        let mut buf = [0u8; 12];
        let text = format_pid(pid, &mut buf);
        for d in &self.dirs {
            match d.procs.write_at(text, 0) {
                Ok(n) if n == text.len() => {}
                res => {
                    let source = res.err().unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                    return Err(CgroupError::Write {
                        path: d.path.join("cgroup.procs"),
                        value: pid.to_string(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// OOM kills so far (v1: "oom_kill N" of memory.oom_control; v2: of memory.events). 0 if no
    /// memory controller.
    pub fn oom_kills(&self) -> u64 {
        let Some(d) = self.memory_dir() else {
            return 0;
        };
        let file = match d.version {
            Version::V1 => v1::OOM_COUNTERS,
            Version::V2 => v2::OOM_COUNTERS,
        };
        fs::read_to_string(d.path.join(file))
            .ok()
            .and_then(|t| parse_counter(&t, "oom_kill"))
            .unwrap_or(0)
    }

    /// The memory limit the kernel enforces (v1 rounds it down to whole pages); `None` if unlimited
    /// or no memory controller.
    pub fn memory_limit(&self) -> Option<u64> {
        let d = self.memory_dir()?;
        let file = match d.version {
            Version::V1 => v1::MEMORY_LIMIT,
            Version::V2 => v2::MEMORY_LIMIT,
        };
        let text = fs::read_to_string(d.path.join(file)).ok()?;
        let value: u64 = text.trim().parse().ok()?; // v2 "max" fails here: unlimited
        (value < v1::UNLIMITED).then_some(value)
    }

    /// Lowers the memory limit to `bytes` (a function's own limit, below its bundle's);
    /// a limit already at or below it stays. Without a memory controller, nothing to lower:
    /// an error, as the caller asked for a limit that would not hold.
    pub fn lower_memory_limit(&self, bytes: u64) -> Result<(), CgroupError> {
        let d = self.memory_dir().ok_or(CgroupError::Unenforceable {
            limit: "a memory limit",
            controller: "memory",
        })?;
        if self.memory_limit().is_some_and(|now| now <= bytes) {
            return Ok(());
        }
        let limits = Limits {
            memory_bytes: Some(bytes),
            ..Limits::default()
        };
        write_limits(&d.path, d.version, &["memory"], &limits)
    }

    fn memory_dir(&self) -> Option<&CgDir> {
        self.dirs.iter().find(|d| d.controllers.contains(&"memory"))
    }

    /// Process ids now in the cgroup (union over controllers, including nested cgroups).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = BTreeSet::new();
        for d in &self.dirs {
            tree_procs(&d.path, &mut pids);
        }
        pids.into_iter().collect()
    }

    /// SIGKILLs every member (v2: via cgroup.kill if present), waits up to 2 s for it to empty,
    /// then rmdirs it in each controller.
    pub fn destroy(self) -> Result<(), CgroupError> {
        let paths: Vec<(PathBuf, Version)> =
            self.dirs.into_iter().map(|d| (d.path, d.version)).collect();
        remove_cgroup(&paths)
    }
}

/// Kills everything in the cgroups at `paths` (and nested ones) and removes them. Paths already
/// gone are fine: a leftover may exist in only some controllers.
fn remove_cgroup(paths: &[(PathBuf, Version)]) -> Result<(), CgroupError> {
    for (path, version) in paths {
        // If this fails the per-pid loop below still does the job.
        if *version == Version::V2 {
            v2::kill(path);
        }
    }
    let me = std::process::id() as i32;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let mut busy = None;
        for (path, _) in paths {
            if !path.exists() {
                continue;
            }
            let mut pids = BTreeSet::new();
            tree_procs(path, &mut pids);
            if pids.is_empty() {
                match remove_tree(path) {
                    Ok(()) => continue,
                    // Members may linger a moment after leaving cgroup.procs.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(source) => {
                        return Err(CgroupError::Remove {
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
            // Again every round: a member may have forked since the last one. Never signal 0 or
            // ourselves (should the daemon have been put in there).
            for pid in pids.into_iter().filter(|&p| p > 0 && p != me) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            busy.get_or_insert(path);
        }
        match busy {
            None => return Ok(()),
            Some(path) if Instant::now() >= deadline => {
                return Err(CgroupError::Busy { path: path.clone() });
            }
            Some(_) => std::thread::sleep(DRAIN_POLL),
        }
    }
}

/// rmdir of a cgroup and its nested cgroups, deepest first (rmdir refuses non-empty ones).
fn remove_tree(path: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Adds the members of the cgroup at `path` and of its nested cgroups to `out`.
fn tree_procs(path: &Path, out: &mut BTreeSet<i32>) {
    if let Ok(text) = fs::read_to_string(path.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                tree_procs(&entry.path(), out);
            }
        }
    }
}

pub(super) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    // No O_CREAT/O_TRUNC: these are kernel files, and a missing one must be an error.
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

/// Writes the limits that the `controllers` of the cgroup at `dir` enforce.
fn write_limits(
    dir: &Path,
    version: Version,
    controllers: &[&str],
    l: &Limits,
) -> Result<(), CgroupError> {
    match version {
        Version::V1 => v1::write_limits(dir, controllers, l),
        Version::V2 => v2::write_limits(dir, controllers, l),
    }
}

/// `pids.max`, the same file in both versions.
pub(super) fn write_pids(dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    let Some(max) = l.pids else { return Ok(()) };
    let max = if max < 0 {
        "max".to_string()
    } else {
        max.to_string()
    };
    write_file(&dir.join("pids.max"), &max)
}

/// The value of a "key N" line (memory.oom_control, memory.events).
fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        if it.next()? != key {
            return None;
        }
        it.next()?.parse().ok()
    })
}

/// Formats `pid` into `buf` without allocating.
fn format_pid(pid: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut cursor = io::Cursor::new(&mut buf[..]);
    // 12 bytes hold any i32, so this cannot run out of room.
    let _ = write!(cursor, "{pid}");
    let len = cursor.position() as usize;
    &buf[..len]
}

/// Names become single path components of cgroup directories.
fn check_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains(['/', '\0', '\n'])
    {
        return Err(CgroupError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Creates `<mount>/mitosis/<instance>` (idempotent) and, on v2, enables `controller` down to it.
/// `Ok(None)` means this mount can't serve the controller for us (no permission, read-only, or
/// v2 refused to enable it), so the next candidate is tried.
fn prepare_base(
    version: Version,
    mount: &Path,
    instance: &str,
    controller: &str,
) -> Result<Option<PathBuf>, CgroupError> {
    let top = mount.join(TOP);
    let base = top.join(instance);
    // Leaves only get the controllers their parent enables for its children.
    let enable = |dir: &Path| {
        if version == Version::V2 {
            v2::enable(dir, controller);
        }
    };
    enable(mount);
    for dir in [&top, &base] {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS)
                ) =>
            {
                tracing::warn!(path = %dir.display(), err = %e, controller, "cgroup mount not usable");
                return Ok(None);
            }
            Err(source) => {
                return Err(CgroupError::Create {
                    path: dir.clone(),
                    source,
                });
            }
        }
        if version == Version::V1 {
            v1::use_hierarchy(dir);
        }
        enable(dir);
    }
    if version == Version::V2 && !v2::enabled(&base, controller) {
        // E.g. the mount's root is a non-root cgroup with processes in it.
        tracing::warn!(path = %base.display(), controller, "cgroup v2 controller could not be enabled");
        return Ok(None);
    }
    Ok(Some(base))
}

#[cfg(test)]
#[path = "common_tests.rs"]
mod tests;
