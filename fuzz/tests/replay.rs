//! What CI runs for each target: every file of its corpus, then a bounded, seeded mutation loop
//! over them (a few thousand inputs, deterministic). `MITOSIS_FUZZ_MUTANTS=N` and
//! `MITOSIS_FUZZ_SEED=S` run longer or other loops by hand.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::Instant;

use mitosis_fuzz::{Target, mutate, seeds};

const MUTANTS: usize = 5000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs one input; on a panic, keeps the input in a file to replay and names it.
fn guarded(target: &Target, input: &[u8], what: &str) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        let path = std::env::temp_dir().join(format!("mitosis-fuzz-{}.bin", target.name));
        let _ = std::fs::write(&path, input);
        let _ = writeln!(
            std::io::stderr(),
            "fuzz {}: {what} panicked; input saved to {} (add it to fuzz/corpus/{} once fixed)",
            target.name,
            path.display(),
            target.name
        );
        resume_unwind(panic);
    }
}

fn replay_and_mutate(name: &str) {
    let target = mitosis_fuzz::target(name).expect("a target of that name");
    let files = seeds::load(name).expect("reading the corpus");
    assert!(
        !files.is_empty(),
        "fuzz/corpus/{name} is empty: run `cargo run -p mitosis-fuzz --bin mitosis-fuzz-corpus`"
    );
    let start = Instant::now();
    for (file, bytes) in &files {
        guarded(target, bytes, &format!("corpus file {file}"));
    }
    let corpus: Vec<Vec<u8>> = files.into_values().collect();
    // Each target its own stream, stable across runs and target order.
    let seed = env_or("MITOSIS_FUZZ_SEED", 0x006d_6974_6f73_6973_u64)
        ^ name.bytes().fold(0u64, |h, b| h.rotate_left(7) ^ b as u64);
    let mutants = env_or("MITOSIS_FUZZ_MUTANTS", MUTANTS);
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..mutants {
        let input = mutate::mutant(&mut rng, target, &corpus);
        guarded(target, &input, &format!("mutant {i} (seed {seed:#x})"));
    }
    // Straight to stderr: a passing test's captured output is not shown.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz {name}: {} inputs ({} corpus files + {mutants} mutants) in {} ms",
        corpus.len() + mutants,
        corpus.len(),
        start.elapsed().as_millis()
    );
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay_and_mutate(stringify!($name));
            }
        )*

        #[test]
        fn every_target_is_replayed() {
            let tested = [$(stringify!($name)),*];
            for t in mitosis_fuzz::TARGETS {
                assert!(tested.contains(&t.name), "no test replays {}", t.name);
            }
        }
    };
}

targets!(
    peer_request,
    peer_response,
    control_request,
    control_event,
    packed,
    descriptor,
    handle,
);

/// The corpus in the repository holds what the generator makes from today's wire types.
#[test]
fn generated_corpus_is_current() {
    let mut stale = Vec::new();
    for (target, generated) in seeds::generate() {
        let on_disk = seeds::load(target).expect("reading the corpus");
        for (name, bytes) in &generated {
            if on_disk.get(name) != Some(bytes) {
                stale.push(format!("{target}/{name}"));
            }
        }
        for name in on_disk.keys() {
            if name.starts_with(seeds::GENERATED) && !generated.contains_key(name) {
                stale.push(format!("{target}/{name} (no longer generated)"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "the fuzz corpus is stale ({}): a wire type changed? run \
         `cargo run -p mitosis-fuzz --bin mitosis-fuzz-corpus` and commit fuzz/corpus",
        stale.join(", ")
    );
}
