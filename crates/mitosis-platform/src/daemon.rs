//! One request to a host's daemon over its endpoint: the blocking unix-socket client on a
//! blocking thread, or the async TCP client with mutual TLS. Each is bounded by a timeout.

use std::path::Path;
use std::time::Duration;

use mitosis_client::{Client, DaemonStatus, Endpoint, Error, PrepareStats, Remote, Request};

/// How a platform reaches its hosts' daemons: their endpoints, and (for TCP ones) its
/// certificate and how it dials.
#[derive(Clone)]
pub struct Reach {
    pub endpoint: Endpoint,
    pub remote: Option<Remote>,
}

fn no_tls(addr: std::net::SocketAddr) -> Error {
    Error::ConnectTcp {
        addr,
        err: std::io::Error::other(
            "no TLS configured (--tls-cert, --tls-key, --tls-ca) for daemons over TCP",
        ),
    }
}

async fn bounded<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(Error::Timeout))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(Error::Send(std::io::Error::other(e))))
}

impl Reach {
    /// The daemon's status (its load among it).
    pub async fn status(self, timeout: Duration) -> Result<DaemonStatus, Error> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let path = path.clone();
                let asked =
                    blocking(move || Client::connect(&path)?.with_timeout(timeout)?.status());
                // The read timeout bounds the thread; this bounds the connect too.
                bounded(timeout + Duration::from_secs(1), asked).await
            }
            Endpoint::Tcp(addr) => {
                let remote = self.remote.as_ref().ok_or_else(|| no_tls(*addr))?;
                bounded(timeout, async {
                    remote.connect(*addr).await?.status().await
                })
                .await
            }
        }
    }

    /// Prepares the bundle `image` (a directory on the daemon's host).
    pub async fn prepare_bundle(
        self,
        image: &str,
        ready: Duration,
    ) -> Result<(String, PrepareStats), Error> {
        // The daemon waits up to `ready` for the bundle to be warm.
        let timeout = ready + Duration::from_secs(10);
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let (path, image) = (path.clone(), image.to_owned());
                blocking(move || {
                    Client::connect(&path)?
                        .with_timeout(timeout)?
                        .prepare_bundle(Path::new(&image), ready)
                })
                .await
            }
            Endpoint::Tcp(addr) => {
                let remote = self.remote.as_ref().ok_or_else(|| no_tls(*addr))?;
                bounded(timeout, async {
                    remote
                        .connect(*addr)
                        .await?
                        .prepare_bundle(Path::new(image), ready)
                        .await
                })
                .await
            }
        }
    }

    /// Prepares process `pid` of the daemon's host (one of its running children: flattened
    /// first, see docs/workflows.md) as a seed; bounded by `timeout`.
    pub async fn prepare_pid(self, pid: i32, timeout: Duration) -> Result<String, Error> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let path = path.clone();
                let asked = blocking(move || {
                    Client::connect(&path)?
                        .with_timeout(timeout)?
                        .prepare_pid(pid)
                        .map(|(handle, _)| handle)
                });
                bounded(timeout + Duration::from_secs(1), asked).await
            }
            Endpoint::Tcp(addr) => {
                let remote = self.remote.as_ref().ok_or_else(|| no_tls(*addr))?;
                bounded(timeout, async {
                    let (handle, _) = remote.connect(*addr).await?.prepare_pid(pid).await?;
                    Ok(handle)
                })
                .await
            }
        }
    }

    /// Builds the daemon's replica of the seed behind `handle` (bounded by `timeout`).
    pub async fn replicate(self, handle: &str, timeout: Duration) -> Result<(), Error> {
        let handle = handle.to_owned();
        self.done(Request::Replicate { handle }, timeout).await
    }

    /// Forgets the daemon's replica of the seed behind `handle` (its process ends); an
    /// error if it has none.
    pub async fn evict(self, handle: &str) -> Result<(), Error> {
        let handle = handle.to_owned();
        self.done(Request::Evict { handle }, Duration::from_secs(5))
            .await
    }

    /// Drops the seed behind `handle` on the daemon's host.
    pub async fn drop_seed(self, handle: &str) -> Result<(), Error> {
        let handle = handle.to_owned();
        self.done(Request::Drop { handle }, Duration::from_secs(5))
            .await
    }

    /// Sends `request`, answered by `Done`, over whichever endpoint the daemon has (bounded
    /// by `timeout`).
    async fn done(self, request: Request, timeout: Duration) -> Result<(), Error> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let path = path.clone();
                let asked = blocking(move || {
                    Client::connect(&path)?
                        .with_timeout(timeout)?
                        .done(&request)
                });
                bounded(timeout + Duration::from_secs(1), asked).await
            }
            Endpoint::Tcp(addr) => {
                let remote = self.remote.as_ref().ok_or_else(|| no_tls(*addr))?;
                bounded(timeout, async {
                    remote.connect(*addr).await?.done(&request).await
                })
                .await
            }
        }
    }
}
