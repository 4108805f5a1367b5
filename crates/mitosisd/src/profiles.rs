//! Working sets carried over from one seed to the next seed of the same program.
//!
//! A seed's first children have no recorded working set: each fault crosses the network. A
//! program prepared again (a function's seed restarted or moved, a workflow's producer run
//! again) touches much the same pages as before, so a seed prepared with a *profile* name
//! (`mitosis prepare --profile NAME`, `fork_prepare(profile=...)`) starts with what earlier
//! seeds of that name had recorded, and its first children's hosts get it as a bootstrap.
//! The pages are still this seed's own, read from its twin: a profile only chooses which of
//! them go first, so a wrong guess costs bytes, never correctness.
//!
//! Addresses differ between two runs of a program (ASLR, and allocation order where threads
//! race), and so does the order of its anonymous areas (mmap fills the gaps randomization
//! leaves, and merges an area with a like neighbour where one happens to lie), so pages are
//! carried by mapping. The two seeds' mappings, in address order, are aligned as a diff
//! aligns lines (kind, protection, file and size); each mapping left is paired with the one
//! of its kind closest in size; and each page keeps its place in its mapping: counted from
//! the start for the brk heap and file mappings, from the end for other anonymous memory
//! (mmap places areas top down, so an area that merged with a newer one grew at its start).
//! Only pages the new seed has (its `seed_pages`) are kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mitosis_descriptor::{Backing, Descriptor, Vma};
use similar::{Algorithm, DiffOp, capture_diff_slices_deadline};

const PAGE: u64 = 4096;
/// The blocks allocators carve anonymous memory in, aligned in the address space whatever
/// the area's own alignment: CPython's pools are 16 KiB. A page keeps its place within its
/// block when carried over, so an object at the start of a pool stays at the start of one.
const PHASE: u64 = 16 * 1024;
/// Profiles a daemon keeps (the least recently stored go first). With at most
/// [`MAX_PROFILE_PAGES`] pages of 16 bytes each and a key per mapping, all of them hold about
/// 8 MiB at most, plus their mappings' file paths.
pub const MAX_PROFILES: usize = 64;
/// Pages one profile keeps (32 MiB of the seed's): the 1,024 its first child learned one by
/// one and the faults of the children after, several runs of them.
pub const MAX_PROFILE_PAGES: usize = 8192;
/// Longest profile name, in bytes.
pub const MAX_NAME: usize = 128;
/// An alignment that takes longer than this (mappings by the thousand, all different) is cut
/// short: the rest of the mappings carry nothing.
const ALIGN_DEADLINE: Duration = Duration::from_millis(20);

/// What kind of memory a mapping is, as far as two runs of a program agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// The brk heap: grows up from its start.
    Heap,
    /// Any other anonymous memory: counted from its end.
    Anonymous,
    /// A file mapping (its path and offset in the file): counted from its start.
    File { path: String, offset: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MappingKey {
    kind: Kind,
    prot: u8,
    shared: bool,
}

/// A recorded working set, by mapping rather than by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    /// The seed's mappings in address order, with their sizes in pages.
    mappings: Vec<(MappingKey, u64)>,
    /// (index into `mappings`, place of the page in it, its page within its aligned
    /// [`PHASE`] block), sorted.
    pages: Vec<(u32, u64, u8)>,
}

impl Learned {
    /// The pages at `addrs` (page addresses, any order) of a seed laid out as `vmas`.
    pub fn of(vmas: &[Vma], start_brk: u64, addrs: impl IntoIterator<Item = u64>) -> Learned {
        let mappings: Vec<(MappingKey, u64)> = vmas
            .iter()
            .map(|v| (key_of(v, start_brk), v.len() / PAGE))
            .collect();
        let mut pages: Vec<(u32, u64, u8)> = addrs
            .into_iter()
            .filter_map(|addr| {
                let i = vmas.partition_point(|v| v.end <= addr);
                let v = vmas.get(i).filter(|v| v.start <= addr)?;
                let phase = ((addr % PHASE) / PAGE) as u8;
                Some((i as u32, place(&mappings[i].0.kind, v, addr), phase))
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages.truncate(MAX_PROFILE_PAGES);
        Learned { mappings, pages }
    }

    /// The pages of a seed described by `desc` learned from it (see [`Learned::of`]).
    pub fn of_seed(desc: &Descriptor, addrs: impl IntoIterator<Item = u64>) -> Learned {
        Learned::of(&desc.vmas, desc.mm.start_brk, addrs)
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The addresses these pages have in a seed laid out as `vmas` (sorted, each once): only
    /// those in a mapping paired with theirs, and that the seed has.
    pub fn carry_to(&self, vmas: &[Vma], start_brk: u64) -> Vec<u64> {
        let keys: Vec<(MappingKey, u64)> = vmas
            .iter()
            .map(|v| (key_of(v, start_brk), v.len() / PAGE))
            .collect();
        // The mappings holding learned pages, those holding the most first: where two want
        // one new mapping, the one that carries more pages there gets it.
        let mut wanted: Vec<(u32, usize)> = self
            .pages
            .chunk_by(|a, b| a.0 == b.0)
            .map(|g| (g[0].0, g.len()))
            .collect();
        wanted.sort_by_key(|&(i, n)| (std::cmp::Reverse(n), i));
        let wanted: Vec<u32> = wanted.into_iter().map(|(i, _)| i).collect();
        let pairs = align(&self.mappings, &keys, &wanted);
        let mut out = Vec::new();
        for group in self.pages.chunk_by(|a, b| a.0 == b.0) {
            let i = group[0].0 as usize;
            let Some(&j) = pairs.get(&i) else { continue };
            let (v, kind) = (&vmas[j], &keys[j].0.kind);
            let has = |addr: &u64| v.seed_pages.contains((addr - v.start) / PAGE);
            let landed = |from_end: bool| -> Vec<u64> {
                let old_pages = self.mappings[i].1;
                group
                    .iter()
                    .filter_map(|&(_, place, phase)| at(kind, v, place, phase, from_end, old_pages))
                    .filter(has)
                    .collect()
            };
            // An anonymous area that merged with an older neighbour in one run grew at its
            // end, not its start: where the sizes differ, the anchor that lands more of the
            // pages on pages the seed has wins (the end on a tie).
            let by_end = landed(true);
            let by_start = (*kind == Kind::Anonymous && self.mappings[i].1 != keys[j].1)
                .then(|| landed(false))
                .filter(|s| s.len() > by_end.len());
            out.extend(by_start.unwrap_or(by_end));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// These pages carried to the seed `desc` describes.
    pub fn carry_to_seed(&self, desc: &Descriptor) -> Vec<u64> {
        self.carry_to(&desc.vmas, desc.mm.start_brk)
    }
}

fn key_of(v: &Vma, start_brk: u64) -> MappingKey {
    let kind = match &v.backing {
        Backing::File { file, offset, .. } => Kind::File {
            path: file.path.clone(),
            offset: *offset,
        },
        Backing::Anonymous if v.start <= start_brk && start_brk < v.end => Kind::Heap,
        Backing::Anonymous => Kind::Anonymous,
    };
    MappingKey {
        kind,
        prot: v.prot,
        shared: v.shared,
    }
}

/// The place of the page at `addr` in `v`, counted from the end that stays put.
fn place(kind: &Kind, v: &Vma, addr: u64) -> u64 {
    match kind {
        Kind::Anonymous => (v.end - (addr & !(PAGE - 1))) / PAGE - 1,
        _ => (addr - v.start) / PAGE,
    }
}

/// The address of the page at `place` (see [`place`]) of a mapping of `old_pages` in `v`, if
/// `v` is that large; for anonymous memory, counted from `v`'s end or (`from_end` false)
/// its start. In anonymous memory other than the heap, moved by up to half a [`PHASE`] to
/// lie where it lay in its aligned block (`phase`): allocators carve such areas in blocks
/// aligned in the address space.
fn at(kind: &Kind, v: &Vma, place: u64, phase: u8, from_end: bool, old_pages: u64) -> Option<u64> {
    let pages = v.len() / PAGE;
    let addr = match kind {
        Kind::Anonymous => {
            let near = if from_end {
                v.end.checked_sub((place + 1) * PAGE)?
            } else {
                v.start + old_pages.checked_sub(place + 1)? * PAGE
            };
            let ahead = (phase as u64 * PAGE).wrapping_sub(near % PHASE) % PHASE;
            if ahead < PHASE / 2 {
                near + ahead
            } else {
                near.checked_sub(PHASE - ahead)?
            }
        }
        _ if place < pages => v.start + place * PAGE,
        _ => return None,
    };
    (v.start <= addr && addr < v.end).then_some(addr)
}

/// Pairs old mappings with new ones: index in `old` to index in `new`, for the old ones in
/// `wanted` (those holding learned pages). First as a diff aligns them (kind, protection and
/// size alike, in order); then each old one left, in `wanted`'s order, goes to the new one
/// left of its kind closest in size (an area that merged with a neighbour is larger, one
/// that did not is smaller), nearest in order on a tie. mmap does not place areas in the
/// same order every run (it fills gaps that address randomization leaves), so order alone
/// cannot pair them.
fn align(
    old: &[(MappingKey, u64)],
    new: &[(MappingKey, u64)],
    wanted: &[u32],
) -> HashMap<usize, usize> {
    let deadline = Some(Instant::now() + ALIGN_DEADLINE);
    let mut pairs = HashMap::new();
    for op in capture_diff_slices_deadline(Algorithm::Myers, old, new, deadline) {
        if let DiffOp::Equal {
            old_index,
            new_index,
            len,
        } = op
        {
            pairs.extend((0..len).map(|k| (old_index + k, new_index + k)));
        }
    }
    let mut taken = vec![false; new.len()];
    pairs.values().for_each(|&j| taken[j] = true);
    for &i in wanted {
        let i = i as usize;
        if pairs.contains_key(&i) {
            continue;
        }
        let (key, pages) = &old[i];
        let best = new
            .iter()
            .enumerate()
            .filter(|(j, (k, _))| !taken[*j] && k == key)
            .min_by_key(|(j, (_, n))| (n.abs_diff(*pages), j.abs_diff(i)))
            .map(|(j, _)| j);
        if let Some(j) = best {
            taken[j] = true;
            pairs.insert(i, j);
        }
    }
    pairs
}

/// The profiles of this host: learned working sets by owner (a uid: one user's profiles never
/// shape another's seeds) and name.
#[derive(Default)]
pub struct Profiles {
    inner: Mutex<Store>,
}

#[derive(Default)]
struct Store {
    learned: HashMap<(u32, String), (u64, Learned)>,
    stored: u64,
}

impl Profiles {
    /// Keeps `learned` as the profile `name` of `owner`, replacing what it had (a seed's
    /// working set includes what it was given, so it only grows); the least recently stored
    /// profile goes beyond [`MAX_PROFILES`]. An empty one is not kept.
    pub fn store(&self, owner: u32, name: &str, learned: Learned) {
        if learned.is_empty() {
            return;
        }
        let mut store = self.inner.lock().expect("profiles lock");
        store.stored += 1;
        let stamp = store.stored;
        store
            .learned
            .insert((owner, name.to_owned()), (stamp, learned));
        if store.learned.len() > MAX_PROFILES {
            let oldest = store
                .learned
                .iter()
                .min_by_key(|(_, (stamp, _))| *stamp)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                store.learned.remove(&k);
            }
        }
    }

    pub fn get(&self, owner: u32, name: &str) -> Option<Learned> {
        let store = self.inner.lock().expect("profiles lock");
        store
            .learned
            .get(&(owner, name.to_owned()))
            .map(|(_, l)| l.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("profiles lock").learned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a profile name is refused, if it is: 1 to [`MAX_NAME`] bytes of letters, digits and
/// `-_.:/@`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.:/@".contains(c);
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(ok) {
        return Err(format!(
            "profile name {:?}: 1 to {MAX_NAME} letters, digits or -_.:/@",
            name.chars().take(MAX_NAME + 8).collect::<String>()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mitosis_descriptor::{FileIdentity, PageSet};

    const RW: u8 = 3;

    fn vma(start: u64, pages: u64, backing: Backing) -> Vma {
        Vma {
            backing,
            ..Vma::anonymous(start, start + pages * PAGE, RW, PageSet::full(pages))
        }
    }

    fn anon(start: u64, pages: u64) -> Vma {
        vma(start, pages, Backing::Anonymous)
    }

    fn file(start: u64, pages: u64, path: &str) -> Vma {
        let file = FileIdentity {
            path: path.into(),
            size: pages * PAGE,
            hash: [0; 32],
        };
        vma(
            start,
            pages,
            Backing::File {
                file,
                offset: 0,
                file_pages: pages,
            },
        )
    }

    #[test]
    fn pages_follow_their_mapping_to_another_run_of_the_program() {
        // Run 1: heap at 0x100000, a library, an arena of 4 pages below it.
        let old = [
            anon(0x10_0000, 8),
            anon(0x7000_0000, 4),
            file(0x7100_0000, 2, "/lib/libc.so"),
        ];
        // Run 2: everything moved (ASLR); the heap grew, the arena grew at its start.
        let new = [
            anon(0x20_0000, 16),
            anon(0x6000_0000 - 2 * PAGE, 6),
            file(0x6100_0000, 2, "/lib/libc.so"),
        ];
        let learned = Learned::of(
            &old,
            0x10_0000,
            [0x10_0000 + PAGE, 0x7000_0000 + 3 * PAGE, 0x7100_0000],
        );
        assert_eq!(learned.len(), 3);
        let carried = learned.carry_to(&new, 0x20_0000);
        assert_eq!(
            carried,
            vec![0x20_0000 + PAGE, 0x6000_0000 + 3 * PAGE, 0x6100_0000],
            "heap from its start, the arena from its end, the file from its start"
        );
    }

    #[test]
    fn an_inserted_mapping_shifts_nothing_and_unmatched_ones_carry_nothing() {
        let old = [
            anon(0x1000_0000, 4),
            file(0x2000_0000, 4, "/a"),
            anon(0x3000_0000, 4),
        ];
        let new = [
            anon(0x1000_0000, 4),
            file(0x1800_0000, 9, "/extra"),
            file(0x2000_0000, 4, "/a"),
            file(0x3000_0000, 4, "/b"),
        ];
        let learned = Learned::of(&old, 0, [0x1000_0000, 0x2000_0000 + PAGE, 0x3000_0000]);
        assert_eq!(
            learned.carry_to(&new, 0),
            vec![0x1000_0000, 0x2000_0000 + PAGE]
        );
    }

    #[test]
    fn the_area_holding_more_pages_gets_the_merged_area_both_want() {
        // Run 1: an 8-page area (one page learned) below a 20-page one (twenty). Run 2: both
        // merged into one 28-page area, the 20 pages at its top. Paired in address order,
        // the small one took it, and the twenty pages went nowhere.
        let old = [anon(0x1000_0000, 8), anon(0x2000_0000, 20)];
        let new = [anon(0x3000_0000, 28)];
        let big: Vec<u64> = (0..20).map(|p| 0x2000_0000 + p * PAGE).collect();
        let learned = Learned::of(&old, 0, big.into_iter().chain([0x1000_0000]));
        let carried = learned.carry_to(&new, 0);
        let top: Vec<u64> = (8..28).map(|p| 0x3000_0000 + p * PAGE).collect();
        assert_eq!(carried, top);
    }

    #[test]
    fn areas_placed_in_another_order_or_merged_still_pair() {
        let ro = |start, pages| {
            let mut v = anon(start, pages);
            v.prot = 1;
            v
        };
        // Run 1: a 16-page area, a read-only one, an 8-page area; run 2: the read-only area
        // moved to the end, and a 4-page area merged below the 8-page one.
        let old = [
            anon(0x1000_0000, 16),
            ro(0x2000_0000, 2),
            file(0x3000_0000, 4, "/a"),
            anon(0x4000_0000, 8),
        ];
        let new = [
            anon(0x5000_0000, 16),
            file(0x6000_0000, 4, "/a"),
            anon(0x7000_0000, 12),
            ro(0x8000_0000, 2),
        ];
        let learned = Learned::of(
            &old,
            0,
            [
                0x1000_0000,
                0x2000_0000 + PAGE,
                0x4000_0000,
                0x4000_0000 + 7 * PAGE,
            ],
        );
        assert_eq!(
            learned.carry_to(&new, 0),
            vec![
                0x5000_0000,
                0x7000_0000 + 4 * PAGE,
                0x7000_0000 + 11 * PAGE,
                0x8000_0000 + PAGE
            ]
        );
    }

    #[test]
    fn pages_the_new_seed_lacks_or_beyond_a_shrunk_mapping_are_dropped() {
        let old = [anon(0x1000_0000, 8)];
        let mut sparse = anon(0x5000_0000, 8);
        sparse.seed_pages =
            PageSet::from_flags([false, false, true, true, true, true, true, false]);
        let learned = Learned::of(
            &old,
            0,
            [0x1000_0000, 0x1000_0000 + 7 * PAGE, 0x1000_0000 + PAGE],
        );
        // Counted from the end: places 7 (first page), 0 (last), 6 (second).
        assert_eq!(learned.carry_to(&[sparse], 0), Vec::<u64>::new());
        // A shrunk area: from its end one page lands (the last), from its start two (the
        // first and second); the page 7 past the start lies beyond it either way.
        let shrunk = anon(0x5000_0000, 4);
        assert_eq!(
            learned.carry_to(&[shrunk], 0),
            vec![0x5000_0000, 0x5000_0000 + PAGE]
        );
    }

    #[test]
    fn an_area_that_grew_at_its_end_is_counted_from_its_start() {
        // Run 2's area merged with an older neighbour above it: 4 pages more at its end.
        // Only the pages counted from the start are the seed's there (a sparse area).
        let old = [anon(0x1000_0000, 8)];
        let mut merged = anon(0x2000_0000, 12);
        merged.seed_pages = PageSet::from_flags((0..12).map(|i| i == 0 || i == 5));
        let learned = Learned::of(&old, 0, [0x1000_0000, 0x1000_0000 + 5 * PAGE]);
        assert_eq!(
            learned.carry_to(&[merged], 0),
            vec![0x2000_0000, 0x2000_0000 + 5 * PAGE]
        );
    }

    #[test]
    fn anonymous_pages_keep_their_place_in_their_aligned_block() {
        // Run 2's area ends 4 KiB past a 16 KiB boundary where run 1's ended on one: counted
        // from the end alone, every page would land one page off its place in its pool.
        let old = [anon(0x1000_0000, 8)];
        let new = [anon(0x2000_0000, 9)];
        let learned = Learned::of(&old, 0, [0x1000_0000, 0x1000_0000 + 5 * PAGE]);
        assert_eq!(
            learned.carry_to(&new, 0),
            vec![0x2000_0000, 0x2000_0000 + 5 * PAGE]
        );
    }

    #[test]
    fn addresses_outside_every_mapping_are_not_learned() {
        let old = [anon(0x1000_0000, 2)];
        assert!(Learned::of(&old, 0, [0x0fff_f000, 0x1000_2000]).is_empty());
    }

    #[test]
    fn profiles_are_per_owner_and_bounded() {
        let p = Profiles::default();
        let one = Learned::of(&[anon(0x1000, 1)], 0, [0x1000]);
        p.store(1000, "f", one.clone());
        assert_eq!(p.get(1000, "f"), Some(one.clone()));
        assert_eq!(
            p.get(1001, "f"),
            None,
            "another user's profile of the same name"
        );
        p.store(1000, "empty", Learned::default());
        assert_eq!(p.get(1000, "empty"), None);
        for i in 0..MAX_PROFILES + 5 {
            p.store(7, &format!("p{i}"), one.clone());
        }
        assert_eq!(p.len(), MAX_PROFILES);
        assert_eq!(
            p.get(1000, "f"),
            None,
            "the least recently stored went first"
        );
        assert!(p.get(7, &format!("p{}", MAX_PROFILES + 4)).is_some());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("app/fn-1.2:v3@host").is_ok());
        for bad in ["", "a b", "x\n", "é", &"n".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
