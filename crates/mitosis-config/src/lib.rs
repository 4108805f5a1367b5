//! Config files for the binaries: a TOML file whose keys are the flags' long names, under
//! the command line (a flag given there or in its environment variable wins). Unknown keys
//! are refused by the callers' `deny_unknown_fields`; an error is one line naming the line
//! and the key.

use std::fmt::Display;
use std::path::Path;
use std::str::FromStr;

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::{Deserialize, Deserializer};

/// A list of values, each read as a string and parsed as its flag's is.
pub fn parsed_list<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// A value read as a string and parsed as its flag's is.
pub fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
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
#[macro_export]
macro_rules! merge_config {
    ($args:expr, $file:expr, $matches:expr; plain: $($p:ident),*; optional: $($o:ident),* $(,)?) => {
        $(if let Some(v) = $file.$p && !$crate::given($matches, stringify!($p)) { $args.$p = v; })*
        $(if let Some(v) = $file.$o && !$crate::given($matches, stringify!($o)) { $args.$o = Some(v); })*
    };
}
