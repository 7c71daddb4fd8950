//! The sync engine: the minimal, ordered map writes that turn what the maps
//! hold into what the model wants.
//!
//! [`plan`] is pure. Its writes are ordered make-before-break, so that the
//! datapath is consistent after *every* single write, not only at the end:
//!
//! 1. new backends (and zeroed stats for new service ids);
//! 2. slots, which may now point at the new backends;
//! 3. new source ranges, addresses;
//! 4. service entries (new ones, changed counts or flags), names;
//! 5. removed services;
//! 6. slots no service can reach any more (removed services, shrunk counts);
//! 7. source ranges no service checks any more;
//! 8. backends no slot references any more;
//! 9. addresses no service uses any more.
//!
//! A frontend's slot tables are its cluster-wide one (`0..count`) and, with
//! a Local traffic policy, its node-local one (`LOCAL_SLOTS + 0..local_count`).
//!
//! So a live service never points at a missing slot or backend, and a sync
//! interrupted at any write (map full, agent killed) leaves a working
//! datapath that the next sync completes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proxy_common::{
    wire, Backend, ServiceKey, ServiceValue, SlotKey, LOCAL_SLOTS, SVC_F_SOURCE_RANGES,
};

use crate::{
    control::cidr::Cidr,
    control::model::{Desired, Endpoint, Frontend, FrontendKey},
};

/// Longest service name kept for `kpx dump` (bytes, NUL-padded in the map).
pub const NAME_LEN: usize = proxy_common::SERVICE_NAME_LEN;

/// What the control-plane maps hold (or will hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub slots: HashMap<SlotKey, u32>,
    pub backends: HashMap<u32, Backend>,
    /// Frontend address → number of frontends using it.
    pub addrs: HashMap<u32, u32>,
    /// Service id → service port name, for `kpx dump`.
    pub names: HashMap<u32, String>,
    /// Service id → its `loadBalancerSourceRanges` (host bits cleared).
    pub ranges: HashMap<u32, BTreeSet<Cidr>>,
}

/// The slot numbers of a frontend's tables: cluster-wide, then node-local.
pub fn slot_numbers(v: &ServiceValue) -> impl Iterator<Item = u32> {
    (0..v.count).chain((0..v.local_count).map(|i| LOCAL_SLOTS + i))
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    /// Zero the per-CPU statistics of a newly allocated service id.
    ResetStats(u32),
    PutSlot(SlotKey, u32),
    PutService(ServiceKey, ServiceValue),
    PutAddr(u32, u32),
    PutName(u32, String),
    PutRange(u32, Cidr),
    DelService(ServiceKey),
    DelSlot(SlotKey),
    DelBackend(u32),
    DelAddr(u32),
    DelName(u32),
    DelRange(u32, Cidr),
}

impl MapState {
    /// Records a successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::ResetStats(_) => {}
            Op::PutSlot(k, id) => {
                self.slots.insert(*k, *id);
            }
            Op::PutService(k, v) => {
                self.services.insert(*k, *v);
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
                self.slots.remove(k);
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

    /// Every frontend with its backends as the datapath would select them,
    /// or the first inconsistency the datapath could trip over.
    pub fn view(&self) -> Result<BTreeMap<ServiceKey, Vec<Backend>>, String> {
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
            backends.sort_by_key(|b| (b.addr.to_be(), b.port, b.proto));
            out.insert(*k, backends);
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free service id below {0}: too many service ports for the statistics map")]
    OutOfServiceIds(u32),
}

/// The affinity id of a service port: its name's hash. Two service ports
/// sharing an id by chance stay correct: a record is only followed while
/// the frontend's own slot still holds the recorded backend.
pub fn affinity_id(service_port: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(service_port.as_bytes());
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

pub fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey {
        addr: wire::addr(k.addr),
        port: wire::port(k.port),
        proto: k.proto,
        _pad: 0,
    }
}

fn backend(e: &Endpoint, proto: u8) -> Backend {
    Backend {
        addr: wire::addr(e.addr),
        port: wire::port(e.port),
        proto,
        flags: 0,
    }
}

/// Lowest ids not `used`, from `next` on, lazily.
struct IdAlloc<'a> {
    used: &'a dyn Fn(u32) -> bool,
    next: u32,
    limit: u32,
}

impl IdAlloc<'_> {
    fn alloc(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if !(self.used)(id) {
                return Some(id);
            }
        }
        None
    }
}

/// The per-frontend half of [`reconcile`].
struct Planner<'a> {
    cur: &'a MapState,
    svc_ids: IdAlloc<'a>,
    max_svc_ids: u32,
    backend_ids: IdAlloc<'a>,
    backend_of: &'a dyn Fn(&Backend) -> Option<u32>,
    new_backend_of: HashMap<Backend, u32>,
    new_backends: Vec<Op>,
    resets: Vec<Op>,
    slot_writes: Vec<Op>,
    range_puts: Vec<Op>,
    service_writes: Vec<Op>,
    range_dels: Vec<Op>,
}

impl<'a> Planner<'a> {
    fn new(
        cur: &'a MapState,
        svc_used: &'a dyn Fn(u32) -> bool,
        max_svc_ids: u32,
        backend_used: &'a dyn Fn(u32) -> bool,
        backend_next: u32,
        backend_of: &'a dyn Fn(&Backend) -> Option<u32>,
    ) -> Self {
        Self {
            cur,
            svc_ids: IdAlloc {
                used: svc_used,
                next: 0,
                limit: max_svc_ids,
            },
            max_svc_ids,
            backend_ids: IdAlloc {
                used: backend_used,
                next: backend_next,
                limit: u32::MAX,
            },
            backend_of,
            new_backend_of: HashMap::new(),
            new_backends: Vec::new(),
            resets: Vec::new(),
            slot_writes: Vec::new(),
            range_puts: Vec::new(),
            service_writes: Vec::new(),
            range_dels: Vec::new(),
        }
    }

    /// Plans one desired frontend; returns its service id and slot tables
    /// (cluster-wide, node-local).
    fn frontend(&mut self, fk: &FrontendKey, frontend: &Frontend) -> Result<Planned, PlanError> {
        let cur = self.cur;
        let key = service_key(fk);
        let existing = cur.services.get(&key);
        let svc_id = match existing {
            Some(v) => v.svc_id,
            None => {
                let id = self
                    .svc_ids
                    .alloc()
                    .ok_or(PlanError::OutOfServiceIds(self.max_svc_ids))?;
                self.resets.push(Op::ResetStats(id));
                id
            }
        };
        let cluster = self.table(
            svc_id,
            0,
            existing.map_or(0, |v| v.count),
            &frontend.backends,
            fk.proto,
        );
        let local = self.table(
            svc_id,
            LOCAL_SLOTS,
            existing.map_or(0, |v| v.local_count),
            &frontend.local_backends,
            fk.proto,
        );
        let want: BTreeSet<Cidr> = if frontend.flags & SVC_F_SOURCE_RANGES != 0 {
            frontend.source_ranges.iter().map(Cidr::trunc).collect()
        } else {
            BTreeSet::new()
        };
        let empty = BTreeSet::new();
        let have = cur.ranges.get(&svc_id).unwrap_or(&empty);
        self.range_puts
            .extend(want.difference(have).map(|r| Op::PutRange(svc_id, *r)));
        self.range_dels
            .extend(have.difference(&want).map(|r| Op::DelRange(svc_id, *r)));
        let value = ServiceValue {
            svc_id,
            count: cluster.len() as u32,
            flags: frontend.flags,
            affinity_timeout: frontend.affinity_timeout,
            local_count: local.len() as u32,
            affinity_id: affinity_id(&frontend.name),
        };
        if existing != Some(&value) {
            self.service_writes.push(Op::PutService(key, value));
        }
        let name: String = truncate(&frontend.name);
        if cur.names.get(&svc_id) != Some(&name) {
            self.service_writes.push(Op::PutName(svc_id, name));
        }
        Ok(Planned {
            svc_id,
            cluster,
            local,
        })
    }

    /// Plans the slot table at `base` of `svc_id` (which held `old_count`
    /// slots) for `backends`; returns the backend id of each slot.
    fn table(
        &mut self,
        svc_id: u32,
        base: u32,
        old_count: u32,
        backends: &[Endpoint],
        proto: u8,
    ) -> Vec<u32> {
        let cur = self.cur;
        let mut wanted: Vec<u32> = Vec::with_capacity(backends.len());
        for e in backends {
            let b = backend(e, proto);
            let id = match (self.backend_of)(&b).or_else(|| self.new_backend_of.get(&b).copied()) {
                Some(id) => id,
                None => {
                    let id = self.backend_ids.alloc().unwrap_or(u32::MAX);
                    self.new_backend_of.insert(b, id);
                    self.new_backends.push(Op::PutBackend(id, b));
                    id
                }
            };
            wanted.push(id);
        }

        // Keep each surviving backend in the slot it has, to write as few
        // slots as possible; fill the other slots with the newcomers.
        let count = wanted.len() as u32;
        let current = |i: u32| {
            cur.slots
                .get(&SlotKey {
                    svc_id,
                    slot: base + i,
                })
                .copied()
        };
        let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
        let mut placed: BTreeSet<u32> = BTreeSet::new();
        let mut table: Vec<Option<u32>> = (0..count)
            .map(|i| {
                let id = current(i).filter(|id| {
                    i < old_count && wanted_set.contains(id) && !placed.contains(id)
                })?;
                placed.insert(id);
                Some(id)
            })
            .collect();
        let mut rest = wanted.iter().filter(|id| !placed.contains(id));
        for entry in table.iter_mut().filter(|e| e.is_none()) {
            *entry = rest.next().copied();
        }
        let table: Vec<u32> = table.into_iter().map(|id| id.unwrap_or(u32::MAX)).collect();
        for (i, id) in table.iter().enumerate() {
            if current(i as u32) != Some(*id) {
                let key = SlotKey {
                    svc_id,
                    slot: base + i as u32,
                };
                self.slot_writes.push(Op::PutSlot(key, *id));
            }
        }
        table
    }

    /// Everything up to the service entries, in make-before-break order.
    fn puts(&mut self, addr_puts: impl Iterator<Item = Op>) -> Vec<Op> {
        let mut ops = Vec::new();
        ops.append(&mut self.new_backends);
        ops.append(&mut self.resets);
        ops.append(&mut self.slot_writes);
        ops.append(&mut self.range_puts);
        ops.extend(addr_puts);
        ops.append(&mut self.service_writes);
        ops
    }
}

/// One planned frontend: its id and the backend id of each slot.
struct Planned {
    svc_id: u32,
    cluster: Vec<u32>,
    local: Vec<u32>,
}

impl Planned {
    /// Every (slot, backend id) of both tables.
    fn slots(&self) -> impl Iterator<Item = (SlotKey, u32)> + '_ {
        let at = |base: u32| {
            move |(i, id): (usize, &u32)| {
                (
                    SlotKey {
                        svc_id: self.svc_id,
                        slot: base + i as u32,
                    },
                    *id,
                )
            }
        };
        (self.cluster.iter().enumerate().map(at(0)))
            .chain(self.local.iter().enumerate().map(at(LOCAL_SLOTS)))
    }
}

fn frontend_key(k: &ServiceKey) -> FrontendKey {
    FrontendKey {
        addr: wire::to_addr(k.addr),
        port: wire::to_port(k.port),
        proto: k.proto,
    }
}

/// The maps' state plus the indexes that let [`reconcile`] work in time
/// proportional to the change, not to the number of services.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    pub state: MapState,
    /// Backend → its id.
    backend_of: HashMap<Backend, u32>,
    /// Backend id → slots holding it.
    refs: HashMap<u32, u32>,
    svc_ids: HashSet<u32>,
    /// Above every backend id ever used here: new ids start there.
    backend_next: u32,
}

impl Mirror {
    pub fn new(state: MapState) -> Self {
        let mut m = Self {
            backend_of: state.backends.iter().map(|(id, b)| (*b, *id)).collect(),
            svc_ids: state.services.values().map(|v| v.svc_id).collect(),
            backend_next: state
                .backends
                .keys()
                .max()
                .map_or(0, |m| m.saturating_add(1)),
            ..Self::default()
        };
        for id in state.slots.values() {
            *m.refs.entry(*id).or_default() += 1;
        }
        m.state = state;
        m
    }

    /// Records a successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                if let Some(old) = self.state.backends.get(id) {
                    self.backend_of.remove(old);
                }
                self.backend_of.insert(*b, *id);
                self.backend_next = self.backend_next.max(id.saturating_add(1));
            }
            Op::DelBackend(id) => {
                if let Some(b) = self.state.backends.get(id) {
                    if self.backend_of.get(b) == Some(id) {
                        self.backend_of.remove(b);
                    }
                }
            }
            Op::PutSlot(k, id) => {
                if let Some(old) = self.state.slots.get(k) {
                    self.unref(*old);
                }
                *self.refs.entry(*id).or_default() += 1;
            }
            Op::DelSlot(k) => {
                if let Some(old) = self.state.slots.get(k) {
                    self.unref(*old);
                }
            }
            Op::PutService(k, v) => {
                if let Some(old) = self.state.services.get(k) {
                    self.svc_ids.remove(&old.svc_id);
                }
                self.svc_ids.insert(v.svc_id);
            }
            Op::DelService(k) => {
                if let Some(old) = self.state.services.get(k) {
                    self.svc_ids.remove(&old.svc_id);
                }
            }
            _ => {}
        }
        self.state.record(op);
    }

    fn unref(&mut self, id: u32) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
            }
        }
    }
}

/// Which frontends a reconcile covers.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every frontend, and a prune of whatever none of them reaches (slots,
    /// ranges, backends, addresses and names left by an interrupted sync or
    /// edited behind kpx's back): the first sync, a resync, the sync after
    /// a failed write. Time proportional to the maps.
    All,
    /// These frontends (and what only they reach), in time proportional to
    /// them. Valid when the mirror is converged for every other frontend,
    /// i.e. after any reconcile whose writes all succeeded.
    Touched(&'a BTreeSet<FrontendKey>),
}

/// The writes that make the frontends of `scope` (and what only they reach)
/// equal to `desired`, ordered make-before-break.
///
/// Ids are never reused within one reconcile: a service id or backend id
/// freed by it is still live until its deletion near the end, so giving it
/// to a new service or backend earlier would redirect live traffic.
pub fn reconcile(
    m: &Mirror,
    desired: &Desired,
    scope: Scope<'_>,
    max_svc_ids: u32,
) -> Result<Vec<Op>, PlanError> {
    let cur = &m.state;
    let every: BTreeSet<FrontendKey>;
    let keys = match scope {
        Scope::Touched(t) => t,
        Scope::All => {
            every = desired
                .frontends
                .keys()
                .copied()
                .chain(cur.services.keys().map(frontend_key))
                .collect();
            &every
        }
    };
    let svc_used = |id: u32| m.svc_ids.contains(&id);
    let backend_used = |id: u32| cur.backends.contains_key(&id);
    let backend_of = |b: &Backend| m.backend_of.get(b).copied();
    let mut p = Planner::new(
        cur,
        &svc_used,
        max_svc_ids,
        &backend_used,
        m.backend_next,
        &backend_of,
    );
    // Per frontend: what it writes, and what it stops using (as deltas on
    // the mirror's reference counts).
    let mut ref_delta: BTreeMap<u32, i64> = BTreeMap::new();
    let mut addr_delta: BTreeMap<u32, i64> = BTreeMap::new();
    let mut removed = Vec::new();
    let mut dead_slots = Vec::new();
    let mut dead_names = Vec::new();
    let mut dead_ranges = Vec::new();
    // What the covered frontends use once the writes are done.
    let mut final_slots: HashMap<SlotKey, u32> = HashMap::new();
    let mut final_ids: HashSet<u32> = HashSet::new();
    for fk in keys {
        let key = service_key(fk);
        let existing = cur.services.get(&key);
        let old_slots: BTreeSet<u32> = existing.map(slot_numbers).into_iter().flatten().collect();
        let Some(frontend) = desired.frontends.get(fk) else {
            if let Some(v) = existing {
                removed.push(key);
                dead_names.push(v.svc_id);
                *addr_delta.entry(key.addr).or_default() -= 1;
                for slot in old_slots {
                    let k = SlotKey {
                        svc_id: v.svc_id,
                        slot,
                    };
                    if let Some(id) = cur.slots.get(&k) {
                        *ref_delta.entry(*id).or_default() -= 1;
                    }
                    dead_slots.push(k);
                }
                for r in cur.ranges.get(&v.svc_id).into_iter().flatten() {
                    dead_ranges.push(Op::DelRange(v.svc_id, *r));
                }
            }
            continue;
        };
        if existing.is_none() {
            *addr_delta.entry(key.addr).or_default() += 1;
        }
        let planned = p.frontend(fk, frontend)?;
        final_ids.insert(planned.svc_id);
        let mut kept = BTreeSet::new();
        for (k, id) in planned.slots() {
            kept.insert(k.slot);
            final_slots.insert(k, id);
            let old = cur.slots.get(&k).filter(|_| old_slots.contains(&k.slot));
            if old != Some(&id) {
                if let Some(old) = old {
                    *ref_delta.entry(*old).or_default() -= 1;
                }
                *ref_delta.entry(id).or_default() += 1;
            }
        }
        for slot in old_slots.difference(&kept) {
            let k = SlotKey {
                svc_id: planned.svc_id,
                slot: *slot,
            };
            if let Some(id) = cur.slots.get(&k) {
                *ref_delta.entry(*id).or_default() -= 1;
            }
            dead_slots.push(k);
        }
    }

    // Addresses: by delta on the mirror's counts, or (All) counted afresh.
    let (addr_puts, addr_dels): (Vec<Op>, Vec<Op>) = match scope {
        Scope::Touched(_) => {
            let fin = |a: &u32, d: &i64| i64::from(cur.addrs.get(a).copied().unwrap_or(0)) + d;
            let changed = || addr_delta.iter().filter(|(_, d)| **d != 0);
            (
                changed()
                    .filter(|(a, d)| fin(a, d) > 0)
                    .map(|(a, d)| Op::PutAddr(*a, fin(a, d) as u32))
                    .collect(),
                changed()
                    .filter(|(a, d)| fin(a, d) <= 0 && cur.addrs.contains_key(a))
                    .map(|(a, _)| Op::DelAddr(*a))
                    .collect(),
            )
        }
        Scope::All => {
            let mut refs: BTreeMap<u32, u32> = BTreeMap::new();
            for fk in desired.frontends.keys() {
                *refs.entry(wire::addr(fk.addr)).or_default() += 1;
            }
            (
                refs.iter()
                    .filter(|(a, n)| cur.addrs.get(a) != Some(n))
                    .map(|(a, n)| Op::PutAddr(*a, *n))
                    .collect(),
                unkept(cur.addrs.keys(), |a| refs.contains_key(a))
                    .map(Op::DelAddr)
                    .collect(),
            )
        }
    };
    let mut ops = p.puts(addr_puts.into_iter());
    removed.sort();
    ops.extend(removed.into_iter().map(Op::DelService));
    match scope {
        Scope::Touched(_) => {
            dead_slots.sort();
            ops.extend(dead_slots.into_iter().map(Op::DelSlot));
            ops.append(&mut p.range_dels);
            ops.append(&mut dead_ranges);
            ops.extend(
                ref_delta
                    .iter()
                    .filter(|(id, d)| {
                        cur.backends.contains_key(id)
                            && i64::from(m.refs.get(id).copied().unwrap_or(0)) + **d <= 0
                    })
                    .map(|(id, _)| Op::DelBackend(*id)),
            );
            ops.extend(addr_dels);
            dead_names.sort();
            ops.extend(dead_names.into_iter().map(Op::DelName));
        }
        // The prune: what no frontend reaches once the writes are done,
        // removed frontends' included, in a deterministic order.
        Scope::All => {
            ops.extend(unkept(cur.slots.keys(), |k| final_slots.contains_key(k)).map(Op::DelSlot));
            ops.append(&mut p.range_dels);
            for id in unkept(cur.ranges.keys(), |id| final_ids.contains(id)) {
                ops.extend(cur.ranges[&id].iter().map(|r| Op::DelRange(id, *r)));
            }
            let referenced: HashSet<u32> = final_slots.values().copied().collect();
            ops.extend(
                unkept(cur.backends.keys(), |id| referenced.contains(id)).map(Op::DelBackend),
            );
            ops.extend(addr_dels);
            ops.extend(unkept(cur.names.keys(), |id| final_ids.contains(id)).map(Op::DelName));
        }
    }
    Ok(ops)
}

/// UDP backends that leave their frontend when `cur` becomes `desired`, as
/// (svc_id, address, port) in wire order: their conntrack entries must go,
/// or a long-running UDP client keeps sending into the void (the reference
/// runs `conntrack -D` for them). A removed frontend loses all its backends.
/// Looks at the frontends of `scope` only.
pub fn stale_udp(cur: &MapState, desired: &Desired, scope: Scope<'_>) -> HashSet<(u32, u32, u16)> {
    let keys: Vec<ServiceKey> = match scope {
        Scope::All => cur.services.keys().copied().collect(),
        Scope::Touched(t) => t.iter().map(service_key).collect(),
    };
    let mut out = HashSet::new();
    for k in keys {
        let Some(v) = cur.services.get(&k) else {
            continue;
        };
        let k = &k;
        if k.proto != proxy_common::IPPROTO_UDP {
            continue;
        }
        let fk = FrontendKey {
            addr: wire::to_addr(k.addr),
            port: wire::to_port(k.port),
            proto: k.proto,
        };
        let kept: HashSet<Backend> = desired
            .frontends
            .get(&fk)
            .map(|f| {
                f.backends
                    .iter()
                    .chain(&f.local_backends)
                    .map(|e| backend(e, k.proto))
                    .collect()
            })
            .unwrap_or_default();
        for slot in slot_numbers(v) {
            let b = cur
                .slots
                .get(&SlotKey {
                    svc_id: v.svc_id,
                    slot,
                })
                .and_then(|id| cur.backends.get(id));
            if let Some(b) = b.filter(|b| !kept.contains(b)) {
                out.insert((v.svc_id, b.addr, b.port));
            }
        }
    }
    out
}

/// The keys `keep` rejects, sorted.
fn unkept<'a, K: Ord + Copy + 'a>(
    keys: impl Iterator<Item = &'a K>,
    keep: impl Fn(&K) -> bool,
) -> std::vec::IntoIter<K> {
    let mut v: Vec<K> = keys.filter(|k| !keep(k)).copied().collect();
    v.sort();
    v.into_iter()
}

fn truncate(name: &str) -> String {
    if name.len() <= NAME_LEN {
        return name.to_string();
    }
    let mut end = NAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

    /// A full reconcile from what the maps hold (as after a re-read).
    fn full(state: &MapState, d: &Desired, max: u32) -> Result<Vec<Op>, PlanError> {
        reconcile(&Mirror::new(state.clone()), d, Scope::All, max)
    }

    /// (VIP, port, protocol, endpoints) per frontend.
    type Spec<'a> = (&'a str, u16, u8, &'a [(&'a str, u16)]);

    fn desired(spec: &[Spec]) -> Desired {
        let mut d = Desired::default();
        for (vip, port, proto, eps) in spec {
            d.frontends.insert(
                FrontendKey {
                    addr: vip.parse().unwrap(),
                    port: *port,
                    proto: *proto,
                },
                Frontend {
                    name: format!("ns/{vip}:{port}"),
                    backends: eps
                        .iter()
                        .map(|(a, p)| Endpoint {
                            addr: a.parse().unwrap(),
                            port: *p,
                        })
                        .collect(),
                    ..Frontend::default()
                },
            );
        }
        d
    }

    /// The datapath view `desired` should produce.
    fn expected_view(d: &Desired) -> BTreeMap<ServiceKey, Vec<Backend>> {
        d.frontends
            .iter()
            .map(|(k, f)| {
                let mut bs: Vec<Backend> = f.backends.iter().map(|e| backend(e, k.proto)).collect();
                bs.sort_by_key(|b| (b.addr.to_be(), b.port, b.proto));
                (service_key(k), bs)
            })
            .collect()
    }

    /// Applies `d` to `state` one write at a time, checking that the datapath
    /// is consistent after every write and that every service that exists
    /// before and after only ever selects old or new backends.
    fn converge(state: &mut MapState, d: &Desired) -> Vec<Op> {
        let ops = full(state, d, 1024).unwrap();
        let before = state.view().unwrap();
        let after = expected_view(d);
        for (i, op) in ops.iter().enumerate() {
            state.record(op);
            let view = state
                .view()
                .unwrap_or_else(|e| panic!("inconsistent after write {i} {op:?}: {e}\n{ops:#?}"));
            for (k, backends) in &view {
                if let (Some(old), Some(new)) = (before.get(k), after.get(k)) {
                    for b in backends {
                        assert!(old.contains(b) || new.contains(b), "{k:?} selects {b:?}");
                    }
                }
            }
        }
        assert_eq!(state.view().unwrap(), after);
        // Converged: nothing left to do, and nothing unreferenced left over.
        assert_eq!(full(state, d, 1024).unwrap(), vec![]);
        let used: HashSet<u32> = state.slots.values().copied().collect();
        assert!(
            state.backends.keys().all(|id| used.contains(id)),
            "leaked backends"
        );
        ops
    }

    const VIP: &str = "198.19.0.10";

    #[test]
    fn from_nothing_then_no_change_writes_nothing() {
        let mut s = MapState::default();
        let d = desired(&[(
            VIP,
            80,
            IPPROTO_TCP,
            &[("198.18.1.1", 8080), ("198.18.1.2", 8080)],
        )]);
        let ops = converge(&mut s, &d);
        // 2 backends, stats reset, 2 slots, address, service, name.
        assert_eq!(ops.len(), 8, "{ops:#?}");
    }

    #[test]
    fn one_endpoint_added_is_three_writes() {
        let mut s = MapState::default();
        converge(
            &mut s,
            &desired(&[(VIP, 80, IPPROTO_TCP, &[("198.18.1.1", 8080)])]),
        );
        let ops = converge(
            &mut s,
            &desired(&[(
                VIP,
                80,
                IPPROTO_TCP,
                &[("198.18.1.1", 8080), ("198.18.1.2", 8080)],
            )]),
        );
        assert!(matches!(ops[0], Op::PutBackend(..)));
        assert!(matches!(ops[1], Op::PutSlot(SlotKey { slot: 1, .. }, _)));
        assert!(matches!(
            ops[2],
            Op::PutService(_, ServiceValue { count: 2, .. })
        ));
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn one_endpoint_removed_keeps_the_others_in_their_slots() {
        let mut s = MapState::default();
        let three = [
            ("198.18.1.1", 8080),
            ("198.18.1.2", 8080),
            ("198.18.1.3", 8080),
        ];
        converge(&mut s, &desired(&[(VIP, 80, IPPROTO_TCP, &three)]));
        let ops = converge(
            &mut s,
            &desired(&[(VIP, 80, IPPROTO_TCP, &[three[0], three[2]])]),
        );
        // Slot 1 gets backend 3; count shrinks; slot 2 and backend 2 go.
        assert_eq!(ops.len(), 4, "{ops:#?}");
        assert!(matches!(ops[3], Op::DelBackend(_)));
    }

    #[test]
    fn shared_backends_are_written_once_and_kept_while_used() {
        let mut s = MapState::default();
        let eps: &[(&str, u16)] = &[("198.18.1.1", 8080)];
        converge(
            &mut s,
            &desired(&[
                (VIP, 80, IPPROTO_TCP, eps),
                ("198.19.0.11", 80, IPPROTO_TCP, eps),
            ]),
        );
        assert_eq!(s.backends.len(), 1);
        converge(&mut s, &desired(&[("198.19.0.11", 80, IPPROTO_TCP, eps)]));
        assert_eq!(s.backends.len(), 1);
        assert_eq!(s.addrs.len(), 1);
        assert_eq!(s.names.len(), 1);
    }

    #[test]
    fn ids_freed_by_a_plan_are_not_reused_by_it() {
        let mut s = MapState::default();
        converge(
            &mut s,
            &desired(&[(VIP, 80, IPPROTO_TCP, &[("198.18.1.1", 8080)])]),
        );
        let old_id = s.services.values().next().unwrap().svc_id;
        // Replace the service and its backend in one plan.
        converge(
            &mut s,
            &desired(&[("198.19.0.12", 80, IPPROTO_TCP, &[("198.18.1.9", 8080)])]),
        );
        assert_ne!(s.services.values().next().unwrap().svc_id, old_id);
    }

    #[test]
    fn running_out_of_service_ids_is_an_error_not_a_panic() {
        let d = desired(&[(VIP, 80, IPPROTO_TCP, &[]), (VIP, 81, IPPROTO_TCP, &[])]);
        assert_eq!(
            full(&MapState::default(), &d, 1),
            Err(PlanError::OutOfServiceIds(1))
        );
    }

    mod random {
        //! Randomized (with shrinking): whatever the changes, every write
        //! leaves a consistent datapath, and a touched reconcile leaves
        //! nothing for a full one to do.

        use proptest::{collection, prelude::*};

        use super::*;
        use crate::control::cidr::Cidr;

        /// 30 frontends: TCP :80 and UDP :53 on 15 addresses.
        fn key(i: u8) -> FrontendKey {
            FrontendKey {
                addr: std::net::Ipv4Addr::new(198, 19, 0, i / 2 + 1),
                port: if i.is_multiple_of(2) { 80 } else { 53 },
                proto: if i.is_multiple_of(2) {
                    IPPROTO_TCP
                } else {
                    IPPROTO_UDP
                },
            }
        }

        fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
            collection::btree_set(1..=12u8, 0..5).prop_map(|s| {
                s.into_iter()
                    .map(|h| Endpoint {
                        addr: std::net::Ipv4Addr::new(198, 18, 1, h),
                        port: 8080,
                    })
                    .collect()
            })
        }

        /// Half with a Local policy (a second slot table), a third with
        /// source ranges.
        fn frontend() -> impl Strategy<Value = Frontend> {
            let range = (0..4u8, 14..=24u8).prop_map(|(n, len)| {
                Cidr::new(std::net::Ipv4Addr::new(198, 18, n, 7), len).expect("len <= 32")
            });
            (
                endpoints(),
                any::<bool>(),
                endpoints(),
                prop::bool::weighted(1.0 / 3.0),
                collection::vec(range, 1..=3),
                0..2u32,
            )
                .prop_map(
                    |(backends, local, local_eps, ranged, source_ranges, aff)| Frontend {
                        name: format!("f{}", backends.len()),
                        backends,
                        local_backends: if local { local_eps } else { Vec::new() },
                        flags: if local { proxy_common::SVC_F_LOCAL } else { 0 }
                            | if ranged { SVC_F_SOURCE_RANGES } else { 0 },
                        source_ranges,
                        affinity_timeout: aff,
                    },
                )
        }

        fn desired_of() -> impl Strategy<Value = Desired> {
            collection::btree_map(0..30u8, frontend(), 0..20).prop_map(|m| Desired {
                frontends: m.into_iter().map(|(i, f)| (key(i), f)).collect(),
            })
        }

        /// A batch of changes: a frontend replaced, or (one in four) removed.
        fn batch() -> impl Strategy<Value = Vec<(u8, Option<Frontend>)>> {
            collection::vec((0..30u8, prop::option::weighted(0.75, frontend())), 1..=4)
        }

        /// Applies `ops` one at a time: consistent after each, and a service
        /// alive before and after only ever selects old or new backends.
        fn apply(m: &mut Mirror, ops: &[Op], after: &BTreeMap<ServiceKey, Vec<Backend>>) {
            let before = m.state.view().expect("consistent before");
            for (n, op) in ops.iter().enumerate() {
                m.record(op);
                let view = m.state.view().unwrap_or_else(|e| {
                    panic!("inconsistent after write {n} {op:?}: {e}\n{ops:#?}")
                });
                for (k, backends) in &view {
                    if let (Some(old), Some(new)) = (before.get(k), after.get(k)) {
                        for b in backends {
                            assert!(old.contains(b) || new.contains(b), "{k:?} selects {b:?}");
                        }
                    }
                }
            }
            assert_eq!(&m.state.view().expect("consistent"), after);
        }

        proptest! {
            #[test]
            fn full_reconciles_converge_from_any_previous_state(
                steps in collection::vec(desired_of(), 1..8),
            ) {
                let mut m = Mirror::default();
                for d in &steps {
                    let ops = reconcile(&m, d, Scope::All, 1024).unwrap();
                    apply(&mut m, &ops, &expected_view(d));
                    m = Mirror::new(m.state.clone());
                    prop_assert_eq!(reconcile(&m, d, Scope::All, 1024).unwrap(), vec![]);
                    let used: HashSet<u32> = m.state.slots.values().copied().collect();
                    prop_assert!(m.state.backends.keys().all(|id| used.contains(id)), "leaked backends");
                }
            }

            #[test]
            fn touched_reconciles_leave_nothing_for_a_full_one(
                start in desired_of(),
                batches in collection::vec(batch(), 1..40),
            ) {
                let mut d = start;
                let mut m = Mirror::default();
                let ops = reconcile(&m, &d, Scope::All, 1024).unwrap();
                apply(&mut m, &ops, &expected_view(&d));
                for changes in batches {
                    let mut touched = BTreeSet::new();
                    for (i, f) in changes {
                        touched.insert(key(i));
                        match f {
                            Some(f) => d.frontends.insert(key(i), f),
                            None => d.frontends.remove(&key(i)),
                        };
                    }
                    let ops = reconcile(&m, &d, Scope::Touched(&touched), 1024).unwrap();
                    apply(&mut m, &ops, &expected_view(&d));
                    prop_assert_eq!(reconcile(&m, &d, Scope::All, 1024).unwrap(), vec![], "{:#?}", ops);
                    // The mirror's indexes, kept write by write, equal fresh ones.
                    let fresh = Mirror::new(m.state.clone());
                    prop_assert_eq!(
                        (&fresh.refs, &fresh.backend_of, &fresh.svc_ids),
                        (&m.refs, &m.backend_of, &m.svc_ids)
                    );
                }
            }

            #[test]
            fn a_full_reconcile_prunes_what_no_frontend_reaches(
                d in desired_of(),
                stray_ids in collection::btree_set(900..920u32, 1..4),
            ) {
                let mut m = Mirror::default();
                let ops = reconcile(&m, &d, Scope::All, 1024).unwrap();
                apply(&mut m, &ops, &expected_view(&d));
                // Leftovers of an interrupted sync or of hands on the maps.
                let mut state = m.state.clone();
                for id in &stray_ids {
                    state.slots.insert(SlotKey { svc_id: *id, slot: 0 }, *id);
                    state.backends.insert(*id, Backend { addr: *id, port: 1, proto: IPPROTO_TCP, flags: 0 });
                    state.names.insert(*id, "gone".into());
                    state.ranges.entry(*id).or_default().insert("198.18.0.0/15".parse().unwrap());
                    state.addrs.insert(*id, 1);
                }
                let mut m = Mirror::new(state);
                let ops = reconcile(&m, &d, Scope::All, 1024).unwrap();
                apply(&mut m, &ops, &expected_view(&d));
                let clean = Mirror::new(MapState::default());
                let mut fresh = clean.clone();
                let ops = reconcile(&clean, &d, Scope::All, 1024).unwrap();
                for op in &ops {
                    fresh.record(op);
                }
                prop_assert_eq!(m.state.slots.len(), fresh.state.slots.len());
                prop_assert_eq!(m.state.backends.len(), fresh.state.backends.len());
                prop_assert_eq!(m.state.names.len(), fresh.state.names.len());
                prop_assert_eq!(m.state.ranges.len(), fresh.state.ranges.len());
                prop_assert_eq!(&m.state.addrs, &fresh.state.addrs);
            }
        }
    }
}
