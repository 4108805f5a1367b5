//! One simulated host: a network namespace, optionally running a daemon.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Result, TestbedError};
use crate::netns;

/// Environment variable set on every process the testbed starts, holding the
/// testbed id, so that leak checks can find them even after their namespace
/// has lost its name.
pub const TESTBED_ID_ENV: &str = "MITOSIS_TESTBED_ID";

/// How long a freshly started daemon gets to accept a connection.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often readiness of a starting daemon is checked.
const DAEMON_READY_POLL: Duration = Duration::from_millis(5);
/// How long a daemon gets to exit after SIGTERM before it gets SIGKILL.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(5);
/// How much of the end of a daemon log goes into error messages.
const LOG_TAIL_BYTES: u64 = 4096;

/// The daemon run on every host of a testbed.
///
/// It is started as `BIN --listen 10.77.0.X:PORT --socket DIR/hostI/mitosisd.sock
/// [EXTRA_ARGS...]` inside the host's namespace (the socket's directory is the daemon's to
/// make: mitosisd wants it private), with stdout and stderr
/// appended to `DIR/hostI.log`. It counts as ready once its unix socket
/// accepts a connection (which is closed right away, without a request), so
/// it should bind its TCP listener before its unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The daemon executable.
    pub bin: PathBuf,
    /// The TCP port it listens on, on the host's address.
    pub port: u16,
    /// Arguments appended after `--listen` and `--socket`; `{index}` in them becomes the
    /// host's index (so each host can have files of its own, such as a TLS certificate).
    pub extra_args: Vec<String>,
    /// The umask it starts with (the test process's if `None`).
    pub umask: Option<u32>,
}

impl DaemonConfig {
    /// A daemon config without extra arguments.
    pub fn new(bin: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            bin: bin.into(),
            port,
            extra_args: Vec::new(),
            umask: None,
        }
    }
}

/// One host of a [`Testbed`](crate::Testbed).
#[derive(Debug)]
pub struct Host {
    index: usize,
    testbed_id: String,
    netns: String,
    addr: Ipv4Addr,
    socket_path: PathBuf,
    log_path: PathBuf,
    daemon_config: Option<DaemonConfig>,
    /// The running daemon, behind a lock so that a shared `&Host` can kill
    /// and restart it (tests of dead hosts run alongside other users).
    daemon: Mutex<Option<Child>>,
}

impl Host {
    pub(crate) fn new(
        index: usize,
        testbed_id: &str,
        netns: String,
        addr: Ipv4Addr,
        dir: &Path,
        daemon_config: Option<DaemonConfig>,
    ) -> Self {
        Self {
            index,
            testbed_id: testbed_id.to_owned(),
            netns,
            addr,
            socket_path: dir.join(format!("host{index}")).join("mitosisd.sock"),
            log_path: dir.join(format!("host{index}.log")),
            daemon_config,
            daemon: Mutex::new(None),
        }
    }

    /// The host's position in the testbed.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The name of the host's network namespace, `{testbed id}-h{index}`.
    pub fn name(&self) -> &str {
        &self.netns
    }

    /// The path of the host's network namespace file.
    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns)
    }

    /// The host's address on the testbed network, 10.77.0.(index+1).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Where the host's daemon listens (the configured port, or 0 without a
    /// daemon).
    pub fn listen_addr(&self) -> SocketAddr {
        let port = self.daemon_config.as_ref().map_or(0, |cfg| cfg.port);
        SocketAddr::V4(SocketAddrV4::new(self.addr, port))
    }

    /// The unix socket of the host's daemon.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The file collecting the daemon's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the daemon has logged so far (empty if there is no log).
    pub fn daemon_log(&self) -> String {
        fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Makes TCP connections from inside the host's network namespace (to reach other
    /// hosts' addresses from a process in the root namespace).
    ///
    /// # Errors
    ///
    /// If the namespace cannot be joined.
    pub fn dialer(&self) -> Result<netns::Dialer> {
        netns::Dialer::new(&self.netns_path())
    }

    /// A command that will run inside the host's network namespace.
    ///
    /// It also carries [`TESTBED_ID_ENV`] so that leak checks can find it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env(TESTBED_ID_ENV, &self.testbed_id);
        netns::enter_on_spawn(&mut cmd, &self.netns_path());
        cmd
    }

    /// The pid of the running daemon, if any.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.lock_daemon().as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL and reaps it, simulating a crashed host
    /// daemon. Does nothing if no daemon is running. The socket file is left
    /// behind, as a crash would.
    ///
    /// # Errors
    ///
    /// If the daemon cannot be reaped.
    pub fn kill_daemon(&self) -> Result<()> {
        let Some(mut child) = self.lock_daemon().take() else {
            return Ok(());
        };
        kill_and_reap(&mut child)
            .map_err(|err| TestbedError::io(format!("killing the daemon of {}", self.netns), err))
    }

    /// Starts the daemon (again), with the same address and socket, and waits
    /// until it accepts connections. A stale socket file is removed first.
    ///
    /// # Errors
    ///
    /// If no daemon is configured or one is already running, or if the daemon
    /// cannot be spawned, exits early or does not accept connections within
    /// 5 s (these errors include the end of its log; the daemon is killed).
    pub fn start_daemon(&self) -> Result<()> {
        let Some(config) = &self.daemon_config else {
            return Err(TestbedError::NoDaemonConfigured {
                host: self.netns.clone(),
            });
        };
        // Holding the lock for the whole start keeps two concurrent starts
        // from racing for the same socket.
        let mut slot = self.lock_daemon();
        if let Some(child) = slot.as_mut() {
            match child.try_wait() {
                Ok(None) => {
                    return Err(TestbedError::DaemonAlreadyRunning {
                        host: self.netns.clone(),
                        pid: child.id(),
                    });
                }
                // It died on its own and is now reaped: start a new one.
                Ok(Some(_)) | Err(_) => *slot = None,
            }
        }
        match fs::remove_file(&self.socket_path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(TestbedError::io(
                    format!("removing stale socket {}", self.socket_path.display()),
                    err,
                ));
            }
        }

        let mut child = self.spawn_daemon(config)?;
        match self.wait_until_ready(&mut child) {
            Ok(()) => {
                *slot = Some(child);
                Ok(())
            }
            Err(err) => {
                // Best effort: the daemon may already be gone.
                let _ = kill_and_reap(&mut child);
                Err(err)
            }
        }
    }

    /// Stops the daemon gracefully: SIGTERM, then SIGKILL after a grace
    /// period. Used by teardown.
    pub(crate) fn stop_daemon(&self) -> Result<()> {
        let Some(mut child) = self.lock_daemon().take() else {
            return Ok(());
        };
        let context = || format!("stopping the daemon of {}", self.netns);
        if let Ok(raw) = i32::try_from(child.id()) {
            // ESRCH cannot happen: the child is unreaped, at worst a zombie.
            let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
        let deadline = Instant::now() + DAEMON_STOP_GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(err) => return Err(TestbedError::io(context(), err)),
            }
        }
        tracing::warn!(host = %self.netns, "daemon ignored SIGTERM; sending SIGKILL");
        kill_and_reap(&mut child).map_err(|err| TestbedError::io(context(), err))
    }

    fn lock_daemon(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock cannot leave the Option half-updated,
        // so a poisoned lock is still usable.
        self.daemon.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn_daemon(&self, config: &DaemonConfig) -> Result<Child> {
        let listen = self.listen_addr().to_string();
        let mut cmd = self.command(&config.bin);
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--socket")
            .arg(&self.socket_path)
            .args(
                config
                    .extra_args
                    .iter()
                    .map(|a| a.replace("{index}", &self.index.to_string())),
            );
        if let Some(mask) = config.umask {
            // SAFETY: runs in the forked child before exec; umask(2) is async-signal-safe
            // and cannot fail.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        let command_line = format!("{cmd:?}");

        let log_context = || format!("opening daemon log {}", self.log_path.display());
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|err| TestbedError::io(log_context(), err))?;
        // A header separates the runs of a restarted daemon in the same log.
        writeln!(log, "=== mitosis-testbed: starting {command_line}")
            .map_err(|err| TestbedError::io(log_context(), err))?;
        let stderr = log
            .try_clone()
            .map_err(|err| TestbedError::io(log_context(), err))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(stderr);

        tracing::debug!(host = %self.netns, command = %command_line, "starting daemon");
        cmd.spawn().map_err(|source| TestbedError::Spawn {
            command: command_line,
            source,
        })
    }

    fn wait_until_ready(&self, child: &mut Child) -> Result<()> {
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(TestbedError::DaemonExited {
                        host: self.netns.clone(),
                        status: status.to_string(),
                        log: self.log_path.clone(),
                        log_tail: self.log_tail(),
                    });
                }
                Ok(None) => {}
                Err(err) => {
                    return Err(TestbedError::io(
                        format!("checking on the daemon of {}", self.netns),
                        err,
                    ));
                }
            }
            if UnixStream::connect(&self.socket_path).is_ok() {
                tracing::debug!(host = %self.netns, pid = child.id(), elapsed = ?start.elapsed(), "daemon ready");
                return Ok(());
            }
            if start.elapsed() >= DAEMON_READY_TIMEOUT {
                return Err(TestbedError::DaemonTimeout {
                    host: self.netns.clone(),
                    socket: self.socket_path.clone(),
                    timeout: DAEMON_READY_TIMEOUT,
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(DAEMON_READY_POLL);
        }
    }

    /// The last few KiB of the daemon log, starting at a line boundary.
    fn log_tail(&self) -> String {
        read_tail(&self.log_path, LOG_TAIL_BYTES)
            .unwrap_or_else(|err| format!("<unreadable: {err}>"))
    }
}

/// SIGKILLs a child and waits for it, so it leaves no zombie behind.
fn kill_and_reap(child: &mut Child) -> io::Result<()> {
    // kill() fails only if the child was already reaped, which wait handles.
    let _ = child.kill();
    child.wait().map(drop)
}

/// Reads at most `max` bytes from the end of a file, dropping a partial
/// first line.
fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = match text.find('\n') {
        Some(newline) if start > 0 => &text[newline + 1..],
        _ => &text[..],
    };
    Ok(text.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_tail_keeps_whole_lines() {
        let dir = std::env::temp_dir().join(format!("mitosis-testbed-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tail.log");
        fs::write(&path, "first line\nsecond line\nthird\n").unwrap();
        assert_eq!(
            read_tail(&path, 1000).unwrap(),
            "first line\nsecond line\nthird"
        );
        assert_eq!(read_tail(&path, 10).unwrap(), "third");
        fs::remove_dir_all(&dir).unwrap();
    }
}
