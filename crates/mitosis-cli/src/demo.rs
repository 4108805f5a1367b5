//! `mitosis demo` (filled in below).

use anyhow::Result;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Children to resume on the second host.
    #[arg(long, default_value_t = 20)]
    children: usize,
}

pub fn run(_args: DemoArgs) -> Result<i32> {
    anyhow::bail!("demo not written yet")
}
