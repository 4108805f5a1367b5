//! A loop of Node.js children, each the first on a cold host (the replica evicted before
//! each), to catch the rare child that dies of SIGSEGV before its first answer
//! (docs/limits.md): 300 in the suite (about 20 s here), more with `MITOSIS_NODE_LOOP=N
//! cargo test -p mitosis-tests --test node_cold -- --nocapture`. The seed runs with core
//! dumps on, in a scratch directory, so a crashed child leaves its core there
//! (kernel.core_pattern permitting).

mod common;

use std::os::unix::process::CommandExt;

use common::*;

#[test]
fn cold_node_children_in_a_loop() {
    let runs: usize = std::env::var("MITOSIS_NODE_LOOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dir = Scratch::new("node-cold");
    let keep = std::env::var_os("MITOSIS_NODE_CORES").map(std::path::PathBuf::from);
    let tb = testbed(2);
    let start = || {
        let mut cmd = tb.host(0).command("node");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/node/fn.js"
        ))
        .current_dir(keep.as_ref().unwrap_or(&dir.0));
        // SAFETY: the hook runs in the forked child before exec and only calls setrlimit.
        unsafe {
            cmd.pre_exec(|| {
                let unlimited = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &unlimited);
                Ok(())
            });
        }
        Seed::start(cmd)
    };
    // Each child is the first of: a seed started and prepared for it (MITOSIS_NODE_NEW, as
    // in runtimes.rs), a seed prepared again for it (MITOSIS_NODE_FRESH: no working set
    // yet), or one seed whose replica is evicted before each.
    let new = std::env::var_os("MITOSIS_NODE_NEW").is_some();
    let fresh = std::env::var_os("MITOSIS_NODE_FRESH").is_some();
    let mut seed = start();
    let mut handle = prepare(&tb, 0, seed.pid());
    let mut failures = Vec::new();
    for run in 0..runs {
        if (fresh || new) && run > 0 {
            let dropped = cli(&tb, 0, &["drop", &handle], "");
            assert!(dropped.status.success(), "drop: {}", stderr(&dropped));
            if new {
                drop(seed);
                seed = start();
            }
            handle = prepare(&tb, 0, seed.pid());
        } else if run > 0 {
            let evicted = cli(&tb, 1, &["evict", &handle], "");
            assert!(evicted.status.success(), "evict: {}", stderr(&evicted));
        }
        let out = cli(&tb, 1, &["resume", &handle], "{\"n\": 5}\n");
        if !out.status.success() || !stdout(&out).contains("\"pid\"") {
            let why = format!(
                "run {run}: status {:?} stdout {:?} stderr {:?}",
                out.status,
                stdout(&out),
                stderr(&out)
            );
            eprintln!("{why}");
            failures.push(why);
        }
    }
    eprintln!("{} of {runs} cold children failed", failures.len());
    drop(seed);
    teardown(tb);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
