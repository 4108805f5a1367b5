//! `mitosis-platform cluster`: N simulated hosts (network namespaces with a daemon each, as
//! mitosis-demo makes them) and the API over them on loopback.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use mitosis_client::{Remote, Tls};
use mitosis_platform::HostSpec;
use mitosis_testbed::pki::{self, TestCa};
use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig, host_addr};

use crate::ApiArgs;

/// The port the hosts' daemons listen on (each host has its own address).
const DAEMON_PORT: u16 = 7070;
/// Their TCP control listeners (`--tcp`).
const CONTROL_PORT: u16 = 7071;

/// A directory of this cluster's certificates and keys, removed on drop.
struct PkiDir(PathBuf);

impl PkiDir {
    /// A CA made for this cluster, a certificate per host and one for the platform.
    fn new(n: usize) -> Result<PkiDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("mitosis-cluster-pki-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let made = PkiDir(dir);
        let ca = TestCa::new("mitosis cluster CA")?;
        let addrs: Vec<std::net::IpAddr> = (0..n).map(|i| host_addr(i).into()).collect();
        ca.write_hosts(&made.0, &addrs)?;
        // The platform dials from host 0's namespace; its certificate is the cluster's.
        let (cert, key) = ca.host(addrs[0])?;
        pki::write(&made.0.join("platform.crt"), &cert)?;
        pki::write(&made.0.join("platform.key"), &key)?;
        Ok(made)
    }
}

impl Drop for PkiDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(n: usize, tcp: bool, api: &ApiArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let daemon = sibling(&exe, "mitosisd")?;
    sibling(&exe, "mitosis-stub")?;
    sibling(&exe, "mitosis-init")?;
    let pki_dir = tcp.then(|| PkiDir::new(n)).transpose()?;
    let mut daemon = DaemonConfig::new(&daemon, DAEMON_PORT);
    if let Some(dir) = &pki_dir {
        daemon.extra_args = pki::daemon_args(&dir.0);
        daemon.extra_args.extend([
            "--control-listen".to_owned(),
            format!("0.0.0.0:{CONTROL_PORT}"),
        ]);
    }
    let testbed = Testbed::new(TestbedConfig::new(n).with_daemon(daemon))
        .context("building the hosts (this needs root and iproute2)")?;
    let (hosts, remote) = match &pki_dir {
        None => (HostSpec::of_testbed(&testbed), None),
        Some(dir) => {
            let tls = Tls::load(
                &dir.0.join("platform.crt"),
                &dir.0.join("platform.key"),
                &dir.0.join("ca.crt"),
            )?;
            // The hosts' addresses are not routable from here: connect from host 0's
            // namespace, where every host's address is.
            let dialer = testbed.host(0).dialer()?;
            let remote = Remote::new(tls).with_connector(Arc::new(move |a, t| dialer.dial(a, t)));
            (
                HostSpec::of_testbed_tcp(&testbed, CONTROL_PORT),
                Some(remote),
            )
        }
    };
    let served = crate::serve(hosts, api, remote, || {
        println!(
            "mitosis-platform cluster: {n} hosts (testbed {})",
            testbed.id()
        );
        for h in testbed.hosts() {
            println!(
                "  h{}  netns {}  mitosisd {} pid {}  socket {}  log {}",
                h.index(),
                h.name(),
                h.listen_addr(),
                h.daemon_pid().unwrap_or(0),
                h.socket_path().display(),
                h.log_path().display()
            );
        }
        println!(
            "  API    http://{}  (Fn v2: /v2/apps, /v2/fns, /invoke/FN_ID; OpenFaaS: /function/NAME)",
            api.api
        );
        println!(
            "  where  http://{}/mitosis/hosts  (hosts, load, each function's seed)",
            api.api
        );
        if tcp {
            println!("  daemons reached over TCP with mutual TLS (port {CONTROL_PORT})");
        }
        println!("Ctrl-C or SIGTERM stops the API and tears the hosts down.");
    });
    let torn = testbed.teardown().context("tearing the hosts down");
    served?;
    torn?;
    println!("mitosis-platform cluster: torn down");
    Ok(())
}

fn sibling(exe: &Path, name: &str) -> Result<PathBuf> {
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the workspace's binaries (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}
