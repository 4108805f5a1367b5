//! A ledger of the twins this daemon holds, so that the next daemon can reap them if this one
//! crashes.
//!
//! A twin is its seed's child without an exit signal: when its tracer (this daemon) dies, the
//! kernel kills it (PTRACE_O_EXITKILL) and it stays a zombie of the seed for as long as the
//! seed lives, since only its parent can reap it and the seed never waits for it. The ledger
//! (one line per twin: seed pid, seed start time, twin pid, twin start time) sits beside the
//! control socket; a daemon starting up reaps every zombie twin it lists whose processes are
//! still the ones it recorded, then starts a fresh ledger.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A twin as the ledger records it: start times tell a reused pid from the process we meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TwinRecord {
    pub seed_pid: i32,
    pub seed_start: u64,
    pub twin_pid: i32,
    pub twin_start: u64,
}

impl TwinRecord {
    /// The record of twin `twin_pid` of seed `seed_pid`, both alive now.
    pub fn of(seed_pid: i32, twin_pid: i32) -> io::Result<Self> {
        Ok(TwinRecord {
            seed_pid,
            seed_start: start_time(seed_pid)?,
            twin_pid,
            twin_start: start_time(twin_pid)?,
        })
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.seed_pid, self.seed_start, self.twin_pid, self.twin_start
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let mut f = line.split_whitespace();
        let record = TwinRecord {
            seed_pid: f.next()?.parse().ok()?,
            seed_start: f.next()?.parse().ok()?,
            twin_pid: f.next()?.parse().ok()?,
            twin_start: f.next()?.parse().ok()?,
        };
        f.next().is_none().then_some(record)
    }

    /// True while both processes are the ones recorded.
    fn still_ours(&self) -> bool {
        start_time(self.seed_pid).ok() == Some(self.seed_start)
            && start_time(self.twin_pid).ok() == Some(self.twin_start)
    }
}

/// A process's start time in clock ticks since boot (/proc/PID/stat field 22).
fn start_time(pid: i32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/stat")))
}

/// The twins of this daemon, mirrored to a file.
pub struct TwinLedger {
    path: PathBuf,
    twins: Mutex<BTreeSet<TwinRecord>>,
}

impl TwinLedger {
    /// A ledger at `path` (created 0600 on first write).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TwinLedger {
            path: path.into(),
            twins: Mutex::new(BTreeSet::new()),
        }
    }

    /// The twins a previous daemon recorded at `path` (none if it left no ledger).
    pub fn left_at(path: &Path) -> Vec<TwinRecord> {
        fs::read_to_string(path)
            .map(|text| text.lines().filter_map(TwinRecord::parse).collect())
            .unwrap_or_default()
    }

    /// Reaps the zombie twins a crashed daemon left (`reap` does one; it runs on the tracer
    /// thread). Returns how many were reaped.
    pub fn reap_left(records: &[TwinRecord], reap: impl Fn(i32, i32) -> bool) -> usize {
        records
            .iter()
            .filter(|r| r.still_ours() && reap(r.seed_pid, r.twin_pid))
            .count()
    }

    pub fn add(&self, record: TwinRecord) {
        let mut twins = self.twins.lock().expect("ledger lock");
        twins.insert(record);
        self.write(&twins);
    }

    pub fn remove(&self, twin_pid: i32) {
        let mut twins = self.twins.lock().expect("ledger lock");
        twins.retain(|r| r.twin_pid != twin_pid);
        self.write(&twins);
    }

    /// Rewrites the file (small: one line per seed). A failure only loses the crash cleanup.
    fn write(&self, twins: &BTreeSet<TwinRecord>) {
        let text: String = twins.iter().map(TwinRecord::line).collect();
        let tmp = self.path.with_extension("twins.new");
        let written = {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .and_then(|_| fs::rename(&tmp, &self.path))
        };
        if let Err(e) = written {
            tracing::warn!("recording twins in {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_skipped() {
        let dir = std::env::temp_dir().join(format!("mitosis-ledger-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.twins");
        let ledger = TwinLedger::new(&path);
        let me = std::process::id() as i32;
        let record = TwinRecord::of(me, me).unwrap();
        ledger.add(record);
        ledger.add(TwinRecord {
            twin_pid: 7,
            ..record
        });
        ledger.remove(7);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("not a record\n1 2 3\n");
        fs::write(&path, text).unwrap();
        assert_eq!(TwinLedger::left_at(&path), vec![record]);
        // Our own process is no zombie child of ours: nothing to reap, and `reap` is only
        // asked about records whose processes are still the recorded ones.
        let stale = TwinRecord {
            twin_start: record.twin_start + 1,
            ..record
        };
        assert_eq!(TwinLedger::reap_left(&[stale], |_, _| true), 0);
        assert_eq!(TwinLedger::reap_left(&[record], |_, _| false), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
