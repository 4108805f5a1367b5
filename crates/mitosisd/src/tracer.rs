//! The daemon's tracer thread.
//!
//! ptrace binds a tracee to the *thread* that attached it, and twins stay traced for as long
//! as their seed is prepared (PTRACE_O_EXITKILL: they die with this thread, so a crashed daemon
//! leaves none behind). So every ptrace operation runs here, one at a time.

use std::sync::mpsc;
use std::thread;

type Job = Box<dyn FnOnce() + Send>;

/// The tracer thread's nice value.
const TRACER_NICE: i32 = -10;

#[derive(Clone)]
pub struct Tracer {
    jobs: mpsc::Sender<Job>,
}

impl Tracer {
    /// Starts the thread.
    pub fn spawn() -> std::io::Result<Tracer> {
        let (jobs, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("tracer".into())
            .spawn(move || {
                // Its jobs are short and a resume waits on each: ahead of bulk transfers.
                if let Err(e) = mitosis_sys::task::set_thread_nice(TRACER_NICE) {
                    tracing::warn!("tracer priority: {e}");
                }
                for job in rx {
                    job();
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
