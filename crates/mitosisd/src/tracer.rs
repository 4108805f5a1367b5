//! The daemon's tracer thread.
//!
//! ptrace binds a tracee to the *thread* that attached it, and twins stay traced for as long
//! as their seed is prepared (PTRACE_O_EXITKILL: they die with this thread, so a crashed daemon
//! leaves none behind). So every ptrace operation runs here, one at a time.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// The tracer thread's nice value.
const TRACER_NICE: i32 = -10;

/// How long the thread waits without a job before it does its idle work.
pub const QUIET: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Tracer {
    jobs: mpsc::Sender<Job>,
}

impl Tracer {
    /// Starts the thread; `idle` runs at start and once the thread has had no job for
    /// [`QUIET`] (work done ahead of need, such as starting stubs). Not at once after a job:
    /// a resume's jobs come a few milliseconds apart, and the next must not wait behind it.
    pub fn spawn(mut idle: impl FnMut() + Send + 'static) -> std::io::Result<Tracer> {
        let (jobs, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("tracer".into())
            .spawn(move || {
                // Its jobs are short and a resume waits on each: ahead of bulk transfers.
                if let Err(e) = mitosis_sys::task::set_thread_nice(TRACER_NICE) {
                    tracing::warn!("tracer priority: {e}");
                }
                idle();
                // After idle work, wait for the next job without a deadline.
                let mut wait = Duration::MAX;
                loop {
                    match rx.recv_timeout(wait) {
                        Ok(job) => {
                            job();
                            wait = QUIET;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            idle();
                            wait = Duration::MAX;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Tracer { jobs })
    }

    /// Runs `f` on the tracer thread and waits for its result.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("tracer thread lives as long as the daemon");
        rx.await.expect("tracer jobs always answer")
    }
}
