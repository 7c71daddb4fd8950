//! Translate: rewrite addresses and ports as a conntrack entry says, with
//! incremental IPv4 and TCP/UDP checksum updates by the kernel's helpers
//! (which also handle CHECKSUM_PARTIAL skbs from local sockets correctly).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{CtValue, CT_F_REWRITE_DST, CT_F_REWRITE_SRC, IPPROTO_UDP};

use crate::parse::{ip, l4, Ipv4Packet};

pub struct RewriteFailed;

/// Applies `rw` to the packet `pkt` describes.
#[inline(always)]
pub fn apply(ctx: &TcContext, pkt: &Ipv4Packet, rw: &CtValue) -> Result<(), RewriteFailed> {
    // UDP: a zero checksum means "none" and must stay zero; a computed zero
    // must become 0xffff. BPF_F_MARK_MANGLED_0 does both.
    let l4_flags = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if rw.flags & CT_F_REWRITE_SRC != 0 {
        set_addr(ctx, pkt, ip::SADDR, pkt.src, rw.new_src_addr, l4_flags)?;
        set_port(ctx, pkt, l4::SPORT, pkt.sport, rw.new_src_port, l4_flags)?;
    }
    if rw.flags & CT_F_REWRITE_DST != 0 {
        set_addr(ctx, pkt, ip::DADDR, pkt.dst, rw.new_dst_addr, l4_flags)?;
        set_port(ctx, pkt, l4::DPORT, pkt.dport, rw.new_dst_port, l4_flags)?;
    }
    Ok(())
}

#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    field: usize,
    old: u32,
    new: u32,
    l4_flags: u64,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.store(pkt.l3_off + field, &new, 0)
        .map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(pkt.l3_off + ip::CSUM, old as u64, new as u64, 4)
        .map_err(|_| RewriteFailed)?;
    // The address is part of the L4 pseudo-header.
    ctx.l4_csum_replace(
        pkt.l4_csum_off(),
        old as u64,
        new as u64,
        BPF_F_PSEUDO_HDR as u64 | l4_flags | 4,
    )
    .map_err(|_| RewriteFailed)
}

#[inline(always)]
fn set_port(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    field: usize,
    old: u16,
    new: u16,
    l4_flags: u64,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.store(pkt.l4_off + field, &new, 0)
        .map_err(|_| RewriteFailed)?;
    ctx.l4_csum_replace(pkt.l4_csum_off(), old as u64, new as u64, l4_flags | 2)
        .map_err(|_| RewriteFailed)
}
