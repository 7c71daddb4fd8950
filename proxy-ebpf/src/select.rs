//! Backend selection in O(1): a uniformly random slot of the service's table.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Backend, DropReason, ServiceValue, SlotKey};

use crate::maps::{BACKENDS, SLOTS};

/// Picks a backend for a new flow of `svc`: `SLOTS[(svc, rand % count)]`,
/// then `BACKENDS[id]`. Two lookups whatever the number of backends.
#[inline(always)]
pub fn backend(svc: &ServiceValue) -> Result<(u32, Backend), DropReason> {
    if svc.count == 0 {
        return Err(DropReason::NoBackend);
    }
    // SAFETY: helper without arguments or side effects on memory.
    let rand = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        svc_id: svc.svc_id,
        slot: rand % svc.count,
    };
    // SAFETY (both): valid map value pointers, copied out immediately.
    let id = unsafe { *SLOTS.get_ptr(slot).ok_or(DropReason::BackendMissing)? };
    let backend = unsafe { *BACKENDS.get_ptr(id).ok_or(DropReason::BackendMissing)? };
    Ok((id, backend))
}
