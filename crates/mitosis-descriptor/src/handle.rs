//! The handle a user passes around: `mitosis://HOST:PORT/SEED_ID/KEY`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use thiserror::Error;

/// Bytes of a seed's secret key.
pub const KEY_LEN: usize = 32;
const SCHEME: &str = "mitosis://";

/// Everything a peer needs to reach a prepared seed: where, which, and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Handle {
    pub host: SocketAddr,
    pub seed_id: u64,
    pub key: [u8; KEY_LEN],
}

// The key is a secret: keep it out of logs and Debug output.
impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({}/{})", self.host, self.seed_id)
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}/{}",
            self.host,
            self.seed_id,
            hex::encode(self.key)
        )
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandleError {
    #[error("malformed handle: it must look like mitosis://HOST:PORT/SEED/KEY")]
    Shape,
    #[error("malformed handle: bad host address {0:?}")]
    Host(String),
    #[error("malformed handle: bad seed id {0:?}")]
    Seed(String),
    #[error("malformed handle: the key must be {} hex digits", KEY_LEN * 2)]
    Key,
}

impl FromStr for Handle {
    type Err = HandleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.trim().strip_prefix(SCHEME).ok_or(HandleError::Shape)?;
        let mut parts = rest.split('/');
        let (Some(host), Some(seed), Some(key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HandleError::Shape);
        };
        let host = host.parse().map_err(|_| HandleError::Host(host.into()))?;
        let seed_id = seed.parse().map_err(|_| HandleError::Seed(seed.into()))?;
        let mut k = [0u8; KEY_LEN];
        hex::decode_to_slice(key, &mut k).map_err(|_| HandleError::Key)?;
        Ok(Handle {
            host,
            seed_id,
            key: k,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> Handle {
        Handle {
            host: "10.77.0.1:7070".parse().unwrap(),
            seed_id: 42,
            key: [0xab; KEY_LEN],
        }
    }

    #[test]
    fn round_trip() {
        let h = handle();
        assert_eq!(h.to_string().parse::<Handle>().unwrap(), h);
    }

    #[test]
    fn debug_hides_the_key() {
        assert!(!format!("{:?}", handle()).contains("abab"));
    }

    #[test]
    fn malformed_handles_name_the_cause() {
        let good = handle().to_string();
        assert_eq!("x".parse::<Handle>(), Err(HandleError::Shape));
        assert_eq!(
            format!("{good}/x").parse::<Handle>(),
            Err(HandleError::Shape)
        );
        let bad_host = good.replace("10.77.0.1:7070", "nohost");
        assert!(matches!(
            bad_host.parse::<Handle>(),
            Err(HandleError::Host(_))
        ));
        let bad_seed = good.replace("/42/", "/-1/");
        assert!(matches!(
            bad_seed.parse::<Handle>(),
            Err(HandleError::Seed(_))
        ));
        assert_eq!(
            good[..good.len() - 2].parse::<Handle>(),
            Err(HandleError::Key)
        );
    }
}
