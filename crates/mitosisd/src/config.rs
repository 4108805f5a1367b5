//! `mitosisd --config PATH`: the daemon's flags in a TOML file, each key a flag's long name
//! (`stub-pool = 2`); a flag given on the command line wins over the file. Unknown keys are
//! refused, and a malformed file is one line naming the key and the line.

use std::net::SocketAddr;
use std::path::PathBuf;

use mitosis_transport::packed::Codec;
use serde::Deserialize;

/// Every flag of `mitosisd` but --config, as optional keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub control_listen: Option<SocketAddr>,
    pub stub_pool: Option<usize>,
    pub stub: Option<PathBuf>,
    pub cache_mib: Option<u64>,
    pub no_background_fill: Option<bool>,
    pub pool_size: Option<usize>,
    pub instance: Option<String>,
    pub init: Option<PathBuf>,
    pub container_pool: Option<usize>,
    #[serde(default, deserialize_with = "mitosis_config::parsed")]
    pub bootstrap_codec: Option<Codec>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
}

pub use mitosis_config::load;
#[cfg(test)]
pub use mitosis_config::parse;
