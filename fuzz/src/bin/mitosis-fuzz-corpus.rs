//! Writes the generated corpus (`corpus/<target>/gen-*`) from real values; run it after a wire
//! type changes: `cargo run -p mitosis-fuzz --bin mitosis-fuzz-corpus`.

fn main() -> std::io::Result<()> {
    let changed = mitosis_fuzz::seeds::write()?;
    for name in &changed {
        println!("wrote {name}");
    }
    println!(
        "{} corpus files changed under {}",
        changed.len(),
        mitosis_fuzz::seeds::corpus_dir().display()
    );
    Ok(())
}
