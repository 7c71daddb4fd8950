//! Forward: send a translated packet straight to its next hop with
//! `bpf_fib_lookup` and a redirect, instead of through the stack's routing
//! and netfilter. Whatever the FIB cannot answer (local delivery, no route,
//! a packet bigger than the route's MTU, TTL running out) goes to the stack,
//! which handles it as it would without kpx. One FIB lookup per packet.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{Event, MARK_TRANSLATED};

use crate::{parse::Ipv4Packet, stats};

const AF_INET: u8 = 2;
/// The loopback device's ifindex in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// TTL and protocol: one 16-bit word of the IPv4 header.
const TTL_OFF: usize = 8;
const TOS_OFF: usize = 1;

/// Where the packet was translated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress: the packet is being forwarded (TTL decremented).
    Ingress,
    /// tc egress of a packet the node itself sent: already routed, maybe to
    /// the wrong interface now that its destination changed.
    Egress,
}

/// Returns the tc verdict for the translated packet `pkt` (whose address
/// fields are read back from the packet: they were just rewritten).
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Ipv4Packet, hook: Hook) -> i32 {
    ctx.set_mark(mark(ctx) | MARK_TRANSLATED);
    match redirect(ctx, pkt, hook) {
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

/// The source address a masqueraded flow to `dst` gets: the one the kernel
/// picks for the route to `dst` (its preferred source, or the outgoing
/// interface's address), exactly as iptables' `MASQUERADE` does. One FIB
/// lookup, on a flow's first packet only; None when the FIB cannot say.
#[inline(always)]
pub fn masquerade_source(ctx: &TcContext, pkt: &Ipv4Packet, dst: u32) -> Option<u32> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.__bindgen_anon_1.tot_len = (pkt.end - pkt.l3_off) as u16;
    p.__bindgen_anon_4.ipv4_dst = dst;
    p.ifindex = LOOPBACK_IFINDEX;
    // SAFETY: `p` is a bpf_fib_lookup on the stack, its size passed along.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    // SAFETY: the union member the lookup wrote.
    let src = unsafe { p.__bindgen_anon_3.ipv4_src };
    (ret == BPF_FIB_LKUP_RET_SUCCESS as i64 && src != 0).then_some(src)
}

/// The packet's `skb->mark`.
#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: reads a field of the context's own skb.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn redirect(ctx: &TcContext, pkt: &Ipv4Packet, hook: Hook) -> Option<i32> {
    let src: u32 = ctx.load(pkt.l3_off + crate::parse::ip::SADDR).ok()?;
    let dst: u32 = ctx.load(pkt.l3_off + crate::parse::ip::DADDR).ok()?;
    let ports: [u16; 2] = ctx.load(pkt.l4_off).ok()?;
    let ttl_proto: u16 = ctx.load(pkt.l3_off + TTL_OFF).ok()?;
    let tos: u8 = ctx.load(pkt.l3_off + TOS_OFF).ok()?;
    // SAFETY: reads a field of the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.sport = ports[0];
    p.dport = ports[1];
    p.__bindgen_anon_1.tot_len = (pkt.end - pkt.l3_off) as u16;
    p.__bindgen_anon_2.tos = tos;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // A forwarded packet is looked up as arriving where it did. The node's
    // own packet as if it came from loopback: an output lookup would be
    // pinned to the interface the socket's route chose.
    p.ifindex = match hook {
        Hook::Ingress => ifindex,
        Hook::Egress => LOOPBACK_IFINDEX,
    };
    // SAFETY: `p` is a bpf_fib_lookup on the stack, its size passed along.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let ret = u32::try_from(ret).ok()?;
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    if hook == Hook::Ingress {
        // Forwarding: the TTL goes down here, as the stack would do it.
        // Native order: the TTL is the word's first byte.
        let ttl = ttl_proto.to_ne_bytes()[0];
        if ttl <= 1 {
            return None; // the stack sends the time-exceeded error
        }
        let mut b = ttl_proto.to_ne_bytes();
        b[0] = ttl - 1;
        let new = u16::from_ne_bytes(b);
        ctx.store(pkt.l3_off + TTL_OFF, &new, 0).ok()?;
        ctx.l3_csum_replace(
            pkt.l3_off + crate::parse::ip::CSUM,
            ttl_proto as u64,
            new as u64,
            2,
        )
        .ok()?;
    }
    if ret == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: no parameters: the kernel resolves the next hop itself.
        let r = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
        return Some(r as i32);
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    ctx.store(0, &macs, 0).ok()?;
    if hook == Hook::Egress && p.ifindex == ifindex {
        return Some(TC_ACT_OK); // already on its way out there
    }
    // SAFETY: plain helper call: egress of the FIB's interface.
    Some(unsafe { bpf_redirect(p.ifindex, 0) } as i32)
}
