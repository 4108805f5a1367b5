//! End to end: a seed's open file that the child's host cannot open again (as root).

mod common;

use common::*;

/// The stub opens the seed's files at their numbers before it becomes the child; when one
/// cannot be opened, the resume fails with that reason, and the seed's file the stub had just
/// reopened at fd 3 (where the stub's channel started) is left as it was.
#[test]
fn a_file_the_child_cannot_reopen_fails_the_resume_with_the_reason() {
    let tb = testbed(2);
    let dir = Scratch::new("reopen");
    let kept = dir.0.join("kept.log");
    let gone = dir.0.join("gone.dat");
    std::fs::write(&kept, "the seed's own log\n").unwrap();
    std::fs::write(&gone, "read by the seed\n").unwrap();
    let mut cmd = tb.host(0).command("sh");
    cmd.args([
        "-c",
        r#"exec 3<>"$0" 4<"$1"; echo ready; while read -r line; do echo "got $line"; done"#,
    ])
    .arg(&kept)
    .arg(&gone);
    let mut seed = Seed::start(cmd);
    let handle = prepare(&tb, 0, seed.pid());
    std::fs::remove_file(&gone).unwrap();

    let out = cli(&tb, 1, &["resume", &handle], "x\n");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(
        err.contains(&format!("opening {}: No such file", gone.display())),
        "{err}\n{}",
        tb.host(1).daemon_log()
    );
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
    assert!(stdout(&out).is_empty());
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "the seed's own log\n"
    );

    // With the file back, the same handle makes a child.
    std::fs::write(&gone, "back\n").unwrap();
    let out = cli(&tb, 1, &["resume", &handle], "x\n");
    assert_eq!(stdout(&out), "got x\n", "{}", stderr(&out));
    assert_eq!(seed.send("y"), "got y", "the seed runs on");
    drop(seed);
    teardown(tb);
}
