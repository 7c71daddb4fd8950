//! The slot map as the agent keeps it: each frontend's two tables as
//! vectors of backend ids, not a hash entry per slot. At 50,000 services x
//! 10 endpoints a hash table of half a million (slot → id) entries took
//! 13.6 MB; a vector per table takes its ids plus one small entry.

use foldhash::HashMap;
use proxy_common::{SlotKey, LOCAL_SLOTS};

/// No backend in this slot (a hole left by a slot written out of order).
const NONE: u32 = u32::MAX;

/// Above this many slots a table is not kept as a vector: no table the
/// planner makes is that large (a Maglev table has at most 131,071), and a
/// hand-edited key far out must not allocate gigabytes.
const DENSE_MAX: u32 = 1 << 18;

/// (service id, slot) → backend id, as a map, kept as one vector per
/// table (cluster-wide, node-local).
#[derive(Clone, Debug, Default)]
pub struct SlotTables {
    /// (service id, node-local table?) → the table's backend ids by slot.
    tables: HashMap<(u32, bool), Vec<u32>>,
    /// What does not fit a vector: a slot beyond `DENSE_MAX`, or a backend
    /// id equal to the hole marker.
    odd: HashMap<SlotKey, u32>,
    len: usize,
}

/// Where `k` lives in a vector, if it can.
fn place(k: &SlotKey) -> Option<((u32, bool), usize)> {
    let (local, i) = if k.slot >= LOCAL_SLOTS {
        (true, k.slot - LOCAL_SLOTS)
    } else {
        (false, k.slot)
    };
    (i < DENSE_MAX).then_some(((k.svc_id, local), i as usize))
}

impl SlotTables {
    pub fn get(&self, k: &SlotKey) -> Option<&u32> {
        match place(k) {
            Some((t, i)) => self
                .tables
                .get(&t)
                .and_then(|v| v.get(i))
                .filter(|id| **id != NONE),
            None => None,
        }
        .or_else(|| self.odd.get(k))
    }

    pub fn contains_key(&self, k: &SlotKey) -> bool {
        self.get(k).is_some()
    }

    /// Sets slot `k` to `id`; returns what it held.
    pub fn insert(&mut self, k: SlotKey, id: u32) -> Option<u32> {
        let old = self.remove(&k);
        match place(&k).filter(|_| id != NONE) {
            Some((t, i)) => {
                let v = self.tables.entry(t).or_default();
                if v.len() <= i {
                    v.resize(i + 1, NONE);
                }
                v[i] = id;
            }
            None => {
                self.odd.insert(k, id);
            }
        }
        self.len += 1;
        old
    }

    /// Empties slot `k`; returns what it held.
    pub fn remove(&mut self, k: &SlotKey) -> Option<u32> {
        let old = match place(k) {
            Some((t, i)) => match self.tables.get_mut(&t) {
                Some(v) if v.get(i).is_some_and(|id| *id != NONE) => {
                    let id = std::mem::replace(&mut v[i], NONE);
                    while v.last() == Some(&NONE) {
                        v.pop();
                    }
                    if v.is_empty() {
                        self.tables.remove(&t);
                    }
                    Some(id)
                }
                _ => None,
            },
            None => None,
        }
        .or_else(|| self.odd.remove(k));
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Gives service `svc_id`'s tables back the room their growth left
    /// (a vector doubles as its slots are written one by one): called once
    /// its entry is written, when its tables are complete.
    pub fn shrink(&mut self, svc_id: u32) {
        for local in [false, true] {
            if let Some(v) = self.tables.get_mut(&(svc_id, local)) {
                if v.capacity() > v.len() {
                    v.shrink_to_fit();
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (slot, backend id), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (SlotKey, u32)> + '_ {
        let dense = self.tables.iter().flat_map(|(&(svc_id, local), v)| {
            let base = if local { LOCAL_SLOTS } else { 0 };
            v.iter()
                .enumerate()
                .filter(|(_, id)| **id != NONE)
                .map(move |(i, id)| {
                    (
                        SlotKey {
                            svc_id,
                            slot: base + i as u32,
                        },
                        *id,
                    )
                })
        });
        dense.chain(self.odd.iter().map(|(k, id)| (*k, *id)))
    }

    pub fn keys(&self) -> impl Iterator<Item = SlotKey> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().map(|(_, id)| id)
    }
}

impl PartialEq for SlotTables {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().all(|(k, id)| other.get(&k) == Some(&id))
    }
}

impl Eq for SlotTables {}

impl FromIterator<(SlotKey, u32)> for SlotTables {
    fn from_iter<I: IntoIterator<Item = (SlotKey, u32)>>(iter: I) -> Self {
        let mut s = Self::default();
        for (k, id) in iter {
            s.insert(k, id);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(svc_id: u32, slot: u32) -> SlotKey {
        SlotKey { svc_id, slot }
    }

    #[test]
    fn odd_keys_and_ids_are_kept_without_a_huge_vector() {
        let mut s = SlotTables::default();
        s.insert(key(1, 4_000_000_000), 7);
        s.insert(key(1, LOCAL_SLOTS + 3_000_000), 8);
        s.insert(key(2, 0), NONE);
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(&key(1, 4_000_000_000)), Some(&7));
        assert_eq!(s.get(&key(2, 0)), Some(&NONE));
        assert!(s.tables.is_empty());
        assert_eq!(s.remove(&key(2, 0)), Some(NONE));
        assert_eq!(s.len(), 2);
    }

    proptest! {
        /// Any sequence of writes leaves what a hash map would hold.
        #[test]
        fn behaves_as_a_map(ops in prop::collection::vec(
            (0u32..4, prop_oneof![0u32..12, (0u32..12).prop_map(|i| LOCAL_SLOTS + i)],
             prop::option::of(0u32..6)),
            0..200,
        )) {
            let mut s = SlotTables::default();
            let mut m = std::collections::HashMap::new();
            for (svc, slot, id) in ops {
                let k = key(svc, slot);
                match id {
                    Some(id) => prop_assert_eq!(s.insert(k, id), m.insert(k, id)),
                    None => prop_assert_eq!(s.remove(&k), m.remove(&k)),
                }
                prop_assert_eq!(s.len(), m.len());
            }
            let mut got: Vec<(SlotKey, u32)> = s.iter().collect();
            let mut want: Vec<(SlotKey, u32)> = m.into_iter().collect();
            got.sort();
            want.sort();
            prop_assert_eq!(&got, &want);
            let again: SlotTables = want.into_iter().collect();
            prop_assert_eq!(again, s);
        }
    }
}
