//! The client against a fake daemon: a thread at the other end of a socket that reads one
//! request (with its descriptors) and answers with scripted frames.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use mitosis_sys::fdpass;
use mitosis_transport::control::{DaemonError, ErrorKind, Event, Request};
use mitosis_transport::frame;

use crate::{Client, Error, PrepareStats, ResumeStats};

/// What the fake daemon got: the first request, how many fds came with it, and any requests
/// that followed on the connection until it closed.
struct Got {
    first: Request,
    fds: usize,
    later: Vec<Request>,
}

/// How the fake daemon behaves after the first request.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// Writes every answer at once, then reads until the client closes.
    Answer,
    /// Waits for one more request before each answer after the first.
    AnswerEachRequest,
    /// Writes every answer at once, then closes the connection.
    HangUp,
}

/// Reads the first request (with its descriptors) and answers it as `then` says.
fn fake_daemon(mut stream: UnixStream, answers: Vec<Event>, then: Then) -> Got {
    let mut buf = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let first = loop {
        if let Some(req) = frame::try_decode::<Request>(&buf).unwrap() {
            break req;
        }
        let mut chunk = [0u8; 4096];
        let (n, mut got) = fdpass::recv(stream.as_raw_fd(), &mut chunk).unwrap();
        assert!(n > 0, "the client closed before sending a request");
        buf.extend_from_slice(&chunk[..n]);
        fds.append(&mut got);
    };
    let mut later = Vec::new();
    for (i, event) in answers.into_iter().enumerate() {
        if i > 0 && then == Then::AnswerEachRequest {
            later.push(frame::read_blocking(&mut stream).unwrap());
        }
        frame::write_blocking(&mut stream, &event).unwrap();
    }
    if then != Then::HangUp {
        while let Ok(req) = frame::read_blocking(&mut stream) {
            later.push(req);
        }
    }
    Got {
        first,
        fds: fds.len(),
        later,
    }
}

/// A client whose daemon is [`fake_daemon`] on a socketpair.
fn pair(answers: Vec<Event>, then: Then) -> (Client, JoinHandle<Got>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let daemon = thread::spawn(move || fake_daemon(theirs, answers, then));
    (Client::from_stream(ours), daemon)
}

fn started(pid: i32) -> Event {
    Event::Started {
        pid,
        stats: ResumeStats {
            cached: true,
            fork_us: 700,
            total_us: 900,
            ..ResumeStats::default()
        },
    }
}

#[test]
fn prepare_gets_the_handle_and_stats() {
    let stats = PrepareStats {
        stopped_us: 900,
        total_us: 1500,
        ..PrepareStats::default()
    };
    let (client, daemon) = pair(
        vec![Event::Prepared {
            handle: "mitosis://10.0.0.1:7070/1/ab".into(),
            stats,
        }],
        Then::Answer,
    );
    let (handle, stats) = client.prepare_pid(42).unwrap();
    assert_eq!(handle, "mitosis://10.0.0.1:7070/1/ab");
    assert_eq!((stats.stopped_us, stats.total_us), (900, 1500));
    let got = daemon.join().unwrap();
    assert!(matches!(got.first, Request::Prepare { pid: 42 }));
    assert_eq!(got.fds, 0);
}

#[test]
fn a_profiled_prepare_names_its_profile() {
    let stats = PrepareStats {
        carried_pages: 77,
        ..PrepareStats::default()
    };
    let (client, daemon) = pair(
        vec![Event::Prepared {
            handle: "mitosis://10.0.0.1:7070/2/ab".into(),
            stats,
        }],
        Then::Answer,
    );
    let (_, stats) = client.prepare_pid_profiled(42, "app/fn").unwrap();
    assert_eq!(stats.carried_pages, 77);
    let got = daemon.join().unwrap();
    match got.first {
        Request::PrepareProfiled { pid, profile } => {
            assert_eq!((pid, profile.as_str()), (Some(42), "app/fn"))
        }
        other => panic!("sent {other:?}"),
    }
}

#[test]
fn an_error_event_is_the_error() {
    let (client, daemon) = pair(
        vec![Event::Error(DaemonError::new(
            ErrorKind::NoSuchSeed,
            "no seed 7 here",
        ))],
        Then::Answer,
    );
    let err = client.evict("mitosis://10.0.0.1:7070/7/ab").unwrap_err();
    assert!(matches!(&err, Error::Daemon(e) if e.message == "no seed 7 here"));
    assert_eq!(err.kind(), Some(ErrorKind::NoSuchSeed));
    assert_eq!(err.to_string(), "no seed 7 here");
    assert!(matches!(
        daemon.join().unwrap().first,
        Request::Evict { .. }
    ));

    // The same for a resume: no child, the daemon's reason.
    let (client, daemon) = pair(
        vec![Event::Error(DaemonError::new(
            ErrorKind::WrongKey,
            "wrong key",
        ))],
        Then::Answer,
    );
    let fd = std::io::stdin();
    let err = client
        .resume("h", fd.as_fd(), fd.as_fd(), fd.as_fd(), None)
        .err()
        .expect("a refused resume fails");
    assert_eq!(err.to_string(), "wrong key");
    assert_eq!(daemon.join().unwrap().fds, 3);
}

#[test]
fn resume_started_signal_exited() {
    let exited = Event::Exited {
        status: 130,
        reason: None,
        stats: crate::FaultStats {
            faults: 12,
            fetches: 3,
            ..Default::default()
        },
    };
    // The exit is sent only after the signal request arrived.
    let (client, daemon) = pair(vec![started(4242), exited], Then::AnswerEachRequest);
    let (r, w) = UnixStream::pair().unwrap();
    let listener_path = temp_socket("listener");
    let listener = UnixListener::bind(&listener_path).unwrap();
    let running = client
        .resume(
            "mitosis://h/1/k",
            r.as_fd(),
            w.as_fd(),
            w.as_fd(),
            Some(listener.as_fd()),
        )
        .unwrap();
    assert_eq!(running.pid, 4242);
    assert!(running.stats.cached);
    assert_eq!(running.stats.fork_us, 700);
    running.signaller().unwrap().signal(2).unwrap();
    let end = running.wait().unwrap();
    assert_eq!(end.status, 130);
    assert_eq!(end.reason, None);
    assert_eq!((end.stats.faults, end.stats.fetches), (12, 3));
    let got = daemon.join().unwrap();
    assert!(
        matches!(got.first, Request::Resume { handle, memory_mib: None } if handle == "mitosis://h/1/k")
    );
    assert_eq!(got.fds, 4);
    assert!(matches!(
        got.later.as_slice(),
        [Request::Signal { signo: 2 }]
    ));
    std::fs::remove_file(listener_path).unwrap();
}

#[test]
fn a_closed_connection_is_a_clear_error() {
    // The daemon goes away after the child started: waiting says so.
    let (client, daemon) = pair(vec![started(1)], Then::HangUp);
    let fd = std::io::stdin();
    let running = client
        .resume("h", fd.as_fd(), fd.as_fd(), fd.as_fd(), None)
        .unwrap();
    let err = running.wait().unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert_eq!(err.to_string(), "mitosisd closed the connection");
    daemon.join().unwrap();

    // A daemon that closes without answering at all.
    let (client, daemon) = pair(vec![], Then::HangUp);
    assert!(matches!(client.status().unwrap_err(), Error::Closed));
    daemon.join().unwrap();
}

#[test]
fn no_answer_in_time_is_a_timeout() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let client = Client::from_stream(ours)
        .with_timeout(Duration::from_millis(30))
        .unwrap();
    let err = client.drop_seed("h").unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    drop(theirs);
}

#[test]
fn an_answer_that_does_not_fit_is_unexpected() {
    let (client, daemon) = pair(vec![Event::Done], Then::Answer);
    let err = client.status().unwrap_err();
    assert!(matches!(err, Error::Unexpected(_)));
    assert_eq!(err.to_string(), "unexpected answer from mitosisd: Done");
    daemon.join().unwrap();
}

#[test]
fn connect_over_a_socket_path() {
    let path = temp_socket("daemon");
    let listener = UnixListener::bind(&path).unwrap();
    let daemon = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        fake_daemon(
            stream,
            vec![Event::Status(mitosis_transport::control::DaemonStatus {
                listen: "10.0.0.1:7070".into(),
                ..Default::default()
            })],
            Then::Answer,
        )
    });
    let status = Client::connect(&path).unwrap().status().unwrap();
    assert_eq!(status.listen, "10.0.0.1:7070");
    assert!(status.to_string().contains("\nseeds 0\n"), "{status}");
    assert!(matches!(daemon.join().unwrap().first, Request::Status));
    std::fs::remove_file(&path).unwrap();

    let err = Client::connect(&path).err().expect("nobody listens");
    assert!(matches!(err, Error::Connect { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "cannot reach the local mitosisd at {} (is it running?): ",
            path.display()
        )),
        "{msg}"
    );
}

/// A fresh socket path in the temp directory.
fn temp_socket(what: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "mitosis-client-test-{}-{what}-{n}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn signals_after_the_daemon_is_gone_fail() {
    let (client, daemon) = pair(vec![started(9)], Then::HangUp);
    let fd = std::io::stdin();
    let running = client
        .resume("h", fd.as_fd(), fd.as_fd(), fd.as_fd(), None)
        .unwrap();
    let signaller = running.signaller().unwrap();
    daemon.join().unwrap();
    let err = signaller.signal(15).unwrap_err();
    assert!(matches!(err, Error::Send(_)), "{err:?}");
    assert!(err.to_string().starts_with("sending to mitosisd: "));
}
