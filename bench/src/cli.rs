//! The `mitosis` CLI, for the one row measured through it (`mitosis warm host (CLI)`): what
//! the CLI's own start-up adds to a child.

use std::path::PathBuf;
use std::process::Command;

use mitosis_testbed::Host;

/// The `mitosis` binary.
pub struct Mitosis {
    pub bin: PathBuf,
}

impl Mitosis {
    /// `mitosis --socket SOCKET resume` on `host`, the handle in MITOSIS_HANDLE (a secret
    /// stays off the command line).
    pub fn resume(&self, host: &Host, handle: &str) -> Command {
        let mut cmd = host.command(&self.bin);
        cmd.arg("--socket").arg(host.socket_path());
        cmd.arg("resume").env("MITOSIS_HANDLE", handle);
        cmd
    }
}
