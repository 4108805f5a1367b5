//! What the end-to-end tests read of a process in /proc: its threads, their signal state, its
//! descriptors; and a report of its threads for failure messages.

use std::collections::BTreeSet;
use std::time::Duration;

use super::eventually;

/// Every process's pid, as /proc lists them now.
pub fn all_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
}

/// One line per thread of `pid`: tid, name, state, wait channel and system call (for
/// failure messages).
pub fn threads_report(pid: i32) -> String {
    let read = |tid: i32, file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{file}"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(pid {pid} is gone)");
    };
    tasks
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(|tid| {
            let state = task_state(pid, tid).unwrap_or('?');
            let status = read(tid, "status");
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                    .unwrap_or("?")
                    .trim()
                    .to_string()
            };
            format!(
                "{tid} {} {state} wchan={} syscall={} blocked={} pending={} shared-pending={}",
                read(tid, "comm"),
                read(tid, "wchan"),
                read(tid, "syscall"),
                field("SigBlk"),
                field("SigPnd"),
                field("ShdPnd"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until every thread of `pid` sleeps, none of them on a page fault. A runtime that
/// runs its signal handlers between bytecodes (CPython) misses a signal that lands after its
/// last check and before a blocking read: the low-level handler notes it, and the read then
/// blocks until input comes. A child's first page faults after an answer widen that window,
/// so a test that signals right after an answer would see the handler run only with the next
/// request.
pub fn wait_until_idle(pid: i32, limit: Duration) {
    let idle = || {
        task_ids(pid).into_iter().all(|tid| {
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan"))
                .unwrap_or_default();
            task_state(pid, tid) == Some('S') && !wchan.contains("userfault")
        })
    };
    assert!(
        eventually(limit, idle),
        "the child never went idle:\n{}",
        threads_report(pid)
    );
}

/// The state letter of task `tid` of `pid` ('R', 'S', 'D', ...), if it still exists.
pub fn task_state(pid: i32, tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

pub fn task_ids(pid: i32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The value of `key:` in /proc/PID/status (or /proc/PID/task/TID/status).
pub fn status_of(path: &str, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in {path}"))
        .trim()
        .to_string()
}

/// What a process-wide comparison between a seed and its child looks at: signal dispositions
/// (ignored, caught), umask, and every resource limit.
#[derive(Debug, PartialEq)]
pub struct ProcessState {
    pub sig_ign: String,
    pub sig_cgt: String,
    pub umask: String,
    pub limits: String,
}

pub fn process_state(pid: i32) -> ProcessState {
    let status = format!("/proc/{pid}/status");
    ProcessState {
        sig_ign: status_of(&status, "SigIgn"),
        sig_cgt: status_of(&status, "SigCgt"),
        umask: status_of(&status, "Umask"),
        limits: std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits"),
    }
}

/// The blocked-signal masks of all threads of `pid`, sorted (a multiset: which thread has
/// which mask is checked where the threads can be told apart).
pub fn thread_masks(pid: i32) -> Vec<String> {
    let mut masks: Vec<String> = task_ids(pid)
        .into_iter()
        .map(|tid| status_of(&format!("/proc/{pid}/task/{tid}/status"), "SigBlk"))
        .collect();
    masks.sort();
    masks
}

/// What descriptor `fd` of `pid` is: the link target without inode numbers, its open flags,
/// and for an eventfd its count, for an epoll set its targets (fd, events, data), for a timerfd
/// its clock and interval, for a signalfd its signals.
pub fn describe_fd(pid: i32, fd: i32) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    let kind = match link.split_once(":[") {
        Some((kind @ ("pipe" | "socket"), _)) => kind.to_string(),
        _ => link,
    };
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    let mut out = vec![kind];
    let mut targets = Vec::new();
    for line in info.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["flags:", flags] => out.push(format!("flags {flags}")),
            ["eventfd-count:", count] => out.push(format!("count {count}")),
            ["clockid:", clock] => out.push(format!("clock {clock}")),
            ["it_interval:", secs, nanos] => out.push(format!("every {secs}{nanos}")),
            ["sigmask:", mask] => out.push(format!("taking {mask}")),
            ["tfd:", tfd, "events:", events, "data:", data, ..] => {
                targets.push(format!("{tfd}:{events}:{data}"))
            }
            _ => {}
        }
    }
    targets.sort();
    if !targets.is_empty() {
        out.push(format!("watching {}", targets.join(",")));
    }
    out.join(" ")
}

pub fn fd_numbers(pid: i32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Descriptors of the child that the seed did not have at their number (leftovers of its
/// making, such as a userfaultfd), and any userfaultfd at all; should be empty.
pub fn foreign_fds(child: i32, seed: i32) -> Vec<String> {
    let seed_fds = fd_numbers(seed);
    fd_numbers(child)
        .into_iter()
        .map(|fd| (fd, describe_fd(child, fd)))
        .filter(|(fd, what)| !seed_fds.contains(fd) || what.contains("userfaultfd"))
        .map(|(fd, what)| format!("{fd}: {what}"))
        .collect()
}
