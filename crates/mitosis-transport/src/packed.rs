//! Pages for one bulk transfer, cut into chunks of [`CHUNK_PAGES`] pages so the receiver
//! installs one while the next is in flight; each chunk raw or compressed with LZ4.
//!
//! A seed's memory is mostly interpreter heap, code pointers and zeros: LZ4 shrinks it 2-4x,
//! which pays where the network is slower than unpacking (about 2.5 GB/s per core here).
//! Between hosts of one machine, or on a fast network, raw chunks cost less: the receiver
//! keeps the bytes it read as they are.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const PAGE: usize = 4096;
/// Pages per chunk: 256 KiB unpacked.
pub const CHUNK_PAGES: usize = 64;
const CHUNK_BYTES: usize = CHUNK_PAGES * PAGE;

/// How chunks are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    #[default]
    Raw,
    Lz4,
}

impl FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Codec::Raw),
            "lz4" => Ok(Codec::Lz4),
            other => Err(format!("unknown codec {other:?} (raw or lz4)")),
        }
    }
}

/// One chunk of whole pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    Raw(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Compressed, and the size it unpacks to.
    Lz4 {
        len: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnpackError {
    #[error("chunk claims {0} bytes (at most {CHUNK_BYTES}, whole pages)")]
    BadLength(usize),
    #[error("corrupt chunk: {0}")]
    Corrupt(String),
    #[error("chunk unpacked to {got} bytes, {want} expected")]
    ShortChunk { got: usize, want: usize },
}

/// Packs `data` (whole pages) into chunks.
pub fn pack(data: &[u8], codec: Codec) -> Vec<Chunk> {
    data.chunks(CHUNK_BYTES)
        .map(|c| match codec {
            Codec::Raw => Chunk::Raw(c.to_vec()),
            Codec::Lz4 => Chunk::Lz4 {
                len: c.len() as u32,
                data: lz4_flex::block::compress(c),
            },
        })
        .collect()
}

/// The pages of one chunk. A chunk never holds more than [`CHUNK_BYTES`], so a hostile
/// length cannot make us allocate much.
pub fn unpack(chunk: Chunk) -> Result<Vec<u8>, UnpackError> {
    let check = |len: usize| {
        if len == 0 || len > CHUNK_BYTES || len % PAGE != 0 {
            return Err(UnpackError::BadLength(len));
        }
        Ok(len)
    };
    match chunk {
        Chunk::Raw(data) => check(data.len()).map(|_| data),
        Chunk::Lz4 { len, data } => {
            let want = check(len as usize)?;
            let mut out = vec![0; want];
            let got = lz4_flex::block::decompress_into(&data, &mut out)
                .map_err(|e| UnpackError::Corrupt(e.to_string()))?;
            if got != want {
                return Err(UnpackError::ShortChunk { got, want });
            }
            Ok(out)
        }
    }
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
        for codec in [Codec::Raw, Codec::Lz4] {
            let chunks = pack(&data, codec);
            assert_eq!(chunks.len(), 3);
            let out: Vec<u8> = chunks
                .into_iter()
                .flat_map(|c| unpack(c).unwrap())
                .collect();
            assert_eq!(out, data);
            assert!(pack(&[], codec).is_empty());
        }
        let packed = pack(&data, Codec::Lz4);
        assert!(
            packed
                .iter()
                .all(|c| matches!(c, Chunk::Lz4 { len, data } if data.len() < *len as usize))
        );
    }

    #[test]
    fn codecs_parse() {
        assert_eq!("raw".parse(), Ok(Codec::Raw));
        assert_eq!("lz4".parse(), Ok(Codec::Lz4));
        assert!("zstd".parse::<Codec>().is_err());
    }

    #[test]
    fn hostile_chunks_are_refused() {
        let Chunk::Lz4 { data: good, .. } = pack(&pages(2), Codec::Lz4).remove(0) else {
            panic!("an lz4 chunk");
        };
        for len in [0, 1, CHUNK_BYTES as u32 + PAGE as u32, u32::MAX] {
            let c = Chunk::Lz4 {
                len,
                data: good.clone(),
            };
            assert_eq!(unpack(c), Err(UnpackError::BadLength(len as usize)));
        }
        for len in [0, 1, PAGE + 1, CHUNK_BYTES + PAGE] {
            assert_eq!(
                unpack(Chunk::Raw(vec![0; len])),
                Err(UnpackError::BadLength(len))
            );
        }
        // Claims more than it holds.
        let short = Chunk::Lz4 {
            len: 3 * PAGE as u32,
            data: good.clone(),
        };
        assert!(unpack(short).is_err());
        // Garbage.
        let junk = Chunk::Lz4 {
            len: PAGE as u32,
            data: vec![0xff; 40],
        };
        assert!(matches!(unpack(junk), Err(UnpackError::Corrupt(_))));
    }
}
