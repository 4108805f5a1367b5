//! pid 1 of a mitosis container; see `mitosis_container::init`.

fn main() {
    mitosis_container::init::main()
}
