//! The mitosis methods, all against one seed process on host 0, children on host 1:
//!
//! - first child: per sample a fresh prepare (a new seed id, nothing recorded anywhere) and one
//!   child: the worst case, building the host's replica with no working set known;
//! - cold host: one handle whose working set was recorded by first children on host 2; per
//!   sample, one child on host 1, which has no replica (it is evicted after each sample);
//! - warm host: children of that handle once host 1 holds its replica;
//! - warm host (CLI): the same through `mitosis resume`, to show what the CLI adds;
//! - with `--tls`, cold host and warm host again on a testbed of their own whose daemons use
//!   mutual TLS (the same seed started there), for the cost of TLS beside the plain rows.
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
    ChildNumbers, MITOSIS_FIRST, MITOSIS_WARM_CLI, Method, SPAWN_FLOOR, SeedResult, Served,
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

    /// CPU time of the seed's host's daemon so far, ns.
    fn seed_host_cpu_ns(&self) -> Option<u64> {
        crate::procs::cpu_ns(self.seed_host.daemon_pid()?)
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
            if self.tally(method, into, &mut served, want.is_some(), || {
                one(&req, want)
            }) {
                break;
            }
        }
        into.served = Some(served);
    }

    /// Makes one child with `one` and records it in `method`, `into` and `served` if it is
    /// `measured`; true once the method gives up.
    pub(crate) fn tally(
        &self,
        method: &mut Method,
        into: &mut ChildNumbers,
        served: &mut Served,
        measured: bool,
        one: impl FnOnce() -> Result<Child, String>,
    ) -> bool {
        method.attempted += usize::from(measured);
        let before = self.bytes_served().filter(|_| measured);
        let cpu_before = self.seed_host_cpu_ns().filter(|_| measured);
        match one() {
            Ok(child) if measured => {
                method.latencies.push(child.latency);
                into.stats.extend(child.stats);
                into.private_kib.extend(child.private_kib);
                let cpu_after = self.seed_host_cpu_ns();
                if let (Some(b), Some(a)) = (before, self.bytes_served()) {
                    served.bytes += a.saturating_sub(b);
                    served.children += 1;
                    if let (Some(b), Some(a)) = (cpu_before, cpu_after) {
                        served.cpu_ns += a.saturating_sub(b);
                    }
                }
                false
            }
            Ok(_) => false,
            Err(err) => method.fail(err),
        }
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

    /// Pages host 1's replica of the seed behind `handle` holds.
    pub fn replica_pages(&self, handle: &str) -> Option<u64> {
        let id = handle_seed_id(handle);
        daemon::status(self.child_hosts[0]).ok().and_then(|s| {
            s.replicas
                .iter()
                .find(|(rid, _)| Some(*rid) == id)
                .map(|r| r.1)
        })
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

    /// The floor under the CLI row: `echo` spawned on host 1 the way `mitosis resume` is,
    /// timed from its spawn to its line.
    pub fn spawn_floor(&self, samples: usize, out: &mut SeedResult) {
        let mut method = Method::new(SPAWN_FLOOR, "spawn floor (echo, as the CLI)");
        let host = self.child_hosts[0];
        for i in 0..self.warmup + samples {
            let mut cmd = host.command("echo");
            cmd.arg("ready");
            let measured = i >= self.warmup;
            method.attempted += usize::from(measured);
            match run_timed(cmd, "") {
                Ok(run) if run.answer == "ready" => {
                    if measured {
                        method.latencies.push(run.latency);
                    }
                }
                Ok(run) => {
                    if method.fail(format!("echo said {:?}", run.answer)) {
                        break;
                    }
                }
                Err(e) => {
                    if method.fail(format!("echo: {e}")) {
                        break;
                    }
                }
            }
        }
        out.methods.push(method);
    }
}

/// A cold-host or warm-host row: the testbed it runs on, the handle of the seed prepared
/// there, and the row's key and label.
#[derive(Clone, Copy)]
pub struct Row<'r, 'a> {
    pub remote: &'r Remote<'a>,
    pub handle: &'r str,
    pub key: &'static str,
    pub label: &'static str,
}

/// Cold host of each row: per sample, one child of its handle on its host 1, which then
/// forgets its replica (evict), so that the next sample again builds one from the recorded
/// working set. The rows take turns child by child, so that a machine whose speed drifts
/// (shared, throttled) weighs on each alike; returns each row with its children's numbers.
pub fn cold_hosts(rows: &[Row], pairs: &[Pair], samples: usize) -> Vec<(Method, ChildNumbers)> {
    in_turn(rows, 0, pairs, samples, |row, req, want| {
        let host = row.remote.child_hosts[0];
        let child = row.remote.child(host, row.handle, req, want);
        // Evicted whatever became of the child, so that no sample finds a replica.
        let evicted = daemon::evict(host, row.handle);
        let child = child?;
        evicted.map_err(|e| format!("host 1: {e:#}"))?;
        Ok(child)
    })
}

/// Warm host of each row: children of its handle on its host 1 after a first child built
/// the replica there; the rows take turns as in [`cold_hosts`].
pub fn warm_hosts(rows: &[Row], pairs: &[Pair], samples: usize) -> Vec<(Method, ChildNumbers)> {
    in_turn(rows, 1, pairs, samples, |row, req, want| {
        row.remote
            .child(row.remote.child_hosts[0], row.handle, req, want)
    })
}

/// The remotes' warm-up plus `extra_warmup` unmeasured, then `samples` measured children of
/// every row, one row after the other for each request.
fn in_turn(
    rows: &[Row],
    extra_warmup: usize,
    pairs: &[Pair],
    samples: usize,
    mut one: impl FnMut(&Row, &str, Option<&str>) -> Result<Child, String>,
) -> Vec<(Method, ChildNumbers)> {
    let mut out: Vec<(Method, ChildNumbers, Served)> = rows
        .iter()
        .map(|r| {
            (
                Method::new(r.key, r.label),
                ChildNumbers::default(),
                Served::default(),
            )
        })
        .collect();
    let warmup = rows.first().map_or(0, |r| r.remote.warmup) + extra_warmup;
    for (req, want) in schedule(warmup, samples, pairs) {
        for (row, (method, numbers, served)) in rows.iter().zip(&mut out) {
            if !method.gave_up {
                let measured = want.is_some();
                row.remote
                    .tally(method, numbers, served, measured, || one(row, &req, want));
            }
        }
        if out.iter().all(|(m, _, _)| m.gave_up) {
            break;
        }
    }
    out.into_iter()
        .map(|(method, mut numbers, served)| {
            numbers.served = Some(served);
            (method, numbers)
        })
        .collect()
}

/// Gives up a method that could not start (its failure recorded).
pub fn gave_up(key: &'static str, label: &'static str, why: String) -> Method {
    let mut method = Method::new(key, label);
    method.failures.push(why);
    method.gave_up = true;
    method
}
