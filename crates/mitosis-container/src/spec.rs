//! Reading an OCI bundle (config.json + rootfs) into what a lean container needs.
//!
//! Only what mitosis can honour is accepted: anything else in the config is an error before
//! anything starts, so a function never runs with a limit silently dropped.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, LinuxSeccomp, Spec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cgroup::Limits;
use crate::mounts::{MountKind, UserMount};
use crate::privileges::Privileges;

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid OCI config: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0} is missing from config.json")]
    Missing(&'static str),
    #[error("rootfs {0} is not a directory")]
    NoRootfs(PathBuf),
    #[error("{0} is not supported")]
    Unsupported(String),
    #[error("linux.seccomp: {0}")]
    Seccomp(String),
    #[error("{field} must be positive, not {value}")]
    Invalid { field: &'static str, value: i64 },
}

/// The namespaces every container gets, whatever the config lists: its own processes and
/// mounts are what make it a container at all.
pub const BASE_NAMESPACES: i32 = libc::CLONE_NEWPID | libc::CLONE_NEWNS;

/// The kernel's limit on supplementary groups (linux/limits.h; libc does not export it).
const NGROUPS_MAX: usize = 65536;

/// A bundle as mitosis runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The bundle directory, canonical.
    pub dir: PathBuf,
    /// The root filesystem, canonical.
    pub rootfs: PathBuf,
    pub readonly: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of its process (`process.user.additionalGids`).
    pub groups: Vec<u32>,
    /// Its process's file mode creation mask (`process.user.umask`).
    pub umask: Option<u32>,
    /// Its process's OOM score adjustment (`process.oomScoreAdj`).
    pub oom_score_adj: Option<i32>,
    /// Namespaced kernel parameters every container of it sets (`linux.sysctl`).
    pub sysctl: Vec<(String, String)>,
    /// Capabilities, resource limits and no_new_privs of its process.
    pub privileges: Privileges,
    /// Its seccomp profile (checked: it compiles).
    pub seccomp: Option<LinuxSeccomp>,
    /// The mounts it lists that containers only get when listed.
    pub listed_mounts: Vec<ListedMount>,
    /// Its own bind and tmpfs mounts, in the config's order.
    pub mounts: Vec<UserMount>,
    pub hostname: String,
    /// CLONE_NEW* flags of the namespaces a container of this bundle gets.
    pub namespaces: i32,
    pub limits: Limits,
    /// Paths hidden from the function (`linux.maskedPaths`).
    pub masked: Vec<String>,
    /// Paths the function may only read (`linux.readonlyPaths`).
    pub readonly_paths: Vec<String>,
    /// BLAKE3 of config.json: children on another host check they run the same function.
    pub digest: [u8; 32],
}

/// The mounts every container gets (see `init`); a config may list them, not others.
pub const STANDARD_MOUNTS: [&str; 5] = ["/proc", "/dev", "/dev/shm", "/sys", "/tmp"];

/// Mounts a container gets when its config lists them, as `runc spec` does: a devpts of its
/// own at /dev/pts, the POSIX message queues of its ipc namespace at /dev/mqueue, and the
/// cgroup2 hierarchy read-only at /sys/fs/cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListedMount {
    DevPts,
    Mqueue,
    Cgroup,
}

impl ListedMount {
    pub const ALL: [(&'static str, ListedMount); 3] = [
        ("/dev/pts", ListedMount::DevPts),
        ("/dev/mqueue", ListedMount::Mqueue),
        ("/sys/fs/cgroup", ListedMount::Cgroup),
    ];
}

impl Bundle {
    /// Where its containers have tmpfs mounts of their own, relative to their root: the
    /// standard /tmp and /dev/shm, and its own.
    pub fn tmpfs_mounts(&self) -> Vec<String> {
        let own = self.mounts.iter().filter(|m| m.kind == MountKind::Tmpfs);
        ["/tmp", "/dev/shm"]
            .into_iter()
            .chain(own.map(|m| m.destination.as_str()))
            .map(|d| d.trim_start_matches('/').to_owned())
            .collect()
    }

    /// Its bind mounts: (where in the container, the host path bound there), in order.
    pub fn binds(&self) -> Vec<(String, PathBuf)> {
        self.mounts
            .iter()
            .filter_map(|m| match &m.kind {
                MountKind::Bind { source } => Some((m.destination.clone(), source.clone())),
                MountKind::Tmpfs => None,
            })
            .collect()
    }

    /// Loads and checks the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = dir.canonicalize().map_err(|source| BundleError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("config.json");
        let text = fs::read(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let raw: serde_json::Value =
            serde_json::from_slice(&text).map_err(|source| BundleError::Malformed {
                path: path.clone(),
                source,
            })?;
        crate::fields::check(&raw)?;
        let spec: Spec = serde_json::from_value(raw)
            .map_err(|source| BundleError::Malformed { path, source })?;
        let mut bundle = Bundle::from_spec(&dir, &spec)?;
        bundle.digest = *blake3::hash(&text).as_bytes();
        Ok(bundle)
    }

    fn from_spec(dir: &Path, spec: &Spec) -> Result<Bundle, BundleError> {
        let root = spec.root().as_ref().ok_or(BundleError::Missing("root"))?;
        let rootfs = dir.join(root.path());
        let rootfs = rootfs
            .canonicalize()
            .ok()
            .filter(|p| p.is_dir())
            .ok_or(BundleError::NoRootfs(rootfs))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or(BundleError::Missing("process"))?;
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() {
            return Err(BundleError::Missing("process.args"));
        }
        if process.terminal().unwrap_or(false) {
            return Err(BundleError::Unsupported("process.terminal".into()));
        }
        let user = process.user();
        let groups = user.additional_gids().clone().unwrap_or_default();
        if groups.len() > NGROUPS_MAX {
            return Err(BundleError::Unsupported(format!(
                "{} process.user.additionalGids (at most {})",
                groups.len(),
                NGROUPS_MAX
            )));
        }
        // Capabilities, limits and no_new_privs the seed's init applies (a child has what
        // the prepare reads of the seed: [`Privileges`]); LSM labels are not carried.
        let privileges = Privileges::of(process)?;
        let unsupported_process = [
            (
                "process.apparmorProfile",
                process.apparmor_profile().is_some(),
            ),
            ("process.selinuxLabel", process.selinux_label().is_some()),
        ];
        if let Some((field, _)) = unsupported_process.iter().find(|(_, set)| *set) {
            return Err(BundleError::Unsupported((*field).into()));
        }
        let (mut listed_mounts, mut mounts) = (Vec::new(), Vec::new());
        for m in spec.mounts().iter().flatten() {
            let dest = m.destination().to_string_lossy();
            if let Some(&(_, listed)) = ListedMount::ALL.iter().find(|(d, _)| *d == dest) {
                listed_mounts.push(listed);
            } else if !STANDARD_MOUNTS.contains(&dest.as_ref()) {
                mounts.push(UserMount::parse(
                    m.destination(),
                    m.typ().as_deref(),
                    m.source().as_deref(),
                    m.options().as_deref().unwrap_or_default(),
                    dir,
                )?);
            }
        }
        let cwd = process.cwd().to_string_lossy().into_owned();
        if !cwd.starts_with('/') {
            return Err(BundleError::Unsupported(format!(
                "a relative process.cwd ({cwd})"
            )));
        }
        let mut namespaces = BASE_NAMESPACES;
        let mut limits = Limits::default();
        let (mut masked, mut readonly_paths) = (Vec::new(), Vec::new());
        let mut seccomp = None;
        let mut sysctl = Vec::new();
        if let Some(linux) = spec.linux() {
            if let Some(profile) = linux.seccomp() {
                crate::seccomp::compile(profile).map_err(BundleError::Seccomp)?;
                seccomp = Some(profile.clone());
            }
            let paths = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
            masked = paths(linux.masked_paths());
            readonly_paths = paths(linux.readonly_paths());
            if let Some(p) = masked
                .iter()
                .chain(&readonly_paths)
                .find(|p| !p.starts_with('/'))
            {
                return Err(BundleError::Unsupported(format!("a relative path ({p})")));
            }
            for ns in linux.namespaces().iter().flatten() {
                if ns.path().is_some() {
                    return Err(BundleError::Unsupported(format!(
                        "joining an existing {} namespace",
                        ns.typ()
                    )));
                }
                namespaces |= match ns.typ() {
                    LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
                    LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
                    LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
                    LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
                    LinuxNamespaceType::Network => libc::CLONE_NEWNET,
                    LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
                    other => {
                        return Err(BundleError::Unsupported(format!("a {other} namespace")));
                    }
                };
            }
            for (key, value) in linux.sysctl().iter().flatten() {
                sysctl.push((namespaced_sysctl(key, namespaces)?, value.clone()));
            }
            if let Some(resources) = linux.resources() {
                limits = limits_of(resources)?;
            }
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            rootfs,
            readonly: root.readonly().unwrap_or(false),
            args,
            env: process.env().clone().unwrap_or_default(),
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            groups,
            umask: user.umask(),
            oom_score_adj: process.oom_score_adj(),
            sysctl,
            privileges,
            seccomp,
            listed_mounts,
            mounts,
            hostname: spec.hostname().clone().unwrap_or_else(|| "fn".into()),
            namespaces,
            limits,
            masked,
            readonly_paths,
            digest: [0; 32],
        })
    }
}

/// The /proc/sys path (from /proc) of `key` if a container with `namespaces` has it of its
/// own: a kernel parameter outside them is the host's, and would change it for everyone.
fn namespaced_sysctl(key: &str, namespaces: i32) -> Result<String, BundleError> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let own = if key.starts_with("net.") {
        namespaces & libc::CLONE_NEWNET != 0
    } else if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        namespaces & libc::CLONE_NEWIPC != 0
    } else {
        false
    };
    let plain = !key.is_empty()
        && key
            .split('.')
            .all(|part| !part.is_empty() && !part.contains('/'));
    if !own || !plain {
        return Err(BundleError::Unsupported(format!(
            "linux.sysctl {key:?} (only the parameters of the container's own network or ipc \
             namespace)"
        )));
    }
    Ok(format!("sys/{}", key.replace('.', "/")))
}

/// The limits of `linux.resources`; anything mitosis cannot enforce is an error.
fn limits_of(r: &LinuxResources) -> Result<Limits, BundleError> {
    let unsupported =
        |field: &str| Err(BundleError::Unsupported(format!("linux.resources.{field}")));
    if r.block_io().is_some() {
        return unsupported("blockIO");
    }
    if r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()) {
        return unsupported("hugepageLimits");
    }
    if r.network().is_some() {
        return unsupported("network");
    }
    if r.rdma().as_ref().is_some_and(|h| !h.is_empty()) {
        return unsupported("rdma");
    }
    if r.unified().as_ref().is_some_and(|h| !h.is_empty()) {
        return unsupported("unified");
    }
    let mut limits = Limits::default();
    if let Some(m) = r.memory() {
        if m.reservation().is_some()
            || m.kernel().is_some()
            || m.kernel_tcp().is_some()
            || m.swappiness().is_some()
            || m.disable_oom_killer().is_some()
        {
            return unsupported("memory (only limit and swap are)");
        }
        if let Some(limit) = m.limit() {
            limits.memory_bytes = Some(positive("linux.resources.memory.limit", limit)?);
            // The limit covers swap too (so it cannot be dodged): a larger swap is not honoured.
            if m.swap().is_some_and(|s| s != limit) {
                return unsupported("memory.swap other than the limit");
            }
        }
    }
    if let Some(c) = r.cpu() {
        if c.realtime_runtime().is_some() || c.realtime_period().is_some() {
            return unsupported("cpu.realtime*");
        }
        if c.cpus().as_ref().is_some_and(|s| !s.is_empty())
            || c.mems().as_ref().is_some_and(|s| !s.is_empty())
        {
            return unsupported("cpu.cpus and cpu.mems");
        }
        if c.idle().is_some() || c.burst().is_some() {
            return unsupported("cpu.idle and cpu.burst");
        }
        limits.cpu_shares = c.shares();
        limits.cpu_quota_us = c.quota().filter(|q| *q > 0);
        limits.cpu_period_us = c.period();
    }
    if let Some(p) = r.pids() {
        if p.limit() > 0 {
            limits.pids = Some(p.limit());
        }
    }
    Ok(limits)
}

fn positive(field: &'static str, value: i64) -> Result<u64, BundleError> {
    u64::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .ok_or(BundleError::Invalid { field, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> (PathBuf, Result<Bundle, BundleError>) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mitosis-spec-{}-{n}", std::process::id()));
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        fs::write(dir.join("config.json"), config).unwrap();
        let loaded = Bundle::load(&dir);
        (dir, loaded)
    }

    fn config(extra_linux: &str) -> String {
        format!(
            r#"{{"ociVersion": "1.0.2",
                "process": {{"args": ["python3", "fn.py"], "cwd": "/opt", "env": ["A=1"],
                            "user": {{"uid": 0, "gid": 0}}}},
                "root": {{"path": "rootfs", "readonly": true}},
                "hostname": "fn",
                "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "network"}},
                                         {{"type": "uts"}}]{extra_linux}}}}}"#
        )
    }

    #[test]
    fn reads_process_root_namespaces_and_limits() {
        let (dir, b) = bundle_with(&config(
            r#", "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 32},
                 "cpu": {"shares": 512, "quota": 50000, "period": 100000}}"#,
        ));
        let b = b.unwrap();
        assert_eq!(b.args, ["python3", "fn.py"]);
        assert_eq!(b.cwd, "/opt");
        assert_eq!(b.rootfs, dir.join("rootfs").canonicalize().unwrap());
        assert!(b.readonly);
        assert_eq!(
            b.namespaces,
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWUTS
        );
        assert_eq!(b.limits.memory_bytes, Some(64 << 20));
        assert_eq!(b.limits.pids, Some(32));
        assert_eq!(b.limits.cpu_quota_us, Some(50000));
        assert_eq!(b.limits.cpu_shares, Some(512));
        assert_ne!(b.digest, [0; 32]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_bundles_say_what_is_wrong() {
        let cases = [
            ("{ not json", "not a valid OCI config"),
            (
                r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#,
                "process is missing",
            ),
            (
                r#"{"ociVersion": "1.0.2", "process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}, "root": {"path": "rootfs"}}"#,
                "process.args is missing",
            ),
            (
                r#"{"ociVersion": "1.0.2", "process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}}, "root": {"path": "nowhere"}}"#,
                "rootfs",
            ),
            (
                &config(r#", "resources": {"hugepageLimits": [{"pageSize": "2MB", "limit": 1}]}"#),
                "hugepageLimits is not supported",
            ),
            (
                &config(r#", "resources": {"memory": {"limit": -5}}"#),
                "must be positive",
            ),
            (
                &config(r#", "uidMappings": [], "resources": {"cpu": {"cpus": "0-1"}}"#),
                "cpu.cpus and cpu.mems is not supported",
            ),
        ];
        for (text, want) in cases {
            let (dir, b) = bundle_with(text);
            let err = b.expect_err(text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn capabilities_limits_and_no_new_privs_are_the_processs() {
        let text = config("").replace(
            r#""env": ["A=1"],"#,
            r#""env": ["A=1"], "noNewPrivileges": true,
               "capabilities": {"bounding": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
               "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 8, "soft": 8}],"#,
        );
        let (dir, b) = bundle_with(&text);
        let p = b.expect(&text).privileges;
        assert!(p.no_new_privileges);
        assert_eq!(
            (p.capabilities.bounding, p.capabilities.permitted),
            (32, 32)
        );
        assert_eq!(p.rlimits.len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn what_children_could_not_keep_is_refused() {
        let with_process = |field: &str| {
            config("").replace(
                r#""env": ["A=1"],"#,
                &format!(r#""env": ["A=1"], {field},"#),
            )
        };
        let cases = [
            (
                with_process(r#""apparmorProfile": "fn""#),
                "process.apparmorProfile",
            ),
            (
                with_process(r#""rlimits": [{"type": "RLIMIT_NOFILE", "hard": 8, "soft": 9}]"#),
                "process.rlimits RLIMIT_NOFILE: soft above hard",
            ),
            (
                config("").replace(
                    r#""hostname": "fn","#,
                    r#""hostname": "fn", "mounts": [{"destination": "/data", "type": "nfs", "source": "/srv"}],"#,
                ),
                "mount /data of type nfs",
            ),
        ];
        for (text, want) in cases {
            let (dir, b) = bundle_with(&text);
            let err = b.expect_err(&text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn user_namespaces_are_refused() {
        let text = config("").replace(r#"{"type": "uts"}"#, r#"{"type": "user"}"#);
        let (dir, b) = bundle_with(&text);
        assert!(b.unwrap_err().to_string().contains("user namespace"));
        fs::remove_dir_all(dir).unwrap();
    }
}
