//! AFL++ entry point for the `peer_request` target (see fuzz/README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| mitosis_fuzz::targets::peer_request(data));
}
