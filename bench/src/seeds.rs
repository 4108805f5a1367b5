//! The seeds the benchmark runs: five Python functions in `examples/python/`, all speaking the
//! line protocol of `seedlib.py` (`ready`, then one JSON answer line per request line), and
//! `container`: the OCI bundle's function (`image_fn.py` on the bundle's Debian Python),
//! started by the daemon in a container, whose children each run in a container of their own.
//! Its baselines run the same function in the bundle's rootfs (chroot).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use mitosis_container::Bundle;
use mitosis_testbed::Host;

/// The seeds, in the order they run and are reported.
pub const ALL: [&str; 7] = [
    "hello",
    "numpy",
    "numpy-as-written",
    "image",
    "json",
    "bigheap",
    "container",
];

/// One seed: a script and the arguments every run of it gets.
#[derive(Debug, Clone)]
pub struct Seed {
    pub name: &'static str,
    pub what: &'static str,
    pub script: PathBuf,
    /// Arguments for every mode (e.g. the heap size of `bigheap`).
    pub args: Vec<String>,
    python: String,
    /// The OCI bundle the seed runs from, for `container`.
    pub bundle: Option<Bundle>,
}

impl Seed {
    /// The seed `name` with its script in `examples` (the `examples/python` directory).
    pub fn new(name: &str, examples: &Path, python: &str, bigheap_mib: u64) -> Result<Self> {
        let (name, file, what, args) = match name {
            "hello" => (
                "hello",
                "hello_fn.py",
                "trivial function, standard library only",
                vec![],
            ),
            "numpy" => (
                "numpy",
                "numpy_fn.py",
                "numpy + Pillow imported, small state; a slice sum and a 16x16 resize per request",
                vec![],
            ),
            "numpy-as-written" => (
                "numpy-as-written",
                "numpy_fn.py",
                "the numpy seed as a user writes it: no warm-up request, no settled heap",
                vec!["--as-written".to_owned()],
            ),
            "image" => (
                "image",
                "image_fn.py",
                "numpy + Pillow: crop, rotate, resize, blur, edges of a 1024x1024 image",
                vec![],
            ),
            "json" => (
                "json",
                "json_fn.py",
                "15 MB JSON document parsed at start-up; query + serialize per request",
                vec![],
            ),
            "bigheap" => (
                "bigheap",
                "bigheap_fn.py",
                "numpy heap of pseudo-random words; 64 scattered reads per request",
                vec!["--mib".to_owned(), bigheap_mib.to_string()],
            ),
            other => bail!("unknown seed {other:?} (known: {})", ALL.join(",")),
        };
        let script = examples.join(file);
        anyhow::ensure!(script.is_file(), "{} not found", script.display());
        Ok(Self {
            name,
            what,
            script,
            args,
            python: python.to_owned(),
            bundle: None,
        })
    }

    /// The `container` seed: the function of the OCI bundle in `dir`, `python3 SCRIPT` as its
    /// config.json runs it.
    pub fn container(dir: &Path) -> Result<Self> {
        let bundle = Bundle::load(dir).with_context(|| format!("loading {}", dir.display()))?;
        let [python, script] = bundle.args.as_slice() else {
            bail!(
                "{}: the bundle must run `python3 SCRIPT`, not {:?}",
                dir.display(),
                bundle.args
            );
        };
        Ok(Self {
            name: "container",
            what: "image_fn.py in the Debian OCI bundle: seed and children in containers",
            script: PathBuf::from(script),
            args: vec![],
            python: python.clone(),
            bundle: Some(bundle),
        })
    }

    /// A command running the seed on `host` in `mode` (`--once`, `--fork-server`, ... or none);
    /// a bundle's seed runs in its rootfs (chroot) with its environment.
    pub fn command(&self, host: &Host, mode: &[&str]) -> Command {
        match &self.bundle {
            None => {
                let mut cmd = host.command(&self.python);
                cmd.args(self.argv(mode));
                cmd
            }
            Some(bundle) => {
                let mut cmd = host.command("chroot");
                cmd.arg(&bundle.rootfs)
                    .args(["env", "-i"])
                    .args(&bundle.env)
                    .arg(&self.python)
                    .args(self.argv(mode))
                    .current_dir("/");
                cmd
            }
        }
    }

    /// The seed's command line after the interpreter.
    pub fn argv(&self, mode: &[&str]) -> Vec<OsString> {
        let mut argv = vec![self.script.clone().into_os_string()];
        argv.extend(mode.iter().map(OsString::from));
        argv.extend(self.args.iter().map(OsString::from));
        argv
    }

    pub fn python(&self) -> &str {
        &self.python
    }
}

/// `{"n": i}`.
pub fn request(i: usize) -> String {
    format!("{{\"n\": {i}}}")
}

/// Parses `--seeds`: a comma-separated subset of [`ALL`], kept in the given order.
pub fn parse_list(list: &str) -> Result<Vec<&'static str>> {
    let mut seeds = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some(known) = ALL.iter().find(|k| **k == name) else {
            bail!("unknown seed {name:?} (known: {})", ALL.join(","));
        };
        if !seeds.contains(known) {
            seeds.push(*known);
        }
    }
    anyhow::ensure!(!seeds.is_empty(), "--seeds names no seed");
    Ok(seeds)
}

/// Finds the `examples/python` directory: `given`, else `$MITOSIS_EXAMPLES/python`, else next
/// to the build directory, the source tree or the current directory.
pub fn find_examples(given: Option<&Path>, bin_dir: &Path) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = given {
        candidates.push(path.to_owned());
    } else {
        if let Some(dir) = std::env::var_os("MITOSIS_EXAMPLES") {
            candidates.push(PathBuf::from(dir).join("python"));
        }
        candidates.push(bin_dir.join("../../examples/python"));
        candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python"));
        candidates.push(PathBuf::from("examples/python"));
    }
    for candidate in &candidates {
        if candidate.join("seedlib.py").is_file() {
            return candidate
                .canonicalize()
                .with_context(|| format!("resolving {}", candidate.display()));
        }
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    bail!(
        "examples/python (with seedlib.py) not found (tried {}); pass --examples or set MITOSIS_EXAMPLES",
        tried.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_lists() {
        assert_eq!(
            parse_list("hello,numpy,numpy-as-written,image,json,bigheap,container").unwrap(),
            ALL
        );
        assert_eq!(
            parse_list(" json , hello,json").unwrap(),
            vec!["json", "hello"]
        );
        assert!(parse_list("hello,nope").is_err());
        assert!(parse_list(",").is_err());
        assert_eq!(request(7), r#"{"n": 7}"#);
    }
}
