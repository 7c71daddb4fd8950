//! The sync engine: the minimal, ordered map writes that turn what the maps
//! hold into what the model wants.
//!
//! [`plan`] is pure. Its writes are ordered make-before-break, so that the
//! datapath is consistent after *every* single write, not only at the end:
//!
//! 1. new backends (and zeroed stats for new service ids);
//! 2. slots, which may now point at the new backends;
//! 3. service entries (new ones, and changed backend counts), addresses, names;
//! 4. removed services;
//! 5. slots no service can reach any more (removed services, shrunk counts);
//! 6. backends no slot references any more;
//! 7. addresses no service uses any more.
//!
//! So a live service never points at a missing slot or backend, and a sync
//! interrupted at any write (map full, agent killed) leaves a working
//! datapath that the next sync completes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proxy_common::{wire, Backend, ServiceKey, ServiceValue, SlotKey};

use crate::model::{Desired, Endpoint, FrontendKey};

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
    DelService(ServiceKey),
    DelSlot(SlotKey),
    DelBackend(u32),
    DelAddr(u32),
    DelName(u32),
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
        }
    }

    /// Every frontend with its backends as the datapath would select them,
    /// or the first inconsistency the datapath could trip over.
    pub fn view(&self) -> Result<BTreeMap<ServiceKey, Vec<Backend>>, String> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.services {
            let mut backends = Vec::new();
            for slot in 0..v.count {
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
                backends.push(*b);
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

/// Lowest ids not in `used`, lazily.
struct IdAlloc<'a> {
    used: &'a HashSet<u32>,
    next: u32,
    limit: u32,
}

impl IdAlloc<'_> {
    fn alloc(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if !self.used.contains(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// The writes that turn `cur` into `desired`, ordered make-before-break.
///
/// Ids are never reused within one plan: a service id or backend id freed by
/// this plan is still live until its deletion near the end, so giving it to a
/// new service or backend earlier would redirect live traffic.
pub fn plan(cur: &MapState, desired: &Desired, max_svc_ids: u32) -> Result<Vec<Op>, PlanError> {
    let mut new_backends = Vec::new();
    let mut slot_writes = Vec::new();
    let mut service_writes = Vec::new();
    let mut resets = Vec::new();

    let used_svc_ids: HashSet<u32> = cur.services.values().map(|v| v.svc_id).collect();
    let mut svc_ids = IdAlloc {
        used: &used_svc_ids,
        next: 0,
        limit: max_svc_ids,
    };
    let used_backend_ids: HashSet<u32> = cur.backends.keys().copied().collect();
    let mut backend_ids = IdAlloc {
        used: &used_backend_ids,
        next: 0,
        limit: u32::MAX,
    };
    let mut backend_id_of: HashMap<Backend, u32> =
        cur.backends.iter().map(|(id, b)| (*b, *id)).collect();

    // Slot counts and slots the datapath uses once this plan is complete.
    let mut final_counts: HashMap<u32, u32> = HashMap::new();
    let mut final_slots: HashMap<SlotKey, u32> = HashMap::new();
    let mut addr_refs: BTreeMap<u32, u32> = BTreeMap::new();

    for (fk, frontend) in &desired.frontends {
        let key = service_key(fk);
        let existing = cur.services.get(&key);
        let svc_id = match existing {
            Some(v) => v.svc_id,
            None => {
                let id = svc_ids
                    .alloc()
                    .ok_or(PlanError::OutOfServiceIds(max_svc_ids))?;
                resets.push(Op::ResetStats(id));
                id
            }
        };
        *addr_refs.entry(key.addr).or_default() += 1;

        let mut wanted: Vec<u32> = Vec::with_capacity(frontend.backends.len());
        for e in &frontend.backends {
            let b = backend(e, fk.proto);
            let id = match backend_id_of.get(&b) {
                Some(id) => *id,
                None => {
                    let id = backend_ids.alloc().unwrap_or(u32::MAX);
                    backend_id_of.insert(b, id);
                    new_backends.push(Op::PutBackend(id, b));
                    id
                }
            };
            wanted.push(id);
        }

        // Keep each surviving backend in the slot it has, to write as few
        // slots as possible; fill the other slots with the newcomers.
        let count = wanted.len() as u32;
        let old_count = existing.map_or(0, |v| v.count);
        let current = |slot: u32| cur.slots.get(&SlotKey { svc_id, slot }).copied();
        let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
        let mut placed: BTreeSet<u32> = BTreeSet::new();
        let mut table: Vec<Option<u32>> = (0..count)
            .map(|slot| {
                let id = current(slot).filter(|id| {
                    slot < old_count && wanted_set.contains(id) && !placed.contains(id)
                })?;
                placed.insert(id);
                Some(id)
            })
            .collect();
        let mut rest = wanted.iter().filter(|id| !placed.contains(id));
        for entry in table.iter_mut().filter(|e| e.is_none()) {
            *entry = rest.next().copied();
        }
        for (slot, id) in table.iter().enumerate() {
            let (key, id) = (
                SlotKey {
                    svc_id,
                    slot: slot as u32,
                },
                id.unwrap_or(u32::MAX),
            );
            if current(key.slot) != Some(id) {
                slot_writes.push(Op::PutSlot(key, id));
            }
            final_slots.insert(key, id);
        }
        let value = ServiceValue {
            svc_id,
            count,
            flags: 0,
            affinity_timeout: frontend.affinity_timeout,
        };
        if existing != Some(&value) {
            service_writes.push(Op::PutService(key, value));
        }
        let name: String = truncate(&frontend.name);
        if cur.names.get(&svc_id) != Some(&name) {
            service_writes.push(Op::PutName(svc_id, name));
        }
        final_counts.insert(svc_id, count);
    }

    let mut ops = Vec::new();
    ops.append(&mut new_backends);
    ops.append(&mut resets);
    ops.append(&mut slot_writes);
    for (addr, n) in &addr_refs {
        if cur.addrs.get(addr) != Some(n) {
            ops.push(Op::PutAddr(*addr, *n));
        }
    }
    ops.append(&mut service_writes);

    // Removed services, then what only they could reach.
    let mut removed: Vec<ServiceKey> = cur
        .services
        .keys()
        .copied()
        .filter(|k| {
            !desired.frontends.contains_key(&FrontendKey {
                addr: wire::to_addr(k.addr),
                port: wire::to_port(k.port),
                proto: k.proto,
            })
        })
        .collect();
    removed.sort();
    ops.extend(removed.into_iter().map(Op::DelService));
    // What nothing reaches any more, in a deterministic order.
    ops.extend(unkept(cur.slots.keys(), |k| final_slots.contains_key(k)).map(Op::DelSlot));
    let referenced: HashSet<u32> = final_slots.values().copied().collect();
    ops.extend(unkept(cur.backends.keys(), |id| referenced.contains(id)).map(Op::DelBackend));
    ops.extend(unkept(cur.addrs.keys(), |a| addr_refs.contains_key(a)).map(Op::DelAddr));
    // Names of removed services, and any left over from earlier runs.
    ops.extend(unkept(cur.names.keys(), |id| final_counts.contains_key(id)).map(Op::DelName));
    Ok(ops)
}

/// UDP backends that leave their frontend when `cur` becomes `desired`, as
/// (svc_id, address, port) in wire order: their conntrack entries must go,
/// or a long-running UDP client keeps sending into the void (the reference
/// runs `conntrack -D` for them). A removed frontend loses all its backends.
pub fn stale_udp(cur: &MapState, desired: &Desired) -> HashSet<(u32, u32, u16)> {
    let mut out = HashSet::new();
    for (k, v) in &cur.services {
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
            .map(|f| f.backends.iter().map(|e| backend(e, k.proto)).collect())
            .unwrap_or_default();
        for slot in 0..v.count {
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
    use crate::model::Frontend;
    use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

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
                    affinity_timeout: 0,
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
        let ops = plan(state, d, 1024).unwrap();
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
        assert_eq!(plan(state, d, 1024).unwrap(), vec![]);
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
    fn a_burst_of_random_changes_is_consistent_after_every_write() {
        // Deterministic pseudo-random scenarios (xorshift).
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut s = MapState::default();
        for _round in 0..200 {
            let mut d = Desired::default();
            for svc in 0..rnd(6) {
                let mut backends: Vec<Endpoint> = (0..rnd(5))
                    .map(|_| Endpoint {
                        addr: format!("198.18.1.{}", rnd(8)).parse().unwrap(),
                        port: 8080 + rnd(2) as u16,
                    })
                    .collect();
                // Endpoint lists are sets in the model.
                backends.sort();
                backends.dedup();
                let key = FrontendKey {
                    addr: format!("198.19.0.{}", svc + rnd(3)).parse().unwrap(),
                    port: 80 + rnd(2) as u16,
                    proto: if rnd(2) == 0 {
                        IPPROTO_TCP
                    } else {
                        IPPROTO_UDP
                    },
                };
                let name = format!("ns/svc{svc}:p");
                d.frontends.insert(
                    key,
                    Frontend {
                        name,
                        backends,
                        affinity_timeout: 0,
                    },
                );
            }
            converge(&mut s, &d);
        }
    }

    #[test]
    fn running_out_of_service_ids_is_an_error_not_a_panic() {
        let d = desired(&[(VIP, 80, IPPROTO_TCP, &[]), (VIP, 81, IPPROTO_TCP, &[])]);
        assert_eq!(
            plan(&MapState::default(), &d, 1),
            Err(PlanError::OutOfServiceIds(1))
        );
    }
}
