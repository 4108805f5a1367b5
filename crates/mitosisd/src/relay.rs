//! A child's stdio relayed on its control connection (a resume over TCP, where no descriptor
//! can travel): the daemon makes the pipes and pumps them to and from frames.
//!
//! Everything is bounded. Stdin: the client may have at most [`STDIN_WINDOW`] bytes sent
//! that the child's pipe has not taken (more is a protocol violation that ends the
//! connection, and with it the child); the window comes back as [`Event::StdinWindow`] as
//! the pipe takes them. So the connection's reader never waits for the child, and a signal
//! gets through whatever the child reads. Stdout and stderr: each pump holds one chunk of at
//! most [`MAX_STDIO_CHUNK`] bytes and waits for room in the connection's bounded event queue;
//! a platform that reads slowly stops the pumps, and the child blocks writing its pipe, as it
//! would on a slow terminal. One connection's pipes never wait on another's.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mitosis_transport::control::{Event, MAX_STDIO_CHUNK, STDIN_WINDOW};
use nix::fcntl::OFlag;
use thiserror::Error;
use tokio::sync::mpsc;

/// Reads a pipe holds at most after the child exited (a grandchild may keep writing it).
const DRAIN_READS: usize = 64;

/// The daemon's ends of a relayed child's pipes.
pub struct Ends {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// The child's stdin, stdout and stderr, and the daemon's ends of the same pipes.
pub fn pipes() -> io::Result<([OwnedFd; 3], Ends)> {
    let pair = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from);
    let (in_r, in_w) = pair()?;
    let (out_r, out_w) = pair()?;
    let (err_r, err_w) = pair()?;
    Ok((
        [in_r, out_w, err_w],
        Ends {
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        },
    ))
}

/// A client broke the relay's rules: the connection ends (and the child with it).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Violation {
    #[error("a stdin chunk of {0} bytes (at most {MAX_STDIO_CHUNK})")]
    ChunkTooLarge(usize),
    #[error(
        "stdin beyond the window: {outstanding} bytes not taken yet, {more} more sent (window {STDIN_WINDOW})"
    )]
    OverWindow { outstanding: usize, more: usize },
    #[error("stdin after its end")]
    AfterEof,
}

/// The stdin side, for the connection's reader: takes chunks within the window.
pub struct StdinFeed {
    chunks: Option<mpsc::UnboundedSender<Vec<u8>>>,
    outstanding: Arc<AtomicUsize>,
}

impl StdinFeed {
    /// Queues `data` for the child's stdin (the queue is bounded by the window).
    pub fn data(&mut self, data: Vec<u8>) -> Result<(), Violation> {
        if data.len() > MAX_STDIO_CHUNK {
            return Err(Violation::ChunkTooLarge(data.len()));
        }
        let Some(chunks) = &self.chunks else {
            return Err(Violation::AfterEof);
        };
        let outstanding = self.outstanding.load(Ordering::Acquire);
        if outstanding + data.len() > STDIN_WINDOW {
            return Err(Violation::OverWindow {
                outstanding,
                more: data.len(),
            });
        }
        self.outstanding.fetch_add(data.len(), Ordering::AcqRel);
        // The pump is gone only once the child's stdin is: the bytes have nowhere to go.
        let _ = chunks.send(data);
        Ok(())
    }

    /// The child reads EOF once it has read what was queued before.
    pub fn eof(&mut self) {
        self.chunks = None;
    }
}

/// The pumps of one relayed child: threads of their own, not tasks. A pipe's read, write or
/// close can wait in the kernel on the pipe's lock while the child holds it, copying from or
/// to a page of its memory that is still to come through userfaultfd; on a runtime worker
/// that wait could keep the fault handler (a task of the same runtime) from serving that
/// very page, and the daemon would stall. On a thread of its own it waits for the fault like
/// the child does.
pub struct Relay {
    outputs: Vec<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Relay {
    /// Starts pumping `ends`: stdin from the returned feed, stdout and stderr to `events`.
    pub fn start(ends: Ends, events: &mpsc::Sender<Event>) -> io::Result<(Relay, StdinFeed)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let (window, stdin_events) = (outstanding.clone(), events.clone());
        std::thread::Builder::new()
            .name("relay-stdin".into())
            .spawn(move || pump_in(ends.stdin, rx, window, stdin_events))?;
        let mut outputs = Vec::new();
        for (pipe, wrap) in [
            (ends.stdout, Event::Stdout as fn(_) -> _),
            (ends.stderr, Event::Stderr),
        ] {
            let finish = Arc::new(AtomicBool::new(false));
            let (told, events) = (finish.clone(), events.clone());
            let thread = std::thread::Builder::new()
                .name("relay-output".into())
                .spawn(move || pump_out(pipe, wrap, events, told))?;
            outputs.push((finish, thread));
        }
        Ok((
            Relay { outputs },
            StdinFeed {
                chunks: Some(tx),
                outstanding,
            },
        ))
    }

    /// Once the child is gone: sends what its pipes still hold, then stops. The stdin pump
    /// ends by itself, with the feed (or at its next write, to a pipe nobody reads).
    pub async fn finish(self) {
        for (finish, _) in &self.outputs {
            finish.store(true, Ordering::Release);
        }
        let threads: Vec<_> = self.outputs.into_iter().map(|(_, t)| t).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// How long an output pump waits for data before it looks whether it is told to finish.
const FINISH_POLL_MS: u16 = 50;

/// Writes queued chunks to the child's stdin, granting the window back as the pipe takes
/// them; closes the pipe once the feed ends.
fn pump_in(
    pipe: OwnedFd,
    mut chunks: mpsc::UnboundedReceiver<Vec<u8>>,
    outstanding: Arc<AtomicUsize>,
    events: mpsc::Sender<Event>,
) {
    let mut pipe = std::fs::File::from(pipe);
    let mut open = true;
    while let Some(chunk) = chunks.blocking_recv() {
        // A child that closed its stdin makes the rest go nowhere: the client is not told,
        // as a terminal would not tell it either, and its window still comes back.
        if open && std::io::Write::write_all(&mut pipe, &chunk).is_err() {
            open = false;
        }
        outstanding.fetch_sub(chunk.len(), Ordering::AcqRel);
        let granted = u32::try_from(chunk.len()).expect("chunks are small");
        if events.blocking_send(Event::StdinWindow(granted)).is_err() {
            return;
        }
    }
}

/// Sends what the child writes to one pipe as events, until EOF; once told to finish (the
/// child exited), sends what the pipe holds now and stops (a grandchild may keep it open).
fn pump_out(
    pipe: OwnedFd,
    wrap: fn(Vec<u8>) -> Event,
    events: mpsc::Sender<Event>,
    finish: Arc<AtomicBool>,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut buf = vec![0u8; MAX_STDIO_CHUNK];
    while !finish.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(FINISH_POLL_MS)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        match nix::unistd::read(pipe.as_fd(), &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if events.blocking_send(wrap(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
    // What the pipe holds now, without waiting for more.
    if nix::fcntl::fcntl(
        pipe.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    )
    .is_err()
    {
        return;
    }
    for _ in 0..DRAIN_READS {
        match nix::unistd::read(pipe.as_fd(), &mut buf) {
            Ok(n) if n > 0 => {
                if events.blocking_send(wrap(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_bytes(e: Event) -> (&'static str, Vec<u8>) {
        match e {
            Event::Stdout(b) => ("out", b),
            Event::Stderr(b) => ("err", b),
            Event::StdinWindow(n) => ("window", vec![0; n as usize]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_goes_through_within_the_window_and_comes_back() {
        let (child, ends) = pipes().unwrap();
        let (events_tx, mut events) = mpsc::channel(4);
        let (relay, mut feed) = Relay::start(ends, &events_tx).unwrap();
        let [child_in, child_out, child_err] = child;
        feed.data(b"hello".to_vec()).unwrap();
        feed.eof();
        assert_eq!(feed.data(b"late".to_vec()), Err(Violation::AfterEof));
        assert_eq!(
            event_bytes(events.recv().await.unwrap()),
            ("window", vec![0; 5])
        );
        // The child's side: stdin holds the bytes then EOF (blocking fds).
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(child_in), &mut got).unwrap();
        assert_eq!(got, b"hello");
        std::io::Write::write_all(&mut std::fs::File::from(child_out), b"out!").unwrap();
        std::io::Write::write_all(&mut std::fs::File::from(child_err), b"err!").unwrap();
        let mut seen = vec![
            event_bytes(events.recv().await.unwrap()),
            event_bytes(events.recv().await.unwrap()),
        ];
        seen.sort();
        assert_eq!(seen, [("err", b"err!".to_vec()), ("out", b"out!".to_vec())]);
        relay.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_past_the_window_or_the_chunk_size_is_refused() {
        let (child, ends) = pipes().unwrap();
        let (events_tx, _events) = mpsc::channel(4);
        let (relay, mut feed) = Relay::start(ends, &events_tx).unwrap();
        assert_eq!(
            feed.data(vec![0; MAX_STDIO_CHUNK + 1]),
            Err(Violation::ChunkTooLarge(MAX_STDIO_CHUNK + 1))
        );
        // The child reads nothing: the pipe takes 64 KiB, the window holds the rest.
        let mut sent = 0;
        let refused = loop {
            match feed.data(vec![7; MAX_STDIO_CHUNK]) {
                Ok(()) => sent += MAX_STDIO_CHUNK,
                Err(e) => break e,
            }
            assert!(sent <= STDIN_WINDOW + (1 << 20), "no limit");
            tokio::task::yield_now().await;
        };
        assert!(matches!(refused, Violation::OverWindow { .. }), "{refused}");
        assert!(
            sent <= STDIN_WINDOW + (64 << 10) + MAX_STDIO_CHUNK,
            "{sent}"
        );
        drop(child);
        relay.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_left_in_the_pipe_at_exit_is_sent() {
        let (child, ends) = pipes().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        let (relay, _feed) = Relay::start(ends, &events_tx).unwrap();
        let [_, out, err] = child;
        // Written and still held open elsewhere (a grandchild): no EOF comes.
        nix::unistd::write(&out, b"last words").unwrap();
        let held = (out, err);
        relay.finish().await;
        let mut got = Vec::new();
        while let Ok(e) = events.try_recv() {
            got.extend(event_bytes(e).1);
        }
        assert_eq!(got, b"last words");
        drop(held);
    }
}
