//! AFL++ entry point for the `control_request` target (see fuzz/README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| mitosis_fuzz::targets::control_request(data));
}
