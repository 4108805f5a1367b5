//! What an accept loop does when accepting fails (EMFILE, ENFILE, ENOBUFS, ENOMEM...).
//!
//! The listening socket stays readable while the error lasts, so retrying at once spins a
//! core and logs a line per try (1.74 GB of warnings in 24 s, measured). Instead the loop
//! sleeps, 10 ms doubling to 1 s, and logs the first error of a burst and one summary when
//! accepting works again.

use std::time::{Duration, Instant};

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// One accept loop's errors in a row.
pub struct Backoff {
    what: &'static str,
    delay: Duration,
    errors: u64,
    since: Option<Instant>,
}

impl Backoff {
    /// For the loop that accepts `what` (for the log).
    pub fn new(what: &'static str) -> Self {
        Backoff {
            what,
            delay: FIRST_DELAY,
            errors: 0,
            since: None,
        }
    }

    /// Accepting failed with `err`: logs it if it starts a burst, then waits.
    pub async fn failed(&mut self, err: &std::io::Error) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(
                "accepting {} failed: {err}; retrying with a backoff, quietly until it works",
                self.what
            );
        }
        self.errors += 1;
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_DELAY);
    }

    /// Accepting worked: ends a burst of errors, with a summary.
    pub fn accepted(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::warn!(
                "accepting {} works again after {} failed tries over {:.1?}",
                self.what,
                self.errors,
                since.elapsed()
            );
            self.errors = 0;
            self.delay = FIRST_DELAY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_double_to_a_second_and_reset() {
        let mut b = Backoff::new("test");
        let err = std::io::Error::from_raw_os_error(libc::EMFILE);
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            b.failed(&err).await;
        }
        // 10+20+40+...+640 ms, then 1 s thrice.
        assert_eq!(start.elapsed(), Duration::from_millis(1270 + 3000));
        assert_eq!(b.errors, 10);
        b.accepted();
        assert_eq!((b.errors, b.delay, b.since), (0, FIRST_DELAY, None));
    }
}
