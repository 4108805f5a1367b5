//! `mitosis`: remote fork from the command line.

mod client;
mod demo;
mod resume;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use mitosis_transport::control::{Event, Request};

use client::Client;

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

#[derive(Subcommand)]
enum Command {
    /// Capture a running single-threaded process as a seed; prints its handle.
    ///
    /// The process is stopped for well under a millisecond and then runs on; children see its
    /// memory as it was at this moment.
    Prepare {
        #[arg(long)]
        pid: i32,
        /// Also print timings to stderr.
        #[arg(long)]
        stats: bool,
    },
    /// Start a child of a seed on this host and behave like it.
    ///
    /// The child continues from the seed's prepare point with this command's stdin, stdout and
    /// stderr as fds 0, 1 and 2. Regular files the seed had open are reopened at the same
    /// offset when the same file exists here; every other descriptor (sockets, pipes, ...) is
    /// closed in the child. Signals sent to this command (INT, TERM, HUP, QUIT, USR1, USR2,
    /// WINCH, ALRM, CONT) are delivered to the child, and this command exits with the child's
    /// status (128 + N if it was killed by signal N).
    Resume {
        handle: String,
        /// Print a per-child breakdown to stderr.
        #[arg(long)]
        stats: bool,
    },
    /// Stop serving a seed; children that still need its pages are killed.
    Drop { handle: String },
    /// Forget this host's replica of a seed: its next child here starts as on a new host.
    Evict { handle: String },
    /// Show this host's daemon state.
    Status,
    /// Remote-fork a warmed Python function across two simulated hosts and report timings.
    Demo(demo::DemoArgs),
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
        Command::Prepare { pid, stats } => {
            let Event::Prepared { handle, stats: s } =
                Client::connect(&cli.socket)?.call(&Request::Prepare { pid })?
            else {
                anyhow::bail!("unexpected answer from mitosisd");
            };
            println!("{handle}");
            if stats {
                eprintln!(
                    "mitosis: prepared in {}us (seed stopped {}us), {} mappings, {} pages, descriptor {} bytes",
                    s.total_us, s.stopped_us, s.vmas, s.seed_pages, s.descriptor_bytes
                );
            }
            Ok(0)
        }
        Command::Resume { handle, stats } => resume::run(&cli.socket, &handle, stats),
        Command::Drop { handle } => {
            Client::connect(&cli.socket)?.call(&Request::Drop { handle })?;
            Ok(0)
        }
        Command::Evict { handle } => {
            Client::connect(&cli.socket)?.call(&Request::Evict { handle })?;
            Ok(0)
        }
        Command::Status => {
            if let Event::Status(text) = Client::connect(&cli.socket)?.call(&Request::Status)? {
                print!("{text}");
            }
            Ok(0)
        }
        Command::Demo(args) => demo::run(args),
    }
}
