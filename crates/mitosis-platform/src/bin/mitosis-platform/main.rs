//! `mitosis-platform`: Fn's v2 API over the daemons of a cluster (`serve`), or over a
//! simulated cluster it starts itself (`cluster`: network namespaces with a daemon each).

mod cluster;
#[macro_use]
mod config;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use config::{FileConfig, given};
use mitosis_client::{Endpoint, Remote, Tls};
use mitosis_config::merge_config;
use mitosis_platform::etcd::EtcdOptions;
use mitosis_platform::store::{Store, StoreSpec};
use mitosis_platform::{Config, HostSpec, Platform, Strategy};

#[derive(Parser)]
#[command(
    name = "mitosis-platform",
    version,
    about = "A serverless platform on remote fork (Fn v2 API)"
)]
struct Cli {
    /// Read flags from this TOML file (keys are the flags' long names: `max-body = 1048576`,
    /// `host = ["h0=/run/mitosis/mitosisd.sock"]`); a flag on the command line wins.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "MITOSIS_PLATFORM_CONFIG"
    )]
    config: Option<PathBuf>,
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
        /// At least one --host, or --etcd-endpoints.
        #[arg(long = "host", value_name = "NAME=ENDPOINT")]
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
    /// Print a shell completion script for mitosis-platform.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print mitosis-platform(8) in roff.
    #[command(hide = true)]
    Man,
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
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The prefix of every key (instances that share a cluster use the same).
    #[arg(long, default_value = "/mitosis", value_name = "PREFIX")]
    etcd_prefix: String,
    /// etcd's authentication: the user, and a file holding its password.
    /// (--etcd-user needs --etcd-password-file, --etcd-cert and --etcd-key go together, and
    /// --db and --etcd-endpoints exclude each other: checked after --config is read.)
    #[arg(long, value_name = "USER")]
    etcd_user: Option<String>,
    #[arg(long, value_name = "PATH")]
    etcd_password_file: Option<PathBuf>,
    /// TLS to etcd (https:// endpoints): the CA of its certificate, and this client's
    /// certificate and key (PEM) if etcd asks for one.
    #[arg(long, value_name = "PATH")]
    etcd_ca: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
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
    let cli = Cli::load();
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
        Command::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(shell, &mut Cli::command(), "mitosis-platform", &mut out);
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .section("8")
            .render(&mut std::io::stdout())
            .map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("mitosis-platform: {e:#}");
        std::process::exit(1);
    }
}

impl Cli {
    /// The command line with --config's file under it; exits (78, EX_CONFIG) with one line if
    /// the file is malformed or what it and the flags say does not fit.
    fn load() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let file = match &cli.config {
            Some(path) => config::load(path).unwrap_or_else(|e| config_error(&e)),
            None => FileConfig::default(),
        };
        if let Err(e) = cli.merge(file, &matches) {
            config_error(&e);
        }
        cli
    }

    fn merge(&mut self, mut file: FileConfig, matches: &ArgMatches) -> Result<(), String> {
        let Some((_, sub)) = matches.subcommand() else {
            return Ok(());
        };
        match &mut self.command {
            Command::Serve {
                hosts,
                tls_cert,
                tls_key,
                tls_ca,
                api,
            } => {
                if let Some(v) = file.host.take()
                    && !given(sub, "hosts")
                {
                    *hosts = v;
                }
                let mut tls = (tls_cert.take(), tls_key.take(), tls_ca.take());
                for (slot, id, value) in [
                    (&mut tls.0, "tls_cert", file.tls_cert.take()),
                    (&mut tls.1, "tls_key", file.tls_key.take()),
                    (&mut tls.2, "tls_ca", file.tls_ca.take()),
                ] {
                    if let Some(v) = value
                        && !given(sub, id)
                    {
                        *slot = Some(v);
                    }
                }
                (*tls_cert, *tls_key, *tls_ca) = tls;
                api.merge(file, sub);
                if hosts.is_empty() && api.etcd_endpoints.is_empty() {
                    return Err(
                        "serve needs --host NAME=ENDPOINT or --etcd-endpoints (on the \
                                command line or in --config)"
                            .into(),
                    );
                }
                api.check()
            }
            Command::Cluster { api, .. } => {
                api.merge(file, sub);
                api.check()
            }
            Command::Completions { .. } | Command::Man => Ok(()),
        }
    }
}

fn config_error(message: &str) -> ! {
    eprintln!("mitosis-platform: {message}");
    std::process::exit(78);
}

impl ApiArgs {
    fn merge(&mut self, file: FileConfig, m: &ArgMatches) {
        merge_config!(self, file, m;
            plain: api, max_body, policy, no_priming, etcd_endpoints, etcd_prefix;
            optional: db, max_calls_per_host, etcd_user, etcd_password_file, etcd_ca, etcd_cert, etcd_key);
    }

    /// What clap checks for flags, for what came from the file too.
    fn check(&self) -> Result<(), String> {
        if self.db.is_some() && !self.etcd_endpoints.is_empty() {
            return Err("db and etcd-endpoints exclude each other".into());
        }
        if self.etcd_user.is_some() && self.etcd_password_file.is_none() {
            return Err("etcd-user needs etcd-password-file".into());
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err("etcd-cert and etcd-key go together".into());
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_of_serve_is_a_config_key() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "help"].contains(&long) {
                continue;
            }
            let err = config::parse::<FileConfig>(&format!("{long} = {{}}")).unwrap_err();
            assert!(!err.contains("unknown field"), "--{long}: {err}");
        }
    }

    #[test]
    fn the_packaged_config_parses_and_flags_win() {
        let text = include_str!("../../../../../packaging/mitosis-platform.toml");
        let file: FileConfig = config::parse(text).unwrap();
        let matches = Cli::command()
            .try_get_matches_from(["mitosis-platform", "serve", "--max-body", "7"])
            .unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        cli.merge(file, &matches).unwrap();
        let Command::Serve { hosts, api, .. } = cli.command else {
            panic!("not serve")
        };
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].name, "h0");
        assert_eq!(api.max_body, 7);
        assert_eq!(api.api, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn a_malformed_file_is_one_line_naming_the_key_and_line() {
        let err = config::parse::<FileConfig>("api = \"127.0.0.1:8080\"\npolicy = \"warm\"\n")
            .unwrap_err();
        assert!(err.starts_with("line 2, key `policy`:"), "{err}");
        let err = config::parse::<FileConfig>("host = [\"h0\"]").unwrap_err();
        assert!(err.starts_with("line 1, key `host`:"), "{err}");
        let err = config::parse::<FileConfig>("apii = 1").unwrap_err();
        assert!(
            err.starts_with("line 1, key `apii`: unknown field"),
            "{err}"
        );
        let matches = Cli::command()
            .try_get_matches_from(["mitosis-platform", "serve"])
            .unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        let file = config::parse("db = \"/x.db\"\netcd-endpoints = [\"http://e:2379\"]").unwrap();
        assert!(cli.merge(file, &matches).unwrap_err().contains("exclude"));
    }

    #[test]
    fn completions_and_man_page_generate() {
        let mut out = Vec::new();
        let mut cmd = Cli::command();
        clap_complete::generate(
            clap_complete::Shell::Zsh,
            &mut cmd,
            "mitosis-platform",
            &mut out,
        );
        assert!(String::from_utf8(out).unwrap().contains("serve"));
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .section("8")
            .render(&mut out)
            .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains(".TH mitosis-platform 8")
        );
    }
}
