//! The packet as each hook hands it over: tc's skb or XDP's raw frame.
//!
//! The datapath (parse, conntrack, service, select, NAT, forward) is one
//! set of functions generic over [`Packet`], instantiated once per hook, as
//! Cilium shares its tc and XDP code: everything the two program types do
//! differently is here and in each hook's `send`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_skb_store_bytes, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};

use proxy_common::XDP_META_TRANSLATED;

use crate::{
    csum::Sum,
    family::Family,
    forward::{self, Hook, Route, Via},
    nat::{Frame, FRAME_LEN},
    parse::{ip, IpPacket, ETH_HLEN},
};

/// A packet and the operations on it that differ between hooks.
pub trait Packet {
    /// The XDP program (counted apart in each service's statistics).
    const XDP: bool;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length.
    fn len(&self) -> u32;
    /// The interface the packet is on.
    fn ifindex(&self) -> u32;
    /// The context itself, for helpers that take either (`bpf_fib_lookup`).
    fn raw(&self) -> *mut c_void;
    /// Copies a `T` from `off`, beyond the linear data too where the hook
    /// has any.
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()>;
    /// Writes `v` at `off`.
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()>;
    /// Writes a translated frame's Ethernet header to its ports at the
    /// packet's start ([`crate::nat`]).
    fn store_frame(&self, frame: &Frame) -> Result<(), ()>;
    /// Writes `len` bytes from `from` (a block built in scratch space,
    /// alignment padding in front: [`crate::nat::Frame6`]) at `off`;
    /// `from + LEAD` is 4-byte aligned (`LEAD` < 4).
    fn store_block<const LEAD: usize>(
        &self,
        off: usize,
        from: *const u8,
        len: usize,
    ) -> Result<(), ()>;
    /// Adds `diff` (a folded one's-complement difference) to the TCP or
    /// UDP checksum at `off`: `pseudo` when the change is to the
    /// pseudo-header (addresses), `udp` when a zero checksum means "none".
    fn l4_csum_add(&self, off: usize, diff: u32, pseudo: bool, udp: bool) -> Result<(), ()>;
    /// Answers `pkt` with the reference's REJECT, if this hook can:
    /// `None` leaves the packet to tc.
    fn reject<A: Family>(&self, pkt: &IpPacket<A>, hook: Hook) -> Option<Result<i32, ()>>;
    /// The part of `route` this hook can take itself; the rest becomes
    /// [`Route::STACK`] (decided before the rewrite, which writes the next
    /// hop's MACs only for a route taken here).
    fn reachable(&self, route: Route) -> Route;
    /// Whether this hook can neither take a route (`via` out of
    /// `ifindex`) nor mark the packet for tc ([`xdp_marks`]): it is left
    /// untouched, for tc to translate from the flow's entry. Never at tc
    /// (a constant there; scalars, so tc's route stays in registers).
    fn leaves_to_tc(&self, via: Via, ifindex: u32) -> bool;
    /// Sends the translated packet along `route`: the hook's verdict.
    fn send(&self, route: Route) -> i32;
}

impl Packet for TcContext {
    const XDP: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reads a field of the context's own skb.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        TcContext::load::<T>(self, off).map_err(|_| ())
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        TcContext::store(self, off, v, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn store_frame(&self, frame: &Frame) -> Result<(), ()> {
        // One helper call for the whole block.
        let from = core::ptr::addr_of!(frame.macs).cast::<u8>();
        // SAFETY: `frame.macs` starts the last FRAME_LEN bytes of `frame`,
        // which lives on the stack for the call.
        let r = unsafe {
            bpf_skb_store_bytes(self.skb.skb.cast(), 0, from.cast(), FRAME_LEN as u32, 0)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(())
        }
    }

    #[inline(always)]
    fn store_block<const LEAD: usize>(
        &self,
        off: usize,
        from: *const u8,
        len: usize,
    ) -> Result<(), ()> {
        // SAFETY: callers pass a block of at least `len` bytes, alive for
        // the call.
        let r = unsafe {
            bpf_skb_store_bytes(self.skb.skb.cast(), off as u32, from.cast(), len as u32, 0)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(())
        }
    }

    #[inline(always)]
    fn l4_csum_add(&self, off: usize, diff: u32, pseudo: bool, udp: bool) -> Result<(), ()> {
        // UDP: a zero checksum means "none" and must stay zero; a computed
        // zero must become 0xffff. BPF_F_MARK_MANGLED_0 does both. Size 0:
        // `diff` is a difference; the kernel applies a pseudo-header change
        // correctly to CHECKSUM_PARTIAL skbs from local sockets too.
        let flags = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
            | if pseudo { BPF_F_PSEUDO_HDR as u64 } else { 0 };
        self.l4_csum_replace(off, 0, diff as u64, flags)
            .map_err(|_| ())
    }

    #[inline(always)]
    fn reject<A: Family>(&self, pkt: &IpPacket<A>, hook: Hook) -> Option<Result<i32, ()>> {
        Some(A::reject(self, pkt, hook))
    }

    #[inline(always)]
    fn reachable(&self, route: Route) -> Route {
        route
    }

    #[inline(always)]
    fn leaves_to_tc(&self, _via: Via, _ifindex: u32) -> bool {
        false
    }

    #[inline(always)]
    fn send(&self, route: Route) -> i32 {
        forward::send(self, route)
    }
}

/// Offsets into an XDP frame (single-buffer: at most a page) are below
/// this. Said to the verifier where an offset was read back from memory
/// (IPv6's, from scratch space), which it can no longer bound.
const MAX_FRAME_OFF: usize = 0x3fff;

/// A bounds-checked pointer to a `T` at `off` of an XDP frame.
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if off > MAX_FRAME_OFF || start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

impl Packet for XdpContext {
    const XDP: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        // Single-buffer frames only (the program does not declare
        // multi-buffer support): the frame is the packet.
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        // SAFETY: `at` checked that the `T` lies inside the frame; packet
        // loads of any alignment are fine here (see `parse`).
        at::<T>(self, off).map(|p| unsafe { p.read() }).ok_or(())
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        // SAFETY: as in `load`; XDP frames are writable.
        at::<T>(self, off).map(|p| unsafe { p.write(*v) }).ok_or(())
    }

    #[inline(always)]
    fn store_frame(&self, frame: &Frame) -> Result<(), ()> {
        // Plain stores of the parts that change: the ethertype and the IP
        // header's first 8 bytes are the frame's own.
        self.store(0, &frame.macs)?;
        self.store(ETH_HLEN + ip::TTL, &frame.rest)
    }

    #[inline(always)]
    fn store_block<const LEAD: usize>(
        &self,
        off: usize,
        from: *const u8,
        len: usize,
    ) -> Result<(), ()> {
        let (start, end) = (self.data(), self.data_end());
        if off > MAX_FRAME_OFF || start + off + len > end {
            return Err(());
        }
        let to = (start + off) as *mut u8;
        // Word by word from where the block is 4-byte aligned: LLVM lowers
        // a copy it cannot prove aligned to single bytes (116 instructions
        // for IPv6's 58-byte frame), and packet stores of any alignment
        // are fine here (see `parse`). `len` is a constant where this is
        // inlined: the loops are plain stores.
        // SAFETY: the frame's bytes `off..off + len`, checked above; the
        // block's, as callers pass it, `from + LEAD` aligned as said.
        unsafe {
            if LEAD & 1 != 0 {
                to.write(from.read());
            }
            if LEAD & 2 != 0 {
                let at = LEAD & 1;
                to.add(at)
                    .cast::<u16>()
                    .write(from.add(at).cast::<u16>().read());
            }
            let words = len.saturating_sub(LEAD) / 4;
            let (wf, wt) = (from.add(LEAD).cast::<u32>(), to.add(LEAD).cast::<u32>());
            for i in 0..words {
                wt.add(i).write(wf.add(i).read());
            }
            for i in LEAD + words * 4..len {
                to.add(i).write(from.add(i).read());
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_add(&self, off: usize, diff: u32, _pseudo: bool, udp: bool) -> Result<(), ()> {
        // A frame off the wire carries its whole checksum: update it in
        // place (RFC 1624).
        let old = self.load::<u16>(off)?;
        if udp && old == 0 {
            return Ok(());
        }
        let mut new = Sum::of_checksum(old).add(diff).checksum();
        if udp && new == 0 {
            new = 0xffff;
        }
        self.store(off, &new)
    }

    #[inline(always)]
    fn reject<A: Family>(&self, _pkt: &IpPacket<A>, _hook: Hook) -> Option<Result<i32, ()>> {
        // Building an ICMP error needs room XDP would have to make by hand;
        // tc ingress answers it, the packet untouched here.
        None
    }

    /// Back out of the interface the frame came in (`XDP_TX`): to a
    /// backend or client on another node. Any other next hop (a local
    /// pod's interface, whose peer may not take XDP frames; a neighbour
    /// not yet resolved) goes to tc ingress, which redirects it:
    /// translated and marked, or, where the kernel lets XDP write no
    /// metadata, untouched.
    #[inline(always)]
    fn reachable(&self, route: Route) -> Route {
        if sends_back(self, route.via, route.ifindex) {
            route
        } else {
            Route::STACK
        }
    }

    #[inline(always)]
    fn leaves_to_tc(&self, via: Via, ifindex: u32) -> bool {
        !xdp_marks() && !sends_back(self, via, ifindex)
    }

    #[inline(always)]
    fn send(&self, route: Route) -> i32 {
        forward::send_xdp(self, route)
    }
}

/// Whether a route (`via` out of `ifindex`) leads back out of the
/// interface the frame came in.
#[inline(always)]
fn sends_back(ctx: &XdpContext, via: Via, ifindex: u32) -> bool {
    via == Via::Mac && ifindex == ctx.ifindex()
}

/// Whether XDP can mark the frames it translates for the stack
/// (`bpf_xdp_adjust_meta`, which some kernels refuse XDP programs): the
/// agent probes the kernel and sets it before loading. A read-only
/// global, so the verifier knows its value and never visits what it rules
/// out, the helper's call included.
#[unsafe(no_mangle)]
static XDP_MARKS: u8 = 1;

/// [`XDP_MARKS`]: without it, XDP translates only the frames it sends back
/// out itself, and leaves the rest (and every flow's first packet)
/// untouched to tc.
#[inline(always)]
pub fn xdp_marks() -> bool {
    // SAFETY: a read of a global; volatile, or LLVM would fold the value
    // compiled in rather than read the one the loader set.
    unsafe { core::ptr::read_volatile(&raw const XDP_MARKS) != 0 }
}

/// Marks a frame XDP translated and hands to the stack, so that tc ingress
/// only forwards it: four bytes of metadata in front of it. Where the
/// driver keeps no metadata, tc sees an ordinary packet of no tracked
/// tuple (the translated one is neither direction's key) and passes it to
/// the stack. Only called where [`xdp_marks`] holds: without it, XDP hands
/// tc no translated frame.
#[inline(always)]
pub fn mark_translated(ctx: &XdpContext) {
    if !xdp_marks() {
        return;
    }
    // SAFETY: the context's own frame; a negative delta makes room.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + 4 <= data {
        // SAFETY: the four bytes between `meta` and `data`, checked above.
        unsafe { (meta as *mut u32).write(XDP_META_TRANSLATED) };
    }
}

/// Whether the node itself sent this packet: it was received on no
/// interface (`skb_iif` is 0; a forwarded packet keeps the one it came in
/// on). One context load.
#[inline(always)]
pub fn sent_by_node(ctx: &TcContext) -> bool {
    // SAFETY: reads a field of the context's own skb.
    unsafe { (*ctx.skb.skb).ingress_ifindex == 0 }
}

/// Whether XDP translated this packet ([`mark_translated`]).
#[inline(always)]
pub fn translated_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: reads fields of the context's own skb.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + 4 > data {
        return false;
    }
    // SAFETY: the metadata's first four bytes, inside it as checked above.
    unsafe { (meta as *const u32).read() == XDP_META_TRANSLATED }
}
