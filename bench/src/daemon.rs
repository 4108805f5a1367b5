//! Requests to a testbed host's daemon over its control socket (prepare, drop, evict,
//! status), with the in-process client, and reading what they answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mitosis_client::Client;
use mitosis_testbed::Host;

use crate::procs::RUN_TIMEOUT;

/// A seed prepared on its host.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub handle: String,
    /// Request sent to answer read.
    pub wall: Duration,
    /// Time in the daemon, and time the seed was stopped.
    pub daemon_us: u64,
    pub stopped_us: u64,
    /// The numbers as `mitosis prepare --stats` prints them.
    pub line: String,
}

/// A child's numbers by `--stats` key (times in microseconds).
pub type ChildStats = BTreeMap<&'static str, u64>;

fn client(host: &Host) -> Result<Client> {
    Ok(Client::connect(host.socket_path())?.with_timeout(RUN_TIMEOUT)?)
}

/// How long a bundle's seed may take to get warm.
const BUNDLE_READY: Duration = Duration::from_secs(30);

/// What a prepare captures.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A process already running on the seed's host.
    Process(u32),
    /// An OCI bundle the daemon starts in a container (a new seed process every time).
    Bundle(&'a Path),
}

/// Prepares `origin` on `host` as a (new) seed.
pub fn prepare(host: &Host, origin: Origin) -> Result<Prepared> {
    let client = client(host)?;
    let t = Instant::now();
    let (handle, s) = match origin {
        Origin::Process(pid) => client.prepare_pid(pid as i32),
        Origin::Bundle(dir) => client.prepare_bundle(dir, BUNDLE_READY),
    }
    .context("prepare")?;
    Ok(Prepared {
        handle,
        wall: t.elapsed(),
        daemon_us: s.total_us,
        stopped_us: s.stopped_us,
        line: format!(
            "mitosis: prepared in {}us (seed stopped {}us), {} mappings, {} pages, descriptor {} bytes",
            s.total_us, s.stopped_us, s.vmas, s.seed_pages, s.descriptor_bytes
        ),
    })
}

/// Stops serving a seed of `host`.
pub fn drop_seed(host: &Host, handle: &str) -> Result<()> {
    client(host)?.drop_seed(handle).context("drop")
}

/// Forgets `host`'s replica of the seed behind `handle`.
pub fn evict(host: &Host, handle: &str) -> Result<()> {
    client(host)?.evict(handle).context("evict")
}

/// What `host`'s daemon reports.
pub fn status(host: &Host) -> Result<Status> {
    let text = client(host)?.status().context("status")?;
    Ok(Status::parse(&text))
}

/// What the daemon's status text says that the benchmark uses.
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
fn number_after(line: &str, key: &str) -> Option<u64> {
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
    fn status_text() {
        let text = "listen 10.77.0.2:7070\nseeds 0\nchildren running 0\nchildren started 12\nbytes served 409600\nreplica 3@10.77.0.1:7070 pid 4242 pages 5120 children 0\npool 10.77.0.1:7070 idle 2\n";
        let status = Status::parse(text);
        assert_eq!(status.bytes_served, Some(409_600));
        assert_eq!(status.replicas, vec![(3, 5120)]);
        assert_eq!(Status::parse("seeds 0\n"), Status::default());
        assert_eq!(number_after("pages 12 x", "pages "), Some(12));
        assert_eq!(number_after("pages x", "nothing "), None);
    }

    #[test]
    fn handle_ids() {
        assert_eq!(handle_seed_id("mitosis://10.77.0.1:7070/12/00ff"), Some(12));
        assert_eq!(handle_seed_id("http://x/1/2"), None);
    }
}
