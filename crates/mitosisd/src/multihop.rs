//! Multi-hop: a child prepared as a seed in turn (and its children, across hosts).
//!
//! A capture describes the pages a process has, and a child lacks those it never touched: its
//! fault handler here would fetch them from the seed's host. So a child of this daemon is
//! *flattened* before its prepare: its handler fills every page still pending (through this
//! host's replica), then it is captured like any process, and the new seed stands alone (its
//! children never reach back to the older seeds, which may be dropped). A process whose
//! memory still comes through userfaultfd that no handler here can flatten (a process a child
//! forked, or a child of another daemon) is refused: captured as it is, its children would
//! see zeros where it would see its seed's pages.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use mitosis_container::Container;
use mitosis_descriptor::ContainerRef;
use mitosis_fork::fault::Flatten;
use tokio::sync::{mpsc, oneshot};

use crate::errors::PrepareFailed;

/// The longest a flatten may take (it fetches what the child lacks, at most its seed's
/// memory) before the prepare gives up.
const FLATTEN_TIMEOUT: Duration = Duration::from_secs(120);

/// The fault handlers of this daemon's running children that can flatten them, by pid.
#[derive(Default)]
pub struct Flatteners(Mutex<HashMap<i32, mpsc::Sender<Flatten>>>);

impl Flatteners {
    /// Registers child `pid`'s handler; the receiver goes to `fault::serve_flattenable`.
    pub fn add(&self, pid: i32) -> mpsc::Receiver<Flatten> {
        let (tx, rx) = mpsc::channel(4);
        self.0.lock().expect("flatteners").insert(pid, tx);
        rx
    }

    pub fn remove(&self, pid: i32) {
        self.0.lock().expect("flatteners").remove(&pid);
    }

    fn get(&self, pid: i32) -> Option<mpsc::Sender<Flatten>> {
        self.0.lock().expect("flatteners").get(&pid).cloned()
    }
}

/// A running child's container, until the child exits or a seed made of it takes it.
pub type ContainerSlot = Arc<Mutex<Option<Container>>>;

/// The containers of this daemon's running children, by pid, with the bundle each is of.
///
/// A child prepared again keeps running in its container, and its seed's twin is made inside
/// it (same namespaces): so the seed takes the container over ([`ChildContainers::adopt`]),
/// and the child's exit leaves it alone. The seed's descriptor names the bundle, so its
/// children join containers of that bundle on any host, as a bundle seed's do.
#[derive(Default)]
pub struct ChildContainers(Mutex<HashMap<i32, (ContainerSlot, ContainerRef)>>);

impl ChildContainers {
    /// Registers child `pid`'s container (of `bundle`); the slot is emptied by whoever
    /// takes it first: the child's exit or a seed.
    pub fn add(&self, pid: i32, container: Container, bundle: ContainerRef) -> ContainerSlot {
        let slot = Arc::new(Mutex::new(Some(container)));
        self.0
            .lock()
            .expect("child containers")
            .insert(pid, (slot.clone(), bundle));
        slot
    }

    pub fn remove(&self, pid: i32) {
        self.0.lock().expect("child containers").remove(&pid);
    }

    /// The bundle child `pid` runs a container of, if it is a child of this daemon in one.
    pub fn bundle_of(&self, pid: i32) -> Option<ContainerRef> {
        let children = self.0.lock().expect("child containers");
        children.get(&pid).map(|(_, bundle)| bundle.clone())
    }

    /// Takes child `pid`'s container for a seed made of it (none if it exited meanwhile).
    pub fn adopt(&self, pid: i32) -> Option<Container> {
        let slot = self
            .0
            .lock()
            .expect("child containers")
            .get(&pid)
            .map(|(slot, _)| slot.clone())?;
        slot.lock().expect("child container").take()
    }
}

/// Makes `pid` fit for a prepare: a child of this daemon is flattened now (`None`); any other
/// process gets the check that no userfaultfd serves its memory, to run once the capture has
/// let it go on ([`LazyCheck::run`]).
pub async fn before_prepare(
    flatteners: &Flatteners,
    pid: i32,
) -> Result<Option<LazyCheck>, PrepareFailed> {
    let Some(tx) = flatteners.get(pid) else {
        return Ok(Some(LazyCheck { pid }));
    };
    let started = Instant::now();
    let (reply, answer) = oneshot::channel();
    let unavailable = |why: &str| PrepareFailed::MultiHop(format!("flattening child {pid}: {why}"));
    tx.send(reply)
        .await
        .map_err(|_| unavailable("its fault handler has stopped"))?;
    let pages = tokio::time::timeout(FLATTEN_TIMEOUT, answer)
        .await
        .map_err(|_| unavailable("timed out"))?
        .map_err(|_| unavailable("its fault handler has stopped"))?
        .map_err(|e| unavailable(&e.to_string()))?;
    let us = started.elapsed().as_micros() as u64;
    tracing::info!(pid, pages, us, "flattened a child before its prepare");
    Ok(None)
}

/// The check that a process's memory comes through no userfaultfd (smaps `VmFlags: um`).
/// Reading smaps takes milliseconds and the process's memory lock: run beside the rest of
/// the capture, once the process runs again, not before it.
pub struct LazyCheck {
    pid: i32,
}

impl LazyCheck {
    /// A process whose memory still comes from a seed through a userfaultfd nobody here can
    /// bring in is refused: captured as it is, its children would see zeros where it sees its
    /// seed's pages. A check that failed refuses too.
    pub async fn run(self) -> Result<(), PrepareFailed> {
        let pid = self.pid;
        let lazy = tokio::task::spawn_blocking(move || {
            // At the lowest priority: on a small machine the capture's twin, which has to run
            // for each syscall injected into it, would otherwise wait for this read (numpy's
            // one injection took 1.9 ms beside it, 0.1 ms alone).
            let lowered = mitosis_sys::task::set_thread_nice(19).is_ok();
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"));
            if lowered {
                let _ = mitosis_sys::task::set_thread_nice(0);
            }
            lazy_in(&smaps.ok()?)
        })
        .await;
        match lazy {
            Ok(None) => Ok(()),
            Ok(Some(at)) => Err(PrepareFailed::MultiHop(format!(
                "pid {pid} still takes memory from a seed through userfaultfd (at {at:#x}) that \
                 this daemon cannot bring in (a process a child forked, or another daemon's \
                 child): multi-hop is unavailable for it"
            ))),
            Err(e) => Err(PrepareFailed::MultiHop(format!(
                "checking pid {pid}'s memory for userfaultfd: {e}"
            ))),
        }
    }
}

fn lazy_in(smaps: &str) -> Option<u64> {
    let mut start = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "um") {
                return start;
            }
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, _)) = range.split_once('-')
            && let Ok(lo) = u64::from_str_radix(lo, 16)
        {
            start = Some(lo);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::lazy_in;

    #[test]
    fn registered_mappings_are_found_in_smaps() {
        let smaps = "7f00000000-7f00001000 rw-p 00000000 00:00 0 \nRss: 4 kB\nVmFlags: rd wr mr mw me ac sd \n\
                     7f00002000-7f00003000 rw-p 00000000 00:00 0 \nVmFlags: rd wr mr mw me ac um \n";
        assert_eq!(lazy_in(smaps), Some(0x7f00002000));
        assert_eq!(
            lazy_in("7f00000000-7f00001000 r--p 0 0:0 0\nVmFlags: rd mr\n"),
            None
        );
    }
}
