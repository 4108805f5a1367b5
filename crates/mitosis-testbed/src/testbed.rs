//! The testbed: N hosts joined by a bridge in a private "switch" namespace.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Result, TestbedError};
use crate::host::{DaemonConfig, Host};
use crate::netns::{self, NsId};

/// Prefix of every testbed id (and so of every netns name we create).
pub const ID_PREFIX: &str = "mt";

/// Prefix of the per-testbed temporary directories, followed by the id.
pub(crate) const TEMP_DIR_PREFIX: &str = "mitosis-testbed-";

/// The largest number of hosts: addresses run from 10.77.0.1 to 10.77.0.254.
pub const MAX_HOSTS: usize = 254;

/// Name of the bridge inside the switch namespace. Interface names only need
/// to be unique within their namespace, and every testbed has its own.
const BRIDGE: &str = "br0";

/// How long teardown waits for stray processes in our namespaces to die.
const KILL_STRAYS_TIMEOUT: Duration = Duration::from_secs(2);

/// Distinguishes testbeds created by this process.
static NEXT_TESTBED: AtomicU64 = AtomicU64::new(0);

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestbedConfig {
    /// Number of hosts, 1 to [`MAX_HOSTS`].
    pub hosts: usize,
    /// The daemon to run on every host, if any.
    pub daemon: Option<DaemonConfig>,
}

impl TestbedConfig {
    /// `hosts` hosts without daemons.
    #[must_use]
    pub fn new(hosts: usize) -> Self {
        Self {
            hosts,
            daemon: None,
        }
    }

    /// Runs `daemon` on every host.
    #[must_use]
    pub fn with_daemon(mut self, daemon: DaemonConfig) -> Self {
        self.daemon = Some(daemon);
        self
    }
}

/// A set of simulated hosts, each in its own network namespace, on the
/// subnet 10.77.0.0/24.
///
/// All of it is torn down by [`Testbed::teardown`] or, best effort, on drop.
#[derive(Debug)]
pub struct Testbed {
    id: String,
    /// The temporary directory for sockets and logs.
    dir: PathBuf,
    /// Name of the namespace holding the bridge.
    switch: String,
    /// The hosts created so far (all of them once `new` has returned).
    hosts: Vec<Host>,
    torn_down: bool,
}

impl Testbed {
    /// Builds a testbed and starts the daemons, if configured.
    ///
    /// # Errors
    ///
    /// If not running as root, if `ip` is missing or fails, if the host count
    /// is out of range, or if a daemon does not start. Whatever was already
    /// created is torn down again before the error is returned.
    pub fn new(config: TestbedConfig) -> Result<Self> {
        check_prerequisites()?;
        if !(1..=MAX_HOSTS).contains(&config.hosts) {
            return Err(TestbedError::BadHostCount {
                requested: config.hosts,
                max: MAX_HOSTS,
            });
        }
        let id = unique_id()?;
        let mut testbed = Self {
            dir: std::env::temp_dir().join(format!("{TEMP_DIR_PREFIX}{id}")),
            switch: format!("{id}-sw"),
            id,
            hosts: Vec::with_capacity(config.hosts),
            torn_down: false,
        };
        // On error `testbed` is dropped, and Drop removes whatever of it
        // exists, so every resource is recorded in it before it is created.
        testbed.build(&config)?;
        tracing::info!(id = %testbed.id, hosts = testbed.hosts.len(), "testbed ready");
        Ok(testbed)
    }

    fn build(&mut self, config: &TestbedConfig) -> Result<()> {
        let dir = self.dir.clone();
        fs::create_dir(&dir)
            .map_err(|err| TestbedError::io(format!("creating {}", dir.display()), err))?;

        let switch = self.switch.clone();
        netns::add(&switch)?;
        netns::ip(&["-n", &switch, "link", "add", BRIDGE, "type", "bridge"])?;
        netns::ip(&["-n", &switch, "link", "set", BRIDGE, "up"])?;

        for index in 0..config.hosts {
            let name = format!("{}-h{index}", self.id);
            let addr = host_addr(index);
            self.hosts.push(Host::new(
                index,
                &self.id,
                name.clone(),
                addr,
                &dir,
                config.daemon.clone(),
            ));
            netns::add(&name)?;
            // The veth pair is born in the host namespace with its peer placed
            // straight into the switch namespace, so nothing ever appears in
            // the root namespace.
            let port = format!("veth{index}");
            netns::ip(&[
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &switch,
            ])?;
            netns::ip(&["-n", &switch, "link", "set", &port, "master", BRIDGE])?;
            netns::ip(&["-n", &switch, "link", "set", &port, "up"])?;
            netns::ip(&["-n", &name, "link", "set", "lo", "up"])?;
            let cidr = format!("{addr}/24");
            netns::ip(&["-n", &name, "addr", "add", &cidr, "dev", "eth0"])?;
            netns::ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        }

        if config.daemon.is_some() {
            for host in &self.hosts {
                host.start_daemon()?;
            }
        }
        Ok(())
    }

    /// The testbed's unique id. Every netns name of the testbed starts with
    /// it, and its temporary directory is named after it.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// All hosts, in address order.
    #[must_use]
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `index` (address 10.77.0.(index+1)).
    ///
    /// # Panics
    ///
    /// If there is no such host.
    #[must_use]
    pub fn host(&self, index: usize) -> &Host {
        self.hosts.get(index).unwrap_or_else(|| {
            panic!(
                "testbed {} has {} hosts, there is no host {index}",
                self.id,
                self.hosts.len()
            )
        })
    }

    /// The per-testbed temporary directory holding sockets and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name of the namespace holding the bridge.
    #[must_use]
    pub fn switch_name(&self) -> &str {
        &self.switch
    }

    /// Tears everything down: stops the daemons (SIGTERM, then SIGKILL after
    /// 2 s), kills any other process left in the testbed's namespaces,
    /// deletes the namespaces and removes the temporary directory.
    ///
    /// # Errors
    ///
    /// [`TestbedError::Teardown`], listing what could not be released, after
    /// trying to release everything else.
    pub fn teardown(mut self) -> Result<()> {
        let problems = self.release();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TestbedError::Teardown {
                id: self.id.clone(),
                problems,
            })
        }
    }

    /// Releases all resources, carrying on past failures; returns one message
    /// per failure. Safe to call more than once.
    fn release(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut problems = Vec::new();

        for host in &self.hosts {
            if let Err(err) = host.stop_daemon() {
                problems.push(err.to_string());
            }
        }

        // Processes still in our namespaces (strays started with
        // Host::command, children of the daemons) would keep the namespaces
        // alive after their names are gone, so they are killed first.
        let names: Vec<&str> = self
            .hosts
            .iter()
            .map(Host::name)
            .chain([self.switch.as_str()])
            .collect();
        let ids: Vec<NsId> = names
            .iter()
            .filter_map(|name| netns::ns_id(&netns::netns_path(name)).ok())
            .collect();
        if let Err(err) = netns::kill_all_in(&ids, KILL_STRAYS_TIMEOUT) {
            problems.push(err.to_string());
        }

        // Host namespaces go first; deleting one also deletes its veth pair.
        for name in names {
            if let Err(err) = netns::delete(name) {
                problems.push(err.to_string());
            }
        }

        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => problems.push(format!("removing {}: {err}", self.dir.display())),
        }

        if problems.is_empty() {
            tracing::debug!(id = %self.id, "testbed torn down");
        }
        problems
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for problem in self.release() {
            tracing::warn!(id = %self.id, "teardown: {problem}");
        }
    }
}

/// The address of host `index` (known before the testbed is made: certificates name it).
pub fn host_addr(index: usize) -> Ipv4Addr {
    let last = u8::try_from(index + 1).expect("host count is checked against MAX_HOSTS");
    Ipv4Addr::new(10, 77, 0, last)
}

/// `mt{pid}-{counter}-{4 hex}`: the pid and counter keep ids unique within
/// and across live processes, the random part guards against leftovers of a
/// dead process that had the same pid. The last part has a fixed width, so no
/// id is a prefix of another.
fn unique_id() -> Result<String> {
    let counter = NEXT_TESTBED.fetch_add(1, Ordering::Relaxed);
    let mut random = [0u8; 2];
    getrandom::fill(&mut random).map_err(|err| {
        TestbedError::io(
            "drawing random bytes for the testbed id",
            io::Error::other(err),
        )
    })?;
    Ok(format!(
        "{ID_PREFIX}{}-{counter}-{}",
        std::process::id(),
        hex::encode(random)
    ))
}

/// Fails early, with a clear message, where the testbed cannot work.
fn check_prerequisites() -> Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(TestbedError::NotRoot {
            euid: euid.as_raw(),
        });
    }
    netns::ip(&["-V"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_not_prefixes_of_each_other() {
        let ids: Vec<String> = (0..50).map(|_| unique_id().unwrap()).collect();
        for (i, a) in ids.iter().enumerate() {
            assert!(a.starts_with(ID_PREFIX));
            for b in &ids[i + 1..] {
                assert!(
                    !a.starts_with(b.as_str()) && !b.starts_with(a.as_str()),
                    "{a} {b}"
                );
            }
        }
    }

    #[test]
    fn host_addresses() {
        assert_eq!(host_addr(0), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(host_addr(MAX_HOSTS - 1), Ipv4Addr::new(10, 77, 0, 254));
    }
}
