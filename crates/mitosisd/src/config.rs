//! `mitosisd --config PATH`: the daemon's flags in a TOML file, each key a flag's long name
//! (`stub-pool = 2`); a flag given on the command line wins over the file. Unknown keys are
//! refused, and a malformed file is one line naming the key and the line.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::ArgMatches;
use clap::parser::ValueSource;
use mitosis_transport::packed::Codec;
use serde::{Deserialize, Deserializer};

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
    pub pool_size: Option<usize>,
    pub instance: Option<String>,
    pub init: Option<PathBuf>,
    pub container_pool: Option<usize>,
    #[serde(default, deserialize_with = "parsed")]
    pub bootstrap_codec: Option<Codec>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
}

/// A value read as a string and parsed as its flag's is.
fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Reads and checks the file; the error is one line: the file, the line, the key and what
/// is wrong.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

/// `text` as a `T`, or where and why not, on one line.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        let Some(span) = e.span() else {
            return message;
        };
        let line_no = text[..span.start].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        match line.split_once('=') {
            Some((key, _)) => format!("line {line_no}, key `{}`: {message}", key.trim()),
            None => format!("line {line_no}: {message}"),
        }
    })
}

/// Whether the flag `id` was given on the command line or in its environment variable:
/// then it wins over the file.
pub fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Takes each key of `$file` present there unless its flag was given: `plain` fields are
/// flags with defaults, `optional` ones are `Option`s.
macro_rules! merge_config {
    ($args:expr, $file:expr, $matches:expr; plain: $($p:ident),*; optional: $($o:ident),* $(,)?) => {
        $(if let Some(v) = $file.$p && !given($matches, stringify!($p)) { $args.$p = v; })*
        $(if let Some(v) = $file.$o && !given($matches, stringify!($o)) { $args.$o = Some(v); })*
    };
}
