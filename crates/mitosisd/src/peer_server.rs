//! The page server: other hosts' daemons fetch descriptors and pages of our seeds.
//!
//! Requests are stateless (each names its seed and key), so peers keep a few pooled
//! connections and send any child's requests over any of them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use mitosis_fork::source::read_runs;
use mitosis_transport::frame;
use mitosis_transport::peer::{RemoteError, Request, Response, SeedRef};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::Daemon;
use crate::bootstrap;
use crate::registry::Seed;

/// Most pages one request may ask for (16 MiB).
pub const MAX_PAGES_PER_REQUEST: u64 = 4096;

pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &daemon).await {
                        tracing::debug!(%peer, "peer connection ended: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
}

async fn connection(mut stream: TcpStream, daemon: &Daemon) -> Result<(), frame::FrameError> {
    stream.set_nodelay(true)?;
    loop {
        match frame::read(&mut stream).await? {
            Request::Bootstrap { seed: s } => {
                let packed = match daemon.registry.authorize(s.id, &s.key) {
                    Ok(seed) => bootstrap::packed(&seed, daemon.bootstrap_codec).await,
                    Err(e) => Err(e),
                };
                match packed {
                    Ok(packed) => {
                        for f in &packed.frames {
                            stream.write_all(f).await?;
                        }
                        daemon
                            .counters
                            .bytes_served
                            .fetch_add(packed.bytes, Ordering::Relaxed);
                    }
                    Err(e) => frame::write(&mut stream, &Response::Error(e)).await?,
                }
            }
            request => {
                let response = answer(request, daemon).unwrap_or_else(Response::Error);
                frame::write(&mut stream, &response).await?;
            }
        }
    }
}

fn answer(request: Request, daemon: &Daemon) -> Result<Response, RemoteError> {
    let seed =
        |s: SeedRef| -> Result<Arc<Seed>, RemoteError> { daemon.registry.authorize(s.id, &s.key) };
    Ok(match request {
        Request::Attach { seed: s } => {
            seed(s)?;
            Response::Attached
        }
        Request::Descriptor { seed: s } => Response::Descriptor(seed(s)?.encoded.clone()),
        // Answered in `connection`: it streams.
        Request::Bootstrap { .. } => return Err(RemoteError::TooLarge),
        Request::Pages {
            seed: s,
            runs,
            touched,
        } => {
            let seed = seed(s)?;
            if runs.iter().map(|r| r.1 as u64).sum::<u64>() > MAX_PAGES_PER_REQUEST {
                return Err(RemoteError::TooLarge);
            }
            seed.check_runs(&runs)?;
            if let Some(page) = touched {
                seed.check_runs(&[(page & !4095, 1)])?;
            }
            let bytes =
                read_runs(&seed.memory, &runs).map_err(|e| RemoteError::SeedGone(e.to_string()))?;
            if let Some(page) = touched {
                seed.record(page);
            }
            daemon
                .counters
                .bytes_served
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Response::Pages(bytes)
        }
    })
}
