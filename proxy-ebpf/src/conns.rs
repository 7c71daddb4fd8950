//! Active connections per backend (`CONNS`), for the least-connection
//! schedulers: established TCP flows of their services that are not
//! closing, kept exact with atomic operations.
//!
//! A counted flow (`CT_F_COUNTED`, set when its first packet picked a
//! least-connection service) adds 1 when it is established, and takes it
//! back when its original entry is marked `CT_F_CLOSING`: by a FIN or RST,
//! by a new connection replacing it, or by the agent expiring it through
//! [`expire`]. That mark is an atomic OR whose previous value tells the
//! one CPU that set it, so the count drops once whatever races.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use proxy_common::{
    CtKey, CtValue, In6, CT_DIR_ORIGINAL, CT_F_CLOSING, CT_F_COUNTED, EXPIRE_PER_RUN,
};

use crate::{family::Family, maps::CONNS};

/// `CtValue<A>::flags` lies in the 8-byte word at `flags_word::<A>()`
/// (the widest atomic the BPF target has), at this bit: the same in both
/// families' layouts (checked).
const FLAGS_SHIFT: u32 = flags_shift::<u32>();
const _: () = assert!(FLAGS_SHIFT + 16 <= 64 && cfg!(target_endian = "little"));
const _: () = assert!(flags_shift::<In6>() == FLAGS_SHIFT);

const fn flags_word<A>() -> usize {
    core::mem::offset_of!(CtValue<A>, flags) & !7
}

const fn flags_shift<A>() -> u32 {
    ((core::mem::offset_of!(CtValue<A>, flags) - flags_word::<A>()) * 8) as u32
}

/// `*p += v` as one atomic instruction (`lock xadd`); `v` may be a
/// wrapped negative.
#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // SAFETY: `p` is a map value of this program run (8-byte aligned, as
    // the kernel lays out every hash value); the atomic is the point.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        )
    };
}

/// Backend `id`'s active connections, to be compared as signed: a close
/// racing its own establishment can take a counter below zero for a
/// moment.
#[inline(always)]
pub fn active(id: u32) -> u64 {
    CONNS.get_ptr(id).map_or(0, |p| {
        // SAFETY: a map value pointer; a racing increment is either seen or
        // not, both fine for a choice.
        unsafe { core::ptr::read_volatile(p) }
    })
}

/// A counted flow to backend `id` became established.
#[inline(always)]
pub fn opened(id: u32) {
    if let Some(p) = CONNS.get_ptr_mut(id) {
        return add(p, 1);
    }
    // The backend's first: create its counter, or meet the one another CPU
    // just created.
    if CONNS.insert(id, 1, BPF_NOEXIST as u64).is_err() {
        if let Some(p) = CONNS.get_ptr_mut(id) {
            add(p, 1);
        }
    }
}

/// A counted connection to backend `id` ended without a flow entry to mark
/// (a socket the socket-level load balancer connected, at its release).
#[inline(always)]
pub fn closed(id: u32) {
    if let Some(p) = CONNS.get_ptr_mut(id) {
        add(p, u64::MAX);
    }
}

/// Marks the flow whose original entry (in `CT_TCP`) is `entry` closing;
/// the one call that sets the mark on a counted flow takes it off its
/// backend's count. Returns whether the flow was open until now.
#[inline(always)]
pub fn close<A>(entry: *mut CtValue<A>) -> bool {
    let bit = (CT_F_CLOSING as u64) << FLAGS_SHIFT;
    // SAFETY: `entry` is a map value of this program run; `flags_word` is
    // an 8-byte aligned word inside it (hash values are 8-byte aligned).
    let old = unsafe {
        let word = entry.cast::<u8>().add(flags_word::<A>()).cast::<u64>();
        core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            word, bit,
        )
    };
    let was_open = old & bit == 0;
    if was_open && old & ((CT_F_COUNTED as u64) << FLAGS_SHIFT) != 0 {
        // SAFETY: as above; the backend id never changes.
        closed(unsafe { (*entry).backend_id });
    }
    was_open
}

/// The agent's expiry of established flows (`kpx_conns_expire`): the
/// original-direction keys after the frame's Ethernet header are marked
/// closing, as a FIN would, before the agent deletes them. Returns how many
/// were still open. One `CT_TCP` lookup per key, at most
/// `EXPIRE_PER_RUN`.
#[inline(always)]
pub fn expire<A: Family>(ctx: &TcContext) -> i32 {
    const ETH_HLEN: usize = 14;
    let mut ended = 0;
    for i in 0..EXPIRE_PER_RUN {
        let Ok(key) = ctx.load::<CtKey<A>>(ETH_HLEN + i * core::mem::size_of::<CtKey<A>>()) else {
            break;
        };
        if let Some(e) = A::ct_tcp().get_ptr_mut(key.tuple()) {
            // SAFETY: a map value of this run, read once.
            if unsafe { (*e).dir } == CT_DIR_ORIGINAL && close(e) {
                ended += 1;
            }
        }
    }
    ended
}
