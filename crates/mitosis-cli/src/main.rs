//! `mitosis`: remote fork from the command line.

mod inspect;
mod resume;

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mitosis_client::Client;

/// Fork a running process onto another host in milliseconds.
///
/// Needs root: mitosis ptraces seeds, reads their memory, and builds children with
/// userfaultfd; the demo also creates network namespaces.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Control socket of this host's mitosisd.
    #[arg(
        long,
        global = true,
        env = "MITOSIS_SOCKET",
        default_value = "/run/mitosis/mitosisd.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// A seed's handle. Its key is a secret that opens the seed's memory: on a command line it is
/// readable by every local user (/proc/PID/cmdline), so it is best passed in a file or in
/// MITOSIS_HANDLE (a process's environment is readable by its owner and root only).
#[derive(clap::Args)]
struct HandleArg {
    /// The seed's handle, `mitosis://HOST:PORT/ID/KEY` (prefer --handle-file or MITOSIS_HANDLE:
    /// a command line is visible to every local user).
    #[arg(env = "MITOSIS_HANDLE", hide_env_values = true)]
    handle: Option<String>,
    /// Read the handle from this file (`-`: standard input, except for resume, whose
    /// standard input is the child's).
    #[arg(long, value_name = "PATH")]
    handle_file: Option<PathBuf>,
}

impl HandleArg {
    /// The handle, from the file if one is named, else from the argument or environment.
    /// `stdin_free`: whether standard input may carry it.
    fn read(&self, stdin_free: bool) -> Result<String> {
        let Some(path) = &self.handle_file else {
            return self.handle.clone().ok_or_else(|| {
                anyhow::anyhow!("no handle: pass --handle-file PATH, MITOSIS_HANDLE or HANDLE")
            });
        };
        let text = if path.as_os_str() == "-" {
            anyhow::ensure!(
                stdin_free,
                "resume's standard input is the child's: pass the handle with --handle-file                  PATH or MITOSIS_HANDLE"
            );
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the handle from {}", path.display()))?
        };
        Ok(text.trim().to_string())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Capture a running process (every thread) as a seed; prints its handle.
    ///
    /// The process is stopped for well under a millisecond and then runs on; children see its
    /// memory as it was at this moment. With --bundle, the daemon first starts the OCI bundle's
    /// process in a container of its own and waits until it is warm: blocked reading stdin.
    /// Children of such a seed each run in a container of the bundle on their host.
    Prepare {
        #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
        pid: Option<i32>,
        /// An OCI bundle directory (config.json + rootfs), present at the same path on every
        /// host that runs children.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// How long a bundle's process may take to get warm, in seconds.
        #[arg(long, default_value_t = 60.0)]
        ready_timeout: f64,
        /// Also print timings to stderr.
        #[arg(long)]
        stats: bool,
        /// Write the handle to this file (created readable by its owner only) instead of
        /// standard output.
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Start a child of a seed on this host and behave like it.
    ///
    /// The child continues from the seed's prepare point with this command's stdin, stdout and
    /// stderr as fds 0, 1 and 2. Regular files the seed had open are reopened at the same
    /// offset when the same file exists here; pipes, eventfds and epoll sets private to the
    /// seed are recreated with their contents; what reaches outside the seed (sockets, a pipe
    /// to another process) is closed in the child (`mitosis inspect` lists it). Signals sent to this command (INT, TERM, HUP, QUIT, USR1, USR2,
    /// WINCH, ALRM, CONT) are delivered to the child, and this command exits with the child's
    /// status (128 + N if it was killed by signal N).
    Resume {
        #[command(flatten)]
        handle: HandleArg,
        /// Print a per-child breakdown to stderr.
        #[arg(long)]
        stats: bool,
        /// Listen on this TCP address (ip:port) and hand the socket to the child as fd 3.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Stop serving a seed; children that still need its pages are killed.
    Drop {
        #[command(flatten)]
        handle: HandleArg,
    },
    /// Forget this host's replica of a seed: its next child here starts as on a new host.
    Evict {
        #[command(flatten)]
        handle: HandleArg,
    },
    /// Show this host's daemon state.
    Status,
    /// Show what a seed holds: threads, signal handlers, limits, the descriptors its children
    /// get and those closed on purpose (sockets, pipes to other processes).
    Inspect {
        #[command(flatten)]
        handle: HandleArg,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MITOSIS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mitosis: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Prepare {
            pid,
            bundle,
            ready_timeout,
            stats,
            output,
        } => {
            let (handle, s) = match (pid, bundle) {
                (Some(pid), _) => Client::connect(&cli.socket)?.prepare_pid(pid)?,
                (None, Some(dir)) => {
                    let dir = std::path::absolute(&dir)?;
                    let ready = Duration::from_millis((ready_timeout * 1000.0) as u64);
                    Client::connect(&cli.socket)?.prepare_bundle(&dir, ready)?
                }
                (None, None) => anyhow::bail!("prepare needs --pid or --bundle"),
            };
            match output {
                Some(path) => write_secret(&path, &handle)?,
                None => println!("{handle}"),
            }
            if stats {
                if s.warm_us > 0 {
                    eprintln!("mitosis: bundle started and warm in {}us", s.warm_us);
                }
                eprintln!(
                    "mitosis: prepared in {}us (seed stopped {}us), {} mappings, {} pages, descriptor {} bytes",
                    s.total_us, s.stopped_us, s.vmas, s.seed_pages, s.descriptor_bytes
                );
            }
            Ok(0)
        }
        Command::Resume {
            handle,
            stats,
            listen,
        } => resume::run(&cli.socket, &handle.read(false)?, stats, listen),
        Command::Drop { handle } => {
            Client::connect(&cli.socket)?.drop_seed(&handle.read(true)?)?;
            Ok(0)
        }
        Command::Evict { handle } => {
            Client::connect(&cli.socket)?.evict(&handle.read(true)?)?;
            Ok(0)
        }
        Command::Status => {
            print!("{}", Client::connect(&cli.socket)?.status()?);
            Ok(0)
        }
        Command::Inspect { handle } => {
            let handle = handle.read(true)?;
            let bytes = Client::connect(&cli.socket)?.inspect(&handle)?;
            let d = mitosis_descriptor::decode(&bytes)?;
            let parsed: mitosis_descriptor::Handle = handle.parse()?;
            print!("{}", inspect::render(&parsed, &d));
            Ok(0)
        }
    }
}

/// Writes `secret` to a new file at `path` that only its owner can read.
fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{secret}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
