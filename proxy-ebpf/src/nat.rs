//! Translate: rewrite a packet's addresses and ports to the tuple its
//! conntrack entry gives, and its TTL when it is forwarded, with at most
//! four helper calls whatever changes:
//! - the TCP/UDP checksum: one `bpf_l4_csum_replace` for the addresses (a
//!   pseudo-header change, which the kernel applies correctly to
//!   CHECKSUM_PARTIAL skbs from local sockets too) and one for the ports,
//!   each with the whole difference computed here;
//! - the IPv4 header's TTL, checksum and addresses: one 12-byte store, the
//!   checksum updated here (RFC 1624), folding the TTL decrement in;
//! - the ports: one 4-byte store.
//!
//! Writes go through helpers, not direct packet access (see [`crate::parse`]).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{CtKey, IPPROTO_UDP};

use crate::{
    csum::Sum,
    parse::{ip, Ipv4Packet},
};

pub struct RewriteFailed;

/// The IPv4 header from the TTL to the destination address, as stored.
#[repr(C)]
#[derive(Clone, Copy)]
struct IpTail {
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// Rewrites the packet `pkt` describes to carry the tuple `to`, its TTL
/// lowered by `ttl_dec` (1 when the packet is forwarded here, else 0).
#[inline(always)]
pub fn apply(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    to: &CtKey,
    ttl_dec: u8,
) -> Result<(), RewriteFailed> {
    let addrs_changed = to.src_addr != pkt.src || to.dst_addr != pkt.dst;
    let ports_changed = to.src_port != pkt.sport || to.dst_port != pkt.dport;
    if !addrs_changed && !ports_changed && ttl_dec == 0 {
        return Ok(());
    }
    let check = pkt.ip_check;
    // UDP: a zero checksum means "none" and must stay zero; a computed zero
    // must become 0xffff. BPF_F_MARK_MANGLED_0 does both.
    let l4_flags = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let addrs = Sum::zero()
        .replace(pkt.src, to.src_addr)
        .replace(pkt.dst, to.dst_addr);
    if addrs_changed {
        // Size 0: `to` is a difference, applied as a pseudo-header change.
        ctx.l4_csum_replace(
            pkt.l4_csum_off(),
            0,
            addrs.diff() as u64,
            BPF_F_PSEUDO_HDR as u64 | l4_flags,
        )
        .map_err(|_| RewriteFailed)?;
    }
    if ports_changed {
        let old = ports(pkt.sport, pkt.dport);
        let new = ports(to.src_port, to.dst_port);
        let diff = Sum::zero().replace(old, new).diff();
        ctx.l4_csum_replace(pkt.l4_csum_off(), 0, diff as u64, l4_flags)
            .map_err(|_| RewriteFailed)?;
        ctx.store(pkt.l4_off, &[to.src_port, to.dst_port], 0)
            .map_err(|_| RewriteFailed)?;
    }
    // TTL and protocol share a 16-bit word of the header.
    let old_word = ttl_proto(pkt.ttl, pkt.proto);
    let ttl = pkt.ttl.wrapping_sub(ttl_dec);
    let new_word = ttl_proto(ttl, pkt.proto);
    let tail = IpTail {
        ttl,
        proto: pkt.proto,
        check: Sum::of_checksum(check)
            .replace(old_word, new_word)
            .replace(pkt.src, to.src_addr)
            .replace(pkt.dst, to.dst_addr)
            .checksum(),
        saddr: to.src_addr,
        daddr: to.dst_addr,
    };
    ctx.store(pkt.l3_off + ip::TTL, &tail, 0)
        .map_err(|_| RewriteFailed)
}

/// Two ports as they lie next to each other in the header, as one word.
#[inline(always)]
fn ports(src: u16, dst: u16) -> u32 {
    let (s, d) = (src.to_ne_bytes(), dst.to_ne_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// The TTL/protocol word as it lies in the header, widened.
#[inline(always)]
fn ttl_proto(ttl: u8, proto: u8) -> u32 {
    u16::from_ne_bytes([ttl, proto]) as u32
}
