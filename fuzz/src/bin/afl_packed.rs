//! AFL++ entry point for the `packed` target (see fuzz/README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| mitosis_fuzz::targets::packed(data));
}
