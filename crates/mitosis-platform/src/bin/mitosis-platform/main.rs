//! `mitosis-platform`: Fn's v2 API over the daemons of a cluster (`serve`), or over a
//! simulated cluster it starts itself (`cluster`: network namespaces with a daemon each).

mod cluster;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mitosis_client::{Endpoint, Remote, Tls};
use mitosis_platform::etcd::EtcdOptions;
use mitosis_platform::store::{Store, StoreSpec};
use mitosis_platform::{Config, HostSpec, Platform, Strategy};

#[derive(Parser)]
#[command(version, about = "A serverless platform on remote fork (Fn v2 API)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API over the daemons given with --host, and with --etcd-endpoints over
    /// those other instances registered too.
    Serve {
        /// A host: its name and its daemon's control endpoint, a unix socket path or
        /// tcp://IP:PORT (its --control-listen; needs the --tls-* flags). Repeat for each host.
        #[arg(
            long = "host",
            value_name = "NAME=ENDPOINT",
            required_unless_present = "etcd_endpoints"
        )]
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
        /// Reach the daemons over TCP with mutual TLS (each with --control-listen, and
        /// certificates of a CA made for this cluster), as across machines, instead of by
        /// their unix sockets.
        #[arg(long)]
        tcp: bool,
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
    /// How calls start, unless a function's `mitosis.io/policy` annotation says: remote-fork
    /// (a child of the function's one seed), fn-cache (Fn's keep-warm: instances started cold,
    /// reused until idle_timeout), local-fork (a seed on every host) or cold (a new instance
    /// per call).
    #[arg(long, default_value = "remote-fork")]
    policy: Strategy,
    /// Admission control: at most N calls at once on each host; calls over it wait for room
    /// (up to their function's timeout, then 503). Unlimited if not given.
    #[arg(long, value_name = "N")]
    max_calls_per_host: Option<usize>,
    /// Do not have every host build a replica of each new seed at once (then a host's
    /// first call of a function builds it).
    #[arg(long)]
    no_priming: bool,
    /// Keep the cluster's state in etcd, shared with other instances (instead of --db):
    /// its client URLs, comma-separated. It holds seeds' handles: restrict who may read it.
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        conflicts_with = "db"
    )]
    etcd_endpoints: Vec<String>,
    /// The prefix of every key (instances that share a cluster use the same).
    #[arg(long, default_value = "/mitosis", value_name = "PREFIX")]
    etcd_prefix: String,
    /// etcd's authentication: the user, and a file holding its password.
    #[arg(long, value_name = "USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    #[arg(long, value_name = "PATH")]
    etcd_password_file: Option<PathBuf>,
    /// TLS to etcd (https:// endpoints): the CA of its certificate, and this client's
    /// certificate and key (PEM) if etcd asks for one.
    #[arg(long, value_name = "PATH")]
    etcd_ca: Option<PathBuf>,
    #[arg(long, value_name = "PATH", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl ApiArgs {
    fn store_spec(&self) -> StoreSpec {
        if !self.etcd_endpoints.is_empty() {
            return StoreSpec::Etcd(EtcdOptions {
                endpoints: self.etcd_endpoints.clone(),
                prefix: self.etcd_prefix.clone(),
                user: self.etcd_user.clone(),
                password_file: self.etcd_password_file.clone(),
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        }
        match &self.db {
            Some(path) => StoreSpec::Sqlite(path.clone()),
            None => StoreSpec::Memory,
        }
    }

    fn config(&self) -> Config {
        Config {
            max_body: self.max_body,
            strategy: self.policy,
            max_calls_per_host: self.max_calls_per_host,
            prime_replicas: !self.no_priming,
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
        Command::Cluster { hosts, tcp, api } => cluster::run(hosts, tcp, &api),
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let spec = api.store_spec();
        let store = Store::open_spec(&spec).await.with_context(|| match &spec {
            StoreSpec::Etcd(o) => format!("connecting to etcd at {}", o.endpoints.join(",")),
            StoreSpec::Sqlite(p) => format!("opening {}", p.display()),
            StoreSpec::Memory => "opening the store in memory".into(),
        })?;
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
