//! The page server: other hosts' daemons fetch descriptors and pages of our seeds.

use std::sync::Arc;

use mitosis_fork::source::read_runs;
use mitosis_transport::frame;
use mitosis_transport::peer::{RemoteError, Request, Response};
use tokio::net::{TcpListener, TcpStream};

use crate::Daemon;
use crate::registry::{Registry, Seed};

/// Most pages one request may ask for (16 MiB).
const MAX_PAGES_PER_REQUEST: u64 = 4096;

pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &daemon.registry).await {
                        tracing::debug!(%peer, "peer connection ended: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
}

async fn connection(mut stream: TcpStream, registry: &Registry) -> Result<(), frame::FrameError> {
    stream.set_nodelay(true)?;
    let mut attached: Option<Arc<Seed>> = None;
    loop {
        let request: Request = frame::read(&mut stream).await?;
        let response = answer(request, registry, &mut attached);
        frame::write(&mut stream, &response).await?;
    }
}

fn answer(request: Request, registry: &Registry, attached: &mut Option<Arc<Seed>>) -> Response {
    let result = match request {
        Request::Attach { seed_id, key } => registry.authorize(seed_id, &key).map(|seed| {
            *attached = Some(seed);
            Response::Attached
        }),
        Request::Descriptor => {
            current(registry, attached).map(|s| Response::Descriptor(s.encoded.clone()))
        }
        Request::Pages { runs } => current(registry, attached).and_then(|seed| {
            if runs.iter().map(|r| r.1 as u64).sum::<u64>() > MAX_PAGES_PER_REQUEST {
                return Err(RemoteError::TooLarge);
            }
            seed.check_runs(&runs)?;
            read_runs(&seed.memory, &runs)
                .map(Response::Pages)
                .map_err(|e| RemoteError::SeedGone(e.to_string()))
        }),
    };
    result.unwrap_or_else(Response::Error)
}

/// The attached seed, as long as it is still prepared (a dropped seed serves nothing more).
fn current(registry: &Registry, attached: &Option<Arc<Seed>>) -> Result<Arc<Seed>, RemoteError> {
    let seed = attached.as_ref().ok_or(RemoteError::NotAttached)?;
    if !registry.is_live(seed) {
        return Err(RemoteError::NoSuchSeed(seed.id));
    }
    Ok(seed.clone())
}
