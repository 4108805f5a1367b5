//! End to end, as root: the platform reaches every host's daemon over TCP with mutual TLS
//! only (`--host NAME=tcp://IP:PORT`, daemons with `--control-listen`): a function's seed is
//! made and its calls answered, from this process through host 0's namespace (the daemons'
//! addresses are not routable from the root namespace). A platform whose certificate is not
//! of the cluster's CA is refused by every daemon.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mitosis_client::{Remote, Tls};
use mitosis_platform::{Config, HostSpec};
use mitosis_testbed::Testbed;
use mitosis_testbed::pki::{self, TestCa};
use serde_json::{Value, json};

const BUNDLE: &str = "/var/lib/mitosis/bundles/python";
const CONTROL_PORT: u16 = 7071;

fn addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, i as u8 + 1))
}

/// One HTTP request to the platform: status and body.
fn request(api: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(api).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("an answer");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&raw[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (status, raw[split + 4..].to_vec())
}

fn json_of(api: SocketAddr, method: &str, path: &str, body: Value) -> Value {
    let (status, body) = request(api, method, path, body.to_string().as_bytes());
    assert_eq!(
        status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap()
}

/// The platform in this process with `tls`, its TCP connections made in host 0's namespace.
fn platform(tb: &Testbed, tls: Tls) -> mitosis_platform::background::Background {
    let dialer = tb.host(0).dialer().expect("a dialer in host 0");
    let remote = Remote::new(tls).with_connector(Arc::new(move |a, t| dialer.dial(a, t)));
    let config = Config {
        remote: Some(remote),
        ..Config::default()
    };
    mitosis_platform::background::Background::start(
        config,
        HostSpec::of_testbed_tcp(tb, CONTROL_PORT),
    )
    .expect("the API starts")
}

/// An answer of the function, without its `pid` (the one field that differs).
fn without_pid(answer: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(answer)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(answer)));
    v.as_object_mut().expect("an object").remove("pid");
    v
}

/// The function's answer to `request` from a cold run in its rootfs on `host`.
fn cold_answer(tb: &Testbed, host: usize, request: &str) -> Value {
    let mut cmd = tb.host(host).command("chroot");
    cmd.args([
        &format!("{BUNDLE}/rootfs"),
        "env",
        "-i",
        "PATH=/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE=1",
    ])
    .args(["python3", "/opt/mitosis/image_fn.py", "--once"])
    .current_dir("/");
    let run = mitosis_testbed::lines::run_timed(cmd, request).expect("a cold run");
    assert_eq!(run.status, 0, "cold run: {}", run.stderr);
    without_pid(run.answer.as_bytes())
}

fn load(dir: &std::path::Path, cert: &str, key: &str, ca: &std::path::Path) -> Tls {
    Tls::load(&dir.join(cert), &dir.join(key), ca).unwrap()
}

#[test]
fn the_platform_runs_calls_over_tcp_with_mutual_tls_only() {
    let pki_dir = Scratch::new("platform-tcp-pki");
    let ca = TestCa::new("platform CA").unwrap();
    ca.write_hosts(&pki_dir.0, &[addr(0), addr(1)]).unwrap();
    let (cert, key) = ca.host(addr(0)).unwrap();
    pki::write(&pki_dir.0.join("platform.crt"), &cert).unwrap();
    pki::write(&pki_dir.0.join("platform.key"), &key).unwrap();
    let tb = testbed_custom(2, |d| {
        d.extra_args = pki::daemon_args(&pki_dir.0);
        d.extra_args.extend([
            "--control-listen".to_string(),
            format!("0.0.0.0:{CONTROL_PORT}"),
        ]);
    });
    let ca_file = pki_dir.0.join("ca.crt");

    {
        let served = platform(
            &tb,
            load(&pki_dir.0, "platform.crt", "platform.key", &ca_file),
        );
        let api = served.addr;
        let app = json_of(api, "POST", "/v2/apps", json!({"name": "tcp"}));
        let f = json_of(
            api,
            "POST",
            "/v2/fns",
            json!({"name": "echo", "app_id": app["id"], "image": BUNDLE, "timeout": 60,
                   "memory": 256}),
        );
        let fn_id = f["id"].as_str().unwrap();
        let mut hosts_seen = std::collections::BTreeSet::new();
        for n in 1..=4 {
            let (status, body) = request(
                api,
                "POST",
                &format!("/invoke/{fn_id}"),
                format!("{{\"n\": {n}}}").as_bytes(),
            );
            let text = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(
                status,
                200,
                "{text}\nh0: {}\nh1: {}",
                tb.host(0).daemon_log(),
                tb.host(1).daemon_log()
            );
            assert_eq!(
                without_pid(&body),
                cold_answer(&tb, 0, &format!("{{\"n\": {n}}}")),
                "the call's answer is the function's"
            );
        }
        let report = json_of(api, "GET", "/mitosis/hosts", Value::Null);
        for h in report["hosts"].as_array().unwrap() {
            assert_eq!(h["up"], true, "{report}");
            assert!(
                h["socket"].as_str().unwrap().starts_with("tcp://"),
                "{report}"
            );
            hosts_seen.insert(h["name"].as_str().unwrap().to_owned());
        }
        assert_eq!(hosts_seen.len(), 2);
    }

    // A platform with a certificate of another CA: every daemon refuses it.
    let stranger = TestCa::new("stranger CA").unwrap();
    let (cert, key) = stranger.host(addr(0)).unwrap();
    pki::write(&pki_dir.0.join("stranger.crt"), &cert).unwrap();
    pki::write(&pki_dir.0.join("stranger.key"), &key).unwrap();
    let served = platform(
        &tb,
        load(&pki_dir.0, "stranger.crt", "stranger.key", &ca_file),
    );
    let down = eventually(Duration::from_secs(20), || {
        let report = json_of(served.addr, "GET", "/mitosis/hosts", Value::Null);
        report["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["up"] == false && h["error"].is_string())
    });
    assert!(
        down,
        "a platform without the cluster's certificate was served"
    );
    drop(served);
    for i in 0..2 {
        assert!(status_value(&tb, i, "control tls handshakes refused").unwrap_or(0) > 0);
    }
    teardown(tb);
}

#[test]
fn the_cluster_command_serves_over_tcp_and_tears_down_on_sigint() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cluster = Cluster(
        Command::new(bin("mitosis-platform"))
            .args([
                "cluster",
                "--hosts",
                "2",
                "--tcp",
                "--api",
                &api.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut cluster.0;
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        if line.starts_with("Ctrl-C") {
            break;
        }
        line.clear();
    }
    assert!(printed.contains("over TCP with mutual TLS"), "{printed}");
    let id = printed
        .split_whitespace()
        .skip_while(|w| *w != "(testbed")
        .nth(1)
        .map(|w| w.trim_end_matches(')').to_owned())
        .unwrap_or_else(|| panic!("no testbed id in {printed}"));

    let app = json_of(api, "POST", "/v2/apps", json!({"name": "c"}));
    let f = json_of(
        api,
        "POST",
        "/v2/fns",
        json!({"name": "f", "app_id": app["id"], "image": BUNDLE, "memory": 256}),
    );
    let (status, body) = request(
        api,
        "POST",
        &format!("/invoke/{}", f["id"].as_str().unwrap()),
        b"{\"n\": 2}",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let hosts = json_of(api, "GET", "/mitosis/hosts", Value::Null);
    assert!(
        hosts.to_string().contains("tcp://10.77.0.1:7071"),
        "{hosts}"
    );

    // SAFETY: kill(2) on our own child, not waited for yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let pid = child.id();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    assert!(rest.contains("torn down"), "{status:?}: {rest}");
    assert!(
        mitosis_testbed::leftovers(&id).is_empty(),
        "testbed {id} left behind"
    );
    let pki = std::env::temp_dir().join(format!("mitosis-cluster-pki-{pid}"));
    assert!(!pki.exists(), "{} left behind", pki.display());
}

/// The cluster command, interrupted (so it tears its hosts down) if a test ends early.
struct Cluster(std::process::Child);

impl Drop for Cluster {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            for _ in 0..100 {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
