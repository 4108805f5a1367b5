//! `mitosis resume`: behaves like the child it starts, as `exec` would.

use std::path::Path;

use anyhow::{Result, bail};
use mitosis_transport::control::{Event, Request};
use nix::sys::signal::{SigSet, Signal};

use crate::client::Client;

/// Signals the command forwards to the child instead of acting on them itself.
const FORWARDED: [Signal; 9] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGALRM,
    Signal::SIGCONT,
];

/// Starts a child of `handle` with our stdio; returns its shell-style exit status.
pub fn run(socket: &Path, handle: &str, stats: bool) -> Result<i32> {
    // Block the forwarded signals before any thread exists, so only the forwarder sees them.
    let mut set = SigSet::empty();
    for sig in FORWARDED {
        set.add(sig);
    }
    set.thread_block()?;

    let mut client = Client::connect(socket)?;
    client.send(
        &Request::Resume {
            handle: handle.to_string(),
        },
        &[0, 1, 2],
    )?;
    let start = match client.recv()? {
        Event::Started { stats, .. } => stats,
        Event::Error(msg) => bail!("{msg}"),
        other => bail!("unexpected answer from mitosisd: {other:?}"),
    };
    let mut forwarder = client.try_clone()?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if forwarder
                .send(&Request::Signal { signo: sig as i32 }, &[])
                .is_err()
            {
                break;
            }
        }
    });
    match client.recv()? {
        Event::Exited {
            status,
            reason,
            stats: faults,
        } => {
            if let Some(reason) = reason {
                eprintln!("mitosis: child killed: {reason}");
            }
            if stats {
                eprintln!(
                    "mitosis: resume {}us (connect {}us, descriptor {}us, spawn {}us, restore {}us, eager pages {}); faults {} (zero {}), fetched {} pages in {} round trips, {}us",
                    start.total_us,
                    start.connect_us,
                    start.descriptor_us,
                    start.spawn_us,
                    start.restore_us,
                    start.eager_pages,
                    faults.faults + faults.zero_faults,
                    faults.zero_faults,
                    faults.pages_fetched,
                    faults.fetches,
                    faults.fetch_us
                );
            }
            Ok(status)
        }
        Event::Error(msg) => bail!("{msg}"),
        other => bail!("unexpected answer from mitosisd: {other:?}"),
    }
}
