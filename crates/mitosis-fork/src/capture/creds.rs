//! A thread's credentials and confinement: ids, groups, capabilities, securebits,
//! no_new_privs and seccomp filters. A child gets exactly these, so whatever cannot be
//! reproduced is refused here, at prepare, rather than silently widened in the child.

use std::fs;

use mitosis_descriptor::{Capabilities, Credentials, SeccompFilter};
use mitosis_sys::ptrace::Tracee;
use thiserror::Error;

use crate::prepare::PrepareError;

/// What /proc/PID/task/TID/status says of a thread's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCreds {
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub caps: Capabilities,
    pub no_new_privs: bool,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp_mode: u8,
    /// Its id in its own pid namespace (the last of `NSpid`), which is not a credential but
    /// is on the same page.
    pub own_tid: i32,
}

/// A status file without the fields this parser needs.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("/proc status lacks a readable {0} line")]
pub struct MissingField(pub &'static str);

fn field<'a>(status: &'a str, name: &'static str) -> Result<&'a str, MissingField> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or(MissingField(name))
}

fn ids(status: &str, name: &'static str) -> Result<[u32; 4], MissingField> {
    let values: Vec<u32> = field(status, name)?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| MissingField(name))?;
    values.try_into().map_err(|_| MissingField(name))
}

fn mask(status: &str, name: &'static str) -> Result<u64, MissingField> {
    u64::from_str_radix(field(status, name)?, 16).map_err(|_| MissingField(name))
}

/// Parses the credential lines of a /proc status file.
pub fn parse_status(status: &str) -> Result<StatusCreds, MissingField> {
    let groups = field(status, "Groups")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| MissingField("Groups"))?;
    let number = |name| -> Result<u8, MissingField> {
        field(status, name)?.parse().map_err(|_| MissingField(name))
    };
    Ok(StatusCreds {
        uids: ids(status, "Uid")?,
        gids: ids(status, "Gid")?,
        groups,
        caps: Capabilities {
            effective: mask(status, "CapEff")?,
            permitted: mask(status, "CapPrm")?,
            inheritable: mask(status, "CapInh")?,
            bounding: mask(status, "CapBnd")?,
            ambient: mask(status, "CapAmb")?,
        },
        no_new_privs: number("NoNewPrivs")? != 0,
        seccomp_mode: number("Seccomp")?,
        own_tid: field(status, "NSpid")?
            .split_whitespace()
            .last()
            .and_then(|id| id.parse().ok())
            .ok_or(MissingField("NSpid"))?,
    })
}

/// Reads the credentials of stopped thread `t` of seed `pid`, and its id in its own pid
/// namespace (from the same status file). Its securebits come from an injected
/// `prctl(PR_GET_SECUREBITS)`, its seccomp filters from ptrace.
pub fn capture(pid: i32, t: &mut Tracee, insn: u64) -> Result<(Credentials, i32), PrepareError> {
    let tid = t.pid();
    let path = format!("/proc/{pid}/task/{tid}/status");
    let status = fs::read_to_string(&path).map_err(|source| PrepareError::Proc {
        path: path.clone(),
        source,
    })?;
    let parsed = parse_status(&status).map_err(|e| PrepareError::Malformed {
        pid,
        reason: crate::prepare::MalformedProc(format!("{path}: {e}")),
    })?;
    if parsed.seccomp_mode == 1 {
        return Err(PrepareError::Unsupported {
            pid,
            what: format!("thread {tid} runs in seccomp strict mode"),
        });
    }
    let securebits = t
        .syscall(
            insn,
            libc::SYS_prctl,
            [libc::PR_GET_SECUREBITS as u64, 0, 0, 0, 0, 0],
        )
        .map_err(|source| PrepareError::Inject {
            pid: tid,
            what: "reading securebits",
            source,
        })?
        .ret;
    if securebits < 0 {
        return Err(PrepareError::Inject {
            pid: tid,
            what: "reading securebits",
            source: std::io::Error::from_raw_os_error(-securebits as i32),
        });
    }
    let seccomp = if parsed.seccomp_mode == 2 {
        t.seccomp_filters()
            .map_err(|source| PrepareError::Inject {
                pid: tid,
                what: "reading seccomp filters",
                source,
            })?
            .into_iter()
            .map(|(program, flags)| SeccompFilter { program, flags })
            .collect()
    } else {
        Vec::new()
    };
    if parsed.seccomp_mode == 2 && seccomp.is_empty() {
        return Err(PrepareError::Unsupported {
            pid,
            what: format!("thread {tid} has seccomp filters this kernel does not let us read"),
        });
    }
    let creds = Credentials {
        uids: parsed.uids,
        gids: parsed.gids,
        groups: parsed.groups,
        caps: parsed.caps,
        securebits: securebits as u32,
        no_new_privs: parsed.no_new_privs,
        seccomp,
    };
    Ok((creds, parsed.own_tid))
}

/// Refuses a seed whose credentials mean something else outside its namespaces: ids and
/// capabilities in another user namespace would be the daemon's namespace's in a child.
pub fn check_namespace(pid: i32) -> Result<(), PrepareError> {
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/user")).ok();
    match (ns(&pid.to_string()), ns("self")) {
        (Some(seed), Some(own)) if seed != own => Err(PrepareError::Unsupported {
            pid,
            what: format!(
                "it runs in a user namespace of its own ({}): its ids and capabilities \
                 would mean more in a child",
                seed.display()
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\n\
        Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65533\t65534\t65532\n\
        Groups:\t4 24 \nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n\
        CapInh:\t0000000000000000\nCapPrm:\t0000000000000400\nCapEff:\t0000000000000400\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNSpid:\t4242\t7\n";

    #[test]
    fn credentials_come_from_the_status_lines() {
        let c = parse_status(STATUS).unwrap();
        assert_eq!(c.uids, [65534; 4]);
        assert_eq!(c.gids, [65534, 65533, 65534, 65532]);
        assert_eq!(c.groups, [4, 24]);
        assert_eq!(c.caps.permitted, 0x400);
        assert_eq!(c.caps.effective, 0x400);
        assert_eq!(c.caps.bounding, 0x1ff_ffff_ffff);
        assert!(c.no_new_privs);
        assert_eq!(c.seccomp_mode, 2);
        assert_eq!(c.own_tid, 7, "its id in its own (innermost) pid namespace");
    }

    #[test]
    fn no_groups_is_an_empty_list_and_a_missing_line_an_error() {
        let none = STATUS.replace("Groups:\t4 24 \n", "Groups:\t\n");
        assert!(parse_status(&none).unwrap().groups.is_empty());
        let missing = STATUS.replace("CapAmb:\t0000000000000000\n", "");
        assert_eq!(parse_status(&missing), Err(MissingField("CapAmb")));
        let short = STATUS.replace("Uid:\t65534\t65534\t65534\t65534", "Uid:\t1 2");
        assert_eq!(parse_status(&short), Err(MissingField("Uid")));
    }

    #[test]
    fn own_status_parses() {
        let own = fs::read_to_string("/proc/thread-self/status").unwrap();
        let c = parse_status(&own).unwrap();
        // SAFETY: getuid has no preconditions.
        assert_eq!(c.uids[0], unsafe { libc::getuid() });
    }
}
