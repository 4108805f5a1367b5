//! Scraping a daemon's `/metrics` (`mitosisd --metrics`) from inside its host's namespace.

use mitosis_testbed::Testbed;

use super::stderr;

/// Where each daemon serves `/metrics`: its own namespace's loopback.
pub const METRICS: &str = "127.0.0.1:9464";

/// Host `host`'s metrics, parsed as Prometheus exposition.
pub fn scrape(tb: &Testbed, host: usize) -> prometheus_parse::Scrape {
    let out = tb
        .host(host)
        .command("curl")
        .args(["-sSf", "--max-time", "10"])
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl: {}", stderr(&out));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{text}"
    );
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
}

/// The value of the first sample named `name` with all of `labels`; 0 when there is none
/// (a labelled series appears with its first event).
pub fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value;
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .map_or(0.0, |x| match x.value {
            Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => n,
            ref other => panic!("{name}: {other:?}"),
        })
}
