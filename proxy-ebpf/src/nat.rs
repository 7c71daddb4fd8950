//! Translate: rewrite a packet's addresses and ports to the tuple its
//! conntrack entry gives, and its TTL when it is forwarded, with at most
//! four helper calls whatever changes:
//! - the TCP/UDP checksum: one `bpf_l4_csum_replace` for the addresses (a
//!   pseudo-header change, which the kernel applies correctly to
//!   CHECKSUM_PARTIAL skbs from local sockets too) and one for the ports,
//!   each with the whole difference computed here;
//! - the headers, in one store when they are contiguous (no IP options):
//!   the Ethernet addresses of the next hop when the packet is redirected,
//!   the IPv4 header with its TTL, addresses and checksum (updated here,
//!   RFC 1624, the TTL decrement folded in), and the ports; otherwise one
//!   store per part.
//!
//! IPv6 ([`apply6`]) has no header checksum: its hop limit and addresses
//! are stored in one block, the ports in another.
//!
//! At tc, writes go through helpers, not direct packet access (see
//! [`crate::parse`]); at XDP the same steps are plain loads and stores
//! into the frame ([`crate::packet`]).

use proxy_common::{CtKey, In6, IPPROTO_UDP};

use crate::{
    csum::Sum,
    family::Family,
    forward::{Route, Via},
    maps::scratch6,
    packet::Packet,
    parse::{ip, ip6, IpPacket, Ipv4Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
};

pub struct RewriteFailed;

/// The IPv4 header from the TTL to the destination address, as stored.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IpTail {
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// The IPv4 header from the TTL on, then the ports: contiguous without IP
/// options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IpTailPorts {
    tail: IpTail,
    ports: [u16; 2],
}

/// Ethernet to ports, at offset 2 of a 4-byte aligned block so every field
/// is naturally aligned; stored from `macs` on (38 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    _align: u16,
    pub macs: [u16; 6],
    ethertype: u16,
    ip_head: [u32; 2],
    pub rest: IpTailPorts,
}

pub const FRAME_LEN: usize = core::mem::size_of::<Frame>() - 2;

/// Rewrites the packet `pkt` describes to carry the tuple `to`, its TTL
/// (hop limit) lowered by `ttl_dec` (1 when the packet is forwarded here,
/// else 0), and, when `route` has them (a resolved next hop it is
/// redirected to), the next hop's Ethernet addresses.
#[inline(always)]
pub fn apply<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    to: &CtKey<A>,
    ttl_dec: u8,
    route: &Route,
) -> Result<(), RewriteFailed> {
    A::rewrite(ctx, pkt, to, ttl_dec, route)
}

/// [`apply`] for IPv4.
#[inline(always)]
pub fn apply4<P: Packet>(
    ctx: &P,
    pkt: &Ipv4Packet,
    to: &CtKey,
    ttl_dec: u8,
    route: &Route,
) -> Result<(), RewriteFailed> {
    let addrs_changed = to.src_addr != pkt.src || to.dst_addr != pkt.dst;
    let ports_changed = to.src_port != pkt.sport || to.dst_port != pkt.dport;
    let macs = route.via == Via::Mac;
    if !addrs_changed && !ports_changed && ttl_dec == 0 && !macs {
        return Ok(());
    }
    let check = pkt.ip_check;
    let no_options = pkt.l4_off == pkt.l3_off + 20;
    // The header's first 8 bytes, for the one-store case (else one store
    // per part); read before the helpers below invalidate packet pointers.
    let ip_head = if no_options && macs {
        crate::parse::read_linear::<P, [u32; 2]>(ctx, pkt.l3_off)
    } else {
        None
    };
    l4_checksum(ctx, pkt, to, addrs_changed, ports_changed)?;
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
    let rest = IpTailPorts {
        tail,
        ports: [to.src_port, to.dst_port],
    };
    let stored = match (macs, ip_head) {
        (true, Some(ip_head)) => {
            let frame = Frame {
                _align: 0,
                macs: halves(route.macs),
                ethertype: ETH_P_IP.to_be(),
                ip_head,
                rest,
            };
            ctx.store_frame(&frame)
        }
        (true, None) => ctx
            .store(0, &halves(route.macs))
            .and_then(|()| store_rest(ctx, pkt, &rest, no_options, ports_changed)),
        (false, _) => store_rest(ctx, pkt, &rest, no_options, ports_changed),
    };
    stored.map_err(|_| RewriteFailed)
}

/// The TCP/UDP checksum of `pkt` rewritten to `to`: one helper call for
/// the addresses (a pseudo-header change) and one for the ports, each with
/// the whole difference computed here.
#[inline(always)]
fn l4_checksum<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    to: &CtKey<A>,
    addrs_changed: bool,
    ports_changed: bool,
) -> Result<(), RewriteFailed> {
    let udp = pkt.proto == IPPROTO_UDP;
    if addrs_changed {
        let sum = A::sum_replace(Sum::zero(), pkt.src, to.src_addr);
        let sum = A::sum_replace(sum, pkt.dst, to.dst_addr);
        ctx.l4_csum_add(pkt.l4_csum_off(), sum.diff(), true, udp)
            .map_err(|_| RewriteFailed)?;
    }
    if ports_changed {
        let old = ports(pkt.sport, pkt.dport);
        let new = ports(to.src_port, to.dst_port);
        let diff = Sum::zero().replace(old, new).diff();
        ctx.l4_csum_add(pkt.l4_csum_off(), diff, false, udp)
            .map_err(|_| RewriteFailed)?;
    }
    Ok(())
}

/// The IPv4 header from the TTL on, and the ports when they changed: one
/// store when contiguous.
#[inline(always)]
fn store_rest<P: Packet>(
    ctx: &P,
    pkt: &Ipv4Packet,
    rest: &IpTailPorts,
    no_options: bool,
    ports_changed: bool,
) -> Result<(), ()> {
    if no_options && ports_changed {
        return ctx.store(pkt.l3_off + ip::TTL, rest);
    }
    ctx.store(pkt.l3_off + ip::TTL, &rest.tail)?;
    if ports_changed {
        ctx.store(pkt.l4_off, &rest.ports)?;
    }
    Ok(())
}

/// MAC addresses as three words → six half-words (little-endian target:
/// a word's low half holds its first two bytes).
#[inline(always)]
fn halves(m: [u32; 3]) -> [u16; 6] {
    [
        m[0] as u16,
        (m[0] >> 16) as u16,
        m[1] as u16,
        (m[1] >> 16) as u16,
        m[2] as u16,
        (m[2] >> 16) as u16,
    ]
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

/// IPv6's Ethernet header, fixed header and ports, at offset 2 of a
/// 4-byte aligned block so every field is naturally aligned: stored from
/// `macs` on (58 bytes) when the ports follow the fixed header, from the
/// hop limit on (37) without the next hop's MACs. (Built in this CPU's
/// scratch space, `crate::maps::Scratch6`.)
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame6 {
    _align: u16,
    macs: [u16; 6],
    ethertype: u16,
    /// Version, class and label; payload length, next header, hop limit.
    head: [u32; 2],
    addrs: [In6; 2],
    ports: [u16; 2],
}

pub const FRAME6_LEN: usize = core::mem::size_of::<Frame6>() - 2;
const FRAME6_MACS: usize = core::mem::offset_of!(Frame6, macs);
/// The hop limit's byte: the last of `head`.
const FRAME6_HOP_LIMIT: usize = core::mem::offset_of!(Frame6, addrs) - 1;

/// Bytes from offset `off` of a [`Frame6`] (4-byte aligned) to the next
/// 4-byte boundary: [`crate::packet::Packet::store_block`]'s `LEAD`.
const fn lead(off: usize) -> usize {
    (4 - off % 4) % 4
}
const _: () = assert!(core::mem::align_of::<Frame6>() == 4);

/// [`apply`] for IPv6: the TCP/UDP checksum as IPv4's (its pseudo-header
/// holds the addresses: IPv6 has no header checksum), then one store of
/// everything that changes when the ports follow the fixed header (the
/// common case, no extension headers): Ethernet to ports for a packet
/// redirected to its next hop, hop limit to ports otherwise; else a store
/// per part.
#[inline(always)]
pub fn apply6<P: Packet>(
    ctx: &P,
    pkt: &IpPacket<In6>,
    to: &CtKey<In6>,
    ttl_dec: u8,
    route: &Route,
) -> Result<(), RewriteFailed> {
    let addrs_changed = to.src_addr != pkt.src || to.dst_addr != pkt.dst;
    let ports_changed = to.src_port != pkt.sport || to.dst_port != pkt.dport;
    let macs = route.via == Via::Mac;
    if !addrs_changed && !ports_changed && ttl_dec == 0 && !macs {
        return Ok(());
    }
    let no_ext = pkt.l4_off == pkt.l3_off + ip6::HLEN;
    l4_checksum(ctx, pkt, to, addrs_changed, ports_changed)?;
    let hop_limit = pkt.ttl.wrapping_sub(ttl_dec);
    // Built in this CPU's scratch space: IPv6's programs have no stack to
    // spare for its 60 bytes.
    let Some(scratch) = scratch6() else {
        return Err(RewriteFailed);
    };
    let f = &mut scratch.frame;
    f.addrs = [to.src_addr, to.dst_addr];
    f.ports = [to.src_port, to.dst_port];
    // The hop limit is the header's eighth byte: the second word's last
    // (little-endian target).
    // The fixed header's first 8 bytes, for the one-store case (read
    // here, after the checksum helpers, so nothing is held across them).
    let head = if no_ext && macs {
        // At ETH_HLEN, where every parsed packet's header is: an offset
        // read back from scratch space is unbounded for the verifier.
        crate::parse::read_linear::<P, [u32; 2]>(ctx, ETH_HLEN)
    } else {
        None
    };
    let (head0, head1) = head.map_or((0, 0), |h| (h[0], h[1] & 0x00ff_ffff));
    f.head = [head0, head1 | (hop_limit as u32) << 24];
    let base = (f as *const Frame6).cast::<u8>();
    if head.is_some() {
        f.macs = halves(route.macs);
        f.ethertype = ETH_P_IPV6.to_be();
        // SAFETY: `macs` is at offset 2 of the block.
        let from = unsafe { base.add(FRAME6_MACS) };
        return ctx
            .store_block::<{ lead(FRAME6_MACS) }>(0, from, FRAME6_LEN)
            .map_err(|_| RewriteFailed);
    }
    if macs {
        ctx.store(0, &halves(route.macs))
            .map_err(|_| RewriteFailed)?;
    }
    // SAFETY: the hop limit's byte within the block.
    let from = unsafe { base.add(FRAME6_HOP_LIMIT) };
    if no_ext {
        // Hop limit to ports, contiguous.
        return ctx
            .store_block::<{ lead(FRAME6_HOP_LIMIT) }>(
                pkt.l3_off + ip6::HOP_LIMIT,
                from,
                1 + 32 + 4,
            )
            .map_err(|_| RewriteFailed);
    }
    if addrs_changed || ttl_dec != 0 {
        ctx.store_block::<{ lead(FRAME6_HOP_LIMIT) }>(pkt.l3_off + ip6::HOP_LIMIT, from, 1 + 32)
            .map_err(|_| RewriteFailed)?;
    }
    if ports_changed {
        ctx.store(pkt.l4_off, &[to.src_port, to.dst_port])
            .map_err(|_| RewriteFailed)?;
    }
    Ok(())
}
