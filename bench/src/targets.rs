//! The targets of the issue under work, per seed, and whether each is met:
//!
//! - a seed's first child (nothing recorded yet) in at most 10 ms; beside it, the floor that
//!   stops it: a cold host, whose working set was recorded (what a perfect guess would give);
//! - a child on a cold host (replica built from the recorded working set) in at most 3 ms (the
//!   1 GiB bigheap seed: 10 ms); beside it, the floor under it: moving the bytes such a child
//!   received over TCP between the same hosts, and nothing else (transfer.rs);
//! - a child on a warm host in at most 1.3x a local fork;
//! - prepare in at most 2 ms, both as the time the seed is stopped and as the daemon's time;
//! - at least 1000 children/s;
//! - a child on a new (cold) host at least 15x faster than CRIU's lazy migration to a new host;
//! - a child on a warm host through the CLI within 0.5 ms of a local fork (beside it, the
//!   floor under any command: spawning `echo` the same way);
//! - for a containerized seed, containerizing a child (taking its container from the pool and
//!   joining it) well under a millisecond: at most 0.5 ms.

use serde::Serialize;

use crate::results::{
    LOCAL_FORK, MITOSIS_COLD, MITOSIS_FIRST, MITOSIS_FIRST_PROFILE, MITOSIS_WARM, MITOSIS_WARM_CLI,
    SPAWN_FLOOR, SeedResult, TRANSFER_FLOOR,
};

/// One target and what was measured against it (also its form in the results file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub key: &'static str,
    /// What is measured, e.g. "cold host median".
    pub what: &'static str,
    /// The bound, e.g. "<= 3 ms".
    pub goal: &'static str,
    pub value: Option<f64>,
    pub unit: &'static str,
    /// `None` when nothing was measured.
    pub met: Option<bool>,
}

fn at_most(value: Option<f64>, bound: f64) -> Option<bool> {
    value.map(|v| v <= bound)
}

/// The targets for one seed's results.
pub fn of(r: &SeedResult) -> Vec<Target> {
    let median_ms = |key| {
        r.method(key)
            .and_then(|m| m.median())
            .map(|d| d.as_secs_f64() * 1e3)
    };
    let cold = median_ms(MITOSIS_COLD);
    let first = median_ms(MITOSIS_FIRST);
    let first_profile = median_ms(MITOSIS_FIRST_PROFILE);
    let transfer = median_ms(TRANSFER_FLOOR);
    // The 1 GiB seed's new host has a bound of its own.
    let (cold_goal, cold_bound) = match r.name {
        "bigheap" => ("<= 10 ms", 10.0),
        _ => ("<= 3 ms", 3.0),
    };
    let warm = r.vs_local(MITOSIS_WARM).filter(|x| x.is_finite());
    let (daemon_us, stopped_us) = r.prepare_medians_us();
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1e3);
    let (daemon, stopped) = (ms(daemon_us), ms(stopped_us));
    let per_sec = r.throughput.as_ref().map(|t| t.per_sec());
    let vs_criu = r.criu_lazy_vs_cold();
    let cli_over_fork = median_ms(MITOSIS_WARM_CLI)
        .zip(median_ms(LOCAL_FORK))
        .map(|(cli, fork)| cli - fork);
    let spawn_floor = median_ms(SPAWN_FLOOR);
    let mut targets = vec![
        Target {
            key: "first_child_ms",
            what: "first child median",
            goal: "<= 10 ms",
            value: first,
            unit: "ms",
            met: at_most(first, 10.0),
        },
        Target {
            key: "first_child_profile_ms",
            what: "  a program seen before (--profile)",
            goal: "<= 10 ms",
            value: first_profile,
            unit: "ms",
            met: at_most(first_profile, 10.0),
        },
        Target {
            key: "first_child_floor_ms",
            what: "  floor: a cold host (working set known)",
            goal: "(floor)",
            value: cold,
            unit: "ms",
            met: None,
        },
        Target {
            key: "cold_host_ms",
            what: "cold host median",
            goal: cold_goal,
            value: cold,
            unit: "ms",
            met: at_most(cold, cold_bound),
        },
        Target {
            key: "cold_host_floor_ms",
            what: "  floor: its bootstrap over TCP",
            goal: "(floor)",
            value: transfer,
            unit: "ms",
            met: None,
        },
        Target {
            key: "warm_host_vs_local_fork",
            what: "warm host median / local fork median",
            goal: "<= 1.3x",
            value: warm,
            unit: "x",
            met: at_most(warm, 1.3),
        },
        Target {
            key: "prepare_seed_stopped_ms",
            what: "prepare: seed stopped (median)",
            goal: "<= 2 ms",
            value: stopped,
            unit: "ms",
            met: at_most(stopped, 2.0),
        },
        Target {
            key: "prepare_daemon_ms",
            what: "prepare: time in the daemon (median)",
            goal: "<= 2 ms",
            value: daemon,
            unit: "ms",
            met: at_most(daemon, 2.0),
        },
        Target {
            key: "children_per_sec",
            what: "children/s (concurrent resumes)",
            goal: ">= 1000",
            value: per_sec,
            unit: "/s",
            met: per_sec.map(|v| v >= 1000.0),
        },
        Target {
            key: "criu_lazy_vs_cold_host",
            what: "CRIU lazy migration / mitosis new host",
            goal: ">= 15x",
            value: vs_criu,
            unit: "x",
            met: vs_criu.map(|v| v >= 15.0),
        },
        Target {
            key: "cli_over_local_fork_ms",
            what: "warm host (CLI) - local fork",
            goal: "<= 0.5 ms",
            value: cli_over_fork,
            unit: "ms",
            met: at_most(cli_over_fork, 0.5),
        },
        Target {
            key: "spawn_floor_ms",
            what: "  floor: spawning echo as the CLI",
            goal: "(floor)",
            value: spawn_floor,
            unit: "ms",
            met: None,
        },
    ];
    if let Some((_, _, both)) = r.containerizing_us() {
        let value = Some(both as f64 / 1e3);
        targets.push(Target {
            key: "containerizing_ms",
            what: "containerizing a child (take + join)",
            goal: "<= 0.5 ms",
            value,
            unit: "ms",
            met: at_most(value, 0.5),
        });
    }
    targets
}

impl Target {
    /// `met`, `MISSED` or `-` (not measured).
    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        }
    }

    /// The value with its unit, or `-`.
    pub fn shown(&self) -> String {
        match (self.value, self.unit) {
            (None, _) => "-".to_owned(),
            (Some(v), "x") => format!("{v:.2}x"),
            (Some(v), "/s") => format!("{v:.0}/s"),
            (Some(v), unit) => format!("{v:.2} {unit}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{CRIU_LAZY, Method, Throughput};
    use std::time::Duration;

    fn get<'t>(t: &'t [Target], key: &str) -> &'t Target {
        t.iter().find(|t| t.key == key).expect(key)
    }

    fn method(key: &'static str, ms: u64) -> Method {
        let mut m = Method::new(key, key);
        m.latencies.push(Duration::from_millis(ms));
        m
    }

    #[test]
    fn verdicts() {
        let mut r = SeedResult::new("hello", "test");
        let none = of(&r);
        assert!(none.iter().all(|t| t.met.is_none() && t.verdict() == "-"));
        r.methods.push(method(LOCAL_FORK, 2));
        r.methods.push(method(MITOSIS_COLD, 3));
        r.methods.push(method(MITOSIS_WARM, 3));
        r.throughput = Some(Throughput {
            elapsed: Duration::from_secs(2),
            children: 2400,
            ..Throughput::default()
        });
        let t = of(&r);
        assert_eq!(
            get(&t, "cold_host_ms").met,
            Some(true),
            "3 ms is within 3 ms"
        );
        assert_eq!(
            get(&t, "warm_host_vs_local_fork").met,
            Some(false),
            "1.5x is over 1.3x"
        );
        assert_eq!(get(&t, "warm_host_vs_local_fork").shown(), "1.50x");
        assert_eq!(get(&t, "children_per_sec").met, Some(true));
        assert_eq!(get(&t, "children_per_sec").shown(), "1200/s");
        assert_eq!(get(&t, "cold_host_ms").shown(), "3.00 ms");
        assert_eq!(get(&t, "warm_host_vs_local_fork").verdict(), "MISSED");
        assert_eq!(get(&t, "prepare_seed_stopped_ms").met, None);
        assert_eq!(get(&t, "criu_lazy_vs_cold_host").met, None, "no CRIU row");
        assert_eq!(get(&t, "cli_over_local_fork_ms").met, None, "no CLI row");
        assert_eq!(
            t.len(),
            12,
            "no container target for a seed in no container"
        );
    }

    #[test]
    fn the_first_child_and_the_cold_host_with_their_floors() {
        let mut r = SeedResult::new("numpy", "test");
        r.methods.push(method(MITOSIS_FIRST, 30));
        r.methods.push(method(MITOSIS_COLD, 8));
        r.methods.push(method(TRANSFER_FLOOR, 4));
        r.methods.push(method(MITOSIS_FIRST_PROFILE, 9));
        let t = of(&r);
        assert_eq!(get(&t, "first_child_ms").met, Some(false));
        let seen = get(&t, "first_child_profile_ms");
        assert_eq!((seen.value, seen.met), (Some(9.0), Some(true)));
        let floor = get(&t, "first_child_floor_ms");
        assert_eq!((floor.value, floor.met), (Some(8.0), None));
        assert_eq!(get(&t, "cold_host_ms").met, Some(false));
        let floor = get(&t, "cold_host_floor_ms");
        assert_eq!((floor.value, floor.met), (Some(4.0), None));
        // The 1 GiB seed's new host: 10 ms.
        r.name = "bigheap";
        let t = of(&r);
        assert_eq!(get(&t, "cold_host_ms").goal, "<= 10 ms");
        assert_eq!(get(&t, "cold_host_ms").met, Some(true));
    }

    #[test]
    fn the_cli_over_a_local_fork_with_its_floor() {
        let mut r = SeedResult::new("numpy", "test");
        r.methods.push(method(LOCAL_FORK, 2));
        r.methods.push(method(MITOSIS_WARM_CLI, 4));
        r.methods.push(method(SPAWN_FLOOR, 1));
        let t = of(&r);
        assert_eq!(
            (
                get(&t, "cli_over_local_fork_ms").value,
                get(&t, "cli_over_local_fork_ms").met
            ),
            (Some(2.0), Some(false))
        );
        assert_eq!(
            (
                get(&t, "spawn_floor_ms").value,
                get(&t, "spawn_floor_ms").met
            ),
            (Some(1.0), None)
        );
    }

    #[test]
    fn criu_lazy_migration_over_the_new_host() {
        let mut r = SeedResult::new("numpy", "test");
        r.methods.push(method(MITOSIS_COLD, 4));
        r.methods.push(method(CRIU_LAZY, 80));
        let t = get(&of(&r), "criu_lazy_vs_cold_host").clone();
        assert_eq!(t.value, Some(20.0));
        assert_eq!((t.shown().as_str(), t.met), ("20.00x", Some(true)));
        r.methods[0] = method(MITOSIS_COLD, 8);
        let t = get(&of(&r), "criu_lazy_vs_cold_host").clone();
        assert_eq!((t.value, t.met), (Some(10.0), Some(false)));
        r.methods[1].latencies.clear();
        assert_eq!(
            get(&of(&r), "criu_lazy_vs_cold_host").value,
            None,
            "a failed CRIU row has no ratio"
        );
    }

    #[test]
    fn containerizing_is_taking_plus_joining_per_child() {
        let mut r = SeedResult::new("container", "test");
        for (take, join) in [(20, 150), (4000, 300), (30, 200)] {
            r.warm.stats.push(
                [("container_us", take), ("join_us", join), ("fork_us", 900)]
                    .into_iter()
                    .collect(),
            );
        }
        assert_eq!(r.containerizing_us(), Some((30, 200, 230)));
        let t = of(&r);
        assert_eq!(t.len(), 13);
        assert_eq!(get(&t, "containerizing_ms").shown(), "0.23 ms");
        assert_eq!(get(&t, "containerizing_ms").met, Some(true));
    }
}
