//! Where a daemon's control protocol is reached: its unix socket on this host, or its TCP
//! listener (`mitosisd --control-listen`, mutual TLS) on any.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// A daemon's control endpoint: `unix:/path`, a bare `/path`, or `tcp://IP:PORT` (an IP:
/// the daemon's certificate names the address dialed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("{0:?}: an empty endpoint")]
    Empty(String),
    #[error("{0:?}: expected tcp://IP:PORT (an IP address, not a name)")]
    BadAddress(String),
    #[error("{0:?}: unknown scheme (expected unix:/path, /path or tcp://IP:PORT)")]
    Scheme(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(addr) = s.strip_prefix("tcp://") {
            return addr
                .trim_end_matches('/')
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|_| EndpointError::BadAddress(s.to_owned()));
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.contains("://") {
            return Err(EndpointError::Scheme(s.to_owned()));
        }
        if path.is_empty() {
            return Err(EndpointError::Empty(s.to_owned()));
        }
        Ok(Endpoint::Unix(path.into()))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for (text, want, shown) in [
            (
                "/run/m.sock",
                Endpoint::Unix("/run/m.sock".into()),
                "/run/m.sock",
            ),
            (
                "unix:/run/m.sock",
                Endpoint::Unix("/run/m.sock".into()),
                "/run/m.sock",
            ),
            ("rel.sock", Endpoint::Unix("rel.sock".into()), "rel.sock"),
            (
                "tcp://10.0.0.1:7071",
                Endpoint::Tcp("10.0.0.1:7071".parse().unwrap()),
                "tcp://10.0.0.1:7071",
            ),
            (
                "tcp://[::1]:7071",
                Endpoint::Tcp("[::1]:7071".parse().unwrap()),
                "tcp://[::1]:7071",
            ),
        ] {
            let e: Endpoint = text.parse().unwrap();
            assert_eq!(e, want, "{text}");
            assert_eq!(e.to_string(), shown);
            assert_eq!(shown.parse::<Endpoint>().unwrap(), want);
        }
        assert!(matches!(
            "tcp://daemon.example:7071".parse::<Endpoint>(),
            Err(EndpointError::BadAddress(_))
        ));
        assert!(matches!(
            "tcp://10.0.0.1".parse::<Endpoint>(),
            Err(EndpointError::BadAddress(_))
        ));
        assert!(matches!(
            "http://x".parse::<Endpoint>(),
            Err(EndpointError::Scheme(_))
        ));
        assert!(matches!(
            "".parse::<Endpoint>(),
            Err(EndpointError::Empty(_))
        ));
        assert!(matches!(
            "unix:".parse::<Endpoint>(),
            Err(EndpointError::Empty(_))
        ));
    }
}
