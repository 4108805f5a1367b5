//! Cgroups for lean containers, on cgroup v1, v2, or a mix of both.
//!
//! Each controller we use (memory, cpu, pids) comes from a writable v1 mount that carries it if
//! there is one, else from the v2 mount whose `cgroup.controllers` lists it: hybrid hosts often
//! mount a v2 tree that has none of them. A daemon instance keeps its cgroups under
//! `<mount>/mitosis/<instance>` in every mount it uses, so a restarted daemon finds (and removes)
//! what its crashed predecessor left, and other instances' cgroups are never touched.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The controllers containers' limits need, in the order they are reported.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// Directory under each mount that holds all instances' bases.
const TOP: &str = "mitosis";
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// CFS period the kernel uses by default; used when only a quota is given.
const DEFAULT_PERIOD_US: u64 = 100_000;
/// How long `destroy` waits for killed members to leave.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// v1 reports "no limit" as `PAGE_COUNTER_MAX * PAGE_SIZE`, just under `i64::MAX` (how far
/// under depends on the page size); anything above this is unlimited.
const V1_UNLIMITED: u64 = i64::MAX as u64 - (1 << 20);

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
struct BaseDir {
    version: Version,
    path: PathBuf,
    controllers: Vec<&'static str>,
}

/// Where this daemon instance keeps its cgroups: for every controller in use, `<mount>/mitosis/<instance>`.
#[derive(Debug)]
pub struct Hierarchy {
    dirs: Vec<BaseDir>,
}

impl Hierarchy {
    /// Detects controllers and creates the instance's base directories (idempotent). `instance` is a
    /// file-name-safe string chosen by the daemon (unique per daemon; the same after a restart).
    pub fn detect(instance: &str) -> Result<Hierarchy, CgroupError> {
        check_name(instance)?;
        let text = fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Read {
            path: MOUNTINFO.into(),
            source,
        })?;
        let mut mounts = parse_mountinfo(&text);
        for m in mounts.iter_mut().filter(|m| m.version == Version::V2) {
            m.controllers = fs::read_to_string(m.path.join("cgroup.controllers"))
                .map(|t| parse_controllers(&t))
                .unwrap_or_default();
        }
        let mut dirs: Vec<BaseDir> = Vec::new();
        for controller in CONTROLLERS {
            for (version, mount) in candidates(&mounts, controller) {
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

    fn version_of(&self, controller: &str) -> Option<Version> {
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
            let procs_path = path.join("cgroup.procs");
            let procs = OpenOptions::new()
                .write(true)
                .open(&procs_path)
                .map_err(|source| CgroupError::Open {
                    path: procs_path,
                    source,
                })?;
            dirs.push(CgDir {
                version: base.version,
                path,
                controllers: base.controllers.clone(),
                procs,
            });
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

    /// Removes the instance's base directories if empty (daemon shutdown). Best effort. The shared
    /// `mitosis` directory stays: other instances may be using it.
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
struct CgDir {
    version: Version,
    path: PathBuf,
    controllers: Vec<&'static str>,
    procs: File,
}

/// One container's cgroup, in each controller. Dropping it does NOT remove it (call destroy).
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    dirs: Vec<CgDir>,
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
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
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
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        };
        let text = fs::read_to_string(d.path.join(file)).ok()?;
        let value: u64 = text.trim().parse().ok()?; // v2 "max" fails here: unlimited
        (value < V1_UNLIMITED).then_some(value)
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
        let kill_file = path.join("cgroup.kill");
        // cgroup.kill reaches the whole subtree at once, including processes forking right now;
        // if it fails the per-pid loop below still does the job.
        if *version == Version::V2
            && kill_file.exists()
            && let Err(e) = write_file(&kill_file, "1")
        {
            tracing::debug!(err = %e, "cgroup.kill");
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

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
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
    if controllers.contains(&"memory")
        && let Some(bytes) = l.memory_bytes
    {
        let bytes = bytes.to_string();
        match version {
            Version::V1 => {
                // memsw must stay >= the memory limit, so the memory limit goes first.
                write_file(&dir.join("memory.limit_in_bytes"), &bytes)?;
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &bytes)?;
                }
            }
            Version::V2 => {
                write_file(&dir.join("memory.max"), &bytes)?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
            }
        }
    }
    if controllers.contains(&"cpu") {
        if l.cpu_quota_us.is_some() || l.cpu_period_us.is_some() {
            let period = l.cpu_period_us.unwrap_or(DEFAULT_PERIOD_US);
            match version {
                Version::V1 => {
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
                Version::V2 => {
                    let quota = match l.cpu_quota_us {
                        Some(q) if q >= 0 => q.to_string(),
                        _ => "max".to_string(),
                    };
                    write_file(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
        }
        if let Some(shares) = l.cpu_shares {
            match version {
                Version::V1 => write_file(&dir.join("cpu.shares"), &shares.to_string())?,
                Version::V2 => write_file(
                    &dir.join("cpu.weight"),
                    &shares_to_weight(shares).to_string(),
                )?,
            }
        }
    }
    if controllers.contains(&"pids")
        && let Some(max) = l.pids
    {
        let max = if max < 0 {
            "max".to_string()
        } else {
            max.to_string()
        };
        write_file(&dir.join("pids.max"), &max)?;
    }
    Ok(())
}

/// v1 cpu.shares (2..=262144) to v2 cpu.weight (1..=10000), as runc converts it.
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
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

/// A cgroup mount from mountinfo; for v2, `controllers` is filled from its cgroup.controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgMount {
    version: Version,
    path: PathBuf,
    controllers: Vec<&'static str>,
    writable: bool,
}

fn parse_mountinfo(text: &str) -> Vec<CgMount> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// `id parent maj:min root mountpoint options [optional...] - fstype source superoptions`
fn parse_mountinfo_line(line: &str) -> Option<CgMount> {
    let mut it = line.split(' ');
    let mountpoint = it.nth(4)?;
    let options = it.next()?;
    while it.next()? != "-" {}
    let fstype = it.next()?;
    let _source = it.next()?;
    let super_options = it.next().unwrap_or("");
    let version = match fstype {
        "cgroup" => Version::V1,
        "cgroup2" => Version::V2,
        _ => return None,
    };
    let ro = |opts: &str| opts.split(',').any(|o| o == "ro");
    let controllers = match version {
        // v1 names its controllers among the superblock options ("rw,cpu,cpuacct").
        Version::V1 => CONTROLLERS
            .into_iter()
            .filter(|c| super_options.split(',').any(|o| o == *c))
            .collect(),
        Version::V2 => Vec::new(),
    };
    Some(CgMount {
        version,
        path: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(mountpoint))),
        controllers,
        writable: !ro(options) && !ro(super_options),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The controllers listed in a v2 cgroup.controllers or cgroup.subtree_control.
fn parse_controllers(text: &str) -> Vec<&'static str> {
    CONTROLLERS
        .into_iter()
        .filter(|c| text.split_whitespace().any(|w| w == *c))
        .collect()
}

/// Mounts that could provide `controller`, best first: writable v1 mounts carrying it, then
/// writable v2 mounts listing it.
fn candidates<'a>(mounts: &'a [CgMount], controller: &str) -> Vec<(Version, &'a Path)> {
    let usable = |version| {
        mounts
            .iter()
            .filter(move |m| m.version == version && m.writable)
            .filter(|m| m.controllers.contains(&controller))
            .map(|m| (m.version, m.path.as_path()))
    };
    usable(Version::V1).chain(usable(Version::V2)).collect()
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
    let enable = |dir: &Path| {
        if version == Version::V2 {
            // Leaves only get the controllers their parent enables for its children.
            let _ = write_file(
                &dir.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            );
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
            // Older kernels account children to parents only with use_hierarchy; newer ones
            // always do and may refuse the write.
            let use_hierarchy = dir.join("memory.use_hierarchy");
            if use_hierarchy.exists() {
                let _ = write_file(&use_hierarchy, "1");
            }
        }
        enable(dir);
    }
    if version == Version::V2 {
        let enabled = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
        if !parse_controllers(&enabled).contains(&controller) {
            // E.g. the mount's root is a non-root cgroup with processes in it.
            tracing::warn!(path = %base.display(), controller, "cgroup v2 controller could not be enabled");
            return Ok(None);
        }
    }
    Ok(Some(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_hybrid_mountinfo() {
        let mut mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 6);
        assert_eq!(
            mounts[0],
            CgMount {
                version: Version::V1,
                path: "/sys/fs/cgroup/cpu".into(),
                controllers: vec!["cpu"],
                writable: true,
            }
        );
        assert!(mounts[1].controllers.is_empty()); // cpuacct alone is not cpu
        assert!(mounts[4].controllers.is_empty()); // name=systemd
        assert_eq!(mounts[5].version, Version::V2);
        mounts[5].controllers = parse_controllers("hugetlb\n");
        let first = |c: &str| {
            candidates(&mounts, c)
                .first()
                .map(|(v, p)| (*v, p.to_path_buf()))
        };
        assert_eq!(
            first("memory"),
            Some((Version::V1, "/sys/fs/cgroup/memory".into()))
        );
        assert_eq!(
            first("cpu"),
            Some((Version::V1, "/sys/fs/cgroup/cpu".into()))
        );
        assert_eq!(
            first("pids"),
            Some((Version::V1, "/sys/fs/cgroup/pids".into()))
        );
    }

    #[test]
    fn parses_v2_comounted_readonly_and_escaped() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
50 24 0:40 / /cg/cpu,cpuacct rw,relatime shared:20 - cgroup cgroup rw,cpu,cpuacct
51 24 0:41 / /cg/pids ro,relatime - cgroup cgroup rw,pids
52 24 0:42 / /cg/my\\040mem rw,relatime - cgroup cgroup rw,memory
60 24 0:50 / /proc rw - proc proc rw
";
        let mut mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 4);
        mounts[0].controllers = parse_controllers("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(mounts[0].controllers, vec!["memory", "cpu", "pids"]);
        assert_eq!(mounts[1].path, Path::new("/cg/cpu,cpuacct"));
        assert_eq!(mounts[1].controllers, vec!["cpu"]);
        assert!(!mounts[2].writable);
        assert_eq!(mounts[3].path, Path::new("/cg/my mem"));
        let all = |c: &str| candidates(&mounts, c);
        assert_eq!(
            all("cpu"),
            vec![
                (Version::V1, Path::new("/cg/cpu,cpuacct")),
                (Version::V2, Path::new("/sys/fs/cgroup"))
            ]
        );
        // The read-only v1 pids mount is skipped for v2.
        assert_eq!(
            all("pids"),
            vec![(Version::V2, Path::new("/sys/fs/cgroup"))]
        );
        assert_eq!(all("memory")[0], (Version::V1, Path::new("/cg/my mem")));
        mounts.retain(|m| m.version == Version::V2);
        assert_eq!(all_v2(&mounts), vec!["/sys/fs/cgroup"; 3]);
    }

    fn all_v2(mounts: &[CgMount]) -> Vec<String> {
        CONTROLLERS
            .iter()
            .filter_map(|c| {
                candidates(mounts, c)
                    .first()
                    .map(|(_, p)| p.display().to_string())
            })
            .collect()
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape(r"/a\040b\134c\011"), b"/a b\\c\t");
        assert_eq!(unescape(r"/trailing\04"), b"/trailing\\04");
    }

    #[test]
    fn shares_to_weight_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

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
    }

    // ---- privileged: real cgroups ----

    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipping: needs root");
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
        eprintln!("{}", h.0.describe());
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
            eprintln!("skipping: no pids controller");
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
            eprintln!("skipping: no memory controller");
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
        let Ok(text) = fs::read_to_string(MOUNTINFO) else {
            return;
        };
        let Some(mount) = parse_mountinfo(&text)
            .into_iter()
            .find(|m| m.version == Version::V2 && m.writable)
        else {
            eprintln!("skipping: no cgroup v2 mount");
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
