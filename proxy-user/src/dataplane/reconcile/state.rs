//! What the control-plane maps hold, and the writes that change it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proxy_common::{Backend, ServiceKey, ServiceValue, SlotKey, LOCAL_SLOTS, SVC_F_SOURCE_RANGES};

use crate::control::cidr::Cidr;

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
