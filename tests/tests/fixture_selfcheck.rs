//! Self-check of the `memcheck` C fixture (tests/fixtures/memcheck.c), run
//! locally without any mitosis involvement: proves that the fixture's checks
//! pass on an intact process, fail when memory changes, and are deterministic.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MEMCHECK_BIN: &str = env!("MEMCHECK_BIN");
const TIMEOUT: Duration = Duration::from_secs(60);

/// Number of regions `verify` checks.
const NREGIONS: u32 = 11;

// ---------------------------------------------------------------------------
// helpers

/// Fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "mitosis-memcheck-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running memcheck process with line-oriented access to its stdout.
struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Fixture {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(MEMCHECK_BIN)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {MEMCHECK_BIN}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut child_err = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match child_err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        let stdin = child.stdin.take();
        Fixture {
            child,
            stdin,
            lines,
            stderr,
            status: None,
        }
    }

    /// Starts the fixture and consumes its `ready <pid>` line.
    fn start_ready(dir: &Path) -> Self {
        let mut f = Fixture::start(dir);
        let l = f.line();
        assert_eq!(l, format!("ready {}", f.child.id()), "{}", f.ctx());
        f
    }

    fn ctx(&self) -> String {
        format!("memcheck stderr:\n{}", self.stderr.lock().unwrap())
    }

    fn send(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin
            .write_all(s.as_bytes())
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("write to memcheck: {e}"));
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Next stdout line; panics on EOF or timeout.
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                panic!("timeout waiting for memcheck output\n{}", self.ctx())
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("memcheck closed stdout unexpectedly\n{}", self.ctx())
            }
        }
    }

    /// Waits for the process to exit (stdin stays open) and returns its exit
    /// code and any stdout lines not consumed yet.
    fn finish(&mut self) -> (i32, Vec<String>) {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("timeout waiting for memcheck to exit\n{}", self.ctx());
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.status = Some(status);
        let mut rest = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(TIMEOUT) {
            rest.push(l);
        }
        let code = status
            .code()
            .unwrap_or_else(|| panic!("memcheck killed by signal: {status:?}\n{}", self.ctx()));
        (code, rest)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stdin = None;
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `ok 11 <16 hex digits>` and returns the digest.
fn parse_ok(line: &str, ctx: &str) -> u64 {
    let parts: Vec<&str> = line.split(' ').collect();
    assert!(
        parts.len() == 3
            && parts[0] == "ok"
            && parts[1] == NREGIONS.to_string()
            && parts[2].len() == 16,
        "expected `ok {NREGIONS} <digest>`, got {line:?}\n{ctx}"
    );
    u64::from_str_radix(parts[2], 16).unwrap_or_else(|e| panic!("bad digest in {line:?}: {e}"))
}

/// Runs `ready` → `verify` in `dir` and returns the digest.
fn verify_digest(dir: &Path) -> u64 {
    let mut f = Fixture::start_ready(dir);
    f.send("verify\n");
    let (code, lines) = f.finish();
    assert_eq!(lines.len(), 1, "unexpected output {lines:?}\n{}", f.ctx());
    let digest = parse_ok(&lines[0], &f.ctx());
    assert_eq!(code, 0, "{}", f.ctx());
    digest
}

/// Mirror of the fixture's pattern function: little-endian u64 at byte
/// offset `off` of pattern `id`.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn pattern(id: u64, off: u64) -> u64 {
    splitmix64((id << 40) | (off >> 3))
}

fn assert_file_pattern(path: &Path, len: usize, id: u64) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(data.len(), len, "size of {}", path.display());
    for (i, w) in data.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(w.try_into().unwrap());
        let off = 8 * i as u64;
        assert_eq!(got, pattern(id, off), "{} at offset {off}", path.display());
    }
}

// ---------------------------------------------------------------------------
// tests

/// (a) `ready` then `verify` → `ok 11 <digest>`, exit 0.
#[test]
fn ready_then_verify_ok() {
    let dir = TempDir::new("verify");
    verify_digest(dir.path());
}

/// (b) `mutate` then `verify` → FAIL lines (including the mutated region),
/// `failed 3`, exit 1.
#[test]
fn mutate_then_verify_fails() {
    let dir = TempDir::new("mutate");
    let mut f = Fixture::start_ready(dir.path());
    f.send("mutate\n");
    assert_eq!(f.line(), "mutated", "{}", f.ctx());
    f.send("verify\n");
    let (code, lines) = f.finish();
    let ctx = f.ctx();
    for l in &lines[..lines.len().saturating_sub(1)] {
        let p: Vec<&str> = l.split(' ').collect();
        assert!(
            p.len() == 6 && p[0] == "FAIL" && p[2] == "page" && p[4] == "offset",
            "malformed FAIL line {l:?}\n{ctx}"
        );
        let page: u64 = p[3].parse().unwrap();
        let off: u64 = p[5].parse().unwrap();
        assert_eq!(page, off / 4096, "{l:?}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("FAIL mutable ")),
        "no FAIL line for the mutated region: {lines:?}\n{ctx}"
    );
    assert_eq!(
        lines,
        [
            "FAIL heap page 256 offset 1048704",
            "FAIL sparse page 1 offset 4096",
            "FAIL mutable page 0 offset 0",
            "failed 3",
        ],
        "{ctx}"
    );
    assert_eq!(code, 1, "{ctx}");
}

/// (c) `exercise` (twice) then `verify` → ok, same digest as an untouched run.
#[test]
fn exercise_then_verify_ok() {
    let dir = TempDir::new("exercise");
    let baseline = verify_digest(dir.path());
    let mut f = Fixture::start_ready(dir.path());
    f.send("exercise\n");
    assert_eq!(f.line(), "exercised", "{}", f.ctx());
    f.send("exercise\n");
    assert_eq!(f.line(), "exercised", "{}", f.ctx());
    f.send("verify\n");
    let (code, lines) = f.finish();
    assert_eq!(lines.len(), 1, "unexpected output {lines:?}\n{}", f.ctx());
    let digest = parse_ok(&lines[0], &f.ctx());
    assert_eq!(code, 0, "{}", f.ctx());
    assert_eq!(digest, baseline, "exercise changed the digest");
}

/// (d) `exit 7` → exit status 7.
#[test]
fn exit_status_propagates() {
    let dir = TempDir::new("exit");
    let mut f = Fixture::start_ready(dir.path());
    f.send("exit 7\n");
    let (code, lines) = f.finish();
    assert!(lines.is_empty(), "unexpected output {lines:?}");
    assert_eq!(code, 7, "{}", f.ctx());
}

/// (e) The digest is the same across runs and directories.
#[test]
fn digest_is_deterministic() {
    let a = TempDir::new("det-a");
    let b = TempDir::new("det-b");
    let d1 = verify_digest(a.path());
    let d2 = verify_digest(b.path());
    let d3 = verify_digest(a.path()); // files already exist: rewritten identically
    assert_eq!(d1, d2, "digest differs between directories");
    assert_eq!(d1, d3, "digest differs between runs in the same directory");
}

/// The files hold exactly the documented patterns: private.dat pattern A
/// (the in-memory pattern-B pages must not reach the file), shared.dat
/// pattern 5 written through the MAP_SHARED mapping.
#[test]
fn files_hold_expected_patterns() {
    let dir = TempDir::new("files");
    let mut f = Fixture::start_ready(dir.path());
    assert_file_pattern(&dir.path().join("private.dat"), 4 << 20, 4);
    assert_file_pattern(&dir.path().join("shared.dat"), 2 << 20, 5);
    f.send("exit 0\n");
    assert_eq!(f.finish().0, 0);
}

/// EOF on stdin → exit 3.
#[test]
fn eof_exits_3() {
    let dir = TempDir::new("eof");
    let mut f = Fixture::start_ready(dir.path());
    f.close_stdin();
    let (code, lines) = f.finish();
    assert!(lines.is_empty(), "unexpected output {lines:?}");
    assert_eq!(code, 3);
}

/// Unknown lines → `unknown`, and the process keeps reading.
#[test]
fn unknown_line() {
    let dir = TempDir::new("unknown");
    let mut f = Fixture::start_ready(dir.path());
    f.send("bogus\n");
    assert_eq!(f.line(), "unknown");
    f.send("exit\n");
    assert_eq!(f.line(), "unknown");
    f.send("exit 300\n");
    assert_eq!(f.line(), "unknown");
    f.send("exit 5\n");
    assert_eq!(f.finish().0, 5);
}

/// `echo` copies the rest of stdin (including bytes sent together with the
/// `echo` line) to stdout until EOF, then exit 0.
#[test]
fn echo_copies_stdin() {
    let dir = TempDir::new("echo");
    let mut f = Fixture::start_ready(dir.path());
    f.send("echo\nhello\n");
    assert_eq!(f.line(), "hello");
    f.send("world\nlast");
    f.close_stdin();
    let (code, lines) = f.finish();
    assert_eq!(lines, ["world", "last"]);
    assert_eq!(code, 0);
}
