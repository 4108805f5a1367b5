//! Two platform instances sharing one etcd (started by this test on loopback) over three
//! simulated hosts: instance A is given the hosts (it polls them and registers them under
//! leases), instance B finds them in etcd. A function made through A is served through B from
//! the same seed; when the seed's host's daemon dies its lease expires, and the seed is made
//! again elsewhere, once for both.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use mitosis_platform::background::Background;
use mitosis_platform::etcd::EtcdOptions;
use mitosis_platform::etcd::local::LocalEtcd;
use mitosis_platform::store::StoreSpec;
use mitosis_platform::{Config, HostSpec};
use serde_json::{Value, json};

const ROOTFS: &str = "/var/lib/mitosis/bundles/python/rootfs";

/// One request (`Connection: close`): status, the `Mitosis-Host` header, body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("an answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    let host = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("mitosis-host"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    (status, host, raw[split + 4..].to_vec())
}

fn json_of(addr: SocketAddr, method: &str, path: &str, body: Value) -> Value {
    let (status, _, answer) = request(addr, method, path, body.to_string().as_bytes());
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(status, 200, "{method} {path}: {text}");
    serde_json::from_slice(&answer).expect("JSON")
}

/// The instance's view: each host's (name, up, registered), and `fn_id`'s seed host.
fn view(addr: SocketAddr, fn_id: &str) -> (Vec<(String, bool, bool)>, Option<String>) {
    let v = json_of(addr, "GET", "/mitosis/hosts", Value::Null);
    let hosts = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_owned(),
                h["up"].as_bool().unwrap(),
                h["registered"].as_bool().unwrap(),
            )
        })
        .collect();
    let seed = v["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fn_id"] == fn_id)
        .and_then(|s| s["seed_host"].as_str().map(str::to_owned));
    (hosts, seed)
}

/// A counter of the instance's `/metrics` (0 if absent).
fn counter(addr: SocketAddr, name: &str) -> f64 {
    let (status, _, text) = request(addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A bundle over the shared rootfs whose function echoes its request.
fn echo_bundle(scratch: &Scratch) -> PathBuf {
    const SCRIPT: &str = "import json, os\n\
req = json.loads(os.read(0, 65536))\n\
os.write(1, json.dumps({'echo': req}).encode())\n";
    python_bundle(scratch, "echo", &["python3", "-c", SCRIPT], 128, 32)
}

/// Calls `fn_id` through `addr` with `{"n": n}`: the host that ran it.
fn call(addr: SocketAddr, fn_id: &str, n: usize) -> String {
    let (status, host, body) = request(
        addr,
        "POST",
        &format!("/invoke/{fn_id}"),
        format!("{{\"n\": {n}}}").as_bytes(),
    );
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "call {n} through {addr}: {text}");
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v, json!({"echo": {"n": n}}), "call {n} through {addr}");
    host
}

/// The seeds the hosts' daemons serve, summed.
fn seeds_served(tb: &mitosis_testbed::Testbed, skip: Option<usize>) -> usize {
    tb.hosts()
        .iter()
        .filter(|h| Some(h.index()) != skip)
        .map(|h| {
            mitosis_client::Client::connect(h.socket_path())
                .and_then(|c| c.status())
                .expect("a daemon's status")
                .seeds
                .len()
        })
        .sum()
}

#[test]
fn two_platform_instances_sharing_etcd_serve_the_same_functions_from_one_seed() {
    assert!(
        std::path::Path::new(ROOTFS).is_dir(),
        "{ROOTFS} is missing: run scripts/setup.sh"
    );
    let etcd = LocalEtcd::start().expect("a local etcd (scripts/setup.sh installs etcd-server)");
    let scratch = Scratch::new("platform-etcd");
    let bundle = echo_bundle(&scratch);
    let tb = testbed(3);
    let mut options = EtcdOptions::new(vec![etcd.endpoint.clone()]);
    options.prefix = format!("/mitosis-e2e-{}", std::process::id());
    let store = StoreSpec::Etcd(options);
    let a = Background::start_with(Config::default(), HostSpec::of_testbed(&tb), &store)
        .expect("instance A");
    let b = Background::start_with(Config::default(), Vec::new(), &store).expect("instance B");
    let (a_addr, b_addr) = (a.addr, b.addr);

    // B finds the hosts A registered.
    assert!(
        eventually(Duration::from_secs(10), || {
            let (hosts, _) = view(b_addr, "");
            hosts.len() == 3 && hosts.iter().all(|(_, up, registered)| *up && *registered)
        }),
        "B's hosts: {:?}",
        view(b_addr, "").0
    );

    // Made through A, seen and served through B; names are unique across both.
    let app = json_of(a_addr, "POST", "/v2/apps", json!({"name": "shared"}));
    let f = json_of(
        a_addr,
        "POST",
        "/v2/fns",
        json!({"name": "echo", "app_id": app["id"], "image": bundle, "timeout": 10}),
    );
    let fn_id = f["id"].as_str().unwrap().to_owned();
    // The same record, but for where each instance says it is called.
    let endpoint = "fnproject.io/fn/invokeEndpoint";
    let mut through_b = json_of(b_addr, "GET", &format!("/v2/fns/{fn_id}"), Value::Null);
    assert_eq!(
        through_b["annotations"][endpoint],
        format!("http://{b_addr}/invoke/{fn_id}").as_str()
    );
    let mut through_a = f.clone();
    through_a["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(endpoint);
    through_b["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(endpoint);
    assert_eq!(through_b, through_a);
    let (dup, _, _) = request(b_addr, "POST", "/v2/apps", br#"{"name": "shared"}"#);
    assert_eq!(dup, 409, "an app name taken through A is taken through B");

    let mut seed_host = None;
    assert!(eventually(Duration::from_secs(60), || {
        seed_host = view(a_addr, &fn_id).1;
        seed_host.is_some()
    }));
    let seed_host = seed_host.unwrap();
    for n in 0..4 {
        call(b_addr, &fn_id, n);
        call(a_addr, &fn_id, n);
    }
    assert_eq!(view(b_addr, &fn_id).1.as_deref(), Some(seed_host.as_str()));
    assert_eq!(seeds_served(&tb, None), 1, "one seed for both instances");
    let made = || {
        counter(a_addr, "mitosis_platform_seeds_made_total")
            + counter(b_addr, "mitosis_platform_seeds_made_total")
    };
    assert_eq!(made(), 1.0);

    // The seed's host's daemon dies: A stops refreshing its lease, its entry (and the seed's
    // record) expire, B sees it unregistered; calls through both are served from one new seed.
    let dead: usize = seed_host.trim_start_matches('h').parse().unwrap();
    tb.host(dead).kill_daemon().unwrap();
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || {
            view(b_addr, &fn_id)
                .0
                .iter()
                .any(|(name, _, registered)| *name == seed_host && !registered)
        }),
        "{seed_host}'s entry did not expire: {:?}",
        view(b_addr, &fn_id).0
    );
    eprintln!(
        "{seed_host}'s lease expired {:?} after its daemon died",
        t0.elapsed()
    );
    for n in 0..4 {
        assert_ne!(call(b_addr, &fn_id, n), seed_host);
        assert_ne!(call(a_addr, &fn_id, n), seed_host);
    }
    let new_a = view(a_addr, &fn_id).1.expect("A's seed");
    let new_b = view(b_addr, &fn_id).1.expect("B's seed");
    assert_eq!(new_a, new_b, "one seed again");
    assert_ne!(new_a, seed_host, "made again elsewhere");
    assert_eq!(made(), 2.0, "made again once, for both instances");
    assert_eq!(seeds_served(&tb, Some(dead)), 1);

    // Deleted through B, gone through A, and its seed dropped.
    let app_id = app["id"].as_str().unwrap();
    let (status, _, _) = request(b_addr, "DELETE", &format!("/v2/apps/{app_id}"), b"");
    assert_eq!(status, 204);
    let (status, _, _) = request(a_addr, "GET", &format!("/v2/fns/{fn_id}"), b"");
    assert_eq!(status, 404);
    assert!(eventually(Duration::from_secs(10), || seeds_served(
        &tb,
        Some(dead)
    ) == 0));

    drop(b);
    drop(a);
    // A daemon started after a crash removes what the crashed one left (its seed's container).
    tb.host(dead).start_daemon().unwrap();
    teardown(tb);
    drop(etcd);
}
