//! Tracer threads: one per seed (its twin) and one per replica.
//!
//! ptrace binds a tracee to the *thread* that attached it, and twins and replicas stay traced
//! for as long as they live (PTRACE_O_EXITKILL: they die with their thread, so a crashed
//! daemon leaves none running). Each has a thread of its own, so a slow job for one (a build
//! waiting for a stalled peer's bootstrap pages) holds up no other seed's prepare, build or
//! fork. The thread ends when its last handle is dropped.

use std::thread;

use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// The tracer thread's nice value.
const TRACER_NICE: i32 = -10;
/// Jobs that may wait for one tracer; beyond that a caller waits to queue its own.
const QUEUE: usize = 64;

#[derive(Clone)]
pub struct Tracer {
    jobs: mpsc::Sender<Job>,
}

impl Tracer {
    /// Starts a thread called `name` (at most 15 bytes show).
    pub fn spawn(name: &str) -> std::io::Result<Tracer> {
        let (jobs, mut rx) = mpsc::channel::<Job>(QUEUE);
        thread::Builder::new().name(name.into()).spawn(move || {
            // Its jobs are short and a resume waits on each: ahead of bulk transfers.
            if let Err(e) = mitosis_sys::task::set_thread_nice(TRACER_NICE) {
                tracing::warn!("tracer priority: {e}");
            }
            while let Some(job) = rx.blocking_recv() {
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
            .await
            .map_err(|_| ())
            .expect("a tracer thread lives as long as its handles");
        rx.await.expect("tracer jobs always answer")
    }
}
