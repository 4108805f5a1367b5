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

/// Prepares process `pid` on `host` as a seed of `profile`: its handle and the pages carried
/// over from earlier seeds of the profile.
pub fn prepare_profiled(host: &Host, pid: u32, profile: &str) -> Result<(String, u64)> {
    let (handle, s) = client(host)?
        .prepare_pid_profiled(pid as i32, profile)
        .context("prepare --profile")?;
    Ok((handle, s.carried_pages))
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
    Ok(Status::from(&client(host)?.status().context("status")?))
}

/// What the daemon's status says that the benchmark uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    pub bytes_served: Option<u64>,
    /// `(seed id, pages)` of each replica this host holds.
    pub replicas: Vec<(u64, u64)>,
}

impl From<&mitosis_client::DaemonStatus> for Status {
    fn from(s: &mitosis_client::DaemonStatus) -> Self {
        Status {
            bytes_served: Some(s.bytes_served),
            replicas: s.replicas.iter().map(|r| (r.seed, r.pages)).collect(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_ids() {
        assert_eq!(handle_seed_id("mitosis://10.77.0.1:7070/12/00ff"), Some(12));
        assert_eq!(handle_seed_id("http://x/1/2"), None);
    }
}
