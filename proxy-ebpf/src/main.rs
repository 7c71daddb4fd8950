//! kpx datapath: the tc classifier that load-balances Kubernetes Services.
//!
//! A packet's path through this crate, one module per step:
//! [`parse`] → [`conntrack`] (known flow?) → [`service`] (which service?) →
//! [`select`] (which backend?) → [`nat`] (rewrite) → verdict, with every
//! outcome counted by [`stats`].
#![no_std]
#![no_main]

mod conntrack;
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
use proxy_common::{Counter, CtKey, DropReason, CT_DIR_REPLY, IPPROTO_TCP, IPPROTO_UDP};

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
/// - packet of a tracked flow, either direction: 1 (`CT`);
/// - first packet of a flow to a service: 3 + 2 inserts (`CT` miss,
///   `SERVICES`, `SLOTS`, `BACKENDS`; insert both `CT` directions);
/// - any other IPv4 TCP/UDP packet: 2 (`CT` miss, `SERVICES` miss);
/// - fragment or malformed packet: 1 (`SVC_ADDRS`, to decide pass or drop);
/// - non-IPv4, other protocols: 0.
///
/// No loop over services or backends exists anywhere in the program.
#[classifier]
pub fn kpx_tc_ingress(ctx: TcContext) -> i32 {
    match process(&ctx) {
        Verdict::Pass(counter) => {
            stats::count(counter);
            PASS
        }
        Verdict::Translated => TRANSLATED,
        Verdict::Drop(reason) => {
            stats::drop(reason);
            DROP
        }
    }
}

pub(crate) enum Verdict {
    /// Untouched; the counter says why.
    Pass(Counter),
    Translated,
    Drop(DropReason),
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
    if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
        return Verdict::Pass(Counter::PassNotHandled);
    }

    let key = pkt.tuple();
    // Known flow, either direction: one lookup decides the rewrite.
    if let Some(entry) = conntrack::lookup(&key) {
        return established(ctx, &pkt, entry);
    }
    match service::lookup(pkt.dst, pkt.dport, pkt.proto) {
        Some(svc) => new_flow(ctx, &pkt, &key, &svc),
        None => Verdict::Pass(Counter::PassNoService),
    }
}

/// A packet of a tracked flow: apply the entry's rewrite.
#[inline(always)]
fn established(ctx: &TcContext, pkt: &Ipv4Packet, entry: *mut proxy_common::CtValue) -> Verdict {
    let rewrite = conntrack::touch(entry, pkt.tcp_flags);
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
    let (backend_id, backend) = match select::backend(svc) {
        Ok(b) => b,
        Err(reason) => return Verdict::Drop(reason),
    };
    let rewrite = match conntrack::create(key, svc.svc_id, backend_id, &backend, pkt.tcp_flags) {
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
