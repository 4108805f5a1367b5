//! End to end, as root: daemons with mutual TLS (`mitosisd --tls-cert --tls-key --tls-ca`).
//! Resumes between them are right, cold and warm; a capture of a cold-host resume holds none
//! of the seed's memory (the same capture without TLS does); daemons with a certificate of
//! another CA, or without TLS, are refused at the handshake with an error naming TLS, and the
//! server stays healthy.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::capture::Capture;
use common::*;
use mitosis_testbed::Testbed;
use mitosis_testbed::pki::{self, TestCa};

/// Host `i`'s address on a testbed (10.77.0.(i+1)).
fn addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, i as u8 + 1))
}

/// `hosts` hosts whose daemons use mutual TLS with certificates of one CA (written into the
/// returned directory), and that CA.
fn tls_testbed(hosts: usize) -> (Testbed, Scratch, TestCa) {
    let dir = Scratch::new("pki");
    let ca = TestCa::new("test CA").expect("a CA");
    let addrs: Vec<IpAddr> = (0..hosts).map(addr).collect();
    ca.write_hosts(&dir.0, &addrs).expect("host certificates");
    let tb = testbed_custom(hosts, |d| d.extra_args = pki::daemon_args(&dir.0));
    (tb, dir, ca)
}

/// The words memcheck writes in its heap region: `pattern(1, off)` for its 3 MiB block
/// (tests/fixtures/memcheck.c), which a cold-host `verify` reads whole.
fn heap_pattern() -> HashSet<u64> {
    fn splitmix64(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
    (0..(3u64 << 20) / 8)
        .map(|word| splitmix64((1u64 << 40) | word))
        .collect()
}

/// How many 8-byte windows of the packets, at any offset, are words of `pattern`.
fn pattern_hits(packets: &[Vec<u8>], pattern: &HashSet<u64>) -> usize {
    packets
        .iter()
        .flat_map(|p| p.windows(8))
        .filter(|w| pattern.contains(&u64::from_le_bytes((*w).try_into().unwrap())))
        .count()
}

/// True if some packet holds `needle`.
fn seen(packets: &[Vec<u8>], needle: &[u8]) -> bool {
    packets
        .iter()
        .any(|p| p.windows(needle.len()).any(|w| w == needle))
}

#[test]
fn cold_and_warm_resumes_between_tls_daemons_are_right() {
    let (tb, _pki, _ca) = tls_testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "tls-resume");
    for cached in [0, 1] {
        let out = cli(&tb, 1, &["resume", "--stats", &handle], "verify\n");
        assert_eq!(
            stdout(&out),
            format!("ok 11 {MEMCHECK_DIGEST}\n"),
            "stderr: {}\nhost 1: {}",
            stderr(&out),
            tb.host(1).daemon_log()
        );
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(resume_stat(&out, "cached"), cached);
        if cached == 0 {
            // Framed pages, installed by the daemon: the replica read none from the socket.
            assert!(resume_stat(&out, "install_us") > 0);
        }
    }
    assert_eq!(status_value(&tb, 0, "peer tls handshakes refused"), Some(0));
    drop(seed);
    teardown(tb);
}

#[test]
fn a_captured_cold_host_resume_shows_seed_memory_only_without_tls() {
    let pattern = heap_pattern();
    for tls in [false, true] {
        let (tb, pki) = match tls {
            false => (testbed(2), None),
            true => {
                let (tb, dir, _ca) = tls_testbed(2);
                (tb, Some(dir))
            }
        };
        let (_dir, seed, handle) = prepared_memcheck(&tb, "tls-wire");
        let capture = Capture::start(tb.host(1));
        let out = cli(&tb, 1, &["resume", &handle], "verify\n");
        let captured = capture.finish();
        assert_eq!(
            stdout(&out),
            format!("ok 11 {MEMCHECK_DIGEST}\n"),
            "tls {tls}: {}",
            stderr(&out)
        );
        assert_eq!(
            (captured.truncated, captured.drops),
            (0, 0),
            "an incomplete capture"
        );
        let packets = &captured.packets;
        let bytes: usize = packets.iter().map(Vec::len).sum();
        let hits = pattern_hits(packets, &pattern);
        let hello = [&b"MTPS"[..], &2u32.to_le_bytes()].concat();
        let announced = [&b"MTLS"[..], &2u32.to_le_bytes()].concat();
        eprintln!(
            "tls {tls}: {} packets, {bytes} bytes, {hits} words of the seed's heap",
            packets.len()
        );
        // The pages did cross this link (the seed has about 20 MiB).
        assert!(bytes > 8 << 20, "tls {tls}: only {bytes} bytes captured");
        if tls {
            assert_eq!(hits, 0, "seed memory in clear under TLS");
            assert!(seen(packets, &announced), "no TLS announcement");
            assert!(!seen(packets, &hello), "a hello in clear under TLS");
        } else {
            // The 3 MiB heap is 393216 words: most of them go by in clear.
            assert!(
                hits > 300_000,
                "only {hits} heap words in clear without TLS"
            );
            assert!(seen(packets, &hello));
        }
        drop(seed);
        teardown(tb);
        drop(pki);
    }
}

/// A daemon of the test's own in host `host`'s netns, beside the testbed's, with `args`.
struct Extra {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Extra {
    fn start(
        tb: &Testbed,
        host: usize,
        dir: &Path,
        name: &str,
        port: u16,
        args: &[String],
    ) -> Extra {
        let socket = dir.join(name).join("mitosisd.sock");
        let log = dir.join(format!("{name}.log"));
        let listen = format!("{}:{port}", addr(host));
        let out = std::fs::File::create(&log).unwrap();
        let child = tb
            .host(host)
            .command(bin("mitosisd"))
            .args(["--listen", &listen, "--socket"])
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("an extra mitosisd");
        let extra = Extra { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&extra.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "{name} did not start: {}",
                std::fs::read_to_string(&extra.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        extra
    }

    /// `mitosis resume HANDLE` against this daemon.
    fn resume(&self, tb: &Testbed, host: usize, handle: &str) -> Output {
        let mut cmd = tb.host(host).command(bin("mitosis"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(["resume", handle])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        wait_output(cmd.spawn().expect("cli starts"), Duration::from_secs(60))
    }
}

impl Drop for Extra {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn strangers_are_refused_at_the_handshake_and_the_server_stays_healthy() {
    let (tb, dir, ca) = tls_testbed(2);
    let (_seed_dir, seed, handle) = prepared_memcheck(&tb, "tls-strangers");
    let other = TestCa::new("another CA").expect("a CA");
    let (cert, key) = other.host(addr(1)).expect("a certificate");
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        pki::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (cert, key) = (write("other.crt", &cert), write("other.key", &key));
    let (ours, theirs) = (
        write("ours.crt", &ca.pem()),
        write("theirs.crt", &other.pem()),
    );
    let tls = |ca: &str| -> Vec<String> {
        ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", ca]
            .map(String::from)
            .to_vec()
    };
    // Host 1 also runs: a daemon without TLS; one whose certificate is from another CA (it
    // trusts ours, so only host 0's check of client certificates stops it); and one of the
    // other CA altogether (it also refuses host 0's certificate).
    let strangers = [
        ("plain", Vec::new(), "requires mutual TLS"),
        ("foreign-cert", tls(&ours), "TLS: refused"),
        ("foreign-ca", tls(&theirs), "TLS: handshake failed"),
    ];
    for (i, (name, args, needle)) in strangers.into_iter().enumerate() {
        let extra = Extra::start(&tb, 1, &dir.0, name, 7071 + i as u16, &args);
        let out = extra.resume(&tb, 1, &handle);
        let err = stderr(&out);
        eprintln!("{name}: {}", err.trim_end());
        assert_eq!(out.status.code(), Some(78), "{name}: {err}");
        assert!(
            err.contains(needle),
            "{name}: expected {needle:?} in {err:?}"
        );
        assert!(err.contains("TLS"), "{name}: {err:?}");
        assert_eq!(err.lines().count(), 1, "{name}: one-line error: {err:?}");
        assert!(stdout(&out).is_empty());
    }
    // Each stranger's connection was counted and logged as refused.
    assert!(
        eventually(Duration::from_secs(5), || {
            status_value(&tb, 0, "peer tls handshakes refused").is_some_and(|n| n >= 3)
        }),
        "refusals counted: {:?}",
        status_value(&tb, 0, "peer tls handshakes refused")
    );
    assert!(
        eventually(Duration::from_secs(5), || tb
            .host(0)
            .daemon_log()
            .contains("refused a peer connection: TLS handshake refused")),
        "{}",
        tb.host(0).daemon_log()
    );
    // And the server serves its own kind as before.
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "{}",
        stderr(&out)
    );
    drop(seed);
    teardown(tb);
}
