//! A throwaway Redis server inside one host of a testbed (the workflow benchmark's baseline
//! passes state through it): Debian's `redis-server`, started in the host's network
//! namespace on its own address, with a directory of its own and no persistence, killed
//! when stopped or dropped. Never a system service.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Result, TestbedError};
use crate::host::Host;

/// How long the server may take to answer its first PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server` in a host of a testbed.
#[derive(Debug)]
pub struct Redis {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Redis {
    /// Starts `program` (e.g. `redis-server`) in `host`'s namespace, listening on the host's
    /// address at `port`, with `dir` (created) as its working directory and log; returns once
    /// it answers PING (sent from inside the host's namespace).
    ///
    /// # Errors
    ///
    /// If the program cannot be started (not installed), exits, or does not answer within
    /// 10 s (the error then holds the end of its log; the server is killed).
    pub fn start(program: &str, host: &Host, port: u16, dir: &Path) -> Result<Redis> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TestbedError::io(format!("creating {}", dir.display()), e))?;
        let addr = SocketAddr::V4(SocketAddrV4::new(host.addr(), port));
        let log = dir.join("redis.log");
        let mut cmd = host.command(program);
        cmd.args(["--bind", &host.addr().to_string()])
            .args(["--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--databases", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            command: format!("{program} (Debian's redis-server; scripts/setup.sh installs it)"),
            source,
        })?;
        let mut redis = Redis {
            child: Some(child),
            addr,
            dir: dir.to_owned(),
        };
        let dialer = host.dialer()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = redis
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(TestbedError::CommandFailed {
                    command: format!("{program} on {addr}"),
                    status: status.to_string(),
                    stderr: redis.log_tail(),
                });
            }
            if ping(&dialer, addr).is_ok() {
                return Ok(redis);
            }
            if Instant::now() > deadline {
                let tail = redis.log_tail();
                redis.kill();
                return Err(TestbedError::CommandFailed {
                    command: format!("{program} on {addr}"),
                    status: format!("no answer to PING within {READY_TIMEOUT:?}"),
                    stderr: tail,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where it listens (the host's address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills and reaps the server.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One PING, answered `+PONG`.
fn ping(dialer: &crate::Dialer, addr: SocketAddr) -> std::io::Result<()> {
    let mut s = dialer.dial(addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"PING\r\n")?;
    let mut answer = [0u8; 7];
    s.read_exact(&mut answer)?;
    if &answer == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "PING answered {:?}",
            String::from_utf8_lossy(&answer)
        )))
    }
}
