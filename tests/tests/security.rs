//! End to end, as root: what the daemons' servers give away, and to whom (issue 17). Peers
//! without a seed's key get nothing and cost bounded memory; running out of descriptors
//! does not spin the accept loops; the control socket is root's and checks who asks; a
//! control message with too many descriptors leaks none; the key never crosses the network.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::capture::Capture;
use common::*;
use mitosis_descriptor::Handle;
use mitosis_transport::frame;
use mitosis_transport::peer::{Hello, Request, Response, Sealed, SeedRef, seal, seal_body};

const NOBODY: u32 = 65534;
/// What keyless peers may add to the seed host's daemon's peak RSS in the first test: the
/// page server's bound for them is about 34 MiB at its full 512 connections (this test opens
/// at most about 100 at once), plus what the real resume during the flood costs (its pages
/// and the bootstrap pack, a few MiB for the memcheck seed). Before the limits, the 64 MiB
/// frames alone took the daemon to 1 GB.
const PEAK_GROWTH_LIMIT_KIB: u64 = 64 << 10;

/// A page-server connection of the test's own, made from a thread in some host's netns.
struct Raw {
    stream: TcpStream,
    hello: Hello,
}

fn connect_raw(addr: SocketAddr) -> Raw {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let body = read_body(&mut stream).expect("a hello");
    let hello = Hello::parse(&body).expect("a hello of this version");
    Raw { stream, hello }
}

fn read_body(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

impl Raw {
    /// Sends `frame` and reads the answer, as text (`None` if the server closed instead).
    fn ask(&mut self, frame: &[u8]) -> Option<String> {
        self.stream.write_all(frame).ok()?;
        let answer: Response = frame::read_blocking(&mut self.stream).ok()?;
        Some(format!("{answer:?}"))
    }
}

/// True if the server ends the connection within `limit` (whatever it says first).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Sends a header announcing `len` bytes, then `first` and zeros up to `len` bytes until the
/// server stops reading: returns how many body bytes went out, and whether the server then
/// closed.
fn oversized_frame(server: SocketAddr, len: u32, first: &[u8]) -> (usize, bool) {
    let mut c = connect_raw(server);
    c.stream.write_all(&len.to_le_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut sent = 0;
    while sent < len as usize {
        let chunk = if sent == 0 { first } else { &zeros };
        if c.stream.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    (sent, closed_within(&mut c.stream, Duration::from_secs(10)))
}

/// `n` as a postcard varint.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while n >= 0x80 {
        out.push(0x80 | (n & 0x7f) as u8);
        n >>= 7;
    }
    out.push(n as u8);
    out
}

#[test]
fn peers_without_the_key_get_nothing_and_cost_bounded_memory() {
    let tb = testbed(3);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "keyless");
    let h: Handle = handle.parse().unwrap();
    let (id, key) = (h.seed_id, h.key);
    let server = tb.host(0).listen_addr();
    let daemon = tb.host(0).daemon_pid().expect("host 0's daemon");

    // Peak RSS from here on (writing 5 resets VmHWM), also sampled.
    std::fs::write(format!("/proc/{daemon}/clear_refs"), "5").expect("resetting VmHWM");
    let base = status_kib(daemon, "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let sampled = Arc::new(AtomicU64::new(0));
    let sampler = std::thread::spawn({
        let (stop, sampled) = (stop.clone(), sampled.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                sampled.fetch_max(status_kib(daemon, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });

    // Host 2 knows the seed's id, not its key; it also asks with the key to show what it
    // would take.
    let asked = in_netns(tb.host(2), move || {
        let mut bad_key = key;
        bad_key[0] ^= 0xff;
        let bad = SeedRef { id, key: bad_key };
        let good = SeedRef { id, key };
        let mut c = connect_raw(server);
        let nonce = c.hello.nonce;
        let mut answers = Vec::new();
        let kinds = [
            Request::Attach,
            Request::Descriptor,
            Request::Pages {
                runs: vec![(0x1000, 1)],
                touched: Some(0x1000),
            },
            Request::Bootstrap,
        ];
        for (seq, request) in kinds.iter().enumerate() {
            answers.push(c.ask(&seal(&bad, &nonce, seq as u64, request)));
        }
        // The key's MAC with a bit flipped; another connection's nonce; another seed.
        let frame = seal(&good, &nonce, 10, &Request::Descriptor);
        let sealed = Sealed::decode(&frame[4..]).unwrap();
        let mut mac = sealed.mac;
        mac[0] ^= 1;
        answers.push(c.ask(&frame::encode(&Sealed { mac, ..sealed })));
        answers.push(c.ask(&seal(&good, &[0; 32], 11, &Request::Attach)));
        let other = SeedRef { id: id + 1000, key };
        answers.push(c.ask(&seal(&other, &nonce, 12, &Request::Attach)));
        // With the key: once, then replayed, then an older sequence number.
        answers.push(c.ask(&seal(&good, &nonce, 20, &Request::Attach)));
        answers.push(c.ask(&seal(&good, &nonce, 20, &Request::Attach)));
        answers.push(c.ask(&seal(&good, &nonce, 19, &Request::Attach)));
        // With the key, a report of touched pages larger than a request may ask for.
        let touched = Request::Touched {
            runs: vec![(0x1000, u32::MAX)],
        };
        answers.push(c.ask(&seal(&good, &nonce, 21, &touched)));
        // Decode amplification: a whole 64 KiB frame of 32000 empty runs (2 bytes each).
        let mut runs = [&[2u8][..], &varint(32000)].concat();
        runs.extend(std::iter::repeat_n(0u8, 2 * 32000));
        runs.push(0);
        let amplified = seal_body(&bad, &nonce, 30, &runs);
        assert!(amplified.len() <= 4 + mitosis_transport::peer::MAX_REQUEST_FRAME);
        answers.push(c.ask(&amplified));
        // Signed with the key, the runs are decoded, and refused past 4096 by the decoder.
        answers.push(c.ask(&seal_body(&good, &nonce, 31, &runs)));
        answers
    })
    .join()
    .expect("the keyless client");
    let wrong = format!("Some(\"Error(WrongKey({id}))\")");
    let expected: Vec<String> = [wrong.as_str(); 6]
        .into_iter()
        .map(String::from)
        .chain([
            format!("Some(\"Error(NoSuchSeed({}))\")", id + 1000),
            "Some(\"Attached\")".into(),
            format!("Some(\"Error(Replayed({id}, 20))\")"),
            format!("Some(\"Error(Replayed({id}, 19))\")"),
            "Some(\"Error(TooLarge)\")".into(),
            wrong.clone(),
            "None".into(),
        ])
        .collect();
    let got: Vec<String> = asked.iter().map(|a| format!("{a:?}")).collect();
    assert_eq!(got, expected);

    // The flood: 16 connections announcing 64 MiB frames, one of them the 33.5 M empty runs
    // of the old protocol's Pages; 40 that never send a request; one that stalls in a body.
    let flood = in_netns(tb.host(2), move || {
        let old_pages = [&[2u8][..], &varint(id), &key, &varint(33_554_432)].concat();
        let mut firsts: Vec<Vec<u8>> = vec![vec![0u8; 1 << 20]; 15];
        firsts.push([old_pages, vec![0u8; 1 << 20]].concat());
        let big: Vec<_> = firsts
            .into_iter()
            .map(|first| std::thread::spawn(move || oversized_frame(server, 64 << 20, &first)))
            .collect();
        let idle: Vec<_> = (0..40)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = connect_raw(server);
                    closed_within(&mut c.stream, Duration::from_secs(12))
                })
            })
            .collect();
        let mut stalled = connect_raw(server);
        stalled.stream.write_all(&100u32.to_le_bytes()).unwrap();
        stalled.stream.write_all(&[0; 10]).unwrap();
        let stalled = closed_within(&mut stalled.stream, Duration::from_secs(15));
        let big: Vec<(usize, bool)> = big.into_iter().map(|t| t.join().unwrap()).collect();
        let idle: Vec<bool> = idle.into_iter().map(|t| t.join().unwrap()).collect();
        (big, idle, stalled)
    });
    // Meanwhile a real child of the seed starts on a host new to it, and runs.
    std::thread::sleep(Duration::from_millis(300));
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "stderr: {}\nhost 0: {}",
        stderr(&out),
        tb.host(0).daemon_log()
    );
    let (big, idle, stalled) = flood.join().expect("the flood");
    for (sent, closed) in &big {
        assert!(
            *sent < 64 << 20 && *closed,
            "a 64 MiB frame: {sent} bytes went out, closed: {closed}"
        );
    }
    assert!(
        idle.iter().all(|&c| c),
        "idle connections left open: {idle:?}"
    );
    assert!(stalled, "a connection stalled in a body was left open");

    // Past 64 connections from one address, the rest are closed at once.
    std::thread::sleep(Duration::from_millis(300));
    let (admitted, refused) = in_netns(tb.host(2), move || {
        let conns: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap())
            .collect();
        let mut admitted = 0;
        for mut c in conns.iter() {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut len = [0u8; 4];
            if c.read_exact(&mut len).is_ok() {
                admitted += 1;
            }
        }
        (admitted, conns.len() - admitted)
    })
    .join()
    .unwrap();
    assert_eq!((admitted, refused), (64, 36));
    assert_eq!(
        status_value(&tb, 0, "peer connections refused"),
        Some(36),
        "{}",
        stdout(&cli(&tb, 0, &["status"], ""))
    );
    let log = tb.host(0).daemon_log();
    assert_eq!(
        log.matches("refusing peer connections").count(),
        1,
        "one line per burst: {log}"
    );

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = status_kib(daemon, "VmHWM").max(sampled.load(Ordering::Relaxed));
    assert!(
        peak.saturating_sub(base) < PEAK_GROWTH_LIMIT_KIB,
        "the daemon's RSS went from {base} KiB to a peak of {peak} KiB"
    );
    eprintln!("host 0's daemon: {base} KiB before, peak {peak} KiB");
    drop(seed);
    teardown(tb);
}

/// Utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(") ").unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sets `pid`'s soft RLIMIT_NOFILE; returns the old limits.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limits into `old`, a valid out-pointer.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid limit to set; the old one is not wanted here.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    old
}

#[test]
fn accept_loops_back_off_when_descriptors_run_out() {
    let tb = testbed(2);
    let daemon = tb.host(0).daemon_pid().expect("host 0's daemon");
    // Its stub pool is full.
    std::thread::sleep(Duration::from_millis(500));
    let old = set_nofile(daemon, fd_count(daemon) as u64 + 8);
    let log_before = tb.host(0).daemon_log().lines().count();
    let cpu_before = cpu_ticks(daemon);

    // Far more connections than descriptors left (within the listen backlog), to both
    // sockets, held for 3 s.
    let server = tb.host(0).listen_addr();
    let tcp = in_netns(tb.host(1), move || {
        let mut conns = Vec::new();
        for i in 0..100 {
            match TcpStream::connect_timeout(&server, Duration::from_secs(5)) {
                Ok(c) => conns.push(c),
                Err(e) => panic!("connection {i}: {e}"),
            }
        }
        conns
    })
    .join()
    .unwrap();
    let unix: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(tb.host(0).socket_path()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_ticks(daemon) - cpu_before;
    drop(tcp);
    drop(unix);

    // Once they are gone, it answers again.
    let asked = Instant::now();
    let out = cli(&tb, 0, &["status"], "");
    let took = asked.elapsed();
    set_nofile(daemon, old.rlim_cur);
    assert!(out.status.success(), "status: {}", stderr(&out));
    assert!(took < Duration::from_secs(10), "status took {took:?}");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        cpu < hz,
        "the daemon used {cpu} ticks ({hz}/s) of CPU in 3 s of exhausted descriptors"
    );
    let log = tb.host(0).daemon_log();
    let new: Vec<&str> = log.lines().skip(log_before).collect();
    assert!(
        new.iter().any(|l| l.contains("Too many open files")),
        "descriptors never ran out: {new:#?}"
    );
    assert!(new.len() <= 12, "{} log lines: {new:#?}", new.len());
    teardown(tb);
}

/// The CLI run as uid and gid 65534 against host 0's daemon.
fn cli_as_nobody(tb: &mitosis_testbed::Testbed, args: &[&str]) -> Output {
    let child = Command::new(bin("mitosis"))
        .arg("--socket")
        .arg(tb.host(0).socket_path())
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the CLI starts as nobody");
    wait_output(child, Duration::from_secs(30))
}

fn refused(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "allowed: {}", stdout(out));
    assert!(err.contains(what), "expected {what:?} in: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
}

#[test]
fn the_control_socket_is_roots_and_checks_who_asks() {
    let tb = testbed_custom(1, |d| d.umask = Some(0));
    let socket = tb.host(0).socket_path().to_path_buf();
    let dir = socket.parent().unwrap().to_path_buf();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode(&dir), mode(&socket)), (0o700, 0o600));

    let out = cli_as_nobody(&tb, &["status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ermission denied"),
        "{}",
        stderr(&out)
    );

    // Root's seed; then the socket is opened to everyone, as a careless admin would.
    let (_dir, seed, handle) = prepared_memcheck(&tb, "control");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let out = cli_as_nobody(&tb, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("seeds 1"), "{}", stdout(&out));
    let pid = seed.pid();
    refused(
        &cli_as_nobody(&tb, &["prepare", "--pid", &pid.to_string()]),
        &format!("refused: uid 65534 may not prepare pid {pid}: it runs as uid 0"),
    );
    let id = handle.parse::<Handle>().unwrap().seed_id;
    for verb in ["resume", "inspect", "drop", "evict"] {
        refused(
            &cli_as_nobody(&tb, &[verb, &handle]),
            &format!("refused: uid 65534 may not {verb} seed {id}: another user prepared it"),
        );
    }
    refused(
        &cli_as_nobody(
            &tb,
            &["prepare", "--bundle", "/var/lib/mitosis/bundles/python"],
        ),
        "refused: only root may prepare a bundle",
    );
    assert_eq!(
        status_value(&tb, 0, "seeds"),
        Some(1),
        "the seed is still there"
    );

    // A process of its own it may prepare, inspect, resume (the child runs as nobody too) and
    // drop.
    let mut own = Command::new("cat")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let own_pid = own.id() as i32;
    assert!(eventually(Duration::from_secs(5), || {
        procfs::task_state(own_pid, own_pid) == Some('S')
    }));
    let out = cli_as_nobody(&tb, &["prepare", "--pid", &own_pid.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let own_handle = stdout(&out).trim().to_string();
    let out = cli_as_nobody(&tb, &["inspect", &own_handle]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("uid 65534/65534/65534/65534 gid 65534/65534/65534/65534"),
        "{}",
        stdout(&out)
    );
    // cat's child reads the resumer's stdin (empty) and exits 0.
    let out = cli_as_nobody(&tb, &["resume", &own_handle]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli_as_nobody(&tb, &["drop", &own_handle]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = own.kill();
    let _ = own.wait();
    drop(seed);
    teardown(tb);
}

#[test]
fn overfull_control_messages_leak_no_descriptors() {
    let tb = testbed(1);
    let daemon = tb.host(0).daemon_pid().expect("host 0's daemon");
    std::thread::sleep(Duration::from_millis(500));
    let before = fd_count(daemon);
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds = [null.as_raw_fd(); 12];
    for _ in 0..100 {
        let mut s = UnixStream::connect(tb.host(0).socket_path()).unwrap();
        mitosis_sys::fdpass::send(s.as_raw_fd(), &[1], &fds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The daemon refuses the message and hangs up.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    assert!(
        eventually(Duration::from_secs(5), || fd_count(daemon) <= before),
        "the daemon had {before} descriptors, now {}",
        fd_count(daemon)
    );
    assert!(cli(&tb, 0, &["status"], "").status.success());
    teardown(tb);
}

#[test]
fn a_cold_host_resume_puts_no_key_bytes_on_the_wire() {
    let tb = testbed(2);
    let (_dir, seed, handle) = prepared_memcheck(&tb, "wire");
    let key = handle.parse::<Handle>().unwrap().key;
    let hex_key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let capture = Capture::start(tb.host(1));
    let out = cli(&tb, 1, &["resume", &handle], "verify\n");
    let captured = capture.finish();
    assert_eq!(
        stdout(&out),
        format!("ok 11 {MEMCHECK_DIGEST}\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        (captured.truncated, captured.drops),
        (0, 0),
        "an incomplete capture"
    );
    // Neither the key, nor any 16 bytes of it (a key split across packets), nor its hex.
    for (i, p) in captured.packets.iter().enumerate() {
        for part in key.windows(16) {
            assert!(
                !p.windows(16).any(|w| w == part),
                "packet {i} carries key bytes"
            );
        }
        assert!(
            !p.windows(64).any(|w| w == hex_key.as_bytes()),
            "packet {i} carries the key in hex"
        );
    }
    let bytes: usize = captured.packets.iter().map(Vec::len).sum();
    // And it saw the page server's traffic: its hello, and the pages (the seed has ~20 MiB).
    let hello = [&b"MTPS"[..], &2u32.to_le_bytes()].concat();
    assert!(
        captured
            .packets
            .iter()
            .any(|p| p.windows(8).any(|w| w == hello)),
        "no hello among {} packets",
        captured.packets.len()
    );
    assert!(bytes > 8 << 20, "only {bytes} bytes captured");
    eprintln!(
        "{} packets, {bytes} bytes captured on the cold host",
        captured.packets.len()
    );
    drop(seed);
    teardown(tb);
}
