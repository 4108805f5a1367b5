//! Timers of a seed: interval and POSIX timers, and timerfds brought up to date before
//! their fdinfo is read.

use std::fs;

use mitosis_descriptor::{IntervalTimer, PosixTimer};
use mitosis_sys::ptrace::Tracee;

use super::threads::SCRATCH_BELOW_SP;
use crate::prepare::PrepareError;
use crate::regs::{RestartFor, resume_point};

/// The descriptors of `pid` that are timerfds.
fn timerfds(pid: i32) -> Vec<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[timerfd]"))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Has stopped thread `t` of `pid` ask each of its timerfds for its time left. A periodic
/// timerfd that expired is only moved to its next expiry when it is read or asked: until
/// then its fdinfo shows no time left (as if disarmed) and too few expirations. Asking
/// changes nothing the seed can see (a read counts the same expirations either way).
pub fn bring_timerfds_up_to_date(pid: i32, t: &mut Tracee, insn: u64) -> Result<(), PrepareError> {
    let fds = timerfds(pid);
    if fds.is_empty() {
        return Ok(());
    }
    let tid = t.pid();
    let inject = |source| PrepareError::Inject {
        pid: tid,
        what: "asking a timerfd for its time left",
        source,
    };
    let regs = t.regs().map_err(inject)?;
    let scratch = (regs.rsp - SCRATCH_BELOW_SP) & !15;
    let mut asked = Ok(());
    for fd in fds {
        // A descriptor closed meanwhile answers EBADF: nothing to bring up to date.
        asked = t
            .syscall(insn, libc::SYS_timerfd_gettime, [fd, scratch, 0, 0, 0, 0])
            .map(|_| ());
        if asked.is_err() {
            break;
        }
    }
    t.set_regs(&resume_point(&regs, RestartFor::SameTask))
        .map_err(inject)?;
    asked.map_err(inject)
}

/// A timer's notification as /proc/PID/timers shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimerEntry {
    id: i32,
    signal: u8,
    value: u64,
    /// `sigev_notify` (SIGEV_THREAD_ID included), and the pid or tid it names.
    notify: i32,
    target: i32,
    clock: i32,
}

/// Parses /proc/PID/timers: blocks of `ID: n`, `signal: signo/value`, `notify:
/// how/pid.N` or `how/tid.N`, `ClockID: n`.
pub(crate) fn parse_timers(text: &str) -> Result<Vec<TimerEntry>, String> {
    let mut out = Vec::new();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(id) = lines.next() {
        let bad = || format!("unreadable timer entry at {id:?}");
        let mut field = |name: &str| {
            let line = lines.next().ok_or_else(bad)?;
            line.strip_prefix(name)
                .map(str::trim)
                .map(str::to_string)
                .ok_or_else(bad)
        };
        let id: i32 = id
            .strip_prefix("ID:")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(bad)?;
        let signal = field("signal:")?;
        let notify = field("notify:")?;
        let clock = field("ClockID:")?;
        let (signo, value) = signal.split_once('/').ok_or_else(bad)?;
        let (how, target) = notify.split_once('/').ok_or_else(bad)?;
        let base = match how {
            "signal" => libc::SIGEV_SIGNAL,
            "none" => libc::SIGEV_NONE,
            "thread" => libc::SIGEV_THREAD,
            _ => return Err(bad()),
        };
        let (kind, target) = target.split_once('.').ok_or_else(bad)?;
        out.push(TimerEntry {
            id,
            signal: signo.parse().map_err(|_| bad())?,
            value: u64::from_str_radix(value, 16).map_err(|_| bad())?,
            notify: base
                | if kind == "tid" {
                    libc::SIGEV_THREAD_ID
                } else {
                    0
                },
            target: target.parse().map_err(|_| bad())?,
            clock: clock.parse().map_err(|_| bad())?,
        });
    }
    Ok(out)
}

const NANOS: u64 = 1_000_000_000;

/// The seed's interval timers and POSIX timers, read in its stopped thread `t` (a fork
/// inherits neither, so its twin cannot answer). `tids` are the seed's threads, in the
/// descriptor's order. A timer a child could not have (on a CPU-time clock, or signalling a
/// thread that is gone) is refused.
pub fn capture(
    pid: i32,
    t: &mut Tracee,
    mem: &mitosis_sys::mem::RemoteMemory,
    insn: u64,
    tids: &[i32],
) -> Result<(Vec<IntervalTimer>, Vec<PosixTimer>), PrepareError> {
    let path = format!("/proc/{pid}/timers");
    let entries = match fs::read_to_string(&path) {
        Ok(text) => parse_timers(&text).map_err(|r| PrepareError::Malformed {
            pid,
            reason: crate::prepare::MalformedProc(format!("{path}: {r}")),
        })?,
        // Without CONFIG_CHECKPOINT_RESTORE there is no such file.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(PrepareError::Proc { path, source }),
    };
    let tid = t.pid();
    let inject = |source| PrepareError::Inject {
        pid: tid,
        what: "reading the timers",
        source,
    };
    let regs = t.regs().map_err(inject)?;
    let scratch = (regs.rsp - SCRATCH_BELOW_SP) & !15;
    let read = |t: &mut Tracee, nr: i64, arg: u64, unit: u64| {
        let r = t.syscall(insn, nr, [arg, scratch, 0, 0, 0, 0])?;
        if r.ret < 0 {
            return Err(std::io::Error::from_raw_os_error(-r.ret as i32));
        }
        let mut b = [0u8; 32];
        mem.read_exact(scratch, &mut b)?;
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
        // (interval, value), each as (seconds, sub-second units).
        Ok((w(2) * NANOS + w(3) * unit, w(0) * NANOS + w(1) * unit))
    };
    let mut asked = || -> std::io::Result<_> {
        let mut itimers = Vec::new();
        for which in 0..3u8 {
            let (value_ns, interval_ns) = read(t, libc::SYS_getitimer, which as u64, 1000)?;
            if value_ns != 0 {
                itimers.push(IntervalTimer {
                    which,
                    value_ns,
                    interval_ns,
                });
            }
        }
        let mut times = Vec::new();
        for e in &entries {
            times.push(read(t, libc::SYS_timer_gettime, e.id as u64, 1)?);
        }
        Ok((itimers, times))
    };
    let asked = asked();
    t.set_regs(&resume_point(&regs, RestartFor::SameTask))
        .map_err(inject)?;
    let (itimers, times) = asked.map_err(inject)?;
    let mut timers = Vec::new();
    for (e, (value_ns, interval_ns)) in entries.iter().zip(times) {
        let refuse = |what: String| PrepareError::Unsupported { pid, what };
        if !matches!(
            e.clock,
            libc::CLOCK_REALTIME
                | libc::CLOCK_MONOTONIC
                | libc::CLOCK_BOOTTIME
                | libc::CLOCK_REALTIME_ALARM
                | libc::CLOCK_BOOTTIME_ALARM
                | libc::CLOCK_TAI
        ) {
            return Err(refuse(format!("POSIX timer {} on clock {}", e.id, e.clock)));
        }
        let thread = if e.notify & libc::SIGEV_THREAD_ID != 0 {
            tids.iter()
                .position(|&t| t == e.target)
                .ok_or_else(|| refuse(format!("POSIX timer {} signals a thread gone", e.id)))?
        } else {
            0
        };
        if e.notify & !libc::SIGEV_THREAD_ID == libc::SIGEV_THREAD {
            return Err(refuse(format!("POSIX timer {} with SIGEV_THREAD", e.id)));
        }
        timers.push(PosixTimer {
            id: e.id,
            clock: e.clock,
            notify: e.notify,
            signal: e.signal,
            value: e.value,
            thread: thread as u32,
            value_ns,
            interval_ns,
        });
    }
    Ok((itimers, timers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_file_entries() {
        let text = "ID: 1\nsignal: 10/00000000deadbeef\nnotify: signal/pid.77\nClockID: 1\n\
                    ID: 2\nsignal: 14/0000000000000000\nnotify: none/pid.77\nClockID: 0\n\
                    ID: 3\nsignal: 34/0000000000000002\nnotify: signal/tid.78\nClockID: 7\n";
        let t = parse_timers(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            (t[0].id, t[0].signal, t[0].value, t[0].notify, t[0].target),
            (1, 10, 0xdead_beef, libc::SIGEV_SIGNAL, 77)
        );
        assert_eq!((t[1].notify, t[1].clock), (libc::SIGEV_NONE, 0));
        assert_eq!((t[2].notify, t[2].target, t[2].clock), (4, 78, 7));
        assert!(parse_timers("ID: 1\nsignal: x\n").is_err());
        assert!(parse_timers("").unwrap().is_empty());
    }
}
