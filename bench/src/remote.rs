//! The mitosis methods, all against one seed process on host 0, children on host 1:
//!
//! - first child: per sample a fresh prepare (a new seed id, nothing recorded anywhere) and one
//!   child: the worst case, building the host's replica with no working set known;
//! - cold host: one handle whose working set was recorded by first children on host 2; per
//!   sample, one child on host 1, which has no replica (it is evicted after each sample);
//! - warm host: children of that handle once host 1 holds its replica;
//! - warm host (CLI): the same through `mitosis resume`, to show what the CLI adds.
//!
//! All but the CLI row start children in this process with `mitosis-client` (see child.rs).

use std::time::Duration;

use mitosis_testbed::Host;

use crate::child::run_child;
use crate::cli::Mitosis;
use crate::daemon::{self, ChildStats, Origin, handle_seed_id};
use crate::methods::{Pair, is_right, last_lines, schedule};
use crate::procs::{private_kib, run_timed};
use crate::results::{
    ChildNumbers, MITOSIS_COLD, MITOSIS_FIRST, MITOSIS_WARM, MITOSIS_WARM_CLI, Method, SeedResult,
    Served,
};

/// Children that record a seed's working set before the cold-host row. The set holds only
/// pages children faulted on, not the neighbours fetched with them: a child whose replica has
/// more of the set faults on the neighbours it does use, so the set takes a few hosts' first
/// children to settle.
const RECORDING_CHILDREN: usize = 4;

/// One resumed child that answered right and exited 0.
pub struct Child {
    pub latency: Duration,
    pub stats: Option<ChildStats>,
    pub private_kib: Option<u64>,
}

/// The hosts and the CLI the mitosis methods use.
pub struct Remote<'a> {
    pub mitosis: &'a Mitosis,
    /// Host 0, where the seed runs.
    pub seed_host: &'a Host,
    /// Host 1 (every measured row) and host 2 (recording the working set; throughput).
    pub child_hosts: [&'a Host; 2],
    pub warmup: usize,
}

impl Remote<'_> {
    /// A child of `handle` on `host` with `req`, started in this process; its private memory
    /// is read after it answered, before its stdin is closed.
    pub fn child(
        &self,
        host: &Host,
        handle: &str,
        req: &str,
        want: Option<&str>,
    ) -> Result<Child, String> {
        self.resume_one(host, handle, req, want, true)
    }

    /// [`Remote::child`], reading the child's private memory only if `memory`.
    pub fn resume_one(
        &self,
        host: &Host,
        handle: &str,
        req: &str,
        want: Option<&str>,
        memory: bool,
    ) -> Result<Child, String> {
        let probe = |_: &str, pid| memory.then(|| private_kib(pid)).flatten();
        let (run, private_kib) = run_child(host, handle, req, probe)
            .map_err(|e| format!("host {}: {req}: {e:#}", host.index()))?;
        if run.status != 0 || !is_right(&run.answer, want) {
            return Err(format!(
                "host {}: {req}: status {}{}, answer {:?} (expected {}), stderr: {}",
                host.index(),
                run.status,
                run.reason.map(|r| format!(" ({r})")).unwrap_or_default(),
                run.answer,
                want.unwrap_or("an answer"),
                last_lines(&run.stderr)
            ));
        }
        Ok(Child {
            latency: run.latency,
            stats: Some(run.stats),
            private_kib,
        })
    }

    /// The same through `mitosis resume HANDLE` (timed from its spawn).
    fn child_cli(
        &self,
        host: &Host,
        handle: &str,
        req: &str,
        want: Option<&str>,
    ) -> Result<Child, String> {
        let run = run_timed(self.mitosis.resume(host, handle), req)
            .map_err(|e| format!("{req}: {e:#}"))?;
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
            stats: None,
            private_kib: None,
        })
    }

    fn bytes_served(&self) -> Option<u64> {
        daemon::status(self.seed_host).ok()?.bytes_served
    }

    /// `warmup` unmeasured then `samples` measured children, each made by `one`; the measured
    /// ones go to `method` and `into`, with the bytes the seed's host served for them.
    fn sample(
        &self,
        method: &mut Method,
        into: &mut ChildNumbers,
        (warmup, samples): (usize, usize),
        pairs: &[Pair],
        mut one: impl FnMut(&str, Option<&str>) -> Result<Child, String>,
    ) {
        let mut served = Served::default();
        for (req, want) in schedule(warmup, samples, pairs) {
            let measured = want.is_some();
            method.attempted += usize::from(measured);
            let before = self.bytes_served().filter(|_| measured);
            let child = one(&req, want);
            match child {
                Ok(child) if measured => {
                    method.latencies.push(child.latency);
                    into.stats.extend(child.stats);
                    into.private_kib.extend(child.private_kib);
                    if let (Some(b), Some(a)) = (before, self.bytes_served()) {
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
        into.served = Some(served);
    }

    /// First child: per sample, a fresh prepare of the seed and one child on host 1; the
    /// handle is dropped again after it.
    pub fn first_child(
        &self,
        origin: Origin,
        pairs: &[Pair],
        samples: usize,
        out: &mut SeedResult,
    ) {
        let mut method = Method::new(MITOSIS_FIRST, "mitosis first child");
        let host = self.child_hosts[0];
        let prepares = &mut out.prepares;
        let one = |req: &str, want: Option<&str>| {
            let prepared =
                daemon::prepare(self.seed_host, origin).map_err(|e| format!("prepare: {e:#}"))?;
            let child = self.child(host, &prepared.handle, req, want);
            if let Err(err) = daemon::drop_seed(self.seed_host, &prepared.handle) {
                eprintln!("  warning: {err:#}");
            }
            if child.is_ok() && want.is_some() {
                prepares.push(prepared);
            }
            child
        };
        self.sample(
            &mut method,
            &mut out.first,
            (self.warmup, samples),
            pairs,
            one,
        );
        out.methods.push(method);
    }

    /// Prepares the seed for the other rows and records its working set with the first
    /// [`RECORDING_CHILDREN`] children on host 2, each on a fresh replica (as the seed's first
    /// few hosts would); returns the handle.
    pub fn prepare_recorded(&self, origin: Origin) -> Result<String, String> {
        let prepared =
            daemon::prepare(self.seed_host, origin).map_err(|e| format!("prepare: {e:#}"))?;
        let host = self.child_hosts[1];
        for i in 0..RECORDING_CHILDREN {
            if i > 0 {
                daemon::evict(host, &prepared.handle).map_err(|e| format!("host 2: {e:#}"))?;
            }
            self.child(host, &prepared.handle, r#"{"n": 999}"#, None)
                .map_err(|e| format!("child {} on host 2: {e}", i + 1))?;
        }
        Ok(prepared.handle)
    }

    /// Cold host: per sample, one child of `handle` on host 1, which then forgets its replica
    /// (evict), so that the next sample again builds one from the recorded working set.
    pub fn cold_host(&self, handle: &str, pairs: &[Pair], samples: usize, out: &mut SeedResult) {
        let mut method = Method::new(MITOSIS_COLD, "mitosis cold host");
        let host = self.child_hosts[0];
        let one = |req: &str, want: Option<&str>| {
            let child = self.child(host, handle, req, want);
            // Evicted whatever became of the child, so that no sample finds a replica.
            let evicted = daemon::evict(host, handle);
            let child = child?;
            evicted.map_err(|e| format!("host 1: {e:#}"))?;
            Ok(child)
        };
        self.sample(
            &mut method,
            &mut out.cold,
            (self.warmup, samples),
            pairs,
            one,
        );
        out.methods.push(method);
    }

    /// Warm host: children of `handle` on host 1 after a first child built the replica there.
    pub fn warm_host(&self, handle: &str, pairs: &[Pair], samples: usize, out: &mut SeedResult) {
        let mut method = Method::new(MITOSIS_WARM, "mitosis warm host");
        let host = self.child_hosts[0];
        let one = |req: &str, want: Option<&str>| self.child(host, handle, req, want);
        self.sample(
            &mut method,
            &mut out.warm,
            (self.warmup + 1, samples),
            pairs,
            one,
        );
        let id = handle_seed_id(handle);
        out.replica_pages = daemon::status(host).ok().and_then(|s| {
            s.replicas
                .iter()
                .find(|(rid, _)| Some(*rid) == id)
                .map(|r| r.1)
        });
        out.methods.push(method);
    }

    /// Warm host through the CLI: `mitosis resume HANDLE` on host 1, timed from its spawn.
    pub fn warm_host_cli(
        &self,
        handle: &str,
        pairs: &[Pair],
        samples: usize,
        out: &mut SeedResult,
    ) {
        let mut method = Method::new(MITOSIS_WARM_CLI, "mitosis warm host (CLI)");
        let host = self.child_hosts[0];
        let one = |req: &str, want: Option<&str>| self.child_cli(host, handle, req, want);
        let mut unused = ChildNumbers::default();
        self.sample(&mut method, &mut unused, (self.warmup, samples), pairs, one);
        out.methods.push(method);
    }
}

/// Gives up a method that could not start (its failure recorded).
pub fn gave_up(key: &'static str, label: &'static str, why: String) -> Method {
    let mut method = Method::new(key, label);
    method.failures.push(why);
    method.gave_up = true;
    method
}
