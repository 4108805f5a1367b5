//! What an accept loop does when accepting fails (EMFILE, ENFILE, ENOBUFS, ENOMEM...).
//!
//! The listening socket stays readable while the error lasts, so retrying at once spins a
//! core and logs a line per try (1.74 GB of warnings in 24 s, measured). Instead the loop
//! sleeps, 10 ms doubling to 1 s, and logs the first error of a burst and one summary when
//! accepting works again. While descriptors are short, accepts and errors alternate (each
//! connection accepted takes the descriptor its predecessor gave back), so a burst ends only
//! at an accept [`QUIET`] after its last error; each accept resets the delay, so a backlog
//! drains at one connection per 10 ms at worst.

use std::time::{Duration, Instant};

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);
/// How long accepting must have worked for a burst of errors to be over.
pub const QUIET: Duration = Duration::from_secs(1);

/// One accept loop's errors in a row.
pub struct Backoff {
    what: &'static str,
    delay: Duration,
    errors: u64,
    /// When the burst began, and its last error.
    since: Option<(Instant, Instant)>,
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
        let now = Instant::now();
        match &mut self.since {
            Some((_, last)) => *last = now,
            None => {
                self.since = Some((now, now));
                tracing::warn!(
                    "accepting {} failed: {err}; retrying with a backoff, quietly until it works",
                    self.what
                );
            }
        }
        self.errors += 1;
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_DELAY);
    }

    /// Accepting worked: the next error waits the shortest delay again, and a burst of
    /// errors whose last is [`QUIET`] old is over, with a summary.
    pub fn accepted(&mut self) {
        self.delay = FIRST_DELAY;
        if let Some((began, last)) = self.since
            && last.elapsed() >= QUIET
        {
            tracing::warn!(
                "accepting {} works again after {} failed tries over {:.1?}",
                self.what,
                self.errors,
                last - began
            );
            self.since = None;
            self.errors = 0;
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
        assert_eq!(b.delay, FIRST_DELAY);
    }

    #[test]
    fn a_burst_ends_only_after_a_quiet_while() {
        let mut b = Backoff::new("test");
        let t0 = Instant::now();
        b.since = Some((t0, t0));
        b.errors = 3;
        // Accepts between errors keep the burst going.
        b.accepted();
        assert_eq!(b.errors, 3);
        let old = t0 - QUIET;
        b.since = Some((old, old));
        b.accepted();
        assert_eq!((b.errors, b.since), (0, None));
    }
}
