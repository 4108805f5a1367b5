//! The calls' history the dashboard shows: per function, a ring of [`BUCKET_SECS`] s buckets,
//! each with its calls counted by how they started and log-scale histograms of start and call
//! latency; bounded in buckets, functions and bins.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Start;

/// The width of one bucket of the history, in seconds.
pub const BUCKET_SECS: u64 = 10;
/// Buckets kept per function: 30 minutes.
pub const WINDOW_BUCKETS: u64 = 180;
/// Functions with a history at most; past that, the one idle the longest is forgotten.
pub const MAX_FUNCTIONS: usize = 256;
/// Latency bins: four per doubling from 10 µs, the last open-ended (from about 280 s).
pub const BINS: usize = 100;
const PER_DOUBLING: f64 = 4.0;
const FIRST_US: f64 = 10.0;

/// Whose series a snapshot holds (the cluster's is always there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Series {
    All,
    None,
    Of(String),
}

impl Series {
    fn wants(&self, fn_id: &str) -> bool {
        match self {
            Series::All => true,
            Series::None => false,
            Series::Of(id) => id == fn_id,
        }
    }
}

/// The bin of a latency of `us` microseconds.
fn bin_of(us: u64) -> u8 {
    let us = us as f64;
    if us < FIRST_US {
        return 0;
    }
    let b = ((us / FIRST_US).log2() * PER_DOUBLING).floor();
    b.min((BINS - 1) as f64) as u8
}

/// A bin's latency in milliseconds: the geometric middle of its bounds.
fn bin_ms(bin: usize) -> f64 {
    FIRST_US * ((bin as f64 + 0.5) / PER_DOUBLING).exp2() / 1000.0
}

/// A sparse log-scale histogram: (bin, count) pairs by bin.
#[derive(Debug, Default, Clone)]
struct Hist(Vec<(u8, u32)>);

impl Hist {
    fn add(&mut self, us: u64) {
        let b = bin_of(us);
        match self.0.binary_search_by_key(&b, |e| e.0) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(1),
            Err(i) => self.0.insert(i, (b, 1)),
        }
    }

    fn percentiles(&self) -> Option<Percentiles> {
        percentiles(self.0.iter().map(|&(b, n)| (usize::from(b), u64::from(n))))
    }
}

/// The nearest-rank p50, p90 and p99 of (bin, count) pairs in bin order (`None` without
/// samples).
fn percentiles<I>(bins: I) -> Option<Percentiles>
where
    I: Iterator<Item = (usize, u64)> + Clone,
{
    let total: u64 = bins.clone().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let at = |p: f64| {
        let rank = ((p * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bin, n) in bins.clone() {
            seen += n;
            if seen >= rank {
                return round(bin_ms(bin));
            }
        }
        round(bin_ms(BINS - 1))
    };
    Some(Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    })
}

/// Histograms merged, to read percentiles from.
#[derive(Clone)]
struct Dense(Box<[u64; BINS]>);

impl Default for Dense {
    fn default() -> Self {
        Dense(Box::new([0; BINS]))
    }
}

impl Dense {
    fn add(&mut self, h: &Hist) {
        for &(b, n) in &h.0 {
            self.0[usize::from(b)] += u64::from(n);
        }
    }

    fn percentiles(&self) -> Option<Percentiles> {
        percentiles(self.0.iter().copied().enumerate())
    }
}

fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Calls by how they went: answered by a process forked, started cold or kept warm, or
/// failed (no answer: a request refused, or an error of the platform, a host or the function).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub calls: u64,
    pub fork: u64,
    pub cold: u64,
    pub warm: u64,
    pub failed: u64,
}

impl Counts {
    pub(super) fn add(&mut self, o: &Counts) {
        self.calls += o.calls;
        self.fork += o.fork;
        self.cold += o.cold;
        self.warm += o.warm;
        self.failed += o.failed;
    }

    fn count(&mut self, outcome: &Outcome) {
        self.calls += 1;
        match outcome {
            Outcome::Answered {
                start: Start::Fork, ..
            } => self.fork += 1,
            Outcome::Answered {
                start: Start::Cold, ..
            } => self.cold += 1,
            Outcome::Answered {
                start: Start::Warm, ..
            } => self.warm += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered; `start_us` is how long its host's daemon took to have the process running
    /// (a fork's resume, a cold start's start and warm-up), `None` when none was started
    /// (an instance kept warm).
    Answered {
        start: Start,
        start_us: Option<u64>,
    },
    Failed,
}

impl Outcome {
    /// The outcome of [`Platform::invoke`]'s result.
    pub fn of(result: &Result<crate::Invoked, crate::CallError>) -> Outcome {
        match result {
            Ok(i) => Outcome::Answered {
                start: i.start,
                start_us: (i.start != Start::Warm).then_some(i.answer.stats.total_us),
            },
            Err(_) => Outcome::Failed,
        }
    }
}

/// One bucket of a function's history.
#[derive(Debug, Clone)]
struct Bucket {
    /// Its start in seconds since the epoch, divided by [`BUCKET_SECS`].
    index: u64,
    counts: Counts,
    start: Hist,
    call: Hist,
}

#[derive(Debug, Default)]
pub(super) struct FnHistory {
    buckets: VecDeque<Bucket>,
    /// Since this platform started (or the function's history was forgotten).
    totals: Counts,
    in_flight: u64,
    /// The bucket index of its last call's start or end.
    last: u64,
}

impl FnHistory {
    fn prune(&mut self, now: u64) {
        while self
            .buckets
            .front()
            .is_some_and(|b| b.index + WINDOW_BUCKETS <= now)
        {
            self.buckets.pop_front();
        }
    }
}

/// The calls of each function over the last 30 minutes, for the dashboard.
#[derive(Debug, Default)]
pub struct History {
    fns: Mutex<HashMap<String, FnHistory>>,
}

/// Seconds since the epoch, as a bucket index.
pub(super) fn bucket_now() -> u64 {
    now_ms() / 1000 / BUCKET_SECS
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A call running: counted in flight until it finishes or is dropped (a call abandoned by
/// its client is counted in neither outcome).
pub struct Running<'a> {
    history: &'a History,
    fn_id: String,
    t0: Instant,
}

impl Running<'_> {
    /// Records how the call ended, timed from its [`History::begin`].
    pub fn finish(self, outcome: Outcome) {
        self.history
            .record_at(&self.fn_id, outcome, self.t0.elapsed(), bucket_now());
        // Drop takes it off the calls in flight.
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut fns = self.history.lock();
        if let Some(h) = fns.get_mut(&self.fn_id) {
            h.in_flight = h.in_flight.saturating_sub(1);
        }
    }
}

impl History {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<String, FnHistory>> {
        // Only counters change under the lock: a poisoned one is still whole.
        self.fns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `fn_id`'s entry, made (forgetting the function idle the longest if there are too
    /// many) if it has none.
    fn entry<'m>(
        fns: &'m mut HashMap<String, FnHistory>,
        fn_id: &str,
        now: u64,
    ) -> &'m mut FnHistory {
        if !fns.contains_key(fn_id) && fns.len() >= MAX_FUNCTIONS {
            let idlest = fns
                .iter()
                .filter(|(_, h)| h.in_flight == 0)
                .min_by_key(|(_, h)| h.last)
                .map(|(id, _)| id.clone());
            if let Some(id) = idlest {
                fns.remove(&id);
            }
        }
        let h = fns.entry(fn_id.to_owned()).or_default();
        h.last = h.last.max(now);
        h
    }

    /// A call of `fn_id` starts.
    pub fn begin(&self, fn_id: &str) -> Running<'_> {
        let now = bucket_now();
        Self::entry(&mut self.lock(), fn_id, now).in_flight += 1;
        Running {
            history: self,
            fn_id: fn_id.to_owned(),
            t0: Instant::now(),
        }
    }

    /// Records a call of `fn_id` that took `took` and ended as `outcome` in bucket `now`.
    pub(super) fn record_at(&self, fn_id: &str, outcome: Outcome, took: Duration, now: u64) {
        let mut fns = self.lock();
        let h = Self::entry(&mut fns, fn_id, now);
        h.prune(now);
        h.totals.count(&outcome);
        // A clock that stepped back adds to the last bucket rather than go before it.
        let index = h.buckets.back().map_or(now, |b| b.index.max(now));
        if h.buckets.back().is_none_or(|b| b.index != index) {
            h.buckets.push_back(Bucket {
                index,
                counts: Counts::default(),
                start: Hist::default(),
                call: Hist::default(),
            });
        }
        let b = h.buckets.back_mut().expect("just made");
        b.counts.count(&outcome);
        b.call.add(took.as_micros() as u64);
        if let Outcome::Answered {
            start_us: Some(us), ..
        } = outcome
        {
            b.start.add(us);
        }
    }

    /// Forgets a function (deleted).
    pub fn forget(&self, fn_id: &str) {
        self.lock().remove(fn_id);
    }

    /// What the dashboard shows of the history at bucket `now`: each function's, with its
    /// series if `series` wants it, and the cluster's series.
    pub(super) fn view(&self, now: u64, series: &Series) -> (HashMap<String, FnStats>, Vec<Point>) {
        let mut fns = self.lock();
        let mut cluster: BTreeMap<u64, (Counts, Dense, Dense)> = BTreeMap::new();
        let mut out = HashMap::new();
        for (id, h) in fns.iter_mut() {
            h.prune(now);
            let (mut start, mut call) = (Dense::default(), Dense::default());
            let mut window = Counts::default();
            let mut points = Vec::new();
            for b in &h.buckets {
                start.add(&b.start);
                call.add(&b.call);
                window.add(&b.counts);
                let c = cluster.entry(b.index).or_default();
                c.0.add(&b.counts);
                c.1.add(&b.start);
                c.2.add(&b.call);
                if series.wants(id) {
                    points.push(Point::new(
                        b.index,
                        b.counts,
                        b.start.percentiles(),
                        b.call.percentiles(),
                    ));
                }
            }
            out.insert(
                id.clone(),
                FnStats {
                    in_flight: h.in_flight,
                    totals: h.totals,
                    window,
                    start_ms: start.percentiles(),
                    call_ms: call.percentiles(),
                    series: points,
                },
            );
        }
        let cluster = cluster
            .into_iter()
            .map(|(index, (counts, s, c))| {
                Point::new(index, counts, s.percentiles(), c.percentiles())
            })
            .collect();
        (out, cluster)
    }
}

/// One function's history, for the snapshot.
pub(super) struct FnStats {
    pub(super) in_flight: u64,
    pub(super) totals: Counts,
    pub(super) window: Counts,
    pub(super) start_ms: Option<Percentiles>,
    pub(super) call_ms: Option<Percentiles>,
    pub(super) series: Vec<Point>,
}

/// One bucket with calls.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Its start, in seconds since the epoch.
    pub t: u64,
    #[serde(flatten)]
    pub counts: Counts,
    pub start_ms: Option<Percentiles>,
    pub call_ms: Option<Percentiles>,
}

impl Point {
    fn new(
        index: u64,
        counts: Counts,
        start_ms: Option<Percentiles>,
        call_ms: Option<Percentiles>,
    ) -> Point {
        Point {
            t: index * BUCKET_SECS,
            counts,
            start_ms,
            call_ms,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn answered(start: Start, start_us: u64) -> Outcome {
        Outcome::Answered {
            start,
            start_us: (start != Start::Warm).then_some(start_us),
        }
    }

    #[test]
    fn bins_cover_microseconds_to_minutes_within_ten_percent() {
        assert_eq!(bin_of(0), 0);
        assert_eq!(bin_of(10), 0);
        assert_eq!(usize::from(bin_of(u64::MAX)), BINS - 1);
        for us in [15u64, 120, 999, 4_321, 87_000, 1_500_000, 60_000_000] {
            let ms = bin_ms(usize::from(bin_of(us)));
            let err = (ms * 1000.0 - us as f64).abs() / us as f64;
            assert!(err < 0.1, "{us} µs reads as {ms} ms");
        }
        // Monotonic.
        let bins: Vec<u8> = (1..2000).map(|i| bin_of(i * 37)).collect();
        assert!(bins.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn percentiles_and_counts_per_bucket_and_over_the_window() {
        let h = History::default();
        let ms = Duration::from_millis;
        let now = 1_000_000;
        // 100 fork starts of 1..=100 ms, a cold one of 500 ms, a warm call, a failure.
        for i in 1..=100u64 {
            h.record_at("f", answered(Start::Fork, i * 1000), ms(i + 1), now);
        }
        h.record_at("f", answered(Start::Cold, 500_000), ms(600), now + 1);
        h.record_at("f", answered(Start::Warm, 0), ms(3), now + 1);
        h.record_at("f", Outcome::Failed, ms(2), now + 2);
        h.record_at("g", answered(Start::Fork, 2000), ms(5), now + 2);

        let (stats, cluster) = h.view(now + 2, &Series::All);
        let f = &stats["f"];
        assert_eq!(
            f.totals,
            Counts {
                calls: 103,
                fork: 100,
                cold: 1,
                warm: 1,
                failed: 1
            }
        );
        assert_eq!(f.window, f.totals);
        let p = f.start_ms.unwrap();
        // 101 starts (the warm call started none): p50 ≈ 51 ms, p90 ≈ 91 ms, p99 ≈ 100 ms.
        for (got, want) in [(p.p50, 51.0), (p.p90, 91.0), (p.p99, 100.0)] {
            assert!((got - want).abs() / want < 0.1, "{p:?}");
        }
        assert_eq!(f.series.len(), 3);
        // A bucket's own percentiles: the 100 forks alone.
        let first = f.series[0].start_ms.unwrap();
        assert!((first.p50 - 50.0).abs() / 50.0 < 0.1, "{first:?}");
        assert!((first.p99 - 99.0).abs() / 99.0 < 0.1, "{first:?}");
        assert_eq!(f.series[0].t, now * BUCKET_SECS);
        assert_eq!((f.series[1].counts.cold, f.series[1].counts.warm), (1, 1));
        assert_eq!(f.series[2].counts.failed, 1);
        assert!(f.series[2].start_ms.is_none() && f.series[2].call_ms.is_some());
        // The cluster's series adds g's call to f's bucket.
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster[2].counts.calls, 2);
        assert_eq!(cluster[2].counts.fork, 1);

        // Only the series asked for.
        let (stats, _) = h.view(now + 2, &Series::Of("g".into()));
        assert!(stats["f"].series.is_empty());
        assert_eq!(stats["g"].series.len(), 1);

        // 30 minutes on, the window is empty but the totals stay.
        let (stats, cluster) = h.view(now + 2 + WINDOW_BUCKETS, &Series::All);
        assert!(cluster.is_empty());
        assert!(stats["f"].series.is_empty() && stats["f"].start_ms.is_none());
        assert_eq!(stats["f"].window, Counts::default());
        assert_eq!(stats["f"].totals.calls, 103);
    }

    #[test]
    fn memory_is_bounded_in_buckets_and_functions() {
        let h = History::default();
        let now = 5_000_000;
        for i in 0..(3 * WINDOW_BUCKETS) {
            for us in [1u64, 100, 10_000, 1 << 40] {
                h.record_at(
                    "f",
                    answered(Start::Fork, us),
                    Duration::from_micros(us),
                    now + i,
                );
            }
        }
        {
            let fns = h.lock();
            let f = &fns["f"];
            assert_eq!(f.buckets.len() as u64, WINDOW_BUCKETS);
            assert!(f.buckets.iter().all(|b| b.start.0.len() <= BINS));
        }
        // A function running now is never the one forgotten.
        let running = h.begin("busy");
        for i in 0..(MAX_FUNCTIONS + 10) {
            h.record_at(
                &format!("fn{i}"),
                Outcome::Failed,
                Duration::ZERO,
                now + i as u64,
            );
        }
        {
            let fns = h.lock();
            assert_eq!(fns.len(), MAX_FUNCTIONS);
            assert_eq!(fns["busy"].in_flight, 1);
            assert!(fns.contains_key(&format!("fn{}", MAX_FUNCTIONS + 9)));
        }
        running.finish(answered(Start::Fork, 10));
        assert_eq!(h.lock()["busy"].in_flight, 0);
        // Dropped unfinished: off the calls in flight, counted nowhere.
        drop(h.begin("busy"));
        let fns = h.lock();
        assert_eq!((fns["busy"].in_flight, fns["busy"].totals.calls), (0, 1));
    }
}
