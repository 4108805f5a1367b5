//! Children per second: threads of this process, each looping resume -> answer -> exit with
//! the in-process client, split across hosts 1 and 2. Only right answers with exit 0 count.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::methods::{Pair, nth};
use crate::remote::Remote;
use crate::results::{MAX_FAILURES, Throughput};
use crate::seeds::request;

impl Remote<'_> {
    /// `concurrency` loops of children of `handle` for `secs` (a first child on each host
    /// first, unmeasured, so both hold the replica).
    pub fn throughput(
        &self,
        handle: &str,
        pairs: &[Pair],
        concurrency: usize,
        secs: f64,
    ) -> Throughput {
        let mut result = Throughput::new(concurrency, self.child_hosts.len());
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
                        let outcome = self.resume_one(host, handle, req, Some(want), false);
                        let mut lists = collected.lock().expect("lock");
                        match outcome {
                            Ok(child) => lists.0.push(child.latency),
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
