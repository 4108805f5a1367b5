//! One policy's run: deploy the function with the policy's annotation, warm it up, replay the
//! arrivals open loop (a thread per call, sent at its time whatever the earlier calls do),
//! sample memory meanwhile, then delete the function and wait until its processes are gone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Value, json};

use super::memory::{Daemon, Sample, Sampler};

/// One invocation as the caller saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    /// When it was due, seconds from the replay's start.
    pub at: f64,
    /// How late the sender was (scheduling on a loaded machine), ms.
    pub late_ms: f64,
    /// Request to answer, ms.
    pub latency_ms: f64,
    /// HTTP status (0: no answer).
    pub status: u16,
    /// `Mitosis-Start`: fork, cold or warm.
    pub start: String,
    pub host: String,
    /// What went wrong, for a failed call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Call {
    /// Answered, and with the right answer.
    pub fn ok(&self) -> bool {
        self.status == 200 && self.error.is_none()
    }
}

/// What one policy's run gave.
pub struct PolicyRun {
    pub policy: String,
    /// Which repetition of the policies (0-based).
    pub round: usize,
    pub calls: Vec<Call>,
    pub samples: Vec<Sample>,
    /// Processes the platform started cold from the bundle during the replay (its
    /// `cold_starts_total`), whether or not a call was answered by them.
    pub cold_started: usize,
    /// Seconds from the replay's start to the last answer.
    pub secs: f64,
    /// The machine's 1-minute load average when the replay started (other work on it
    /// shows here: the policies share two cores with whatever else runs).
    pub loadavg: f64,
}

/// The 1-minute load average (0 if unreadable).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The function every policy runs.
pub struct Function<'a> {
    pub bundle: &'a Path,
    pub memory_mib: u32,
    pub timeout_s: u32,
    pub idle_timeout_s: u32,
    pub request: &'a str,
}

pub struct Runner<'a> {
    pub api: SocketAddr,
    pub app_id: String,
    pub daemons: Vec<Daemon>,
    pub sample_every: Duration,
    pub warmup_calls: usize,
    pub function: Function<'a>,
    /// The right answer to the request (the function's output without its `pid`): the
    /// first answer any policy gave, which every later one must equal.
    pub expected: Mutex<Option<Value>>,
}

impl Runner<'_> {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    fn agent(&self) -> ureq::Agent {
        let timeout = Duration::from_secs(u64::from(self.function.timeout_s) + 30);
        ureq::AgentBuilder::new().timeout(timeout).build()
    }

    /// Creates the app every function goes in.
    pub fn create_app(api: SocketAddr, name: &str) -> Result<String> {
        let reply: Value = ureq::post(&format!("http://{api}/v2/apps"))
            .send_json(json!({ "name": name }))
            .context("creating the app")?
            .into_json()?;
        reply["id"]
            .as_str()
            .map(str::to_owned)
            .context("an app without an id")
    }

    /// Replays `arrivals` (a load `secs` long) against a new function of `policy`.
    pub fn run(&self, policy: &str, arrivals: &[Duration], secs: f64) -> Result<PolicyRun> {
        let agent = self.agent();
        let f = &self.function;
        let body = json!({
            "name": format!("spike-{policy}"), "app_id": self.app_id, "image": f.bundle,
            "memory": f.memory_mib, "timeout": f.timeout_s, "idle_timeout": f.idle_timeout_s,
            "annotations": {"mitosis.io/policy": policy},
        });
        let created: Value = agent
            .post(&self.url("/v2/fns"))
            .send_json(body)
            .map_err(|e| anyhow::anyhow!("creating the {policy} function: {e}"))?
            .into_json()?;
        let fn_id = created["id"]
            .as_str()
            .context("a function without an id")?
            .to_owned();
        let result = self.replay(policy, &fn_id, arrivals, secs);
        // Its seeds and instances end with it; the next policy starts from nothing.
        let _ = agent.delete(&self.url(&format!("/v2/fns/{fn_id}"))).call();
        self.wait_idle(Duration::from_secs(120));
        result
    }

    fn replay(
        &self,
        policy: &str,
        fn_id: &str,
        arrivals: &[Duration],
        load_secs: f64,
    ) -> Result<PolicyRun> {
        let path = format!("/invoke/{fn_id}");
        let url = self.url(&path);
        let expected = Arc::new(Mutex::new(
            self.expected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        ));
        // Unmeasured: waits for the seed(s) where there are some.
        for i in 0..self.warmup_calls {
            let c = call(
                &self.agent(),
                &url,
                self.function.request,
                0.0,
                Instant::now(),
                &expected,
            );
            anyhow::ensure!(
                c.ok(),
                "{policy}: warm-up call {i} failed: {} {}",
                c.status,
                c.error.unwrap_or_default()
            );
        }
        let cold_before = self.cold_starts(fn_id)?;
        let load = loadavg();
        let start = Instant::now();
        let sampler = Sampler::start(self.daemons.clone(), self.sample_every, start);
        let calls = Arc::new(Mutex::new(Vec::with_capacity(arrivals.len())));
        let mut threads = Vec::with_capacity(arrivals.len());
        for &at in arrivals {
            // In short steps, to stop sending soon after a signal.
            while let Some(wait) = (start + at).checked_duration_since(Instant::now()) {
                if super::interrupt::stopped() {
                    break;
                }
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
            if super::interrupt::stopped() {
                break;
            }
            let (agent, url, sink) = (self.agent(), url.clone(), calls.clone());
            let request = self.function.request.to_owned();
            let expected = expected.clone();
            let due = at.as_secs_f64();
            let spawned = std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let c = call(&agent, &url, &request, due, start, &expected);
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => calls.lock().unwrap_or_else(|e| e.into_inner()).push(failed(
                    due,
                    start,
                    format!("no thread for the call: {e}"),
                )),
            }
        }
        for t in threads {
            let _ = t.join();
        }
        let secs = start.elapsed().as_secs_f64();
        // The idle tail of the load is part of the run even when the answers came early.
        if secs < load_secs && !super::interrupt::stopped() {
            std::thread::sleep(Duration::from_secs_f64(load_secs - secs));
        }
        let samples = sampler.stop();
        let cold_started = self.cold_starts(fn_id)?.saturating_sub(cold_before);
        *self.expected.lock().unwrap_or_else(|e| e.into_inner()) =
            expected.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut calls = std::mem::take(&mut *calls.lock().unwrap_or_else(|e| e.into_inner()));
        calls.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ok(PolicyRun {
            policy: policy.to_owned(),
            round: 0,
            calls,
            samples,
            cold_started,
            secs,
            loadavg: load,
        })
    }

    /// The platform's count of processes started cold for `fn_id` (`GET /metrics`).
    fn cold_starts(&self, fn_id: &str) -> Result<usize> {
        let text = self
            .agent()
            .get(&self.url("/metrics"))
            .call()
            .context("reading the platform's metrics")?
            .into_string()?;
        Ok(counter(&text, "mitosis_platform_cold_starts_total", fn_id))
    }

    /// Until no host runs a seed or a child, and no process but the daemons' idle stubs is
    /// left (or `limit`).
    fn wait_idle(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let busy = self.daemons.iter().any(|d| {
                mitosis_client::Client::connect(&d.socket)
                    .and_then(|c| c.status())
                    .map_or(true, |s| s.children_running > 0 || !s.seeds.is_empty())
            });
            let roots: Vec<u32> = self.daemons.iter().map(|d| d.pid).collect();
            let left = super::memory::function_processes(&roots)
                .into_iter()
                .filter(|(_, name)| name != super::memory::STUB)
                .count();
            if !busy && left == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The next policy's memory then includes what is left of this one's.
        eprintln!("  still running after {limit:?}: the next run's memory counts it too");
    }
}

fn failed(at: f64, start: Instant, error: String) -> Call {
    Call {
        at,
        late_ms: (start.elapsed().as_secs_f64() - at).max(0.0) * 1e3,
        latency_ms: 0.0,
        status: 0,
        start: String::new(),
        host: String::new(),
        error: Some(error),
    }
}

/// The value of counter `name` in OpenMetrics `text` for the series labelled `fn_id` (0 if
/// it has none yet).
pub fn counter(text: &str, name: &str, fn_id: &str) -> usize {
    let label = format!("fn_id=\"{fn_id}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as usize)
        .sum()
}

/// Why `output` is not the expected answer (`None`: it is). The first answer seen becomes
/// the expected one. The function's `pid` differs from call to call and is left out.
fn check_answer(output: &str, expected: &Mutex<Option<Value>>) -> Option<String> {
    let Ok(Value::Object(mut got)) = serde_json::from_str::<Value>(output.trim()) else {
        return Some(format!("not a JSON object: {:.200}", output.trim()));
    };
    got.remove("pid");
    let got = Value::Object(got);
    let mut expected = expected.lock().unwrap_or_else(|e| e.into_inner());
    match &*expected {
        None => {
            *expected = Some(got);
            None
        }
        Some(want) if *want == got => None,
        Some(want) => Some(format!("wrong answer: {got} (expected {want})")),
    }
}

/// One invocation, timed from its request to its answer, and its answer checked.
fn call(
    agent: &ureq::Agent,
    url: &str,
    request: &str,
    at: f64,
    start: Instant,
    expected: &Mutex<Option<Value>>,
) -> Call {
    let late_ms = (start.elapsed().as_secs_f64() - at).max(0.0) * 1e3;
    let t = Instant::now();
    let reply = agent.post(url).send_string(request);
    let (status, start_kind, host, error) = match reply {
        Ok(r) => {
            let start_kind = r.header("Mitosis-Start").unwrap_or("").to_owned();
            let host = r.header("Mitosis-Host").unwrap_or("").to_owned();
            match r.into_string() {
                Ok(output) => (200, start_kind, host, check_answer(&output, expected)),
                Err(e) => (
                    0,
                    start_kind,
                    host,
                    Some(format!("reading the answer: {e}")),
                ),
            }
        }
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            (code, String::new(), String::new(), Some(text))
        }
        Err(e) => (0, String::new(), String::new(), Some(e.to_string())),
    };
    Call {
        at,
        late_ms,
        latency_ms: t.elapsed().as_secs_f64() * 1e3,
        status,
        start: start_kind,
        host,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_sums_the_function_series_only() {
        let text = "# TYPE mitosis_platform_cold_starts counter\n\
            mitosis_platform_cold_starts_total{fn_id=\"A\",fn_name=\"f\",policy=\"fn-cache\"} 3\n\
            mitosis_platform_cold_starts_total{fn_id=\"B\",fn_name=\"g\",policy=\"cold\"} 5\n\
            mitosis_platform_cold_starts_created{fn_id=\"A\"} 17.5\n";
        assert_eq!(counter(text, "mitosis_platform_cold_starts_total", "A"), 3);
        assert_eq!(counter(text, "mitosis_platform_cold_starts_total", "B"), 5);
        assert_eq!(counter(text, "mitosis_platform_cold_starts_total", "C"), 0);
    }

    #[test]
    fn answers_are_checked_against_the_first_without_their_pid() {
        let expected = Mutex::new(None);
        assert_eq!(
            check_answer(r#"{"n": 3, "sum": 7, "pid": 1}"#, &expected),
            None
        );
        assert_eq!(
            check_answer(r#"{"n": 3, "sum": 7, "pid": 2}"#, &expected),
            None
        );
        let wrong = check_answer(r#"{"n": 3, "sum": 8, "pid": 3}"#, &expected);
        assert!(wrong.is_some_and(|w| w.starts_with("wrong answer")));
        assert!(check_answer("Traceback", &expected).is_some());
    }
}
