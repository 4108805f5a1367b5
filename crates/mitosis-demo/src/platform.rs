//! The platform demo: a Python function from an OCI bundle, deployed on mitosis-platform over
//! simulated hosts and called through Fn's v2 API by concurrent clients.
//!
//! The demo builds a testbed (network namespaces with a mitosisd each), serves the platform's
//! API from this process on a loopback port, creates an app and a function whose image is the
//! bundle, and calls it from several client threads at once over HTTP. Every answer is checked
//! against a cold run of the same function in the bundle's rootfs, which is also the baseline:
//! an Fn-style cold start, a fresh process of the bundle per call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mitosis_container::Bundle;
use mitosis_platform::{Config, HostSpec};
use mitosis_testbed::{DaemonConfig, Testbed, TestbedConfig};
use serde_json::{Value, json};

use crate::demo::{DemoArgs, ms, percentile, sibling};

/// The port the testbed's daemons listen on.
const DAEMON_PORT: u16 = 7070;
/// How long one call may take (the function's `timeout` is 30 s; the first call also waits
/// for the seed).
const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// Set by SIGINT or SIGTERM: clients stop calling and the demo tears everything down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`] instead of killing the demo, so the testbed is torn down.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn stopping() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn run(args: &DemoArgs) -> Result<i32> {
    anyhow::ensure!(args.calls > 0, "--calls must be at least 1");
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(args.cold > 0, "--cold must be at least 1");
    anyhow::ensure!(args.hosts > 0, "--hosts must be at least 1");
    catch_signals();
    let me = std::env::current_exe().context("locating the mitosis-demo binary")?;
    let daemon = sibling(&me, "mitosisd")?;
    sibling(&me, "mitosis-stub")?;
    sibling(&me, "mitosis-init")?;
    let dir = &args.bundle;
    anyhow::ensure!(
        dir.join("config.json").is_file(),
        "no OCI bundle at {} (scripts/setup.sh makes it)",
        dir.display()
    );
    let bundle = Bundle::load(dir).with_context(|| format!("loading {}", dir.display()))?;

    println!(
        "mitosis demo: a Python function on mitosis-platform ({} hosts, {} clients, {} calls)",
        args.hosts, args.clients, args.calls
    );
    println!(
        "  function: OCI bundle {} (`{}`)",
        dir.display(),
        bundle.args.join(" ")
    );
    let t = Instant::now();
    let testbed = Testbed::new(
        TestbedConfig::new(args.hosts).with_daemon(DaemonConfig::new(&daemon, DAEMON_PORT)),
    )
    .context("building the testbed (this needs root and iproute2)")?;
    println!(
        "- testbed {} up in {}: {} hosts, a mitosisd each",
        testbed.id(),
        ms(t.elapsed()),
        args.hosts
    );
    let result = demo(args, &bundle, &testbed);
    if let Err(err) = testbed.teardown() {
        eprintln!("mitosis demo: teardown: {err}");
    }
    if STOP.load(Ordering::SeqCst) {
        eprintln!("mitosis demo: interrupted; torn down");
        return Ok(130);
    }
    result
}

/// Everything that needs the testbed; the API (and its seeds) is gone when this returns.
fn demo(args: &DemoArgs, bundle: &Bundle, testbed: &Testbed) -> Result<i32> {
    // Distinct requests, each with its expected answer from a cold start; the calls cycle
    // through them so every answer is checked.
    let requests: Vec<String> = (1..=args.cold).map(|n| format!("{{\"n\": {n}}}")).collect();
    println!(
        "- {} cold starts in the bundle's rootfs on h0 (expected answers, and the baseline)",
        requests.len()
    );
    let mut cold = Vec::new();
    let mut expected = Vec::new();
    for request in &requests {
        stopping()?;
        let (latency, answer) = crate::demo_bundle::cold_start(testbed.host(0), bundle, request)?;
        cold.push(latency);
        expected.push(without_pid(&answer)?);
    }

    let api = Api::start(testbed)?;
    println!("- platform API on http://{} (in this process)", api.addr);
    let agent = client();
    let app = api.post_json(&agent, "/v2/apps", json!({"name": "demo"}))?;
    let t = Instant::now();
    let f = api.post_json(
        &agent,
        "/v2/fns",
        // numpy and Pillow with the image: over Fn's default of 128 MiB.
        json!({"name": "pyfn", "app_id": app["id"], "image": bundle.dir, "timeout": 30,
               "memory": 256}),
    )?;
    let fn_id = f["id"].as_str().context("a function id")?.to_owned();
    println!("- deployed app demo, function pyfn {fn_id} (image = the bundle)");

    // The first call waits for the seed: the bundle started in a container, warm, prepared.
    let first = api.invoke(&agent, &fn_id, &requests[0])?;
    let first_total = t.elapsed();
    let seed_host = api.seed_host(&agent, &fn_id).unwrap_or_else(|| "?".into());
    let first_ok = first.check(&expected[0]);
    println!(
        "- first call: {} on {} ({}), {} after the deploy; seed on {seed_host}",
        ms(first.latency),
        first.host,
        verdict(&first_ok),
        ms(first_total)
    );

    // The concurrent calls, round-robin over the clients.
    println!(
        "- {} calls from {} concurrent clients (POST /invoke/{fn_id}):",
        args.calls, args.clients
    );
    println!(
        "  {:>4}  {:>6}  {:<10}  {:<5}  {:>10}",
        "call", "client", "body", "host", "latency"
    );
    let api = Arc::new(api);
    let requests = Arc::new(requests);
    let expected = Arc::new(expected);
    let wall = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (api, fn_id, requests, expected) = (
                api.clone(),
                fn_id.clone(),
                requests.clone(),
                expected.clone(),
            );
            let calls: Vec<usize> = (c..args.calls).step_by(args.clients).collect();
            std::thread::spawn(move || -> Vec<Done> {
                let agent = client();
                let mut done = Vec::new();
                for i in calls {
                    if STOP.load(Ordering::SeqCst) {
                        break;
                    }
                    let which = i % requests.len();
                    let call = api.invoke(&agent, &fn_id, &requests[which]);
                    let outcome = call.map(|call| {
                        let ok = call.check(&expected[which]);
                        (call, ok)
                    });
                    // Calls cut short by Ctrl-C (it reaches the daemons too) are not failures.
                    if outcome.is_err() && STOP.load(Ordering::SeqCst) {
                        break;
                    }
                    let line = match &outcome {
                        Ok((call, ok)) => format!(
                            "  {:>4}  {c:>6}  {:<10}  {:<5}  {:>10}  {}",
                            i + 1,
                            requests[which],
                            call.host,
                            ms(call.latency),
                            verdict(ok)
                        ),
                        Err(e) => format!(
                            "  {:>4}  {c:>6}  {:<10}  {:<5}  {:>10}  FAILED: {e:#}",
                            i + 1,
                            requests[which],
                            "-",
                            "-"
                        ),
                    };
                    // One line per call, as it finishes (a whole line at a time).
                    println!("{line}");
                    done.push(Done { outcome });
                }
                done
            })
        })
        .collect();
    let mut calls = Vec::new();
    for client in clients {
        calls.extend(client.join().unwrap_or_default());
    }
    let wall = wall.elapsed();
    stopping()?;

    let mut warm = Vec::new();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = usize::from(first_ok.is_err());
    for done in &calls {
        match &done.outcome {
            Ok((call, ok)) => {
                warm.push(call.latency);
                *per_host.entry(call.host.clone()).or_default() += 1;
                if let Err(why) = ok {
                    failures += 1;
                    println!("  wrong answer from {}: {why}", call.host);
                }
            }
            Err(_) => failures += 1,
        }
    }
    failures += args.calls - calls.len();

    println!();
    println!(
        "{:<46} {:>11} {:>11} {:>11} {:>7}",
        "", "median", "p99", "min", "samples"
    );
    let rows: [(&str, &[Duration]); 3] = [
        (
            "first call (waits for the seed from the bundle)",
            &[first.latency],
        ),
        ("calls (a child remote-forked from the seed)", &warm),
        ("Fn-style cold start (python3 in the rootfs)", &cold),
    ];
    for (name, samples) in rows {
        if samples.is_empty() {
            continue;
        }
        println!(
            "{name:<46} {:>11} {:>11} {:>11} {:>7}",
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 99.0)),
            ms(percentile(samples, 0.0)),
            samples.len()
        );
    }
    if !warm.is_empty() {
        println!(
            "cold start / warm call (medians): {:.1}x; {:.0} calls/s with {} clients",
            percentile(&cold, 50.0).as_secs_f64() / percentile(&warm, 50.0).as_secs_f64(),
            warm.len() as f64 / wall.as_secs_f64(),
            args.clients
        );
    }
    let spread: Vec<String> = per_host.iter().map(|(h, n)| format!("{h} {n}")).collect();
    println!(
        "calls per host: {} (seed on {seed_host})",
        spread.join(", ")
    );
    println!(
        "(latency = HTTP request to answer, through the API on loopback; a host's first child also"
    );
    println!(
        " builds the host's replica of the seed; cold start = spawn of the bundle's python3 by chroot"
    );
    println!(
        " into its rootfs, per call, to its answer: no namespaces or cgroup, so a lower bound)"
    );

    drop(Arc::into_inner(api));
    println!();
    if failures > 0 {
        println!(
            "mitosis demo: {failures} of {} calls answered wrongly or failed",
            args.calls + 1
        );
        return Ok(1);
    }
    println!("all {} calls answered correctly", args.calls + 1);
    Ok(0)
}

/// One finished call of a client: its answer and whether it was right.
struct Done {
    outcome: Result<(Call, Result<(), String>)>,
}

struct Call {
    latency: Duration,
    host: String,
    body: String,
}

impl Call {
    fn check(&self, want: &Value) -> Result<(), String> {
        match without_pid(&self.body) {
            Ok(got) if &got == want => Ok(()),
            Ok(got) => Err(format!("answer {got}, expected {want} (pid aside)")),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

fn verdict(ok: &Result<(), String>) -> &'static str {
    if ok.is_ok() { "ok" } else { "WRONG" }
}

/// An answer without its `pid`, the one field that differs between processes.
fn without_pid(answer: &str) -> Result<Value> {
    let mut v: Value =
        serde_json::from_str(answer).with_context(|| format!("not JSON: {answer:?}"))?;
    v.as_object_mut()
        .with_context(|| format!("not an object: {answer}"))?
        .remove("pid");
    Ok(v)
}

/// A client: keep-alive connections, as an HTTP client of a real platform would have.
fn client() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(CALL_TIMEOUT).build()
}

/// The platform's API, served from a thread of its own; stopped on drop (its seeds dropped)
/// before the testbed goes.
struct Api {
    addr: SocketAddr,
    _served: mitosis_platform::background::Background,
}

impl Api {
    fn start(tb: &Testbed) -> Result<Api> {
        let hosts = HostSpec::of_testbed(tb);
        let served = mitosis_platform::background::Background::start(Config::default(), hosts)
            .context("starting the platform")?;
        Ok(Api {
            addr: served.addr,
            _served: served,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn post_json(&self, agent: &ureq::Agent, path: &str, body: Value) -> Result<Value> {
        let reply = agent
            .post(&self.url(path))
            .send_json(body)
            .map_err(|e| http_error(path, e))?;
        reply.into_json().with_context(|| format!("POST {path}"))
    }

    fn invoke(&self, agent: &ureq::Agent, fn_id: &str, body: &str) -> Result<Call> {
        let path = format!("/invoke/{fn_id}");
        let t = Instant::now();
        let reply = agent
            .post(&self.url(&path))
            .send_string(body)
            .map_err(|e| http_error(&path, e))?;
        let host = reply.header("Mitosis-Host").unwrap_or("?").to_owned();
        let body = reply.into_string().context("reading an answer")?;
        Ok(Call {
            latency: t.elapsed(),
            host,
            body: body.trim_end().to_owned(),
        })
    }

    /// The host serving `fn_id`'s seed, as `GET /mitosis/hosts` says.
    fn seed_host(&self, agent: &ureq::Agent, fn_id: &str) -> Option<String> {
        let hosts: Value = agent
            .get(&self.url("/mitosis/hosts"))
            .call()
            .ok()?
            .into_json()
            .ok()?;
        hosts["seeds"]
            .as_array()?
            .iter()
            .find(|s| s["fn_id"] == fn_id)?["seed_host"]
            .as_str()
            .map(str::to_owned)
    }
}

/// An HTTP error with Fn's `message`, if the platform sent one.
fn http_error(path: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, reply) => {
            let text = reply.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            anyhow::anyhow!("POST {path}: {code} {}", message.trim_end())
        }
        e => anyhow::anyhow!("POST {path}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_ignored() {
        let call = Call {
            latency: Duration::ZERO,
            host: "h0".into(),
            body: r#"{"n": 5, "pid": 23235, "sum": -2.5}"#.into(),
        };
        assert!(call.check(&json!({"n": 5, "sum": -2.5})).is_ok());
        assert!(call.check(&json!({"n": 5, "sum": -2.6})).is_err());
    }
}
