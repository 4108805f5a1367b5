//! AFL++ entry point for the `descriptor` target (see fuzz/README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| mitosis_fuzz::targets::descriptor(data));
}
