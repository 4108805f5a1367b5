//! The floor under a new host: the time to move the bytes a cold-host child received (its
//! bootstrap) over TCP from host 0 to host 1 into fresh memory, as the replica reads them,
//! with nothing else done. A cold-host child cannot have all its pages sooner however they
//! travel, so where this alone is over a target, the target is out of reach on this machine.
//!
//! `mitosis-bench transfer serve PORT` (on host 0) answers each 8-byte length it reads with
//! that many bytes; `mitosis-bench transfer fetch ADDR:PORT BYTES SAMPLES` (on host 1) asks
//! `SAMPLES` times on one connection and prints each transfer's µs on a line of its own.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mitosis_testbed::Host;

use crate::procs::{Server, run_ok};
use crate::results::{Method, SeedResult, TRANSFER_FLOOR};

/// Port of the server on host 0.
const PORT: u16 = 7179;
/// Most bytes one request may ask for (the largest bootstrap is 128 MiB).
const MOST: u64 = 1 << 30;
/// Bytes written per write.
const BLOCK: usize = 1 << 20;

/// `mitosis-bench transfer ...`: the two ends, each run inside its host's namespace.
pub fn main(argv: Vec<String>) -> Result<i32> {
    match argv.iter().map(String::as_str).collect::<Vec<_>>()[1..] {
        ["serve", port] => serve(port.parse().context("port")?),
        ["fetch", addr, bytes, samples] => {
            let bytes = bytes.parse().context("bytes")?;
            let samples = samples.parse().context("samples")?;
            for took in fetch(addr, bytes, samples)? {
                println!("{}", took.as_micros());
            }
            Ok(0)
        }
        _ => bail!("usage: mitosis-bench transfer serve PORT | fetch ADDR:PORT BYTES SAMPLES"),
    }
}

fn serve(port: u16) -> Result<i32> {
    let listener = TcpListener::bind(("0.0.0.0", port)).context("listening")?;
    println!("ready");
    let block = vec![0x5au8; BLOCK];
    for stream in listener.incoming() {
        let mut stream = stream.context("accepting")?;
        stream.set_nodelay(true)?;
        let mut len = [0u8; 8];
        while stream.read_exact(&mut len).is_ok() {
            let mut left = u64::from_le_bytes(len).min(MOST);
            while left > 0 {
                let n = left.min(BLOCK as u64) as usize;
                stream.write_all(&block[..n])?;
                left -= n as u64;
            }
        }
    }
    Ok(0)
}

fn fetch(addr: &str, bytes: u64, samples: usize) -> Result<Vec<Duration>> {
    anyhow::ensure!(bytes <= MOST, "at most {MOST} bytes");
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut took = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        // Fresh zeroed memory (mapped on demand), as a replica's pages are before they come.
        let mut into = vec![0u8; bytes as usize];
        stream.write_all(&bytes.to_le_bytes())?;
        stream.read_exact(&mut into).context("reading")?;
        took.push(start.elapsed());
        drop(into);
    }
    Ok(took)
}

/// The transfer floor row of one seed: `bytes` (what a cold-host child received) from host 0
/// to `to`, `samples` times after `warmup`.
pub fn floor(
    from: &Host,
    to: &Host,
    bytes: u64,
    (warmup, samples): (usize, usize),
    out: &mut SeedResult,
) {
    let took = measure(from, to, bytes, warmup + samples);
    out.transfer_bytes = Some(bytes);
    out.methods.push(Method::measured(
        TRANSFER_FLOOR,
        "transfer floor (its bootstrap, TCP)",
        (warmup, samples),
        took,
    ));
}

pub fn measure(from: &Host, to: &Host, bytes: u64, samples: usize) -> Result<Vec<Duration>> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut serve = from.command(&exe);
    serve.args(["transfer", "serve", &PORT.to_string()]);
    let _server = Server::start(serve).context("starting the transfer server")?;
    let mut fetch = to.command(&exe);
    fetch.args([
        "transfer",
        "fetch",
        &format!("{}:{PORT}", from.addr()),
        &bytes.to_string(),
        &samples.to_string(),
    ]);
    let (_, stdout, _) = run_ok(fetch).context("fetching")?;
    stdout
        .lines()
        .map(|l| Ok(Duration::from_micros(l.trim().parse()?)))
        .collect()
}
