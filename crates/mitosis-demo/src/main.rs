//! `mitosis-demo`: a Python function deployed on mitosis-platform over simulated hosts
//! (network namespaces with a daemon each) and called by concurrent clients through Fn's API;
//! `--primitive`: the remote fork itself through the `mitosis` CLI across two hosts. Needs root
//! (network namespaces, ptrace, userfaultfd).

mod demo;
mod demo_bundle;
mod platform;

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
    let result = if args.primitive {
        demo::run(args)
    } else {
        platform::run(&args)
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mitosis-demo: {e:#}");
            std::process::exit(1);
        }
    }
}
