//! `mitosis-platform --config PATH`: the platform's flags in a TOML file, each key a flag's
//! long name (`max-body = 1048576`); a flag given on the command line wins over the file.
//! Unknown keys are refused, and a malformed file is one line naming the key and the line.

use std::net::SocketAddr;
use std::path::PathBuf;

use mitosis_platform::{HostSpec, Strategy};
use serde::Deserialize;

/// Every flag of `mitosis-platform serve` but --config, as optional keys (`cluster` takes
/// the API's and the store's; --host and --tls-* are for `serve`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    #[serde(default, deserialize_with = "mitosis_config::parsed_list")]
    pub host: Option<Vec<HostSpec>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub api: Option<SocketAddr>,
    pub db: Option<PathBuf>,
    pub max_body: Option<usize>,
    #[serde(default, deserialize_with = "mitosis_config::parsed")]
    pub policy: Option<Strategy>,
    pub max_calls_per_host: Option<usize>,
    pub no_priming: Option<bool>,
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
}

#[cfg(test)]
pub use mitosis_config::parse;
pub use mitosis_config::{given, load};
