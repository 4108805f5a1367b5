//! A fresh Debian machine with systemd as its PID 1, in systemd-nspawn (tests/tests/package.rs).
//!
//! Its root is the tree scripts/make-machine.sh debootstraps into target/pkgtest/machine (once;
//! cached). The machine boots it with `--volatile=overlay`: what it writes lands in a tmpfs
//! that goes with it, so neither the tree nor the host changes. It has a network of its own
//! (loopback only) and every capability (`--capability=all`), as a service of a real machine
//! has. Commands run in it through nsenter: its namespaces, its root, a clean environment.
//! Dropping a [`Machine`] powers it off, and kills it if it does not stop in time.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::procfs::all_pids;
use super::{bin_dir, run_with_input, stderr, stdout, wait_output};

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Cargo's target directory (where `bin_dir()` is).
pub fn target_dir() -> PathBuf {
    bin_dir().parent().expect("the target dir").to_path_buf()
}

/// The root of the machine: scripts/make-machine.sh's tree in target/pkgtest/machine, built
/// by the first call (about a minute) and reused after.
pub fn machine_root() -> PathBuf {
    let root = target_dir().join("pkgtest").join("machine");
    let child = Command::new(repo().join("scripts/make-machine.sh"))
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("scripts/make-machine.sh runs");
    let out = wait_output(child, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "scripts/make-machine.sh {} failed: {}{}",
        root.display(),
        stdout(&out),
        stderr(&out)
    );
    root
}

/// A booted machine.
pub struct Machine {
    name: String,
    nspawn: Option<Child>,
    /// The host's pid of the machine's PID 1 (systemd), and its pid namespace.
    leader: i32,
    pidns: PathBuf,
    console: PathBuf,
}

impl Machine {
    /// Boots `root` as machine `mitosis-TAG-PID` with `binds` (host path, path inside) mounted
    /// read-only; its console goes to `dir/console.log`. Returns once systemd has finished
    /// starting the system.
    pub fn boot(root: &Path, tag: &str, binds: &[(&Path, &str)], dir: &Path) -> Machine {
        let name = format!("mitosis-{tag}-{}", std::process::id());
        let console = dir.join("console.log");
        let log = File::create(&console).expect("the console log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--quiet",
            "--boot",
            "--volatile=overlay",
            // No machined, no systemd scope on the host (which need not run systemd).
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--capability=all",
            "--console=read-only",
        ])
        .arg(format!("--directory={}", root.display()))
        .arg(format!("--machine={name}"));
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        // Should this test's thread die without dropping the machine (the harness killed),
        // nspawn gets the SIGTERM that powers the machine off.
        // SAFETY: prctl(2) between fork and exec, async-signal-safe, on the child alone.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn runs (scripts/setup.sh installs systemd-container)");
        let nspawn_pid = nspawn.id();
        let mut machine = Machine {
            name,
            nspawn: Some(nspawn),
            leader: 0,
            pidns: PathBuf::new(),
            console,
        };
        // PID 1 of the machine: nspawn's child running systemd, in a pid namespace of its own.
        let deadline = Instant::now() + Duration::from_secs(60);
        while machine.leader == 0 {
            machine.assert_running("while starting");
            assert!(
                Instant::now() < deadline,
                "no systemd in the machine after 60 s"
            );
            machine.leader = super::processes_with_parent(nspawn_pid)
                .into_iter()
                .find(|&pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c == "systemd\n")
                        && std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                            s.lines()
                                .find(|l| l.starts_with("NSpid:"))
                                .is_some_and(|l| l.ends_with("\t1"))
                        })
                })
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        machine.pidns = std::fs::read_link(format!("/proc/{}/ns/pid", machine.leader))
            .expect("the machine's pid namespace");
        // Up once systemd answers and has finished starting the default target.
        let mut state = String::new();
        let up = machine.wait_until(Duration::from_secs(90), || {
            let out = machine.run(&["systemctl", "is-system-running", "--wait"]);
            state = stdout(&out).trim().to_string();
            state == "running" || state == "degraded"
        });
        assert!(
            up,
            "the machine did not boot: {state:?}\n{}",
            machine.console_tail()
        );
        if state == "degraded" {
            // Not mitosis's doing (nothing of it is installed yet), but worth knowing.
            let failed = machine.run(&["systemctl", "--failed", "--no-legend"]);
            eprintln!(
                "machine {}: degraded at boot:\n{}",
                machine.name,
                stdout(&failed)
            );
        }
        machine
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `args` inside the machine (its namespaces and root, a clean environment).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.leader))
            .args(["--all", "--root", "--wd", "--", "env", "-i"])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "HOME=/root",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
            ])
            .args(args);
        cmd
    }

    /// Runs `args` in the machine (killed after 60 s); its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, "")
    }

    /// Runs `args` in the machine with `input` on its stdin.
    pub fn run_with(&self, args: &[&str], input: &str) -> Output {
        run_with_input(&mut self.command(args), input)
    }

    /// Runs `args` in the machine and asserts it succeeds; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}{}",
            self.name,
            out.status,
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// A property of a unit (`systemctl show -P`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "-P", property, unit])
            .trim()
            .to_string()
    }

    /// The last lines of a unit's journal, for assertion messages.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.run(&["journalctl", "--no-pager", "-n", "40", "-u", unit]);
        format!("journal of {unit}:\n{}{}", stdout(&out), stderr(&out))
    }

    /// Polls `cond` every 200 ms for up to `limit`.
    pub fn wait_until(&self, limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if cond() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.assert_running("");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Host pids of the machine's processes whose executable is named `name`.
    pub fn processes_of(&self, name: &str) -> Vec<i32> {
        super::processes_of(name)
            .into_iter()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns == self.pidns)
            })
            .collect()
    }

    /// Every process left in the machine's pid namespace (host pids).
    pub fn processes(&self) -> Vec<i32> {
        all_pids()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns == self.pidns)
            })
            .collect()
    }

    /// The pid inside the machine of host process `pid`.
    pub fn inner_pid(&self, pid: i32) -> i32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|ids| ids.split_whitespace().last()?.parse().ok())
            .expect("NSpid")
    }

    /// The end of the machine's console output.
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("console of {}:\n{tail}", self.name)
    }

    /// Panics (with the console) if nspawn has exited: a zombie until we reap it.
    fn assert_running(&self, when: &str) {
        if let Some(nspawn) = &self.nspawn {
            assert!(
                super::alive(nspawn.id() as i32),
                "systemd-nspawn exited {when}\n{}",
                self.console_tail()
            );
        }
    }

    /// Powers the machine off: SIGTERM to nspawn, which has systemd shut the machine down.
    /// Kills the machine if it is still up after 30 s. True if it stopped cleanly (nspawn
    /// exited 0) and nothing of it is left.
    pub fn poweroff(&mut self) -> bool {
        let Some(mut nspawn) = self.nspawn.take() else {
            return true;
        };
        // SAFETY: kill(2) with our own child's pid.
        unsafe { libc::kill(nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = None;
        while status.is_none() && Instant::now() < deadline {
            status = nspawn.try_wait().expect("wait for systemd-nspawn");
            std::thread::sleep(Duration::from_millis(100));
        }
        let clean = status.is_some_and(|s| s.success());
        if status.is_none() {
            eprintln!("machine {}: no poweroff in 30 s, killed", self.name);
            // SAFETY: kill(2) with the machine's PID 1 (SIGKILL to it ends its whole pid
            // namespace) and then with our own child's pid.
            unsafe {
                libc::kill(self.leader, libc::SIGKILL);
                libc::kill(nspawn.id() as i32, libc::SIGKILL);
            }
            let _ = nspawn.wait();
        }
        let gone = super::eventually(Duration::from_secs(10), || self.processes().is_empty());
        clean && gone
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.nspawn.is_some() && !self.poweroff() {
            eprintln!(
                "machine {}: no clean poweroff\n{}",
                self.name,
                self.console_tail()
            );
        }
    }
}
