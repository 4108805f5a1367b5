//! Many seeds at once: prepares, and first children on a host that has none of their
//! replicas, one after the other and then all at once. Each seed and each replica has a tracer
//! thread of its own, so at once they should take about the sequential time divided by the
//! cores, not the sequential time (one tracer for the host serialized them all).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::daemon::{self, Origin};
use crate::procs::Server;
use crate::remote::Remote;
use crate::seeds::{self, Seed};

/// Wall time of `n` jobs one after the other and all at once.
#[derive(Debug, Clone, Copy)]
pub struct SeqVsAtOnce {
    pub sequential: Duration,
    pub at_once: Duration,
}

impl SeqVsAtOnce {
    pub fn speedup(&self) -> f64 {
        self.sequential.as_secs_f64() / self.at_once.as_secs_f64().max(1e-9)
    }
}

/// What the many-seeds run measured.
#[derive(Debug, Clone, Copy)]
pub struct Many {
    pub seeds: usize,
    pub prepare: SeqVsAtOnce,
    pub first_child: SeqVsAtOnce,
}

/// Runs `jobs` one after the other, then (after `between`) all at once on threads of their
/// own; the wall time of each way.
fn both_ways<T: Send>(
    jobs: usize,
    job: impl Fn(usize) -> Result<T> + Sync,
    between: impl Fn(Vec<T>) -> Result<()>,
) -> Result<(SeqVsAtOnce, Vec<T>)> {
    let t = Instant::now();
    let first: Vec<T> = (0..jobs).map(&job).collect::<Result<_>>()?;
    let sequential = t.elapsed();
    between(first)?;
    let t = Instant::now();
    let second: Vec<T> = std::thread::scope(|s| {
        let job = &job;
        let running: Vec<_> = (0..jobs).map(|i| s.spawn(move || job(i))).collect();
        running
            .into_iter()
            .map(|r| r.join().expect("a job thread"))
            .collect::<Result<_>>()
    })?;
    Ok((
        SeqVsAtOnce {
            sequential,
            at_once: t.elapsed(),
        },
        second,
    ))
}

/// `n` seeds of `seed` (a process seed) on the seed host, prepared and first-childed on
/// host 1 both ways.
pub fn run(seed: &Seed, remote: &Remote, n: usize) -> Result<Many> {
    anyhow::ensure!(
        seed.bundle.is_none(),
        "the many-seeds run needs a process seed, not {}",
        seed.name
    );
    let seed_host = remote.seed_host;
    let host1 = remote.child_hosts[0];
    let servers: Vec<Server> = (0..n)
        .map(|_| Server::start(seed.command(seed_host, &[])).context("starting a seed"))
        .collect::<Result<_>>()?;
    // Seeds are named by pid: the servers (not shareable across threads) stay here.
    let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
    let prepare = |i: usize| -> Result<String> {
        Ok(daemon::prepare(seed_host, Origin::Process(pids[i]))?.handle)
    };
    let drop_all = |handles: Vec<String>| -> Result<()> {
        handles
            .iter()
            .try_for_each(|h| daemon::drop_seed(seed_host, h))
    };
    let (prepare, handles) = both_ways(n, prepare, drop_all)?;
    let request = seeds::request(1);
    let first_child = |i: usize| -> Result<Duration> {
        remote
            .resume_one(host1, &handles[i], &request, None, false)
            .map(|c| c.latency)
            .map_err(anyhow::Error::msg)
    };
    // Between the two ways host 1 forgets every replica: each first child builds one.
    let evict_all = |_: Vec<Duration>| -> Result<()> {
        handles.iter().try_for_each(|h| daemon::evict(host1, h))
    };
    let (first_child, _) = both_ways(n, first_child, evict_all)?;
    for h in &handles {
        let _ = daemon::evict(host1, h);
        let _ = daemon::drop_seed(seed_host, h);
    }
    drop(servers);
    Ok(Many {
        seeds: n,
        prepare,
        first_child,
    })
}

/// The report's lines.
pub fn report(seed: &str, m: &Many) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "{} {seed} seeds at once (wall time of all; cores: {})",
        m.seeds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (what, w) in [
        ("prepare", m.prepare),
        ("first child on a new host", m.first_child),
    ] {
        println!(
            "  {what:<28} at once {:>8.1} ms   one after the other {:>8.1} ms   speedup {:.2}x",
            ms(w.at_once),
            ms(w.sequential),
            w.speedup()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_runs_every_job_twice_and_times_each_way() {
        let ran = std::sync::atomic::AtomicUsize::new(0);
        let (times, second) = both_ways(
            4,
            |i| {
                ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
                Ok(i)
            },
            |first| {
                assert_eq!(first, vec![0, 1, 2, 3]);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(second, vec![0, 1, 2, 3]);
        assert_eq!(ran.load(std::sync::atomic::Ordering::Relaxed), 8);
        // Sleeping jobs overlap whatever the cores.
        assert!(times.sequential >= Duration::from_millis(80));
        assert!(times.speedup() > 1.5, "{times:?}");
    }
}
