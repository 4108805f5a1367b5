//! Driving the `mitosis` CLI on a testbed host, and reading what it prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use mitosis_testbed::Host;

use crate::procs::run_ok;

/// The `mitosis` binary.
pub struct Mitosis {
    pub bin: PathBuf,
}

/// A seed prepared by `mitosis prepare --stats`.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub handle: String,
    /// Wall time of the CLI.
    pub wall: Duration,
    /// From its `mitosis: prepared` line: time in the daemon and time the seed was stopped.
    pub daemon_us: Option<u64>,
    pub stopped_us: Option<u64>,
    pub line: String,
}

/// The `--stats` line of `mitosis resume`: `key=value` pairs (times in microseconds).
pub type ResumeStats = BTreeMap<String, u64>;

impl Mitosis {
    /// `mitosis --socket SOCKET` on `host`.
    pub fn command(&self, host: &Host) -> Command {
        let mut cmd = host.command(&self.bin);
        cmd.arg("--socket").arg(host.socket_path());
        cmd
    }

    /// `mitosis resume HANDLE --stats` on `host`.
    pub fn resume(&self, host: &Host, handle: &str) -> Command {
        let mut cmd = self.command(host);
        cmd.args(["resume", handle, "--stats"]);
        cmd
    }

    /// Prepares process `pid` on `host` as a (new) seed.
    pub fn prepare(&self, host: &Host, pid: u32) -> Result<Prepared> {
        let mut cmd = self.command(host);
        cmd.args(["prepare", "--pid", &pid.to_string(), "--stats"]);
        let (wall, stdout, stderr) = run_ok(cmd).context("mitosis prepare")?;
        let handle = stdout.lines().next().unwrap_or("").trim().to_owned();
        anyhow::ensure!(
            handle.starts_with("mitosis://"),
            "mitosis prepare printed no handle (stdout {stdout:?}, stderr {stderr:?})"
        );
        let line = stderr
            .lines()
            .find(|l| l.starts_with("mitosis: prepare"))
            .unwrap_or("")
            .to_owned();
        Ok(Prepared {
            handle,
            wall,
            daemon_us: number_after(&line, "prepared in "),
            stopped_us: number_after(&line, "seed stopped "),
            line,
        })
    }

    /// `mitosis drop HANDLE` on the seed's host.
    pub fn drop_seed(&self, host: &Host, handle: &str) -> Result<()> {
        let mut cmd = self.command(host);
        cmd.args(["drop", handle]);
        run_ok(cmd).context("mitosis drop").map(drop)
    }

    /// `mitosis status` on `host`.
    pub fn status(&self, host: &Host) -> Result<Status> {
        let mut cmd = self.command(host);
        cmd.arg("status");
        let (_, stdout, _) = run_ok(cmd).context("mitosis status")?;
        Ok(Status::parse(&stdout))
    }
}

/// What `mitosis status` reports that the benchmark uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    pub bytes_served: Option<u64>,
    /// `(seed id, pages)` of each replica this host holds.
    pub replicas: Vec<(u64, u64)>,
}

impl Status {
    pub fn parse(text: &str) -> Self {
        let mut status = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("bytes served ") {
                status.bytes_served = rest.trim().parse().ok();
            } else if let Some(rest) = line.strip_prefix("replica ") {
                // replica ID@HOST:PORT pid P pages N children C
                let id = rest.split('@').next().and_then(|id| id.parse().ok());
                if let (Some(id), Some(pages)) = (id, number_after(rest, " pages ")) {
                    status.replicas.push((id, pages));
                }
            }
        }
        status
    }
}

/// The `key=value` pairs of the `mitosis: stats` line in a resume's stderr.
pub fn parse_resume_stats(stderr: &str) -> Option<ResumeStats> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("mitosis: stats "))?;
    let stats: ResumeStats = line
        .split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    (!stats.is_empty()).then_some(stats)
}

/// The seed id in a handle `mitosis://HOST:PORT/ID/KEY`.
pub fn handle_seed_id(handle: &str) -> Option<u64> {
    handle
        .strip_prefix("mitosis://")?
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// The decimal number right after the first `key` in `line`.
pub fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_stats_line() {
        let stderr = "some warning\nmitosis: stats resume_us=14600 cached=1 attach_us=90 descriptor_us=0 build_us=0 spawn_us=0 restore_us=0 eager_pages=0 working_set_pages=0 working_set_us=0 fork_us=800 faults=321 zero_faults=20 fetches=17 pages_fetched=300 fetch_us=9000\n";
        let stats = parse_resume_stats(stderr).unwrap();
        assert_eq!(stats["resume_us"], 14600);
        assert_eq!(stats["cached"], 1);
        assert_eq!(stats["fork_us"], 800);
        assert_eq!(stats["faults"], 321);
        assert_eq!(stats["fetches"], 17);
        assert_eq!(stats["pages_fetched"], 300);
        assert_eq!(stats.len(), 16);
        assert_eq!(parse_resume_stats("mitosis: child killed: gone\n"), None);
        assert_eq!(parse_resume_stats("mitosis: stats \n"), None);
        // A malformed pair is skipped, the rest kept.
        let odd = parse_resume_stats("mitosis: stats a=1 b=x c\n").unwrap();
        assert_eq!(odd.len(), 1);
    }

    #[test]
    fn prepare_line() {
        let prepare = "mitosis: prepared in 28566us (seed stopped 1330us), 255 mappings, 4201 pages, descriptor 36511 bytes";
        assert_eq!(number_after(prepare, "prepared in "), Some(28566));
        assert_eq!(number_after(prepare, "seed stopped "), Some(1330));
        assert_eq!(number_after(prepare, "nothing "), None);
    }

    #[test]
    fn status_text() {
        let text = "listen 10.77.0.2:7070\nseeds 0\nchildren running 0\nchildren started 12\nbytes served 409600\nreplica 3@10.77.0.1:7070 pid 4242 pages 5120 children 0\npool 10.77.0.1:7070 idle 2\n";
        let status = Status::parse(text);
        assert_eq!(status.bytes_served, Some(409_600));
        assert_eq!(status.replicas, vec![(3, 5120)]);
        assert_eq!(Status::parse("seeds 0\n"), Status::default());
    }

    #[test]
    fn handle_ids() {
        assert_eq!(handle_seed_id("mitosis://10.77.0.1:7070/12/00ff"), Some(12));
        assert_eq!(handle_seed_id("http://x/1/2"), None);
    }
}
