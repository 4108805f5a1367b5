//! AFL++ entry point for the `peer_response` target (see fuzz/README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| mitosis_fuzz::targets::peer_response(data));
}
