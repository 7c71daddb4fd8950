//! Conntrack: the flow table that makes every packet of a flow reach the
//! backend its first packet chose, and lets replies be translated back.
//!
//! Lifetime: the datapath records what it sees (`last_seen_ns`, the reply
//! seen, FIN/RST) and the agent's garbage collector expires flows by state.
//! The datapath itself only ends a flow early when a new SYN reuses the tuple
//! of a closing one, as the kernel reopens a connection in TIME_WAIT.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use proxy_common::{
    Backend, CtKey, CtValue, DropReason, Event, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING,
    CT_F_REWRITE_DST, CT_F_REWRITE_SRC, CT_F_SEEN_REPLY, CT_F_SNAT, CT_REFRESH_NS, TCP_FIN,
    TCP_RST,
};

use crate::{maps::CONNTRACK, stats};

const EEXIST: i32 = 17;

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// CLOCK_MONOTONIC at tick resolution (milliseconds): timeouts are seconds,
/// and the coarse clock is a read of a variable where `bpf_ktime_get_ns`
/// reads the clock source (the slowest helper on the established path).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Records this packet in its flow's entry and returns a copy of the entry,
/// and whether `last_seen` was refreshed (then the next hop is looked up
/// again).
///
/// Writes only when something changed (`last_seen` older than
/// `CT_REFRESH_NS`, the first reply, the first FIN/RST), so a busy flow does
/// not bounce the entry's cache line between CPUs on every packet. A FIN or
/// RST marks both entries closing: one more lookup, once per flow.
#[inline(always)]
pub fn touch(key: &CtKey, entry: *mut CtValue, tcp_flags: u8) -> (CtValue, bool) {
    // SAFETY: `entry` came from a lookup in this program run; LRU elements
    // stay valid for the RCU read section. Racing writers only update the
    // timestamp and flag bits, both benign to lose.
    let e = unsafe { &mut *entry };
    let now = now();
    let refreshed = now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_NS;
    if refreshed {
        e.last_seen_ns = now;
    }
    if e.tcp_flags | tcp_flags != e.tcp_flags {
        e.tcp_flags |= tcp_flags;
    }
    if e.dir == CT_DIR_REPLY && e.flags & CT_F_SEEN_REPLY == 0 {
        e.flags |= CT_F_SEEN_REPLY;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 && e.flags & CT_F_CLOSING == 0 {
        e.flags |= CT_F_CLOSING;
        if let Some(p) = lookup(&e.partner(key)) {
            // SAFETY: as above.
            unsafe { (*p).flags |= CT_F_CLOSING };
        }
    }
    (*e, refreshed)
}

/// Caches the next hop the FIB gave for `entry`'s direction: out of
/// `ifindex` with `macs`, checked with a packet of `len` IP bytes. Writes
/// only what changed.
#[inline(always)]
pub fn cache_next_hop(entry: *mut CtValue, ifindex: u32, macs: [u32; 3], len: u16) {
    // SAFETY: as in `touch`; a racing writer stores the same FIB answer.
    let e = unsafe { &mut *entry };
    if e.next_ifindex != ifindex || e.next_macs != macs || e.next_len != len {
        e.next_ifindex = ifindex;
        e.next_macs = macs;
        e.next_len = len;
    }
}

/// Drops `entry`'s cached next hop, if it has one.
#[inline(always)]
pub fn forget_next_hop(entry: *mut CtValue) {
    // SAFETY: as in `cache_next_hop`.
    let e = unsafe { &mut *entry };
    if e.next_ifindex != 0 {
        e.next_ifindex = 0;
    }
}

/// Whether `entry` is the original direction of a closing flow: a new SYN
/// with its tuple is a new connection, not part of the old one.
#[inline(always)]
pub fn closed_original(entry: *mut CtValue) -> bool {
    // SAFETY: as in `touch`; read only.
    let e = unsafe { &*entry };
    e.dir == CT_DIR_ORIGINAL && e.flags & CT_F_CLOSING != 0
}

/// Removes both entries of the flow `key`/`entry` belongs to.
#[inline(always)]
pub fn remove_flow(key: &CtKey, entry: *mut CtValue) {
    // SAFETY: as in `touch`; copied before the element is deleted.
    let rw = unsafe { *entry };
    let mut removed = 0;
    if CONNTRACK.remove(rw.partner(key)).is_ok() {
        removed += 1;
    }
    if CONNTRACK.remove(key).is_ok() {
        removed += 1;
    }
    stats::event(Event::CtRemoved, removed);
}

/// How a new flow is translated besides its DNAT.
#[derive(Clone, Copy)]
pub struct Snat {
    /// Masquerade to this address (0: no masquerade).
    pub addr: u32,
    /// Masquerade ports, host byte order, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// `CT_F_FROM_NODE` or 0.
    pub extra_flags: u16,
}

/// Masquerade port attempts before a new flow is dropped: consecutive ports
/// from a random start (as the kernel's NAT probes), so a range with a free
/// port among the next 8 never fails.
const SNAT_TRIES: u32 = 8;

/// Creates both entries of a new flow from `key` (client → frontend) to
/// `backend`, masqueraded when `snat.addr` is set, and returns the original
/// direction's entry.
///
/// A masquerade port is free exactly when its reply entry (backend →
/// node:port) can be inserted with `BPF_NOEXIST`, so two flows never share
/// one, whatever the CPU; the agent keeps local sockets out of the range.
#[inline(always)]
pub fn create(
    key: &CtKey,
    svc_id: u32,
    backend_id: u32,
    backend: &Backend,
    tcp_flags: u8,
    snat: &Snat,
) -> Result<CtValue, DropReason> {
    let now = now();
    let masquerade = snat.addr != 0;
    let mut original = entry(
        Rewrite {
            src_addr: 0,
            dst_addr: backend.addr,
            src_port: 0,
            dst_port: backend.port,
        },
        CT_F_REWRITE_DST | snat.extra_flags,
        CT_DIR_ORIGINAL,
        tcp_flags,
        backend_id,
        svc_id,
        now,
    );
    // The masquerade port probe's random start; no helper call otherwise.
    let start = if masquerade {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    } else {
        0
    };
    if masquerade {
        original.flags |= CT_F_REWRITE_SRC | CT_F_SNAT;
        original.new_src_addr = snat.addr;
        original.new_src_port = snat_port(snat, start);
    }
    match CONNTRACK.insert(key, original, BPF_NOEXIST as u64) {
        Ok(()) => stats::event(Event::CtInserted, 1),
        // The same flow's first packet raced us on another CPU: follow its
        // choice so both directions stay consistent.
        Err(e) if e == -EEXIST => {
            return lookup(key)
                .map(|e| touch(key, e, tcp_flags).0)
                .ok_or(DropReason::CtInsertFailed);
        }
        Err(_) => return Err(DropReason::CtInsertFailed),
    }
    let mut reply = entry(
        Rewrite {
            src_addr: key.dst_addr,
            dst_addr: 0,
            src_port: key.dst_port,
            dst_port: 0,
        },
        CT_F_REWRITE_SRC | snat.extra_flags,
        CT_DIR_REPLY,
        0,
        backend_id,
        svc_id,
        now,
    );
    let inserted = if masquerade {
        reply.flags |= CT_F_REWRITE_DST | CT_F_SNAT;
        reply.new_dst_addr = key.src_addr;
        reply.new_dst_port = key.src_port;
        insert_masqueraded(key, &mut original, &reply, snat, start)
    } else {
        // NOEXIST first so the event counters stay exact; an existing entry
        // is a stale flow with the same reply tuple, which the new flow
        // replaces.
        let reply_key = original.partner(key);
        match CONNTRACK.insert(reply_key, reply, BPF_NOEXIST as u64) {
            Err(e) if e == -EEXIST => {
                stats::event(Event::CtRemoved, 1);
                CONNTRACK.insert(reply_key, reply, BPF_ANY as u64)
            }
            r => r,
        }
        .map_err(|_| DropReason::CtInsertFailed)
    };
    if let Err(reason) = inserted {
        // Without its reply entry the flow would be half-translated.
        if CONNTRACK.remove(key).is_ok() {
            stats::event(Event::CtRemoved, 1);
        }
        return Err(reason);
    }
    stats::event(Event::CtInserted, 1);
    if masquerade {
        stats::event(Event::Masqueraded, 1);
    }
    Ok(original)
}

/// The addresses and ports an entry rewrites to.
struct Rewrite {
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
}

/// A new entry, no next hop cached yet. The layout keeps its zero fields
/// apart (see `CtValue`), so this compiles to plain stores.
#[inline(always)]
fn entry(
    to: Rewrite,
    flags: u16,
    dir: u8,
    tcp_flags: u8,
    backend_id: u32,
    svc_id: u32,
    now: u64,
) -> CtValue {
    CtValue {
        new_src_addr: to.src_addr,
        new_dst_addr: to.dst_addr,
        new_src_port: to.src_port,
        new_dst_port: to.dst_port,
        flags,
        dir,
        tcp_flags,
        backend_id,
        svc_id,
        created_ns: now,
        last_seen_ns: now,
        next_ifindex: 0,
        next_macs: [0, 0, 0],
        next_len: 0,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Claims a free masquerade port for the flow `key` by inserting its reply
/// entry; on a taken port, moves the original entry to another one.
#[inline(always)]
fn insert_masqueraded(
    key: &CtKey,
    original: &mut CtValue,
    reply: &CtValue,
    snat: &Snat,
    start: u32,
) -> Result<(), DropReason> {
    for i in 1..=SNAT_TRIES {
        match CONNTRACK.insert(original.partner(key), *reply, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(()),
            Err(e) if e == -EEXIST => {
                original.new_src_port = snat_port(snat, start.wrapping_add(i));
                // The original entry must name the port its reply uses.
                if CONNTRACK.insert(key, *original, BPF_ANY as u64).is_err() {
                    return Err(DropReason::CtInsertFailed);
                }
            }
            Err(_) => return Err(DropReason::CtInsertFailed),
        }
    }
    Err(DropReason::SnatExhausted)
}

/// Port number `n` (modulo the range's size) of the masquerade range,
/// network byte order.
#[inline(always)]
fn snat_port(snat: &Snat, n: u32) -> u16 {
    let span = (snat.port_max as u32).saturating_sub(snat.port_min as u32) + 1;
    ((snat.port_min as u32 + n % span) as u16).to_be()
}
