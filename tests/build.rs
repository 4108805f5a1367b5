//! Compiles the C test fixture `fixtures/memcheck.c` into `$OUT_DIR/memcheck`
//! and exports its path to the crate as `env!("MEMCHECK_BIN")`.
//!
//! The compiler is `$CC` if set (may contain arguments, e.g. `ccache gcc`),
//! otherwise `cc`.  No build-dependencies.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=fixtures/memcheck.c");
    println!("cargo:rerun-if-env-changed=CC");

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR not set"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR not set"));
    let src = manifest_dir.join("fixtures").join("memcheck.c");
    let bin = out_dir.join("memcheck");

    let cc = env::var("CC")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "cc".to_string());
    let mut words = cc.split_whitespace();
    let program = words.next().expect("empty CC");

    let mut cmd = Command::new(program);
    cmd.args(words)
        .args(["-std=c11", "-O2", "-g", "-Wall", "-Wextra", "-o"])
        .arg(&bin)
        .arg(&src);
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
        println!("cargo:warning=memcheck.c: {line}");
    }

    println!("cargo:rustc-env=MEMCHECK_BIN={}", bin.display());
}
