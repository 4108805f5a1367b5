//! `mitosis-platform cluster`: N simulated hosts (network namespaces with a daemon each, as
//! mitosis-demo makes them) and the API over them on loopback.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mitosis_platform::HostSpec;
use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig};

use crate::ApiArgs;

/// The port the hosts' daemons listen on (each host has its own address).
const DAEMON_PORT: u16 = 7070;

pub fn run(n: usize, api: &ApiArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let daemon = sibling(&exe, "mitosisd")?;
    sibling(&exe, "mitosis-stub")?;
    sibling(&exe, "mitosis-init")?;
    let testbed =
        Testbed::new(TestbedConfig::new(n).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)))
            .context("building the hosts (this needs root and iproute2)")?;
    let hosts = HostSpec::of_testbed(&testbed);
    let served = crate::serve(hosts, api, None, || {
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
