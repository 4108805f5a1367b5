//! Compiles the C test fixtures into `$OUT_DIR` and exports their paths to the crate:
//! `fixtures/memcheck.c` as `env!("MEMCHECK_BIN")`, `fixtures/threads.c` (pthreads) as
//! `env!("THREADS_BIN")`, `fixtures/confined.c` as `env!("CONFINED_BIN")`,
//! `fixtures/forker.c` as `env!("FORKER_BIN")`, `fixtures/sigstate.c` (pthreads) as
//! `env!("SIGSTATE_BIN")`, `fixtures/muslthreads.c` (musl, static) as
//! `env!("MUSLTHREADS_BIN")`, and the fidelity fixtures (`FIDELITY`).
//!
//! The compiler is `$CC` if set (may contain arguments, e.g. `ccache gcc`),
//! otherwise `cc`.  No build-dependencies.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CC");
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR not set"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR not set"));
    let fixtures = manifest_dir.join("fixtures");

    let memcheck = compile(&fixtures, &out_dir, "memcheck", &["-std=c11"], &[]);
    println!("cargo:rustc-env=MEMCHECK_BIN={}", memcheck.display());
    let threads = compile(
        &fixtures,
        &out_dir,
        "threads",
        &["-std=gnu11", "-pthread"],
        &["-lm"],
    );
    println!("cargo:rustc-env=THREADS_BIN={}", threads.display());
    let confined = compile(
        &fixtures,
        &out_dir,
        "confined",
        &["-std=gnu11", "-pthread"],
        &[],
    );
    println!("cargo:rustc-env=CONFINED_BIN={}", confined.display());
    let forker = compile(&fixtures, &out_dir, "forker", &["-std=gnu11"], &[]);
    println!("cargo:rustc-env=FORKER_BIN={}", forker.display());
    let sigstate = compile(
        &fixtures,
        &out_dir,
        "sigstate",
        &["-std=gnu11", "-pthread"],
        &[],
    );
    println!("cargo:rustc-env=SIGSTATE_BIN={}", sigstate.display());
    // Built against musl, statically, as a program of an Alpine image is (scripts/setup.sh
    // installs musl-tools).
    let musl = compile_with(
        "musl-gcc",
        &fixtures,
        &out_dir,
        "muslthreads",
        &["-static", "-std=gnu11"],
        &["-lpthread"],
    );
    println!("cargo:rustc-env=MUSLTHREADS_BIN={}", musl.display());
    // Fidelity fixtures: each sets up one kind of state and prints what it sees of it.
    for name in FIDELITY {
        let bin = compile(&fixtures, &out_dir, name, &["-std=gnu11"], &[]);
        let var = format!("{}_BIN", name.to_uppercase());
        println!("cargo:rustc-env={var}={}", bin.display());
    }
}

/// `fixtures/NAME.c` for tests/fidelity.rs, exported as `env!("NAME_BIN")`.
const FIDELITY: &[&str] = &[
    "pipes", "memfiles", "cmdline", "mapflags", "zombies", "selfview",
];

/// Compiles `fixtures/NAME.c` into `out_dir/NAME` with `$CC` (or `cc`) and `-O2 -g -Wall
/// -Wextra`; `flags` go before the source, `libs` after it. Compiler warnings become cargo
/// warnings.
fn compile(fixtures: &Path, out_dir: &Path, name: &str, flags: &[&str], libs: &[&str]) -> PathBuf {
    let cc = env::var("CC")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "cc".to_string());
    compile_with(&cc, fixtures, out_dir, name, flags, libs)
}

/// [`compile`] with the compiler command `cc` (may contain arguments).
fn compile_with(
    cc: &str,
    fixtures: &Path,
    out_dir: &Path,
    name: &str,
    flags: &[&str],
    libs: &[&str],
) -> PathBuf {
    let src = fixtures.join(format!("{name}.c"));
    let bin = out_dir.join(name);
    println!("cargo:rerun-if-changed={}", src.display());
    println!(
        "cargo:rerun-if-changed={}",
        fixtures.join("fixture_io.h").display()
    );

    let mut words = cc.split_whitespace();
    let program = words.next().expect("empty CC");

    let mut cmd = Command::new(program);
    cmd.args(words)
        .args(flags)
        .args(["-O2", "-g", "-Wall", "-Wextra", "-o"])
        .arg(&bin)
        .arg(&src)
        .args(libs);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run C compiler {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "compiling {} failed ({}):\ncommand: {:?}\n{}{}",
            src.display(),
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stdout),
            stderr
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={name}.c: {line}");
    }
    bin
}
