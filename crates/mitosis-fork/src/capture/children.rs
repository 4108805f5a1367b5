//! The seed's own child processes. One that exited and was not reaped is carried: each child
//! of the seed gets such a child with the same status (its pid differs). A running one cannot
//! be (it would have to be forked too): the seed is refused.

use std::fs;

use mitosis_descriptor::{SIG_IGN, SigAction, Zombie};

use crate::prepare::PrepareError;

const SA_NOCLDWAIT: u64 = 2;
/// The core-dump bit of a wait status.
const CORE_DUMPED: i32 = 0x80;

/// One child of the seed, from its /proc/PID/stat.
#[derive(Debug, PartialEq, Eq)]
struct ChildStat {
    comm: String,
    state: char,
    /// Field 38: the signal its parent gets when it exits (0: seen only by __WALL waits).
    exit_signal: i32,
    /// Field 52: its wait status once it exited.
    exit_code: i32,
}

fn parse_stat(text: &str) -> Option<ChildStat> {
    let (head, rest) = text.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is f[N - 3].
    Some(ChildStat {
        comm,
        state: f.first()?.chars().next()?,
        exit_signal: f.get(38 - 3)?.parse().ok()?,
        exit_code: f.get(52 - 3)?.parse().ok()?,
    })
}

/// The seed's exited, unreaped children (not `twin`, its frozen copy). Refuses a seed with a
/// running child, a child that dumped core, or zombies it would not keep (SIGCHLD ignored).
pub fn zombies(pid: i32, twin: i32, sigactions: &[SigAction]) -> Result<Vec<Zombie>, PrepareError> {
    let uncarried = |what: String| PrepareError::Uncarried { pid, what };
    let mut kids: Vec<i32> = Vec::new();
    for tid in crate::procfs::task_ids(pid).unwrap_or_default() {
        let list =
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        kids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    kids.sort_unstable();
    kids.dedup();
    let mut out = Vec::new();
    for kid in kids.into_iter().filter(|&k| k != twin) {
        // Gone meanwhile: reaped by the seed, which runs on.
        let Some(stat) = fs::read_to_string(format!("/proc/{kid}/stat"))
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            continue;
        };
        // Invisible to wait() without __WALL, as a twin (another prepare's, or one a crashed
        // daemon left behind) is.
        if stat.exit_signal == 0 {
            continue;
        }
        if stat.state != 'Z' {
            return Err(uncarried(format!(
                "its child process {kid} ({}) is running: a child of the seed cannot have it",
                stat.comm
            )));
        }
        if stat.exit_code & CORE_DUMPED != 0 {
            return Err(uncarried(format!(
                "its exited child {kid} ({}) dumped core, which a child cannot make again",
                stat.comm
            )));
        }
        out.push(Zombie {
            pid: kid,
            status: stat.exit_code,
        });
    }
    let discards = sigactions.iter().any(|a| {
        a.signal == libc::SIGCHLD as u8 && (a.handler == SIG_IGN || a.flags & SA_NOCLDWAIT != 0)
    });
    if !out.is_empty() && discards {
        return Err(uncarried(
            "it has exited children but ignores SIGCHLD: a child's would be reaped at once".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_stat_line() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "Z".into();
        fields[38 - 3] = "17".into();
        fields[52 - 3] = "1280".into();
        let text = format!("77 (a (b) c) {}\n", fields.join(" "));
        assert_eq!(
            parse_stat(&text),
            Some(ChildStat {
                comm: "a (b) c".into(),
                state: 'Z',
                exit_signal: 17,
                exit_code: 1280,
            })
        );
        assert_eq!(parse_stat("77 (x) Z 1"), None);
    }
}
