//! The results file (bench-results.json) and the chart drawn from it (bench-results.png).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::Args;
use crate::json;
use crate::procs::run_ok;
use crate::results::SeedResult;

/// Writes bench-results.json and draws bench-results.png from it.
pub fn write(
    args: &Args,
    results: &[SeedResult],
    out_dir: &Path,
    criu_ok: &Result<crate::criu::Criu, String>,
) -> Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let doc = json::Results {
        config: json::Config {
            children: args.children,
            cold_samples: args.cold_samples,
            warmup: args.warmup,
            bigheap_mib: args.bigheap_mib,
            throughput_secs: args.throughput_secs,
            concurrency: args.concurrency,
            pin: args.pin.clone(),
            tls: args.tls,
        },
        machine: json::Machine {
            cpus,
            kernel: kernel.trim().to_owned(),
            criu: criu_ok.as_ref().err().cloned(),
            criu_lazy: criu_ok
                .as_ref()
                .ok()
                .and_then(|c| c.lazy.as_ref().err().cloned()),
        },
        seeds: results.iter().map(SeedResult::to_json).collect(),
    };
    let json_path = out_dir.join("bench-results.json");
    let text = json::pretty(&doc).context("encoding the results")?;
    std::fs::write(&json_path, text).with_context(|| format!("writing {}", json_path.display()))?;
    println!("results: {}", json_path.display());

    let png_path = out_dir.join("bench-results.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plot.py");
    let mut cmd = Command::new(&args.python);
    cmd.arg(&script).arg(&json_path).arg(&png_path);
    match run_ok(cmd) {
        Ok(_) => println!("plot: {}", png_path.display()),
        // The numbers are already out; a missing Pillow only costs the picture.
        Err(err) => println!("plot: not drawn: {err:#}"),
    }
    Ok(())
}
