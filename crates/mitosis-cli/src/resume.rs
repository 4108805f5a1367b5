//! `mitosis resume`: behaves like the child it starts, as `exec` would.

use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result, bail};
use mitosis_transport::control::{Event, FaultStats, Request, ResumeStats};
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

/// Starts a child of `handle` with our stdio (and a socket listening on `listen` as its fd 3);
/// returns its shell-style exit status.
pub fn run(
    socket: &Path,
    handle: &str,
    stats: bool,
    listen: Option<std::net::SocketAddr>,
) -> Result<i32> {
    let listener = listen
        .map(|addr| {
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))
        })
        .transpose()?;
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
        &[0, 1, 2]
            .into_iter()
            .chain(listener.as_ref().map(|l| l.as_raw_fd()))
            .collect::<Vec<_>>(),
    )?;
    // The child has its own copy now.
    drop(listener);
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
                eprintln!("mitosis: stats {}", stats_line(&start, &faults));
            }
            Ok(status)
        }
        Event::Error(msg) => bail!("{msg}"),
        other => bail!("unexpected answer from mitosisd: {other:?}"),
    }
}

/// The `--stats` breakdown as one line of `key=value` pairs (times in microseconds).
fn stats_line(start: &ResumeStats, faults: &FaultStats) -> String {
    let pairs: [(&str, u64); 18] = [
        ("resume_us", start.total_us),
        ("cached", start.cached as u64),
        ("attach_us", start.attach_us),
        ("descriptor_us", start.descriptor_us),
        ("build_us", start.build_us),
        ("spawn_us", start.spawn_us),
        ("restore_us", start.restore_us),
        ("eager_pages", start.eager_pages),
        ("working_set_pages", start.working_set_pages),
        ("working_set_us", start.working_set_us),
        ("fork_us", start.fork_us),
        ("container_us", start.container_us),
        ("container_pooled", start.container_pooled as u64),
        ("faults", faults.faults + faults.zero_faults),
        ("zero_faults", faults.zero_faults),
        ("fetches", faults.fetches),
        ("pages_fetched", faults.pages_fetched),
        ("fetch_us", faults.fetch_us),
    ];
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}
