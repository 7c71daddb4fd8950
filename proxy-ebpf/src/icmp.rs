//! ICMP: the REJECT a service without endpoints answers with, and ICMP errors
//! about translated flows translated back, so that connection refusals and
//! Path MTU discovery work through a VIP exactly as without a proxy.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_INGRESS, TC_ACT_OK},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use proxy_common::{Counter, CtKey, In6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    conntrack,
    csum::fold,
    forward::Hook,
    maps::scratch6,
    parse::{ip, ip6, l4, IpPacket, Ipv4Hdr, Ipv4Packet, Ipv6Hdr, ETH_HLEN, IP_OFFSET},
    stats,
    verdict::Verdict,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_HLEN: usize = 8;
const ICMP_CSUM: usize = 2;
/// What a REJECT quotes of the offending packet: its IP header (with
/// options, at most 60 bytes) and the first 8 bytes of its payload, or the
/// whole 20-byte TCP header for TCP: a SYN from a local socket is
/// CHECKSUM_PARTIAL, and the kernel refuses to cut such a packet before its
/// checksum field (RFC 1812 asks for as much as fits anyway). In such a quote
/// the TCP checksum is the unfinished pseudo-header sum; receivers never
/// verify a quoted checksum, and the ICMP checksum covers the bytes as sent.
const QUOTE_MAX: usize = 60 + 20;

/// The headers a REJECT prepends to the quoted packet.
#[repr(C)]
struct IcmpError {
    ip: Ipv4Hdr,
    icmp_type: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

/// Turns `pkt` (a TCP SYN or UDP datagram to a service without endpoints)
/// into the ICMP port unreachable the reference's `REJECT` sends, and
/// returns the verdict that sends it back where the packet came from: out
/// of the interface it came in, or, for the node's own packet seen at
/// egress, into the node through the interface it was leaving by.
///
/// The original IP header and 8 bytes of payload stay where they are; 28
/// bytes of room after the Ethernet header receive the new IP and ICMP
/// headers, and the tail is cut after the quote.
#[inline(always)]
pub fn reject(ctx: &TcContext, pkt: &Ipv4Packet, hook: Hook) -> Result<i32, ()> {
    let ihl = (pkt.l4_off - pkt.l3_off) & 0x3c;
    // `quote_len` is at most QUOTE_MAX and a multiple of 4, as csum_diff needs.
    let l4_quote = if pkt.proto == IPPROTO_TCP {
        l4::TCP_MIN_LEN
    } else {
        l4::UDP_LEN
    };
    let quote_len = ihl + l4_quote;
    let mut quote = [0u32; QUOTE_MAX / 4];
    // SAFETY: `quote` has room for QUOTE_MAX >= quote_len bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            pkt.l3_off as u32,
            quote.as_mut_ptr().cast(),
            quote_len as u32,
        )
    };
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    if loaded != 0 {
        return Err(());
    }
    let mut hdr = IcmpError {
        ip: Ipv4Hdr {
            version_ihl: 0x45,
            // IPTOS_PREC_INTERNETCONTROL, as the kernel's own ICMP errors.
            tos: 0xc0,
            tot_len: ((20 + ICMP_HLEN + quote_len) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            proto: IPPROTO_ICMP,
            check: 0,
            // From the address the client tried to reach.
            saddr: pkt.dst,
            daddr: pkt.src,
        },
        icmp_type: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        csum: 0,
        unused: 0,
    };
    hdr.ip.check = fold(csum(&hdr.ip as *const Ipv4Hdr as *mut u32, 20, 0));
    let icmp_sum = csum(&hdr.icmp_type as *const u8 as *mut u32, ICMP_HLEN as u32, 0);
    hdr.csum = fold(csum(quote.as_mut_ptr(), quote_len as u32, icmp_sum));

    answer(ctx, macs, &hdr, quote_len, hook)
}

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// What an IPv6 REJECT quotes at most: the header, extension headers and
/// transport header (ip6tables' REJECT quotes as much as fits in the
/// minimum MTU; this holds the chains kpx parses, but the longest).
/// A power of two, for the mask that bounds it.
pub const QUOTE6_MAX: usize = 128;

/// The headers an IPv6 REJECT prepends to the quoted packet.
#[repr(C)]
struct Icmp6Error {
    ip: Ipv6Hdr,
    icmp_type: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

/// ICMPv6's checksum's pseudo-header (RFC 8200 8.1).
#[repr(C)]
struct Pseudo6 {
    saddr: In6,
    daddr: In6,
    len: u32,
    next: u32,
}

/// [`reject`] for IPv6: the reference's ip6tables `REJECT` sends ICMPv6
/// destination unreachable, port unreachable, from the address the client
/// tried, quoting its packet's headers.
#[inline(always)]
pub fn reject6(ctx: &TcContext, pkt: &IpPacket<In6>, hook: Hook) -> Result<i32, ()> {
    let l4_quote = if pkt.proto == IPPROTO_TCP {
        l4::TCP_MIN_LEN
    } else {
        l4::UDP_LEN
    };
    // Headers are multiples of 8 bytes, the transport's quote of 4: a
    // multiple of 4, as csum_diff needs; masked so that the verifier sees
    // it within the buffer, checked so that it sees it nonzero.
    let quote_len = (pkt.l4_off - pkt.l3_off + l4_quote).min(QUOTE6_MAX) & (QUOTE6_MAX - 4);
    if quote_len < ip6::HLEN {
        return Err(());
    }
    // The quote is read into this CPU's scratch space: IPv6's path has no
    // stack to spare.
    let Some(scratch) = scratch6() else {
        return Err(());
    };
    let quote = &mut scratch.quote;
    // SAFETY: `quote` has room for QUOTE6_MAX >= quote_len bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            pkt.l3_off as u32,
            quote.as_mut_ptr().cast(),
            quote_len as u32,
        )
    };
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    if loaded != 0 {
        return Err(());
    }
    let icmp_len = (ICMP_HLEN + quote_len) as u16;
    let mut hdr = Icmp6Error {
        ip: Ipv6Hdr {
            // Version 6, traffic class 0xc0 (as the kernel's own errors),
            // no flow label.
            vtc_flow: 0x6c00_0000u32.to_be(),
            payload_len: icmp_len.to_be(),
            next_hdr: IPPROTO_ICMPV6,
            hop_limit: 64,
            saddr: pkt.dst,
            daddr: pkt.src,
        },
        icmp_type: ICMPV6_DEST_UNREACH,
        code: ICMPV6_PORT_UNREACH,
        csum: 0,
        unused: 0,
    };
    let mut pseudo = Pseudo6 {
        saddr: pkt.dst,
        daddr: pkt.src,
        len: (icmp_len as u32).to_be(),
        next: (IPPROTO_ICMPV6 as u32).to_be(),
    };
    let sum = csum(&mut pseudo as *mut Pseudo6 as *mut u32, 40, 0);
    let sum = csum(
        &hdr.icmp_type as *const u8 as *mut u32,
        ICMP_HLEN as u32,
        sum,
    );
    hdr.csum = fold(csum(quote.as_mut_ptr(), quote_len as u32, sum));

    answer(ctx, macs, &hdr, quote_len, hook)
}

/// Turns the packet into its REJECT: `hdr` (the new IP and ICMP headers)
/// in room made after the Ethernet header, the tail cut after the quote
/// (`quote_len` bytes of the packet, left where they were), the MAC
/// addresses (`macs`, as they were) swapped; then sends it back.
#[inline(always)]
fn answer<H>(
    ctx: &TcContext,
    macs: [u8; 12],
    hdr: &H,
    quote_len: usize,
    hook: Hook,
) -> Result<i32, ()> {
    let room = core::mem::size_of::<H>();
    ctx.adjust_room(room as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    let new_len = (ETH_HLEN + room + quote_len) as u32;
    // SAFETY: the context's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), new_len, 0) } != 0 {
        return Err(());
    }
    // Back to the sender: swap the MAC addresses.
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN, hdr, 0).map_err(|_| ())?;
    stats::count(Counter::Rejected);
    back(ctx, hook)
}

/// Sends the REJECT built in the packet back where the packet came from:
/// out of the interface it came in, or, for the node's own packet seen at
/// egress, into the node through the interface it was leaving by.
#[inline(always)]
fn back(ctx: &TcContext, hook: Hook) -> Result<i32, ()> {
    // SAFETY: reads a field of the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let flags = match hook {
        Hook::Ingress => 0,
        Hook::Egress => BPF_F_INGRESS as u64,
    };
    // SAFETY: plain helper call, on the interface the packet is on.
    Ok(unsafe { bpf_redirect(ifindex, flags) } as i32)
}

/// One's-complement sum of `len` bytes at `data` (a multiple of 4) on `seed`.
#[inline(always)]
fn csum(data: *mut u32, len: u32, seed: u32) -> u32 {
    // SAFETY: callers pass stack buffers of at least `len` bytes.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data, len, seed) as u32 }
}

/// An ICMP error (destination unreachable, time exceeded, ...) whose quoted
/// packet belongs to a translated flow: rewrite the quote as the sender of
/// the original packet sent it, and the outer header as it expects it.
///
/// One conntrack lookup, on the quoted packet's tuple reversed: that is the
/// tuple of the flow's other direction, whose entry says how packets the
/// error is "about" were translated. So a fragmentation-needed about
/// `client → backend` reaches the client as about `client → VIP`.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, pkt: &Ipv4Packet) -> Verdict {
    let Ok(icmp_type) = ctx.load::<u8>(pkt.l4_off) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return Verdict::Pass(Counter::PassNotHandled);
    }
    let inner_l3 = pkt.l4_off + ICMP_HLEN;
    let Ok(inner) = ctx.load::<Ipv4Hdr>(inner_l3) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    let ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner.version_ihl >> 4 != 4
        || ihl < 20
        || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP)
        || u16::from_be(inner.frag_off) & IP_OFFSET != 0
    {
        return Verdict::Pass(Counter::PassNotHandled);
    }
    let inner_l4 = inner_l3 + ihl;
    if inner_l4 + 8 > pkt.end {
        return Verdict::Pass(Counter::PassMalformed);
    }
    let Ok(ports) = ctx.load::<[u16; 2]>(inner_l4) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    // The flow's other direction: the quoted tuple reversed.
    let key = CtKey::new(inner.daddr, inner.saddr, ports[1], ports[0], inner.proto);
    let Some(entry) = conntrack::lookup_any_state(&key) else {
        return Verdict::Pass(Counter::PassNoService);
    };
    // SAFETY: valid hash element for this RCU read section, copied at once.
    let t = unsafe { &*entry }.translate(&key);
    match rewrite_error(ctx, pkt, inner_l3, inner_l4, &inner, &key, &t) {
        Ok(()) => {
            stats::count(Counter::IcmpTranslated);
            Verdict::Translated(TC_ACT_OK)
        }
        Err(()) => Verdict::Drop(proxy_common::DropReason::RewriteFailed),
    }
}

/// The quote (`key` reversed) becomes `t` reversed; the outer addresses that
/// were the quote's follow it.
#[inline(always)]
fn rewrite_error(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    inner_l3: usize,
    inner_l4: usize,
    inner: &Ipv4Hdr,
    key: &CtKey,
    t: &CtKey,
) -> Result<(), ()> {
    let icmp_csum = pkt.l4_off + ICMP_CSUM;
    // The quoted L4 checksum, when the quote holds it (kernels quote up to
    // 576 bytes; 8 bytes hold only UDP's). Receivers do not verify it, but
    // netfilter keeps it consistent and so do we.
    let l4_csum = match inner.proto {
        IPPROTO_TCP if inner_l4 + l4::TCP_CSUM + 2 <= pkt.end => Some(inner_l4 + l4::TCP_CSUM),
        IPPROTO_UDP => Some(inner_l4 + l4::UDP_CSUM),
        _ => None,
    };
    let l4_csum = match l4_csum {
        Some(off) => match ctx.load::<u16>(off) {
            Ok(0) | Err(_) => None,
            Ok(old) => Some((off, old)),
        },
        None => None,
    };
    let fields = [
        // (offset, old, new, size): quoted source and destination, then ports.
        (inner_l3 + ip::SADDR, key.dst_addr, t.dst_addr, 4u64),
        (inner_l3 + ip::DADDR, key.src_addr, t.src_addr, 4),
        (
            inner_l4 + l4::SPORT,
            key.dst_port as u32,
            t.dst_port as u32,
            2,
        ),
        (
            inner_l4 + l4::DPORT,
            key.src_port as u32,
            t.src_port as u32,
            2,
        ),
    ];
    for (off, old, new, size) in fields {
        if old == new {
            continue;
        }
        if size == 4 {
            ctx.store(off, &new, 0).map_err(|_| ())?;
            // The quoted IP header's checksum absorbs the change, so the
            // header's one's-complement sum (and the ICMP checksum) is kept.
            ctx.l3_csum_replace(inner_l3 + ip::CSUM, old as u64, new as u64, 4)
                .map_err(|_| ())?;
        } else {
            ctx.store(off, &(new as u16), 0).map_err(|_| ())?;
            ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
                .map_err(|_| ())?;
        }
        if let Some((l4_off, _)) = l4_csum {
            ctx.l3_csum_replace(l4_off, old as u64, new as u64, size)
                .map_err(|_| ())?;
        }
    }
    if let Some((off, old)) = l4_csum {
        let new: u16 = ctx.load(off).map_err(|_| ())?;
        ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
            .map_err(|_| ())?;
    }
    // The outer header: the error goes to the quote's source as it knows
    // itself, from the quote's destination if that is who sent the error
    // (a router on the way keeps its own address).
    let outer = [
        (ip::DADDR, pkt.dst, key.dst_addr, t.dst_addr),
        (ip::SADDR, pkt.src, key.src_addr, t.src_addr),
    ];
    for (field, cur, was, new) in outer {
        if cur == was && was != new {
            ctx.store(pkt.l3_off + field, &new, 0).map_err(|_| ())?;
            ctx.l3_csum_replace(pkt.l3_off + ip::CSUM, cur as u64, new as u64, 4)
                .map_err(|_| ())?;
        }
    }
    Ok(())
}

const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

/// Where an ICMPv6 error's fields lie, from the packet's start.
struct Error6At {
    /// The ICMPv6 checksum.
    csum: usize,
    /// The quoted IPv6 header.
    inner_l3: usize,
    /// The quoted transport header (right after the quoted IPv6 header:
    /// a quote with extension headers is not translated).
    inner_l4: usize,
}

/// [`translate_error`] for ICMPv6: destination unreachable, packet too
/// big (Path MTU discovery through a VIP depends on it: IPv6 routers never
/// fragment), time exceeded and parameter problem, whose quoted packet
/// belongs to a translated flow. The same lookup (1 or 2, on the quoted
/// tuple reversed). IPv6 has no header checksum: every change goes into
/// the ICMPv6 checksum (whose pseudo-header holds the outer addresses) and
/// the quoted transport checksum, computed here and stored once each.
#[inline(always)]
pub fn translate_error6(ctx: &TcContext, pkt: &IpPacket<In6>) -> Verdict {
    let Ok(icmp_type) = ctx.load::<u8>(pkt.l4_off) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    if !matches!(
        icmp_type,
        ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
    ) {
        // Neighbour discovery, router advertisements, echo: not kpx's.
        return Verdict::Pass(Counter::PassNotHandled);
    }
    let at = Error6At {
        csum: pkt.l4_off + ICMP_CSUM,
        inner_l3: pkt.l4_off + ICMP_HLEN,
        inner_l4: pkt.l4_off + ICMP_HLEN + ip6::HLEN,
    };
    let Ok(inner) = ctx.load::<Ipv6Hdr>(at.inner_l3) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    if u32::from_be(inner.vtc_flow) >> 28 != 6
        || (inner.next_hdr != IPPROTO_TCP && inner.next_hdr != IPPROTO_UDP)
    {
        return Verdict::Pass(Counter::PassNotHandled);
    }
    if at.inner_l4 + 8 > pkt.end {
        return Verdict::Pass(Counter::PassMalformed);
    }
    let Ok(ports) = ctx.load::<[u16; 2]>(at.inner_l4) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    // The flow's other direction: the quoted tuple reversed.
    let key = CtKey::new(inner.daddr, inner.saddr, ports[1], ports[0], inner.next_hdr);
    let Some(entry) = conntrack::lookup_any_state(&key) else {
        return Verdict::Pass(Counter::PassNoService);
    };
    // SAFETY: valid hash element for this RCU read section, read once.
    let t = unsafe { &*entry }.translate(&key);
    match rewrite_error6(ctx, pkt, &at, inner.next_hdr, &key, &t) {
        Ok(()) => {
            stats::count(Counter::IcmpTranslated);
            Verdict::Translated(TC_ACT_OK)
        }
        Err(()) => Verdict::Drop(proxy_common::DropReason::RewriteFailed),
    }
}

/// The quote (`key` reversed) becomes `t` reversed; the outer addresses that
/// were the quote's follow it; the checksums follow both.
#[inline(always)]
fn rewrite_error6(
    ctx: &TcContext,
    pkt: &IpPacket<In6>,
    at: &Error6At,
    proto: u8,
    key: &CtKey<In6>,
    t: &CtKey<In6>,
) -> Result<(), ()> {
    use crate::{csum::Sum, family::Family};

    let ports = |s: u16, d: u16| {
        let (s, d) = (s.to_ne_bytes(), d.to_ne_bytes());
        u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
    };
    // The quote's addresses and ports: part of the quoted transport
    // checksum (its pseudo-header, its header) and of the ICMP message.
    let quote = In6::sum_replace(Sum::zero(), key.dst_addr, t.dst_addr);
    let quote = In6::sum_replace(quote, key.src_addr, t.src_addr);
    let quote = quote.replace(
        ports(key.dst_port, key.src_port),
        ports(t.dst_port, t.src_port),
    );
    let mut icmp = quote;
    // The quoted transport checksum, when the quote holds it (UDP's 0:
    // none, left as it is).
    let l4_csum = match proto {
        IPPROTO_TCP if at.inner_l4 + l4::TCP_CSUM + 2 <= pkt.end => {
            Some(at.inner_l4 + l4::TCP_CSUM)
        }
        IPPROTO_UDP => Some(at.inner_l4 + l4::UDP_CSUM),
        _ => None,
    };
    if let Some(off) = l4_csum {
        if let Ok(old) = ctx.load::<u16>(off) {
            if old != 0 {
                let new = Sum::of_checksum(old).add(quote.diff()).checksum();
                ctx.store(off, &new, 0).map_err(|_| ())?;
                icmp = icmp.replace(old as u32, new as u32);
            }
        }
    }
    // The outer header: the error goes to the quote's source as it knows
    // itself, from the quote's destination if that is who sent it (a
    // router on the way keeps its own address). In the ICMPv6 checksum's
    // pseudo-header.
    let dst = if pkt.dst == key.dst_addr {
        t.dst_addr
    } else {
        pkt.dst
    };
    let src = if pkt.src == key.src_addr {
        t.src_addr
    } else {
        pkt.src
    };
    if dst != pkt.dst || src != pkt.src {
        icmp = In6::sum_replace(icmp, pkt.dst, dst);
        icmp = In6::sum_replace(icmp, pkt.src, src);
        ctx.store(pkt.l3_off + 8, &[src, dst], 0).map_err(|_| ())?;
    }
    ctx.store(at.inner_l3 + 8, &[t.dst_addr, t.src_addr], 0)
        .map_err(|_| ())?;
    ctx.store(at.inner_l4, &[t.dst_port, t.src_port], 0)
        .map_err(|_| ())?;
    let old: u16 = ctx.load(at.csum).map_err(|_| ())?;
    let new = Sum::of_checksum(old).add(icmp.diff()).checksum();
    ctx.store(at.csum, &new, 0).map_err(|_| ())
}

// The headers a REJECT prepends: exactly the IP and ICMP headers, no
// padding (`answer` makes room of their size).
const _: () = assert!(core::mem::size_of::<IcmpError>() == 20 + ICMP_HLEN);
const _: () = assert!(core::mem::size_of::<Icmp6Error>() == ip6::HLEN + ICMP_HLEN);
