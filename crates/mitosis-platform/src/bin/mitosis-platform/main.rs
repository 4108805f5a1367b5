//! `mitosis-platform`: Fn's v2 API over the daemons of a cluster (`serve`), or over a
//! simulated cluster it starts itself (`cluster`: network namespaces with a daemon each).

mod cluster;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mitosis_client::{Endpoint, Remote, Tls};
use mitosis_platform::store::Store;
use mitosis_platform::{Config, HostSpec, Platform};

#[derive(Parser)]
#[command(version, about = "A serverless platform on remote fork (Fn v2 API)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API over the daemons given with --host.
    Serve {
        /// A host: its name and its daemon's control endpoint, a unix socket path or
        /// tcp://IP:PORT (its --control-listen; needs the --tls-* flags). Repeat for each host.
        #[arg(long = "host", value_name = "NAME=ENDPOINT", required = true)]
        hosts: Vec<HostSpec>,
        /// The platform's certificate (PEM) for daemons over TCP: it must chain to their CA,
        /// which makes the platform a cluster operator on them.
        #[arg(long, value_name = "PEM")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, value_name = "PEM")]
        tls_key: Option<PathBuf>,
        /// The CA (PEM) the daemons' certificates must chain to.
        #[arg(long, value_name = "PEM")]
        tls_ca: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start N simulated hosts with a daemon each and serve the API over them; SIGINT or
    /// SIGTERM tears everything down.
    Cluster {
        /// How many hosts.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
pub(crate) struct ApiArgs {
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) api: SocketAddr,
    /// The SQLite file of apps and functions (in memory if not given).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// Request bodies over this many bytes are refused (413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
}

impl ApiArgs {
    fn store(&self) -> Result<Store> {
        Ok(match &self.db {
            Some(path) => {
                Store::open(path).with_context(|| format!("opening {}", path.display()))?
            }
            None => Store::in_memory()?,
        })
    }

    fn config(&self) -> Config {
        Config {
            max_body: self.max_body,
            ..Config::default()
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MITOSIS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            hosts,
            tls_cert,
            tls_key,
            tls_ca,
            api,
        } => remote(&hosts, tls_cert, tls_key, tls_ca)
            .and_then(|remote| serve(hosts, &api, remote, || {})),
        Command::Cluster { hosts, api } => cluster::run(hosts, &api),
    };
    if let Err(e) = result {
        eprintln!("mitosis-platform: {e:#}");
        std::process::exit(1);
    }
}

/// How the platform reaches daemons over TCP: given TLS, or none (then no host may be TCP).
fn remote(
    hosts: &[HostSpec],
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> Result<Option<Remote>> {
    let tls = Tls::from_flags(cert.as_deref(), key.as_deref(), ca.as_deref())?;
    if tls.is_none()
        && let Some(h) = hosts
            .iter()
            .find(|h| matches!(h.endpoint, Endpoint::Tcp(_)))
    {
        anyhow::bail!(
            "host {} is {}: daemons over TCP need --tls-cert, --tls-key and --tls-ca",
            h.name,
            h.endpoint
        );
    }
    Ok(tls.map(Remote::new))
}

/// Serves the API until SIGINT or SIGTERM, then drops the seeds it made; `listening` runs
/// once the API accepts connections.
pub(crate) fn serve(
    hosts: Vec<HostSpec>,
    api: &ApiArgs,
    remote: Option<Remote>,
    listening: impl FnOnce(),
) -> Result<()> {
    let store = api.store()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let config = Config {
            remote,
            ..api.config()
        };
        let platform = Platform::new(config, store, hosts);
        let listener = tokio::net::TcpListener::bind(api.api)
            .await
            .with_context(|| format!("listening on {}", api.api))?;
        tracing::info!(api = %api.api, policy = platform.policy.name(), "serving Fn's v2 API");
        listening();
        axum::serve(listener, mitosis_platform::api::router(platform.clone()))
            .with_graceful_shutdown(stopped())
            .await
            .context("serving")?;
        tracing::info!("stopping: dropping the seeds");
        platform.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // Calls still running hold blocking threads; their children end with their connections.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot watch SIGINT/SIGTERM: stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
