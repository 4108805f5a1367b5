//! What one page request costs over the daemons' own protocol, beside the same bytes over
//! raw TCP: a child's fault waits for one such request (the pending pages of a block of 16
//! around it; 64 on a host that knew nothing of the seed). Where the first child is slow,
//! this says how much of each round trip is the protocol and how much the network.
//!
//! `mitosis-bench fetch PAGES SAMPLES` (on host 1, the handle in `MITOSIS_HANDLE`: never on a
//! command line) asks the seed's daemon for `SAMPLES` blocks of `PAGES` of the seed's pages,
//! each block new, on a pooled connection, from a task of a two-worker runtime with the
//! daemon's allocator settings, as a fault handler would; it prints each request's µs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mitosis_descriptor::Handle;
use mitosis_testbed::Host;
use mitosis_transport::peer::{PeerPool, SeedRef};

use crate::procs::run_ok;
use crate::results::{Method, PAGE_REQUEST, PAGE_REQUEST_TCP, SeedResult};

/// Pages per request measured: a fault's block after a bootstrap, and on a host with none.
pub const BLOCKS: [u32; 2] = [16, 64];

/// `mitosis-bench fetch PAGES SAMPLES`, run inside host 1's namespace.
pub fn main(argv: Vec<String>) -> Result<i32> {
    let (pages, samples) = match argv.iter().map(String::as_str).collect::<Vec<_>>()[1..] {
        [pages, samples] => (
            pages.parse().context("pages")?,
            samples.parse().context("samples")?,
        ),
        _ => bail!("usage: MITOSIS_HANDLE=... mitosis-bench fetch PAGES SAMPLES"),
    };
    let handle: Handle = std::env::var("MITOSIS_HANDLE")
        .context("MITOSIS_HANDLE")?
        .trim()
        .parse()
        .context("MITOSIS_HANDLE")?;
    for took in fetch(&handle, pages, samples)? {
        println!("{}", took.as_micros());
    }
    Ok(0)
}

fn fetch(handle: &Handle, pages: u32, samples: usize) -> Result<Vec<Duration>> {
    mitosis_sys::alloc::keep_page_buffers();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (addr, seed) = (
        handle.host,
        SeedRef {
            id: handle.seed_id,
            key: handle.key,
        },
    );
    runtime.block_on(async move {
        // A task on a worker, as a fault handler is: the runtime's I/O wakes it in place.
        tokio::spawn(async move {
            let pool = Arc::new(PeerPool::new(4, Duration::from_secs(5)));
            let encoded = pool.descriptor(addr, seed).await?;
            let descriptor = mitosis_descriptor::decode(&encoded)?;
            let blocks = blocks_of(
                descriptor.vmas.iter().map(|v| (v.start, &v.seed_pages)),
                pages,
            );
            anyhow::ensure!(!blocks.is_empty(), "the seed has no run of {pages} pages");
            let mut took = Vec::with_capacity(samples);
            for at in blocks.iter().cycle().take(samples) {
                let start = Instant::now();
                let bytes = pool.pages(addr, seed, vec![(*at, pages)], None).await?;
                took.push(start.elapsed());
                anyhow::ensure!(bytes.len() == pages as usize * 4096, "short answer");
            }
            Ok(took)
        })
        .await?
    })
}

/// The starts of every whole block of `pages` of the seed's pages (per mapping: its start and
/// its seed pages), in address order.
fn blocks_of<'a>(
    mappings: impl IntoIterator<Item = (u64, &'a mitosis_descriptor::PageSet)>,
    pages: u32,
) -> Vec<u64> {
    let pages = u64::from(pages);
    mappings
        .into_iter()
        .flat_map(|(start, seed_pages)| {
            seed_pages.runs().iter().flat_map(move |&(first, count)| {
                (0..count / pages).map(move |i| start + (first + i * pages) * 4096)
            })
        })
        .collect()
}

/// The page-request rows of one seed (`handle`, served by host 0): per block size, requests
/// from `to` over the protocol, then the same bytes over raw TCP.
pub fn rows(
    from: &Host,
    to: &Host,
    handle: &str,
    (warmup, samples): (usize, usize),
    out: &mut SeedResult,
) {
    for pages in BLOCKS {
        let i = block_index(pages);
        let took = measure(to, handle, pages, warmup + samples);
        out.methods.push(Method::measured(
            PAGE_REQUEST[i],
            label(pages, false),
            (warmup, samples),
            took,
        ));
        let took = crate::transfer::measure(from, to, u64::from(pages) * 4096, warmup + samples);
        out.methods.push(Method::measured(
            PAGE_REQUEST_TCP[i],
            label(pages, true),
            (warmup, samples),
            took,
        ));
    }
}

fn block_index(pages: u32) -> usize {
    BLOCKS
        .iter()
        .position(|&b| b == pages)
        .expect("a measured block")
}

fn label(pages: u32, tcp: bool) -> &'static str {
    match (pages, tcp) {
        (16, false) => "page request, 16 pages (protocol)",
        (16, true) => "  its bytes over TCP (floor)",
        (_, false) => "page request, 64 pages (protocol)",
        (_, true) => "  its bytes over TCP (floor)",
    }
}

fn measure(to: &Host, handle: &str, pages: u32, samples: usize) -> Result<Vec<Duration>> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut fetch = to.command(&exe);
    fetch
        .args(["fetch", &pages.to_string(), &samples.to_string()])
        .env("MITOSIS_HANDLE", handle);
    let (_, stdout, _) = run_ok(fetch).context("fetching pages")?;
    stdout
        .lines()
        .map(|l| Ok(Duration::from_micros(l.trim().parse()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_runs_of_seed_pages() {
        let mut set = mitosis_descriptor::PageSet::default();
        set.push_run(0, 40);
        set.push_run(50, 10);
        assert_eq!(blocks_of([(0x10000, &set)], 16), vec![0x10000, 0x20000]);
        assert!(blocks_of([(0x10000, &set)], 64).is_empty());
    }
}
