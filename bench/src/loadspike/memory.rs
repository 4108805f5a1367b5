//! Memory and instances over time: every sample sums the PSS of every function process on
//! every host (the processes under the hosts' daemons: seeds, replicas, children, instances;
//! not the daemons nor their containers' idle `mitosis-init`), and asks each daemon how many
//! seeds, replicas and children it has.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The name of the daemons' stub processes (idle, or replicas of seeds).
pub const STUB: &str = "mitosis-stub";

/// One sample, `t` seconds after the replay started.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    /// Sum of the PSS of the function processes, MiB.
    pub pss_mib: f64,
    /// Function processes (seeds, replicas, children, kept instances, idle stubs).
    pub processes: usize,
    /// Those that run the function: seeds, children, kept instances (not `mitosis-stub`s:
    /// the daemons' idle stubs and the replicas).
    pub instances: usize,
    /// From the daemons' status: seeds, replicas and children running, all hosts.
    pub seeds: usize,
    pub replicas: usize,
    pub children: u64,
}

/// The hosts to watch: each daemon's pid and control socket.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub pid: u32,
    pub socket: PathBuf,
}

/// Samples every `every` on a thread of its own until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    pub fn start(daemons: Vec<Daemon>, every: Duration, from: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                samples.push(sample(&daemons, from));
                next += every;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            samples.push(sample(&daemons, from));
            samples
        });
        Sampler { stop, thread }
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// One sample now.
pub fn sample(daemons: &[Daemon], from: Instant) -> Sample {
    let t = from.elapsed().as_secs_f64();
    let roots: Vec<u32> = daemons.iter().map(|d| d.pid).collect();
    let mut pss_kib = 0u64;
    let (mut processes, mut instances) = (0, 0);
    for (pid, name) in function_processes(&roots) {
        if let Some(kib) = pss_kib_of(pid) {
            pss_kib += kib;
            processes += 1;
            instances += usize::from(name != STUB);
        }
    }
    let (mut seeds, mut replicas, mut children) = (0, 0, 0);
    for d in daemons {
        if let Ok(s) = mitosis_client::Client::connect(&d.socket).and_then(|c| c.status()) {
            seeds += s.seeds.len();
            replicas += s.replicas.len();
            children += s.children_running;
        }
    }
    Sample {
        t,
        pss_mib: pss_kib as f64 / 1024.0,
        processes,
        instances,
        seeds,
        replicas,
        children,
    }
}

/// Every descendant of `roots` but containers' init processes, with its name.
pub fn function_processes(roots: &[u32]) -> Vec<(u32, String)> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((comm, ppid)) = stat(pid) {
            children.entry(ppid).or_default().push(pid);
            names.insert(pid, comm);
        }
    }
    let mut out = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            todo.push(child);
            match names.remove(&child) {
                Some(name) if name != "mitosis-init" => out.push((child, name)),
                _ => {}
            }
        }
    }
    out
}

/// A process's name and parent, from /proc/PID/stat (the name may hold spaces and ')').
fn stat(pid: u32) -> Option<(String, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let ppid = text
        .get(close + 2..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((comm, ppid))
}

/// The process's proportional set size, KiB (none for a process gone or a kernel thread).
fn pss_kib_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss(&text)
}

fn parse_pss(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let text = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  4096 kB\nPss:  1234 kB\n\
                    Pss_Anon:  1000 kB\n";
        assert_eq!(parse_pss(text), Some(1234));
        // This process has a PSS of its own.
        assert!(pss_kib_of(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn descendants_are_found_through_parents() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let found = function_processes(&[me]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found.contains(&(child.id(), "sleep".to_owned())),
            "{found:?}"
        );
        assert_eq!(
            stat(me).map(|(_, p)| p),
            Some(std::os::unix::process::parent_id())
        );
    }
}
