//! Tests of the testbed itself. They need root and iproute2.
//!
//! The helper processes run inside the hosts (TCP server and client, a fake
//! daemon) are this test binary re-executed with only the ignored
//! `helper_entry` test selected, and `MT_HELPER` saying what to do, so the
//! tests need nothing but themselves. Every connection goes to a 10.77.0.x
//! address inside a testbed.

use std::env;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use mitosis_testbed::{
    DaemonConfig, Host, Leftover, TESTBED_ID_ENV, Testbed, TestbedConfig, TestbedError, leftovers,
};

/// libtest arguments that run only `helper_entry`, with its output visible.
const HELPER_ARGS: [&str; 5] = [
    "helper_entry",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
];

/// The port of the fake daemon.
const DAEMON_PORT: u16 = 7300;

/// A command running this test binary as helper `mode` inside `host`.
fn helper(host: &Host, mode: &str) -> Command {
    let mut cmd = host.command(env::current_exe().expect("test binary path"));
    cmd.args(HELPER_ARGS).env("MT_HELPER", mode);
    cmd
}

/// Connects from `from` to `to`, sends `message` and returns the reply.
fn tcp_request(from: &Host, to: SocketAddr, message: &str) -> Result<String, String> {
    let output = helper(from, "client")
        .env("MT_HELPER_ADDR", to.to_string())
        .env("MT_HELPER_MSG", message)
        .output()
        .expect("spawn client helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("REPLY: "))
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "client in {} got no reply from {to} ({}):\n{stdout}\n{}",
                from.name(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// An executable that starts this test binary as a fake daemon, passing the
/// testbed's `--listen ADDR --socket PATH` through the environment (libtest
/// would reject them as arguments).
fn fake_daemon_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = env::current_exe().expect("test binary path");
        let exe_name = exe.file_name().expect("test binary name").to_string_lossy();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-daemon-{exe_name}.sh"));
        let script = format!(
            "#!/bin/sh\n\
             [ \"$1\" = --listen ] && [ \"$3\" = --socket ] || {{ echo \"bad arguments: $*\" >&2; exit 2; }}\n\
             export MT_HELPER=daemon MT_HELPER_LISTEN=\"$2\" MT_HELPER_SOCKET=\"$4\"\n\
             shift 4\n\
             export MT_HELPER_EXTRA=\"$*\"\n\
             exec '{}' {}\n",
            exe.display(),
            HELPER_ARGS.join(" ")
        );
        // Written by a child process: if this process held the file open for
        // writing, a concurrent fork in another test thread could inherit the
        // descriptor and make exec fail with ETXTBSY. The rename keeps test
        // processes running in parallel (nextest) from seeing a partial file.
        let mut writer = Command::new("/bin/sh")
            .args([
                "-c",
                "cat > \"$1.$$\" && chmod 755 \"$1.$$\" && mv -f \"$1.$$\" \"$1\"",
                "sh",
            ])
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        writer
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .expect("write script");
        assert!(writer.wait().expect("wait for sh").success());
        path
    })
}

fn daemon_config() -> DaemonConfig {
    DaemonConfig::new(fake_daemon_bin(), DAEMON_PORT)
}

/// Builds a testbed, failing the test with the error.
fn testbed(config: TestbedConfig) -> Testbed {
    Testbed::new(config).unwrap_or_else(|err| panic!("creating the testbed: {err}"))
}

fn assert_no_leftovers(id: &str) {
    let left = leftovers(id);
    assert!(left.is_empty(), "testbed {id} left behind: {left:?}");
}

#[test]
fn two_hosts_talk_over_tcp() {
    let tb = testbed(TestbedConfig::new(2));
    let (h0, h1) = (tb.host(0), tb.host(1));
    assert_eq!(h0.addr().to_string(), "10.77.0.1");
    assert_eq!(h1.addr().to_string(), "10.77.0.2");

    let shown = h0
        .command("ip")
        .args(["-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("run ip in host 0");
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("10.77.0.1/24"),
        "{shown:?}"
    );

    let server_addr = SocketAddr::new(h1.addr().into(), 7000);
    let mut server = helper(h1, "echo-server")
        .env("MT_HELPER_ADDR", server_addr.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server helper");
    let mut lines = BufReader::new(server.stdout.take().expect("piped stdout")).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line == "READY");
    assert!(ready, "the server in host 1 never got ready");

    let reply = tcp_request(h0, server_addr, "hello from host 0");
    let status = server.wait().expect("wait for server");
    let reply = reply.unwrap_or_else(|err| panic!("{err}"));
    assert!(status.success(), "server: {status}");
    // The server saw the client's eth0 address: the bytes crossed the bridge.
    assert!(
        reply.starts_with("echo to 10.77.0.1:") && reply.ends_with(": hello from host 0"),
        "unexpected reply {reply:?}"
    );

    let id = tb.id().to_owned();
    tb.teardown().expect("teardown");
    assert_no_leftovers(&id);
}

#[test]
fn concurrent_testbeds_do_not_collide() {
    let workers: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(|| {
                let tb = testbed(TestbedConfig::new(2).with_daemon(daemon_config()));
                // Every testbed uses the same addresses; each must reach its
                // own daemon, which tells which testbed it belongs to.
                let reply = tcp_request(tb.host(0), tb.host(1).listen_addr(), "hi")
                    .unwrap_or_else(|err| panic!("{err}\n{}", tb.host(1).daemon_log()));
                let expected = format!(
                    "daemon 10.77.0.2:{DAEMON_PORT} of {} peer 10.77.0.1:",
                    tb.id()
                );
                assert!(reply.starts_with(&expected), "{reply:?} vs {expected:?}");
                let id = tb.id().to_owned();
                let dir = tb.dir().to_owned();
                tb.teardown().expect("teardown");
                (id, dir)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for worker in workers {
        let (id, dir) = worker.join().expect("worker thread");
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert_no_leftovers(&id);
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "testbed ids collided: {ids:?}");
}

/// Builds a testbed with daemons and a stray process, and checks that the
/// leak check sees all of it.
fn populated_testbed() -> (Testbed, std::process::Child) {
    let tb = testbed(TestbedConfig::new(2).with_daemon(daemon_config()));
    let stray = tb
        .host(1)
        .command("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep in host 1");

    let left = leftovers(tb.id());
    let netns: Vec<_> = left
        .iter()
        .filter(|l| matches!(l, Leftover::Netns(_)))
        .collect();
    assert_eq!(netns.len(), 3, "two hosts and a switch: {left:?}");
    for pid in [
        tb.host(0).daemon_pid().expect("daemon 0"),
        tb.host(1).daemon_pid().expect("daemon 1"),
        stray.id(),
    ] {
        assert!(
            left.iter()
                .any(|l| matches!(l, Leftover::Process { pid: p, .. } if *p == pid)),
            "process {pid} not reported: {left:?}"
        );
    }
    assert!(left.contains(&Leftover::TempDir(tb.dir().to_owned())));
    (tb, stray)
}

#[test]
fn explicit_teardown_leaves_nothing() {
    let (tb, mut stray) = populated_testbed();
    let (id, dir) = (tb.id().to_owned(), tb.dir().to_owned());
    tb.teardown().expect("teardown");
    assert_no_leftovers(&id);
    assert!(!dir.exists());
    // Teardown killed the process left running in host 1.
    assert_eq!(
        stray.wait().expect("reap sleep").signal(),
        Some(libc::SIGKILL)
    );
}

#[test]
fn drop_leaves_nothing() {
    let (tb, mut stray) = populated_testbed();
    let (id, dir) = (tb.id().to_owned(), tb.dir().to_owned());
    drop(tb);
    assert_no_leftovers(&id);
    assert!(!dir.exists());
    assert_eq!(
        stray.wait().expect("reap sleep").signal(),
        Some(libc::SIGKILL)
    );
}

#[test]
fn failing_daemon_is_reported_and_cleaned_up() {
    let err = Testbed::new(TestbedConfig::new(2).with_daemon(DaemonConfig::new("/bin/false", 1)))
        .expect_err("/bin/false cannot be a daemon");
    let TestbedError::DaemonExited { host, status, .. } = &err else {
        panic!("unexpected error: {err}");
    };
    assert!(status.contains('1'), "{status}");
    let id = host.rsplit_once("-h").expect("host name is ID-hN").0;
    assert_no_leftovers(id);

    let err = Testbed::new(
        TestbedConfig::new(1).with_daemon(DaemonConfig::new("/nonexistent/mitosisd", 1)),
    )
    .expect_err("a missing daemon binary cannot start");
    assert!(
        matches!(err, TestbedError::Spawn { .. })
            && err.to_string().contains("/nonexistent/mitosisd"),
        "unexpected error: {err}"
    );
}

#[test]
fn daemon_can_be_killed_and_restarted() {
    let tb = testbed(TestbedConfig::new(2).with_daemon(daemon_config()));
    let (h0, h1) = (tb.host(0), tb.host(1));
    let first = h1.daemon_pid().expect("daemon running");
    tcp_request(h0, h1.listen_addr(), "up?").expect("daemon answers");

    h1.kill_daemon().expect("kill daemon");
    assert_eq!(h1.daemon_pid(), None);
    assert!(h1.socket_path().exists(), "a crash leaves the socket file");
    assert!(tcp_request(h0, h1.listen_addr(), "down?").is_err());

    h1.start_daemon().expect("restart daemon");
    let second = h1.daemon_pid().expect("daemon running again");
    assert_ne!(first, second);
    tcp_request(h0, h1.listen_addr(), "up again?").expect("restarted daemon answers");
    assert!(matches!(
        h1.start_daemon(),
        Err(TestbedError::DaemonAlreadyRunning { pid, .. }) if pid == second
    ));
    assert_eq!(
        h1.daemon_log()
            .matches("=== mitosis-testbed: starting")
            .count(),
        2
    );
}

#[test]
fn misuse_is_reported() {
    let err = Testbed::new(TestbedConfig::new(0)).expect_err("zero hosts");
    assert!(
        matches!(err, TestbedError::BadHostCount { requested: 0, .. }),
        "{err}"
    );
    let err = Testbed::new(TestbedConfig::new(255)).expect_err("too many hosts");
    assert!(
        matches!(err, TestbedError::BadHostCount { requested: 255, .. }),
        "{err}"
    );

    let tb = testbed(TestbedConfig::new(1));
    assert!(matches!(
        tb.host(0).start_daemon(),
        Err(TestbedError::NoDaemonConfigured { .. })
    ));
    tb.host(0)
        .kill_daemon()
        .expect("killing no daemon is a no-op");
}

/// Not a test: the entry point of the helper processes (see the module docs).
#[test]
#[ignore = "re-executed by the other tests as a helper process"]
fn helper_entry() {
    match env::var("MT_HELPER").as_deref() {
        Ok("daemon") => fake_daemon(),
        Ok("echo-server") => echo_server(),
        Ok("client") => client(),
        _ => {}
    }
}

fn helper_var(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// Stands in for mitosisd: answers every TCP connection with its address,
/// testbed id and the peer's address, and accepts on its unix socket.
fn fake_daemon() {
    let listen = helper_var("MT_HELPER_LISTEN");
    let socket = helper_var("MT_HELPER_SOCKET");
    let testbed = helper_var(TESTBED_ID_ENV);
    // TCP first: a connectable unix socket means the daemon is ready.
    let tcp = TcpListener::bind(&listen).expect("bind TCP");
    // The socket's directory is the daemon's to make.
    std::fs::create_dir_all(Path::new(&socket).parent().expect("socket dir")).expect("socket dir");
    let unix = UnixListener::bind(&socket).expect("bind unix socket");
    println!("fake daemon of {testbed} on {listen} and {socket}");
    thread::spawn(move || {
        for conn in unix.incoming() {
            drop(conn);
        }
    });
    thread::spawn(move || {
        for mut conn in tcp.incoming().map_while(Result::ok) {
            let peer = conn.peer_addr().expect("peer address");
            // Read the request first: closing with unread data sends a RST
            // that could destroy the reply.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = BufReader::new(&conn).read_line(&mut String::new());
            let _ = writeln!(conn, "daemon {listen} of {testbed} peer {peer}");
        }
    });
    // Bounded life, in case a broken teardown forgets it.
    thread::sleep(Duration::from_secs(120));
}

/// Accepts one connection within 10 s and echoes one line with the peer.
fn echo_server() {
    let listener = TcpListener::bind(helper_var("MT_HELPER_ADDR")).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    // libtest has printed "test helper_entry ... " without a newline.
    println!("\nREADY");
    std::io::stdout().flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no client within 10 s");
                thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).expect("read");
    writeln!(conn, "echo to {peer}: {}", line.trim_end()).expect("write");
}

/// Connects to `MT_HELPER_ADDR`, sends `MT_HELPER_MSG` and prints the reply.
fn client() {
    let addr: SocketAddr = helper_var("MT_HELPER_ADDR").parse().expect("address");
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    writeln!(conn, "{}", helper_var("MT_HELPER_MSG")).expect("write");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("read");
    println!("\nREPLY: {}", reply.trim_end());
}
