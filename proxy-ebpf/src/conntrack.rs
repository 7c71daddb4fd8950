//! Conntrack: the flow table that makes every packet of a flow reach the
//! backend its first packet chose, and lets replies be translated back.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use proxy_common::{
    Backend, CtKey, CtValue, DropReason, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_REWRITE_DST,
    CT_F_REWRITE_SRC, CT_REFRESH_NS,
};

use crate::maps::CONNTRACK;

const EEXIST: i32 = 17;

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(key)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Records this packet in its flow's entry and returns a copy of the entry.
///
/// Writes only when something changed (new TCP flags, or `last_seen` older
/// than `CT_REFRESH_NS`), so a busy flow does not bounce the entry's cache
/// line between CPUs on every packet.
#[inline(always)]
pub fn touch(entry: *mut CtValue, tcp_flags: u8) -> CtValue {
    // SAFETY: `entry` came from a lookup in this program run; LRU elements
    // stay valid for the RCU read section. Racing writers only update the
    // timestamp and flag bits, both benign to lose.
    let e = unsafe { &mut *entry };
    let now = now();
    if now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_NS {
        e.last_seen_ns = now;
    }
    if e.tcp_flags | tcp_flags != e.tcp_flags {
        e.tcp_flags |= tcp_flags;
    }
    *e
}

/// Creates both entries of a new flow from `key` (client → frontend) to
/// `backend`, and returns the original direction's entry.
#[inline(always)]
pub fn create(
    key: &CtKey,
    svc_id: u32,
    backend_id: u32,
    backend: &Backend,
    tcp_flags: u8,
) -> Result<CtValue, DropReason> {
    let now = now();
    let original = CtValue {
        new_src_addr: 0,
        new_dst_addr: backend.addr,
        new_src_port: 0,
        new_dst_port: backend.port,
        flags: CT_F_REWRITE_DST,
        dir: CT_DIR_ORIGINAL,
        tcp_flags,
        backend_id,
        svc_id,
        created_ns: now,
        last_seen_ns: now,
    };
    match CONNTRACK.insert(key, original, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // The same flow's first packet raced us on another CPU: follow its
        // choice so both directions stay consistent.
        Err(e) if e == -EEXIST => {
            return lookup(key)
                .map(|e| touch(e, tcp_flags))
                .ok_or(DropReason::CtInsertFailed);
        }
        Err(_) => return Err(DropReason::CtInsertFailed),
    }
    let reply_key = CtKey {
        src_addr: backend.addr,
        dst_addr: key.src_addr,
        src_port: backend.port,
        dst_port: key.src_port,
        proto: key.proto,
        _pad: [0; 3],
    };
    let reply = CtValue {
        new_src_addr: key.dst_addr,
        new_dst_addr: 0,
        new_src_port: key.dst_port,
        new_dst_port: 0,
        flags: CT_F_REWRITE_SRC,
        dir: CT_DIR_REPLY,
        tcp_flags: 0,
        backend_id,
        svc_id,
        created_ns: now,
        last_seen_ns: now,
    };
    if CONNTRACK.insert(reply_key, reply, BPF_ANY as u64).is_err() {
        // Without its reply entry the flow would be half-translated.
        let _ = CONNTRACK.remove(key);
        return Err(DropReason::CtInsertFailed);
    }
    Ok(original)
}
