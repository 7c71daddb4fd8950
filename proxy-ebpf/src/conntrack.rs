//! Conntrack: the flow table that makes every packet of a flow reach the
//! backend its first packet chose, and lets replies be translated back.
//!
//! Two tables, so that no new flow can push out an established one:
//! - `CT_ANY` (LRU): every new flow, and UDP for its whole life. Under
//!   pressure its least recently used entries go first.
//! - `CT_TCP` (plain hash): TCP connections from their first reply (the
//!   SYN-ACK) on, moved there by [`establish`]. Never evicted; when it is
//!   full, new connections are refused at their first reply, as netfilter
//!   refuses new flows when its table is full.
//!
//! A TCP segment looks in `CT_TCP` first, and in `CT_ANY` only when it can
//! belong to a handshake (SYN, RST): ordinary TCP that is no flow of kpx's
//! pays one lookup, as before the split.
//!
//! Lifetime: the datapath records what it sees (`last_seen_ns`, the reply
//! seen, FIN/RST) and the agent's garbage collector expires flows by state.
//! The datapath itself only ends a flow early when a new SYN reuses the tuple
//! of a closing one, as the kernel reopens a connection in TIME_WAIT.
//!
//! The reply filter ([`may_be_reply`], `proxy_common::reply_bit`) tells
//! which packets from a backend's port can be a flow's reply at all: every
//! reply entry inserted here is noted in it ([`note_reply`]), and in the
//! destination filter ([`Dest`]), which tells from the destination
//! alone that a packet is no flow's reply and for no frontend.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use proxy_common::{
    dest_block, reply_bit, reply_bits, Backend, CtKey, CtValue, DropReason, Event, PortBit,
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING, CT_F_COUNTED, CT_F_DSR_ENCAP, CT_F_REFUSED,
    CT_F_REWRITE_DST, CT_F_REWRITE_SRC, CT_F_SEEN_REPLY, CT_F_SNAT, CT_REFRESH_NS, DEST_REPLIES,
    IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    conns,
    family::Family,
    maps::{DESTS, REPLIES},
    stats,
};

const EEXIST: i32 = 17;

/// The table a flow's entries are in (both directions in the same one).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `CT_TCP`: established TCP.
    Tcp,
    /// `CT_ANY`: UDP, and TCP until its first reply.
    Any,
}

impl Table {
    #[inline(always)]
    fn get<A: Family>(self, key: &CtKey<A>) -> Option<*mut CtValue<A>> {
        match self {
            Table::Tcp => A::ct_tcp().get_ptr_mut(key.tuple()),
            Table::Any => A::ct_any().get_ptr_mut(key),
        }
    }

    #[inline(always)]
    fn remove<A: Family>(self, key: &CtKey<A>) -> bool {
        match self {
            Table::Tcp => A::ct_tcp().remove(key.tuple()).is_ok(),
            Table::Any => A::ct_any().remove(key).is_ok(),
        }
    }
}

/// Whether `key` may be a tracked flow's reply: its bit in either copy of
/// the reply filter. One array read (inlined by the verifier) and the
/// tuple's hash.
#[inline(always)]
pub fn may_be_reply<A: Family>(key: &CtKey<A>) -> bool {
    reply_set(reply_bit(key))
}

/// Whether the reply filter has bit `bit` in either copy.
#[inline(always)]
fn reply_set(bit: PortBit) -> bool {
    REPLIES.get_ptr(bit.word).is_none_or(|w| {
        // SAFETY: array element pointer, valid for the program run; a
        // racing OR is either seen or not, and the copy not being rebuilt
        // has every live reply's bit already.
        let [a, b] = unsafe { core::ptr::read_volatile(w) };
        (a | b) & bit.mask != 0
    })
}

/// What the destination filter ([`proxy_common::dest_block`]) says of a
/// plain packet: one array read (inlined by the verifier), keyed by its
/// destination, so one cache line for the packets of any one destination.
#[derive(Clone, Copy)]
pub struct Dest {
    /// The destination's address-filter bit is set: maybe a frontend's (or
    /// this node's) address.
    pub addr: bool,
    /// The tuple's bit in its destination's reply words is set.
    reply: bool,
    /// The tuple's bit of the reply filter, for [`Dest::may_be_reply`].
    bit: PortBit,
}

impl Dest {
    /// What the filter says of the packet of tuple `key` (as looked up).
    #[inline(always)]
    pub fn of<A: Family>(key: &CtKey<A>) -> Self {
        let addr = dest_block(key.dst_addr);
        let [bit, dest] = reply_bits(key);
        // No block (never: the index is masked): nothing is passed on it.
        let (addr, reply) = DESTS.get_ptr(addr.word).map_or((true, true), |b| {
            // SAFETY: array element pointer, valid for the program run; the
            // agent stores its words whole, the datapath ORs bits in: each
            // word read once, either seen or not (as the reply filter's).
            let [addrs, x, y, _] = unsafe { core::ptr::read_volatile(b) };
            (addrs & addr.mask != 0, (x | y) & dest.mask != 0)
        });
        Self { addr, reply, bit }
    }

    /// The packet is for no frontend and no tracked flow's reply: passed,
    /// no other filter asked.
    #[inline(always)]
    pub fn passes(&self) -> bool {
        !self.addr && !self.reply
    }

    /// [`may_be_reply`] of the packet, its hash not computed again (and no
    /// read of the reply filter when its destination's words say no).
    #[inline(always)]
    pub fn may_be_reply(&self) -> bool {
        self.reply && reply_set(self.bit)
    }
}

/// Notes reply entry `key`, just inserted, in both copies of the reply
/// filter and of its destination's block of the destination filter: after
/// the insert, so that a copy the agent clears meanwhile either keeps this
/// bit or is refilled from a read that finds the entry. A copy that has
/// the bit already is left alone (a clear after this read is followed by a
/// read that finds the entry): an established flow's entry, moved, pays
/// loads, not atomic ORs.
#[inline(always)]
fn note_reply<A: Family>(key: &CtKey<A>) {
    let [bit, dest] = reply_bits(key);
    if let Some(w) = REPLIES.get_ptr_mut(bit.word) {
        set_both(w.cast::<u64>(), bit.mask);
    }
    if let Some(b) = DESTS.get_ptr_mut(dest.word) {
        // SAFETY: the block's reply words, inside the element.
        set_both(unsafe { b.cast::<u64>().add(DEST_REPLIES) }, dest.mask);
    }
}

/// Sets `mask` in the two words at `w` (a filter's two copies), each with
/// an atomic OR unless it has it.
#[inline(always)]
fn set_both(w: *mut u64, mask: u64) {
    for i in 0..2 {
        // SAFETY: two 8-byte aligned words of an array element (array
        // values are 8-byte aligned); read and set atomically, as other
        // CPUs and the agent write them.
        unsafe {
            let word = w.add(i);
            if core::ptr::read_volatile(word) & mask == 0 {
                core::intrinsics::atomic_or::<
                    u64,
                    u64,
                    { core::intrinsics::AtomicOrdering::Relaxed },
                >(word, mask);
            }
        }
    }
}

/// A flow entry found for a packet.
#[derive(Clone, Copy)]
pub struct Found<A = u32> {
    pub entry: *mut CtValue<A>,
    pub table: Table,
}

/// The entry of the flow `key` (a packet with `tcp_flags`) belongs to.
/// Lookups: 1 (TCP in `CT_TCP`, UDP in `CT_ANY`); a TCP SYN or RST that is
/// no established flow's: 2.
#[inline(always)]
pub fn lookup<A: Family>(key: &CtKey<A>, tcp_flags: u8) -> Option<Found<A>> {
    if key.proto == IPPROTO_TCP {
        if let Some(entry) = A::ct_tcp().get_ptr_mut(key.tuple()) {
            return Some(Found {
                entry,
                table: Table::Tcp,
            });
        }
        if tcp_flags & (TCP_SYN | TCP_RST) == 0 {
            return None;
        }
    }
    A::ct_any().get_ptr_mut(key).map(|entry| Found {
        entry,
        table: Table::Any,
    })
}

/// The flow a SYN-ACK really belongs to when it met a closing connection's
/// reply entry in `CT_TCP`: a new connection reusing that reply tuple (a
/// client reusing its port towards the same backend through another
/// frontend), whose own entry waits in `CT_ANY`. The closing pair is
/// removed and the new flow's entry returned; anything else is `found`.
/// Lookups: 1, only for a SYN-ACK on a closing connection.
#[inline(always)]
pub fn newer<A: Family>(key: &CtKey<A>, found: Found<A>, tcp_flags: u8) -> Found<A> {
    if found.table != Table::Tcp || tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN | TCP_ACK {
        return found;
    }
    // SAFETY: as in `touch`; read only.
    let e = unsafe { *found.entry };
    if e.dir != CT_DIR_REPLY || e.flags & CT_F_CLOSING == 0 {
        return found;
    }
    match A::ct_any().get_ptr_mut(key) {
        Some(entry) => {
            remove_flow(key, found);
            Found {
                entry,
                table: Table::Any,
            }
        }
        None => found,
    }
}

/// The entry of the flow `key` belongs to, in whatever state (for ICMP
/// errors, which may quote any segment of a connection).
#[inline(always)]
pub fn lookup_any_state<A: Family>(key: &CtKey<A>) -> Option<*mut CtValue<A>> {
    if key.proto == IPPROTO_TCP {
        if let Some(entry) = A::ct_tcp().get_ptr_mut(key.tuple()) {
            return Some(entry);
        }
    }
    A::ct_any().get_ptr_mut(key)
}

/// CLOCK_MONOTONIC at tick resolution (milliseconds): timeouts are seconds,
/// and the coarse clock is a read of a variable where `bpf_ktime_get_ns`
/// reads the clock source (the slowest helper on the established path).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Records this packet in its flow's entry and returns the entry, and
/// whether `last_seen` was refreshed (then the next hop is looked up
/// again). The entry is read in place, not copied: what the path reads of
/// it (its rewrite, service, direction) never changes, and its next hop
/// only to another answer of the FIB's.
///
/// Writes only when something changed (`last_seen` older than
/// `CT_REFRESH_NS`, the first reply, the first FIN/RST), so a busy flow does
/// not bounce the entry's cache line between CPUs on every packet. A FIN or
/// RST marks both entries closing: one more lookup, once per flow.
#[inline(always)]
pub fn touch<A: Family>(
    found: Found<A>,
    key: &CtKey<A>,
    tcp_flags: u8,
) -> (&'static CtValue<A>, bool) {
    // SAFETY: `entry` came from a lookup in this program run; hash elements
    // stay valid for the RCU read section. Racing writers only update the
    // timestamp and flag bits, both benign to lose.
    let entry = found.entry;
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
        let partner = found.table.get(&e.partner(key));
        let (original, other) = if e.dir == CT_DIR_ORIGINAL {
            (Some(entry), partner)
        } else {
            (partner, Some(entry))
        };
        match original {
            // An established flow's original entry is marked atomically:
            // the mark ends its backend's count (`conns`), exactly once.
            Some(o) if found.table == Table::Tcp => {
                conns::close(o);
            }
            // SAFETY: as above.
            Some(o) => unsafe { (*o).flags |= CT_F_CLOSING },
            None => {}
        }
        if let Some(x) = other {
            // SAFETY: as above.
            unsafe { (*x).flags |= CT_F_CLOSING };
        }
    }
    (e, refreshed)
}

/// The cached "next hop" of a flow the FIB sends up the stack: no
/// interface has this index (they are positive `int`s).
pub const NEXT_HOP_STACK: u32 = u32::MAX;

/// Caches the next hop the FIB gave for `entry`'s direction: out of
/// `ifindex` with `macs`, checked with a packet of `len` IP bytes. Writes
/// only what changed.
#[inline(always)]
pub fn cache_next_hop<A: Family>(entry: *mut CtValue<A>, ifindex: u32, macs: [u32; 3], len: u16) {
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
pub fn forget_next_hop<A: Family>(entry: *mut CtValue<A>) {
    // SAFETY: as in `cache_next_hop`.
    let e = unsafe { &mut *entry };
    if e.next_ifindex != 0 {
        e.next_ifindex = 0;
    }
}

/// Whether `entry` is the original direction of a closing flow: a new SYN
/// with its tuple is a new connection, not part of the old one.
#[inline(always)]
pub fn closed_original<A: Family>(entry: *mut CtValue<A>) -> bool {
    // SAFETY: as in `touch`; read only.
    let e = unsafe { &*entry };
    e.dir == CT_DIR_ORIGINAL && e.flags & CT_F_CLOSING != 0
}

/// Removes both entries of the flow `key`/`found` belongs to.
#[inline(always)]
pub fn remove_flow<A: Family>(key: &CtKey<A>, found: Found<A>) {
    // SAFETY: as in `touch`; copied before the element is deleted.
    let rw = unsafe { *found.entry };
    let removed = found.table.remove(&rw.partner(key)) as u64 + found.table.remove(key) as u64;
    stats::event(Event::CtRemoved, removed);
}

/// A packet of a flow still in `CT_ANY` (TCP: its handshake): the SYN-ACK
/// that establishes the connection moves it to `CT_TCP` ([`establish`]);
/// the client's retransmitted SYN re-arms a handshake refused for want of
/// room. Anything else (UDP above all) is `found`, unchanged.
#[inline(always)]
pub fn handshake<A: Family>(
    key: &CtKey<A>,
    found: Found<A>,
    tcp_flags: u8,
) -> Result<Found<A>, DropReason> {
    if found.table != Table::Any {
        return Ok(found);
    }
    // SAFETY: as in `touch`; a racing SYN clears the same bit.
    let e = unsafe { &mut *found.entry };
    if e.dir == CT_DIR_REPLY {
        if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK {
            return establish(key, found);
        }
    } else if e.flags & CT_F_REFUSED != 0
        && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    {
        e.flags &= !CT_F_REFUSED;
    }
    Ok(found)
}

/// Moves a TCP connection to `CT_TCP` at its first reply (`key`, `found`:
/// the reply direction's) and returns the reply entry there. Lookups: 1
/// (the original direction), 2 inserts, 2 deletes, 1 lookup; once per
/// connection.
///
/// Inserted before being deleted, so a packet of the flow on another CPU
/// finds it in one table or the other. `CtFull` when `CT_TCP` has no room:
/// the SYN-ACK is dropped and the handshake marked refused, as netfilter
/// drops a new flow's packet when its table is full. The backend's
/// retransmitted SYN-ACKs are dropped too (not let through untranslated:
/// the client would answer with a RST and kill the backend's half-open
/// connection) until the client's retransmitted SYN re-arms the handshake,
/// so only a live client takes room that frees up.
#[inline(always)]
// Keys passed by reference: by value LLVM copies each to a new stack slot
// first (20 instructions more on this path, measured with `pathlen`).
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn establish<A: Family>(key: &CtKey<A>, found: Found<A>) -> Result<Found<A>, DropReason> {
    // Both entries are read, and inserted into `CT_TCP`, where they lie:
    // copies (88 bytes each for IPv6) outgrew the stack of IPv6's programs.
    // SAFETY: as in `touch`; read until the entries are removed below.
    let reply = unsafe { &*found.entry };
    let original_key = reply.partner(key);
    // Evicted under pressure: the client's next SYN starts the flow afresh.
    let original_entry = A::ct_any()
        .get_ptr_mut(&original_key)
        .ok_or(DropReason::CtInsertFailed)?;
    // SAFETY: as above.
    let original = unsafe { &*original_entry };
    if original.flags & CT_F_REFUSED != 0 {
        // Refused, and no SYN from the client since.
        return Err(DropReason::CtFull);
    }
    // Plain matches, no closures: LLVM outlined a closure here into a
    // subprogram whose stack frame took the egress program past 512 bytes.
    let inserted = match insert_established(&original_key, original, key) {
        Ok(new) => match insert_established(key, reply, &original_key) {
            Ok(_) => Ok(new),
            Err(reason) => {
                if A::ct_tcp().remove(original_key.tuple()).is_ok() {
                    stats::event(Event::CtRemoved, 1);
                }
                Err(reason)
            }
        },
        Err(reason) => Err(reason),
    };
    match inserted {
        // This CPU established it: a counted flow is one more active
        // connection of its backend (unless it is already closing).
        Ok(true) if original.flags & (CT_F_COUNTED | CT_F_CLOSING) == CT_F_COUNTED => {
            conns::opened(original.backend_id)
        }
        Ok(_) => {}
        Err(reason) => {
            if reason == DropReason::CtFull {
                // SAFETY: as in `touch`; a racing SYN-ACK sets the same bit.
                unsafe { (*original_entry).flags |= CT_F_REFUSED };
            }
            return Err(reason);
        }
    }
    // Its bit is set already, unless an agent's rebuild read the tables
    // while the entry moved (past `CT_TCP`, not yet at `CT_ANY`).
    note_reply(key);
    let removed =
        A::ct_any().remove(&original_key).is_ok() as u64 + A::ct_any().remove(key).is_ok() as u64;
    stats::event(Event::CtRemoved, removed);
    stats::event(Event::CtEstablished, 1);
    A::ct_tcp()
        .get_ptr_mut(key.tuple())
        .map(|entry| Found {
            entry,
            table: Table::Tcp,
        })
        .ok_or(DropReason::CtInsertFailed)
}

/// Inserts one entry of a connection being established into `CT_TCP`.
/// Its tuple may already be there: the same connection, established on
/// another CPU (kept as it is); or an earlier flow's entry with the same
/// tuple (a client reusing its port towards the same backend through
/// another frontend, or a flow that ended), which the new connection
/// replaces, as in `create`, unless the tuple is a masquerade port: the
/// port probe in `create` keeps those unique, so a clash there is a race
/// between two new connections, and the later one is refused.
/// Ok(true) when this call inserted it, Ok(false) when it was there.
#[inline(always)]
fn insert_established<A: Family>(
    key: &CtKey<A>,
    v: &CtValue<A>,
    partner: &CtKey<A>,
) -> Result<bool, DropReason> {
    match A::ct_tcp().insert(key.tuple(), v, BPF_NOEXIST as u64) {
        Ok(()) => {
            stats::event(Event::CtInserted, 1);
            Ok(true)
        }
        Err(e) if e == -EEXIST => {
            let Some(p) = A::ct_tcp().get_ptr_mut(key.tuple()) else {
                return Err(DropReason::CtInsertFailed);
            };
            // SAFETY: as in `touch`; copied at once.
            let old = unsafe { *p };
            if old.partner(key) == *partner && old.created_ns == v.created_ns {
                return Ok(false);
            }
            if v.flags & CT_F_SNAT != 0 && old.flags & CT_F_CLOSING == 0 {
                return Err(DropReason::CtInsertFailed);
            }
            if old.dir == CT_DIR_ORIGINAL {
                // The flow it ends stops counting.
                conns::close(p);
            }
            stats::event(Event::CtRemoved, 1);
            stats::event(Event::CtInserted, 1);
            A::ct_tcp()
                .insert(key.tuple(), v, BPF_ANY as u64)
                .map(|()| true)
                .map_err(|_| DropReason::CtInsertFailed)
        }
        // -E2BIG: every element is in use.
        Err(_) => Err(DropReason::CtFull),
    }
}

/// Moves a flow just created from a mid-stream TCP packet (translated to
/// `to` in its original direction) to `CT_TCP`: the connection is
/// established, and its replies (plain ACKs, no SYN-ACK) look only there.
/// As [`establish`]: 1 lookup, 2 inserts, 2 deletes, 1 lookup.
#[inline(always)]
pub fn recover<A: Family>(to: &CtKey<A>) -> Result<(), DropReason> {
    let reply_key = to.reversed();
    let entry = A::ct_any()
        .get_ptr_mut(reply_key)
        .ok_or(DropReason::CtInsertFailed)?;
    establish(
        &reply_key,
        Found {
            entry,
            table: Table::Any,
        },
    )
    .map(|_| ())
}

/// Whether a packet of the flow `found` (TCP: a `syn`) goes to its backend
/// in Geneve ([`crate::dsr`]): the original direction of a direct-server-
/// return flow this node balanced, a SYN while its handshake lasts, any
/// UDP datagram. No lookup.
#[inline(always)]
pub fn dsr_encapsulates<A: Family>(found: Found<A>, proto: u8, syn: bool) -> bool {
    // The table first: an established TCP packet (in `CT_TCP`) is never
    // encapsulated, and it is known without a load.
    found.table == Table::Any && {
        // SAFETY: as in `touch`; read only.
        let e = unsafe { &*found.entry };
        e.flags & CT_F_DSR_ENCAP != 0 && e.dir == CT_DIR_ORIGINAL && (proto != IPPROTO_TCP || syn)
    }
}

/// The client's first ACK of a direct-server-return flow this node
/// balanced (its handshake's replies never pass here, so no SYN-ACK moved
/// it): the flow is moved to `CT_TCP` as a SYN-ACK would move it, and its
/// original entry there returned. None for any other packet. Lookups: 1
/// (`CT_ANY`), then as [`recover`] and 1 more, once per flow.
#[inline(always)]
pub fn dsr_handshake<A: Family>(key: &CtKey<A>) -> Option<Found<A>> {
    let entry = A::ct_any().get_ptr_mut(key)?;
    // SAFETY: as in `touch`; copied at once.
    let e = unsafe { *entry };
    if e.flags & CT_F_DSR_ENCAP == 0 || e.dir != CT_DIR_ORIGINAL {
        return None;
    }
    recover(&e.translate(key)).ok()?;
    A::ct_tcp().get_ptr_mut(key.tuple()).map(|entry| Found {
        entry,
        table: Table::Tcp,
    })
}

/// How a new flow is translated besides its DNAT.
#[derive(Clone, Copy)]
pub struct Snat<A = u32> {
    /// Masquerade to this address (zero: no masquerade).
    pub addr: A,
    /// Masquerade ports, host byte order, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// `CT_F_FROM_NODE` or 0.
    pub extra_flags: u16,
    /// The flow counts in its backend's connections once established
    /// (`CT_F_COUNTED`, a least-connection service). Apart from
    /// `extra_flags`: a flag not known at compile time there cost every
    /// first packet 34 instructions (`pathlen`).
    pub counted: bool,
    /// Where the port probe starts in the range: random, or a hash of the
    /// client's tuple for the hashing schedulers, so that a flow whose
    /// entries were lost gets the port it had back (when that was its
    /// first try) and the backend sees the same connection.
    pub start: u32,
}

/// Masquerade port attempts before a new flow is dropped: consecutive ports
/// from a random start (as the kernel's NAT probes), so a range with a free
/// port among the next 8 never fails.
const SNAT_TRIES: u32 = 8;

/// What [`create`] made of a new flow: the tuple its packets are
/// translated to, and its original entry's flags. Not the whole entry: a
/// copy of IPv6's (88 bytes) held to the end of the path cost its stack.
#[derive(Clone, Copy)]
pub struct Created<A> {
    pub to: CtKey<A>,
    pub flags: u16,
}

impl<A: Copy> Created<A> {
    #[inline(always)]
    fn of(e: &CtValue<A>, key: &CtKey<A>) -> Self {
        Self {
            to: e.translate(key),
            flags: e.flags,
        }
    }
}

/// Creates both entries of a new flow from `key` (client → frontend) to
/// `backend`, masqueraded when `snat.addr` is set, and returns what its
/// original direction's entry says.
///
/// A masquerade port is free exactly when its reply entry (backend →
/// node:port) can be inserted with `BPF_NOEXIST`, so two flows never share
/// one, whatever the CPU; the agent keeps local sockets out of the range.
#[inline(always)]
pub fn create<A: Family>(
    key: &CtKey<A>,
    svc_id: u32,
    backend_id: u32,
    backend: &Backend<A>,
    tcp_flags: u8,
    snat: &Snat<A>,
) -> Result<Created<A>, DropReason> {
    let now = now();
    let masquerade = snat.addr != A::ZERO;
    let mut original = entry(
        Rewrite {
            src_addr: A::ZERO,
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
    let start = snat.start;
    if snat.counted {
        original.flags |= CT_F_COUNTED;
    }
    if masquerade {
        original.flags |= CT_F_REWRITE_SRC | CT_F_SNAT;
        original.new_src_addr = snat.addr;
        original.new_src_port = snat_port(snat, start);
    }
    match A::ct_any().insert(key, original, BPF_NOEXIST as u64) {
        Ok(()) => stats::event(Event::CtInserted, 1),
        // The same flow's first packet raced us on another CPU: follow its
        // choice so both directions stay consistent.
        // (A plain match: LLVM made the closure of a `map` here a
        // subprogram, whose frame added to the program's.)
        Err(e) if e == -EEXIST => {
            return match A::ct_any().get_ptr_mut(key) {
                Some(entry) => {
                    let found = Found {
                        entry,
                        table: Table::Any,
                    };
                    Ok(Created::of(touch(found, key, tcp_flags).0, key))
                }
                None => Err(DropReason::CtInsertFailed),
            };
        }
        Err(_) => return Err(DropReason::CtInsertFailed),
    }
    let mut reply = entry(
        Rewrite {
            src_addr: key.dst_addr,
            dst_addr: A::ZERO,
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
        match A::ct_any().insert(reply_key, reply, BPF_NOEXIST as u64) {
            Err(e) if e == -EEXIST => {
                stats::event(Event::CtRemoved, 1);
                A::ct_any().insert(reply_key, reply, BPF_ANY as u64)
            }
            r => r,
        }
        .map_err(|_| DropReason::CtInsertFailed)
    };
    if let Err(reason) = inserted {
        // Without its reply entry the flow would be half-translated.
        if A::ct_any().remove(key).is_ok() {
            stats::event(Event::CtRemoved, 1);
        }
        return Err(reason);
    }
    // Before the packet goes on: its reply must find the bit.
    note_reply(&original.partner(key));
    stats::event(Event::CtInserted, 1);
    if masquerade {
        stats::event(Event::Masqueraded, 1);
    }
    Ok(Created::of(&original, key))
}

/// The addresses and ports an entry rewrites to.
struct Rewrite<A> {
    src_addr: A,
    dst_addr: A,
    src_port: u16,
    dst_port: u16,
}

/// A new entry, no next hop cached yet. The layout keeps its zero fields
/// apart (see `CtValue<A>`), so this compiles to plain stores.
#[inline(always)]
fn entry<A: Family>(
    to: Rewrite<A>,
    flags: u16,
    dir: u8,
    tcp_flags: u8,
    backend_id: u32,
    svc_id: u32,
    now: u64,
) -> CtValue<A> {
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
/// entry; on a taken port, moves the original entry to another one. A port
/// is taken when its reply tuple is in either table (for TCP, one more
/// lookup per port tried).
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)] // as in `establish`
fn insert_masqueraded<A: Family>(
    key: &CtKey<A>,
    original: &mut CtValue<A>,
    reply: &CtValue<A>,
    snat: &Snat<A>,
    start: u32,
) -> Result<(), DropReason> {
    for i in 1..=SNAT_TRIES {
        let reply_key = original.partner(key);
        let established =
            key.proto == IPPROTO_TCP && A::ct_tcp().get_ptr(reply_key.tuple()).is_some();
        let taken = established
            || match A::ct_any().insert(reply_key, *reply, BPF_NOEXIST as u64) {
                Ok(()) => return Ok(()),
                Err(e) => e == -EEXIST,
            };
        if !taken {
            return Err(DropReason::CtInsertFailed);
        }
        original.new_src_port = snat_port(snat, start.wrapping_add(i));
        // The original entry must name the port its reply uses.
        if A::ct_any().insert(key, *original, BPF_ANY as u64).is_err() {
            return Err(DropReason::CtInsertFailed);
        }
    }
    Err(DropReason::SnatExhausted)
}

/// Port number `n` (modulo the range's size) of the masquerade range,
/// network byte order.
#[inline(always)]
fn snat_port<A>(snat: &Snat<A>, n: u32) -> u16 {
    let span = (snat.port_max as u32).saturating_sub(snat.port_min as u32) + 1;
    ((snat.port_min as u32 + n % span) as u16).to_be()
}
