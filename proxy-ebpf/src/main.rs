//! kpx datapath: the tc classifier that load-balances Kubernetes Services.
//!
//! A packet's path through this crate, one module per step:
//! [`parse`] → [`conntrack`] (known flow?) → [`service`] (which service?) →
//! [`select`] (which backend?) → [`nat`] (rewrite) → verdict, with every
//! outcome counted by [`stats`]. [`icmp`] answers for services without
//! endpoints and translates ICMP errors about translated flows.
#![no_std]
#![no_main]

mod conntrack;
mod icmp;
mod maps;
mod nat;
mod parse;
mod select;
mod service;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    Counter, CtKey, DropReason, CT_DIR_REPLY, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK,
    TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::parse::{Ipv4Packet, Parsed};

/// Verdict for packets kpx does not act on: let the next tc program (or the
/// stack, if there is none) see them unchanged.
const PASS: i32 = TC_ACT_UNSPEC;
/// Verdict for packets kpx translated: hand them to the stack.
const TRANSLATED: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

/// tc ingress on pod-facing and node interfaces.
///
/// Map lookups per packet (all hash lookups O(1); plus one per-CPU array
/// counter, and one per-service stats slot for service traffic):
/// - packet of a tracked flow, either direction: 1 (`CT`); a FIN or RST
///   once per flow: +1 (the other direction's entry, marked closing);
/// - first packet of a flow to a service: 4 + 2 inserts (`CT` miss,
///   `SERVICES`, `SLOTS`, `BACKENDS`; insert both `CT` directions); with
///   ClientIP affinity +1 (`AFFINITY`) and one affinity write;
/// - SYN or UDP to a service without endpoints: 2 (`CT` miss, `SERVICES`),
///   answered with ICMP port unreachable;
/// - ICMP error: 1 (`CT`, on the quoted packet's tuple reversed);
/// - any other IPv4 TCP/UDP packet: 2 (`CT` miss, `SERVICES` miss);
/// - fragment or malformed packet: 1 (`SVC_ADDRS`, to decide pass or drop);
/// - non-IPv4, other protocols: 0.
///
/// No loop over services or backends exists anywhere in the program.
#[classifier]
pub fn kpx_tc_ingress(ctx: TcContext) -> i32 {
    verdict(process(&ctx))
}

/// tc egress on the same interfaces: only ICMP errors the node itself sends
/// about translated flows (fragmentation needed towards a backend's smaller
/// MTU, for one), which never cross an ingress hook. 1 lookup (`CT`) per ICMP
/// error; anything else costs two small loads and passes. Only translations
/// are counted.
#[classifier]
pub fn kpx_tc_egress(ctx: TcContext) -> i32 {
    if !parse::is_ipv4_icmp(&ctx) {
        return PASS;
    }
    match parse::parse_ipv4(&ctx) {
        Parsed::Packet(pkt) if pkt.proto == IPPROTO_ICMP => match icmp::translate_error(&ctx, &pkt)
        {
            Verdict::Pass(_) => PASS,
            v => verdict(v),
        },
        _ => PASS,
    }
}

#[inline(always)]
fn verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Pass(counter) => {
            stats::count(counter);
            PASS
        }
        Verdict::Translated => TRANSLATED,
        Verdict::Redirect(action) => action,
        Verdict::Drop(reason) => {
            stats::drop(reason);
            DROP
        }
    }
}

pub(crate) enum Verdict {
    /// Untouched; the counter says why.
    Pass(Counter),
    /// Translated (and counted).
    Translated,
    /// Rewritten into a reply and redirected (and counted).
    Redirect(i32),
    Drop(DropReason),
}

/// A TCP segment that may open a connection: SYN, without ACK, RST or FIN.
#[inline(always)]
fn is_syn(pkt: &Ipv4Packet) -> bool {
    pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

#[inline(always)]
fn process(ctx: &TcContext) -> Verdict {
    let pkt = match parse::parse_ipv4(ctx) {
        Parsed::NotHandled => return Verdict::Pass(Counter::PassNotHandled),
        Parsed::Malformed { dst } => {
            // Never translate what could not be parsed; but do not let it
            // leave the node towards a VIP nobody owns either.
            return if service::is_service_addr(dst) {
                Verdict::Drop(DropReason::MalformedToService)
            } else {
                Verdict::Pass(Counter::PassMalformed)
            };
        }
        Parsed::Fragment { dst } => {
            return if service::is_service_addr(dst) {
                Verdict::Drop(DropReason::FragmentToService)
            } else {
                Verdict::Pass(Counter::PassFragment)
            };
        }
        Parsed::Packet(pkt) => pkt,
    };
    if pkt.proto == IPPROTO_ICMP {
        return icmp::translate_error(ctx, &pkt);
    }
    if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
        return Verdict::Pass(Counter::PassNotHandled);
    }

    let key = pkt.tuple();
    // Known flow, either direction: one lookup decides the rewrite.
    if let Some(entry) = conntrack::lookup(&key) {
        if !(pkt.proto == IPPROTO_TCP && is_syn(&pkt) && conntrack::closed_original(entry)) {
            return established(ctx, &pkt, &key, entry);
        }
        // A new connection reusing a closing flow's tuple.
        conntrack::remove_flow(&key, entry);
    }
    let Some(svc) = service::lookup(pkt.dst, pkt.dport, pkt.proto) else {
        return Verdict::Pass(Counter::PassNoService);
    };
    if pkt.proto == IPPROTO_TCP && !is_syn(&pkt) {
        // Mid-stream TCP nobody tracks: the reference's ctstate INVALID.
        return Verdict::Drop(DropReason::InvalidTcp);
    }
    if svc.count == 0 {
        // The reference's REJECT: the client learns at once.
        return match icmp::reject(ctx, &pkt) {
            Ok(action) => Verdict::Redirect(action),
            Err(()) => Verdict::Drop(DropReason::NoBackend),
        };
    }
    new_flow(ctx, &pkt, &key, &svc)
}

/// A packet of a tracked flow: apply the entry's rewrite.
#[inline(always)]
fn established(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    key: &CtKey,
    entry: *mut proxy_common::CtValue,
) -> Verdict {
    let rewrite = conntrack::touch(key, entry, pkt.tcp_flags);
    if nat::apply(ctx, pkt, &rewrite).is_err() {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    stats::service(rewrite.svc_id, ctx.len(), false);
    stats::count(if rewrite.dir == CT_DIR_REPLY {
        Counter::CtReply
    } else {
        Counter::CtOriginal
    });
    Verdict::Translated
}

/// First packet of a flow to a service: pick a backend, track, translate.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    key: &CtKey,
    svc: &proxy_common::ServiceValue,
) -> Verdict {
    let sel = match select::backend(svc, pkt.src) {
        Ok(s) => s,
        Err(reason) => return Verdict::Drop(reason),
    };
    let rewrite =
        match conntrack::create(key, svc.svc_id, sel.backend_id, &sel.backend, pkt.tcp_flags) {
            Ok(r) => r,
            Err(reason) => return Verdict::Drop(reason),
        };
    if nat::apply(ctx, pkt, &rewrite).is_err() {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    stats::service(svc.svc_id, ctx.len(), true);
    stats::count(Counter::NewFlow);
    Verdict::Translated
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
