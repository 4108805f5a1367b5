//! `mitosisd`: the mitosis daemon of one host.

#[macro_use]
mod config;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use config::FileConfig;
use mitosis_config::merge_config;
use mitosis_fork::restore::StubPool;
use mitosis_transport::packed::Codec;
use mitosis_transport::peer::PeerPool;
use mitosis_transport::tls::Tls;
use mitosisd::cache::HostCache;
use mitosisd::containers::Containers;
use mitosisd::peer_source::REQUEST_TIMEOUT;
use mitosisd::twins::TwinLedger;
use mitosisd::{Counters, Daemon, control, peer_server, registry::Registry, tracer::Tracer};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};

/// The mitosis daemon: holds prepared seeds, serves their pages to peers, resumes children.
///
/// Runs as root: it ptraces seeds, reads their memory, and builds children with userfaultfd.
#[derive(Parser)]
#[command(name = "mitosisd", version)]
struct Args {
    /// Read flags from this TOML file (keys are the flags' long names: `stub-pool = 2`); a
    /// flag on the command line wins over the file.
    #[arg(long, value_name = "PATH", env = "MITOSISD_CONFIG")]
    config: Option<PathBuf>,
    /// Address peers reach this host's page server on (also written into handles).
    /// Required, here or in --config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Control socket for the local CLI.
    #[arg(long, default_value = "/run/mitosis/mitosisd.sock")]
    socket: PathBuf,
    /// Also serve the control protocol over TCP on this address, for a platform on another
    /// machine: always mutual TLS with --tls-cert/--tls-key/--tls-ca (required), and a peer
    /// with a certificate of that CA has root's rights. A resume's stdio is relayed on the
    /// connection.
    #[arg(long, value_name = "ADDR")]
    control_listen: Option<SocketAddr>,
    /// Stubs kept started and waiting, so a new replica does not wait for one to start.
    #[arg(long, default_value_t = 2)]
    stub_pool: usize,

    /// The stub binary children start as (default: mitosis-stub beside this binary).
    #[arg(long)]
    stub: Option<PathBuf>,
    /// Memory the replicas of other hosts' seeds may hold, in MiB; least recently used
    /// replicas are evicted beyond it.
    #[arg(long, default_value_t = 4096)]
    cache_mib: u64,
    /// Do not fill a replica with the rest of its seed's pages in the background (by default
    /// this starts once a child on a warm host had to fetch pages, and stays within
    /// --cache-mib).
    #[arg(long)]
    no_background_fill: bool,
    /// Idle connections kept open to each peer.
    #[arg(long, default_value_t = 4)]
    pool_size: usize,
    /// Names this daemon's cgroups (`<cgroup mount>/mitosis/<instance>`); a daemon restarted
    /// with the same name removes what its crashed predecessor left. Default: from --socket.
    #[arg(long)]
    instance: Option<String>,
    /// The container init binary (default: mitosis-init beside this binary).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Empty containers kept ready per bundle for children to join.
    #[arg(long, default_value_t = 4)]
    container_pool: usize,
    /// How bootstrap pages travel to new hosts: raw, or lz4 where the network is slower than
    /// unpacking (hosts on other machines).
    #[arg(long, default_value = "raw")]
    bootstrap_codec: Codec,
    /// This host's certificate (PEM, then any intermediates): with --tls-key and --tls-ca,
    /// every page-protocol connection, served or opened, is mutual TLS 1.3. Its SANs must
    /// hold the IP address of --listen, which peers dial.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) every peer's certificate must chain to, as client and as server.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Serve `GET /metrics` (OpenMetrics text, for Prometheus) on this address. Off by
    /// default; nothing on it needs a key, so keep it on a management network.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Print a shell completion script (bash, zsh, fish, ...) and exit.
    #[arg(long, value_name = "SHELL", hide = true)]
    completions: Option<clap_complete::Shell>,
    /// Print mitosisd(8) in roff and exit.
    #[arg(long, hide = true)]
    man: bool,
}

impl Args {
    /// The command line with --config's file under it; exits (78, EX_CONFIG) with one line
    /// if the file is malformed or --listen is nowhere.
    fn load() -> Args {
        let matches = Args::command().get_matches();
        let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if args.completions.is_some() || args.man {
            return args;
        }
        if let Some(path) = &args.config {
            let file: FileConfig = config::load(path).unwrap_or_else(|e| config_error(&e));
            merge_config!(args, file, &matches;
                plain: socket, stub_pool, cache_mib, no_background_fill, pool_size,
                    container_pool,
                    bootstrap_codec;
                optional: listen, control_listen, stub, instance, init, tls_cert, tls_key,
                    tls_ca, metrics);
        }
        if args.listen.is_none() {
            config_error("--listen is required (on the command line or in --config)");
        }
        args
    }

    fn listen(&self) -> SocketAddr {
        self.listen.expect("checked by Args::load")
    }
}

fn config_error(message: &str) -> ! {
    eprintln!("mitosisd: {message}");
    std::process::exit(78);
}

/// `--completions SHELL` and `--man`: what packaging installs.
fn generate(args: &Args) -> bool {
    let mut out = std::io::stdout();
    if let Some(shell) = args.completions {
        clap_complete::generate(shell, &mut Args::command(), "mitosisd", &mut out);
    } else if args.man {
        let man = clap_mangen::Man::new(Args::command()).section("8");
        if let Err(e) = man.render(&mut out) {
            eprintln!("mitosisd: {e}");
        }
    } else {
        return false;
    }
    true
}

/// Makes sure the socket's directory is the daemon's alone: created 0700 (whatever the
/// umask) if missing; an existing one must already be 0700 and the daemon's, as tightening a
/// shared directory (/run, /tmp) would break others.
fn private_dir(socket: &Path) -> Result<()> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Its parents are not ours to restrict.
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        // The umask may have taken bits off, never added: set it exactly.
        Ok(()) => {
            return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private", dir.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    let euid = nix::unistd::geteuid().as_raw();
    anyhow::ensure!(
        meta.is_dir() && mode & 0o077 == 0 && meta.uid() == euid,
        "the control socket's directory {} has mode {mode:04o} and owner uid {}: it must be the \
         daemon's alone (mode 0700, uid {euid}); remove it to have it made, or put --socket in \
         a directory of its own",
        dir.display(),
        meta.uid()
    );
    Ok(())
}

fn main() -> Result<()> {
    mitosis_sys::alloc::keep_page_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MITOSIS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::load();
    if generate(&args) {
        return Ok(());
    }
    let tls = Tls::from_flags(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_ca.as_deref(),
    )?;
    // Fail closed: the control protocol is never served over TCP without authentication.
    anyhow::ensure!(
        args.control_listen.is_none() || tls.is_some(),
        "--control-listen needs --tls-cert, --tls-key and --tls-ca: the control protocol is \
         served over TCP only with mutual TLS"
    );
    // First: the cgroup mount below goes next to the socket, in its private directory.
    private_dir(&args.socket)?;
    // Before any thread exists: a mount namespace can only be entered single-threaded.
    let favor_dir = args.socket.with_extension("cgroup");
    if let Err(e) = mitosis_container::fastmove::favor_dynamic_moves(&favor_dir) {
        tracing::warn!("cgroup moves stay slow (favordynmods unavailable): {e}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args, tls))
}

async fn run(args: Args, tls: Option<Tls>) -> Result<()> {
    let listen = args.listen();
    let stub = match args.stub {
        Some(s) => s,
        None => std::env::current_exe()?.with_file_name("mitosis-stub"),
    };
    anyhow::ensure!(stub.is_file(), "stub binary {} not found", stub.display());
    let init = match args.init {
        Some(s) => s,
        None => std::env::current_exe()?.with_file_name("mitosis-init"),
    };
    let instance = args.instance.unwrap_or_else(|| {
        args.socket
            .to_string_lossy()
            .trim_matches('/')
            .replace(['/', '.'], "-")
    });
    let containers = if init.is_file() {
        Containers::new(&instance, init, args.container_pool).map_err(|e| format!("{e:#}"))
    } else {
        Err(format!("container init {} not found", init.display()))
    };
    if let Err(e) = &containers {
        tracing::warn!("containers unavailable: {e}");
    }

    // TCP first: once the control socket exists, the daemon is fully up.
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let control_tcp = match args.control_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving the control protocol on {addr}"))?,
        ),
        None => None,
    };
    let metrics = match args.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?,
        ),
        None => None,
    };
    let _ = std::fs::remove_file(&args.socket);
    let unix = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    // Whatever the umask made it; nobody else could reach it meanwhile (its directory is
    // private).
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", args.socket.display()))?;

    let stubs = Arc::new(StubPool::new(&stub, args.stub_pool).context("starting the stub pool")?);
    // Twins a crashed predecessor left are zombies of their seeds: reap them.
    let ledger = args.socket.with_extension("twins");
    let left = TwinLedger::left_at(&ledger);
    if !left.is_empty() {
        let reaped = Tracer::spawn("reaper")?
            .run(move || {
                TwinLedger::reap_left(&left, |seed, twin| {
                    mitosis_fork::prepare::reap_orphan_twin(seed, twin).unwrap_or_else(|e| {
                        tracing::warn!(seed, twin, "reaping a twin left by a crash: {e}");
                        false
                    })
                })
            })
            .await;
        tracing::info!(reaped, "reaped the twins a previous daemon left");
    }
    let daemon = Arc::new(Daemon {
        listen: tcp.local_addr()?,
        registry: Registry::default(),
        files: Arc::new(mitosis_fork::FileCache::new()),
        stubs,
        vdso_hash: mitosis_fork::local_vdso_hash().context("hashing this host's vDSO")?,
        pool: Arc::new(PeerPool::new(args.pool_size, REQUEST_TIMEOUT).with_tls(tls.as_ref())),
        cache: Arc::new(HostCache::new(args.cache_mib * 256)),
        background_fill: !args.no_background_fill,
        counters: Counters::default(),
        metrics: Default::default(),
        containers,
        bootstrap_codec: args.bootstrap_codec,
        tls,
        twins: TwinLedger::new(ledger),
        flatteners: Default::default(),
        child_containers: Default::default(),
    });
    tracing::info!(
        listen = %daemon.listen,
        socket = %args.socket.display(),
        tls = daemon.tls.is_some(),
        "mitosisd up"
    );
    let mut servers = vec![
        (
            "page server",
            tokio::spawn(peer_server::serve(tcp, daemon.clone())).abort_handle(),
        ),
        (
            "control socket",
            tokio::spawn(control::serve(unix, daemon.clone())).abort_handle(),
        ),
    ];
    if let (Some(listener), Some(tls)) = (control_tcp, daemon.tls.clone()) {
        tracing::info!(addr = %listener.local_addr()?, "control protocol over TCP (mutual TLS)");
        let task = tokio::spawn(mitosisd::remote::serve(listener, daemon.clone(), tls));
        servers.push(("control over TCP", task.abort_handle()));
    }
    if let Some(listener) = metrics {
        tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics, /healthz, /readyz");
        let health = Arc::new(mitosisd::health::Health {
            socket: args.socket.clone(),
            servers,
        });
        tokio::spawn(mitosisd::metrics::serve(listener, daemon.clone(), health));
    }
    tokio::spawn(mitosisd::sweep_cache(
        daemon.clone(),
        Duration::from_secs(2),
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    for seed in daemon.registry.all() {
        control::release(&daemon, &seed).await;
    }
    if let Ok(c) = &daemon.containers {
        c.shutdown();
    }
    let _ = std::fs::remove_file(&args.socket);
    // The pool's containers go with the daemon (Drop of the pool destroys them).
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn every_flag_is_a_config_key() {
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "completions", "man", "help", "version"].contains(&long) {
                continue;
            }
            // A wrong type, but a known key.
            let err = config::parse::<FileConfig>(&format!("{long} = []")).unwrap_err();
            assert!(!err.contains("unknown field"), "--{long}: {err}");
        }
    }

    #[test]
    fn the_packaged_config_parses() {
        let text = include_str!("../../../packaging/mitosisd.toml");
        let file: FileConfig = config::parse(text).unwrap();
        assert!(file.listen.is_some());
    }

    #[test]
    fn a_malformed_file_is_one_line_naming_the_key_and_line() {
        let err = config::parse::<FileConfig>("listen = \"10.0.0.1:7070\"\nstub-pool = \"two\"\n")
            .unwrap_err();
        assert!(
            err.starts_with("line 2, key `stub-pool`: invalid type"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let err = config::parse::<FileConfig>("\n\nstub_pol = 2\n").unwrap_err();
        assert!(
            err.starts_with("line 3, key `stub_pol`: unknown field"),
            "{err}"
        );
        let err = config::parse::<FileConfig>("bootstrap-codec = \"zstd\"").unwrap_err();
        assert!(err.starts_with("line 1, key `bootstrap-codec`:"), "{err}");
        let err = config::parse::<FileConfig>("listen = [").unwrap_err();
        assert!(err.starts_with("line 1"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig =
            config::parse("listen = \"10.0.0.1:7070\"\nstub-pool = 9\ncache-mib = 5\n").unwrap();
        let matches = Args::command()
            .try_get_matches_from(["mitosisd", "--stub-pool", "3"])
            .unwrap();
        let mut args = Args::from_arg_matches(&matches).unwrap();
        merge_config!(args, file, &matches;
            plain: stub_pool, cache_mib; optional: listen);
        assert_eq!(args.stub_pool, 3);
        assert_eq!(args.cache_mib, 5);
        assert_eq!(args.listen(), "10.0.0.1:7070".parse().unwrap());
    }

    #[test]
    fn completions_and_man_page_generate() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Args::command(),
            "mitosisd",
            &mut out,
        );
        assert!(String::from_utf8(out).unwrap().contains("--stub-pool"));
        let mut out = Vec::new();
        clap_mangen::Man::new(Args::command())
            .section("8")
            .render(&mut out)
            .unwrap();
        assert!(String::from_utf8(out).unwrap().contains(".TH mitosisd 8"));
    }
}
