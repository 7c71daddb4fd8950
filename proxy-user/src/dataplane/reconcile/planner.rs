//! The per-frontend half of a reconcile: ids, slot tables, ranges and the
//! service entry of one frontend, the writes kept in make-before-break
//! groups until [`Planner::puts`] orders them.

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt as _};

use proxy_common::{ServiceValue, SlotKey, LOCAL_SLOTS, SVC_F_SOURCE_RANGES};

use crate::{
    control::cidr::Cidr,
    control::model::{Endpoint, Frontend, FrontendKey},
    control::scheduler::Scheduler,
};

use super::{affinity_id, backend, maglev, truncate, BackendAddr, MapState, Op, PlanError};

/// Lowest ids not `used`, from `next` on, lazily.
pub(super) struct IdAlloc<'a> {
    pub(super) used: &'a dyn Fn(u32) -> bool,
    pub(super) next: u32,
    pub(super) limit: u32,
}

impl IdAlloc<'_> {
    pub(super) fn alloc(&mut self) -> Option<u32> {
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
pub(super) struct Planner<'a> {
    pub(super) cur: &'a MapState,
    pub(super) svc_ids: IdAlloc<'a>,
    pub(super) max_svc_ids: u32,
    pub(super) backend_ids: IdAlloc<'a>,
    pub(super) backend_of: &'a dyn Fn(&BackendAddr) -> Option<u32>,
    pub(super) new_backend_of: HashMap<BackendAddr, u32>,
    pub(super) new_backends: Vec<Op>,
    pub(super) resets: Vec<Op>,
    pub(super) slot_writes: Vec<Op>,
    pub(super) range_puts: Vec<Op>,
    pub(super) service_writes: Vec<Op>,
    pub(super) name_writes: Vec<Op>,
    pub(super) range_dels: Vec<Op>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(
        cur: &'a MapState,
        svc_used: &'a dyn Fn(u32) -> bool,
        max_svc_ids: u32,
        backend_used: &'a dyn Fn(u32) -> bool,
        backend_next: u32,
        backend_of: &'a dyn Fn(&BackendAddr) -> Option<u32>,
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
            name_writes: Vec::new(),
            range_dels: Vec::new(),
        }
    }

    /// Plans one desired frontend; returns its service id and slot tables
    /// (cluster-wide, node-local).
    /// Room for a first sync's writes of `frontends` frontends and
    /// `endpoints` backends in all: sized once instead of grown by
    /// doubling (the new backends' map rehashed half a million entries).
    pub(super) fn reserve(&mut self, frontends: usize, endpoints: usize) {
        self.new_backend_of.reserve(endpoints);
        self.new_backends.reserve(endpoints);
        self.slot_writes.reserve(endpoints);
        for v in [
            &mut self.resets,
            &mut self.service_writes,
            &mut self.name_writes,
        ] {
            v.reserve(frontends);
        }
    }

    pub(super) fn frontend(
        &mut self,
        fk: &FrontendKey,
        frontend: &Frontend,
    ) -> Result<Planned, PlanError> {
        let cur = self.cur;
        let key = *fk;
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
        let hashing = Scheduler::of_flags(frontend.flags).hashing();
        let cluster = self.table(
            svc_id,
            0,
            existing.map_or(0, |v| v.count),
            &frontend.backends,
            fk.proto,
            hashing,
        );
        let local = self.table(
            svc_id,
            LOCAL_SLOTS,
            existing.map_or(0, |v| v.local_count),
            &frontend.local_backends,
            fk.proto,
            hashing,
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
        let name = truncate(&frontend.name);
        if cur.names.get(&svc_id) != Some(&name) {
            self.name_writes.push(Op::PutName(svc_id, name));
        }
        Ok(Planned {
            svc_id,
            cluster,
            local,
        })
    }

    /// Plans the slot table at `base` of `svc_id` (which held `old_count`
    /// slots) for `backends`: one slot each, or with a hashing scheduler a
    /// Maglev table. Returns the backend id of each slot.
    pub(super) fn table(
        &mut self,
        svc_id: u32,
        base: u32,
        old_count: u32,
        backends: &[Endpoint],
        proto: u8,
        hashing: bool,
    ) -> Vec<u32> {
        let cur = self.cur;
        let mut wanted: Vec<u32> = Vec::with_capacity(backends.len());
        // Each id's backend, for the slots (which hold it whole): sorted by
        // id, a vector is cheaper to build and search than a hash map for a
        // table's handful of backends (at 50,000 Services, 100,000 maps).
        let mut addr_of: Vec<(u32, BackendAddr)> = Vec::with_capacity(backends.len());
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
            addr_of.push((id, b));
        }
        addr_of.sort_unstable_by_key(|e| e.0);

        // Keep each surviving backend in the slot it has, to write as few
        // slots as possible; fill the other slots with the newcomers.
        let current = |i: u32| {
            cur.slots
                .get(&SlotKey {
                    svc_id,
                    slot: base + i,
                })
                .copied()
        };
        let table = if hashing {
            // Laid out by the backends alone: what stays in place is
            // Maglev's to decide, the same on every node.
            let pairs: Vec<(BackendAddr, u32)> = backends
                .iter()
                .zip(&wanted)
                .map(|(e, id)| (backend(e, proto), *id))
                .collect();
            maglev::table(&pairs)
        } else if old_count == 0 {
            // A new table: nothing to keep in place.
            wanted
        } else {
            placed(&wanted, old_count, current)
        };
        for (i, id) in table.iter().enumerate() {
            if current(i as u32) != Some(*id) {
                let key = SlotKey {
                    svc_id,
                    slot: base + i as u32,
                };
                // Every id of the table is one of `wanted`'s.
                if let Ok(i) = addr_of.binary_search_by_key(id, |e| e.0) {
                    self.slot_writes.push(Op::PutSlot(key, *id, addr_of[i].1));
                }
            }
        }
        table
    }

    /// Everything up to the service entries, in make-before-break order.
    pub(super) fn puts(&mut self, addr_puts: impl Iterator<Item = Op>) -> Vec<Op> {
        // Grown from the first part, not copied into a new vector: a first
        // sync's plan is tens of megabytes, and each fresh page costs a
        // fault and its zeroing (a third of the CPU of a first sync's
        // update and planning at 50,000 Services, in a profile).
        let mut ops = std::mem::take(&mut self.new_backends);
        ops.reserve(
            self.resets.len()
                + self.slot_writes.len()
                + self.range_puts.len()
                + self.name_writes.len()
                + self.service_writes.len(),
        );
        ops.append(&mut self.resets);
        ops.append(&mut self.slot_writes);
        ops.append(&mut self.range_puts);
        ops.extend(addr_puts);
        // Names (for `kpx dump`) just before their frontends, each kind in
        // one run: a run of one map's writes is one batched call.
        ops.append(&mut self.name_writes);
        ops.append(&mut self.service_writes);
        ops
    }
}

/// `wanted` in slots: each backend that `current` has in one of the
/// first `old_count` slots stays there, the newcomers fill the rest.
fn placed(wanted: &[u32], old_count: u32, current: impl Fn(u32) -> Option<u32>) -> Vec<u32> {
    let count = wanted.len() as u32;
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let mut placed: BTreeSet<u32> = BTreeSet::new();
    let mut table: Vec<Option<u32>> = (0..count)
        .map(|i| {
            let id = current(i)
                .filter(|id| i < old_count && wanted_set.contains(id) && !placed.contains(id))?;
            placed.insert(id);
            Some(id)
        })
        .collect();
    let mut rest = wanted.iter().filter(|id| !placed.contains(id));
    for entry in table.iter_mut().filter(|e| e.is_none()) {
        *entry = rest.next().copied();
    }
    table.into_iter().map(|id| id.unwrap_or(u32::MAX)).collect()
}

/// One planned frontend: its id and the backend id of each slot.
pub(super) struct Planned {
    pub(super) svc_id: u32,
    pub(super) cluster: Vec<u32>,
    pub(super) local: Vec<u32>,
}

impl Planned {
    /// Every (slot, backend id) of both tables.
    pub(super) fn slots(&self) -> impl Iterator<Item = (SlotKey, u32)> + '_ {
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
