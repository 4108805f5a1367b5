//! `mitosisd --metrics`: `/metrics` of two simulated hosts, scraped with curl from inside each
//! host's network namespace (on its loopback), before and after a cold and a warm resume.
//! Needs root.

mod common;

use common::metrics::*;
use common::*;

#[test]
fn a_resume_shows_in_the_daemons_metrics_cold_then_warm() {
    let tb = testbed_with(2, &["--metrics", METRICS]);
    let (_dir, _seed, handle) = prepared_memcheck(&tb, "metrics");
    let id = handle.split('/').nth(3).unwrap().to_owned();
    let seed = [("seed", id.as_str())];

    let before = scrape(&tb, 1);
    assert_eq!(
        value(&before, "mitosisd_children_started_total", &seed),
        0.0
    );
    assert_eq!(value(&before, "mitosisd_replicas", &[]), 0.0);

    let ok = format!("ok 11 {MEMCHECK_DIGEST}\n");
    for (n, host) in [(1.0, "cold"), (2.0, "warm")] {
        let out = cli(&tb, 1, &["resume", &handle], "verify\n");
        assert_eq!(stdout(&out), ok, "{}", stderr(&out));
        let m = scrape(&tb, 1);
        assert_eq!(
            value(&m, "mitosisd_children_started_total", &seed),
            n,
            "after resume {n}"
        );
        assert_eq!(value(&m, "mitosisd_children_running", &seed), 0.0);
        assert_eq!(value(&m, "mitosisd_children_failed_total", &seed), 0.0);
        let counts = |h| value(&m, "mitosisd_resume_seconds_count", &[("host", h)]);
        assert_eq!(counts(host), 1.0, "the {host} resume is counted as {host}");
        assert_eq!(counts("cold") + counts("warm"), n);
        assert!(value(&m, "mitosisd_child_faults_total", &[]) > 0.0);
        assert_eq!(value(&m, "mitosisd_replicas", &[]), 1.0);
        assert!(value(&m, "mitosisd_replica_pages", &[]) > 0.0);
    }

    // The seed's host served the pages.
    let seed_host = scrape(&tb, 0);
    assert!(value(&seed_host, "mitosisd_page_server_bytes_total", &[]) > 0.0);
    assert_eq!(value(&seed_host, "mitosisd_seeds", &[]), 1.0);

    // A resume of a seed that is gone counts as a failure of that seed.
    let out = cli(&tb, 0, &["drop", &handle], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert!(!out.status.success());
    let m = scrape(&tb, 1);
    assert_eq!(value(&m, "mitosisd_children_failed_total", &seed), 1.0);
    teardown(tb);
}
