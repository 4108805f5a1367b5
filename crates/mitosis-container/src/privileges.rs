//! What a bundle's process may do: its capabilities, resource limits and `no_new_privs`
//! (OCI `process.capabilities`, `process.rlimits`, `process.noNewPrivileges`).
//!
//! Read from config.json at load, applied by a seed's init between its fork and the exec
//! (youki's order: limits, the bounding set and keep-caps, then the ids, then the other sets,
//! ambient ones, and `no_new_privs` last). A child of the seed has the same: it is built with
//! the credentials and limits the prepare read from the seed's threads.

use std::collections::HashSet;
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{LinuxCapabilities, Process};
use serde::{Deserialize, Serialize};

use crate::spec::BundleError;

/// Capability sets as masks, bit N for capability N.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub inheritable: u64,
    pub permitted: u64,
    pub ambient: u64,
}

/// One `setrlimit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Privileges {
    /// As the config lists them; none listed is every set empty, as runc reads it (even
    /// root's process then has no capability).
    pub capabilities: CapSets,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
}

/// `RLIMIT_*` names as config.json spells them, with their numbers.
const RLIMITS: [(&str, u32); 16] = [
    ("RLIMIT_CPU", libc::RLIMIT_CPU),
    ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE),
    ("RLIMIT_DATA", libc::RLIMIT_DATA),
    ("RLIMIT_STACK", libc::RLIMIT_STACK),
    ("RLIMIT_CORE", libc::RLIMIT_CORE),
    ("RLIMIT_RSS", libc::RLIMIT_RSS),
    ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
    ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
    ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK),
    ("RLIMIT_AS", libc::RLIMIT_AS),
    ("RLIMIT_LOCKS", libc::RLIMIT_LOCKS),
    ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING),
    ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE),
    ("RLIMIT_NICE", libc::RLIMIT_NICE),
    ("RLIMIT_RTPRIO", libc::RLIMIT_RTPRIO),
    ("RLIMIT_RTTIME", libc::RLIMIT_RTTIME),
];

impl Privileges {
    /// The privileges `process` asks for; a name this host does not know, or a soft limit
    /// above its hard one, is an error.
    pub fn of(process: &Process) -> Result<Privileges, BundleError> {
        let unsupported = |what: String| BundleError::Unsupported(what);
        let mut rlimits = Vec::new();
        for r in process.rlimits().iter().flatten() {
            // The config's own spelling of the type ("RLIMIT_NOFILE").
            let name = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let resource = RLIMITS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, nr)| nr)
                .ok_or_else(|| unsupported(format!("process.rlimits type {name:?}")))?;
            if r.soft() > r.hard() {
                return Err(unsupported(format!(
                    "process.rlimits {name}: soft above hard"
                )));
            }
            rlimits.push(Rlimit {
                resource,
                soft: r.soft(),
                hard: r.hard(),
            });
        }
        let capabilities = match process.capabilities() {
            Some(c) => cap_sets(c)?,
            None => CapSets::default(),
        };
        Ok(Privileges {
            capabilities,
            rlimits,
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
        })
    }

    /// The part before the process takes its ids: limits (raising a hard one needs the
    /// daemon's privilege), the bounding set, and keep-caps so the permitted set survives a
    /// change from root.
    pub fn apply_before_ids(&self) -> Result<(), String> {
        for r in &self.rlimits {
            let limit = libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            };
            // SAFETY: `limit` is a valid rlimit for the duration of the call.
            if unsafe { libc::setrlimit(r.resource as _, &limit) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!("setrlimit {}: {e}", r.resource));
            }
        }
        let sets = &self.capabilities;
        for cap in caps::all() {
            if sets.bounding & (1 << cap.index()) == 0 {
                caps::drop(None, CapSet::Bounding, cap)
                    .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
            }
        }
        caps::securebits::set_keepcaps(true).map_err(|e| format!("keep-caps: {e}"))
    }

    /// The part after the ids: the capability sets, the ambient ones, `no_new_privs`.
    pub fn apply_after_ids(&self) -> Result<(), String> {
        let sets = &self.capabilities;
        // Each change is checked against the sets as they are: effective must stay within
        // permitted, inheritable within what was permitted; so permitted shrinks last.
        for (set, mask) in [
            (CapSet::Effective, sets.effective),
            (CapSet::Inheritable, sets.inheritable),
            (CapSet::Permitted, sets.permitted),
        ] {
            caps::set(None, set, &of_mask(mask))
                .map_err(|e| format!("setting the {set:?} capabilities: {e}"))?;
        }
        // The kernel raises an ambient capability only if it is permitted and inheritable
        // too: `runc spec` lists ambient ones it does not make inheritable, and runc goes
        // on without them, as here.
        for cap in of_mask(sets.ambient & sets.inheritable & sets.permitted) {
            caps::raise(None, CapSet::Ambient, cap)
                .map_err(|e| format!("raising ambient {cap}: {e}"))?;
        }
        if self.no_new_privileges {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

fn cap_sets(c: &LinuxCapabilities) -> Result<CapSets, BundleError> {
    let mask = |set: &Option<HashSet<oci_spec::runtime::Capability>>| -> Result<u64, BundleError> {
        let mut mask = 0;
        for cap in set.iter().flatten() {
            // The config's own spelling of the name ("CAP_KILL").
            let name = serde_json::to_value(cap)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let known = Capability::from_str(&name).map_err(|_| {
                BundleError::Unsupported(format!("capability {name:?} (unknown here)"))
            })?;
            mask |= 1 << known.index();
        }
        Ok(mask)
    };
    Ok(CapSets {
        bounding: mask(c.bounding())?,
        effective: mask(c.effective())?,
        inheritable: mask(c.inheritable())?,
        permitted: mask(c.permitted())?,
        ambient: mask(c.ambient())?,
    })
}

fn of_mask(mask: u64) -> CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|c| mask & (1 << c.index()) != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        let text =
            format!(r#"{{"cwd": "/", "args": ["x"], "user": {{"uid": 0, "gid": 0}}, {json}}}"#);
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn names_become_numbers_and_bad_ones_are_refused() {
        let p = Privileges::of(&process(
            r#""capabilities": {"bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                                "effective": ["CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}],
                "noNewPrivileges": true"#,
        ))
        .unwrap();
        let sets = p.capabilities;
        assert_eq!(
            sets.bounding,
            1 << 5 | 1 << 10,
            "CAP_KILL is 5, NET_BIND_SERVICE 10"
        );
        assert_eq!((sets.effective, sets.permitted), (1 << 5, 0));
        assert_eq!(
            p.rlimits,
            [Rlimit {
                resource: libc::RLIMIT_NOFILE,
                soft: 256,
                hard: 512
            }]
        );
        assert!(p.no_new_privileges);
        // None listed: none at all, as runc gives.
        assert_eq!(
            Privileges::of(&process(r#""env": []"#)).unwrap(),
            Privileges::default()
        );
        let soft_above = Privileges::of(&process(
            r#""rlimits": [{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 8}]"#,
        ));
        assert!(matches!(soft_above, Err(BundleError::Unsupported(w)) if w.contains("soft")));
    }
}
