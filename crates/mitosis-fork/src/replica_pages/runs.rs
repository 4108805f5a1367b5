//! Page runs: which of them a bulk holds, how they split into chunks and batches.

use mitosis_sys::PAGE_SIZE;

use crate::pending::{PendingMap, Run};

/// True if `claimed` are exactly `runs`: every page of them was still to fetch.
pub(super) fn covers(claimed: &[Run], runs: &[(u64, u32)]) -> bool {
    claimed.len() == runs.len()
        && claimed
            .iter()
            .zip(runs)
            .all(|(c, &(at, n))| c.child == at && c.pages == n as u64)
}

pub(super) fn overlaps(runs: &[Run], wanted: &[(u64, u32)]) -> bool {
    runs.iter().any(|r| {
        wanted
            .iter()
            .any(|&(at, n)| r.child < at + n as u64 * PAGE_SIZE && at < r.end())
    })
}

/// Takes the pending pages of `runs` out of `pending`, as runs.
pub(super) fn take_runs(pending: &mut PendingMap, runs: &[(u64, u32)]) -> Vec<Run> {
    let mut wanted: Vec<Run> = Vec::new();
    for &(addr, pages) in runs {
        let end = addr + pages as u64 * PAGE_SIZE;
        let mut page = addr & !(PAGE_SIZE - 1);
        while page < end {
            match pending.take_run(page, (end - page) / PAGE_SIZE) {
                Some(run) => {
                    page += run.pages * PAGE_SIZE;
                    wanted.push(run);
                }
                None => page += PAGE_SIZE,
            }
        }
    }
    wanted
}

/// Pages that arrive in bulk before their replica exists: `runs` (seed addresses, which are
/// the replica's too) and their bytes back to back.
#[derive(Debug)]
pub struct Bulk {
    pub runs: Vec<(u64, u32)>,
    pub data: Vec<u8>,
}

/// The pages of `overlay` that `runs` hold, as `(address, pages, offset of their bytes)` in a
/// bulk of `runs`. Both sorted by address, without overlaps: one sweep over the two.
pub(super) fn overlap(runs: &[(u64, u32)], overlay: &[Run]) -> Vec<(u64, u32, usize)> {
    let mut out = Vec::new();
    let mut first = 0;
    let mut at = 0;
    for &(addr, pages) in runs {
        let end = addr + pages as u64 * PAGE_SIZE;
        while first < overlay.len() && overlay[first].end() <= addr {
            first += 1;
        }
        for o in overlay[first..].iter().take_while(|o| o.child < end) {
            let (from, to) = (addr.max(o.child), end.min(o.end()));
            if from < to {
                let pages = ((to - from) / PAGE_SIZE) as u32;
                out.push((from, pages, at + (from - addr) as usize));
            }
        }
        at += pages as usize * PAGE_SIZE as usize;
    }
    out
}

/// The pages of `overlay` (sorted) that a bulk of `runs` (sorted) does not hold, as runs.
pub fn lacking(overlay: &[Run], runs: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let held = overlap(runs, overlay);
    let mut held = held.iter().peekable();
    let mut out = Vec::new();
    for run in overlay {
        let (mut page, end) = (run.child, run.end());
        while let Some(&&(from, pages, _)) = held.peek().filter(|h| h.0 < end) {
            if from > page {
                out.push((page, ((from - page) / PAGE_SIZE) as u32));
            }
            page = from + pages as u64 * PAGE_SIZE;
            held.next();
        }
        if page < end {
            out.push((page, ((end - page) / PAGE_SIZE) as u32));
        }
    }
    out
}

/// `runs` cut into consecutive groups of `chunk_pages` pages (the last may be shorter), as a
/// bulk transfer's chunks hold them.
pub fn chunk_runs(runs: &[(u64, u32)], chunk_pages: u32) -> Vec<Vec<(u64, u32)>> {
    let mut out: Vec<Vec<(u64, u32)>> = Vec::new();
    let mut room = 0;
    for &(mut addr, mut pages) in runs {
        while pages > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = chunk_pages;
            }
            let take = pages.min(room);
            out.last_mut().expect("pushed").push((addr, take));
            addr += take as u64 * PAGE_SIZE;
            pages -= take;
            room -= take;
        }
    }
    out
}

/// Splits runs into groups of at most `max_pages` pages (a longer run is a group of its own).
pub fn batches(runs: &[Run], max_pages: u64) -> Vec<&[Run]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, run) in runs.iter().enumerate() {
        if i > start && size + run.pages > max_pages {
            out.push(&runs[start..i]);
            (start, size) = (i, 0);
        }
        size += run.pages;
    }
    if start < runs.len() {
        out.push(&runs[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pages: u64) -> Run {
        Run {
            child: 0,
            seed: 0,
            pages,
        }
    }

    #[test]
    fn chunks_split_runs_at_chunk_boundaries() {
        let p = PAGE_SIZE;
        let chunks = chunk_runs(&[(0x10000, 3), (0x40000, 4), (0x90000, 1)], 4);
        assert_eq!(
            chunks,
            vec![
                vec![(0x10000, 3), (0x40000, 1)],
                vec![(0x40000 + p, 3), (0x90000, 1)],
            ]
        );
        assert!(chunk_runs(&[], 4).is_empty());
    }

    #[test]
    fn overlay_pieces_follow_what_the_bulk_holds() {
        let p = PAGE_SIZE;
        let runs = [(0x10000, 2), (0x20000, 1), (0x30000, 4)];
        let run = |child, pages| Run {
            child,
            seed: child,
            pages,
        };
        let overlay = [
            run(0x10000, 3),     // held, then lacking
            run(0x20000 - p, 2), // lacking, then held
            run(0x30000 + p, 1), // inside a longer bulk run
            run(0x50000, 2),     // not in the bulk at all
        ];
        assert_eq!(
            overlap(&runs, &overlay),
            vec![
                (0x10000, 2, 0),
                (0x20000, 1, 2 * p as usize),
                (0x30000 + p, 1, 4 * p as usize)
            ]
        );
        assert_eq!(
            lacking(&overlay, &runs),
            vec![(0x10000 + 2 * p, 1), (0x20000 - p, 1), (0x50000, 2)]
        );
        assert_eq!(lacking(&overlay, &[]).len(), overlay.len());
        assert!(overlap(&[], &overlay).is_empty());
    }

    #[test]
    fn batches_respect_the_limit() {
        let runs = [run(3), run(2), run(4), run(10), run(1)];
        let sizes: Vec<u64> = batches(&runs, 5)
            .iter()
            .map(|b| b.iter().map(|r| r.pages).sum())
            .collect();
        assert_eq!(sizes, vec![5, 4, 10, 1]);
        assert!(batches(&[], 5).is_empty());
    }
}
