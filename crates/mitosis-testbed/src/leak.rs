//! Leak checks: what of a testbed is still around.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::host::TESTBED_ID_ENV;
use crate::netns::{self, NsId};
use crate::testbed::TEMP_DIR_PREFIX;

/// Something a testbed created that still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A network namespace name under /run/netns.
    Netns(String),
    /// A process living in one of the namespaces, or started by a testbed
    /// (it carries [`TESTBED_ID_ENV`]).
    Process {
        /// Its pid.
        pid: u32,
        /// Its command name, from /proc/PID/comm.
        comm: String,
    },
    /// A testbed temporary directory.
    TempDir(PathBuf),
    /// A cgroup directory of a testbed daemon's containers (named after its socket path,
    /// which holds the testbed id).
    Cgroup(PathBuf),
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Netns(name) => write!(f, "network namespace {name}"),
            Self::Process { pid, comm } => write!(f, "process {pid} ({comm})"),
            Self::TempDir(path) => write!(f, "temporary directory {}", path.display()),
            Self::Cgroup(path) => write!(f, "cgroup {}", path.display()),
        }
    }
}

/// Lists what remains of the testbeds whose id starts with `prefix`: pass
/// [`Testbed::id`](crate::Testbed::id) for one testbed, or
/// [`ID_PREFIX`](crate::ID_PREFIX) for all of them.
///
/// Processes are found both by namespace (for namespaces that still have a
/// name) and by the [`TESTBED_ID_ENV`] marker in their environment (which
/// also finds processes whose namespace lost its name). Zombies are not
/// reported: they hold no namespace any more.
pub fn leftovers(prefix: &str) -> Vec<Leftover> {
    let mut found = Vec::new();

    let names = matching_names(Path::new(netns::NETNS_DIR), prefix);
    let ids: Vec<NsId> = names
        .iter()
        .filter_map(|name| netns::ns_id(&netns::netns_path(name)).ok())
        .collect();
    found.extend(names.into_iter().map(Leftover::Netns));

    let marker = format!("{TESTBED_ID_ENV}={prefix}");
    for pid in netns::other_pids() {
        let in_our_netns = netns::ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
            .is_ok_and(|id| ids.contains(&id));
        if in_our_netns || has_env_marker(pid, marker.as_bytes()) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push(Leftover::Process {
                pid,
                comm: comm.trim_end().to_owned(),
            });
        }
    }

    let temp = std::env::temp_dir();
    let dir_prefix = format!("{TEMP_DIR_PREFIX}{prefix}");
    found.extend(
        matching_names(&temp, &dir_prefix)
            .into_iter()
            .map(|name| Leftover::TempDir(temp.join(name))),
    );
    found.extend(cgroups(prefix).into_iter().map(Leftover::Cgroup));
    found
}

/// Daemon cgroup directories (`<mount>/mitosis/<instance>`) whose instance mentions `prefix`.
fn cgroups(prefix: &str) -> Vec<PathBuf> {
    let Ok(mounts) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut bases: Vec<PathBuf> = mounts
        .flatten()
        .map(|m| m.path().join("mitosis"))
        .chain([PathBuf::from("/sys/fs/cgroup/mitosis")])
        .collect();
    bases.dedup();
    let mut found = Vec::new();
    for base in bases {
        let Ok(entries) = fs::read_dir(&base) else {
            continue;
        };
        found.extend(
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter(|e| e.file_name().to_string_lossy().contains(prefix))
                .map(|e| e.path()),
        );
    }
    found.sort();
    found
}

/// The sorted names of the entries of `dir` that start with `prefix`.
fn matching_names(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether the initial environment of `pid` has a variable starting with
/// `marker` (`NAME=VALUE-PREFIX`).
fn has_env_marker(pid: u32, marker: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
        environ
            .split(|&b| b == 0)
            .any(|var| var.starts_with(marker))
    })
}
