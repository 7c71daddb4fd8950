//! Forward: send a translated packet straight to its next hop with
//! `bpf_fib_lookup` and a redirect, instead of through the stack's routing
//! and netfilter. Whatever the FIB cannot answer (local delivery, no route,
//! a packet bigger than the route's MTU, TTL running out) goes to the stack,
//! which handles it as it would without kpx. One FIB lookup per packet, made
//! before the rewrite (on the translated tuple, known from the conntrack
//! entry) so the rewrite can fold the TTL decrement into its one header
//! store.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use core::mem::MaybeUninit;

use proxy_common::{CtKey, CtValue, Event, CFG_F_STACK_FORWARDING, MARK_TRANSLATED};

use crate::{conntrack, family::Family, nat, packet::Packet, parse::IpPacket, service, stats};

/// The loopback device's ifindex in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Where the packet was translated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress: the packet is being forwarded (TTL decremented).
    Ingress,
    /// tc egress of a packet the node itself sent: already routed, maybe to
    /// the wrong interface now that its destination changed.
    Egress,
}

impl Hook {
    /// Where a flow from `origin` is seen: the node's own at egress.
    #[inline(always)]
    pub fn of(origin: crate::policy::Origin) -> Hook {
        match origin {
            crate::policy::Origin::Network => Hook::Ingress,
            crate::policy::Origin::Node => Hook::Egress,
        }
    }
}

/// How a translated packet leaves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Up the stack (or on out, at egress) as it is.
    Stack,
    /// Out of the route's interface, the kernel resolving the neighbour.
    Neigh,
    /// Out of the route's interface with its MACs (which the rewrite
    /// writes).
    Mac,
}

/// The next hop of a translated packet. A struct whose fields are always
/// all set: as an enum with data, the variants without MACs left bytes
/// undefined, which LLVM copied around as unset registers, and the
/// verifier refuses reading those (`R3 !read_ok`).
#[derive(Clone, Copy)]
pub struct Route {
    pub via: Via,
    /// The interface (`Neigh`, `Mac`).
    pub ifindex: u32,
    /// Destination then source MAC, as on the wire (`Mac`).
    pub macs: [u32; 3],
    /// Already leaving there (egress, `Mac`): no redirect needed.
    pub stay: bool,
}

impl Route {
    pub const STACK: Route = Route {
        via: Via::Stack,
        ifindex: 0,
        macs: [0; 3],
        stay: false,
    };

    #[inline(always)]
    fn neigh(ifindex: u32) -> Route {
        Route {
            via: Via::Neigh,
            ifindex,
            ..Route::STACK
        }
    }

    #[inline(always)]
    fn mac(ifindex: u32, macs: [u32; 3], stay: bool) -> Route {
        Route {
            via: Via::Mac,
            ifindex,
            macs,
            stay,
        }
    }

    /// The TTL decrement the rewrite applies: 1 when the packet is
    /// forwarded from ingress.
    #[inline(always)]
    pub fn ttl_dec(&self, hook: Hook) -> u8 {
        (self.via != Via::Stack && hook == Hook::Ingress) as u8
    }
}

/// `bpf_fib_lookup`'s parameters, 8-byte aligned so they are zeroed with
/// eight word stores. Volatile: LLVM would merge plain ones into a call to
/// the BPF target's byte-wise `memset` (a loop of ~150 instructions).
#[repr(C, align(8))]
struct Params(bpf_fib_lookup);

impl Params {
    /// Initialised in place: a returned value would be copied, and the copy
    /// of known zeroes becomes a `memset` call again.
    #[inline(always)]
    fn init<'a, A: Family>(
        p: &'a mut MaybeUninit<Params>,
        pkt: &IpPacket<A>,
        dst: A,
        ifindex: u32,
    ) -> &'a mut Params {
        let words = p.as_mut_ptr().cast::<u64>();
        for i in 0..core::mem::size_of::<Params>() / 8 {
            // SAFETY: `Params` is 8-byte aligned and a whole number of
            // words, all written here before it is read.
            unsafe { words.add(i).write_volatile(0) };
        }
        // SAFETY: every byte was written above; all-zero is a valid
        // bpf_fib_lookup (an empty request).
        let p = unsafe { p.assume_init_mut() };
        A::fib_request(&mut p.0, dst);
        p.0.l4_protocol = pkt.proto;
        p.0.__bindgen_anon_1.tot_len = pkt.ip_len();
        p.0.ifindex = ifindex;
        p
    }

    #[inline(always)]
    fn lookup<P: Packet>(&mut self, ctx: &P, flags: u32) -> i64 {
        // SAFETY: `self.0` is a bpf_fib_lookup on the stack, its size passed.
        unsafe {
            fib_lookup(
                ctx.raw(),
                &mut self.0,
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                flags,
            )
        }
    }
}

/// The next hop of `pkt` once translated to `t`. A packet forwarded from
/// ingress whose TTL would run out goes to the stack, which answers it.
#[inline(always)]
pub fn route<P: Packet, A: Family>(ctx: &P, pkt: &IpPacket<A>, t: &CtKey<A>, hook: Hook) -> Route {
    route_sized(ctx, pkt, t, hook, pkt.ip_len())
}

/// As [`route`], for a packet of `len` IP bytes (a packet about to be
/// encapsulated, checked against the route's MTU with its new size).
#[inline(always)]
pub fn route_sized<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    t: &CtKey<A>,
    hook: Hook,
    len: u16,
) -> Route {
    let ifindex = ctx.ifindex();
    // A forwarded packet is looked up as arriving where it did. The node's
    // own packet as if it came from loopback: an output lookup would be
    // pinned to the interface the socket's route chose.
    let from = match hook {
        Hook::Ingress if service::config().flags() & CFG_F_STACK_FORWARDING != 0 => {
            return Route::STACK;
        }
        Hook::Ingress => ifindex,
        Hook::Egress => LOOPBACK_IFINDEX,
    };
    let mut raw = MaybeUninit::uninit();
    let p = Params::init(&mut raw, pkt, t.dst_addr, from);
    A::fib_flow(&mut p.0, pkt, t.src_addr);
    p.0.__bindgen_anon_1.tot_len = len;
    p.0.sport = t.src_port;
    p.0.dport = t.dst_port;
    let Ok(ret) = u32::try_from(p.lookup(ctx, 0)) else {
        return Route::STACK;
    };
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Route::STACK;
    }
    if hook == Hook::Ingress && pkt.ttl <= 1 {
        return Route::STACK; // the stack sends the time-exceeded error
    }
    if ret == BPF_FIB_LKUP_RET_NO_NEIGH {
        return Route::neigh(p.0.ifindex);
    }
    let (d, s) = (p.0.dmac, p.0.smac);
    let macs = [
        u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
        u32::from_ne_bytes([d[4], d[5], s[0], s[1]]),
        u32::from_ne_bytes([s[2], s[3], s[4], s[5]]),
    ];
    Route::mac(
        p.0.ifindex,
        macs,
        hook == Hook::Egress && p.0.ifindex == ifindex,
    )
}

/// The next hop of an established packet translated to `to`. At ingress it
/// comes from the flow entry (`rewrite` is its copy, `entry` the element:
/// a next hop's interface and MACs, or the stack),
/// the FIB asked again only when the entry was just `refreshed` (at most
/// once a second per direction) or the packet is longer than the one the
/// cached hop was checked with; the answer is cached.
#[inline(always)]
pub fn established<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    to: &CtKey<A>,
    entry: *mut CtValue<A>,
    rewrite: &CtValue<A>,
    refreshed: bool,
    hook: Hook,
) -> Route {
    if hook == Hook::Ingress && !refreshed {
        if let Some(route) = cached(pkt, rewrite) {
            return route;
        }
    }
    let route = route(ctx, pkt, to, hook);
    if hook == Hook::Ingress {
        match route.via {
            Via::Mac => conntrack::cache_next_hop(entry, route.ifindex, route.macs, pkt.ip_len()),
            // A packet longer than the cached one that the FIB sends to the
            // stack (too big for the route, or a GRO aggregate) leaves the
            // cache for the flow's other packets.
            _ if !refreshed && rewrite.next_ifindex != 0 && pkt.ip_len() > rewrite.next_len => {}
            // The stack, as the FIB says for local delivery, no route or no
            // forwarding: cached too, so the flow's next packets skip the
            // FIB as redirected ones do. (Not for a packet whose TTL runs
            // out: that says nothing of the route.) Always a safe answer:
            // the stack forwards whatever the FIB would have redirected.
            Via::Stack if pkt.ttl > 1 => {
                conntrack::cache_next_hop(entry, conntrack::NEXT_HOP_STACK, [0; 3], u16::MAX)
            }
            _ => conntrack::forget_next_hop(entry),
        }
    }
    route
}

/// The route an established packet at ingress takes from its flow entry's
/// cached next hop, with no FIB lookup; None when nothing is cached or the
/// packet is longer than the one the FIB checked the route's MTU with.
#[inline(always)]
fn cached<A: Family>(pkt: &IpPacket<A>, e: &CtValue<A>) -> Option<Route> {
    if e.next_ifindex == 0 || pkt.ip_len() > e.next_len {
        return None;
    }
    if pkt.ttl <= 1 || e.next_ifindex == conntrack::NEXT_HOP_STACK {
        return Some(Route::STACK);
    }
    Some(Route::mac(e.next_ifindex, e.next_macs, false))
}

/// Sends a packet already translated (by XDP, or by the node that sent it
/// in direct server return's Geneve) to its next hop: only its TTL and,
/// when resolved, the next hop's MACs are written. One FIB lookup.
#[inline(always)]
pub fn onward<A: Family>(ctx: &TcContext, pkt: &IpPacket<A>) -> Result<i32, nat::RewriteFailed> {
    let to = pkt.tuple();
    let route = route(ctx, pkt, &to, Hook::Ingress);
    nat::apply(ctx, pkt, &to, route.ttl_dec(Hook::Ingress), &route)?;
    Ok(send(ctx, route))
}

/// Sends the translated packet (MACs already written) along `route`;
/// returns the tc verdict.
#[inline(always)]
pub fn send(ctx: &TcContext, route: Route) -> i32 {
    ctx.set_mark(mark(ctx) | MARK_TRANSLATED);
    let action = match route.via {
        Via::Stack => None,
        // SAFETY: no parameters: the kernel resolves the next hop itself.
        Via::Neigh => {
            Some(unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        Via::Mac if route.stay => Some(TC_ACT_OK),
        // SAFETY: plain helper call: egress of the FIB's interface.
        Via::Mac => Some(unsafe { bpf_redirect(route.ifindex, 0) } as i32),
    };
    match action {
        Some(action) => {
            stats::event(Event::FibRedirect, 1);
            action
        }
        None => {
            stats::event(Event::FibStack, 1);
            TC_ACT_OK
        }
    }
}

/// Sends a frame XDP translated along `route` (only routes
/// [`Packet::reachable`] keeps): back out where it came in, or up the stack
/// marked as translated, for tc ingress to forward.
#[inline(always)]
pub fn send_xdp(ctx: &XdpContext, route: Route) -> i32 {
    match route.via {
        Via::Mac => {
            stats::event(Event::XdpTx, 1);
            xdp_action::XDP_TX as i32
        }
        _ => {
            crate::packet::mark_translated(ctx);
            stats::event(Event::XdpStack, 1);
            xdp_action::XDP_PASS as i32
        }
    }
}

/// The source address a masqueraded flow to `dst` gets: the one the kernel
/// picks for the route to `dst` (its preferred source, or the outgoing
/// interface's address), exactly as iptables' `MASQUERADE` does. One FIB
/// lookup, on a flow's first packet only; None when the FIB cannot say.
#[inline(always)]
pub fn masquerade_source<P: Packet, A: Family>(ctx: &P, pkt: &IpPacket<A>, dst: A) -> Option<A> {
    let mut raw = MaybeUninit::uninit();
    let p = Params::init(&mut raw, pkt, dst, LOOPBACK_IFINDEX);
    let ret = p.lookup(ctx, BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH);
    let src = A::fib_source(&p.0);
    (ret == BPF_FIB_LKUP_RET_SUCCESS as i64 && src != A::ZERO).then_some(src)
}

/// The packet's `skb->mark`.
#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: reads a field of the context's own skb.
    unsafe { (*ctx.skb.skb).mark }
}
