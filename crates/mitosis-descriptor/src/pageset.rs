//! A compact set of page indices within one mapping, as sorted runs.

use serde::{Deserialize, Serialize};

/// Sorted, non-overlapping, non-adjacent runs of page indices `(first, count)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSet {
    runs: Vec<(u64, u64)>,
}

impl PageSet {
    /// Builds the set from one flag per page.
    pub fn from_flags(flags: impl IntoIterator<Item = bool>) -> Self {
        let mut set = PageSet::default();
        for (i, on) in flags.into_iter().enumerate() {
            if on {
                set.push(i as u64);
            }
        }
        set
    }

    /// The pages `[0, count)`.
    pub fn full(count: u64) -> Self {
        let runs = if count == 0 { vec![] } else { vec![(0, count)] };
        PageSet { runs }
    }

    /// Appends `page`, which must be above every page already in the set.
    pub fn push(&mut self, page: u64) {
        match self.runs.last_mut() {
            Some((first, count)) if *first + *count == page => *count += 1,
            _ => self.runs.push((page, 1)),
        }
    }

    /// Appends the `count` pages from `first`, which must not start below the set's end.
    pub fn push_run(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => self.runs.push((first, count)),
        }
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn contains(&self, page: u64) -> bool {
        let i = self.runs.partition_point(|&(first, _)| first <= page);
        i > 0 && {
            let (first, count) = self.runs[i - 1];
            page < first + count
        }
    }

    /// The highest page index + 1, or 0 when empty.
    pub fn end(&self) -> u64 {
        self.runs.last().map_or(0, |&(f, c)| f + c)
    }

    /// True when runs are sorted, non-empty, non-overlapping and non-adjacent.
    pub fn is_canonical(&self) -> bool {
        self.runs.iter().all(|&(_, c)| c > 0)
            && self
                .runs
                .windows(2)
                .all(|w| w[0].0.checked_add(w[0].1).is_some_and(|e| e < w[1].0))
            && self
                .runs
                .last()
                .is_none_or(|&(f, c)| f.checked_add(c).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_flags() {
        let set = PageSet::from_flags([true, true, false, true, false, false, true, true]);
        assert_eq!(set.runs(), &[(0, 2), (3, 1), (6, 2)]);
        assert_eq!(set.len(), 5);
        assert!(set.contains(0) && set.contains(3) && set.contains(7));
        assert!(!set.contains(2) && !set.contains(5) && !set.contains(8));
        assert_eq!(set.end(), 8);
        assert!(set.is_canonical());
    }

    #[test]
    fn pushed_runs_merge_when_adjacent() {
        let mut set = PageSet::default();
        set.push_run(2, 3);
        set.push_run(5, 1);
        set.push_run(7, 0);
        set.push_run(9, 2);
        assert_eq!(set.runs(), &[(2, 4), (9, 2)]);
        assert!(set.is_canonical());
    }

    #[test]
    fn empty_and_full() {
        assert!(PageSet::from_flags([false; 4]).is_empty());
        assert!(PageSet::full(0).is_empty());
        assert_eq!(PageSet::full(5).len(), 5);
    }

    #[test]
    fn adjacent_runs_are_not_canonical() {
        let set = PageSet {
            runs: vec![(0, 2), (2, 1)],
        };
        assert!(!set.is_canonical());
        let set = PageSet { runs: vec![(3, 0)] };
        assert!(!set.is_canonical());
    }
}
