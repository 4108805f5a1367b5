//! The seeds this host has prepared.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use mitosis_descriptor::{Descriptor, KEY_LEN};
use mitosis_fork::Twin;
use mitosis_sys::mem::RemoteMemory;
use mitosis_transport::peer::{NONCE_LEN, RemoteError, Sealed};

use crate::profiles::{Learned, Profiles};

pub struct Seed {
    pub id: u64,
    pub pid: i32,
    key: [u8; KEY_LEN],
    /// The uid of whoever prepared it (over the control socket): only they, and root, may
    /// use it through this host's control socket.
    pub owner: u32,
    pub descriptor: Descriptor,
    pub encoded: Vec<u8>,
    pub memory: Arc<RemoteMemory>,
    pub twin: Mutex<Option<Twin>>,
    /// The thread that traces the twin: every ptrace call on it runs there.
    pub tracer: crate::tracer::Tracer,
    pub syscall_insn: u64,
    /// Page addresses children have asked for: replayed in one transfer by new hosts.
    working_set: Mutex<BTreeSet<u64>>,
    /// The profile it was prepared with (see [`crate::profiles`]), and the pages carried
    /// over from earlier seeds of it (sorted): sent to new hosts beside the working set.
    profile: Option<(String, Vec<u64>)>,
    /// The container a bundle's seed runs in, destroyed when the seed is dropped.
    pub container: Mutex<Option<crate::containers::SeedContainer>>,
    /// What new hosts fetch first, packed.
    pub bootstrap: crate::bootstrap::BootstrapCache,
}

impl Seed {
    pub fn new(
        pid: i32,
        key: [u8; KEY_LEN],
        owner: u32,
        prepared: mitosis_fork::Prepared,
        encoded: Vec<u8>,
        tracer: crate::tracer::Tracer,
    ) -> Self {
        Seed {
            id: prepared.descriptor.seed_id,
            pid,
            key,
            owner,
            memory: prepared.twin.memory().clone(),
            descriptor: prepared.descriptor,
            encoded,
            twin: Mutex::new(Some(prepared.twin)),
            tracer,
            syscall_insn: prepared.syscall_insn,
            working_set: Mutex::new(BTreeSet::new()),
            profile: None,
            container: Mutex::new(None),
            bootstrap: Default::default(),
        }
    }

    /// Adds a page a child touched to the working set. Only touched pages count, not the
    /// neighbours fetched with them: a later child that does touch a neighbour faults on it
    /// and records it then, so the set grows to what children use and no further.
    pub fn record(&self, page: u64) {
        self.working_set
            .lock()
            .expect("working set lock")
            .insert(page & !4095);
    }

    /// Adds pages children touched among those served as another page's neighbours (a
    /// replica's `Touched` report) to the working set, once each is known to lie in one of the
    /// seed's mappings; none if one does not. Page by page: touched pages side by side may
    /// lie in two neighbouring mappings.
    pub fn record_touched(&self, pages: &[u64]) -> Result<(), RemoteError> {
        for &page in pages {
            self.check_runs(&[(page & !4095, 1)])?;
        }
        let mut set = self.working_set.lock().expect("working set lock");
        set.extend(pages.iter().map(|&page| page & !4095));
        Ok(())
    }

    /// Makes it a seed of profile `name` that starts with `learned` (what earlier seeds of
    /// it recorded, carried to this one's layout); returns the pages carried.
    pub fn with_profile(mut self, name: &str, learned: Option<&Learned>) -> (Self, usize) {
        let carried = learned.map_or_else(Vec::new, |l| l.carry_to_seed(&self.descriptor));
        let n = carried.len();
        self.profile = Some((name.to_owned(), carried));
        (self, n)
    }

    /// The profile it was prepared with, if any.
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_ref().map(|(name, _)| name.as_str())
    }

    /// Pages carried over from earlier seeds of its profile (sorted).
    pub fn carried_pages(&self) -> &[u64] {
        self.profile.as_ref().map_or(&[], |(_, pages)| pages)
    }

    /// What it has learned for its profile: the pages carried to it and those its children
    /// touched since, by mapping.
    pub fn learned(&self) -> Learned {
        let touched = self.working_set_pages();
        Learned::of_seed(
            &self.descriptor,
            touched
                .into_iter()
                .chain(self.carried_pages().iter().copied()),
        )
    }

    pub fn working_set_len(&self) -> usize {
        self.working_set.lock().expect("working set lock").len()
    }

    /// The working set's pages, in address order.
    pub fn working_set_pages(&self) -> Vec<u64> {
        self.working_set
            .lock()
            .expect("working set lock")
            .iter()
            .copied()
            .collect()
    }

    /// Constant-time key comparison.
    pub fn key_matches(&self, key: &[u8; KEY_LEN]) -> bool {
        self.key
            .iter()
            .zip(key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// True if this seed's key made `sealed`'s MAC on the connection that said `nonce`.
    pub fn verify(&self, sealed: &Sealed<'_>, nonce: &[u8; NONCE_LEN]) -> bool {
        sealed.seed == self.id && sealed.verify(&self.key, nonce)
    }

    /// Checks that every run lies inside one of the seed's mappings.
    pub fn check_runs(&self, runs: &[(u64, u32)]) -> Result<(), RemoteError> {
        for &(addr, pages) in runs {
            let end = addr
                .checked_add(pages as u64 * 4096)
                .ok_or(RemoteError::BadRange(addr, pages))?;
            // Mappings are sorted and disjoint: the one that could hold it starts at or below.
            let vmas = &self.descriptor.vmas;
            let i = vmas.partition_point(|v| v.start <= addr);
            let inside = i > 0 && end <= vmas[i - 1].end;
            if !inside || pages == 0 {
                return Err(RemoteError::BadRange(addr, pages));
            }
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct Registry {
    seeds: Mutex<HashMap<u64, Arc<Seed>>>,
    next_id: Mutex<u64>,
    /// What seeds of each profile learned, kept when they are dropped.
    profiles: Profiles,
}

impl Registry {
    pub fn next_id(&self) -> u64 {
        let mut next = self.next_id.lock().expect("registry lock");
        *next += 1;
        *next
    }

    pub fn insert(&self, seed: Seed) -> Arc<Seed> {
        let seed = Arc::new(seed);
        self.seeds
            .lock()
            .expect("registry lock")
            .insert(seed.id, seed.clone());
        seed
    }

    /// The seed `id` if `key` is its key.
    pub fn authorize(&self, id: u64, key: &[u8; KEY_LEN]) -> Result<Arc<Seed>, RemoteError> {
        let seed = self
            .seeds
            .lock()
            .expect("registry lock")
            .get(&id)
            .cloned()
            .ok_or(RemoteError::NoSuchSeed(id))?;
        if !seed.key_matches(key) {
            return Err(RemoteError::WrongKey(id));
        }
        Ok(seed)
    }

    pub fn get(&self, id: u64) -> Option<Arc<Seed>> {
        self.seeds.lock().expect("registry lock").get(&id).cloned()
    }

    /// True while `seed` is still prepared (not dropped).
    pub fn is_live(&self, seed: &Arc<Seed>) -> bool {
        self.seeds
            .lock()
            .expect("registry lock")
            .get(&seed.id)
            .is_some_and(|s| Arc::ptr_eq(s, seed))
    }

    /// Forgets seed `id`; a seed of a profile leaves what it learned to the profile.
    pub fn remove(&self, id: u64) -> Option<Arc<Seed>> {
        let seed = self.seeds.lock().expect("registry lock").remove(&id)?;
        if let Some(name) = seed.profile() {
            self.profiles.store(seed.owner, name, seed.learned());
        }
        Some(seed)
    }

    /// What the profile `name` of `owner` has learned: from its newest seed still prepared
    /// here (its children may still be recording), else from the last one dropped.
    pub fn learned(&self, owner: u32, name: &str) -> Option<Learned> {
        let newest = self
            .seeds
            .lock()
            .expect("registry lock")
            .values()
            .filter(|s| s.owner == owner && s.profile() == Some(name))
            .max_by_key(|s| s.id)
            .cloned();
        match newest.map(|s| s.learned()).filter(|l| !l.is_empty()) {
            Some(learned) => Some(learned),
            None => self.profiles.get(owner, name),
        }
    }

    /// Profiles this host keeps (of dropped seeds).
    pub fn profiles(&self) -> usize {
        self.profiles.len()
    }

    pub fn len(&self) -> usize {
        self.seeds.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<Seed>> {
        self.seeds
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }
}
