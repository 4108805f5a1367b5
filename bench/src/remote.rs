//! The mitosis methods: cold host, warm host, and children per second.
//!
//! The seed runs on host 0. A *cold host* sample prepares the seed afresh (a new seed id, so
//! host 1 has no replica of it) and resumes one child on host 1: the child's latency includes
//! building the host's replica. *Warm host* samples resume children of one handle on host 1
//! after a first child built the replica there.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mitosis_testbed::Host;

use crate::cli::{Mitosis, ResumeStats, handle_seed_id, parse_resume_stats};
use crate::methods::{Pair, is_right, last_lines, nth, schedule};
use crate::procs::{answer_pid, private_kib, run_probed, run_timed, same_answer};
use crate::results::{
    MAX_FAILURES, MITOSIS_COLD, MITOSIS_WARM, Method, SeedResult, Served, Throughput,
};
use crate::seeds::request;

/// One resumed child that answered right.
struct Child {
    latency: Duration,
    stats: Option<ResumeStats>,
    private_kib: Option<u64>,
}

/// The hosts and the CLI the mitosis methods use.
pub struct Remote<'a> {
    pub mitosis: &'a Mitosis,
    /// Host 0, where the seed runs.
    pub seed_host: &'a Host,
    /// Host 1 (cold and warm samples) and host 2 (only in the throughput run).
    pub child_hosts: [&'a Host; 2],
    pub warmup: usize,
}

impl Remote<'_> {
    /// `mitosis resume HANDLE --stats` on `host` with `req`; the child's private memory is read
    /// after it answered, before its stdin is closed.
    fn child(
        &self,
        host: &Host,
        handle: &str,
        req: &str,
        want: Option<&str>,
    ) -> Result<Child, String> {
        let cmd = self.mitosis.resume(host, handle);
        let probe = |answer: &str| answer_pid(answer).and_then(private_kib);
        let (run, private_kib) =
            run_probed(cmd, req, probe).map_err(|e| format!("{req}: {e:#}"))?;
        if run.status != 0 || !is_right(&run.answer, want) {
            return Err(format!(
                "{req}: status {}, answer {:?} (expected {}), stderr: {}",
                run.status,
                run.answer,
                want.unwrap_or("an answer"),
                last_lines(&run.stderr)
            ));
        }
        Ok(Child {
            latency: run.latency,
            stats: parse_resume_stats(&run.stderr),
            private_kib,
        })
    }

    fn bytes_served(&self) -> Option<u64> {
        self.mitosis
            .status(self.seed_host)
            .ok()
            .and_then(|s| s.bytes_served)
    }

    /// Cold host: per sample, a fresh prepare of the seed (process `pid`) and one child on
    /// host 1; the handle is dropped again after it.
    pub fn cold_host(&self, pid: u32, pairs: &[Pair], samples: usize, out: &mut SeedResult) {
        let mut method = Method::new(MITOSIS_COLD, "mitosis cold host");
        let mut served = Served {
            bytes: 0,
            children: 0,
        };
        let host = self.child_hosts[0];
        for (req, want) in schedule(self.warmup, samples, pairs) {
            let measured = want.is_some();
            method.attempted += usize::from(measured);
            let prepared = match self.mitosis.prepare(self.seed_host, pid) {
                Ok(p) => p,
                Err(err) => {
                    if method.fail(format!("prepare: {err:#}")) {
                        break;
                    }
                    continue;
                }
            };
            let before = self.bytes_served();
            let child = self.child(host, &prepared.handle, &req, want);
            let after = self.bytes_served();
            if let Err(err) = self.mitosis.drop_seed(self.seed_host, &prepared.handle) {
                eprintln!("  warning: {err:#}");
            }
            match child {
                Ok(child) if measured => {
                    method.latencies.push(child.latency);
                    out.cold_stats.extend(child.stats);
                    out.cold_private_kib.extend(child.private_kib);
                    out.prepares.push(prepared);
                    if let (Some(b), Some(a)) = (before, after) {
                        served.bytes += a.saturating_sub(b);
                        served.children += 1;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    if method.fail(err) {
                        break;
                    }
                }
            }
        }
        out.served_cold = Some(served);
        out.methods.push(method);
    }

    /// Warm host: prepares the seed once, builds host 1's replica with a first child, then
    /// times `samples` children. Returns the handle (still prepared) for the throughput run.
    pub fn warm_host(
        &self,
        pid: u32,
        pairs: &[Pair],
        samples: usize,
        out: &mut SeedResult,
    ) -> Option<String> {
        let mut method = Method::new(MITOSIS_WARM, "mitosis warm host");
        let prepared = match self.mitosis.prepare(self.seed_host, pid) {
            Ok(p) => p,
            Err(err) => {
                method.fail(format!("prepare: {err:#}"));
                method.gave_up = true;
                out.methods.push(method);
                return None;
            }
        };
        let handle = prepared.handle;
        let host = self.child_hosts[0];
        // The first child builds the replica; `warmup` more run on it unmeasured.
        for (req, want) in schedule(self.warmup + 1, 0, pairs) {
            if let Err(err) = self.child(host, &handle, &req, want) {
                method.fail(format!("warm-up child: {err}"));
            }
        }
        let before = self.bytes_served();
        for i in 0..samples {
            if method.gave_up {
                break;
            }
            method.attempted += 1;
            let (req, want) = nth(pairs, i);
            match self.child(host, &handle, req, Some(want)) {
                Ok(child) => {
                    method.latencies.push(child.latency);
                    out.warm_stats.extend(child.stats);
                    out.warm_private_kib.extend(child.private_kib);
                }
                Err(err) => {
                    method.fail(err);
                }
            }
        }
        if let (Some(b), Some(a)) = (before, self.bytes_served()) {
            out.served_warm = Some(Served {
                bytes: a.saturating_sub(b),
                children: method.latencies.len(),
            });
        }
        let id = handle_seed_id(&handle);
        out.replica_pages = self.mitosis.status(host).ok().and_then(|s| {
            s.replicas
                .iter()
                .find(|(rid, _)| Some(*rid) == id)
                .map(|r| r.1)
        });
        out.methods.push(method);
        Some(handle)
    }

    /// Children per second: `concurrency` loops of `mitosis resume HANDLE`, split across hosts
    /// 1 and 2, for `secs` (host 2's replica is built first, unmeasured).
    pub fn throughput(
        &self,
        handle: &str,
        pairs: &[Pair],
        concurrency: usize,
        secs: f64,
    ) -> Throughput {
        let mut result = Throughput {
            concurrency,
            hosts: self.child_hosts.len(),
            ..Throughput::default()
        };
        for host in self.child_hosts {
            if let Err(err) = self.child(host, handle, &request(1000), None) {
                result.failures.push(format!("warm-up child: {err}"));
            }
        }
        if result.failures.len() == self.child_hosts.len() {
            return result;
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let collected = Mutex::new((Vec::new(), Vec::new()));
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(secs);
        std::thread::scope(|scope| {
            for worker in 0..concurrency {
                let host = self.child_hosts[worker % self.child_hosts.len()];
                let (next, failed, collected) = (&next, &failed, &collected);
                scope.spawn(move || {
                    while Instant::now() < deadline && failed.load(Ordering::Relaxed) < MAX_FAILURES
                    {
                        let (req, want) = nth(pairs, next.fetch_add(1, Ordering::Relaxed));
                        let cmd = self.mitosis.resume(host, handle);
                        let outcome = match run_timed(cmd, req) {
                            Ok(run) if run.status == 0 && same_answer(&run.answer, want) => {
                                Ok(run.latency)
                            }
                            Ok(run) => Err(format!(
                                "host {}: {req}: status {}, answer {:?}, stderr: {}",
                                host.index(),
                                run.status,
                                run.answer,
                                last_lines(&run.stderr)
                            )),
                            Err(err) => Err(format!("host {}: {req}: {err:#}", host.index())),
                        };
                        let mut lists = collected.lock().expect("lock");
                        match outcome {
                            Ok(latency) => lists.0.push(latency),
                            Err(err) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                lists.1.push(err);
                            }
                        }
                    }
                });
            }
        });
        result.elapsed = t0.elapsed();
        let (latencies, failures) = collected.into_inner().expect("lock");
        result.children = latencies.len();
        result.latencies = latencies;
        result.failures.extend(failures);
        result
    }
}
