//! The control protocol over TCP (`mitosisd --control-listen`), for a platform that reaches
//! every host's daemon across the network. Always mutual TLS 1.3 with the daemon's
//! `--tls-*` files: the daemon refuses to start such a listener without them. A peer whose
//! certificate chains to the CA is a cluster operator, with root's rights on the unix
//! socket ([`Caller::operator`]). A resume's stdio is relayed on the connection (`relay`).
//!
//! # What an unauthenticated peer can cost
//!
//! At most [`MAX_CONNECTIONS`] connections are open (at most [`MAX_PER_ADDRESS`] per peer
//! address; more are closed at once, counted in `control_refused`). A connection must finish
//! its handshake within [`HANDSHAKE_TIMEOUT`] of accept or it is closed (counted in
//! `control_tls_refused`); until then it holds a task and rustls' buffers (tens of KiB).
//! So peers without a certificate cost at most about 64 × 100 KiB and never more than
//! [`HANDSHAKE_TIMEOUT`] each. An authenticated one then has [`FIRST_REQUEST_TIMEOUT`] for
//! its request, of at most `MAX_REQUEST_FRAME` bytes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mitosis_transport::control::{MAX_REQUEST_FRAME, Request};
use mitosis_transport::frame;
use mitosis_transport::tls::Tls;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::Daemon;
use crate::accept::{Admitted, Backoff, Limits};
use crate::access::Caller;
use crate::control::FIRST_REQUEST_TIMEOUT;
use crate::resume::Stdio;

/// Most TCP control connections open at once (a running child holds one).
pub const MAX_CONNECTIONS: usize = 256;
/// Most from one address.
pub const MAX_PER_ADDRESS: usize = 128;
/// How long after accept the TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the control protocol on `listener`, every connection mutual TLS with `tls`.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, tls: Tls) {
    let acceptor = tls.acceptor();
    let limits = Limits::new(MAX_PER_ADDRESS, MAX_CONNECTIONS, |c| &c.control_connections);
    let mut backoff = Backoff::new("control connections over TCP");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.accepted();
        let Admitted::Yes(slot) = limits.admit(peer.ip(), &daemon) else {
            daemon
                .counters
                .control_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "refused a control connection over the limits");
            continue;
        };
        let (daemon, acceptor) = (daemon.clone(), acceptor.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, daemon, &acceptor).await {
                tracing::debug!(%peer, "control connection ended: {e}");
            }
            drop(slot);
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    daemon: Arc<Daemon>,
    acceptor: &TlsAcceptor,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let stream = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        shaken => {
            daemon
                .counters
                .control_tls_refused
                .fetch_add(1, Ordering::Relaxed);
            let why = match shaken {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            };
            tracing::info!(%peer, "refused a control connection: {why}");
            return Ok(());
        }
    };
    let (mut reader, writer) = tokio::io::split(stream);
    let first = timeout(
        FIRST_REQUEST_TIMEOUT,
        frame::read_limited::<_, Request>(&mut reader, MAX_REQUEST_FRAME),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))?;
    let request = match first {
        Ok(r) => r,
        Err(frame::FrameError::Closed) => return Ok(()),
        Err(e) => return Err(io::Error::other(e)),
    };
    tracing::debug!(%peer, "control request from an operator");
    crate::control::answer(
        daemon,
        &Caller::operator(),
        request,
        Stdio::Relayed,
        reader,
        writer,
    )
    .await
}
