//! Backend selection in O(1): a uniformly random slot of the service's table,
//! or the client's affinity backend while its ClientIP affinity lasts.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use proxy_common::{AffinityKey, AffinityValue, Backend, DropReason, Event, ServiceValue, SlotKey};

use crate::{
    conntrack::now,
    maps::{AFFINITY, BACKENDS, SLOTS},
    stats,
};

pub struct Selected {
    pub backend_id: u32,
    pub backend: Backend,
}

/// Picks a backend for a new flow of `svc` from `client`:
/// `SLOTS[(svc, rand % count)]`, then `BACKENDS[id]`; with ClientIP affinity
/// one `AFFINITY` lookup first (and one write). At most four lookups whatever
/// the number of backends or clients.
#[inline(always)]
pub fn backend(svc: &ServiceValue, client: u32) -> Result<Selected, DropReason> {
    if svc.count == 0 {
        return Err(DropReason::NoBackend);
    }
    if svc.affinity_timeout == 0 {
        return random(svc).map(|(s, _)| s);
    }
    let key = AffinityKey {
        svc_id: svc.svc_id,
        client_addr: client,
    };
    let now = now();
    if let Some(a) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: LRU element valid for this RCU read section; a racing
        // update of the same client is benign (both pick a live backend).
        let a = unsafe { &mut *a };
        let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
        if now.wrapping_sub(a.last_used_ns) < timeout_ns && a.slot < svc.count {
            // The record holds only while its slot still holds its backend:
            // a backend leaving the service releases its clients at once.
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
    let (sel, slot) = random(svc)?;
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
fn random(svc: &ServiceValue) -> Result<(Selected, u32), DropReason> {
    // SAFETY: helper without arguments or side effects on memory.
    let rand = unsafe { bpf_get_prandom_u32() };
    let n = rand % svc.count;
    let backend_id = slot(svc.svc_id, n)?;
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
