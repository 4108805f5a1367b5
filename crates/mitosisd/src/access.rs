//! Who may ask what of the control socket: the caller's credentials (SO_PEERCRED) against
//! the process or seed it names.

use std::io;
use std::os::unix::fs::MetadataExt;

/// The process at the other end of a control connection, as the kernel saw it connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Caller {
    /// A TCP control peer whose certificate chains to the cluster's CA: a cluster operator,
    /// with the rights of root on the unix socket.
    pub fn operator() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: None,
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A process's credentials, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and filesystem uids.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    /// Permitted capabilities.
    pub cap_prm: u64,
}

/// The credentials in the text of a `/proc/PID/status`.
pub fn parse_status(status: &str) -> Option<Creds> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let ids = |name: &str| -> Option<[u32; 4]> {
        let v: Vec<u32> = field(name)?
            .split_whitespace()
            .map(|n| n.parse().ok())
            .collect::<Option<_>>()?;
        v.try_into().ok()
    };
    Some(Creds {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        cap_prm: u64::from_str_radix(field("CapPrm")?, 16).ok()?,
    })
}

pub fn read_creds(pid: i32) -> io::Result<Creds> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc status"))
}

/// Why `target` (with `creds`) is not a process `caller` (with `caller_caps` permitted) could
/// ptrace itself, if it is not: every uid and gid of the target is the caller's, and the
/// target has no permitted capability the caller lacks.
pub fn trace_refusal(caller: &Caller, caller_caps: u64, target: &Creds) -> Option<String> {
    if target.uids.iter().any(|&u| u != caller.uid) {
        return Some(format!("it runs as uid {}", render(&target.uids)));
    }
    if target.gids.iter().any(|&g| g != caller.gid) {
        return Some(format!("it runs as gid {}", render(&target.gids)));
    }
    let extra = target.cap_prm & !caller_caps;
    if extra != 0 {
        return Some(format!(
            "it holds capabilities the caller lacks ({extra:#x})"
        ));
    }
    None
}

fn render(ids: &[u32; 4]) -> String {
    if ids.iter().all(|&i| i == ids[0]) {
        ids[0].to_string()
    } else {
        ids.map(|i| i.to_string()).join("/")
    }
}

/// Ok if `caller` could ptrace process `pid` (root always can), else why not.
pub fn may_trace(caller: &Caller, pid: i32) -> Result<(), String> {
    if caller.is_root() {
        return Ok(());
    }
    let Some(caller_pid) = caller.pid else {
        return Err("the caller's pid is unknown".into());
    };
    let caller_caps = read_creds(caller_pid)
        .map_err(|e| format!("reading the caller's credentials: {e}"))?
        .cap_prm;
    let target = read_creds(pid).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => "no such process".to_string(),
        _ => format!("reading its credentials: {e}"),
    })?;
    if let Some(why) = trace_refusal(caller, caller_caps, &target) {
        return Err(why);
    }
    // /proc/PID belongs to root while the process is not dumpable (it ran a setuid program,
    // or asked): then ptrace refuses its owner too.
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map_err(|e| format!("reading /proc/{pid}: {e}"))?
        .uid();
    if owner != caller.uid {
        return Err("it is not dumpable".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1000\n\
        Gid:\t100\t100\t100\t100\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\n";

    fn user() -> Caller {
        Caller {
            uid: 1000,
            gid: 100,
            pid: Some(1),
        }
    }

    #[test]
    fn status_parses() {
        let c = parse_status(STATUS).unwrap();
        assert_eq!(c.uids, [1000; 4]);
        assert_eq!(c.gids, [100; 4]);
        assert_eq!(c.cap_prm, 0);
        let root = STATUS.replace("CapPrm:\t0000000000000000", "CapPrm:\t000001ffffffffff");
        assert_eq!(parse_status(&root).unwrap().cap_prm, 0x1ff_ffff_ffff);
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn a_caller_may_trace_only_its_own_plain_processes() {
        let own = parse_status(STATUS).unwrap();
        assert_eq!(trace_refusal(&user(), 0, &own), None);
        let setuid = Creds {
            uids: [1000, 0, 0, 0],
            ..own
        };
        assert_eq!(
            trace_refusal(&user(), 0, &setuid).unwrap(),
            "it runs as uid 1000/0/0/0"
        );
        let root = Creds {
            uids: [0; 4],
            ..own
        };
        assert_eq!(
            trace_refusal(&user(), 0, &root).unwrap(),
            "it runs as uid 0"
        );
        let setgid = Creds {
            gids: [100, 5, 5, 5],
            ..own
        };
        assert!(trace_refusal(&user(), 0, &setgid).is_some());
        let capable = Creds {
            cap_prm: 1 << 21,
            ..own
        };
        assert!(
            trace_refusal(&user(), 0, &capable)
                .unwrap()
                .contains("capabilities")
        );
        assert_eq!(trace_refusal(&user(), 1 << 21 | 1, &capable), None);
    }

    #[test]
    fn root_may_trace_anything_and_others_not_root() {
        let root = Caller {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert_eq!(may_trace(&root, 1), Ok(()));
        let me = Caller {
            uid: 65534,
            gid: 65534,
            pid: Some(std::process::id() as i32),
        };
        // pid 1 runs as root.
        assert_eq!(may_trace(&me, 1), Err("it runs as uid 0".into()));
        assert_eq!(may_trace(&me, i32::MAX), Err("no such process".into()));
    }
}
