//! Process-wide kernel state: signal dispositions, resource limits and the umask.

use std::fs;

use mitosis_descriptor::{ProcessState, Rlimit, SIG_IGN, Scheduling, SigAction};
use mitosis_sys::mem::RemoteMemory;
use mitosis_sys::ptrace::Tracee;
use mitosis_sys::task;

use super::threads::SCRATCH_BELOW_SP;
use crate::prepare::PrepareError;

/// A hexadecimal signal set from /proc/PID/status (`SigCgt`, `SigIgn`).
fn sigset(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| u64::from_str_radix(v.trim_start_matches(':').trim(), 16).ok())
        .unwrap_or(0)
}

fn signals(set: u64) -> impl Iterator<Item = u8> {
    (1..=64u8).filter(move |s| set & (1 << (s - 1)) != 0)
}

/// Reads the dispositions, limits and umask of `pid`. Handlers are read by running
/// `rt_sigaction` in its twin (`twin`, stopped), which has a copy of the seed's handlers; the
/// twin's stack below the red zone takes the answers.
pub fn capture(pid: i32, twin: &mut Tracee, insn: u64) -> Result<ProcessState, PrepareError> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).map_err(|source| PrepareError::Proc { path, source })?;
    let twin_pid = twin.pid();
    let inject = |what| {
        move |source| PrepareError::Inject {
            pid: twin_pid,
            what,
            source,
        }
    };
    let mem = RemoteMemory::open(twin_pid, false).map_err(inject("opening the twin's memory"))?;
    let saved = twin.regs().map_err(inject("reading registers"))?;
    let scratch = (saved.rsp - SCRATCH_BELOW_SP) & !15;
    let mut sigactions = Vec::new();
    for signal in signals(sigset(&status, "SigCgt")) {
        let r = twin
            .syscall(
                insn,
                libc::SYS_rt_sigaction,
                [signal as u64, 0, scratch, 8, 0, 0],
            )
            .map_err(inject("reading a signal handler"))?;
        if r.ret < 0 {
            continue;
        }
        let mut raw = [0u8; 32];
        mem.read_exact(scratch, &mut raw)
            .map_err(inject("reading a signal handler"))?;
        let word = |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8"));
        sigactions.push(SigAction {
            signal,
            handler: word(0),
            flags: word(1),
            restorer: word(2),
            mask: word(3),
        });
    }
    // What the twin shows from outside, as exactly as it would answer it itself: each syscall
    // injected into it costs about 120 µs here (its stop, wake-up and our wait), five of them
    // half of a small seed's prepare.
    let mut twin_proc = TwinProc::read(twin_pid)?;
    // Process-wide, in the mm or task the twin copied: the twin answers for the seed.
    let mut ask = |nr: i64, arg: u64, what| {
        twin.syscall(insn, nr, [arg, 0, 0, 0, 0, 0])
            .map(|r| r.ret)
            .map_err(inject(what))
    };
    let dumpable = ask(
        libc::SYS_prctl,
        libc::PR_GET_DUMPABLE as u64,
        "reading the dumpable flag",
    )?;
    // A kernel whose status lacks THP_enabled (before 5.0): asked.
    if twin_proc.thp_disabled.is_none() {
        let thp = ask(
            libc::SYS_prctl,
            libc::PR_GET_THP_DISABLE as u64,
            "reading the THP flag",
        )?;
        twin_proc.thp_disabled = Some(thp == 1);
    }
    twin.set_regs(&saved)
        .map_err(inject("restoring registers"))?;
    if dumpable < 0 {
        return Err(PrepareError::Inject {
            pid: twin_pid,
            what: "reading the dumpable flag",
            source: std::io::Error::from_raw_os_error(-dumpable as i32),
        });
    }
    for signal in signals(sigset(&status, "SigIgn")) {
        sigactions.push(SigAction {
            signal,
            handler: SIG_IGN,
            flags: 0,
            restorer: 0,
            mask: 0,
        });
    }
    sigactions.sort_by_key(|a| a.signal);
    // /proc, not prlimit(2): prlimit on another user's process needs CAP_SYS_RESOURCE, which
    // root may lack (as in some containers).
    let path = format!("/proc/{pid}/limits");
    let limits = fs::read_to_string(&path).map_err(|source| PrepareError::Proc {
        path: path.clone(),
        source,
    })?;
    let rlimits = parse_limits(&limits).map_err(|reason| PrepareError::Malformed {
        pid,
        reason: crate::prepare::MalformedProc(format!("{path}: {reason}")),
    })?;
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0o022);
    Ok(ProcessState {
        sigactions,
        rlimits,
        umask,
        dumpable: dumpable as u8,
        thp_disabled: twin_proc.thp_disabled.unwrap_or(false),
        personality: twin_proc.personality,
        // Read in the seed (fork does not pass them on): set by the caller.
        child_subreaper: false,
        pending: Vec::new(),
        itimers: Vec::new(),
        posix_timers: Vec::new(),
        sched: scheduling(pid, &twin_proc)?,
        zombies: Vec::new(),
    })
}

/// What the twin (a frozen copy of the seed's main thread and memory) shows in /proc and to
/// ioprio_get: what PR_GET_THP_DISABLE, personality(0xffffffff), PR_MCE_KILL_GET and
/// ioprio_get(IOPRIO_WHO_PROCESS, 0) would answer in it.
struct TwinProc {
    /// `None` where /proc does not say (its status lacks THP_enabled).
    thp_disabled: Option<bool>,
    personality: u32,
    /// PR_MCE_KILL_LATE (0), PR_MCE_KILL_EARLY (1) or PR_MCE_KILL_DEFAULT (2).
    mce_kill: u8,
    ioprio: u32,
}

/// `PF_MCE_PROCESS` and `PF_MCE_EARLY` in a task's flags (`/proc/PID/stat` field 9): what
/// PR_MCE_KILL sets and PR_MCE_KILL_GET reads.
const PF_MCE_PROCESS: u64 = 0x80;
const PF_MCE_EARLY: u64 = 0x0800_0000;

impl TwinProc {
    fn read(twin: i32) -> Result<Self, PrepareError> {
        let read = |name: &str| {
            let path = format!("/proc/{twin}/{name}");
            fs::read_to_string(&path).map_err(|source| PrepareError::Proc { path, source })
        };
        let malformed = |what: &str| PrepareError::Malformed {
            pid: twin,
            reason: crate::prepare::MalformedProc(format!("/proc/{twin}/{what}")),
        };
        // "THP_enabled: 0" exactly when PR_SET_THP_DISABLE turned it off for the process.
        let thp_disabled = read("status")?
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim() == "0");
        let personality = u32::from_str_radix(read("personality")?.trim(), 16)
            .map_err(|_| malformed("personality"))?;
        let flags: u64 = read("stat")?
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(9 - 3)?.parse().ok())
            .ok_or_else(|| malformed("stat"))?;
        let mce_kill = match (flags & PF_MCE_PROCESS != 0, flags & PF_MCE_EARLY != 0) {
            (false, _) => 2,
            (true, early) => early as u8,
        };
        // An older kernel refusing the call reads as the default.
        let ioprio = mitosis_sys::task::io_priority(twin).unwrap_or(0).max(0) as u32;
        Ok(TwinProc {
            thp_disabled,
            personality,
            mce_kill,
            ioprio,
        })
    }
}

/// The seed's scheduling settings: nice, policy and RT priority from its stat, the OOM score
/// adjustment and core dump filter from /proc, and what the twin shows.
fn scheduling(pid: i32, twin: &TwinProc) -> Result<Scheduling, PrepareError> {
    let read = |name: &str| {
        let path = format!("/proc/{pid}/{name}");
        fs::read_to_string(&path).map_err(|source| PrepareError::Proc { path, source })
    };
    let malformed = |what: &str| PrepareError::Malformed {
        pid,
        reason: crate::prepare::MalformedProc(format!("/proc/{pid}/{what}")),
    };
    let stat = read("stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // `fields` starts at field 3 (state): field N is fields[N - 3].
    let field = |n: usize| -> Result<i64, PrepareError> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| malformed("stat"))
    };
    let oom_score_adj = read("oom_score_adj")?
        .trim()
        .parse()
        .map_err(|_| malformed("oom_score_adj"))?;
    let coredump_filter = u32::from_str_radix(read("coredump_filter")?.trim(), 16)
        .map_err(|_| malformed("coredump_filter"))?;
    let policy = field(41)? as u32;
    // SCHED_DEADLINE needs sched_setattr with its runtime and period, which /proc lacks.
    if policy == 6 {
        return Err(PrepareError::Uncarried {
            pid,
            what: "it runs under SCHED_DEADLINE".into(),
        });
    }
    Ok(Scheduling {
        nice: field(19)? as i8,
        rt_priority: field(40)? as u32,
        policy,
        ioprio: twin.ioprio,
        mce_kill: twin.mce_kill,
        oom_score_adj,
        coredump_filter,
    })
}

/// Parses /proc/PID/limits: a header, then one line per resource in RLIMIT_* order, soft and
/// hard limits at fixed columns (`%-25s %-20s %-20s`), "unlimited" for RLIM_INFINITY.
pub fn parse_limits(text: &str) -> Result<Vec<Rlimit>, String> {
    let value = |v: &str| match v {
        "unlimited" => Ok(u64::MAX),
        n => n.parse().map_err(|_| format!("unreadable limit {n:?}")),
    };
    let rlimits: Vec<Rlimit> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(resource, line)| {
            let mut values = line.get(26..).unwrap_or("").split_whitespace();
            let (Some(soft), Some(hard)) = (values.next(), values.next()) else {
                return Err(format!("unreadable limits line {line:?}"));
            };
            Ok(Rlimit {
                resource: resource as u8,
                soft: value(soft)?,
                hard: value(hard)?,
            })
        })
        .collect::<Result<_, _>>()?;
    if rlimits.len() != task::RLIMITS as usize {
        return Err(format!("{} limits, not {}", rlimits.len(), task::RLIMITS));
    }
    Ok(rlimits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_match_getrlimit() {
        let parsed = parse_limits(&fs::read_to_string("/proc/self/limits").unwrap()).unwrap();
        let direct = task::rlimits(std::process::id() as i32).unwrap();
        let direct: Vec<Rlimit> = direct
            .into_iter()
            .map(|(resource, soft, hard)| Rlimit {
                resource: resource as u8,
                soft,
                hard,
            })
            .collect();
        assert_eq!(parsed, direct);
        assert!(parse_limits("Limit\nMax cpu time              12").is_err());
    }

    #[test]
    fn signal_sets_from_status() {
        let status = "Name:\tx\nSigIgn:\t0000000000001002\nSigCgt:\t0000000180004a07\n";
        assert_eq!(
            signals(sigset(status, "SigIgn")).collect::<Vec<_>>(),
            [2, 13]
        );
        assert_eq!(
            signals(sigset(status, "SigCgt")).collect::<Vec<_>>(),
            [1, 2, 3, 10, 12, 15, 32, 33]
        );
    }
}
