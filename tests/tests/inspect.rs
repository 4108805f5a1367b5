//! `mitosis inspect` and the descriptors a child gets: what is carried, what is closed on
//! purpose, and that the child really has the carried ones (with their contents) and not the
//! closed ones.

mod common;

use common::*;

/// A Python seed holding: an internal pipe with buffered bytes, an eventfd, an epoll set
/// watching the pipe, /dev/null, a listening TCP socket and a connected one (both reach
/// outside: closed in children). Each request line answers what the process sees.
const SEED: &str = r#"
import os, socket, select, sys
r, w = os.pipe()
os.write(w, b"carried")
efd = os.eventfd(5)
ep = select.epoll()
ep.register(r, select.EPOLLIN)
null = os.open("/dev/null", os.O_WRONLY)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
cli = socket.create_connection(srv.getsockname())
os.umask(0o027)
fds = dict(r=r, w=w, efd=efd, ep=ep.fileno(), null=null, srv=srv.fileno(), cli=cli.fileno())
print("ready " + " ".join("%s=%d" % kv for kv in fds.items()), flush=True)
while os.read(0, 100):
    def kind(fd):
        try:
            return os.readlink("/proc/self/fd/%d" % fd).split(":")[0]
        except OSError:
            return "closed"
    ready = [fd for fd, _ in ep.poll(0)]
    pipe = os.read(r, 100)
    count = int.from_bytes(os.read(efd, 8), "little")
    umask = os.umask(0)
    answer = dict((k, kind(fd)) for k, fd in fds.items())
    answer.update(pipe=pipe.decode(), ready=ready == [r], count=count, umask=oct(umask))
    os.write(1, (repr(sorted(answer.items())) + "\n").encode())
"#;

#[test]
fn inspect_lists_what_children_get_and_what_is_closed() {
    let tb = testbed(2);
    let mut cmd = tb.host(0).command("python3");
    cmd.args(["-c", SEED]);
    let mut seed = Seed::start(cmd);
    let handle = prepare(&tb, 0, seed.pid());

    // From the other host: the daemon there fetches the descriptor from the seed's host.
    let out = cli(&tb, 1, &["inspect", &handle], "");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout(&out);
    let (carried, closed) = report
        .split_once("closed in children:")
        .expect("two sections");
    for kind in [
        "pipe 7 bytes buffered",
        "eventfd count 5",
        "epoll watching fds",
        "/dev/null",
    ] {
        assert!(carried.contains(kind), "{kind:?} not carried in:\n{report}");
    }
    assert_eq!(
        closed.matches("sockets are not carried").count(),
        2,
        "{report}"
    );
    assert!(report.contains("umask 027"), "{report}");
    assert!(report.contains("threads 1\n"), "{report}");

    // The child has exactly that: the pipe's bytes, the count, the epoll set that sees the
    // pipe readable, and no sockets.
    let out = cli(&tb, 1, &["resume", &handle], "go\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let answer = stdout(&out);
    for want in [
        "('cli', 'closed')",
        "('srv', 'closed')",
        "('count', 5)",
        "('efd', 'anon_inode')",
        "('ep', 'anon_inode')",
        "('null', '/dev/null')",
        "('pipe', 'carried')",
        "('ready', True)",
        "('r', 'pipe')",
        "('umask', '0o27')",
        "('w', 'pipe')",
    ] {
        assert!(answer.contains(want), "{want} missing from {answer}");
    }
    // The seed's own objects are untouched by all this.
    let own = seed.send("go");
    assert!(
        own.contains("('pipe', 'carried')") && own.contains("('srv', 'socket')"),
        "{own}"
    );

    // A wrong key learns nothing.
    let wrong = format!("{}0000", &handle[..handle.len() - 4]);
    let out = cli(&tb, 1, &["inspect", &wrong], "");
    assert_eq!(out.status.code(), Some(77), "denied (docs/operations.md)");
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));
    drop(seed);
    teardown(tb);
}
