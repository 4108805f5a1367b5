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
use std::sync::atomic::{AtomicUsize, Ordering};

use mitosis_transport::control::{Event, MAX_STDIO_CHUNK, STDIN_WINDOW};
use nix::fcntl::OFlag;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

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

/// The pumps of one relayed child.
pub struct Relay {
    stdin: JoinHandle<()>,
    outputs: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Relay {
    /// Starts pumping `ends`: stdin from the returned feed, stdout and stderr to `events`.
    pub fn start(ends: Ends, events: &mpsc::Sender<Event>) -> io::Result<(Relay, StdinFeed)> {
        let stdin = pipe::Sender::from_owned_fd(ends.stdin)?;
        let stdout = pipe::Receiver::from_owned_fd(ends.stdout)?;
        let stderr = pipe::Receiver::from_owned_fd(ends.stderr)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let stdin = tokio::spawn(pump_in(stdin, rx, outstanding.clone(), events.clone()));
        let outputs = [
            (stdout, Event::Stdout as fn(_) -> _),
            (stderr, Event::Stderr),
        ]
        .into_iter()
        .map(|(pipe, wrap)| {
            let (finish, finishing) = oneshot::channel();
            let task = tokio::spawn(pump_out(pipe, wrap, events.clone(), finishing));
            (finish, task)
        })
        .collect();
        Ok((
            Relay { stdin, outputs },
            StdinFeed {
                chunks: Some(tx),
                outstanding,
            },
        ))
    }

    /// Once the child is gone: sends what its pipes still hold, then stops.
    pub async fn finish(self) {
        self.stdin.abort();
        for (finish, task) in self.outputs {
            let _ = finish.send(());
            let _ = task.await;
        }
    }
}

/// Writes queued chunks to the child's stdin, granting the window back as the pipe takes
/// them; closes the pipe once the feed ends.
async fn pump_in(
    mut pipe: pipe::Sender,
    mut chunks: mpsc::UnboundedReceiver<Vec<u8>>,
    outstanding: Arc<AtomicUsize>,
    events: mpsc::Sender<Event>,
) {
    let mut open = true;
    while let Some(chunk) = chunks.recv().await {
        // A child that closed its stdin makes the rest go nowhere: the client is not told,
        // as a terminal would not tell it either, and its window still comes back.
        if open && pipe.write_all(&chunk).await.is_err() {
            open = false;
        }
        outstanding.fetch_sub(chunk.len(), Ordering::AcqRel);
        let granted = u32::try_from(chunk.len()).expect("chunks are small");
        if events.send(Event::StdinWindow(granted)).await.is_err() {
            return;
        }
    }
}

/// Sends what the child writes to one pipe as events, until EOF; once told to finish (the
/// child exited), sends what the pipe holds now and stops.
async fn pump_out(
    mut pipe: pipe::Receiver,
    wrap: fn(Vec<u8>) -> Event,
    events: mpsc::Sender<Event>,
    mut finish: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; MAX_STDIO_CHUNK];
    loop {
        tokio::select! {
            biased;
            _ = &mut finish => break,
            read = pipe.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if events.send(wrap(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
    // A read(2) of its own: tokio's reads wait for a readiness the runtime may not have seen
    // yet when the exit came first. The fd is non-blocking: this stops at EAGAIN or EOF.
    for _ in 0..DRAIN_READS {
        match nix::unistd::read(pipe.as_fd(), &mut buf) {
            Ok(n) if n > 0 => {
                if events.send(wrap(buf[..n].to_vec())).await.is_err() {
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
