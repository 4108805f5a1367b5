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
                let mut worked = false;
                loop {
                    let job = if worked {
                        match rx.recv_timeout(QUIET) {
                            Ok(job) => job,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                idle();
                                worked = false;
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    } else {
                        match rx.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        }
                    };
                    job();
                    worked = true;
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
