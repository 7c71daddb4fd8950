//! Stats: every verdict counted in per-CPU arrays (no atomics, no contention).

use proxy_common::{Counter, DropReason, Event};

use crate::maps::{COUNTERS, DROPS, EVENTS, SERVICE_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    add(COUNTERS.get_ptr_mut(counter as u32));
}

#[inline(always)]
pub fn event(event: Event, n: u64) {
    if let Some(v) = EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU array element of this CPU, as in `add`.
        unsafe { *v += n };
    }
}

#[inline(always)]
pub fn drop(reason: DropReason) {
    add(DROPS.get_ptr_mut(reason as u32));
    count(Counter::Dropped);
}

/// One packet of service `svc_id`'s flows; `new_flow` for a first packet,
/// `reply` for one from a backend, `xdp` when the XDP program translated
/// it. One per-CPU array lookup either way, no branch.
#[inline(always)]
pub fn service(svc_id: u32, len: u32, new_flow: bool, reply: bool, xdp: bool) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU array element of this CPU; nothing else writes it
        // while this program runs.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += len as u64;
            (*s).new_flows += new_flow as u64;
            (*s).reply_packets += reply as u64;
            (*s).reply_bytes += len as u64 * reply as u64;
            (*s).xdp_packets += xdp as u64;
        }
    }
}

/// A flow of service `svc_id` the socket-level load balancer sent to a
/// backend (its packets are plain pod traffic from then on).
#[inline(always)]
pub fn socket_flow(svc_id: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(svc_id) {
        // SAFETY: as in `service`.
        unsafe {
            (*s).new_flows += 1;
            (*s).socket_flows += 1;
        }
    }
}

#[inline(always)]
fn add(slot: Option<*mut u64>) {
    if let Some(v) = slot {
        // SAFETY: per-CPU array element of this CPU, as above.
        unsafe { *v += 1 };
    }
}
