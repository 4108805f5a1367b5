//! Open-loop arrivals: a rate per interval ([`Profile`]), from a trace (compressed, scaled,
//! capped) or from the synthetic spike, and Poisson arrival times within each interval.

use std::time::Duration;

use super::trace::{BIN_SECS, Trace};

/// Consecutive intervals of wall time, each with its arrival rate (per second).
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub intervals: Vec<Interval>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub secs: f64,
    pub rate: f64,
}

impl Profile {
    pub fn secs(&self) -> f64 {
        self.intervals.iter().map(|i| i.secs).sum()
    }

    /// Invocations expected (rate x length, summed).
    pub fn expected(&self) -> f64 {
        self.intervals.iter().map(|i| i.secs * i.rate).sum()
    }

    pub fn peak(&self) -> f64 {
        self.intervals.iter().map(|i| i.rate).fold(0.0, f64::max)
    }
}

/// How a trace is replayed: one trace minute in `minute_secs` seconds, every count times
/// `scale`, no rate above `cap` per second.
#[derive(Debug, Clone, Copy)]
pub struct Replay {
    pub minute_secs: f64,
    pub scale: f64,
    pub cap: f64,
}

impl Replay {
    pub fn profile(&self, trace: &Trace) -> Profile {
        let secs = BIN_SECS / 60.0 * self.minute_secs;
        Profile {
            intervals: trace
                .counts
                .iter()
                .map(|&n| Interval {
                    secs,
                    rate: (n as f64 * self.scale / secs).min(self.cap),
                })
                .collect(),
        }
    }
}

/// The synthetic spike: `base_rate` for `base_secs`, then `factor` times it for
/// `spike_secs`, then nothing for `idle_secs`.
#[derive(Debug, Clone, Copy)]
pub struct Spike {
    pub base_rate: f64,
    pub base_secs: f64,
    pub factor: f64,
    pub spike_secs: f64,
    pub idle_secs: f64,
}

impl Spike {
    /// One interval a second (the plots' resolution), capped at `cap` per second.
    pub fn profile(&self, cap: f64) -> Profile {
        let mut intervals = Vec::new();
        let mut push = |secs: f64, rate: f64| {
            let mut left = secs;
            while left > 1e-9 {
                let s = left.min(1.0);
                intervals.push(Interval {
                    secs: s,
                    rate: rate.min(cap),
                });
                left -= s;
            }
        };
        push(self.base_secs, self.base_rate);
        push(self.spike_secs, self.base_rate * self.factor);
        push(self.idle_secs, 0.0);
        Profile { intervals }
    }
}

/// SplitMix64: a small, seeded generator, so a run's arrivals can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with mean `1 / rate`.
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -self.unit().ln() / rate
    }
}

/// Arrival times from the start of the run: a Poisson process of each interval's rate
/// within that interval (gaps exponential; memoryless, so it restarts at each boundary).
pub fn arrivals(profile: &Profile, rng: &mut Rng) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut start = 0.0;
    for iv in &profile.intervals {
        if iv.rate > 0.0 {
            let mut t = start + rng.exponential(iv.rate);
            while t < start + iv.secs {
                out.push(Duration::from_secs_f64(t));
                t += rng.exponential(iv.rate);
            }
        }
        start += iv.secs;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(rate: f64, intervals: usize, secs: f64) -> Profile {
        Profile {
            intervals: vec![Interval { secs, rate }; intervals],
        }
    }

    /// Counts per interval of `arrivals` over `profile`.
    fn per_interval(profile: &Profile, arrivals: &[Duration]) -> Vec<f64> {
        let mut counts = vec![0.0; profile.intervals.len()];
        let mut edges = Vec::new();
        let mut t = 0.0;
        for iv in &profile.intervals {
            t += iv.secs;
            edges.push(t);
        }
        for a in arrivals {
            let i = edges.partition_point(|e| *e <= a.as_secs_f64());
            counts[i] += 1.0;
        }
        counts
    }

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn arrivals_come_at_the_intervals_rate() {
        let p = flat(8.0, 2000, 0.5);
        let a = arrivals(&p, &mut Rng::new(7));
        let (mean, _) = mean_var(&per_interval(&p, &a));
        assert!(
            (mean - 4.0).abs() < 0.15,
            "mean {mean} per interval, expected 4"
        );
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!(a.last().unwrap().as_secs_f64() < p.secs());
    }

    #[test]
    fn counts_are_poisson_and_gaps_exponential_within_an_interval() {
        // One long interval: the gaps' coefficient of variation is 1 for an exponential.
        let p = flat(50.0, 1, 200.0);
        let a = arrivals(&p, &mut Rng::new(11));
        let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        let (mean, var) = mean_var(&gaps);
        assert!((mean - 0.02).abs() < 0.001, "mean gap {mean}");
        let cv = var.sqrt() / mean;
        assert!((cv - 1.0).abs() < 0.05, "gap cv {cv}");
        // Many short intervals: counts have variance equal to their mean (Poisson).
        let p = flat(3.0, 4000, 1.0);
        let (mean, var) = mean_var(&per_interval(&p, &arrivals(&p, &mut Rng::new(3))));
        assert!((mean - 3.0).abs() < 0.1, "mean {mean}");
        assert!(
            (var / mean - 1.0).abs() < 0.1,
            "variance/mean {}",
            var / mean
        );
    }

    #[test]
    fn a_rate_over_the_cap_is_cut_to_it() {
        let trace = Trace {
            counts: vec![60, 6000, 0, 120],
        };
        // One minute in 2 s: 30/s, 3000/s, 0, 60/s, capped at 40/s.
        let p = Replay {
            minute_secs: 2.0,
            scale: 1.0,
            cap: 40.0,
        }
        .profile(&trace);
        let rates: Vec<f64> = p.intervals.iter().map(|i| i.rate).collect();
        assert_eq!(rates, [30.0, 40.0, 0.0, 40.0]);
        assert_eq!(p.secs(), 8.0);
        let counts = per_interval(&p, &arrivals(&p, &mut Rng::new(5)));
        assert_eq!(counts[2], 0.0);
        // The capped interval has about 80 arrivals, not 6000.
        assert!((50.0..=110.0).contains(&counts[1]), "{counts:?}");
        // Scaling multiplies before the cap.
        let half = Replay {
            minute_secs: 2.0,
            scale: 0.5,
            cap: 40.0,
        }
        .profile(&trace);
        assert_eq!(half.intervals[0].rate, 15.0);
    }

    #[test]
    fn the_spike_is_base_then_burst_then_idle() {
        let s = Spike {
            base_rate: 2.0,
            base_secs: 3.0,
            factor: 10.0,
            spike_secs: 2.5,
            idle_secs: 2.0,
        };
        let p = s.profile(100.0);
        let rates: Vec<f64> = p.intervals.iter().map(|i| i.rate).collect();
        assert_eq!(rates, [2.0, 2.0, 2.0, 20.0, 20.0, 20.0, 0.0, 0.0]);
        assert!((p.secs() - 7.5).abs() < 1e-9);
        assert!((p.expected() - (6.0 + 50.0)).abs() < 1e-9);
        assert_eq!(s.profile(15.0).peak(), 15.0);
        // Same seed, same arrivals.
        assert_eq!(
            arrivals(&p, &mut Rng::new(1)),
            arrivals(&p, &mut Rng::new(1))
        );
    }
}
