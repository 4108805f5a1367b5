//! A child's numbers as `key=value` pairs: the keys of `mitosis resume --stats`.

use mitosis_transport::control::{FaultStats, ResumeStats};

/// How many pairs [`stats_pairs`] gives.
pub const STATS_PAIRS: usize = 22;

/// The per-child breakdown (times in microseconds), in the order `--stats` prints it.
pub fn stats_pairs(start: &ResumeStats, faults: &FaultStats) -> [(&'static str, u64); STATS_PAIRS] {
    [
        ("resume_us", start.total_us),
        ("cached", start.cached as u64),
        ("attach_us", start.attach_us),
        ("descriptor_us", start.descriptor_us),
        ("plan_us", start.plan_us),
        ("build_us", start.build_us),
        ("spawn_us", start.spawn_us),
        ("restore_us", start.restore_us),
        ("eager_pages", start.eager_pages),
        ("working_set_pages", start.working_set_pages),
        ("working_set_us", start.working_set_us),
        ("install_us", start.install_us),
        ("pages_wait_us", start.pages_wait_us),
        ("fork_us", start.fork_us),
        ("container_us", start.container_us),
        ("container_pooled", start.container_pooled as u64),
        ("join_us", start.join_us),
        ("faults", faults.faults + faults.zero_faults),
        ("zero_faults", faults.zero_faults),
        ("fetches", faults.fetches),
        ("pages_fetched", faults.pages_fetched),
        ("fetch_us", faults.fetch_us),
    ]
}

/// The pairs as one line, `key=value` separated by spaces.
pub fn stats_line(start: &ResumeStats, faults: &FaultStats) -> String {
    stats_pairs(start, faults)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_count_zero_fills_too() {
        let start = ResumeStats {
            cached: true,
            fork_us: 800,
            total_us: 900,
            ..ResumeStats::default()
        };
        let faults = FaultStats {
            faults: 300,
            zero_faults: 21,
            ..FaultStats::default()
        };
        let line = stats_line(&start, &faults);
        assert!(
            line.starts_with("resume_us=900 cached=1 attach_us=0 "),
            "{line}"
        );
        assert!(line.contains(" fork_us=800 "), "{line}");
        assert!(line.contains(" faults=321 zero_faults=21 "), "{line}");
        assert_eq!(line.split(' ').count(), STATS_PAIRS);
    }
}
