//! `mitosis-bench loadspike` end to end, short (as root, after `cargo build --workspace
//! --bins`, with the Python bundle of scripts/setup.sh): every policy answers every call of
//! a small spike, and results.json and the plots are written.

use std::path::Path;
use std::process::Command;

const BUNDLE: &str = "/var/lib/mitosis/bundles/python";

#[test]
fn a_short_spike_runs_against_every_policy_without_failures() {
    assert!(
        Path::new(BUNDLE).join("config.json").exists(),
        "{BUNDLE} is missing: run scripts/setup.sh (it builds the bundle)"
    );
    let out = std::env::temp_dir().join(format!("mitosis-loadspike-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_mitosis-bench"))
        .args(["loadspike", "--base-rate", "2", "--base-secs", "2"])
        .args([
            "--spike-factor",
            "3",
            "--spike-secs",
            "1",
            "--idle-secs",
            "1",
        ])
        .args(["--idle-timeout", "2", "--hosts", "2", "--seed", "7"])
        // Short calls: fn-cache's warm instance is seldom busy when the next call comes.
        .args(["--request", r#"{"n": 3, "io_ms": 20}"#])
        .arg("--out-dir")
        .arg(&out)
        .output()
        .expect("mitosis-bench runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{}\n{stdout}\n{stderr}", run.status);

    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let results: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    for policy in ["remote-fork", "fn-cache", "local-fork", "cold"] {
        let p = &results["policies"][policy];
        let invocations = p["invocations"].as_u64().expect(policy);
        assert!(invocations > 0, "{policy}: {p}");
        assert_eq!(p["failed"], 0, "{policy}: {stdout}\n{stderr}");
        for key in ["p50_ms", "p99_ms", "mean_pss_mib", "peak_pss_mib"] {
            assert!(
                p[key].as_f64().is_some_and(|v| v > 0.0),
                "{policy} {key}: {p}"
            );
        }
        let cold = p["cold_starts"].as_u64().expect("cold_starts");
        match policy {
            // Forks only: the seeds were made before the replay.
            "remote-fork" | "local-fork" => assert_eq!(cold, 0, "{policy}"),
            "cold" => assert_eq!(cold, invocations, "{policy}"),
            _ => assert!(cold < invocations, "{policy}: {cold} cold of {invocations}"),
        }
        // A call answered by a process started cold for it was one of those started.
        let cold_calls = p["cold_calls"].as_u64().expect("cold_calls");
        assert!(cold_calls <= cold, "{policy}: {cold_calls} of {cold}");
        let round = &p["per_round"][0];
        assert!(!round["samples"].as_array().expect("samples").is_empty());
        let calls = round["calls"].as_array().expect("calls");
        assert_eq!(calls.len() as u64, invocations, "{policy}");
    }
    for png in [
        "latency-over-time.png",
        "memory-over-time.png",
        "latency-cdf.png",
    ] {
        let bytes = std::fs::read(out.join(png)).expect(png);
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
