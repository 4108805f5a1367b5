//! The stub's failures reach the daemon on the channel, wherever the stub has moved it by then,
//! and never land in one of the seed's files.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use mitosis_fork::restore::protocol::{self, CHANNEL_FD, OpenSpec, Ready, Setup};
use mitosis_frame as frame;

/// Starts the stub as the daemon does (its end of a socketpair on fd 3), sends `setup` and
/// returns the stub's answer and its exit code.
fn answer_to(setup: &Setup) -> (Ready, Option<i32>) {
    let (mut chan, theirs) = UnixStream::pair().expect("socketpair");
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mitosis-stub"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook runs in the forked child before exec and only calls dup2 (async-signal-safe) on a number captured by copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(their_fd, CHANNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut stub = cmd.spawn().expect("the stub starts");
    drop(theirs);
    chan.write_all(&frame::encode(setup)).expect("setup sent");
    let (ready, _) = protocol::recv_with_fds(&mut chan).expect("an answer on the channel");
    let status = stub.wait().expect("the stub exits");
    // Nothing follows the answer.
    let mut rest = Vec::new();
    chan.read_to_end(&mut rest).expect("the channel closes");
    assert!(rest.is_empty(), "more after the answer: {rest:?}");
    (ready, status.code())
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mitosis-stub-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn a_file_that_cannot_be_opened_is_reported_and_the_seeds_file_at_fd_3_is_untouched() {
    let dir = scratch("open");
    let kept = dir.join("kept.log");
    std::fs::write(&kept, b"the seed's own log\n").unwrap();
    let missing = dir.join("gone.dat");
    let file = |path: &PathBuf, fd| OpenSpec {
        path: path.display().to_string(),
        host_path: false,
        flags: libc::O_RDWR,
        target_fd: Some(fd),
        offset: 4,
    };
    // The channel moves to fd 64, the seed's first file takes fd 3, its second cannot be opened.
    let setup = Setup {
        work_fd_base: 64,
        root: None,
        cwd: None,
        opens: vec![file(&kept, CHANNEL_FD), file(&missing, CHANNEL_FD + 1)],
    };
    let (ready, code) = answer_to(&setup);
    let Ready::Failed(why) = ready else {
        panic!("expected a failure, got {ready:?}");
    };
    assert!(
        why.starts_with(&format!("opening {}: ", missing.display()))
            && why.contains("No such file"),
        "{why}"
    );
    assert_eq!(code, Some(70));
    assert_eq!(std::fs::read(&kept).unwrap(), b"the seed's own log\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failure_to_place_the_channel_is_reported_where_the_channel_went() {
    // fd 3 is the channel itself when the stub moves it, so it lands on 4, not on 3.
    let setup = Setup {
        work_fd_base: CHANNEL_FD,
        root: None,
        cwd: None,
        opens: vec![],
    };
    let (ready, code) = answer_to(&setup);
    assert_eq!(ready, Ready::Failed(format!("fd {CHANNEL_FD} is taken")));
    assert_eq!(code, Some(70));
}
