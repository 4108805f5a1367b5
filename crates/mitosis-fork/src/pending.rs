//! Which pages of a child still have to come from the seed, and from which seed address.
//!
//! Starts as the descriptor's page lists and follows the child's own changes to its address
//! space (userfaultfd events): discarded or unmapped pages become plain zero memory, and
//! mremap'ed ranges keep their source at the new address.

use std::collections::BTreeMap;

const PAGE: u64 = 4096;

/// A run of child pages with a contiguous seed source and one pending bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    /// Seed address of the region's first page.
    seed_start: u64,
    pending: Vec<bool>,
}

/// Pending pages keyed by child address of each region's first page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingMap {
    regions: BTreeMap<u64, Region>,
}

/// A run of pages to fetch: child address, seed address, page count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub child: u64,
    pub seed: u64,
    pub pages: u64,
}

impl Run {
    /// The child address just past the run.
    pub fn end(&self) -> u64 {
        self.child + self.pages * PAGE
    }

    /// The part of the run after its first `bytes` (whole pages).
    pub fn after(&self, bytes: u64) -> Run {
        let pages = (bytes / PAGE).min(self.pages);
        Run {
            child: self.child + pages * PAGE,
            seed: self.seed + pages * PAGE,
            pages: self.pages - pages,
        }
    }
}

impl PendingMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the pages at `child` (mapped 1:1 to `seed`) as pending; ranges must not overlap.
    pub fn insert(&mut self, child: u64, seed: u64, pending: Vec<bool>) {
        if pending.iter().any(|&p| p) {
            self.regions.insert(
                child,
                Region {
                    seed_start: seed,
                    pending,
                },
            );
        }
    }

    /// Total pending pages.
    pub fn len(&self) -> u64 {
        self.regions
            .values()
            .map(|r| r.pending.iter().filter(|&&p| p).count() as u64)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn region_of(&self, addr: u64) -> Option<(u64, &Region)> {
        let (&start, region) = self.regions.range(..=addr).next_back()?;
        (addr < start + region.pending.len() as u64 * PAGE).then_some((start, region))
    }

    pub fn is_pending(&self, addr: u64) -> bool {
        let addr = addr & !(PAGE - 1);
        self.region_of(addr)
            .is_some_and(|(start, r)| r.pending[((addr - start) / PAGE) as usize])
    }

    /// Takes the pending page at `addr` and up to `max_pages - 1` pending pages right after it
    /// in the same region; `None` if `addr` is not pending (its content is zero).
    pub fn take_run(&mut self, addr: u64, max_pages: u64) -> Option<Run> {
        let addr = addr & !(PAGE - 1);
        let start = self.region_of(addr)?.0;
        let region = self.regions.get_mut(&start).expect("region exists");
        let first = ((addr - start) / PAGE) as usize;
        if !region.pending[first] {
            return None;
        }
        let mut n = 0;
        while first + n < region.pending.len()
            && region.pending[first + n]
            && (n as u64) < max_pages
        {
            region.pending[first + n] = false;
            n += 1;
        }
        Some(Run {
            child: addr,
            seed: region.seed_start + first as u64 * PAGE,
            pages: n as u64,
        })
    }

    /// Takes the pending pages of the `block_pages`-aligned block around `addr`, as runs (each
    /// within one region, so within one mapping): the one from `addr` first, then the others
    /// in address order. Like the kernel's fault-around, it brings the neighbours on both
    /// sides of a fault, which a heap touches together, in one request; the neighbours may
    /// lie in the regions beside the fault's (a program of many small mappings: one page
    /// each would be a round trip each). `None` if `addr` is not pending.
    pub fn take_around(&mut self, addr: u64, block_pages: u64) -> Option<Vec<Run>> {
        let addr = addr & !(PAGE - 1);
        let block = block_pages.max(1).next_power_of_two() * PAGE;
        let block_start = addr & !(block - 1);
        let block_end = block_start + block;
        let first = self.take_run(addr, (block_end - addr) / PAGE)?;
        // Regions do not overlap, so their ends are in the order of their starts.
        let mut spans: Vec<(u64, u64)> = self
            .regions
            .range(..block_end)
            .rev()
            .map(|(&start, r)| (start, start + r.pending.len() as u64 * PAGE))
            .take_while(|&(_, end)| end > block_start)
            .map(|(start, end)| (start.max(block_start), end.min(block_end)))
            .collect();
        spans.reverse();
        let mut runs = vec![first];
        for (lo, hi) in spans {
            let mut at = lo;
            while at < hi {
                if at == first.child {
                    at = first.end();
                } else if let Some(run) = self.take_run(at, (hi - at) / PAGE) {
                    at = run.end();
                    runs.push(run);
                } else {
                    at += PAGE;
                }
            }
        }
        Some(runs)
    }

    /// Takes the first pending run (lowest child address), of at most `max_pages` pages.
    pub fn take_first(&mut self, max_pages: u64) -> Option<Run> {
        let addr = self.regions.iter().find_map(|(&start, r)| {
            let i = r.pending.iter().position(|&p| p)?;
            Some(start + i as u64 * PAGE)
        })?;
        self.take_run(addr, max_pages)
    }

    /// Puts a run taken with `take_run` back (its fill did not happen).
    pub fn restore_run(&mut self, run: Run) {
        for i in 0..run.pages {
            self.set(run.child + i * PAGE, true);
        }
    }

    fn set(&mut self, addr: u64, value: bool) {
        if let Some((start, _)) = self.region_of(addr) {
            let region = self.regions.get_mut(&start).expect("region exists");
            region.pending[((addr - start) / PAGE) as usize] = value;
        }
    }

    /// The child discarded or unmapped `[start, end)`: those pages no longer come from the seed.
    pub fn forget(&mut self, start: u64, end: u64) {
        self.extract(start, end);
    }

    /// The child moved `[from, from+len)` to `to`; pending pages move with it.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.extract(from, from + len);
        // Whatever was at the destination was replaced by the move.
        self.extract(to, to + len);
        for (child, region) in moved {
            self.regions.insert(child - from + to, region);
        }
    }

    /// Moves the pending pages of `[start, end)` out into a map of their own.
    pub fn split_off(&mut self, start: u64, end: u64) -> PendingMap {
        PendingMap {
            regions: self.extract(start, end).into_iter().collect(),
        }
    }

    /// Replaces whatever this map has in each range of `other` by `other`'s pages there.
    pub fn replace_with(&mut self, other: &PendingMap, ranges: &[(u64, u64)]) {
        for &(start, len) in ranges {
            self.extract(start, start + len);
        }
        for (&child, region) in &other.regions {
            self.regions.insert(child, region.clone());
        }
    }

    /// Removes `[start, end)` from the map, returning its pieces that still have pending pages.
    fn extract(&mut self, start: u64, end: u64) -> Vec<(u64, Region)> {
        let (start, end) = (start & !(PAGE - 1), (end + PAGE - 1) & !(PAGE - 1));
        let overlapping: Vec<u64> = self
            .regions
            .range(..end)
            .filter(|(s, r)| *s + r.pending.len() as u64 * PAGE > start)
            .map(|(s, _)| *s)
            .collect();
        let mut taken = Vec::new();
        for s in overlapping {
            let region = self.regions.remove(&s).expect("region exists");
            let pages = region.pending.len() as u64;
            let cut_lo = ((start.max(s) - s) / PAGE) as usize;
            let cut_hi = ((end.min(s + pages * PAGE) - s) / PAGE) as usize;
            let piece = |lo: usize, hi: usize| Region {
                seed_start: region.seed_start + lo as u64 * PAGE,
                pending: region.pending[lo..hi].to_vec(),
            };
            self.insert_piece(s, piece(0, cut_lo));
            self.insert_piece(s + cut_hi as u64 * PAGE, piece(cut_hi, pages as usize));
            let middle = piece(cut_lo, cut_hi);
            if middle.pending.iter().any(|&p| p) {
                taken.push((s + cut_lo as u64 * PAGE, middle));
            }
        }
        taken
    }

    fn insert_piece(&mut self, child: u64, region: Region) {
        if region.pending.iter().any(|&p| p) {
            self.regions.insert(child, region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> PendingMap {
        let mut m = PendingMap::new();
        // Child 0x10000.. maps seed 0x90000..; pages 0,1,2,4 pending.
        m.insert(0x10000, 0x90000, vec![true, true, true, false, true]);
        m
    }

    #[test]
    fn fault_around_takes_the_pending_pages_of_the_block_on_both_sides_faulted_run_first() {
        let mut m = PendingMap::new();
        // Child 0x10000.. maps seed 0x90000..: 12 pages, page 3 and 6 not pending.
        let mut bits = vec![true; 12];
        bits[3] = false;
        bits[6] = false;
        m.insert(0x10000, 0x90000, bits);
        // A fault on page 5, blocks of 8 pages (0x10000..0x18000): pages 5, then 0-2, 4, 7.
        let runs = m.take_around(0x15123, 8).expect("page 5 is pending");
        let got: Vec<_> = runs.iter().map(|r| (r.child, r.seed, r.pages)).collect();
        assert_eq!(
            got,
            vec![
                (0x15000, 0x95000, 1),
                (0x10000, 0x90000, 3),
                (0x14000, 0x94000, 1),
                (0x17000, 0x97000, 1)
            ]
        );
        // The next block's pages stay pending; the taken ones are not.
        assert!((8..12).all(|p| m.is_pending(0x10000 + p * PAGE)));
        assert!(
            [0, 1, 2, 4, 5, 7]
                .iter()
                .all(|p| !m.is_pending(0x10000 + p * PAGE))
        );
        assert_eq!(m.take_around(0x15000, 8), None, "taken already");
        // A block past the region's end is cut at it.
        let tail = m.take_around(0x1b000, 16).expect("page 11 is pending");
        assert_eq!(tail[0].child, 0x1b000);
        assert_eq!(tail.iter().map(|r| r.pages).sum::<u64>(), 4);
        assert!(m.is_empty());
    }

    #[test]
    fn fault_around_takes_the_blocks_pages_of_neighbouring_regions_each_run_in_its_own() {
        let mut m = PendingMap::new();
        // One-page mappings side by side (a program of many small mappings), one with
        // nothing pending, one with a source elsewhere (moved), and one past the block.
        m.insert(0x20000, 0x80000, vec![true]);
        m.insert(0x21000, 0x81000, vec![false]);
        m.insert(0x22000, 0x82000, vec![true, true]);
        m.insert(0x24000, 0x70000, vec![true]);
        m.insert(0x27000, 0x87000, vec![true, true]);
        m.insert(0x30000, 0x90000, vec![true]);
        // A fault on 0x24000, blocks of 8 pages (0x20000..0x28000): its page first, then the
        // rest in address order, cut at the block's end.
        let runs = m.take_around(0x24010, 8).expect("0x24000 is pending");
        let got: Vec<_> = runs.iter().map(|r| (r.child, r.seed, r.pages)).collect();
        assert_eq!(
            got,
            vec![
                (0x24000, 0x70000, 1),
                (0x20000, 0x80000, 1),
                (0x22000, 0x82000, 2),
                (0x27000, 0x87000, 1)
            ]
        );
        // What lies past the block, in a region or not, stays pending.
        assert!(m.is_pending(0x28000) && m.is_pending(0x30000));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn what_a_partial_fill_left_goes_back_as_pending() {
        let mut m = map();
        let run = m.take_run(0x10000, 3).expect("a run");
        assert_eq!((run.child, run.seed, run.pages), (0x10000, 0x90000, 3));
        // One page went in before the fill was refused: the other two are pending again.
        m.restore_run(run.after(PAGE));
        assert!(!m.is_pending(0x10000));
        assert!(m.is_pending(0x11000) && m.is_pending(0x12000));
        let rest = run.after(PAGE);
        assert_eq!((rest.child, rest.seed, rest.pages), (0x11000, 0x91000, 2));
        assert_eq!(run.after(10 * PAGE).pages, 0);
    }

    #[test]
    fn split_off_and_replace_with() {
        let mut m = map();
        let mut part = m.split_off(0x11000, 0x13000);
        assert_eq!(part.len(), 2);
        assert_eq!(m.len(), 2);
        assert!(!m.is_pending(0x11000) && m.is_pending(0x10000) && m.is_pending(0x14000));
        assert!(part.take_run(0x12000, 1).is_some_and(|r| r.seed == 0x92000));
        // A child whose copy of 0x10000.. was taken out gets the original pages back there.
        let original = map().split_off(0x10000, 0x15000);
        m.replace_with(&original, &[(0x10000, 0x5000)]);
        assert_eq!(m, map());
    }

    #[test]
    fn take_runs_and_zero_pages() {
        let mut m = map();
        assert_eq!(m.len(), 4);
        assert_eq!(
            m.take_run(0x11234, 8),
            Some(Run {
                child: 0x11000,
                seed: 0x91000,
                pages: 2
            })
        );
        assert_eq!(m.take_run(0x11000, 8), None, "already taken");
        assert_eq!(m.take_run(0x13000, 8), None, "never existed: zero page");
        assert_eq!(m.take_run(0x50000, 8), None, "outside every region");
        assert_eq!(
            m.take_run(0x10000, 1),
            Some(Run {
                child: 0x10000,
                seed: 0x90000,
                pages: 1
            })
        );
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn restore_puts_pages_back() {
        let mut m = map();
        let run = m.take_run(0x10000, 8).unwrap();
        m.restore_run(run);
        assert_eq!(m, map());
    }

    #[test]
    fn forget_turns_pages_into_zero() {
        let mut m = map();
        m.forget(0x11000, 0x13000);
        assert!(m.is_pending(0x10000) && !m.is_pending(0x11000) && !m.is_pending(0x12000));
        assert!(m.is_pending(0x14000));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn remap_moves_sources() {
        let mut m = map();
        m.remap(0x10000, 0x200000, 0x5000);
        assert!(!m.is_pending(0x10000));
        assert_eq!(
            m.take_run(0x202000, 8),
            Some(Run {
                child: 0x202000,
                seed: 0x92000,
                pages: 1
            })
        );
        assert_eq!(
            m.take_run(0x204000, 8),
            Some(Run {
                child: 0x204000,
                seed: 0x94000,
                pages: 1
            })
        );
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn partial_remap_splits_regions() {
        let mut m = map();
        m.remap(0x11000, 0x300000, 0x1000);
        assert!(m.is_pending(0x10000) && !m.is_pending(0x11000) && m.is_pending(0x12000));
        assert_eq!(
            m.take_run(0x300000, 8),
            Some(Run {
                child: 0x300000,
                seed: 0x91000,
                pages: 1
            })
        );
    }

    #[test]
    fn remap_over_pending_pages_replaces_them() {
        let mut m = map();
        m.insert(0x40000, 0xa0000, vec![true, true]);
        m.remap(0x40000, 0x10000, 0x2000);
        assert_eq!(
            m.take_run(0x10000, 8),
            Some(Run {
                child: 0x10000,
                seed: 0xa0000,
                pages: 2
            })
        );
        assert!(m.is_pending(0x12000), "pages past the move's end stay");
    }
}
