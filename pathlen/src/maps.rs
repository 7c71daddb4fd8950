//! Emulated maps. Every value is a memory region of its own, so a pointer
//! from a lookup stays valid after the entry is deleted or replaced, as
//! elements of the kernel's RCU-freed maps do for a program's run.

use std::collections::HashMap;

use crate::mem::Memory;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

const ENOENT: i64 = -2;
const E2BIG: i64 = -7;
const EEXIST: i64 = -17;
const EINVAL: i64 = -22;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hash,
    Lru,
    Array,
    Lpm,
}

pub struct MapState {
    kind: Kind,
    pub key_size: usize,
    pub value_size: usize,
    max_entries: usize,
    /// Key bytes → value region.
    entries: HashMap<Vec<u8>, usize>,
    /// Insertion order, for LRU eviction (oldest first).
    order: Vec<Vec<u8>>,
}

impl MapState {
    pub fn new(def: &aya_obj::Map) -> Self {
        let kind = match def.map_type() {
            BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY => Kind::Array,
            BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH => Kind::Lru,
            BPF_MAP_TYPE_LPM_TRIE => Kind::Lpm,
            BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_PERCPU_HASH => Kind::Hash,
            // Global data sections are arrays of one element; anything
            // else is treated as a hash, which is how a path sees it.
            _ => Kind::Hash,
        };
        Self {
            kind,
            key_size: def.key_size() as usize,
            value_size: def.value_size() as usize,
            max_entries: def.max_entries().max(1) as usize,
            entries: HashMap::new(),
            order: Vec::new(),
        }
    }

    fn array_index(&self, key: &[u8]) -> Option<usize> {
        let b: [u8; 4] = key.get(..4)?.try_into().ok()?;
        let i = u32::from_ne_bytes(b) as usize;
        (i < self.max_entries).then_some(i)
    }

    /// The value region of `key`; arrays create their (zeroed) elements on
    /// first use, as if preallocated.
    pub fn lookup_or_create(&mut self, mem: &mut Memory, key: &[u8]) -> Option<usize> {
        match self.kind {
            Kind::Array => {
                self.array_index(key)?;
                if let Some(&r) = self.entries.get(key) {
                    return Some(r);
                }
                let r = mem.alloc(&vec![0u8; self.value_size]);
                self.entries.insert(key.to_vec(), r);
                Some(r)
            }
            Kind::Lpm => self.lpm(key),
            Kind::Hash | Kind::Lru => self.entries.get(key).copied(),
        }
    }

    /// As [`Self::lookup_or_create`], read only (arrays' unwritten elements
    /// read as absent here: only the host API uses it).
    pub fn lookup(&self, key: &[u8]) -> Option<usize> {
        match self.kind {
            Kind::Lpm => self.lpm(key),
            _ => self.entries.get(key).copied(),
        }
    }

    /// Longest-prefix match: the key is a 32-bit prefix length, then data.
    fn lpm(&self, key: &[u8]) -> Option<usize> {
        let (plen, data) = key.split_at_checked(4)?;
        let plen = u32::from_ne_bytes(plen.try_into().ok()?) as usize;
        let mut best: Option<(usize, usize)> = None;
        for (k, &r) in &self.entries {
            let (elen, edata) = k.split_at(4);
            let elen = u32::from_ne_bytes(elen.try_into().ok()?) as usize;
            if elen <= plen
                && prefix_eq(data, edata, elen)
                && best.is_none_or(|(len, _)| elen > len)
            {
                best = Some((elen, r));
            }
        }
        best.map(|(_, r)| r)
    }

    /// `bpf_map_update_elem`: 0 or a negative errno.
    pub fn update(&mut self, mem: &mut Memory, key: &[u8], value: &[u8], flags: u64) -> i64 {
        let exists = match self.kind {
            Kind::Array => {
                if self.array_index(key).is_none() {
                    return E2BIG;
                }
                if flags == BPF_NOEXIST {
                    return EEXIST;
                }
                true
            }
            _ => self.entries.contains_key(key),
        };
        if exists && flags == BPF_NOEXIST {
            return EEXIST;
        }
        if !exists && flags == BPF_EXIST {
            return ENOENT;
        }
        if !exists && self.entries.len() >= self.max_entries {
            if self.kind != Kind::Lru {
                return E2BIG;
            }
            // Evict the oldest entry.
            if !self.order.is_empty() {
                let old = self.order.remove(0);
                self.entries.remove(&old);
            }
        }
        if let Some(&r) = self.entries.get(key) {
            if self.kind == Kind::Array {
                mem.region_mut(r).copy_from_slice(value);
                return 0;
            }
        }
        // Hash maps replace the element (a reader keeps the old one).
        let r = mem.alloc(value);
        if self.entries.insert(key.to_vec(), r).is_none() {
            self.order.push(key.to_vec());
        }
        0
    }

    /// `bpf_map_delete_elem`: 0 or a negative errno.
    pub fn delete(&mut self, key: &[u8]) -> i64 {
        if self.kind == Kind::Array {
            return EINVAL;
        }
        if self.entries.remove(key).is_none() {
            return ENOENT;
        }
        self.order.retain(|k| k != key);
        0
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: usize) -> bool {
    let bytes = bits / 8;
    if a.len() < bytes || b.len() < bytes {
        return false;
    }
    if a[..bytes] != b[..bytes] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(bytes), b.get(bytes)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}
