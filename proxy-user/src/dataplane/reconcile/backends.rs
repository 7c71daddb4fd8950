//! The backends the slots name, as the agent keeps them: id → backend, the
//! reverse index (backend → id, so an endpoint keeps its id), and how many
//! slots hold each id, in one table of entries with two indexes of 4 bytes
//! a bucket. At 50,000 services x 10 endpoints the three hash maps these
//! replace (id → backend, backend → id, id → references) took 36.6 MB.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;

use super::BackendAddr;

/// `refs` of an entry on the free list.
const FREE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: BackendAddr,
    id: u32,
    /// Slots holding `id`; `FREE` for a free entry.
    refs: u32,
}

/// Backend id → backend, with the reverse index and reference counts.
/// Equality is of the (id → backend) map alone.
#[derive(Clone, Default)]
pub struct Backends {
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Entry indexes, by their id.
    by_id: HashTable<u32>,
    /// Entry indexes, by their backend: the last entry given each backend
    /// (two ids for one backend exist only in hand-edited maps).
    by_addr: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl Backends {
    fn id_hash(&self, id: u32) -> u64 {
        self.hasher.hash_one(id)
    }

    fn addr_hash(&self, b: &BackendAddr) -> u64 {
        self.hasher.hash_one(b)
    }

    fn index(&self, id: u32) -> Option<usize> {
        let entries = &self.entries;
        self.by_id
            .find(self.id_hash(id), |&i| entries[i as usize].id == id)
            .map(|&i| i as usize)
    }

    pub fn get(&self, id: &u32) -> Option<&BackendAddr> {
        self.index(*id).map(|i| &self.entries[i].addr)
    }

    pub fn get_key_value(&self, id: &u32) -> Option<(&u32, &BackendAddr)> {
        self.index(*id)
            .map(|i| (&self.entries[i].id, &self.entries[i].addr))
    }

    pub fn contains_key(&self, id: &u32) -> bool {
        self.index(*id).is_some()
    }

    /// The id backend `b` has, if any.
    pub fn id_of(&self, b: &BackendAddr) -> Option<u32> {
        let entries = &self.entries;
        self.by_addr
            .find(self.addr_hash(b), |&i| entries[i as usize].addr == *b)
            .map(|&i| entries[i as usize].id)
    }

    /// Gives id `id` backend `b` (its references kept if it had one).
    pub fn insert(&mut self, id: u32, b: BackendAddr) -> Option<BackendAddr> {
        let (i, old) = match self.index(id) {
            Some(i) => {
                let old = self.entries[i].addr;
                self.unindex_addr(i);
                self.entries[i].addr = b;
                (i, Some(old))
            }
            None => {
                let e = Entry {
                    addr: b,
                    id,
                    refs: 0,
                };
                let i = match self.free.pop() {
                    Some(i) => {
                        self.entries[i as usize] = e;
                        i as usize
                    }
                    None => {
                        self.entries.push(e);
                        self.entries.len() - 1
                    }
                };
                let (h, entries, hasher) = (self.id_hash(id), &self.entries, &self.hasher);
                self.by_id
                    .insert_unique(h, i as u32, |&j| hasher.hash_one(entries[j as usize].id));
                (i, None)
            }
        };
        // The newest entry of a backend is the one its id is found by.
        let h = self.addr_hash(&b);
        let (entries, hasher) = (&self.entries, &self.hasher);
        match self.by_addr.entry(
            h,
            |&j| entries[j as usize].addr == b,
            |&j| hasher.hash_one(entries[j as usize].addr),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = i as u32,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(i as u32);
            }
        }
        old
    }

    /// Drops entry `i` from the reverse index if it is the one found there.
    fn unindex_addr(&mut self, i: usize) {
        let b = self.entries[i].addr;
        let h = self.addr_hash(&b);
        if let Ok(o) = self.by_addr.find_entry(h, |&j| j as usize == i) {
            o.remove();
        }
    }

    pub fn remove(&mut self, id: &u32) -> Option<BackendAddr> {
        let i = self.index(*id)?;
        self.unindex_addr(i);
        let h = self.id_hash(*id);
        if let Ok(o) = self.by_id.find_entry(h, |&j| j as usize == i) {
            o.remove();
        }
        let addr = self.entries[i].addr;
        self.entries[i].refs = FREE;
        self.free.push(i as u32);
        Some(addr)
    }

    /// One more slot holds `id` (nothing if `id` is not here).
    pub fn add_ref(&mut self, id: u32) {
        if let Some(i) = self.index(id) {
            self.entries[i].refs += 1;
        }
    }

    /// One slot fewer holds `id`.
    pub fn unref(&mut self, id: u32) {
        if let Some(i) = self.index(id) {
            let r = &mut self.entries[i].refs;
            *r = r.saturating_sub(1);
        }
    }

    /// How many slots hold `id`.
    pub fn refs(&self, id: u32) -> u32 {
        self.index(id).map_or(0, |i| self.entries[i].refs)
    }

    /// Sets every reference count from `ids`, the ids the slots hold.
    pub fn count_refs(&mut self, ids: impl Iterator<Item = u32>) {
        for e in self.entries.iter_mut().filter(|e| e.refs != FREE) {
            e.refs = 0;
        }
        for id in ids {
            self.add_ref(id);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every (id, backend), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&u32, &BackendAddr)> + '_ {
        self.entries
            .iter()
            .filter(|e| e.refs != FREE)
            .map(|e| (&e.id, &e.addr))
    }

    pub fn keys(&self) -> impl Iterator<Item = &u32> + '_ {
        self.iter().map(|(id, _)| id)
    }

    pub fn values(&self) -> impl Iterator<Item = &BackendAddr> + '_ {
        self.iter().map(|(_, b)| b)
    }
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl PartialEq for Backends {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(id, b)| other.get(id) == Some(b))
    }
}

impl Eq for Backends {}

impl FromIterator<(u32, BackendAddr)> for Backends {
    fn from_iter<I: IntoIterator<Item = (u32, BackendAddr)>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut s = Self::default();
        // A read of the maps: sized once, not grown through every doubling.
        let n = iter.size_hint().0;
        s.entries.reserve(n);
        let (entries, hasher) = (&s.entries, &s.hasher);
        s.by_id
            .reserve(n, |&j| hasher.hash_one(entries[j as usize].id));
        s.by_addr
            .reserve(n, |&j| hasher.hash_one(entries[j as usize].addr));
        for (id, b) in iter {
            s.insert(id, b);
        }
        // The hint counts slots, of which a Maglev table has hundreds per
        // backend.
        if s.entries.len() < s.entries.capacity() / 2 {
            s.entries.shrink_to_fit();
            let (entries, hasher) = (&s.entries, &s.hasher);
            s.by_id
                .shrink_to_fit(|&j| hasher.hash_one(entries[j as usize].id));
            s.by_addr
                .shrink_to_fit(|&j| hasher.hash_one(entries[j as usize].addr));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn b(n: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(198, 18, 0, n).into(),
            port: 80,
            proto: proxy_common::IPPROTO_TCP,
            local: false,
        }
    }

    proptest! {
        /// Any sequence of writes leaves what the three maps it replaces
        /// would hold: id → backend, backend → its newest id (kept only
        /// while that id still has it), id → references.
        #[test]
        fn behaves_as_the_maps_it_replaces(ops in prop::collection::vec(
            (0u32..8, 0u8..5, 0u8..4), 0..300,
        )) {
            let mut s = Backends::default();
            let mut by_id = std::collections::HashMap::new();
            let mut by_addr = std::collections::HashMap::new();
            let mut refs: std::collections::HashMap<u32, u32> = Default::default();
            for (id, n, what) in ops {
                match what {
                    0 => {
                        if let Some(old) = by_id.get(&id) {
                            if by_addr.get(old) == Some(&id) {
                                by_addr.remove(old);
                            }
                        }
                        prop_assert_eq!(s.insert(id, b(n)), by_id.insert(id, b(n)));
                        by_addr.insert(b(n), id);
                    }
                    1 => {
                        if let Some(old) = by_id.get(&id) {
                            if by_addr.get(old) == Some(&id) {
                                by_addr.remove(old);
                            }
                        }
                        refs.remove(&id);
                        prop_assert_eq!(s.remove(&id), by_id.remove(&id));
                    }
                    2 => {
                        s.add_ref(id);
                        if by_id.contains_key(&id) {
                            *refs.entry(id).or_default() += 1;
                        }
                    }
                    _ => {
                        s.unref(id);
                        if let Some(r) = refs.get_mut(&id) {
                            *r = r.saturating_sub(1);
                        }
                    }
                }
                prop_assert_eq!(s.len(), by_id.len());
                for n in 0..5 {
                    prop_assert_eq!(s.id_of(&b(n)), by_addr.get(&b(n)).copied());
                }
                for id in 0..8 {
                    prop_assert_eq!(s.get(&id), by_id.get(&id));
                    prop_assert_eq!(s.refs(id), refs.get(&id).copied().unwrap_or(0));
                }
            }
            let again: Backends = by_id.into_iter().collect();
            prop_assert_eq!(again, s);
        }
    }
}
