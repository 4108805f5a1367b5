//! The platform's web dashboard (`GET /dashboard`) in a real headless browser: Debian's
//! chromium through chromedriver (tests/common/browser.rs). The platform serves three
//! simulated hosts from this process on a loopback port; the page shows them and the
//! deployed functions, and its numbers (calls, fork/cold/warm starts and failures, start
//! latency, charts) change after calls, and a host whose daemon dies turns down, as it polls
//! `GET /mitosis/dashboard.json`. Fails with a
//! message to run scripts/setup.sh when chromium or its driver is missing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::browser::Browser;
use common::*;
use mitosis_platform::background::Background;
use mitosis_platform::{Config, HostSpec};
use serde_json::{Value, json};

const BUNDLE: &str = "/var/lib/mitosis/bundles/python";

/// What the page shows, read from its DOM: the tiles, the hosts' and functions' rows (cells
/// by their `data-k`), the charts' marks and how many polls it has rendered.
const PAGE_STATE: &str = r##"
const text = (id) => document.getElementById(id).textContent;
const rows = (sel) => [...document.querySelectorAll(sel)].map((r) =>
  Object.fromEntries([...r.querySelectorAll("td[data-k]")].map((td) => [td.dataset.k, td.textContent])));
return {
  updates: Number(document.body.dataset.updates),
  status: text("status"),
  tiles: Object.fromEntries(["hosts-up", "in-flight", "children", "calls", "fork", "cold", "warm", "failed"]
    .map((id) => [id, text(id)])),
  hosts: rows("#hosts tbody tr[data-host]"),
  functions: rows("#functions tbody tr[data-fn]"),
  bars: document.querySelectorAll("#starts-chart rect.bar").length,
  bars_by_start: Object.fromEntries(["fork", "cold", "warm", "failed"]
    .map((k) => [k, document.querySelectorAll("#starts-chart rect.bar." + k).length])),
  latency_points: document.querySelectorAll("#latency-chart circle").length,
  latency_path: (document.querySelector("#latency-chart path.p50") || {getAttribute: () => ""}).getAttribute("d"),
};
"##;

/// Plain HTTP to the platform on loopback.
struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    fn post(&self, path: &str, body: &str) -> (u16, String, String) {
        let answer = self
            .agent
            .post(&format!("{}{path}", self.base))
            .send_string(body);
        match answer {
            Ok(r) => {
                let start = r.header("Mitosis-Start").unwrap_or("").to_owned();
                (r.status(), start, r.into_string().unwrap_or_default())
            }
            Err(ureq::Error::Status(code, r)) => (code, String::new(), r.into_string().unwrap()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    fn json(&self, path: &str, body: Value) -> Value {
        let (code, _, text) = self.post(path, &body.to_string());
        assert_eq!(code, 200, "POST {path}: {text}");
        serde_json::from_str(&text).expect("JSON")
    }

    fn get(&self, path: &str) -> Value {
        self.agent
            .get(&format!("{}{path}", self.base))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .expect("JSON")
    }
}

fn cell<'a>(row: &'a Value, key: &str) -> &'a str {
    row[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {row}"))
}

fn row<'a>(state: &'a Value, table: &str, name: &str) -> Option<&'a Value> {
    state[table]
        .as_array()?
        .iter()
        .find(|r| r["name"].as_str() == Some(name))
}

#[test]
fn the_dashboard_shows_the_cluster_and_its_numbers_change_with_calls() {
    assert!(
        Path::new(BUNDLE).join("config.json").exists(),
        "{BUNDLE} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    // First, so that a machine without chromium fails before anything is set up.
    common::browser::require_chromium();
    let tb = testbed(3);
    let served = Background::start(Config::default(), HostSpec::of_testbed(&tb)).expect("the API");
    let api = Api {
        base: format!("http://{}", served.addr),
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build(),
    };
    let browser = Browser::start();

    let app = api.json("/v2/apps", json!({"name": "dashboard"}));
    let deploy = |name: &str, policy: &str| {
        // 256 MiB: numpy and Pillow with the image are over Fn's default of 128.
        api.json(
            "/v2/fns",
            json!({"name": name, "app_id": app["id"], "image": BUNDLE, "memory": 256,
                   "idle_timeout": 120, "annotations": {"mitosis.io/policy": policy}}),
        )["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let forked = deploy("thumbs", "remote-fork");
    let kept = deploy("kept", "fn-cache");

    // The page lists the three hosts, up with their CPUs known (polled), and both functions
    // with their policies; no call yet. The remote-fork function's seed appears on a host.
    browser.goto(&format!("{}/dashboard", api.base));
    let before = browser.wait_for(
        Duration::from_secs(60),
        PAGE_STATE,
        "three hosts up, two functions, the seed placed",
        |s| {
            let hosts: Vec<&str> = s["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| cell(h, "name"))
                .collect();
            hosts == ["h0", "h1", "h2"]
                && s["hosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| cell(h, "state") == "up" && cell(h, "cpus") != "–")
                && row(s, "functions", "thumbs").is_some_and(|f| cell(f, "seed") != "–")
                && row(s, "functions", "kept").is_some()
        },
    );
    assert_eq!(before["status"], "live", "{before:#}");
    assert_eq!(before["tiles"]["hosts-up"], "3 / 3");
    assert_eq!(before["tiles"]["calls"], "0");
    let thumbs = row(&before, "functions", "thumbs").unwrap();
    assert_eq!(
        (
            cell(thumbs, "app"),
            cell(thumbs, "policy"),
            cell(thumbs, "memory")
        ),
        ("dashboard", "remote-fork", "256 MiB")
    );
    assert!(
        ["h0", "h1", "h2"].contains(&cell(thumbs, "seed")),
        "{thumbs}"
    );
    assert_eq!(cell(thumbs, "start_p50"), "–");
    assert_eq!(
        cell(row(&before, "functions", "kept").unwrap(), "policy"),
        "fn-cache"
    );
    assert_eq!(before["bars"], 0);

    // Calls: three forks of the remote-fork function; the keep-warm one starts an instance
    // cold, then reuses it warm.
    let mut starts = Vec::new();
    for (fn_id, n) in [
        (&forked, 1),
        (&forked, 2),
        (&forked, 3),
        (&kept, 1),
        (&kept, 2),
    ] {
        let (code, start, text) = api.post(&format!("/invoke/{fn_id}"), &format!("{{\"n\": {n}}}"));
        assert_eq!(code, 200, "{text}");
        starts.push(start);
    }
    assert_eq!(starts, ["fork", "fork", "fork", "cold", "warm"]);

    // The page catches up on its own: counts, start latency, the charts.
    let after = browser.wait_for(
        Duration::from_secs(30),
        PAGE_STATE,
        "the page counts the five calls",
        |s| s["tiles"]["calls"] == "5" && s["bars"].as_u64() > Some(0),
    );
    let tiles = &after["tiles"];
    assert_eq!(
        (
            &tiles["fork"],
            &tiles["cold"],
            &tiles["warm"],
            &tiles["failed"]
        ),
        (&json!("3"), &json!("1"), &json!("1"), &json!("0")),
        "{after:#}"
    );
    let thumbs = row(&after, "functions", "thumbs").unwrap();
    assert_eq!(
        (cell(thumbs, "calls"), cell(thumbs, "fork")),
        ("3", "3"),
        "{thumbs}"
    );
    assert!(cell(thumbs, "start_p50").ends_with(" ms"), "{thumbs}");
    assert!(cell(thumbs, "call_p99").ends_with(" ms") || cell(thumbs, "call_p99").ends_with(" s"));
    let k = row(&after, "functions", "kept").unwrap();
    assert_eq!(
        (
            cell(k, "calls"),
            cell(k, "cold"),
            cell(k, "warm"),
            cell(k, "idle")
        ),
        ("2", "1", "1", "1"),
        "{k}"
    );
    // The latency chart (all functions) has its p50, p90 and p99 points for the bucket(s).
    assert!(after["latency_points"].as_u64().unwrap() >= 3, "{after:#}");
    assert!(
        after["latency_path"].as_str().unwrap().starts_with('M'),
        "{after:#}"
    );
    // And it stays live: more polls rendered since.
    let later = browser.wait_for(
        Duration::from_secs(10),
        PAGE_STATE,
        "the page polls again",
        |s| s["updates"].as_u64() > after["updates"].as_u64(),
    );
    assert_eq!(later["status"], "live");

    // What the page polls fits its schema, with the same numbers.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas/dashboard.schema.json"),
        )
        .expect("the schema"),
    )
    .expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let d = api.get(&format!("/mitosis/dashboard.json?series={forked}"));
    let errors: Vec<String> = validator.iter_errors(&d).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{d:#}");
    assert_eq!(d["totals"]["calls"], 5);
    let f = d["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == forked.as_str())
        .unwrap();
    assert!(f["start_ms"]["p50"].as_f64().unwrap() > 0.0, "{f:#}");
    assert!(!f["series"].as_array().unwrap().is_empty());

    // A call that fails (a keep-warm instance takes one request line) is counted failed.
    let (code, _, text) = api.post(&format!("/invoke/{kept}"), "{\"n\": 1}\n{\"n\": 2}");
    assert_eq!(code, 400, "{text}");
    browser.wait_for(
        Duration::from_secs(30),
        PAGE_STATE,
        "the page counts the failed call",
        |s| {
            s["tiles"]["failed"] == "1"
                && s["tiles"]["calls"] == "6"
                && row(s, "functions", "kept").is_some_and(|k| cell(k, "failed") == "1")
        },
    );

    // The charts of one function: the keep-warm one's starts were cold, warm and failed,
    // never forks (its series comes at once, asked for by the page).
    let chosen = browser.eval(&format!(
        r#"const s = document.getElementById("fn-select");
           s.value = "{kept}"; s.dispatchEvent(new Event("change")); return s.value;"#
    ));
    assert_eq!(chosen, kept.as_str());
    let one = browser.wait_for(
        Duration::from_secs(10),
        PAGE_STATE,
        "the charts of the keep-warm function alone",
        |s| {
            let bars = &s["bars_by_start"];
            bars["fork"] == 0 && bars["cold"] == 1 && bars["warm"] == 1 && bars["failed"] == 1
        },
    );
    // Its one start (cold): a point for each of p50, p90 and p99.
    assert_eq!(one["latency_points"], 3, "{one:#}");

    // A host whose daemon dies (not the seed's) turns down on the page, with why.
    let seed_host = cell(thumbs, "seed").to_owned();
    let dead = (0..3)
        .find(|h| format!("h{h}") != seed_host)
        .expect("another host");
    tb.host(dead).kill_daemon().expect("kill a daemon");
    let down = browser.wait_for(
        Duration::from_secs(30),
        PAGE_STATE,
        "the dead daemon's host shows down",
        |s| s["tiles"]["hosts-up"] == "2 / 3",
    );
    let host = row(&down, "hosts", &format!("h{dead}")).expect("its row");
    assert!(cell(host, "state").starts_with("down"), "{host}");
    assert!(
        cell(host, "state").len() > "down".len(),
        "no reason: {host}"
    );

    // No script error, nothing the CSP refused, no failed load.
    let console = browser.console();
    let severe: Vec<_> = console
        .iter()
        .filter(|(level, _)| level == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "the browser's console: {severe:?}");

    eprintln!(
        "dashboard: {} polls rendered; thumbs start p50 {}, kept call p99 {}; browser files in {}",
        later["updates"],
        cell(thumbs, "start_p50"),
        cell(k, "call_p99"),
        browser.dir().display()
    );
    drop(browser);
    drop(served);
    // A daemon started after a crash removes what the crashed one left.
    tb.host(dead)
        .start_daemon()
        .expect("the daemon starts again");
    teardown(tb);
}
