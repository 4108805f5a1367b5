//! End to end, as root: the control protocol over TCP with mutual TLS (`mitosisd
//! --control-listen`). From host 0's namespace (the daemons' addresses are not routable from
//! the root namespace), a child is resumed on host 1 with its stdio relayed on the
//! connection: stdout, stderr, more stdin than the window, the exit status, a signal. Peers
//! without a certificate of the cluster's CA are refused within the handshake timeout, and
//! a daemon refuses to serve the control protocol over TCP without TLS.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mitosis_client::{ErrorKind, Remote, Tls};
use mitosis_testbed::Testbed;
use mitosis_testbed::pki::{self, TestCa};
use tokio::io::AsyncReadExt;

const CONTROL_PORT: u16 = 7071;

fn addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, i as u8 + 1))
}

fn control(i: usize) -> SocketAddr {
    SocketAddr::new(addr(i), CONTROL_PORT)
}

/// Daemons with mutual TLS serving the control protocol over TCP, and the client's files
/// (`client.crt`, `client.key`) from the same CA.
fn remote_testbed(hosts: usize) -> (Testbed, Scratch) {
    let dir = Scratch::new("remote-pki");
    let ca = TestCa::new("remote control CA").expect("a CA");
    let addrs: Vec<IpAddr> = (0..hosts).map(addr).collect();
    ca.write_hosts(&dir.0, &addrs).expect("host certificates");
    let (cert, key) = ca.host(addr(0)).expect("a client certificate");
    pki::write(&dir.0.join("client.crt"), &cert).unwrap();
    pki::write(&dir.0.join("client.key"), &key).unwrap();
    let tb = testbed_custom(hosts, |d| {
        d.extra_args = pki::daemon_args(&dir.0);
        d.extra_args.extend([
            "--control-listen".to_string(),
            format!("0.0.0.0:{CONTROL_PORT}"),
        ]);
    });
    (tb, dir)
}

fn client_tls(dir: &Scratch) -> Tls {
    Tls::load(
        &dir.0.join("client.crt"),
        &dir.0.join("client.key"),
        &dir.0.join("ca.crt"),
    )
    .expect("the client's TLS files")
}

/// A client that dials from host 0's namespace.
fn remote(tb: &Testbed, tls: Tls) -> Remote {
    let dialer = tb.host(0).dialer().expect("a dialer in host 0");
    Remote::new(tls).with_connector(Arc::new(move |a, t| dialer.dial(a, t)))
}

/// A shell on host 0 that answers lines: `got LINE`, `err...` to stderr, `exit N`.
fn shell_seed(tb: &Testbed) -> (Seed, String) {
    let mut cmd = tb.host(0).command("sh");
    cmd.args([
        "-c",
        r#"echo ready; while read -r line; do case "$line" in err*) echo "$line" >&2;; exit*) exit ${line#exit };; *) echo "got $line";; esac; done; exit 4"#,
    ]);
    let seed = Seed::start(cmd);
    let handle = prepare(tb, 0, seed.pid());
    (seed, handle)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Resumes `handle` on host 1 over TCP with `input`; its stdout, stderr and status.
async fn resume(remote: &Remote, handle: &str, input: &[u8]) -> (String, String, i32) {
    let running = remote
        .connect(control(1))
        .await
        .expect("connected")
        .resume(handle)
        .await
        .expect("resumed");
    assert!(running.pid > 0);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (_signals, rx) = tokio::sync::mpsc::channel(1);
    let exited = tokio::time::timeout(
        Duration::from_secs(60),
        running.relay(input, &mut out, &mut err, rx),
    )
    .await
    .expect("the child exits")
    .expect("relayed");
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
        exited.status,
    )
}

#[test]
fn a_child_resumed_over_tcp_relays_its_stdio_and_takes_signals() {
    let (tb, pki_dir) = remote_testbed(2);
    let (mut seed, handle) = shell_seed(&tb);
    let remote = remote(&tb, client_tls(&pki_dir));
    let rt = runtime();

    let (out, err, status) = rt.block_on(resume(&remote, &handle, b"a\nerr b\nexit 7\n"));
    assert_eq!(
        (out.as_str(), err.as_str(), status),
        ("got a\n", "err b\n", 7),
        "{}",
        tb.host(1).daemon_log()
    );

    // More stdin than the window: it goes through as the child reads it.
    let lines = 60_000;
    let input: String = (0..lines).map(|i| format!("line {i:06}\n")).collect();
    assert!(input.len() > mitosis_transport::control::STDIN_WINDOW * 2);
    let (out, err, status) = rt.block_on(resume(&remote, &handle, input.as_bytes()));
    assert_eq!((status, err.as_str()), (4, ""), "EOF ends the shell's loop");
    assert_eq!(out.lines().count(), lines);
    assert_eq!(out.lines().last(), Some("got line 059999"));

    // A signal reaches a child that waits on its stdin (never closed here).
    let exited = rt.block_on(async {
        let running = remote
            .connect(control(1))
            .await
            .unwrap()
            .resume(&handle)
            .await
            .unwrap();
        let (keep_open, stdin) = tokio::io::duplex(64);
        let (signals, rx) = tokio::sync::mpsc::channel(1);
        signals.send(libc::SIGTERM).await.unwrap();
        let exited = tokio::time::timeout(
            Duration::from_secs(30),
            running.relay(stdin, tokio::io::sink(), tokio::io::sink(), rx),
        )
        .await
        .expect("the signal ends the child");
        drop(keep_open);
        exited
    });
    assert_eq!(exited.expect("relayed").status, 128 + libc::SIGTERM);

    // Typed errors cross the wire.
    let err = rt.block_on(async {
        let bad = handle.replacen(|c: char| c.is_ascii_hexdigit(), "0", 1);
        match remote.connect(control(1)).await.unwrap().resume(&bad).await {
            Err(e) => e,
            Ok(_) => panic!("a wrong handle resumed"),
        }
    });
    assert!(
        matches!(
            err.kind(),
            Some(ErrorKind::WrongKey | ErrorKind::NoSuchSeed | ErrorKind::BadRequest)
        ),
        "{err}"
    );
    // The status says what the daemon carries (its load) and counts the connections.
    let status = rt
        .block_on(async { remote.connect(control(1)).await?.status().await })
        .expect("a status over TCP");
    assert_eq!(status.listen, tb.host(1).listen_addr().to_string());
    assert_eq!(status.children_running, 0);
    assert!(status.children_started >= 3);
    assert_eq!(seed.send("still"), "got still", "the seed runs on");
    drop(seed);
    teardown(tb);
}

#[test]
fn peers_without_a_certificate_of_the_cluster_are_refused_in_bounded_time() {
    let (tb, pki_dir) = remote_testbed(2);
    let rt = runtime();

    // A certificate of another CA.
    let other = Scratch::new("other-pki");
    let stranger = TestCa::new("another CA").unwrap();
    let (cert, key) = stranger.host(addr(0)).unwrap();
    pki::write(&other.0.join("c.crt"), &cert).unwrap();
    pki::write(&other.0.join("c.key"), &key).unwrap();
    // It trusts the cluster's CA, so only its own certificate is wrong.
    let tls = Tls::load(
        &other.0.join("c.crt"),
        &other.0.join("c.key"),
        &pki_dir.0.join("ca.crt"),
    )
    .unwrap();
    let refused = rt.block_on(async {
        let client = remote(&tb, tls).connect(control(1)).await;
        // TLS 1.3: the server's verdict on the client's certificate comes with its first read.
        match client {
            Ok(c) => c.status().await.map(|_| ()),
            Err(e) => Err(e),
        }
    });
    assert!(refused.is_err(), "a stranger's certificate was accepted");

    // No certificate at all: a TLS client without client authentication.
    let dialer = tb.host(0).dialer().unwrap();
    let ca_pem = std::fs::read(pki_dir.0.join("ca.crt")).unwrap();
    let no_cert = rt.block_on(async {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = dialer.dial(control(1), Duration::from_secs(5)).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(addr(1).into());
        let connected = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        match connected {
            Err(e) => Err(e),
            Ok(mut s) => {
                use tokio::io::AsyncWriteExt;
                let req =
                    mitosis_transport::frame::encode(&mitosis_transport::control::Request::Status);
                let _ = s.write_all(&req).await;
                let _ = s.flush().await;
                let mut buf = [0u8; 64];
                s.read(&mut buf).await.and_then(|n| match n {
                    0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
                    _ => Ok(()),
                })
            }
        }
    });
    assert!(
        no_cert.is_err(),
        "a client without a certificate got an answer"
    );

    // A peer that sends nothing is closed within the handshake timeout.
    let mut silent = dialer.dial(control(1), Duration::from_secs(5)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut silent, &mut buf).unwrap_or(0);
    let took = t0.elapsed();
    assert_eq!(n, 0, "closed without a word");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "closed after {took:?} (the handshake timeout is 5 s)"
    );

    // The daemon counted them and still serves its operators.
    let status = rt
        .block_on(async {
            remote(&tb, client_tls(&pki_dir))
                .connect(control(1))
                .await?
                .status()
                .await
        })
        .expect("an operator is still served");
    assert!(status.control_tls_refused >= 3, "{status}");
    assert_eq!(status.control_connections, 1, "only this one is open");
    teardown(tb);
}

#[test]
fn a_daemon_will_not_serve_control_over_tcp_without_tls() {
    let dir = Scratch::new("no-tls");
    let out = std::process::Command::new(bin("mitosisd"))
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .arg("--socket")
        .arg(dir.0.join("d/mitosisd.sock"))
        .output()
        .expect("mitosisd runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--control-listen needs --tls-cert"), "{err}");
    assert!(
        !dir.0.join("d").exists(),
        "it stopped before making anything"
    );
}
