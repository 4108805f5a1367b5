//! `GET /healthz` and `GET /readyz` on the `--metrics` listener, for systemd, load balancers
//! and orchestrators.
//!
//! Liveness: the daemon's runtime answers. Readiness: its control socket is still in place
//! and the control and page servers still accept (their tasks run, on listeners bound before
//! the socket appeared).

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::task::AbortHandle;

/// What readiness checks.
pub struct Health {
    pub socket: PathBuf,
    /// The serving tasks, by what they serve: ready while none has ended.
    pub servers: Vec<(&'static str, AbortHandle)>,
}

impl Health {
    /// Why the daemon is not ready, or `None` if it is.
    pub fn not_ready(&self) -> Option<String> {
        match std::fs::symlink_metadata(&self.socket) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => return Some(format!("{} is not a socket", self.socket.display())),
            Err(e) => return Some(format!("control socket {}: {e}", self.socket.display())),
        }
        let stopped: Vec<&str> = self
            .servers
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(name, _)| *name)
            .collect();
        (!stopped.is_empty()).then(|| format!("stopped: {}", stopped.join(", ")))
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// `/healthz` and `/readyz`.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The status code and body of `GET path` from `addr`.
    fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_while_the_socket_and_servers_are_up() {
        let dir = std::env::temp_dir().join(format!("mitosisd-health-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("mitosisd.sock");
        let unix = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let _ = unix.accept().await;
        });
        let health = Arc::new(Health {
            socket: socket.clone(),
            servers: vec![("control", server.abort_handle())],
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(health)).await });

        let probe = move |path: &'static str| tokio::task::spawn_blocking(move || get(addr, path));
        assert_eq!(probe("/healthz").await.unwrap(), (200, "ok\n".into()));
        assert_eq!(probe("/readyz").await.unwrap(), (200, "ready\n".into()));

        server.abort();
        let _ = server.await;
        let (code, body) = probe("/readyz").await.unwrap();
        assert_eq!(
            (code, body.as_str()),
            (503, "not ready: stopped: control\n")
        );
        std::fs::remove_file(&socket).unwrap();
        let (code, body) = probe("/readyz").await.unwrap();
        assert_eq!(code, 503);
        assert!(body.starts_with("not ready: control socket"), "{body}");
        assert_eq!(probe("/healthz").await.unwrap().0, 200);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
