//! AFL++ entry point for the `handle` target (see fuzz/README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| mitosis_fuzz::targets::handle(data));
}
