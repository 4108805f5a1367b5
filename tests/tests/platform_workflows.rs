//! Workflows on the platform (issue 21 part 3, docs/workflows.md "On the platform"): a DAG of
//! stages on three simulated hosts. A producer builds in-memory state and prepares itself
//! through the platform (no daemon socket in its container); a fan-out stage of its children,
//! on several hosts, sees that state as it was at the prepare point; a fan-in stage gets all
//! their answers. A failing stage is named with its reason and leaves nothing running; bad
//! DAGs are refused with 400.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{Api, Reply};
use common::*;
use mitosis_platform::Config;
use mitosis_testbed::Testbed;
use serde_json::{Value, json};

const ROOTFS: &str = "/var/lib/mitosis/bundles/python/rootfs";

/// The library and the function of this source tree, not the copies installed in the
/// bundle's rootfs at setup (which may be older): both go in the program `python3 -c` runs.
fn program() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = std::fs::read_to_string(root.join("clients/python/mitosis/__init__.py")).unwrap();
    let function = std::fs::read_to_string(root.join("examples/python/workflow_stage_fn.py"))
        .expect("the example function");
    // A JSON string is a Python string literal.
    let lib = serde_json::to_string(&lib).unwrap();
    format!(
        "import sys, types\n\
         _m = types.ModuleType('mitosis')\n\
         exec(compile({lib}, 'mitosis/__init__.py', 'exec'), _m.__dict__)\n\
         sys.modules['mitosis'] = _m\n\
         {function}"
    )
}

/// A bundle over the shared Python rootfs running the workflow function.
fn stage_bundle(scratch: &Scratch) -> PathBuf {
    python_bundle(scratch, "workflow", &["python3", "-c", &program()], 256, 64)
}

impl Api {
    fn start(tb: &Testbed) -> Api {
        Self::start_with(tb, Config::default())
    }

    fn post(&self, path: &str, body: Value) -> Reply {
        self.request("POST", path, body.to_string().as_bytes())
    }

    fn ok(&self, path: &str, body: Value) -> Value {
        let r = self.post(path, body);
        assert_eq!(r.status, 200, "POST {path}: {}", r.text());
        r.json()
    }

    /// The ids of every seed on every host.
    fn seeds_on_hosts(tb: &Testbed) -> Vec<(usize, u64)> {
        let mut all = Vec::new();
        for (i, h) in tb.hosts().iter().enumerate() {
            let status = mitosis_client::Client::connect(h.socket_path())
                .and_then(|c| c.status())
                .expect("a daemon's status");
            all.extend(status.seeds.iter().map(|s| (i, s.id)));
        }
        all.sort();
        all
    }

    /// Waits until every function has its seed on some host.
    fn wait_for_seeds(&self, fns: &[&str]) {
        let ready = eventually(Duration::from_secs(60), || {
            let r = self.request("GET", "/mitosis/hosts", b"");
            let v = r.json();
            fns.iter().all(|id| {
                v["seeds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["fn_id"] == *id && s["seed_host"].is_string())
            })
        });
        assert!(ready, "no seeds for {fns:?} within 60 s");
    }
}

/// No child runs on any host, the seeds are exactly `seeds`, and every replica left is of
/// one of them (a dropped seed's replicas on other hosts go at their daemons' next sweep).
fn nothing_left(tb: &Testbed, seeds: &[(usize, u64)]) -> bool {
    eventually(Duration::from_secs(15), || {
        let Ok(status) = tb
            .hosts()
            .iter()
            .map(|h| mitosis_client::Client::connect(h.socket_path()).and_then(|c| c.status()))
            .collect::<Result<Vec<_>, _>>()
        else {
            return false;
        };
        let kept: Vec<(String, u64)> = seeds
            .iter()
            .map(|(h, id)| (status[*h].listen.clone(), *id))
            .collect();
        status.iter().all(|s| {
            s.children_running == 0
                && s.replicas
                    .iter()
                    .all(|r| kept.contains(&(r.host.clone(), r.seed)))
        }) && Api::seeds_on_hosts(tb) == seeds
    })
}

fn logs(tb: &Testbed) -> String {
    tb.hosts().iter().map(|h| h.daemon_log()).collect()
}

#[test]
fn a_producer_fans_out_to_its_children_on_several_hosts_and_in_to_an_aggregator() {
    assert!(
        Path::new(ROOTFS).join("usr/bin/python3").exists(),
        "{ROOTFS} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    let scratch = Scratch::new("platform-workflows");
    let bundle = stage_bundle(&scratch);
    let tb = testbed(3);
    let api = Api::start(&tb);
    let app = api.ok("/v2/apps", json!({"name": "wf"}));
    let deploy = |name: &str| {
        api.ok(
            "/v2/fns",
            json!({"name": name, "app_id": app["id"], "image": bundle, "memory": 256,
                   "timeout": 60}),
        )["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let stage_fn = deploy("stage");
    let aggregate_fn = deploy("aggregate");
    api.wait_for_seeds(&[&stage_fn, &aggregate_fn]);
    // The functions' own seeds: the only ones that may stay after a run.
    let function_seeds = Api::seeds_on_hosts(&tb);
    assert_eq!(function_seeds.len(), 2, "{function_seeds:?}");

    // Six validators, each summing one slice of the producer's table.
    let rows = 6000u64;
    let rules: Vec<Value> = (0..6)
        .map(|i| json!({"lo": i * 1000, "hi": (i + 1) * 1000}))
        .collect();
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "trades", "stages": [
            {"name": "load", "function": stage_fn},
            {"name": "validate", "fork": "load", "inputs": rules},
            {"name": "report", "function": "wf/aggregate", "after": ["validate"],
             "inputs": [{"role": "aggregate"}]},
        ]}),
    );
    let wf_id = wf["id"].as_str().unwrap().to_owned();
    assert_eq!(wf["stages"][1]["fn_id"], stage_fn.as_str());
    assert_eq!(wf["stages"][2]["fn_id"], aggregate_fn.as_str());
    let listed = api.request("GET", "/v2/workflows", b"").json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    let seed = 7u64;
    let table: Vec<u64> = (0..rows).map(|i| (i * seed) % 1009).collect();
    let t = Instant::now();
    let run = api.post(
        &format!("/invoke-workflow/{wf_id}"),
        json!({"role": "producer", "seed": seed, "rows": rows, "mib": 8}),
    );
    let took = t.elapsed();
    assert_eq!(run.status, 200, "{}\n{}", run.text(), logs(&tb));
    let run = run.json();
    eprintln!("workflow run in {took:?} through the API:");
    for s in run["stages"].as_array().unwrap() {
        let hosts: Vec<&str> = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["host"].as_str().unwrap())
            .collect();
        eprintln!(
            "  {:<9} started {:>8} ms, took {:>8} ms on {hosts:?}",
            s["name"].as_str().unwrap(),
            s["started_ms"],
            s["elapsed_ms"]
        );
    }
    let stages = run["stages"].as_array().unwrap();
    let stage = |name: &str| {
        stages
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stage {name} in {run}"))
    };
    let order: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(order, ["load", "validate", "report"]);
    assert_eq!(run["seeds_made"], 1, "the producer prepared itself once");

    // The producer prepared itself through the platform (it has no daemon socket).
    let load = stage("load");
    let producer = &load["results"][0];
    assert_eq!(producer["role"], "producer", "{producer}");
    assert_eq!(producer["on_platform"], true);
    assert_eq!(producer["token"], "load/0");
    assert_eq!(load["instances"][0]["prepared"], true);
    eprintln!("producer's fork_prepare: {} ms", producer["prepare_ms"]);

    // Each validator ran its own rule over the producer's memory at the prepare point.
    let validate = stage("validate");
    let results = validate["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["role"], "validator", "{r}");
        assert_eq!(r["index"], i as u64, "{r}");
        assert_eq!(r["stage"], "validate");
        let (lo, hi) = (i * 1000, (i + 1) * 1000);
        let want: u64 = table[lo..hi].iter().sum();
        assert_eq!(r["sum"], want, "validator {i}: {r}");
        // Not the producer's later writes.
        assert_eq!(r["counter"], 1, "{r}");
        assert_eq!(r["words"], json!(["before"]));
        assert_eq!(r["blob_ok"], true, "{r}");
        assert_eq!(r["blob_head_changed"], false, "{r}");
        // And the producer's answer, fanned in.
        assert_eq!(r["producer_result"][0]["digest"], producer["digest"]);
        // In a container of the function's bundle, as every call is.
        assert!(r["hostname"].as_str().unwrap().starts_with("fn"), "{r}");
        assert_eq!(r["in_rootfs"], true, "{r}");
    }
    let hosts: std::collections::BTreeSet<&str> = validate["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host"].as_str().unwrap())
        .collect();
    assert!(hosts.len() > 1, "six validators all ran on {hosts:?}");

    // The aggregator got every validator's answer.
    let report = &stage("report")["results"][0];
    assert_eq!(report["role"], "aggregate", "{report}");
    assert_eq!(report["count"], 6);
    assert_eq!(report["indexes"], json!([0, 1, 2, 3, 4, 5]));
    assert_eq!(report["total"], table.iter().sum::<u64>());
    assert_eq!(report["all_ok"], true);
    for s in stages {
        assert!(s["elapsed_ms"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The run's seed is gone, its children too; the functions' seeds stay.
    assert!(
        nothing_left(&tb, &function_seeds),
        "left after the run: {:?}",
        Api::seeds_on_hosts(&tb)
    );

    // Children that are seeds in turn: `refine` forks from the producer and prepares again
    // (flattened on its host), `deep` forks from it, and sees refine's state.
    let chain = api.ok(
        "/v2/workflows",
        json!({"name": "chain", "stages": [
            {"name": "load", "function": "wf/stage"},
            {"name": "refine", "fork": "load", "inputs": [{"refine": true}]},
            {"name": "deep", "fork": "refine", "fan_out": 3},
        ]}),
    );
    let deep = api.post(
        &format!("/invoke-workflow/{}", chain["id"].as_str().unwrap()),
        json!({"role": "producer", "seed": seed, "rows": rows, "mib": 2}),
    );
    assert_eq!(deep.status, 200, "{}\n{}", deep.text(), logs(&tb));
    let deep = deep.json();
    assert_eq!(deep["seeds_made"], 2, "{deep}");
    let refined = &deep["stages"][1];
    assert_eq!(refined["name"], "refine");
    assert_eq!(refined["results"][0]["role"], "refined", "{refined}");
    assert_eq!(refined["results"][0]["token"], "refine/0");
    let grandchildren = deep["stages"][2]["results"].as_array().unwrap();
    assert_eq!(grandchildren.len(), 3);
    for (i, g) in grandchildren.iter().enumerate() {
        assert_eq!(g["role"], "grandchild", "{g}");
        assert_eq!(g["index"], i as u64);
        assert_eq!(g["counter"], 10, "{g}");
        assert_eq!(g["words"], json!(["before", "refined"]), "{g}");
        assert_eq!(g["blob_ok"], true, "{g}");
        assert_eq!(g["sum"], table.iter().sum::<u64>());
        assert!(g["hostname"].as_str().unwrap().starts_with("fn"), "{g}");
    }
    assert!(
        logs(&tb).contains("flattened a child"),
        "the prepares of children flatten them first"
    );
    assert!(nothing_left(&tb, &function_seeds));

    // A plain call of the same function gets no channel: it is not on the platform's.
    let plain = api.post(&format!("/invoke/{stage_fn}"), json!({"input": {"x": 1}}));
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.json()["on_platform"], false);

    // Run again: a new seed, dropped again.
    let again = api.post(
        &format!("/invoke-workflow/{wf_id}"),
        json!({"role": "producer", "seed": seed, "rows": rows, "mib": 1}),
    );
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(
        again.json()["stages"][2]["results"][0]["total"],
        report["total"]
    );
    assert!(nothing_left(&tb, &function_seeds));

    // /metrics counts the runs and the seeds their stages made.
    let text = api.request("GET", "/metrics", b"").text();
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Untyped(n) => n,
                ref other => panic!("{name}: {other:?}"),
            })
            .sum()
    };
    let runs = "mitosis_platform_workflow_runs_total";
    assert_eq!(
        value(runs, &[("workflow_name", "trades"), ("outcome", "ok")]),
        2.0
    );
    assert_eq!(
        value(runs, &[("workflow_name", "chain"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(value("mitosis_platform_stage_seeds_made_total", &[]), 4.0);

    assert_eq!(
        api.request("DELETE", &format!("/v2/workflows/{wf_id}"), b"")
            .status,
        204
    );
    assert_eq!(
        api.post(&format!("/invoke-workflow/{wf_id}"), json!({}))
            .status,
        404
    );
    drop(api);
    teardown(tb);
}

#[test]
fn a_failing_stage_is_named_with_its_reason_and_nothing_is_left_running() {
    let scratch = Scratch::new("platform-workflows-fail");
    let bundle = stage_bundle(&scratch);
    let tb = testbed(3);
    let api = Api::start(&tb);
    let app = api.ok("/v2/apps", json!({"name": "wf"}));
    let stage_fn = api.ok(
        "/v2/fns",
        json!({"name": "stage", "app_id": app["id"], "image": bundle, "memory": 256,
               "timeout": 60}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_for_seeds(&[&stage_fn]);
    let function_seeds = Api::seeds_on_hosts(&tb);

    // One validator sleeps for a minute, another fails at once: the run answers with the
    // failure well before the sleeper would end, and the sleeper is killed.
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "broken", "stages": [
            {"name": "load", "function": "wf/stage", "inputs": [{"role": "producer", "mib": 1}]},
            {"name": "validate", "fork": "load",
             "inputs": [{"sleep": 60}, {"fail": 3}, {"sleep": 60}]},
            {"name": "report", "function": "wf/stage", "after": ["validate"],
             "inputs": [{"role": "aggregate"}]},
        ]}),
    );
    let t = Instant::now();
    let failed = api.post(
        &format!("/invoke-workflow/{}", wf["id"].as_str().unwrap()),
        json!(null),
    );
    let took = t.elapsed();
    assert_eq!(failed.status, 502, "{}\n{}", failed.text(), logs(&tb));
    let body = failed.json();
    assert_eq!(body["stage"], "validate", "{body}");
    assert_eq!(body["index"], 1, "{body}");
    assert_eq!(body["kind"], "failed", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("stage validate") && message.contains("status 3"),
        "{message}"
    );
    assert!(message.contains("rule 1 fails on purpose"), "{message}");
    assert_eq!(body["completed"], json!(["load"]));
    assert!(took < Duration::from_secs(30), "the failure took {took:?}");
    assert!(
        nothing_left(&tb, &function_seeds),
        "left after the failure: {:?}",
        Api::seeds_on_hosts(&tb)
    );

    // A stage forking from one whose process never prepared itself: named, and why.
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "unprepared", "stages": [
            {"name": "plain", "function": stage_fn},
            {"name": "children", "fork": "plain", "fan_out": 2},
        ]}),
    );
    let failed = api.post(
        &format!("/invoke-workflow/{}", wf["id"].as_str().unwrap()),
        json!({"echo": true}),
    );
    assert_eq!(failed.status, 502, "{}", failed.text());
    let body = failed.json();
    assert_eq!(body["stage"], "plain", "{body}");
    assert_eq!(body["kind"], "not_prepared");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("without preparing itself"),
        "{body}"
    );
    assert!(nothing_left(&tb, &function_seeds));

    // A client that goes away mid-run: the run's children are killed, its seed dropped.
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "abandoned", "stages": [
            {"name": "load", "function": stage_fn, "inputs": [{"role": "producer", "mib": 1}]},
            {"name": "validate", "fork": "load", "inputs": [{"sleep": 60}, {"sleep": 60}]},
        ]}),
    );
    {
        let mut s = TcpStream::connect(api.addr).unwrap();
        let body = b"null";
        write!(
            s,
            "POST /invoke-workflow/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            wf["id"].as_str().unwrap(),
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        // Until both validators run.
        let running = eventually(Duration::from_secs(20), || {
            tb.hosts()
                .iter()
                .map(|h| {
                    mitosis_client::Client::connect(h.socket_path())
                        .and_then(|c| c.status())
                        .map_or(0, |s| s.children_running)
                })
                .sum::<u64>()
                == 2
        });
        assert!(running, "the validators never ran\n{}", logs(&tb));
    }
    assert!(
        nothing_left(&tb, &function_seeds),
        "left after the client went away: {:?}",
        Api::seeds_on_hosts(&tb)
    );

    // A process the stage's process forked shares its channel, but may not prepare itself.
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "forked", "stages": [
            {"name": "only", "function": stage_fn, "inputs": [{"role": "forked_asks"}]},
        ]}),
    );
    let run = api.post(
        &format!("/invoke-workflow/{}", wf["id"].as_str().unwrap()),
        json!(null),
    );
    assert_eq!(run.status, 200, "{}", run.text());
    let run = run.json();
    let said = &run["stages"][0]["results"][0]["subprocess"];
    assert_eq!(said["kind"], "Denied", "{run}");
    assert!(
        said["error"]
            .as_str()
            .unwrap()
            .contains("is not the stage's process"),
        "{said}"
    );
    assert_eq!(run["seeds_made"], 0);
    assert!(nothing_left(&tb, &function_seeds));

    // A function stage that fails: its name and its stderr.
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "crash", "stages": [
            {"name": "first", "function": stage_fn, "inputs": [{"fail": 4}]},
            {"name": "second", "function": stage_fn, "after": ["first"]},
        ]}),
    );
    let failed = api.post(
        &format!("/invoke-workflow/{}", wf["id"].as_str().unwrap()),
        json!(null),
    );
    assert_eq!(failed.status, 502, "{}", failed.text());
    let body = failed.json();
    assert_eq!(body["stage"], "first", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("failing on purpose"),
        "{body}"
    );
    assert_eq!(body["completed"], json!([]));
    assert!(nothing_left(&tb, &function_seeds));
    drop(api);
    teardown(tb);
}

#[test]
fn malformed_workflows_are_refused_with_400_naming_the_field() {
    let scratch = Scratch::new("platform-workflows-bad");
    let bundle = stage_bundle(&scratch);
    let tb = testbed(1);
    let api = Api::start(&tb);
    let app = api.ok("/v2/apps", json!({"name": "wf"}));
    let stage_fn = api.ok(
        "/v2/fns",
        json!({"name": "stage", "app_id": app["id"], "image": bundle}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let f = |name: &str| json!({"name": name, "function": stage_fn});
    let cases = [
        (
            json!({"name": "c", "stages": [
                {"name": "a", "function": stage_fn, "after": ["b"]},
                {"name": "b", "function": stage_fn, "after": ["a"]}]}),
            "cycle",
        ),
        (
            json!({"name": "u", "stages": [f("a"), {"name": "b", "function": stage_fn, "after": ["nope"]}]}),
            "stages[1].after: no stage named \"nope\"",
        ),
        (
            json!({"name": "nf", "stages": [{"name": "a", "function": "wf/nosuch"}]}),
            "stages[0].function: no function \"wf/nosuch\"",
        ),
        (
            json!({"name": "z", "stages": [{"name": "a", "function": stage_fn, "fan_out": 0}]}),
            "stages[0].fan_out",
        ),
        (
            json!({"name": "big", "stages": [{"name": "a", "function": stage_fn, "fan_out": 1000}]}),
            "stages[0].fan_out",
        ),
        (
            json!({"name": "fk", "stages": [{"name": "a", "function": stage_fn, "fan_out": 2},
                                            {"name": "b", "fork": "a"}]}),
            "stages[1].fork",
        ),
        (json!({"name": "e", "stages": []}), "stages"),
        (json!({"stages": [f("a")]}), "Workflow name"),
        (
            json!({"name": "t", "stages": [{"name": "a", "function": stage_fn, "fanout": 2}]}),
            "fanout",
        ),
    ];
    for (body, want) in cases {
        let r = api.post("/v2/workflows", body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(want), "{body}: {message:?} lacks {want:?}");
    }
    assert_eq!(
        api.request("POST", "/v2/workflows", b"{not json").status,
        400
    );
    // Names are unique; unknown workflows are 404.
    api.ok("/v2/workflows", json!({"name": "once", "stages": [f("a")]}));
    let again = api.post("/v2/workflows", json!({"name": "once", "stages": [f("a")]}));
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(api.request("GET", "/v2/workflows/nosuch", b"").status, 404);
    assert_eq!(api.post("/invoke-workflow/nosuch", json!({})).status, 404);
    assert!(
        api.request("GET", "/v2/workflows", b"").json()["items"]
            .as_array()
            .unwrap()
            .len()
            == 1
    );
    // A function deleted after the workflow was made: its run fails naming the stage.
    let gone = api.ok(
        "/v2/fns",
        json!({"name": "gone", "app_id": app["id"], "image": bundle}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let wf = api.ok(
        "/v2/workflows",
        json!({"name": "orphan", "stages": [f("a"), {"name": "b", "function": "wf/gone", "after": ["a"]}]}),
    );
    assert_eq!(wf["stages"][1]["fn_id"], gone.as_str());
    assert_eq!(
        api.request("DELETE", &format!("/v2/fns/{gone}"), b"")
            .status,
        204
    );
    let run = api.post(
        &format!("/invoke-workflow/{}", wf["id"].as_str().unwrap()),
        json!({}),
    );
    assert_eq!(run.status, 404, "{}", run.text());
    assert_eq!(run.json()["stage"], "b");
    assert_eq!(run.json()["kind"], "function");
    drop(api);
    teardown(tb);
}
