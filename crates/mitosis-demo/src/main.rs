//! `mitosis-demo`: remote-fork a warmed Python function across two simulated hosts (network
//! namespaces with a daemon each), through the `mitosis` CLI beside it, and report timings.
//! Needs root (network namespaces, ptrace, userfaultfd).

mod demo;
mod demo_bundle;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MITOSIS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = demo::DemoArgs::parse();
    match demo::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mitosis-demo: {e:#}");
            std::process::exit(1);
        }
    }
}
