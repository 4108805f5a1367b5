//! Length-prefixed postcard frames for the daemon-stub channel (blocking, tiny).

use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("messages serialize to memory");
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Decodes a frame from the front of `buf`, or `None` if it is not complete yet.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> io::Result<Option<T>> {
    let Some(header) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
    let Some(body) = buf.get(4..4 + len) else { return Ok(None) };
    postcard::from_bytes(body).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one whole frame from a blocking reader.
pub fn read<T: DeserializeOwned>(r: &mut impl io::Read) -> io::Result<T> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
