//! The bench's CRIU rows end to end, short (as root, after `cargo build --workspace --bins`):
//! with a working `criu` on PATH, its restore and lazy-migration rows of the hello seed answer
//! every sample right; without one (as on CI), both rows are reported skipped with the reason,
//! and the rest of the bench still runs. Either way the test says which case it checked.

use std::process::Command;

use serde_json::Value;

#[test]
fn criu_rows_run_or_are_skipped_with_the_reason() {
    let out = std::env::temp_dir().join(format!("mitosis-bench-criu-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_mitosis-bench"))
        .args(["--seeds", "hello", "--children", "2", "--cold-samples", "2"])
        .args(["--warmup", "1", "--throughput-secs", "0"])
        .arg("--out-dir")
        .arg(&out)
        .output()
        .expect("mitosis-bench runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{}\n{stdout}\n{stderr}", run.status);

    let text = std::fs::read_to_string(out.join("bench-results.json")).expect("results");
    let _ = std::fs::remove_dir_all(&out);
    let results: Value = serde_json::from_str(&text).expect("JSON");
    let machine = &results["machine"];
    let seed = &results["seeds"][0];
    let method = |key: &str| {
        seed["methods"]
            .as_array()
            .expect("methods")
            .iter()
            .find(|m| m["key"] == key)
            .unwrap_or_else(|| panic!("no {key} row: {seed}"))
            .clone()
    };
    let (restore, lazy) = (method("criu"), method("criu_lazy"));
    let ran = |m: &Value| {
        assert_eq!(m["skipped"], Value::Null, "{m}");
        assert_eq!(
            (&m["samples"], &m["failures"]),
            (&2.into(), &0.into()),
            "{m}"
        );
        assert!(m["median_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{m}");
    };
    let skipped = |m: &Value, why: &Value| {
        let reason = m["skipped"].as_str().unwrap_or_else(|| panic!("{m}"));
        assert!(reason.contains("not available"), "{reason}");
        assert!(reason.contains(why.as_str().expect("a reason")), "{reason}");
        assert_eq!(m["samples"], 0, "{m}");
    };
    match (&machine["criu"], &machine["criu_lazy"]) {
        (Value::Null, Value::Null) => {
            ran(&restore);
            ran(&lazy);
            assert!(
                seed["criu_lazy_dump_median_ms"].as_f64().is_some(),
                "{seed}"
            );
            let target = seed["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .find(|t| t["key"] == "criu_lazy_vs_cold_host")
                .expect("the CRIU target");
            assert!(target["value"].as_f64().is_some(), "{target}");
            eprintln!(
                "criu present: restore {} ms, lazy migration {} ms (hello, medians of 2)",
                restore["median_ms"], lazy["median_ms"]
            );
        }
        (Value::Null, why) => {
            ran(&restore);
            skipped(&lazy, why);
            eprintln!("criu present, its lazy migration not here: checked it is skipped ({why})");
        }
        (why, _) => {
            skipped(&restore, why);
            skipped(&lazy, why);
            assert!(
                stdout.contains("criu: not available"),
                "the skip is printed: {stdout}"
            );
            eprintln!("criu absent: checked its rows are skipped with the reason ({why})");
        }
    }
}
