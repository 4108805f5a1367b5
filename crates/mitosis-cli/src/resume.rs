//! `mitosis resume`: behaves like the child it starts, as `exec` would.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};
use mitosis_client::{Client, stats_line};
use nix::sys::signal::{SigSet, Signal};

use crate::exit::{self, Code};

/// What `--stats` prints on stderr once the child ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stats {
    None,
    /// `mitosis: stats key=value ...`
    Text,
    /// One JSON object (docs/schemas/resume-stats.schema.json).
    Json,
}

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
/// returns its shell-style exit status, or [`Code::PageSourceLost`] if the daemon killed it
/// because its memory's source went away.
pub fn run(
    socket: &Path,
    handle: &str,
    stats: Stats,
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

    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let running = Client::connect(socket)?.resume(
        handle,
        stdin.as_fd(),
        stdout.as_fd(),
        stderr.as_fd(),
        listener.as_ref().map(|l| l.as_fd()),
    )?;
    // The child has its own copy now.
    drop(listener);
    let forwarder = running.signaller()?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if forwarder.signal(sig as i32).is_err() {
                break;
            }
        }
    });
    let start = running.stats.clone();
    let exited = running.wait()?;
    let reason = exited.reason.as_deref();
    let code = match reason {
        Some(r) if exit::lost_its_pages(r) => Code::PageSourceLost as i32,
        _ => exited.status,
    };
    if let Some(reason) = reason
        && stats != Stats::Json
    {
        eprintln!("mitosis: child killed: {reason}");
    }
    match stats {
        Stats::None => {}
        Stats::Text => eprintln!("mitosis: stats {}", stats_line(&start, &exited.stats)),
        Stats::Json => {
            let line = crate::json::resumed(code, exited.status, reason, &start, &exited.stats);
            eprintln!("{line}");
        }
    }
    Ok(code)
}
