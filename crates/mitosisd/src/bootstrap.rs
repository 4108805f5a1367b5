//! What a new host needs to build its replica of one of our seeds, packed once and served to
//! every host: the seed-written pages of its file mappings, the pages its threads touch at
//! once, and its working set. A twin never changes, so packed pages never go stale; the pack
//! is remade when the working set has grown (see [`packed`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mitosis_fork::replica_pages::{Bulk, chunk_runs};
use mitosis_fork::restore::bootstrap_pages;
use mitosis_fork::source::read_runs;
use mitosis_transport::frame;
use mitosis_transport::packed::{self, Codec};
use mitosis_transport::peer::{
    Bootstrap, BootstrapPages, Leased, MAX_BOOTSTRAP_PAGES, PagesFollow, PeerError, RemoteError,
    Response, page_runs,
};
use tokio::sync::mpsc;

use crate::registry::Seed;

/// How a bootstrap's pages go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Raw and unframed, for the new host's replica to read straight from the socket.
    Raw,
    /// In `Chunk` frames packed with the codec, for the new host's daemon to install.
    Chunks(Codec),
}

impl Wire {
    /// The daemon's `--bootstrap-codec` on a plain connection; on TLS always chunks (raw
    /// chunks for `raw`), as no replica can read encrypted bytes from the socket.
    pub fn of(codec: Codec, tls: bool) -> Wire {
        match (codec, tls) {
            (Codec::Raw, false) => Wire::Raw,
            (codec, _) => Wire::Chunks(codec),
        }
    }
}

/// A seed's bootstrap pages, ready to send.
pub struct Packed {
    /// Working-set pages when packed: a larger set since makes a new pack.
    working_set: usize,
    /// How its pages go.
    wire: Wire,
    /// The `Bootstrap` frame (descriptor and runs), then one frame per chunk.
    pub frames: Vec<Vec<u8>>,
    /// Bytes on the wire.
    pub bytes: u64,
}

#[derive(Default)]
pub struct BootstrapCache {
    packed: Mutex<Option<Arc<Packed>>>,
    /// A pack is being made (in the background): a request that finds none waits for it.
    repacking: AtomicBool,
    /// Told when a pack made in the background is in place.
    ready: tokio::sync::Notify,
}

impl BootstrapCache {
    fn current(&self, wire: Wire, working_set: usize) -> Option<Arc<Packed>> {
        self.packed
            .lock()
            .expect("bootstrap lock")
            .clone()
            .filter(|p| p.wire == wire && working_set <= p.working_set + p.working_set / 4)
    }
}

/// Packs the seed's bootstrap in the background now (unless a pack is under way): for a seed
/// whose first children will want more than its eager pages, a profile's carried pages.
/// Requests that come meanwhile wait for it rather than pack again.
pub fn pack_ahead(seed: Arc<Seed>, wire: Wire) {
    if seed.bootstrap.repacking.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::task::spawn_blocking(move || repack(&seed, wire));
}

/// Packs in place of the last pack, then lets waiters know.
fn repack(seed: &Arc<Seed>, wire: Wire) {
    match pack(seed, wire) {
        Ok(p) => *seed.bootstrap.packed.lock().expect("bootstrap lock") = Some(Arc::new(p)),
        Err(e) => tracing::debug!(seed = seed.id, "packing: {e}"),
    }
    seed.bootstrap.repacking.store(false, Ordering::Release);
    seed.bootstrap.ready.notify_waiters();
}

/// The seed's packed bootstrap. The last pack is served at once if it is close to the working
/// set (and remade in the background if that grew a little); a first pack, or one that lacks
/// much of the working set (the first children just recorded it), is made now.
pub async fn packed(seed: &Arc<Seed>, wire: Wire) -> Result<Arc<Packed>, RemoteError> {
    let cache = &seed.bootstrap;
    let now = seed.working_set_len();
    let mut current = cache.current(wire, now);
    if current.is_none() && cache.repacking.load(Ordering::Acquire) {
        // A pack under way (one made ahead at prepare): wait for it rather than pack twice.
        let ready = cache.ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        if cache.repacking.load(Ordering::Acquire) {
            ready.await;
        }
        current = cache.current(wire, now);
    }
    match current {
        Some(p) => {
            if p.working_set != now && !cache.repacking.swap(true, Ordering::AcqRel) {
                let seed = seed.clone();
                tokio::task::spawn_blocking(move || repack(&seed, wire));
            }
            Ok(p)
        }
        None => {
            let seed = seed.clone();
            tokio::task::spawn_blocking(move || {
                let p = Arc::new(pack(&seed, wire)?);
                *seed.bootstrap.packed.lock().expect("bootstrap lock") = Some(p.clone());
                Ok(p)
            })
            .await
            .map_err(|e| RemoteError::SeedGone(format!("packing: {e}")))?
        }
    }
}

/// The seed's bootstrap pages and how many of them are its working set.
fn bootstrap_runs(seed: &Seed) -> (Vec<(u64, u32)>, usize) {
    let working_set = seed.working_set_pages();
    let mut pages = bootstrap_pages(&seed.descriptor);
    pages.extend(&working_set);
    pages.extend(seed.carried_pages());
    pages.sort_unstable();
    pages.dedup();
    pages.truncate(MAX_BOOTSTRAP_PAGES as usize);
    (page_runs(&pages), working_set.len())
}

/// A seed's descriptor and its bootstrap pages as they come in, in chunks of
/// [`packed::CHUNK_PAGES`] pages.
pub struct Incoming {
    pub descriptor: Vec<u8>,
    pub runs: Vec<(u64, u32)>,
    /// A seed of a profile: its replica's children show it every page they touch while its
    /// bootstrap holds nothing beyond the eager pages (see `Response::Bootstrap`).
    pub learn: bool,
    chunks: Chunks,
}

enum Chunks {
    Peer(mpsc::Receiver<Result<Vec<u8>, PeerError>>),
    Local(mpsc::Receiver<Result<Vec<u8>, String>>),
    /// Raw in a connection, until the replica takes them.
    Stream(Option<Leased>),
}

impl Incoming {
    /// From a peer's page server (the pool's bootstrap exchange).
    pub fn from_peer(boot: Bootstrap) -> Self {
        Incoming {
            descriptor: boot.descriptor,
            runs: boot.runs,
            learn: boot.learn,
            chunks: match boot.pages {
                BootstrapPages::Chunks(rx) => Chunks::Peer(rx),
                BootstrapPages::Stream(leased) => Chunks::Stream(Some(leased)),
            },
        }
    }

    /// From a seed of this host: read from its twin, chunk by chunk, on a blocking thread.
    pub fn from_local(seed: Arc<Seed>) -> Self {
        let (runs, _) = bootstrap_runs(&seed);
        let (tx, rx) = mpsc::channel(8);
        let groups = chunk_runs(&runs, packed::CHUNK_PAGES as u32);
        let memory = seed.memory.clone();
        tokio::task::spawn_blocking(move || {
            for group in groups {
                let data = read_runs(&memory, &group)
                    .map_err(|e| format!("the seed's memory is gone: {e}"));
                let failed = data.is_err();
                if tx.blocking_send(data).is_err() || failed {
                    return;
                }
            }
        });
        Incoming {
            descriptor: seed.encoded.clone(),
            runs,
            learn: seed.profile().is_some(),
            chunks: Chunks::Local(rx),
        }
    }

    /// The connection the pages wait in raw, for the replica to read them itself.
    pub fn take_stream(&mut self) -> Option<Leased> {
        match &mut self.chunks {
            Chunks::Stream(leased) => leased.take(),
            _ => None,
        }
    }

    /// The next chunk's pages: `runs` (that chunk's share of [`Incoming::runs`]) and their
    /// bytes. An error if the pages stopped coming or came short.
    pub async fn next(&mut self, runs: Vec<(u64, u32)>) -> Result<Bulk, String> {
        let data = match &mut self.chunks {
            Chunks::Peer(rx) => rx.recv().await.map(|r| r.map_err(|e| e.to_string())),
            Chunks::Local(rx) => rx.recv().await,
            Chunks::Stream(_) => None,
        }
        .ok_or("the bootstrap pages stopped coming")??;
        let want: usize = runs.iter().map(|r| r.1 as usize * packed::PAGE).sum();
        if data.len() != want {
            return Err("the bootstrap pages came in chunks of the wrong size".into());
        }
        Ok(Bulk { runs, data })
    }
}

/// Packs the seed's bootstrap pages now.
pub fn pack(seed: &Seed, wire: Wire) -> Result<Packed, RemoteError> {
    let (runs, working_set) = bootstrap_runs(seed);
    let data = read_runs(&seed.memory, &runs).map_err(|e| RemoteError::SeedGone(e.to_string()))?;
    let answer = |follow| {
        frame::encode(&Response::Bootstrap {
            descriptor: seed.encoded.clone(),
            runs: runs.clone(),
            follow,
            learn: seed.profile().is_some(),
        })
    };
    // Raw pages go unframed: the new host's replica reads them straight into place.
    let frames = match wire {
        Wire::Raw => vec![answer(PagesFollow::Raw), data],
        Wire::Chunks(codec) => {
            let chunks = packed::pack(&data, codec);
            let mut frames = vec![answer(PagesFollow::Chunks(chunks.len() as u32))];
            frames.extend(
                chunks
                    .into_iter()
                    .map(|c| frame::encode(&Response::Chunk(c))),
            );
            frames
        }
    };
    Ok(Packed {
        working_set,
        wire,
        bytes: frames.iter().map(|f| f.len() as u64).sum(),
        frames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_always_frames_the_pages() {
        assert_eq!(Wire::of(Codec::Raw, false), Wire::Raw);
        assert_eq!(Wire::of(Codec::Raw, true), Wire::Chunks(Codec::Raw));
        assert_eq!(Wire::of(Codec::Lz4, false), Wire::Chunks(Codec::Lz4));
        assert_eq!(Wire::of(Codec::Lz4, true), Wire::Chunks(Codec::Lz4));
    }
}
