//! Backend selection in O(1): a uniformly random slot of one of the
//! frontend's tables (cluster-wide or node-local, as the traffic policy
//! chose), or the client's affinity backend while its ClientIP affinity lasts.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, DropReason, Event, ServiceValue, SlotKey, LOCAL_SLOTS,
};

use crate::{
    conntrack::now,
    maps::{AFFINITY, BACKENDS, SLOTS},
    stats,
};

pub struct Selected {
    pub backend_id: u32,
    pub backend: Backend,
}

/// One backend table of a frontend: slots `base..base + count`.
#[derive(Clone, Copy)]
pub struct Table {
    base: u32,
    count: u32,
}

impl Table {
    pub fn of(svc: &ServiceValue, local: bool) -> Self {
        if local {
            Self {
                base: LOCAL_SLOTS,
                count: svc.local_count,
            }
        } else {
            Self {
                base: 0,
                count: svc.count,
            }
        }
    }

    fn contains(&self, slot: u32) -> bool {
        slot.wrapping_sub(self.base) < self.count
    }
}

/// Picks a backend of table `t` of `svc` for a new flow from `client`:
/// `SLOTS[(svc, base + rand % count)]`, then `BACKENDS[id]`; with ClientIP
/// affinity one `AFFINITY` lookup first (and one write). At most four
/// lookups whatever the number of backends or clients.
#[inline(always)]
pub fn backend(svc: &ServiceValue, t: Table, client: u32) -> Result<Selected, DropReason> {
    if t.count == 0 {
        return Err(DropReason::NoBackend);
    }
    if svc.affinity_timeout == 0 {
        return random(svc.svc_id, t).map(|(s, _)| s);
    }
    let key = AffinityKey {
        affinity_id: svc.affinity_id,
        client_addr: client,
    };
    let now = now();
    if let Some(a) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: LRU element valid for this RCU read section; a racing
        // update of the same client is benign (both pick a live backend).
        let a = unsafe { &mut *a };
        let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
        if now.wrapping_sub(a.last_used_ns) < timeout_ns && t.contains(a.slot) {
            // The record holds only while its slot still holds its backend:
            // a backend leaving the service releases its clients at once.
            // A record from the other table (the client came in through
            // another policy) is replaced, as the reference's per-chain
            // `recent` check would miss it.
            if let Ok(id) = slot(svc.svc_id, a.slot) {
                if id == a.backend_id {
                    let backend = lookup_backend(id)?;
                    a.last_used_ns = now;
                    stats::event(Event::AffinityHit, 1);
                    return Ok(Selected {
                        backend_id: id,
                        backend,
                    });
                }
            }
        }
    }
    let (sel, slot) = random(svc.svc_id, t)?;
    let value = AffinityValue {
        backend_id: sel.backend_id,
        slot,
        last_used_ns: now,
    };
    // An LRU insert only fails on allocation failure; the flow still works,
    // it just starts no affinity.
    let _ = AFFINITY.insert(key, value, BPF_ANY as u64);
    stats::event(Event::AffinityNew, 1);
    Ok(sel)
}

#[inline(always)]
fn random(svc_id: u32, t: Table) -> Result<(Selected, u32), DropReason> {
    // SAFETY: helper without arguments or side effects on memory.
    let rand = unsafe { bpf_get_prandom_u32() };
    let n = t.base + rand % t.count;
    let backend_id = slot(svc_id, n)?;
    let backend = lookup_backend(backend_id)?;
    Ok((
        Selected {
            backend_id,
            backend,
        },
        n,
    ))
}

#[inline(always)]
fn slot(svc_id: u32, slot: u32) -> Result<u32, DropReason> {
    let p = SLOTS
        .get_ptr(SlotKey { svc_id, slot })
        .ok_or(DropReason::BackendMissing)?;
    // SAFETY: valid map value pointer, copied out immediately.
    Ok(unsafe { *p })
}

#[inline(always)]
fn lookup_backend(id: u32) -> Result<Backend, DropReason> {
    let p = BACKENDS.get_ptr(id).ok_or(DropReason::BackendMissing)?;
    // SAFETY: as in `slot`.
    Ok(unsafe { *p })
}
