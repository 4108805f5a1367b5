//! `mitosis`: remote fork from the command line.

mod exit;
mod inspect;
mod json;
mod resume;

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use exit::{Code, Failure};
use mitosis_client::Client;

/// Fork a running process onto another host in milliseconds.
///
/// Needs root: mitosis ptraces seeds, reads their memory, and builds children with
/// userfaultfd; the demo also creates network namespaces.
#[derive(Parser)]
#[command(name = "mitosis", version)]
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
                Failure::error(
                    Code::Usage,
                    "no handle: pass --handle-file PATH, MITOSIS_HANDLE or HANDLE",
                )
            });
        };
        let text = if path.as_os_str() == "-" {
            if !stdin_free {
                return Err(Failure::error(
                    Code::Usage,
                    "resume's standard input is the child's: pass the handle with --handle-file \
                     PATH or MITOSIS_HANDLE",
                ));
            }
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
        /// A name for the program (say, the function and its version): the seed's first
        /// children's hosts get the pages that earlier seeds of the same name (prepared by the
        /// same user on this host) had their children touch, so they need fewer page faults
        /// across the network.
        #[arg(long, conflicts_with = "bundle", value_name = "NAME")]
        profile: Option<String>,
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
        /// Print one JSON object to standard output: the handle (unless --output), the seed's
        /// id and host, and the timings (docs/schemas/prepare.schema.json).
        #[arg(long)]
        json: bool,
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
        /// With --stats: the breakdown, the exit status and why the daemon killed the child
        /// (if it did) as one JSON object on stderr (docs/schemas/resume-stats.schema.json).
        #[arg(long, requires = "stats")]
        json: bool,
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
    /// Build this host's replica of a seed and bring the whole seed into it (within the
    /// daemon's --cache-mib), before children that each read most of it: they then share its
    /// pages, each holding only what it writes.
    Fill {
        #[command(flatten)]
        handle: HandleArg,
    },
    /// Show this host's daemon state.
    Status {
        /// As one JSON object (docs/schemas/status.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// Show what a seed holds: threads, signal handlers, limits, the descriptors its children
    /// get and those closed on purpose (sockets, pipes to other processes).
    Inspect {
        #[command(flatten)]
        handle: HandleArg,
        /// As one JSON object (docs/schemas/inspect.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for mitosis to standard output.
    Completions {
        /// bash, elvish, fish, powershell or zsh.
        shell: clap_complete::Shell,
    },
    /// Print mitosis(1) in roff to standard output, or with --dir write it and a page per
    /// subcommand (mitosis-prepare.1, ...) there.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

impl Command {
    /// Whether the command's output is JSON (then so are its failures, on stderr).
    fn json(&self) -> bool {
        match self {
            Command::Prepare { json, .. }
            | Command::Resume { json, .. }
            | Command::Status { json }
            | Command::Inspect { json, .. } => *json,
            _ => false,
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MITOSIS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; the rest are usage errors.
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                Code::Usage as i32
            } else {
                0
            });
        }
    };
    let json = cli.command.json();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let code = Code::of(&e);
            if json {
                eprintln!("{}", json::error(code, &format!("{e:#}")));
            } else {
                eprintln!("mitosis: {e:#}");
            }
            std::process::exit(code as i32);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Prepare {
            pid,
            bundle,
            profile,
            ready_timeout,
            stats,
            output,
            json,
        } => {
            let (handle, s) = match (pid, bundle) {
                (Some(pid), _) => match &profile {
                    Some(name) => Client::connect(&cli.socket)?.prepare_pid_profiled(pid, name)?,
                    None => Client::connect(&cli.socket)?.prepare_pid(pid)?,
                },
                (None, Some(dir)) => {
                    let dir = std::path::absolute(&dir)?;
                    let ready = Duration::from_millis((ready_timeout * 1000.0) as u64);
                    Client::connect(&cli.socket)?.prepare_bundle(&dir, ready)?
                }
                (None, None) => anyhow::bail!("prepare needs --pid or --bundle"),
            };
            match &output {
                Some(path) => write_secret(path, &handle)?,
                None if json => {}
                None => println!("{handle}"),
            }
            if json {
                println!("{}", json::prepared(&handle, output.as_deref(), &s)?);
            }
            if stats {
                if s.warm_us > 0 {
                    eprintln!("mitosis: bundle started and warm in {}us", s.warm_us);
                }
                eprintln!(
                    "mitosis: prepared in {}us (seed stopped {}us), {} mappings, {} pages, descriptor {} bytes",
                    s.total_us, s.stopped_us, s.vmas, s.seed_pages, s.descriptor_bytes
                );
                if profile.is_some() {
                    eprintln!(
                        "mitosis: {} pages carried over from the profile",
                        s.carried_pages
                    );
                }
            }
            Ok(0)
        }
        Command::Resume {
            handle,
            stats,
            json,
            listen,
        } => {
            let stats = match (stats, json) {
                (false, _) => resume::Stats::None,
                (true, false) => resume::Stats::Text,
                (true, true) => resume::Stats::Json,
            };
            resume::run(&cli.socket, &handle.read(false)?, stats, listen)
        }
        Command::Drop { handle } => {
            Client::connect(&cli.socket)?.drop_seed(&handle.read(true)?)?;
            Ok(0)
        }
        Command::Evict { handle } => {
            Client::connect(&cli.socket)?.evict(&handle.read(true)?)?;
            Ok(0)
        }
        Command::Fill { handle } => {
            Client::connect(&cli.socket)?.fill(&handle.read(true)?)?;
            Ok(0)
        }
        Command::Status { json } => {
            let status = Client::connect(&cli.socket)?.status()?;
            match json {
                true => println!("{}", json::status(&status)),
                false => print!("{status}"),
            }
            Ok(0)
        }
        Command::Inspect { handle, json } => {
            let handle = handle.read(true)?;
            let parsed: mitosis_descriptor::Handle = handle.parse()?;
            let bytes = Client::connect(&cli.socket)?.inspect(&handle)?;
            let d = mitosis_descriptor::decode(&bytes)?;
            match json {
                true => println!("{}", inspect::json(&parsed, &d)),
                false => print!("{}", inspect::render(&parsed, &d)),
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mitosis",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Man { dir } => {
            let cmd = Cli::command();
            match dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, &dir)
                        .with_context(|| format!("writing man pages to {}", dir.display()))?;
                }
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_generate_for_every_shell() {
        use clap::ValueEnum;
        for shell in clap_complete::Shell::value_variants() {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "mitosis", &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in ["prepare", "resume", "inspect", "status"] {
                assert!(text.contains(sub), "{shell}: no {sub}");
            }
        }
    }

    #[test]
    fn man_pages_generate() {
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut out)
            .unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(page.starts_with(".ie"), "{}", &page[..80]);
        assert!(page.contains(".TH mitosis 1"), "{page}");
        assert!(page.contains("resume"), "{page}");
        let dir = std::env::temp_dir().join(format!("mitosis-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        clap_mangen::generate_to(Cli::command(), &dir).unwrap();
        for page in [
            "mitosis.1",
            "mitosis-prepare.1",
            "mitosis-resume.1",
            "mitosis-status.1",
        ] {
            let len = std::fs::metadata(dir.join(page)).unwrap().len();
            assert!(len > 100, "{page}: {len} bytes");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_json_needs_stats() {
        assert!(Cli::try_parse_from(["mitosis", "resume", "--json"]).is_err());
        assert!(Cli::try_parse_from(["mitosis", "resume", "--stats", "--json"]).is_ok());
    }
}
