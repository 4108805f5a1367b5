//! What the accept loops (the page server's, the TCP control listener's) share: the limits
//! on the connections they admit ([`Limits`]), and what they do when accepting fails
//! (EMFILE, ENFILE, ENOBUFS, ENOMEM...: [`Backoff`]).
//!
//! The listening socket stays readable while the error lasts, so retrying at once spins a
//! core and logs a line per try (1.74 GB of warnings in 24 s, measured). Instead the loop
//! sleeps, 10 ms doubling to 1 s, and logs the first error of a burst and one summary when
//! accepting works again. While descriptors are short, accepts and errors alternate (each
//! connection accepted takes the descriptor its predecessor gave back), so a burst ends only
//! at an accept [`QUIET`] after its last error; each accept resets the delay, so a backlog
//! drains at one connection per 10 ms at worst.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::{Counters, Daemon};

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

/// Connections open per peer address and in all, under a limit for each: an accept loop
/// takes a [`Slot`] for each connection it admits, and the slot gives its place back (and
/// lowers the connections gauge it raised) when the connection ends.
#[derive(Clone)]
pub struct Limits {
    open: Arc<Mutex<Open>>,
    per_address: usize,
    total: usize,
    /// The gauge of open connections in the daemon's counters.
    gauge: fn(&Counters) -> &AtomicU64,
}

#[derive(Default)]
struct Open {
    per_address: HashMap<IpAddr, usize>,
    total: usize,
}

/// Where one admitted connection was counted; [`Limits::admit`] refuses what is over.
pub enum Admitted {
    Yes(Slot),
    /// Over a limit: the connections open from that address, and in all.
    No {
        from_address: usize,
        total: usize,
    },
}

impl Limits {
    pub fn new(per_address: usize, total: usize, gauge: fn(&Counters) -> &AtomicU64) -> Self {
        Limits {
            open: Default::default(),
            per_address,
            total,
            gauge,
        }
    }

    /// A place for a connection from `ip`, if the limits allow one.
    pub fn admit(&self, ip: IpAddr, daemon: &Arc<Daemon>) -> Admitted {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let here = open.per_address.get(&ip).copied().unwrap_or(0);
        if open.total >= self.total || here >= self.per_address {
            return Admitted::No {
                from_address: here,
                total: open.total,
            };
        }
        open.total += 1;
        *open.per_address.entry(ip).or_default() += 1;
        (self.gauge)(&daemon.counters).fetch_add(1, Ordering::Relaxed);
        Admitted::Yes(Slot {
            limits: self.clone(),
            ip,
            daemon: daemon.clone(),
        })
    }
}

/// A connection's place under the limits, given back when it ends.
pub struct Slot {
    limits: Limits,
    ip: IpAddr,
    daemon: Arc<Daemon>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(n) = open.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_address.remove(&self.ip);
            }
        }
        (self.limits.gauge)(&self.daemon.counters).fetch_sub(1, Ordering::Relaxed);
    }
}
