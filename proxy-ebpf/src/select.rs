//! Backend selection in O(1): a slot of one of the frontend's tables
//! (cluster-wide or node-local, as the traffic policy chose), at the
//! position the frontend's scheduler says, or the client's affinity backend
//! while its ClientIP affinity lasts (affinity overrides every scheduler,
//! as IPVS persistence does).
//!
//! Schedulers (`proxy_common::SCHED_*`), each one position computation:
//! - random: `bpf_get_prandom_u32() % count` (iptables mode);
//! - rr: this CPU's next position for the frontend (`RR`, one per-CPU
//!   array element: no lock, no cache line shared between CPUs), offset by
//!   the CPU number so CPUs do not all start at slot 0. Each CPU visits the
//!   backends in turn, so over any period no backend gets more than one
//!   flow per CPU above another;
//! - sh / mh / dh: `flow_hash(client or destination) % count` over a
//!   Maglev table the agent built: the same client reaches the same backend
//!   on every node, and a change of backends moves few clients;
//! - lc (and wlc, sed, nq, twos, equal for unweighted backends): of two
//!   random backends, the one with fewer active connections ([`conns`]):
//!   the power of two choices, O(1) where IPVS scans every backend.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id},
};
use proxy_common::{
    flow_hash, least_conns, scheduler, AffinityKey, AffinityValue, Backend, CtKey, DropReason,
    Event, ServiceValue, Slot, SlotKey, LOCAL_SLOTS, SCHED_DH, SCHED_MH, SCHED_RR, SCHED_SH,
    SVC_F_HASH_PORT,
};

use crate::{conns, conntrack::now, family::Family, maps::RR, stats};

pub struct Selected<A = u32> {
    pub backend_id: u32,
    pub backend: Backend<A>,
    /// The flow counts in the backend's active connections once
    /// established (a least-connection service: `CT_F_COUNTED`). Decided
    /// here, where the scheduler is read anyway: carried from the service
    /// entry to the flow's creation it cost every first packet 25
    /// instructions (`pathlen`).
    pub counted: bool,
    /// Its slot in the frontend's table: a socket keeps its backend while
    /// the slot still holds it.
    pub slot: u32,
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

    pub fn contains(&self, slot: u32) -> bool {
        slot.wrapping_sub(self.base) < self.count
    }
}

/// Picks a backend of table `t` of `svc` for the new flow `flow`:
/// `SLOTS[(svc, base + position)]`, which holds the backend whole (round
/// robin: +1 per-CPU array lookup); with ClientIP affinity one `AFFINITY`
/// lookup first (and one write). At most five lookups whatever the number
/// of backends or clients. `netns_cookie`: 0 for a packet, whose client is
/// `flow.src_addr`; a socket's network namespace for the socket-level
/// load balancer, whose client has no address yet at `connect()`.
#[inline(always)]
pub fn backend<A: Family>(
    svc: &ServiceValue,
    t: Table,
    flow: &CtKey<A>,
    netns_cookie: u64,
) -> Result<Selected<A>, DropReason> {
    if t.count == 0 {
        return Err(DropReason::NoBackend);
    }
    if svc.affinity_timeout == 0 {
        return pick(svc, t, flow);
    }
    let key = AffinityKey::new(svc.affinity_id, flow.src_addr, netns_cookie);
    let now = now();
    if let Some(a) = A::affinity().get_ptr_mut(key) {
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
            if let Ok(s) = slot::<A>(svc.svc_id, a.slot) {
                if s.backend_id == a.backend_id {
                    a.last_used_ns = now;
                    stats::event(Event::AffinityHit, 1);
                    return Ok(Selected {
                        backend_id: s.backend_id,
                        backend: s.backend,
                        counted: least_conns(scheduler(svc.flags)),
                        slot: a.slot,
                    });
                }
            }
        }
    }
    let sel = pick(svc, t, flow)?;
    let value = AffinityValue {
        backend_id: sel.backend_id,
        slot: sel.slot,
        last_used_ns: now,
    };
    // An LRU insert only fails on allocation failure; the flow still works,
    // it just starts no affinity.
    let _ = A::affinity().insert(key, value, BPF_ANY as u64);
    stats::event(Event::AffinityNew, 1);
    Ok(sel)
}

/// The backend at the scheduler's position in `t`.
#[inline(always)]
fn pick<A: Family>(
    svc: &ServiceValue,
    t: Table,
    flow: &CtKey<A>,
) -> Result<Selected<A>, DropReason> {
    let counted = least_conns(scheduler(svc.flags));
    let (n, s) = if counted {
        fewer_conns(svc.svc_id, t)?
    } else {
        let n = t.base + position(svc, flow) % t.count;
        (n, slot(svc.svc_id, n)?)
    };
    Ok(Selected {
        backend_id: s.backend_id,
        backend: s.backend,
        counted,
        slot: n,
    })
}

/// Least connections by the power of two choices: two distinct random
/// slots, and of their backends the one with fewer active connections
/// (the first on a tie). Lookups: 2 `SLOTS`, 2 `CONNS` (1 each with a
/// single backend). Returns the slot number and its content.
#[inline(always)]
fn fewer_conns<A: Family>(svc_id: u32, t: Table) -> Result<(u32, Slot<A>), DropReason> {
    let r = random();
    let a = t.base + r % t.count;
    let slot_a = slot(svc_id, a)?;
    if t.count == 1 {
        return Ok((a, slot_a));
    }
    // Another slot than `a`: an offset of 1..count from it, from the
    // random word's other half.
    let b = t.base + (a - t.base + 1 + (r >> 16) % (t.count - 1)) % t.count;
    let slot_b = slot(svc_id, b)?;
    // Signed: a counter that went below zero (a flow of a backend id
    // reused after a restart, closing) reads as idle, not as infinitely
    // busy.
    let busier_a =
        (conns::active(slot_b.backend_id) as i64) < (conns::active(slot_a.backend_id) as i64);
    Ok(if busier_a { (b, slot_b) } else { (a, slot_a) })
}

/// The scheduler's choice, before the modulo of the table's size.
#[inline(always)]
fn position<A: Family>(svc: &ServiceValue, flow: &CtKey<A>) -> u32 {
    let port = |p: u16| {
        if svc.flags & SVC_F_HASH_PORT != 0 {
            p
        } else {
            0
        }
    };
    match scheduler(svc.flags) {
        SCHED_RR => round_robin(svc.svc_id),
        SCHED_SH | SCHED_MH => {
            flow_hash(svc.affinity_id, flow.src_addr.word(), port(flow.src_port))
        }
        SCHED_DH => flow_hash(svc.affinity_id, flow.dst_addr.word(), port(flow.dst_port)),
        _ => random(),
    }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without arguments or side effects on memory.
    unsafe { bpf_get_prandom_u32() }
}

/// This CPU's next round-robin position for `svc_id`.
#[inline(always)]
fn round_robin(svc_id: u32) -> u32 {
    let Some(p) = RR.get_ptr_mut(svc_id) else {
        // Above the map's capacity (never, ids are below it): no order kept.
        return random();
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program
    // run; no other CPU writes it (an interrupted run's lost increment only
    // repeats a position).
    let n = unsafe { *p };
    // SAFETY: as above.
    unsafe { *p = n.wrapping_add(1) };
    // SAFETY: helper without arguments.
    n.wrapping_add(unsafe { bpf_get_smp_processor_id() })
}

/// The backend (and its id) in slot `slot` of `svc_id`.
#[inline(always)]
pub fn slot<A: Family>(svc_id: u32, slot: u32) -> Result<Slot<A>, DropReason> {
    let p = A::slots()
        .get_ptr(SlotKey { svc_id, slot })
        .ok_or(DropReason::BackendMissing)?;
    // SAFETY: valid map value pointer, copied out immediately.
    Ok(unsafe { *p })
}
