//! What the control-plane maps hold, and the writes that change it.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher as _, Hash},
    net::IpAddr,
    sync::Arc,
};

use foldhash::HashMap;

use proxy_common::{DatapathConfig, Net6, ServiceValue, SlotKey, LOCAL_SLOTS, SVC_F_SOURCE_RANGES};

use super::{backends::Backends, slots::SlotTables};
use crate::control::{cidr::Cidr, model::FrontendKey};

/// A backend as the maps hold it. Host byte order, as everything above the
/// map layer: [`crate::dataplane::maps`] converts at the boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// On this node (`BACKEND_F_LOCAL`).
    pub local: bool,
}

/// The node-wide settings: IPv4's `KPX_CONFIG` (whose flags and masquerade
/// ports serve both families) and IPv6's addresses (`KPX_CONFIG6`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    pub v4: DatapathConfig,
    pub v6: Net6,
}

/// What the control-plane maps hold (or will hold), in host byte order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: HashMap<FrontendKey, ServiceValue>,
    pub slots: SlotTables,
    /// The backends the slots hold, by id, with how many slots hold each
    /// (kept by [`MapState::record`]; [`MapState::count_refs`] after a read).
    pub backends: Backends,
    /// Frontend address → number of frontends using it.
    pub addrs: HashMap<IpAddr, u32>,
    /// Service id → service port name, for `kpx dump` (shared with the
    /// frontend's).
    pub names: HashMap<u32, Arc<str>>,
    /// Service id → its `loadBalancerSourceRanges` (host bits cleared).
    pub ranges: HashMap<u32, BTreeSet<Cidr>>,
    /// This node's addresses → `NODE_F_*`.
    pub node_addrs: HashMap<IpAddr, u32>,
    /// The node-wide settings (None: never read or written).
    pub config: Option<NodeConfig>,
}

/// The slot numbers of a frontend's tables: cluster-wide, then node-local.
pub fn slot_numbers(v: &ServiceValue) -> impl Iterator<Item = u32> {
    (0..v.count).chain((0..v.local_count).map(|i| LOCAL_SLOTS + i))
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A new backend id. The kernel holds backends in the slots that name
    /// them, so this writes no map: it is the id's allocation, recorded
    /// first so every later slot write finds it.
    PutBackend(u32, BackendAddr),
    /// Zero the per-CPU statistics of a newly allocated service id.
    ResetStats(u32),
    /// A slot and the backend it holds: its id, and the backend whole (the
    /// map's value, [`proxy_common::Slot`]).
    PutSlot(SlotKey, u32, BackendAddr),
    PutService(FrontendKey, ServiceValue),
    PutAddr(IpAddr, u32),
    PutName(u32, Arc<str>),
    PutRange(u32, Cidr),
    DelService(FrontendKey),
    DelSlot(SlotKey),
    /// A backend id no slot holds any more: its connection count goes.
    DelBackend(u32),
    DelAddr(IpAddr),
    DelName(u32),
    DelRange(u32, Cidr),
    PutNodeAddr(IpAddr, u32),
    DelNodeAddr(IpAddr),
    SetConfig(NodeConfig),
}

impl Op {
    /// Whether it reaches the kernel: every write but a backend id's
    /// allocation ([`Op::PutBackend`]), which only the mirror records.
    pub fn writes_map(&self) -> bool {
        !matches!(self, Op::PutBackend(..))
    }
}

/// One entry's share of [`MapState::fingerprint`]: its map and its key and
/// value, hashed.
pub(super) fn entry_hash(map: u8, entry: impl Hash) -> u64 {
    // Fixed: a fingerprint is compared across reads of the maps.
    foldhash::quality::FixedState::with_seed(0x6b70_785f_6670).hash_one((map, entry))
}

/// Which entry it is, for [`super::Digest`]: its map and its key, hashed.
pub(super) fn key_hash(map: u8, key: impl Hash) -> u64 {
    foldhash::quality::FixedState::with_seed(0x6b70_785f_6b65).hash_one((map, key))
}

/// The fingerprinted maps, by their number in [`entry_hash`].
pub(super) mod fp_map {
    pub const SERVICES: u8 = 0;
    pub const SLOTS: u8 = 1;
    pub const BACKENDS: u8 = 2;
    pub const ADDRS: u8 = 3;
    pub const NAMES: u8 = 4;
    pub const RANGES: u8 = 5;
    pub const NODE_ADDRS: u8 = 6;
    pub const CONFIG: u8 = 7;
}

/// An entry as `(key hash, entry hash)`.
pub(super) fn fingerprint_entry<K: Hash, V: Hash>(map: u8, k: &K, v: &V) -> (u64, u64) {
    (key_hash(map, k), entry_hash(map, (k, v)))
}

impl Op {
    /// The entry this write sets, as `(key hash, entry hash)` with 0 for a
    /// delete; None for a write of no fingerprinted entry.
    pub fn fingerprint_entry(&self) -> Option<(u64, u64)> {
        use fp_map::*;
        Some(match self {
            Op::PutService(k, v) => fingerprint_entry(SERVICES, k, v),
            Op::DelService(k) => (key_hash(SERVICES, k), 0),
            Op::PutSlot(k, id, _) => fingerprint_entry(SLOTS, k, id),
            Op::DelSlot(k) => (key_hash(SLOTS, k), 0),
            Op::PutBackend(id, b) => fingerprint_entry(BACKENDS, id, b),
            Op::DelBackend(id) => (key_hash(BACKENDS, id), 0),
            Op::PutAddr(a, n) => fingerprint_entry(ADDRS, a, n),
            Op::DelAddr(a) => (key_hash(ADDRS, a), 0),
            Op::PutName(id, n) => fingerprint_entry(NAMES, id, n),
            Op::DelName(id) => (key_hash(NAMES, id), 0),
            Op::PutRange(id, r) => fingerprint_entry(RANGES, &(id, r), &()),
            Op::DelRange(id, r) => (key_hash(RANGES, (id, r)), 0),
            Op::PutNodeAddr(a, f) => fingerprint_entry(NODE_ADDRS, a, f),
            Op::DelNodeAddr(a) => (key_hash(NODE_ADDRS, a), 0),
            Op::SetConfig(c) => fingerprint_entry(CONFIG, &(), c),
            Op::ResetStats(_) => return None,
        })
    }
}

impl MapState {
    /// Every entry as `(key hash, entry hash)`.
    pub fn fingerprint_entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        use fp_map::*;
        fn all<'a, K: Hash, V: Hash>(
            map: u8,
            m: &'a HashMap<K, V>,
        ) -> impl Iterator<Item = (u64, u64)> + 'a {
            m.iter().map(move |(k, v)| fingerprint_entry(map, k, v))
        }
        all(SERVICES, &self.services)
            .chain(
                self.slots
                    .iter()
                    .map(|(k, id)| fingerprint_entry(SLOTS, &k, &id)),
            )
            .chain(
                self.backends
                    .iter()
                    .map(|(id, b)| fingerprint_entry(BACKENDS, id, b)),
            )
            .chain(all(ADDRS, &self.addrs))
            .chain(all(NAMES, &self.names))
            .chain(self.ranges.iter().flat_map(|(id, set)| {
                set.iter()
                    .map(move |r| fingerprint_entry(RANGES, &(id, r), &()))
            }))
            .chain(all(NODE_ADDRS, &self.node_addrs))
            .chain(
                self.config
                    .iter()
                    .map(|c| fingerprint_entry(CONFIG, &(), c)),
            )
    }

    /// The wrapping sum of every entry's hash: equal states have equal
    /// fingerprints, and a write changes it by the old and new hashes of
    /// the one entry it writes ([`MapState::record_fingerprinted`]). So a
    /// running fingerprint costs nothing per write, and telling whether a
    /// read of the maps holds what the agent wrote costs one comparison
    /// instead of a walk of a million entries on the event loop.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint_entries()
            .fold(0u64, |fp, (_, e)| fp.wrapping_add(e))
    }

    /// The hash of the entry `op` writes, as this state holds it (0: none).
    fn written_entry_hash(&self, op: &Op) -> u64 {
        use fp_map::*;
        fn get<K: Hash + Eq, V: Hash>(map: u8, m: &HashMap<K, V>, k: &K) -> u64 {
            m.get_key_value(k).map_or(0, |e| entry_hash(map, e))
        }
        match op {
            Op::PutService(k, _) | Op::DelService(k) => get(SERVICES, &self.services, k),
            Op::PutSlot(k, ..) | Op::DelSlot(k) => self
                .slots
                .get(k)
                .map_or(0, |id| entry_hash(SLOTS, (k, &id))),
            Op::PutBackend(id, _) | Op::DelBackend(id) => self
                .backends
                .get_key_value(id)
                .map_or(0, |e| entry_hash(BACKENDS, e)),
            Op::PutAddr(a, _) | Op::DelAddr(a) => get(ADDRS, &self.addrs, a),
            Op::PutName(id, _) | Op::DelName(id) => get(NAMES, &self.names, id),
            Op::PutRange(id, r) | Op::DelRange(id, r) => match self.ranges.get(id) {
                Some(set) if set.contains(r) => entry_hash(RANGES, (&(id, r), &())),
                _ => 0,
            },
            Op::PutNodeAddr(a, _) | Op::DelNodeAddr(a) => get(NODE_ADDRS, &self.node_addrs, a),
            Op::SetConfig(_) => self
                .config
                .as_ref()
                .map_or(0, |c| entry_hash(CONFIG, (&(), c))),
            Op::ResetStats(_) => 0,
        }
    }

    /// Records `op`, keeping `fingerprint` (this state's) up to date.
    pub fn record_fingerprinted(&mut self, op: &Op, fingerprint: &mut u64) {
        let before = self.written_entry_hash(op);
        self.record(op);
        *fingerprint = fingerprint
            .wrapping_sub(before)
            .wrapping_add(self.written_entry_hash(op));
    }

    /// How many entries differ between `self` and `other` (present in one
    /// only, or with another value), over every map: 0 when they hold the
    /// same.
    pub fn differences(&self, other: &MapState) -> usize {
        fn map<K: Eq + std::hash::Hash, V: PartialEq>(
            a: &HashMap<K, V>,
            b: &HashMap<K, V>,
        ) -> usize {
            let changed = a.iter().filter(|(k, v)| b.get(k) != Some(v)).count();
            changed + b.keys().filter(|k| !a.contains_key(k)).count()
        }
        let ranges = |a: &Self, b: &Self| -> usize {
            a.ranges
                .iter()
                .map(|(id, set)| {
                    let theirs = b.ranges.get(id);
                    set.iter()
                        .filter(|r| !theirs.is_some_and(|t| t.contains(r)))
                        .count()
                })
                .sum()
        };
        // As `map`, for the two tables that are not hash maps.
        let slots = |a: &SlotTables, b: &SlotTables| {
            a.iter().filter(|(k, id)| b.get(k) != Some(id)).count()
                + b.keys().filter(|k| !a.contains_key(k)).count()
        };
        let backends = |a: &Backends, b: &Backends| {
            a.iter().filter(|(id, x)| b.get(id) != Some(*x)).count()
                + b.keys().filter(|id| !a.contains_key(id)).count()
        };
        map(&self.services, &other.services)
            + slots(&self.slots, &other.slots)
            + backends(&self.backends, &other.backends)
            + map(&self.addrs, &other.addrs)
            + map(&self.names, &other.names)
            + map(&self.node_addrs, &other.node_addrs)
            + ranges(self, other)
            + ranges(other, self)
            + usize::from(self.config != other.config)
    }

    /// Records a successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::ResetStats(_) => {}
            Op::PutSlot(k, id, _) => {
                let old = self.slots.insert(*k, *id);
                if old != Some(*id) {
                    if let Some(old) = old {
                        self.backends.unref(old);
                    }
                    self.backends.add_ref(*id);
                }
            }
            Op::PutService(k, v) => {
                self.services.insert(*k, *v);
                self.slots.shrink(v.svc_id);
            }
            Op::PutAddr(a, n) => {
                self.addrs.insert(*a, *n);
            }
            Op::PutName(id, n) => {
                self.names.insert(*id, n.clone());
            }
            Op::DelService(k) => {
                self.services.remove(k);
            }
            Op::DelSlot(k) => {
                if let Some(old) = self.slots.remove(k) {
                    self.backends.unref(old);
                }
            }
            Op::DelBackend(id) => {
                self.backends.remove(id);
            }
            Op::DelAddr(a) => {
                self.addrs.remove(a);
            }
            Op::DelName(id) => {
                self.names.remove(id);
            }
            Op::PutNodeAddr(a, f) => {
                self.node_addrs.insert(*a, *f);
            }
            Op::DelNodeAddr(a) => {
                self.node_addrs.remove(a);
            }
            Op::SetConfig(c) => self.config = Some(*c),
            Op::PutRange(id, r) => {
                self.ranges.entry(*id).or_default().insert(*r);
            }
            Op::DelRange(id, r) => {
                if let Some(set) = self.ranges.get_mut(id) {
                    set.remove(r);
                    if set.is_empty() {
                        self.ranges.remove(id);
                    }
                }
            }
        }
    }

    /// Sets the backends' reference counts from the slots: after a read
    /// of the maps, which hold no counts.
    pub fn count_refs(&mut self) {
        let ids: Vec<u32> = self.slots.values().collect();
        self.backends.count_refs(ids.into_iter());
    }

    /// Every frontend with its backends as the datapath would select them,
    /// or the first inconsistency the datapath could trip over.
    pub fn view(&self) -> Result<BTreeMap<FrontendKey, Vec<BackendAddr>>, String> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.services {
            let mut backends = Vec::new();
            for slot in slot_numbers(v) {
                let key = SlotKey {
                    svc_id: v.svc_id,
                    slot,
                };
                let id = self
                    .slots
                    .get(&key)
                    .ok_or_else(|| format!("{k:?} slot {slot} missing"))?;
                let b = self
                    .backends
                    .get(id)
                    .ok_or_else(|| format!("{k:?} slot {slot}: backend {id} missing"))?;
                if slot < LOCAL_SLOTS {
                    backends.push(*b);
                }
            }
            if v.flags & SVC_F_SOURCE_RANGES != 0 && !self.ranges.contains_key(&v.svc_id) {
                return Err(format!("{k:?}: source ranges missing"));
            }
            if !self.addrs.contains_key(&k.addr) {
                return Err(format!("{k:?}: address not registered"));
            }
            backends.sort();
            out.insert(*k, backends);
        }
        Ok(out)
    }
}
