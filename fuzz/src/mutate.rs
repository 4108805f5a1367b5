//! A small deterministic mutator for the bounded loop `cargo test` runs (AFL++ brings its own):
//! AFL's havoc stages in miniature, plus length-field tweaks and splices of corpus entries.

use fastrand::Rng;

use crate::{LengthField, Target};

/// Values that sit on the edges decoders test against.
const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    0x7f,
    0x80,
    4096,
    256 * 1024,
    (64 << 20) - 1,
    (64 << 20) + 1,
    i32::MAX as u32,
    u32::MAX,
];

/// A mutant of one of `corpus`'s entries (one to four mutations stacked).
pub fn mutant(rng: &mut Rng, target: &Target, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = corpus[rng.usize(..corpus.len())].clone();
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(..9) {
            0 if !b.is_empty() => {
                let i = rng.usize(..b.len());
                b[i] ^= 1 << rng.u8(..8);
            }
            1 if !b.is_empty() => {
                let i = rng.usize(..b.len());
                b[i] = *rng
                    .choice(&[0, 1, 0x7f, 0x80, 0xff, b'/', b':'])
                    .expect("values");
            }
            2 => b.truncate(rng.usize(..=b.len())),
            3 if !b.is_empty() => {
                let at = rng.usize(..b.len());
                let n = rng.usize(1..=(b.len() - at).min(64));
                b.drain(at..at + n);
            }
            4 => insert(rng, target, &mut b),
            5 => tweak_length(rng, target.length_field, &mut b),
            6 => write_varint(rng, &mut b),
            7 => {
                // Splice: this entry's front, another's back.
                let other = &corpus[rng.usize(..corpus.len())];
                b.truncate(rng.usize(..=b.len()));
                b.extend_from_slice(&other[rng.usize(..=other.len())..]);
            }
            _ if b.len() >= 2 => {
                // Copy a block of the input over another place in it.
                let n = rng.usize(1..=b.len().min(32));
                let (from, to) = (rng.usize(..=b.len() - n), rng.usize(..=b.len() - n));
                b.copy_within(from..from + n, to);
            }
            _ => {}
        }
    }
    // Half the mutants get a length that fits again, so body mutations reach the decoder
    // rather than stop at "incomplete".
    if let Some(LengthField { offset, from }) = target.length_field {
        if b.len() >= from && rng.bool() {
            let fits = (b.len() - from) as u32;
            b[offset..offset + 4].copy_from_slice(&fits.to_le_bytes());
        }
    }
    b
}

/// Inserts a token (for text targets) or a few random bytes.
fn insert(rng: &mut Rng, target: &Target, b: &mut Vec<u8>) {
    let at = rng.usize(..=b.len());
    let piece: Vec<u8> = match rng.choice(target.tokens) {
        Some(token) if rng.bool() => token.to_vec(),
        _ => (0..rng.usize(1..=8)).map(|_| rng.u8(..)).collect(),
    };
    b.splice(at..at, piece);
}

/// Rewrites the input's length field: to fit the input, off by one, or an edge value.
fn tweak_length(rng: &mut Rng, field: Option<LengthField>, b: &mut [u8]) {
    let Some(LengthField { offset, from }) = field else {
        return;
    };
    let fits = b.len().saturating_sub(from) as u32;
    let Some(slot) = b.get_mut(offset..offset + 4) else {
        return;
    };
    let value = match rng.u8(..4) {
        0 => fits,
        1 => fits.wrapping_add(1),
        2 => fits.wrapping_sub(1),
        _ => *rng.choice(&INTERESTING_U32).expect("values"),
    };
    slot.copy_from_slice(&value.to_le_bytes());
}

/// Overwrites a byte with a postcard varint of an edge value: where a length prefix or an enum
/// tag sat, it now claims something else.
fn write_varint(rng: &mut Rng, b: &mut Vec<u8>) {
    if b.is_empty() {
        return;
    }
    let mut v = *rng.choice(&INTERESTING_U32).expect("values") as u64;
    if rng.u8(..4) == 0 {
        v = u64::MAX >> rng.u32(..64);
    }
    let mut varint = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            varint.push(byte);
            break;
        }
        varint.push(byte | 0x80);
    }
    let at = rng.usize(..b.len());
    b.splice(at..at + 1, varint);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_are_deterministic_and_varied() {
        let target = crate::target("handle").expect("handle target");
        let corpus = vec![b"mitosis://1.2.3.4:5/6/".to_vec(), vec![]];
        let run = |seed| {
            let mut rng = Rng::with_seed(seed);
            (0..200)
                .map(|_| mutant(&mut rng, target, &corpus))
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 100, "{}", distinct.len());
    }

    #[test]
    fn length_tweaks_hit_the_field() {
        let mut rng = Rng::with_seed(1);
        let field = Some(LengthField { offset: 0, from: 4 });
        let mut fitted = 0;
        for _ in 0..100 {
            let mut b = vec![9u8; 20];
            tweak_length(&mut rng, field, &mut b);
            fitted += (b[..4] == 16u32.to_le_bytes()) as u32;
            assert_eq!(b[4..], [9; 16]);
        }
        assert!(fitted > 10, "{fitted}");
    }
}
