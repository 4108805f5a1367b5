//! A throwaway etcd on loopback (free ports, a temporary data directory), for tests and
//! simulated clusters: killed and its directory removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a local etcd did not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalEtcdError {
    #[error("etcd is not installed (Debian: apt-get install etcd-server)")]
    Missing,
    #[error("starting etcd: {0}")]
    Io(#[from] std::io::Error),
    #[error("etcd did not answer within {0:?}: {1}")]
    NotReady(Duration, String),
}

pub struct LocalEtcd {
    child: Child,
    dir: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

/// Whether an `etcd` binary is on the PATH.
pub fn installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts etcd on two free loopback ports and waits until it answers (10 s at most).
    pub fn start() -> Result<LocalEtcd, LocalEtcdError> {
        if !installed() {
            return Err(LocalEtcdError::Missing);
        }
        let (client, peer) = (free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(format!(
            "mitosis-etcd-{}-{}",
            std::process::id(),
            crate::ids::ulid()
        ));
        std::fs::create_dir_all(&dir)?;
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg("mitosis-test")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("mitosis-test={peer_url}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let etcd = LocalEtcd {
            child,
            dir,
            endpoint,
        };
        etcd.wait_ready(Duration::from_secs(10))?;
        Ok(etcd)
    }

    /// Waits for etcd's health endpoint to say it is healthy.
    fn wait_ready(&self, within: Duration) -> Result<(), LocalEtcdError> {
        let t0 = Instant::now();
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        let mut last = String::from("no answer");
        while t0.elapsed() < within {
            match health(&addr) {
                Ok(true) => return Ok(()),
                Ok(false) => last = "not healthy yet".into(),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        Err(LocalEtcdError::NotReady(
            within,
            format!("{last}; log: {log}"),
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// GET /health over plain HTTP/1.0.
fn health(addr: &str) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer.contains("\"health\":\"true\""))
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
