//! Fuzz targets for mitosis's decoders: every byte string a peer, the CLI or a seed's host can
//! send is decoded without a panic and without allocating more than the input justifies.
//!
//! Each target in [`targets`] is a plain `fn(&[u8])` that panics when a decoder misbehaves. AFL++
//! drives them through the `afl_*` binaries (feature `afl`, see README.md); `cargo test` replays
//! the corpus in `corpus/<target>/` and a bounded seeded mutation loop ([`mutate`]) over it.

pub mod meter;
pub mod mutate;
pub mod seeds;
pub mod targets;

/// A decoder under test, and what the mutation loop should know about its input.
pub struct Target {
    /// Also the name of its corpus directory and of its AFL binary (`afl_<name>`).
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// A little-endian u32 length at `offset` that counts the bytes from `from` on.
    pub length_field: Option<LengthField>,
    /// Tokens worth splicing in (text formats).
    pub tokens: &'static [&'static [u8]],
}

#[derive(Debug, Clone, Copy)]
pub struct LengthField {
    pub offset: usize,
    pub from: usize,
}

/// Frames: a u32 length, then the body.
const FRAME_LENGTH: Option<LengthField> = Some(LengthField { offset: 0, from: 4 });

pub const TARGETS: &[Target] = &[
    Target {
        name: "peer_request",
        run: targets::peer_request,
        length_field: FRAME_LENGTH,
        tokens: &[],
    },
    Target {
        name: "peer_response",
        run: targets::peer_response,
        length_field: FRAME_LENGTH,
        tokens: &[],
    },
    Target {
        name: "control_request",
        run: targets::control_request,
        length_field: FRAME_LENGTH,
        tokens: &[],
    },
    Target {
        name: "control_event",
        run: targets::control_event,
        length_field: FRAME_LENGTH,
        tokens: &[],
    },
    Target {
        name: "packed",
        run: targets::packed,
        length_field: None,
        tokens: &[],
    },
    Target {
        name: "descriptor",
        run: targets::descriptor,
        // The envelope's payload length.
        length_field: Some(LengthField {
            offset: 8,
            from: mitosis_descriptor::codec::HEADER_LEN,
        }),
        tokens: &[],
    },
    Target {
        name: "handle",
        run: targets::handle,
        length_field: None,
        tokens: &[
            b"mitosis://",
            b"/",
            b":",
            b"[",
            b"]",
            b"::",
            b"%",
            b".",
            b" ",
            b"\n",
            b"+",
            b"-",
            b"0",
            b"65535",
            b"65536",
            b"18446744073709551615",
            b"18446744073709551616",
            b"ffff",
            b"FF",
            b"::ffff:",
            b"\xc3\xa9",
        ],
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
