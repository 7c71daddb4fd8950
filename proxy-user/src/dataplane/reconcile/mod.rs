//! The sync engine: the minimal, ordered map writes that turn what the maps
//! hold into what the model wants.
//!
//! [`reconcile`] is pure. Its writes are ordered make-before-break, so that the
//! datapath is consistent after *every* single write, not only at the end:
//!
//! 1. new backend ids (no map write: a slot holds its backend whole) and
//!    zeroed stats for new service ids;
//! 2. slots, each with its backend;
//! 3. new source ranges, addresses;
//! 4. service entries (new ones, changed counts or flags), names;
//! 5. removed services;
//! 6. slots no service can reach any more (removed services, shrunk counts);
//! 7. source ranges no service checks any more;
//! 8. backend ids no slot holds any more (their connection counts);
//! 9. addresses no service uses any more.
//!
//! A frontend's slot tables are its cluster-wide one (`0..count`) and, with
//! a Local traffic policy, its node-local one (`LOCAL_SLOTS + 0..local_count`):
//! one slot per backend, or under a hashing scheduler (sh, dh, mh) a
//! [`maglev`] table of 400 to 800 slots per backend.
//!
//! So a live service never points at a missing slot or backend, and a sync
//! interrupted at any write (map full, agent killed) leaves a working
//! datapath that the next sync completes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use proxy_common::SlotKey;

use crate::control::model::{Desired, Endpoint, FrontendKey};

mod backends;
mod digest;
pub mod maglev;
mod mirror;
mod planner;
mod slots;
mod state;
#[cfg(test)]
mod tests;

pub use backends::Backends;
pub use digest::Digest;
pub use mirror::Mirror;
use planner::Planner;
pub use slots::SlotTables;
pub use state::{slot_numbers, BackendAddr, MapState, NodeConfig, Op};

/// Longest service name kept for `kpx dump` (bytes, NUL-padded in the map).
pub const NAME_LEN: usize = proxy_common::SERVICE_NAME_LEN;

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

fn backend(e: &Endpoint, proto: u8) -> BackendAddr {
    BackendAddr {
        addr: e.addr,
        port: e.port,
        proto,
        local: e.local,
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
                .chain(cur.services.keys().copied())
                .collect();
            &every
        }
    };
    let svc_used = |id: u32| m.svc_ids.contains(&id);
    let backend_used = |id: u32| cur.backends.contains_key(&id);
    let backend_of = |b: &BackendAddr| cur.backends.id_of(b);
    let mut p = Planner::new(
        cur,
        &svc_used,
        max_svc_ids,
        &backend_used,
        m.backend_next,
        &backend_of,
    );
    if cur.services.is_empty() && cur.backends.is_empty() {
        let endpoints = desired
            .frontends
            .values()
            .map(|f| f.backends.len() + f.local_backends.len())
            .sum();
        p.reserve(desired.frontends.len(), endpoints);
    }
    // Per frontend: what it writes, and what it stops using (as deltas on
    // the mirror's reference counts).
    let mut ref_delta: BTreeMap<u32, i64> = BTreeMap::new();
    let mut addr_delta: BTreeMap<IpAddr, i64> = BTreeMap::new();
    let mut removed = Vec::new();
    let mut dead_slots = Vec::new();
    let mut dead_names = Vec::new();
    let mut dead_ranges = Vec::new();
    // What the covered frontends use once the writes are done. The slots
    // serve a full reconcile's prune of slots and backends, so only when
    // the maps hold any (a first sync's million would be kept for nothing).
    let mut final_slots: HashMap<SlotKey, u32> = HashMap::new();
    let mut final_ids: HashSet<u32> = HashSet::new();
    let keep_final_slots =
        matches!(scope, Scope::All) && !(cur.slots.is_empty() && cur.backends.is_empty());
    // The deltas serve a partial reconcile only (a full one counts afresh):
    // at 50,000 services they were a million B-tree updates.
    let deltas = matches!(scope, Scope::Touched(_));
    for fk in keys {
        let key = *fk;
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
        if existing.is_none() && deltas {
            *addr_delta.entry(key.addr).or_default() += 1;
        }
        let planned = p.frontend(fk, frontend)?;
        final_ids.insert(planned.svc_id);
        let mut kept = BTreeSet::new();
        for (k, id) in planned.slots() {
            if !old_slots.is_empty() {
                kept.insert(k.slot);
            }
            if keep_final_slots {
                final_slots.insert(k, id);
            }
            if !deltas {
                continue;
            }
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
            let fin = |a: &IpAddr, d: &i64| i64::from(cur.addrs.get(a).copied().unwrap_or(0)) + d;
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
            let mut refs: BTreeMap<IpAddr, u32> = BTreeMap::new();
            for fk in desired.frontends.keys() {
                *refs.entry(fk.addr).or_default() += 1;
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
                            && i64::from(cur.backends.refs(**id)) + **d <= 0
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
            let slots: Vec<SlotKey> = cur.slots.keys().collect();
            ops.extend(unkept(slots.iter(), |k| final_slots.contains_key(k)).map(Op::DelSlot));
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

/// The writes that make the node-wide settings `config` and this node's
/// addresses `addrs` (address → `NODE_F_*`) what the maps hold: settings,
/// then new or changed addresses, then addresses that are gone. They go
/// through the same write stream as the frontends' writes.
pub fn node(
    cur: &MapState,
    addrs: &std::collections::HashMap<IpAddr, u32>,
    config: &NodeConfig,
) -> Vec<Op> {
    let mut ops = Vec::new();
    if cur.config.as_ref() != Some(config) {
        ops.push(Op::SetConfig(*config));
    }
    let mut puts: Vec<Op> = addrs
        .iter()
        .filter(|(a, f)| cur.node_addrs.get(a) != Some(f))
        .map(|(a, f)| Op::PutNodeAddr(*a, *f))
        .collect();
    puts.sort_by_key(|op| match op {
        Op::PutNodeAddr(a, _) => *a,
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    ops.extend(puts);
    ops.extend(unkept(cur.node_addrs.keys(), |a| addrs.contains_key(a)).map(Op::DelNodeAddr));
    ops
}

/// UDP backends that leave their frontend when `cur` becomes `desired`, as
/// (svc_id, address, port): their conntrack entries must go,
/// or a long-running UDP client keeps sending into the void (the reference
/// runs `conntrack -D` for them). A removed frontend loses all its backends.
/// Looks at the frontends of `scope` only.
pub fn stale_udp(
    cur: &MapState,
    desired: &Desired,
    scope: Scope<'_>,
) -> std::collections::HashSet<crate::dataplane::conntrack::ServiceBackend> {
    let keys: Vec<FrontendKey> = match scope {
        Scope::All => cur.services.keys().copied().collect(),
        Scope::Touched(t) => t.iter().copied().collect(),
    };
    let mut out = std::collections::HashSet::new();
    for k in keys {
        let Some(v) = cur.services.get(&k) else {
            continue;
        };
        let k = &k;
        if k.proto != proxy_common::IPPROTO_UDP {
            continue;
        }
        let kept: HashSet<BackendAddr> = desired
            .frontends
            .get(k)
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

/// `name` as the name map holds it: shared with the frontend's when it
/// fits (nearly always), else cut at a character boundary.
fn truncate(name: &Arc<str>) -> Arc<str> {
    if name.len() <= NAME_LEN {
        return Arc::clone(name);
    }
    let mut end = NAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].into()
}
