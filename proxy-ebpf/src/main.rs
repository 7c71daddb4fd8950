//! kpx datapath: the tc classifiers that load-balance Kubernetes Services.
//!
//! A packet's path through this crate, one module per step:
//! [`parse`] → [`conntrack`] (known flow?) → [`service`] (which frontend?) →
//! [`policy`] (which endpoints, masquerade, source ranges) → [`select`]
//! (which backend?) → [`nat`] (rewrite) → [`forward`] (next hop) → verdict,
//! with every outcome counted by [`stats`] as it becomes a [`verdict`].
//! [`icmp`] answers for services without endpoints and translates ICMP
//! errors about translated flows.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conns;
mod conntrack;
mod csum;
mod dsr;
mod egress;
mod family;
mod forward;
mod icmp;
mod maps;
mod nat;
mod packet;
mod parse;
mod policy;
mod select;
mod service;
mod sock;
mod stats;
mod verdict;

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use proxy_common::{
    flow_hash, hashing, scheduler, Counter, CtKey, DropReason, Event, In6, BACKEND_F_LOCAL,
    CT_DIR_REPLY, CT_F_FROM_NODE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    MARK_TRANSLATED, PROG_EGRESS6, PROG_NEW6, PROG_NEW6_NODE, SVC_F_EXTERNAL, SVC_F_LOCAL, TCP_ACK,
    TCP_RST, TCP_SYN, XDP_PROG_NEW6, XDP_PROG_SERVICE6,
};

use crate::{
    conntrack::Snat,
    family::{Entry4, Entry6, Family, Rest},
    forward::Hook,
    packet::Packet,
    parse::{IpPacket, Kind, Parsed},
    policy::Origin,
    verdict::{Verdict, PASS},
};

/// tc ingress on pod-facing interfaces and the node's external interfaces.
///
/// Map lookups per packet (all hash or array lookups, O(1); plus one per-CPU
/// counter, and one per-service stats slot for service traffic; `PORTS`,
/// `REPLIES` and `CONFIG` are arrays the verifier inlines: no hash, no
/// helper call):
/// - packet of a tracked flow, either direction: 1 (`CT_TCP` for TCP,
///   `CT_ANY` for UDP; a TCP SYN or RST also `CT_ANY` when `CT_TCP` misses),
///   a reply after its tuple's bit in `REPLIES` (an array, inlined);
///   a FIN or RST once per flow: +1 (the other direction's entry, marked
///   closing); a connection's first reply (SYN-ACK) moves it from `CT_ANY`
///   to `CT_TCP`: +1 lookup, 2 inserts, 2 deletes, 1 lookup, once;
/// - first packet of a flow to a service: `CT` misses (TCP: both tables),
///   `PORTS`, `SERVICES`
///   (+ `NODE_ADDRS` and the NodePort frontend for a NodePort), `CONFIG`,
///   `SRC_RANGES` for a LoadBalancer IP with source ranges, `SLOTS` (the
///   backend is in the slot), `EGRESS` (an array, inlined: has the
///   interface it came in on tc egress? if not, +1 insert into
///   `EGRESS_WANTED`, and `NODE_ADDRS` for its backend); then 2 inserts
///   (both directions into `CT_ANY`,
///   the reply's tuple noted in `REPLIES`: an array read, two atomic ORs; a
///   masqueraded flow retries its reply insert on a taken port, at most 8
///   times, each try of a TCP flow also a `CT_TCP` lookup); with
///   ClientIP affinity +1 (`AFFINITY`) and one write; by scheduler: round
///   robin +1 (`RR`, a per-CPU array), least connections +3 (a second
///   `SLOTS`, two `CONNS`), the hashing ones none;
/// - a mid-stream TCP segment of a flow whose entries were lost, to a
///   service with a hashing scheduler: as a first packet, then moved to
///   `CT_TCP` as a first reply moves a connection (+1 lookup, 2 inserts,
///   2 deletes, 1 lookup), once;
/// - least-connection services' connections: +1 `CONNS` lookup and an
///   atomic add when established, and when closing (the FIN or RST that
///   marks them closing), once each;
/// - SYN or UDP to a service without endpoints: `CT`, `PORTS`, `SERVICES`
///   (+2 for a NodePort), answered with ICMP port unreachable;
/// - ICMP error: 1 or 2 (`CT_TCP` then `CT_ANY`, on the quoted packet's
///   tuple reversed);
/// - any other IPv4 TCP/UDP packet: `DESTS` (its destination's block, an
///   array read: the address filter's word and the tuple's reply bit
///   there), and if either bit is set, `PORTS` (its two ports' words); a
///   `CT` miss (`CT_TCP` or `CT_ANY`; both for a SYN or RST) only to a port
///   some frontend uses (at an address whose bit is set) or from a port
///   some backend uses with a tuple whose bit `REPLIES` has (no other
///   packet can be of a tracked flow); + `SERVICES` on a port some
///   frontend uses; + `NODE_ADDRS` on a NodePort's port;
/// - fragment or malformed packet: 1 (`SVC_ADDRS`, to decide pass or drop);
/// - other protocols: 0.
///
/// Plain IPv4 TCP/UDP (no options, not a fragment) is sorted at the entry
/// ([`family::sort4`]) by those filters from one read of its headers: a
/// packet no service or flow can concern is passed there, at the program's
/// start, most on the destination filter's one cache line; any other goes
/// on with its packet and the filters' word (not asked again), and what
/// the sort does not take (ICMP, options, fragments, Geneve) parses from
/// the start.
///
/// IPv6: the same lookups in IPv6's maps. Plain TCP/UDP (its transport
/// header right after the fixed one) is sorted at the entry by the
/// destination, port and reply filters (arrays, inlined, shared by both
/// families): not for a service or flow,
/// passed with no lookup; else its `CT6` lookup made here, and a tracked
/// flow's packet translated here; no flow: its frontend looked up in
/// [`kpx_tc_ingress6`] (a tail call), a first packet set up in
/// [`kpx_tc_new6`] (a second). Anything else all in [`kpx_tc_ingress6`].
///
/// A translated packet then costs one FIB lookup ([`forward`]), except an
/// established one at ingress, whose flow entry caches its next hop
/// (asked again on the entry's refresh, at most once a second, or for a
/// longer packet than the one whose MTU check it passed).
/// A packet the XDP program already translated ([`kpx_xdp`]) costs no
/// lookup but its FIB lookup: it is only forwarded.
///
/// Direct server return ([`dsr`]), on top of the path above:
/// - a new flow sent in Geneve: its lookups as a first packet's, then 2
///   FIB (route with the outer headers' length, outer source); the packet
///   parsed a second time, in DSR's subprogram;
/// - a packet of such a flow sent in Geneve again (a SYN before the
///   handshake completes, a UDP datagram): its `CT` lookup twice (the
///   path's, then DSR's subprogram's), 2 FIB;
/// - the client's first ACK of such a flow: the `CT_TCP` miss, the frontend,
///   1 `CT_ANY` lookup, then moved to `CT_TCP` as a SYN-ACK moves a flow
///   (once per flow; only to an external frontend with the Cluster policy);
/// - a Geneve packet for a backend here: the frontend it names (1, or 2 for
///   a NodePort), its flow's `CT` (1 lookup, or 2 inserts for a new one),
///   1 FIB;
/// - a UDP packet to the Geneve port that is not DSR's: none more.
///
/// IPv6's the same, in IPv6's maps (a Geneve packet to the Geneve port is
/// sorted to `kpx_tc_ingress6`, which hands it over; a request that cannot
/// be served goes back there, for the path without DSR: its lookups again).
///
/// No loop over services or backends exists anywhere in the program.
///
/// Direct server return's encapsulation and decapsulation
/// ([`dsr::Request`]) run in a program of their own, [`kpx_tc_dsr`],
/// tail-called: the packet's path returns the request rather than calling
/// DSR's code, so DSR's stack never adds to its own (the verifier's 512
/// bytes), and a packet that needs none of it pays one compare.
#[classifier]
// The macro's wrapper calls this body: inlined, the program is one
// function, with no BPF-to-BPF call on every packet's path.
#[inline(always)]
pub fn kpx_tc_ingress(ctx: TcContext) -> i32 {
    if packet::translated_by_xdp(&ctx) {
        return forward_translated(&ctx);
    }
    match process(&ctx, true) {
        dsr::REQUESTED => dsr::tail_call(&ctx),
        family::IPV6 => ingress6(&ctx),
        action => action as i32,
    }
}

/// An IPv6 packet at [`kpx_tc_ingress`]: plain TCP or UDP is sorted, and
/// looked up in conntrack, here (an established packet is translated in
/// this program: no tail call, no second parse); any other goes on in
/// [`kpx_tc_ingress6`]: one of no flow to its frontend, from where the
/// entry left it, the rest from the start.
#[inline(always)]
fn ingress6(ctx: &TcContext) -> i32 {
    match entry6(ctx) {
        Ok(Verdict::Dsr(req)) => dsr::hand_over::<In6>(ctx, req),
        Ok(v) => verdict::action(v),
        Err(rest) => family::hand_over6(ctx, rest),
    }
}

/// The IPv6 part of tc ingress's and XDP's entries: the verdict of an
/// untracked packet or of a tracked flow's, or what is left to do
/// ([`Rest::Frontend`]: the packet and its tuple are in this CPU's scratch
/// space).
#[inline(always)]
fn entry6<P: Packet>(ctx: &P) -> Result<Verdict, Rest> {
    match family::sort6(ctx) {
        Entry6::Untracked => Ok(Verdict::Pass(Counter::PassNoService)),
        Entry6::Other => Err(Rest::Path),
        Entry6::Plain => {
            let Some(s) = maps::scratch6() else {
                return Ok(Verdict::Pass(Counter::PassNotHandled));
            };
            // Plain, so a packet (`sort6` checked what parsing checks but
            // the transport header's own length).
            if parse::parse_plain6(ctx, &mut s.pkt) != Kind::Packet {
                return Err(Rest::Path);
            }
            s.pkt.tuple_into(&mut s.key);
            tracked(ctx, &s.pkt, &s.key, Origin::Network, true).ok_or(Rest::Frontend)
        }
    }
}

/// [`kpx_tc_ingress6`] at XDP for a packet XDP found no flow for
/// (`XDP_PROG_SERVICE6`): its frontend; a first packet goes on in
/// [`kpx_xdp_new6`]; a REJECT is tc's.
#[xdp]
pub fn kpx_xdp_service6(ctx: XdpContext) -> u32 {
    match service6(&ctx, true) {
        Verdict::NewFlow => family::tail_call_xdp(&ctx, XDP_PROG_NEW6),
        v => verdict::xdp_action(v),
    }
}

/// An IPv6 packet of no flow, parsed in scratch space by its entry: its
/// frontend (a new flow's for the program that sets it up, or a REJECT),
/// or passed.
#[inline(always)]
fn service6<P: Packet>(ctx: &P, dsr: bool) -> Verdict {
    let Some(s) = maps::scratch6() else {
        return Verdict::Pass(Counter::PassNotHandled);
    };
    let ports = service::Ports::of_read(s.pkt.dport, || None::<In6>);
    to_service(ctx, &s.pkt, &s.key, ports, Origin::Network, dsr)
}

/// tc ingress for the IPv6 packets its entry does not finish, tail-called
/// by [`kpx_tc_ingress`] ([`family::hand_over6`]): a plain TCP/UDP packet
/// of no flow, parsed by the entry, goes on to its frontend; the rest
/// (ICMPv6, extension headers, fragments, malformed ones) takes the whole
/// path. A program of its own: parsing a header chain, translating ICMPv6
/// errors and a frontend's lookups need a stack of their own beside
/// IPv4's, and the verifier's 512 bytes are per program. The same path
/// and lookups as IPv4's, with IPv6's maps; direct server return's
/// requests handed to [`kpx_tc_dsr`] as IPv4's, and a packet whose request
/// it could not serve taken back here without DSR
/// ([`family::decline_dsr6`]).
#[classifier]
pub fn kpx_tc_ingress6(ctx: TcContext) -> i32 {
    let dsr = !family::dsr_declined(&ctx);
    let v = if family::handed_frontend(&ctx) {
        service6(&ctx, dsr)
    } else {
        path6(&ctx, dsr)
    };
    match v {
        Verdict::NewFlow => family::tail_call(&ctx, PROG_NEW6),
        Verdict::Dsr(req) => dsr::hand_over::<In6>(&ctx, req),
        v => verdict::action(v),
    }
}

/// Direct server return's work for the packet tc ingress handed over (the
/// request in its control buffer, [`dsr::stash`]): in subprograms of their
/// own ([`dsr::run`]). A request that cannot be served (the route cannot
/// carry the Geneve packet) takes the packet's path again without DSR, in
/// a subprogram too, beside them.
#[classifier]
pub fn kpx_tc_dsr(ctx: TcContext) -> i32 {
    let action = dsr::run(&ctx);
    if action != dsr::NOT_SENT {
        return action as i32;
    }
    if dsr::ipv6_request(&ctx) {
        return family::decline_dsr6(&ctx);
    }
    without_dsr(&ctx) as i32
}

/// The packet's path without direct server return: for [`kpx_tc_dsr`].
#[inline(never)]
fn without_dsr(ctx: &TcContext) -> i64 {
    process(ctx, false)
}

/// XDP on the node's external interfaces: packets from outside the node,
/// before the kernel builds an skb for them. The same path as tc ingress
/// (same functions, same maps, same lookups per packet as listed there),
/// for TCP and UDP packets of tracked flows and new flows to a service
/// (IPv6: sorted as tc ingress's entry sorts them, a first packet set up
/// in [`kpx_xdp_service6`] and [`kpx_xdp_new6`], tail-called as tc's);
/// everything else (ICMP, fragments, malformed packets, extension headers,
/// REJECTs) passes untouched, to tc ingress. A translated packet whose
/// next hop is out of the interface it came in (a backend or client on
/// another node) is sent back out with `XDP_TX`, the rest go up marked as
/// translated, for tc ingress to forward (both families: see
/// `forward_translated`): so a flow's packet is translated by exactly one
/// hook, and its conntrack entries change once.
#[xdp]
// Inlined into the macro's wrapper, as `kpx_tc_ingress` is.
#[inline(always)]
pub fn kpx_xdp(ctx: XdpContext) -> u32 {
    let v = match family::sort4(&ctx) {
        // Passed uncounted, as `xdp_action` passes: tc ingress counts it.
        Entry4::Untracked => return aya_ebpf::bindings::xdp_action::XDP_PASS,
        Entry4::Plain(pkt, ports) => flow_sorted(&ctx, &pkt, ports, Origin::Network, true),
        // IPv6: sorted as at tc ingress's entry, a tracked flow's packet
        // translated here, one of no flow handed to `kpx_xdp_service6`;
        // the rest (ICMPv6, extension headers) goes on to tc ingress.
        Entry4::Ipv6 => match entry6(&ctx) {
            Ok(v) => v,
            Err(Rest::Frontend) => return family::tail_call_xdp(&ctx, XDP_PROG_SERVICE6),
            Err(Rest::Path) => Verdict::Pass(Counter::PassNotHandled),
        },
        // (An IPv6 frame the sort did not take for one is shorter than an
        // Ethernet header: passed with the rest.)
        Entry4::Other => match parse::parse_ipv4(&ctx) {
            Parsed::Packet(pkt) if pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP => {
                flow(&ctx, &pkt, Origin::Network, true)
            }
            _ => Verdict::Pass(Counter::PassNotHandled),
        },
    };
    verdict::xdp_action(v)
}

/// A packet XDP translated and handed up: sent to its next hop as tc sends
/// what it translates itself, uncounted (XDP counted it).
#[inline(always)]
fn forward_translated(ctx: &TcContext) -> i32 {
    // The stack could not forward a masqueraded packet itself: its source
    // is the node's own address, a martian on input.
    let sent = match parse::parse_ipv4(ctx) {
        Parsed::Packet(pkt) => forward::onward(ctx, &pkt),
        Parsed::OtherFamily => {
            let Some(s) = maps::scratch6() else {
                return PASS;
            };
            if parse::parse_ipv6(ctx, &mut s.pkt) != Kind::Packet {
                return PASS;
            }
            forward::onward(ctx, &s.pkt)
        }
        _ => return PASS,
    };
    sent.unwrap_or_else(|_| verdict::action(Verdict::Drop(DropReason::RewriteFailed)))
}

/// tc egress on the same interfaces: packets the node itself sends.
///
/// - packets kpx already translated (`MARK_TRANSLATED`): 0 lookups, passed;
/// - ICMP errors about translated flows (fragmentation needed towards a
///   backend's smaller MTU, for one), which never cross an ingress hook:
///   1 (`CT`);
/// - forwarded TCP/UDP (received on an interface, `skb_iif` set: kube-proxy's
///   OUTPUT chain never sees it, and ingress already had it): 0, passed on
///   its protocol's byte before any parse (IPv6's: without extension
///   headers);
/// - the node's own TCP/UDP: 1 (`NODE_ADDRS`, is the source this node?);
///   from the node: as a new or tracked flow at ingress, without the
///   NodePort lookup (a node's packets to its own address never leave
///   through an interface), and always with a FIB lookup: the stack routed
///   the packet before its destination changed.
///
/// Only translations are counted.
#[classifier]
// Inlined into the macro's wrapper, as `kpx_tc_ingress` is.
#[inline(always)]
pub fn kpx_tc_egress(ctx: TcContext) -> i32 {
    if forward::mark(&ctx) & MARK_TRANSLATED != 0 {
        return PASS;
    }
    let own = packet::sent_by_node(&ctx);
    // Forwarded TCP or UDP, a pod's packet to a pod the commonest: passed
    // on its protocol's byte, unparsed.
    if !own && family::plain_transport(&ctx) {
        return PASS;
    }
    let v = match parse::parse_ipv4(&ctx) {
        Parsed::Packet(pkt) => match pkt.proto {
            IPPROTO_ICMP => icmp::translate_error(&ctx, &pkt),
            IPPROTO_TCP | IPPROTO_UDP if own && service::is_node_addr(pkt.src) => {
                flow(&ctx, &pkt, Origin::Node, false)
            }
            _ => return PASS,
        },
        Parsed::OtherFamily => return family::tail_call(&ctx, PROG_EGRESS6),
        _ => return PASS,
    };
    match v {
        Verdict::Pass(_) => PASS,
        v => verdict::action(v),
    }
}

/// tc egress for IPv6, tail-called by [`kpx_tc_egress`]: as for IPv4
/// (ICMPv6 errors about translated flows included). Lookups as listed
/// there.
#[classifier]
pub fn kpx_tc_egress6(ctx: TcContext) -> i32 {
    let Some(s) = maps::scratch6() else {
        return PASS;
    };
    if parse::parse_ipv6(&ctx, &mut s.pkt) != Kind::Packet {
        return PASS;
    }
    let v = match s.pkt.proto {
        IPPROTO_ICMPV6 => icmp::translate_error6(&ctx, &s.pkt),
        IPPROTO_TCP | IPPROTO_UDP
            if packet::sent_by_node(&ctx) && service::is_node_addr(s.pkt.src) =>
        {
            flow6(&ctx, s, Origin::Node, false)
        }
        _ => return PASS,
    };
    match v {
        Verdict::Pass(_) => PASS,
        Verdict::NewFlow => family::tail_call(&ctx, PROG_NEW6_NODE),
        v => verdict::action(v),
    }
}

/// The benchmark's floor: a tc program that does nothing. `cargo xtask
/// bench` runs it through `BPF_PROG_TEST_RUN` next to the real programs, so
/// the harness's own cost can be told apart from kpx's. Never attached.
#[classifier]
pub fn kpx_tc_floor(_ctx: TcContext) -> i32 {
    PASS
}

/// The benchmark's measure of the kernel's own share of an established
/// packet: the established table's lookup of the frame's tuple and nothing
/// else, read where it lies (IPv4 without options, IPv6 without extension
/// headers): `CT_TCP`'s 12-byte key or `CT6_TCP`'s 36-byte one, hashed
/// whole by the kernel. `cargo xtask bench` runs it on both families'
/// established frames: their difference is what no IPv6 program keyed by
/// its tuple can save. `TC_ACT_OK` on a hit, `TC_ACT_UNSPEC` on a miss (the
/// bench checks that it measures hits). Never attached.
#[classifier]
pub fn kpx_tc_floor_ct(ctx: TcContext) -> i32 {
    use parse::{read_linear, ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
    use proxy_common::CtTuple;
    let hit = match read_linear::<_, u16>(&ctx, 12).map(u16::from_be) {
        Some(ETH_P_IP) => read_linear::<_, CtTuple>(&ctx, ETH_HLEN + 12)
            .is_some_and(|t| maps::CT_TCP.get_ptr(t).is_some()),
        Some(ETH_P_IPV6) => read_linear::<_, CtTuple<In6>>(&ctx, ETH_HLEN + 8)
            .is_some_and(|t| maps::CT6_TCP.get_ptr(t).is_some()),
        _ => false,
    };
    if hit {
        aya_ebpf::bindings::TC_ACT_OK
    } else {
        PASS
    }
}

/// The benchmark's floor for the XDP program: an XDP program that does
/// nothing. Never attached.
#[xdp]
pub fn kpx_xdp_floor(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Never attached: the agent's conntrack collector runs it on the
/// established flows it expires (see `conns::expire`).
#[classifier]
pub fn kpx_conns_expire(ctx: TcContext) -> i32 {
    conns::expire::<u32>(&ctx)
}

/// [`kpx_conns_expire`] for IPv6's flows.
#[classifier]
pub fn kpx_conns_expire6(ctx: TcContext) -> i32 {
    conns::expire::<In6>(&ctx)
}

/// Socket-level load balancing ([`sock`]), on the cgroup the agent was
/// given: `connect()` to a service connected to a backend. Lookups: see
/// [`sock`]; none but the port filter for a port no frontend uses.
#[cgroup_sock_addr(connect4)]
pub fn kpx_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// Unconnected UDP `sendmsg()` to a service: to the socket's backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn kpx_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

/// UDP `recvmsg()`: a backend's datagram shown as from the service.
/// One `SOCKS` lookup.
#[cgroup_sock_addr(recvmsg4)]
pub fn kpx_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// `getpeername()`: the service address, as with kube-proxy. One `SOCKS`
/// lookup.
#[cgroup_sock_addr(getpeername4)]
pub fn kpx_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// The same four for `AF_INET6` sockets, with IPv6's maps (`SOCKS6`, ...):
/// the same lookups.
#[cgroup_sock_addr(connect6)]
pub fn kpx_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kpx_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kpx_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn kpx_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// A socket's release: its `SOCKS` (and `SOCKS6`) entry goes. One context
/// load (the family) and one lookup (two for an `AF_INET6` socket).
#[cgroup_sock(sock_release)]
pub fn kpx_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// The packet's path at tc ingress, to its tc action, counted; or
/// [`dsr::REQUESTED`] when `dsr` (direct server return may be asked for,
/// which a second run after a request that could not be served does not)
/// and the path asked for it.
#[inline(always)]
fn process(ctx: &TcContext, dsr: bool) -> i64 {
    match path(ctx, dsr) {
        Verdict::Dsr(req) => dsr::stash::<u32>(ctx, req),
        Verdict::Ipv6 => family::IPV6,
        v => verdict::action(v) as i64,
    }
}

#[inline(always)]
fn path(ctx: &TcContext, dsr: bool) -> Verdict {
    match family::sort4(ctx) {
        Entry4::Untracked => return Verdict::Pass(Counter::PassNoService),
        Entry4::Plain(pkt, ports) => return flow_sorted(ctx, &pkt, ports, Origin::Network, dsr),
        Entry4::Ipv6 => return Verdict::Ipv6,
        Entry4::Other => {}
    }
    let pkt = match parse::parse_ipv4(ctx) {
        Parsed::NotHandled => return Verdict::Pass(Counter::PassNotHandled),
        Parsed::OtherFamily => return Verdict::Ipv6,
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
    if dsr && dsr::is_geneve(&pkt) {
        return Verdict::Dsr(dsr::Request::Geneve);
    }
    flow(ctx, &pkt, Origin::Network, dsr)
}

/// [`path`] for IPv6.
#[inline(always)]
fn path6(ctx: &TcContext, dsr: bool) -> Verdict {
    let Some(s) = maps::scratch6() else {
        return Verdict::Pass(Counter::PassNotHandled);
    };
    match parse::parse_ipv6(ctx, &mut s.pkt) {
        Kind::NotHandled => return Verdict::Pass(Counter::PassNotHandled),
        Kind::Malformed => {
            return if service::is_service_addr(s.pkt.dst) {
                Verdict::Drop(DropReason::MalformedToService)
            } else {
                Verdict::Pass(Counter::PassMalformed)
            };
        }
        Kind::Fragment => {
            return if service::is_service_addr(s.pkt.dst) {
                Verdict::Drop(DropReason::FragmentToService)
            } else {
                Verdict::Pass(Counter::PassFragment)
            };
        }
        Kind::Packet => {}
    }
    if s.pkt.proto == IPPROTO_ICMPV6 {
        // Errors about translated flows; neighbour discovery and the rest
        // pass.
        return icmp::translate_error6(ctx, &s.pkt);
    }
    if s.pkt.proto != IPPROTO_TCP && s.pkt.proto != IPPROTO_UDP {
        return Verdict::Pass(Counter::PassNotHandled);
    }
    if dsr && dsr::is_geneve(&s.pkt) {
        return Verdict::Dsr(dsr::Request::Geneve);
    }
    flow6(ctx, s, Origin::Network, dsr)
}

/// An IPv6 flow's first packet at [`kpx_tc_ingress6`], tail-called
/// (`PROG_NEW6`): the packet, its tuple and frontend are in this CPU's
/// scratch space, where the path left them. Lookups as a first packet's in
/// [`kpx_tc_ingress`], but the service's (done before the hand-over).
#[classifier]
pub fn kpx_tc_new6(ctx: TcContext) -> i32 {
    match new6(&ctx, Origin::Network, !family::dsr_declined(&ctx)) {
        Verdict::Dsr(req) => dsr::hand_over::<In6>(&ctx, req),
        v => verdict::action(v),
    }
}

/// [`kpx_tc_new6`] at XDP (`XDP_PROG_NEW6`).
#[xdp]
pub fn kpx_xdp_new6(ctx: XdpContext) -> u32 {
    verdict::xdp_action(new6(&ctx, Origin::Network, true))
}

/// [`kpx_tc_new6`] for [`kpx_tc_egress6`] (`PROG_NEW6_NODE`): a program of
/// its own, so each knows its origin when compiled (the two origins' paths
/// in one program outgrew its stack).
#[classifier]
pub fn kpx_tc_new6_node(ctx: TcContext) -> i32 {
    verdict::action(new6(&ctx, Origin::Node, false))
}

/// An IPv6 flow's first packet, its tuple and frontend in this CPU's
/// scratch space (the programs of `PROG_NEW6`, `PROG_NEW6_NODE` and
/// `XDP_PROG_NEW6`).
#[inline(always)]
fn new6<P: Packet>(ctx: &P, origin: Origin, dsr: bool) -> Verdict {
    let Some(s) = maps::scratch6() else {
        return Verdict::Pass(Counter::PassNotHandled);
    };
    new_flow(ctx, &s.pkt, &s.key, &s.svc, origin, s.recovered, dsr)
}

/// [`flow`] for IPv6, its packet parsed into `s`.
#[inline(always)]
fn flow6(ctx: &TcContext, s: &'static mut maps::Scratch6, origin: Origin, dsr: bool) -> Verdict {
    s.pkt.tuple_into(&mut s.key);
    flow_of(ctx, &s.pkt, &s.key, origin, dsr)
}

/// A TCP/UDP packet: of a tracked flow, a new flow to a service, or neither;
/// `dsr` as in `process`.
#[inline(always)]
fn flow<P: Packet, A: Family>(ctx: &P, pkt: &IpPacket<A>, origin: Origin, dsr: bool) -> Verdict {
    let key = pkt.tuple();
    flow_of(ctx, pkt, &key, origin, dsr)
}

/// [`flow`], for the packet's tuple `key`.
#[inline(always)]
fn flow_of<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    key: &CtKey<A>,
    origin: Origin,
    dsr: bool,
) -> Verdict {
    let ports = if A::FILTERED_AHEAD {
        service::Ports::of_read(pkt.dport, || None::<A>)
    } else {
        service::Ports::of(pkt.dst, pkt.dport)
    };
    // Known flow, either direction: one lookup decides the rewrite. Only
    // for a packet to a frontend's port or from a backend's: no other can
    // be of a tracked flow, and most traffic that is not for a service
    // (a pod's to a pod, socket-balanced flows' requests) skips it.
    // IPv6's entry asked the reply filter already (`sort6`).
    if ports.may_be_tracked(pkt.sport, || (!A::FILTERED_AHEAD).then_some(*key)) {
        if let Some(v) = tracked(ctx, pkt, key, origin, dsr) {
            return v;
        }
    }
    to_service(ctx, pkt, key, ports, origin, dsr)
}

/// [`flow`] for a packet the entry sorted ([`family::sort4`]): `ports` is
/// what the filters said of it, which found that it may be tracked.
#[inline(always)]
fn flow_sorted<P: Packet>(
    ctx: &P,
    pkt: &parse::Ipv4Packet,
    ports: service::Ports,
    origin: Origin,
    dsr: bool,
) -> Verdict {
    let key = pkt.tuple();
    if let Some(v) = tracked(ctx, pkt, &key, origin, dsr) {
        return v;
    }
    to_service(ctx, pkt, &key, ports, origin, dsr)
}

/// The packet's verdict if it is of a tracked flow (its entry's rewrite,
/// or a drop); `None` if not (or a new connection reuses a closing flow's
/// tuple: that flow is forgotten). One conntrack lookup (two for a TCP SYN
/// or RST that misses `CT_TCP`).
#[inline(always)]
fn tracked<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    key: &CtKey<A>,
    origin: Origin,
    dsr: bool,
) -> Option<Verdict> {
    let found = conntrack::lookup(key, pkt.tcp_flags)?;
    let found = conntrack::newer(key, found, pkt.tcp_flags);
    if pkt.proto == IPPROTO_TCP && pkt.is_syn() && conntrack::closed_original(found.entry) {
        // A new connection reusing a closing flow's tuple.
        conntrack::remove_flow(key, found);
        return None;
    }
    Some(match conntrack::handshake(key, found, pkt.tcp_flags) {
        Ok(found) => established(ctx, pkt, key, found, Hook::of(origin), dsr),
        Err(reason) => Verdict::Drop(reason),
    })
}

/// A TCP/UDP packet of no tracked flow: a new flow to its frontend (or the
/// frontend's REJECT), or passed (no frontend).
#[inline(always)]
fn to_service<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    key: &CtKey<A>,
    ports: service::Ports,
    origin: Origin,
    dsr: bool,
) -> Verdict {
    let hook = Hook::of(origin);
    let svc = match origin {
        Origin::Network => service::lookup(ports, pkt.dst, pkt.dport, pkt.proto),
        // The node's packets to its own addresses go through loopback.
        Origin::Node => service::lookup_exact(ports, pkt.dst, pkt.dport, pkt.proto),
    };
    let Some(svc) = svc else {
        return Verdict::Pass(Counter::PassNoService);
    };
    let recovered = pkt.proto == IPPROTO_TCP && !pkt.is_syn();
    // A DSR flow's handshake completing: only to an external frontend with
    // the Cluster policy (no lookup for anything else).
    if recovered && svc.flags & (SVC_F_EXTERNAL | SVC_F_LOCAL) == SVC_F_EXTERNAL {
        if let Some(found) = conntrack::dsr_handshake(key) {
            return established(ctx, pkt, key, found, hook, dsr);
        }
    }
    if recovered && !recoverable(pkt, svc) {
        // Mid-stream TCP nobody tracks: the reference's ctstate INVALID.
        return Verdict::Drop(DropReason::InvalidTcp);
    }
    if svc.count == 0 {
        // The reference's REJECT: the client learns at once.
        return match ctx.reject(pkt, hook) {
            Some(Ok(action)) => Verdict::Redirect(action),
            Some(Err(())) => Verdict::Drop(DropReason::NoBackend),
            // XDP: tc ingress answers it.
            None => Verdict::Pass(Counter::PassNoService),
        };
    }
    if A::NEW_FLOW_APART {
        // IPv6: in a program of its own (`kpx_tc_new6`), whose stack is
        // its own.
        return A::hand_over(svc, recovered);
    }
    new_flow(ctx, pkt, key, svc, origin, recovered, dsr)
}

/// Whether a mid-stream TCP segment with no flow entry can take up its flow
/// again: its service's scheduler hashes (the segment reaches the backend
/// its connection had, as IPVS's `mh` does after a lost connection entry),
/// the service has backends, and the segment is an ordinary one (ACK, no
/// SYN or RST).
#[inline(always)]
fn recoverable<A>(pkt: &IpPacket<A>, svc: &proxy_common::ServiceValue) -> bool {
    hashing(scheduler(svc.flags))
        && svc.count != 0
        && pkt.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
}

/// A packet of a tracked flow: apply the entry's rewrite.
#[inline(always)]
fn established<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    key: &CtKey<A>,
    found: conntrack::Found<A>,
    hook: Hook,
    dsr: bool,
) -> Verdict {
    // Only a packet from outside (ingress) is ever a DSR flow's original.
    // Untouched here: tc puts it in Geneve (XDP passes it on). One that
    // does not fit (`dsr` false) goes as the flow's others: its flow is
    // known at the backend's node from the packets before.
    if dsr && hook == Hook::Ingress && conntrack::dsr_encapsulates(found, pkt.proto, pkt.is_syn()) {
        return if P::XDP {
            Verdict::Pass(Counter::PassNotHandled)
        } else {
            Verdict::Dsr(dsr::Request::Again)
        };
    }
    let (rewrite, refreshed) = conntrack::touch(found, key, pkt.tcp_flags);
    let to = &rewrite.translate(key);
    let route = forward::established(ctx, pkt, to, found.entry, rewrite, refreshed, hook);
    // XDP without metadata: untouched, uncounted; tc translates it.
    if ctx.leaves_to_tc(route.via, route.ifindex) {
        return Verdict::Pass(Counter::PassNotHandled);
    }
    let route = ctx.reachable(route);
    if nat::apply(ctx, pkt, to, route.ttl_dec(hook), &route).is_err() {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    stats::service(
        rewrite.svc_id,
        ctx.len(),
        false,
        rewrite.dir == CT_DIR_REPLY,
        P::XDP,
    );
    stats::count(if rewrite.dir == CT_DIR_REPLY {
        Counter::CtReply
    } else {
        Counter::CtOriginal
    });
    // A reply to the node's own flow arrives at ingress but is delivered
    // locally: the FIB says so, and the stack takes it.
    Verdict::Translated(ctx.send(route))
}

/// First packet of a flow to a service: apply the traffic policy, pick a
/// backend, track, translate, forward.
#[inline(always)]
fn new_flow<P: Packet, A: Family>(
    ctx: &P,
    pkt: &IpPacket<A>,
    key: &CtKey<A>,
    svc: &proxy_common::ServiceValue,
    origin: Origin,
    recovered: bool,
    dsr: bool,
) -> Verdict {
    let hook = Hook::of(origin);
    let cfg = service::config();
    let net = A::net(&cfg);
    let choice = match policy::decide(svc, pkt.src, origin, &cfg, &net) {
        Ok(c) => c,
        Err(reason) => return Verdict::Drop(reason),
    };
    let dsr = dsr && choice.masquerade && policy::dsr(svc, pkt.src, pkt.proto, origin, &cfg, &net);
    if P::XDP && (dsr || !packet::xdp_marks()) {
        // Untouched, before any choice is made: tc balances it, and puts
        // it in Geneve when its backend is on another node. Without
        // metadata, XDP could not hand tc a first packet it translated for
        // the stack (a backend here), and which one it is is known only
        // once the flow is set up: tc sets up every flow, and XDP takes its
        // packets from then on.
        return Verdict::Pass(Counter::PassNotHandled);
    }
    let table = select::Table::of(svc, choice.local);
    // What the node itself sends the client about this flow (ICMP errors,
    // a hostNetwork backend's replies) leaves through the interface the
    // flow came in on, whose tc egress program translates it: asked for
    // where it is not attached yet. A backend on the node's own address
    // (hostNetwork; the apiserver's endpoints name no node) would answer
    // before it is: its first packet is dropped, and the client's
    // retransmission finds egress attached. (Folded into the
    // selection's result: a drop path of its own made LLVM merge verdicts
    // into code the verifier refuses, `R4 !read_ok`.)
    let asked = origin == Origin::Network && !egress::ensure(ctx.ifindex());
    let sel = select::backend(svc, table, key, 0).and_then(|s| {
        if asked && service::is_node_addr(s.backend.addr) {
            Err(DropReason::EgressPending)
        } else {
            Ok(s)
        }
    });
    let sel = match sel {
        Ok(s) => s,
        Err(reason) => return Verdict::Drop(reason),
    };
    // Direct server return: a backend here answers through this node
    // anyway; one elsewhere gets the flow's first packet in Geneve, if the
    // route can carry it (else the flow is masqueraded, as without DSR).
    let local = sel.backend.flags & BACKEND_F_LOCAL != 0;
    if dsr && !local {
        return Verdict::Dsr(dsr::Request::First {
            svc_id: svc.svc_id,
            backend_id: sel.backend_id,
            backend: A::hand_dsr_backend(&sel.backend),
            counted: sel.counted,
        });
    }
    // A DSR flow that reaches here has a local backend: the client's
    // address is kept (`dsr && local`, though `local` holds here: LLVM
    // folds that form into the branch above, 7 instructions fewer than
    // `!dsr`, `pathlen`). A pod reaching itself through its service
    // (hairpin) is masqueraded, or its own reply would never leave it.
    let masquerade = (choice.masquerade && !(dsr && local))
        || (origin == Origin::Network && sel.backend.addr == pkt.src);
    let snat_addr = if masquerade && net.snat_addr() != A::ZERO {
        forward::masquerade_source(ctx, pkt, sel.backend.addr).unwrap_or(net.snat_addr())
    } else {
        A::ZERO
    };
    // The node's own packet may already carry that address.
    let snat_addr = if snat_addr == pkt.src {
        A::ZERO
    } else {
        snat_addr
    };
    let (port_min, port_max) = cfg.snat_ports();
    let snat = Snat {
        addr: snat_addr,
        port_min,
        port_max,
        extra_flags: if origin == Origin::Node {
            CT_F_FROM_NODE
        } else {
            0
        },
        counted: sel.counted,
        start: snat_start(svc, key, snat_addr),
    };
    let created = match conntrack::create(
        key,
        svc.svc_id,
        sel.backend_id,
        &sel.backend,
        pkt.tcp_flags,
        &snat,
    ) {
        Ok(r) => r,
        Err(reason) => return Verdict::Drop(reason),
    };
    if recovered {
        if let Err(reason) = conntrack::recover(&created.to) {
            return Verdict::Drop(reason);
        }
        stats::event(Event::FlowRecovered, 1);
    }
    let to = &created.to;
    let route = ctx.reachable(forward::route(ctx, pkt, to, hook));
    if nat::apply(ctx, pkt, to, route.ttl_dec(hook), &route).is_err() {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    stats::service(svc.svc_id, ctx.len(), true, false, P::XDP);
    stats::count(Counter::NewFlow);
    if origin == Origin::Node {
        stats::event(Event::FromNode, 1);
    }
    Verdict::Translated(ctx.send(route))
}

/// Where a masqueraded flow's port probe starts (0 without masquerade: no
/// helper call): a hash of the client's tuple under a hashing scheduler,
/// so a recovered flow gets its port back; random otherwise.
#[inline(always)]
fn snat_start<A: Family>(svc: &proxy_common::ServiceValue, key: &CtKey<A>, snat_addr: A) -> u32 {
    if snat_addr == A::ZERO {
        0
    } else if hashing(scheduler(svc.flags)) {
        flow_hash(!svc.affinity_id, key.src_addr.word(), key.src_port)
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    }
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
