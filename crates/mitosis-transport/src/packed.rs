//! Pages packed for one bulk transfer: cut into chunks of [`CHUNK_PAGES`] pages, each
//! compressed with LZ4 on its own, so the receiver unpacks one while the next is in flight.
//!
//! A seed's memory is mostly interpreter heap, code pointers and zeros: LZ4 shrinks it 2-4x at
//! several GB/s to unpack, which beats sending it raw over TCP.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const PAGE: usize = 4096;
/// Pages per chunk: 256 KiB unpacked.
pub const CHUNK_PAGES: usize = 64;
const CHUNK_BYTES: usize = CHUNK_PAGES * PAGE;

/// One compressed chunk and the size it unpacks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub len: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnpackError {
    #[error("chunk claims {0} bytes (at most {CHUNK_BYTES}, whole pages)")]
    BadLength(u32),
    #[error("corrupt chunk: {0}")]
    Corrupt(String),
    #[error("chunk unpacked to {got} bytes, {want} expected")]
    ShortChunk { got: usize, want: usize },
}

/// Packs `data` (whole pages) into chunks.
pub fn pack(data: &[u8]) -> Vec<Chunk> {
    data.chunks(CHUNK_BYTES)
        .map(|c| Chunk {
            len: c.len() as u32,
            data: lz4_flex::block::compress(c),
        })
        .collect()
}

/// Unpacks one chunk, appending it to `out`. A chunk never claims more than [`CHUNK_BYTES`],
/// so a hostile length cannot make us allocate much.
pub fn unpack_into(chunk: &Chunk, out: &mut Vec<u8>) -> Result<(), UnpackError> {
    let want = chunk.len as usize;
    if want == 0 || want > CHUNK_BYTES || want % PAGE != 0 {
        return Err(UnpackError::BadLength(chunk.len));
    }
    let at = out.len();
    out.resize(at + want, 0);
    let got = lz4_flex::block::decompress_into(&chunk.data, &mut out[at..]).map_err(|e| {
        out.truncate(at);
        UnpackError::Corrupt(e.to_string())
    })?;
    if got != want {
        out.truncate(at);
        return Err(UnpackError::ShortChunk { got, want });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> Vec<u8> {
        (0..n * PAGE).map(|i| (i / 7 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_across_chunks() {
        let data = pages(CHUNK_PAGES * 2 + 3);
        let chunks = pack(&data);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.data.len() < c.len as usize));
        let mut out = Vec::new();
        for c in &chunks {
            unpack_into(c, &mut out).unwrap();
        }
        assert_eq!(out, data);
        assert!(pack(&[]).is_empty());
    }

    #[test]
    fn hostile_chunks_are_refused_and_leave_out_unchanged() {
        let good = pack(&pages(2)).remove(0);
        let mut out = vec![1, 2, 3];
        for len in [0, 1, CHUNK_BYTES as u32 + PAGE as u32, u32::MAX] {
            let c = Chunk {
                len,
                data: good.data.clone(),
            };
            assert_eq!(unpack_into(&c, &mut out), Err(UnpackError::BadLength(len)));
        }
        // Claims more than it holds.
        let short = Chunk {
            len: 3 * PAGE as u32,
            data: good.data.clone(),
        };
        assert!(unpack_into(&short, &mut out).is_err());
        // Garbage.
        let junk = Chunk {
            len: PAGE as u32,
            data: vec![0xff; 40],
        };
        assert!(matches!(
            unpack_into(&junk, &mut out),
            Err(UnpackError::Corrupt(_))
        ));
        assert_eq!(out, vec![1, 2, 3]);
    }
}
