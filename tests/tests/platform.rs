//! The serverless platform (crates/mitosis-platform) on three simulated hosts: Fn's v2 API in
//! this process on a loopback port, functions from OCI bundles, calls from several clients
//! at once, Fn's errors (404, 413, 502, 504), and a host whose daemon dies.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::{Api, Reply};
use common::*;
use mitosis_platform::Config;
use mitosis_testbed::Testbed;
use serde_json::{Value, json};

const BUNDLE: &str = "/var/lib/mitosis/bundles/python";
const ROOTFS: &str = "/var/lib/mitosis/bundles/python/rootfs";
/// The platform's body limit in these tests.
const MAX_BODY: usize = 64 << 10;

impl Api {
    fn start(tb: &Testbed) -> Api {
        Self::start_with(
            tb,
            Config {
                max_body: MAX_BODY,
                ..Config::default()
            },
        )
    }

    /// Creates app `app` and function `name` of it from `image`; the function's id.
    fn deploy(&self, app: &str, name: &str, image: &Path, timeout: u32) -> String {
        let app = self.json("POST", "/v2/apps", json!({ "name": app }));
        let f = self.json(
            "POST",
            "/v2/fns",
            // 256 MiB: numpy and Pillow with the image are over Fn's default of 128.
            json!({"name": name, "app_id": app["id"], "image": image, "timeout": timeout,
                   "memory": 256}),
        );
        assert_eq!(f["app_id"], app["id"]);
        f["id"].as_str().unwrap().to_owned()
    }

    /// The platform's `/metrics`, parsed as Prometheus exposition.
    fn metrics(&self) -> prometheus_parse::Scrape {
        let reply = self.request("GET", "/metrics", b"");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply.headers["content-type"].starts_with("application/openmetrics-text"),
            "{:?}",
            reply.headers
        );
        let text = reply.text();
        assert!(text.ends_with("# EOF\n"), "{text}");
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
    }

    /// The host serving `fn_id`'s seed, once it has one.
    fn seed_host(&self, fn_id: &str) -> String {
        let mut host = String::new();
        let found = eventually(Duration::from_secs(60), || {
            let where_ = self.json("GET", "/mitosis/hosts", Value::Null);
            let seed = where_["seeds"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["fn_id"] == fn_id)
                .cloned();
            match seed.and_then(|s| s["seed_host"].as_str().map(str::to_owned)) {
                Some(h) => {
                    host = h;
                    true
                }
                None => false,
            }
        });
        assert!(found, "no seed for {fn_id} within 60 s");
        host
    }
}

/// The sum of the samples named `name` with all of `labels` (0 if none).
fn metric(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value;
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => n,
            ref other => panic!("{name}: {other:?}"),
        })
        .sum()
}

/// An answer line of a seed, without its `pid` (the one field that differs between
/// processes).
fn without_pid(answer: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(answer)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(answer)));
    v.as_object_mut().expect("an object").remove("pid");
    v
}

/// The bundle function's answer to `request`, from a cold run in its rootfs on `host`.
fn cold_answer(tb: &Testbed, host: usize, request: &str) -> Value {
    let mut cmd = tb.host(host).command("chroot");
    cmd.args([
        ROOTFS,
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

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p / 100.0).round() as usize]
}

#[test]
fn functions_run_on_every_host_from_one_seed_and_survive_a_dead_host() {
    assert!(
        Path::new(BUNDLE).join("config.json").exists(),
        "{BUNDLE} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    let tb = testbed(3);
    let api = Api::start(&tb);
    let fn_id = api.deploy("shop", "thumbs", Path::new(BUNDLE), 30);

    // Fn's shapes: lists of items with a cursor, filtered by app.
    let f = api.json("GET", &format!("/v2/fns/{fn_id}"), Value::Null);
    let listed = api.json(
        "GET",
        &format!("/v2/fns?app_id={}", f["app_id"].as_str().unwrap()),
        Value::Null,
    );
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["next_cursor"], "");
    for field in [
        "memory",
        "timeout",
        "idle_timeout",
        "config",
        "annotations",
        "created_at",
    ] {
        assert!(!f[field].is_null(), "{field} missing in {f}");
    }
    // Where Fn's CLI calls it, from the address the caller used, in every answer but never
    // stored: a PUT of what was read keeps the one the next caller's address makes.
    let endpoint = format!("http://{}/invoke/{fn_id}", api.addr);
    assert_eq!(
        f["annotations"]["fnproject.io/fn/invokeEndpoint"],
        endpoint.as_str()
    );
    assert_eq!(
        listed["items"][0]["annotations"]["fnproject.io/fn/invokeEndpoint"],
        endpoint.as_str()
    );
    let stale = serde_json::json!({"annotations": {"fnproject.io/fn/invokeEndpoint": "http://elsewhere/invoke/x"}});
    let put = api.json("PUT", &format!("/v2/fns/{fn_id}"), stale);
    assert_eq!(
        put["annotations"]["fnproject.io/fn/invokeEndpoint"],
        endpoint.as_str()
    );

    let requests: Vec<String> = (1..=4).map(|n| format!("{{\"n\": {n}}}")).collect();
    let expected: Vec<Value> = requests.iter().map(|r| cold_answer(&tb, 0, r)).collect();
    let seed_host = api.seed_host(&fn_id);

    // 12 calls from 4 clients at once, every answer checked.
    let api = Arc::new(api);
    let expected = Arc::new(expected);
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (api, fn_id, expected, requests) = (
                api.clone(),
                fn_id.clone(),
                expected.clone(),
                requests.clone(),
            );
            std::thread::spawn(move || {
                let mut ran = Vec::new();
                for i in 0..3 {
                    let which = (c + i) % requests.len();
                    let t = Instant::now();
                    let reply = api.request(
                        "POST",
                        &format!("/invoke/{fn_id}"),
                        requests[which].as_bytes(),
                    );
                    let took = t.elapsed();
                    assert_eq!(reply.status, 200, "call: {}", reply.text());
                    assert_eq!(without_pid(&reply.body), expected[which], "call {which}");
                    assert_eq!(reply.headers["fn-call-id"].len(), 26);
                    ran.push((reply.headers["mitosis-host"].clone(), took));
                }
                ran
            })
        })
        .collect();
    let mut hosts = BTreeSet::new();
    let mut latencies = Vec::new();
    for client in clients {
        for (host, took) in client.join().expect("a client thread") {
            hosts.insert(host);
            latencies.push(took);
        }
    }
    assert!(
        hosts.len() > 1,
        "12 concurrent calls all ran on {hosts:?} (seed on {seed_host})"
    );
    assert_eq!(api.seed_host(&fn_id), seed_host, "one seed, where it was");

    // Sequential calls, for the latency through the API (the seed's replicas are warm).
    for i in 0..10 {
        let t = Instant::now();
        let reply = api.request(
            "POST",
            &format!("/invoke/{fn_id}"),
            requests[i % 4].as_bytes(),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        latencies.push(t.elapsed());
    }
    eprintln!(
        "platform: {} calls through the API, median {:?}, p90 {:?}; hosts used {hosts:?}, seed on {seed_host}",
        latencies.len(),
        percentile(&mut latencies, 50.0),
        percentile(&mut latencies, 90.0)
    );

    // Fn's errors.
    let unknown = api.request("POST", "/invoke/01NOSUCHFUNCTION000000000", b"{}");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.message(), "Fn not found");
    assert_eq!(api.request("POST", "/function/nosuch", b"{}").status, 404);
    assert_eq!(api.request("GET", "/v2/apps/nosuch", b"").status, 404);
    let big = vec![b' '; MAX_BODY + 1];
    let too_big = api.request("POST", &format!("/invoke/{fn_id}"), &big);
    assert_eq!(too_big.status, 413, "{}", too_big.text());
    assert!(
        too_big.message().contains("too large"),
        "{}",
        too_big.message()
    );
    // OpenFaaS's route finds the function by name.
    let by_name = api.request("POST", "/function/thumbs", requests[0].as_bytes());
    assert_eq!(by_name.status, 200, "{}", by_name.text());
    assert_eq!(without_pid(&by_name.body), expected[0]);

    // /metrics counts them: 23 answered, the 413 (calls of unknown functions name none).
    let m = api.metrics();
    let this = ("fn_id", fn_id.as_str());
    let calls = |outcome| {
        metric(
            &m,
            "mitosis_platform_calls_total",
            &[this, ("outcome", outcome)],
        )
    };
    assert_eq!(calls("ok"), 23.0);
    assert_eq!(calls("4xx"), 1.0);
    assert_eq!(calls("5xx"), 0.0);
    assert_eq!(
        metric(&m, "mitosis_platform_call_seconds_count", &[this]),
        24.0
    );
    assert_eq!(metric(&m, "mitosis_platform_seeds_made_total", &[]), 1.0);
    assert_eq!(
        metric(&m, "mitosis_platform_seeds_replaced_total", &[]),
        0.0
    );
    assert_eq!(metric(&m, "mitosis_platform_calls_in_flight", &[]), 0.0);
    assert_eq!(metric(&m, "mitosis_platform_host_up", &[]), 3.0);

    // The seed's host dies: later calls succeed on the others, from a seed made again there.
    let dead: usize = seed_host.trim_start_matches('h').parse().unwrap();
    tb.host(dead).kill_daemon().unwrap();
    for i in 0..6 {
        let reply = api.request(
            "POST",
            &format!("/invoke/{fn_id}"),
            requests[i % 4].as_bytes(),
        );
        assert_eq!(
            reply.status,
            200,
            "call {i} after h{dead} died: {}",
            reply.text()
        );
        assert_eq!(without_pid(&reply.body), expected[i % 4]);
        assert_ne!(reply.headers["mitosis-host"], seed_host);
    }
    let new_seed_host = api.seed_host(&fn_id);
    assert_ne!(
        new_seed_host, seed_host,
        "the seed was made again elsewhere"
    );
    let m = api.metrics();
    assert_eq!(metric(&m, "mitosis_platform_seeds_made_total", &[]), 2.0);
    assert_eq!(
        metric(&m, "mitosis_platform_seeds_replaced_total", &[]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "mitosis_platform_calls_total",
            &[this, ("outcome", "ok")]
        ),
        29.0
    );

    // Fn's detached call: 202 with its call id at once, then it runs to its answer.
    let detached = |kind| {
        api.request_with(
            "POST",
            &format!("/invoke/{fn_id}"),
            &[("Fn-Invoke-Type", kind)],
            requests[0].as_bytes(),
        )
    };
    let accepted = detached("detached");
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert_eq!(accepted.headers["fn-call-id"].len(), 26);
    assert!(accepted.body.is_empty());
    assert!(
        eventually(Duration::from_secs(30), || metric(
            &api.metrics(),
            "mitosis_platform_calls_total",
            &[this, ("outcome", "ok")]
        ) == 30.0),
        "the detached call was not answered"
    );
    assert_eq!(detached("later").status, 400);

    // Deleting the app deletes its function.
    let app_id = f["app_id"].as_str().unwrap();
    assert_eq!(
        api.request("DELETE", &format!("/v2/apps/{app_id}"), b"")
            .status,
        204
    );
    assert_eq!(
        api.request("GET", &format!("/v2/fns/{fn_id}"), b"").status,
        404
    );

    drop(Arc::into_inner(api).expect("the clients are done"));
    // A daemon started after a crash removes what the crashed one left (its seed's container).
    tb.host(dead).start_daemon().unwrap();
    teardown(tb);
}

/// A bundle over the shared rootfs whose function sleeps, crashes or allocates as asked:
/// `{"sleep": S}`, `{"exit": N}`, `{"alloc_mib": M}`; otherwise it echoes the request.
fn tricks_bundle(scratch: &Scratch) -> PathBuf {
    const SCRIPT: &str = "import json, os, time\n\
data = os.read(0, 65536)\n\
req = json.loads(data)\n\
if 'sleep' in req: time.sleep(req['sleep'])\n\
if 'exit' in req: os.write(2, b'failing on purpose\\n'); os._exit(req['exit'])\n\
if 'alloc_mib' in req: hog = b'x' * (req['alloc_mib'] << 20)\n\
os.write(1, json.dumps({'echo': req}).encode())\n";
    python_bundle(scratch, "tricks", &["python3", "-c", SCRIPT], 128, 32)
}

#[test]
fn calls_past_their_timeout_get_504_and_failures_502() {
    let scratch = Scratch::new("platform");
    let bundle = tricks_bundle(&scratch);
    let tb = testbed_with(3, &["--metrics", common::metrics::METRICS]);
    let api = Api::start(&tb);
    let fn_id = api.deploy("tricks", "tricky", &bundle, 1);
    api.seed_host(&fn_id);
    let invoke = format!("/invoke/{fn_id}");

    let echo = api.request("POST", &invoke, br#"{"hello": 1}"#);
    assert_eq!(echo.status, 200, "{}", echo.text());
    assert_eq!(echo.text(), r#"{"echo": {"hello": 1}}"#);

    // While calls run past their timeout, the API answers at once.
    let api = Arc::new(api);
    let t = Instant::now();
    let sleepers: Vec<_> = (0..3)
        .map(|_| {
            let (api, invoke) = (api.clone(), invoke.clone());
            std::thread::spawn(move || api.request("POST", &invoke, br#"{"sleep": 30}"#))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let quick = Instant::now();
    let listed = api.request("GET", &format!("/v2/fns/{fn_id}"), b"");
    assert_eq!(listed.status, 200);
    assert!(
        quick.elapsed() < Duration::from_millis(500),
        "the API took {:?} while calls ran",
        quick.elapsed()
    );
    let replies: Vec<Reply> = sleepers.into_iter().map(|s| s.join().unwrap()).collect();
    let took = t.elapsed();
    let slow = &replies[0];
    assert!(replies.iter().all(|r| r.status == 504), "{}", slow.text());
    assert!(took < Duration::from_secs(5), "the 504 took {took:?}");
    assert!(slow.message().contains("timed out"), "{}", slow.message());
    // A failed call is named too, to find its log lines.
    assert_eq!(slow.headers["fn-call-id"].len(), 26);

    let crash = api.request("POST", &invoke, br#"{"exit": 3}"#);
    assert_eq!(crash.status, 502, "{}", crash.text());
    let why = crash.message();
    assert!(
        why.contains("status 3") && why.contains("failing on purpose"),
        "{why}"
    );

    let hog = api.request("POST", &invoke, br#"{"alloc_mib": 512}"#);
    assert_eq!(hog.status, 502, "{}", hog.text());
    assert!(hog.message().contains("out of memory"), "{}", hog.message());

    let m = api.metrics();
    let calls = |outcome| metric(&m, "mitosis_platform_calls_total", &[("outcome", outcome)]);
    // Each call took a container of the bundle's pool on its host.
    let taken: f64 = (0..3)
        .map(|h| {
            let m = common::metrics::scrape(&tb, h);
            metric(&m, "mitosisd_container_pool_taken_total", &[])
        })
        .sum();
    assert_eq!(taken, 6.0, "one container per call so far");
    assert_eq!(
        (calls("ok"), calls("5xx")),
        (1.0, 5.0),
        "3 timeouts, a crash, a hog"
    );

    // The function still answers, and the killed calls left no child running.
    let again = api.request("POST", &invoke, br#"{"again": true}"#);
    assert_eq!(again.status, 200, "{}", again.text());
    assert!(eventually(Duration::from_secs(10), || {
        tb.hosts().iter().all(|h| {
            mitosis_client::Client::connect(h.socket_path())
                .and_then(|c| c.status())
                .is_ok_and(|s| s.children_running == 0)
        })
    }));
    drop(Arc::into_inner(api).expect("the clients are done"));
    teardown(tb);
}

#[test]
fn every_policy_answers_and_starts_its_processes_its_own_way() {
    assert!(
        Path::new(BUNDLE).join("config.json").exists(),
        "{BUNDLE} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    let scratch = Scratch::new("policies");
    let tricks = tricks_bundle(&scratch);
    let tb = testbed(3);
    let api = Api::start(&tb);
    let app = api.json("POST", "/v2/apps", json!({"name": "policies"}));
    let deploy = |name: &str, image: &Path, policy: &str, extra: Value| {
        let mut body = json!({"name": name, "app_id": app["id"], "image": image,
                              "idle_timeout": 2, "annotations": {"mitosis.io/policy": policy}});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        api.json("POST", "/v2/fns", body)["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // An unknown policy is refused as Fn refuses bad fields.
    let bad = api.request(
        "POST",
        "/v2/fns",
        json!({"name": "bad", "app_id": app["id"], "image": BUNDLE,
               "annotations": {"mitosis.io/policy": "sometimes"}})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(
        bad.message().contains("unknown policy"),
        "{}",
        bad.message()
    );

    let requests: Vec<String> = (1..=3).map(|n| format!("{{\"n\": {n}}}")).collect();
    let expected: Vec<Value> = requests.iter().map(|r| cold_answer(&tb, 0, r)).collect();
    let call = |fn_id: &str, i: usize| {
        let reply = api.request("POST", &format!("/invoke/{fn_id}"), requests[i].as_bytes());
        assert_eq!(reply.status, 200, "{fn_id} call {i}: {}", reply.text());
        assert_eq!(without_pid(&reply.body), expected[i], "{fn_id} call {i}");
        reply.headers["mitosis-start"].clone()
    };
    let starts = |fn_id: &str| -> Vec<String> { (0..3).map(|i| call(fn_id, i)).collect() };

    // numpy and Pillow with the image: over Fn's default of 128 MiB.
    let mib = json!({"memory": 256});
    let remote = deploy("remote", Path::new(BUNDLE), "remote-fork", mib.clone());
    assert_eq!(starts(&remote), ["fork"; 3]);
    let local = deploy("local", Path::new(BUNDLE), "local-fork", mib.clone());
    assert_eq!(starts(&local), ["fork"; 3]);
    let cold = deploy("cold", Path::new(BUNDLE), "cold", mib.clone());
    assert_eq!(starts(&cold), ["cold"; 3]);
    // Fn's keep-warm: the first call starts an instance, the next ones reuse it; idle past
    // its idle_timeout (2 s), it is gone and the next call starts one again.
    let cached = deploy("cached", Path::new(BUNDLE), "fn-cache", mib);
    assert_eq!(starts(&cached), ["cold", "warm", "warm"]);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(call(&cached, 0), "cold");
    // Two calls at once with one idle instance: one takes it, the other starts an instance
    // but takes the first one back as soon as it is free (a call is tens of ms, a cold start
    // hundreds), as Fn's agent does: both are warm.
    let both: Vec<String> = std::thread::scope(|s| {
        let (call, cached) = (&call, &cached);
        let calls: Vec<_> = (1..3).map(|i| s.spawn(move || call(cached, i))).collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(both, ["warm", "warm"]);
    // Refused before it reached the instance it took: every instance is kept.
    let idle = || {
        let d = api.json("GET", "/mitosis/dashboard.json?series=none", Value::Null);
        let f = d["functions"].as_array().expect("functions");
        let f = f
            .iter()
            .find(|f| f["id"] == cached.as_str())
            .expect("listed");
        f["idle_instances"].as_u64().expect("idle_instances")
    };
    let before = idle();
    let two_lines = api.request(
        "POST",
        &format!("/invoke/{cached}"),
        b"{\"n\": 1}\n{\"n\": 2}",
    );
    assert_eq!(two_lines.status, 400, "{}", two_lines.text());
    assert_eq!(idle(), before);
    assert_eq!(call(&cached, 0), "warm");

    // A seed on every host for local fork, one for remote fork.
    let m = api.metrics();
    assert_eq!(metric(&m, "mitosis_platform_seeds_made_total", &[]), 4.0);
    let started = |policy: &str, start: &str| {
        metric(
            &m,
            "mitosis_platform_call_starts_total",
            &[("policy", policy), ("start", start)],
        )
    };
    assert_eq!(started("remote-fork", "fork"), 3.0);
    assert_eq!(started("cold", "cold"), 3.0);
    assert_eq!(
        (started("fn-cache", "cold"), started("fn-cache", "warm")),
        (2.0, 5.0)
    );
    // Processes started cold: one per cold call; fn-cache's two, and a third if the
    // concurrent call found the instance busy (it started one, then took the freed one).
    let cold_started = |policy: &str| {
        metric(
            &m,
            "mitosis_platform_cold_starts_total",
            &[("policy", policy)],
        )
    };
    assert_eq!(cold_started("cold"), 3.0);
    assert!((2.0..=3.0).contains(&cold_started("fn-cache")));
    assert_eq!(
        cold_started("remote-fork") + cold_started("local-fork"),
        0.0
    );

    // The function's `memory` holds, whether its process starts cold or is forked: 64 MiB
    // of a bundle that allows 128.
    for policy in ["cold", "remote-fork"] {
        let small = deploy(
            &format!("small-{policy}"),
            &tricks,
            policy,
            json!({"memory": 64}),
        );
        let fits = api.request("POST", &format!("/invoke/{small}"), br#"{"alloc_mib": 16}"#);
        assert_eq!(fits.status, 200, "{policy}: {}", fits.text());
        let hog = api.request(
            "POST",
            &format!("/invoke/{small}"),
            br#"{"alloc_mib": 100}"#,
        );
        assert_eq!(hog.status, 502, "{policy}: {}", hog.text());
        assert!(
            hog.message().contains("64 MiB"),
            "{policy}: {}",
            hog.message()
        );
    }

    // A function whose memory no host has available is placed nowhere: 503, says why.
    let huge = deploy(
        "huge",
        &tricks,
        "remote-fork",
        json!({"memory": 1u64 << 40}),
    );
    let nowhere = api.request("POST", &format!("/invoke/{huge}"), br#"{"n": 1}"#);
    assert_eq!(nowhere.status, 503, "{}", nowhere.text());
    assert!(
        nowhere.message().contains("MiB of memory available"),
        "{}",
        nowhere.message()
    );

    // Deleting the functions ends their instances and seeds: nothing runs on any host.
    let app_id = app["id"].as_str().unwrap();
    assert_eq!(
        api.request("DELETE", &format!("/v2/apps/{app_id}"), b"")
            .status,
        204
    );
    assert!(eventually(Duration::from_secs(10), || {
        tb.hosts().iter().all(|h| {
            mitosis_client::Client::connect(h.socket_path())
                .and_then(|c| c.status())
                .is_ok_and(|s| s.children_running == 0 && s.seeds.is_empty())
        })
    }));
    drop(api);
    teardown(tb);
}

/// A bundle over the shared rootfs whose function serves HTTP (examples/python/http_fn.py).
fn http_bundle(scratch: &Scratch) -> PathBuf {
    python_bundle(
        scratch,
        "http",
        &["python3", "/opt/mitosis/http_fn.py"],
        128,
        32,
    )
}

#[test]
fn http_functions_get_the_request_and_answer_with_their_own_status_and_headers_also_through_triggers()
 {
    let scratch = Scratch::new("httpfn");
    let bundle = http_bundle(&scratch);
    let tb = testbed(2);
    let api = Api::start(&tb);
    let app = api.json("POST", "/v2/apps", json!({"name": "web"}));
    let f = api.json(
        "POST",
        "/v2/fns",
        json!({"name": "primes", "app_id": app["id"], "image": bundle,
               "annotations": {"mitosis.io/contract": "http"}}),
    );
    let fn_id = f["id"].as_str().unwrap();
    let bad = api.request(
        "POST",
        "/v2/fns",
        json!({"name": "bad", "app_id": app["id"], "image": bundle,
               "annotations": {"mitosis.io/contract": "grpc"}})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());

    // The answer a cold run of the function gives for a path.
    let cold = |path: &str| {
        let mut cmd = tb.host(0).command("chroot");
        cmd.args([ROOTFS, "env", "-i", "PATH=/usr/bin:/bin"])
            .args(["python3", "/opt/mitosis/http_fn.py", "--answer", path])
            .current_dir("/");
        let out = cmd.output().expect("a cold run");
        assert!(out.status.success());
        without_pid(&out.stdout)
    };
    // OpenFaaS's route passes the method and sub-path on; the function's headers come back.
    for path in ["/primes/7", "/a/b?x=1"] {
        let reply = api.request("GET", &format!("/function/primes{path}"), b"");
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(reply.headers["content-type"], "application/json");
        assert_eq!(without_pid(&reply.body), cold(path), "{path}");
    }
    // Fn's HTTP trigger: its route (any method, the query too) reaches the function as
    // that path; its endpoint is in every answer; names and routes are unique in the app.
    let trigger = api.json(
        "POST",
        "/v2/triggers",
        json!({"name": "primes7", "app_id": app["id"], "fn_id": fn_id, "type": "http",
               "source": "/primes/7"}),
    );
    let endpoint = format!("http://{}/t/web/primes/7", api.addr);
    assert_eq!(
        trigger["annotations"]["fnproject.io/trigger/httpEndpoint"],
        endpoint.as_str()
    );
    let through = api.request("GET", "/t/web/primes/7", b"");
    assert_eq!(through.status, 200, "{}", through.text());
    assert_eq!(without_pid(&through.body), cold("/primes/7"));
    for (body, status) in [
        (
            json!({"name": "again", "app_id": app["id"], "fn_id": fn_id, "type": "http",
                "source": "/primes/7"}),
            409,
        ),
        (
            json!({"name": "primes7", "app_id": app["id"], "fn_id": fn_id, "type": "http",
                "source": "/other"}),
            409,
        ),
        (
            json!({"name": "x", "app_id": "nope", "fn_id": fn_id, "type": "http",
                "source": "/x"}),
            404,
        ),
        (
            json!({"name": "x", "app_id": app["id"], "fn_id": fn_id, "type": "cron",
                "source": "/x"}),
            400,
        ),
    ] {
        let reply = api.request("POST", "/v2/triggers", body.to_string().as_bytes());
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
    }
    // Fn's pages: per_page items in name order, and the cursor to the rest.
    api.json("POST", "/v2/apps", json!({"name": "web2"}));
    let first = api.json("GET", "/v2/apps?per_page=1", Value::Null);
    assert_eq!(first["items"][0]["name"], "web");
    let cursor = first["next_cursor"].as_str().unwrap();
    assert!(!cursor.is_empty());
    let rest = api.json(
        "GET",
        &format!("/v2/apps?per_page=1&cursor={cursor}"),
        Value::Null,
    );
    assert_eq!(rest["items"][0]["name"], "web2");
    assert_eq!(rest["next_cursor"], "");
    let tid = trigger["id"].as_str().unwrap();
    let moved = api.json(
        "PUT",
        &format!("/v2/triggers/{tid}"),
        json!({"source": "/a/b"}),
    );
    assert_eq!(moved["source"], "/a/b");
    let listed = api.json(
        "GET",
        &format!("/v2/triggers?app_id={}", app["id"].as_str().unwrap()),
        Value::Null,
    );
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let through = api.request("GET", "/t/web/a/b?x=1", b"");
    assert_eq!(through.status, 200, "{}", through.text());
    assert_eq!(without_pid(&through.body), cold("/a/b?x=1"));
    // The caller's method reaches it: this function serves no POST (its own 501).
    assert_eq!(api.request("POST", "/t/web/a/b", b"{}").status, 501);
    for path in ["/t/web/primes/7", "/t/nosuchapp/a/b"] {
        assert_eq!(api.request("GET", path, b"").status, 404, "{path}");
    }
    // Fn's /invoke is a POST to `/`, which this function does not serve: its own 501.
    let post = api.request("POST", &format!("/invoke/{fn_id}"), b"{}");
    assert_eq!(post.status, 501, "{}", post.text());
    assert_eq!(post.headers["mitosis-start"], "fork");
    // The HTTP contract needs a fork: a cold policy is refused, not half served.
    api.json(
        "POST",
        "/v2/fns",
        json!({"name": "coldweb", "app_id": app["id"], "image": bundle,
               "annotations": {"mitosis.io/contract": "http", "mitosis.io/policy": "cold"}}),
    );
    let refused = api.request("GET", "/function/coldweb", b"");
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.message().contains("remote-fork"),
        "{}",
        refused.message()
    );
    // A deleted function takes its triggers.
    assert_eq!(
        api.request("DELETE", &format!("/v2/fns/{fn_id}"), b"")
            .status,
        204
    );
    assert_eq!(
        api.request("GET", &format!("/v2/triggers/{tid}"), b"")
            .status,
        404
    );
    drop(api);
    teardown(tb);
}

#[test]
fn calls_over_the_hosts_limit_wait_for_room() {
    let scratch = Scratch::new("admission");
    let bundle = tricks_bundle(&scratch);
    let tb = testbed(2);
    let api = Arc::new(Api::start_with(
        &tb,
        Config {
            max_calls_per_host: Some(1),
            ..Config::default()
        },
    ));
    let fn_id = api.deploy("queue", "sleepy", &bundle, 30);
    api.seed_host(&fn_id);
    assert_eq!(
        api.request("POST", &format!("/invoke/{fn_id}"), b"{}")
            .status,
        200
    );

    // Four calls of a second each, one at a time on each of two hosts: they queue, all answer,
    // and the last answers no sooner than two seconds after the first started.
    let t = Instant::now();
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let (api, fn_id) = (api.clone(), fn_id.clone());
            std::thread::spawn(move || {
                let body = format!("{{\"sleep\": 1, \"i\": {i}}}");
                let reply = api.request("POST", &format!("/invoke/{fn_id}"), body.as_bytes());
                (reply.status, reply.text())
            })
        })
        .collect();
    for c in callers {
        let (status, text) = c.join().unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("\"sleep\": 1"), "{text}");
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "4 calls of 1 s on 2 hosts, 1 at a time: {took:?}"
    );
    drop(Arc::into_inner(api).expect("the callers are done"));
    teardown(tb);
}

#[test]
fn a_new_seed_primes_every_other_host_with_its_replica() {
    let scratch = Scratch::new("priming");
    let bundle = tricks_bundle(&scratch);
    let tb = testbed(3);
    let api = Api::start(&tb);
    let fn_id = api.deploy("primed", "echo", &bundle, 30);
    let seed_host: usize = api.seed_host(&fn_id)[1..].parse().unwrap();
    // No call yet: every other host builds its replica on its own.
    let primed = eventually(Duration::from_secs(20), || {
        (0..3).filter(|h| *h != seed_host).all(|h| {
            mitosis_client::Client::connect(tb.host(h).socket_path())
                .and_then(|c| c.status())
                .is_ok_and(|s| s.replicas.len() == 1)
        })
    });
    assert!(
        primed,
        "the other hosts have no replica of the seed on h{seed_host}"
    );
    // So the first call anywhere is a plain fork of a replica that is there.
    let reply = api.request("POST", &format!("/invoke/{fn_id}"), br#"{"x": 1}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    drop(api);
    teardown(tb);
}
