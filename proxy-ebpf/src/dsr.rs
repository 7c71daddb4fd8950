//! Direct server return (`--nodeport-mode=dsr|hybrid`): a flow from outside
//! the cluster keeps the client's address all the way to a backend on
//! another node, and that node answers the client itself, from the service
//! address.
//!
//! The node that balances the flow sends its first packet (TCP: each SYN
//! until the handshake completes; UDP: every datagram that fits) already
//! translated to the backend, inside Geneve with the service address as an
//! option ([`proxy_common::dsr`]); its other packets go translated as
//! usual, with no outer header. The backend's node takes the packet out of
//! Geneve at tc ingress ([`geneve`]), notes the flow in its own conntrack
//! (the reply entry rewrites the backend's source to the service address)
//! and delivers it; the backend's replies are translated at its interface
//! and sent straight to the client.
//!
//! Why Geneve rather than IP-in-IP: the service address has to travel
//! with the packet, and with IP-in-IP it could only do so as the untouched
//! inner destination, so the backend's node would have to find the chosen
//! backend's port again (one more map, of every backend of every service);
//! a Geneve option carries it beside the translated packet, and UDP crosses
//! fabrics that drop other IP protocols. Its 48 bytes are paid by first
//! packets only for TCP (a SYN is small); a UDP datagram that would not
//! fit the route's MTU with them goes without (its flow is already known
//! there) or, as a flow's first, is masqueraded instead.

use aya_ebpf::{bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, programs::TcContext};
use proxy_common::{
    dsr::{ENCAP_LEN, GENEVE_PORT, OPT_CLASS, OPT_LEN_WORDS, OPT_TYPE, OPT_WORDS, PROTO_IPV4},
    flow_hash, Backend, Counter, CtKey, DropReason, Event, CT_F_DSR_DECAP, CT_F_DSR_ENCAP,
    IPPROTO_TCP, IPPROTO_UDP, PROG_DSR,
};

use crate::{
    conntrack::{self, Snat},
    csum::Sum,
    forward::{self, Hook, Route, Via},
    maps::PROGS,
    nat,
    packet::Packet,
    parse::{self, Ipv4Packet, Parsed, ETH_HLEN},
    service, stats,
    verdict::{self, Verdict},
};

/// The outer headers as stored, in words (memory order).
pub type Header = [u32; ENCAP_LEN / 4];

const OUTER_TTL: u8 = 64;
/// Don't fragment: the route's MTU was checked with the outer headers.
const IP_DF: [u8; 2] = [0x40, 0x00];

/// Geneve's first word: version 0, options length, no flags, protocol.
#[inline(always)]
fn geneve_word() -> u32 {
    let p = PROTO_IPV4.to_be_bytes();
    u32::from_ne_bytes([OPT_LEN_WORDS, 0, p[0], p[1]])
}

/// The option's first word: class, type, length of its data.
#[inline(always)]
fn option_word() -> u32 {
    let c = OPT_CLASS.to_be_bytes();
    u32::from_ne_bytes([c[0], c[1], OPT_TYPE, OPT_WORDS])
}

/// What [`first`], [`again`] and [`geneve`] return for a packet they did
/// not send: the caller goes on as without direct server return.
/// (No tc action: those are small, and a small constant is one compare.)
pub const NOT_SENT: i64 = 0x1000;

/// Work for direct server return that the packet's path hands back to
/// tc ingress's entry ([`crate::verdict::Verdict::Dsr`]), which passes it
/// to DSR's own program ([`tail_call`]).
#[derive(Clone, Copy)]
pub enum Request {
    /// A UDP packet to the Geneve port: [`geneve`].
    Geneve,
    /// A new flow to a backend on another node: [`first`].
    First {
        svc_id: u32,
        backend_id: u32,
        /// [`Backend::to_bits`].
        backend: u64,
        counted: bool,
    },
    /// A packet of such a flow that goes in Geneve too: [`again`].
    Again,
}

/// What the packet's path returns to its entry for a request it left in
/// the skb's control buffer ([`stash`]).
pub const REQUESTED: i64 = 0x1001;

const REQ_GENEVE: u32 = 1;
const REQ_FIRST: u32 = 2;
const REQ_AGAIN: u32 = 3;

/// Leaves `req` in the skb's control buffer (tc programs' scratch space,
/// five words), which a tail call keeps, for [`crate::kpx_tc_dsr`].
/// Returns [`REQUESTED`].
#[inline(always)]
pub fn stash(ctx: &TcContext, req: Request) -> i64 {
    let words = match req {
        Request::Geneve => [REQ_GENEVE, 0, 0, 0, 0],
        Request::First {
            svc_id,
            backend_id,
            backend,
            counted,
        } => [
            REQ_FIRST | (counted as u32) << 8,
            svc_id,
            backend_id,
            backend as u32,
            (backend >> 32) as u32,
        ],
        Request::Again => [REQ_AGAIN, 0, 0, 0, 0],
    };
    // SAFETY: the context's own skb; `cb` is five words tc programs may
    // write.
    unsafe { (*ctx.skb.skb).cb = words };
    REQUESTED
}

/// Hands the packet to [`crate::kpx_tc_dsr`], which runs the request
/// [`stash`] left: does not return, unless the program is not in
/// `KPX_PROGS` (an agent that did not load it): then the packet is
/// dropped, counted, but a Geneve packet, which goes on untouched.
#[inline(always)]
pub fn tail_call(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call into a classifier of this object, with this
    // context: on success control never comes back.
    unsafe { PROGS.tail_call(ctx, PROG_DSR) };
    // SAFETY: the context's own skb, read.
    let geneve = unsafe { (*ctx.skb.skb).cb[0] } & 0xff == REQ_GENEVE;
    verdict::action(if geneve {
        Verdict::Pass(Counter::PassNotHandled)
    } else {
        Verdict::Drop(DropReason::DsrUnavailable)
    })
}

/// Runs the request [`stash`] left: the packet's tc action, or NOT_SENT.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i64 {
    // SAFETY: the context's own skb, read.
    let w = unsafe { (*ctx.skb.skb).cb };
    match w[0] & 0xff {
        REQ_GENEVE => geneve(ctx),
        REQ_FIRST => first(
            ctx,
            w[1],
            w[2],
            w[3] as u64 | (w[4] as u64) << 32,
            w[0] >> 8 != 0,
        ),
        REQ_AGAIN => again(ctx),
        _ => NOT_SENT,
    }
}

/// A flow's way to its backend's node, decided before anything is written.
#[derive(Clone, Copy)]
struct Plan {
    route: Route,
    /// The outer source: this node's address towards the backend.
    src: u32,
}

/// How `pkt`, translated to `to`, reaches its backend in Geneve: None when
/// it cannot (the FIB has no forwardable route for it, the packet with the
/// outer headers would not fit the route's MTU, this node has no address
/// towards it). Two FIB lookups.
#[inline(always)]
fn plan(ctx: &TcContext, pkt: &Ipv4Packet, to: &CtKey) -> Option<Plan> {
    let len = pkt.ip_len().checked_add(ENCAP_LEN as u16)?;
    let route = forward::route_sized(ctx, pkt, to, Hook::Ingress, len);
    if route.via == Via::Stack {
        return None;
    }
    let src = forward::masquerade_source(ctx, pkt, to.dst_addr)?;
    Some(Plan { route, src })
}

/// A new flow from outside to `svc`, balanced to `sel`, a backend on
/// another node: its entries created (no masquerade, `CT_F_DSR_ENCAP`) and
/// its first packet sent there in Geneve; its tc action, counted. NOT_SENT
/// (nothing written) when the route cannot carry it: the caller
/// masquerades the flow instead. Lookups: 2 FIB, then as any new flow's
/// creation.
///
/// A BPF subprogram, as are [`again`] and [`geneve`], of DSR's own program
/// ([`crate::kpx_tc_dsr`]): inlined, or called from deep in the packet's
/// path, their locals (FIB requests, headers) took the program's stack
/// past 512 bytes. The packet is parsed here once more: the path's parse
/// stayed in the program that handed it over.
#[inline(never)]
pub fn first(ctx: &TcContext, svc_id: u32, backend_id: u32, backend: u64, counted: bool) -> i64 {
    let Parsed::Packet(pkt) = parse::parse_ipv4(ctx) else {
        return NOT_SENT;
    };
    let pkt = &pkt;
    let key = &pkt.tuple();
    let backend = Backend::from_bits(backend);
    let to = CtKey::new(pkt.src, backend.addr, pkt.sport, backend.port, pkt.proto);
    let Some(plan) = plan(ctx, pkt, &to) else {
        stats::event(Event::DsrFallback, 1);
        return NOT_SENT;
    };
    let snat = Snat {
        addr: 0,
        port_min: 0,
        port_max: 0,
        extra_flags: CT_F_DSR_ENCAP,
        counted,
        start: 0,
    };
    let v = match conntrack::create(key, svc_id, backend_id, &backend, pkt.tcp_flags, &snat) {
        // The flow's entry, ours or (the same flow's first packet on
        // another CPU, a moment earlier) the one that won.
        Ok(e)
            if e.to.dst_addr == to.dst_addr
                && e.to.dst_port == to.dst_port
                && e.flags & CT_F_DSR_ENCAP != 0 =>
        {
            send(ctx, pkt, &to, &plan, svc_id, true)
        }
        // That one chose another backend (or no DSR): this duplicate is
        // dropped rather than sent against the flow's entry.
        Ok(_) => Verdict::Drop(DropReason::CtInsertFailed),
        Err(reason) => Verdict::Drop(reason),
    };
    verdict::action(v) as i64
}

/// A packet of a flow [`first`] sent that goes in Geneve too (a SYN again,
/// a UDP datagram; [`conntrack::dsr_encapsulates`]): its entry refreshed
/// and the packet sent; its tc action, counted. NOT_SENT (nothing
/// written) when the route cannot carry it: the caller sends it as the
/// flow's other packets. Lookups: the flow's entry again (the path's
/// lookup stayed in the program that handed it over), 2 FIB.
#[inline(never)]
pub fn again(ctx: &TcContext) -> i64 {
    let Parsed::Packet(pkt) = parse::parse_ipv4(ctx) else {
        return NOT_SENT;
    };
    let pkt = &pkt;
    let key = &pkt.tuple();
    let Some(found) = conntrack::lookup(key, pkt.tcp_flags) else {
        return NOT_SENT;
    };
    // SAFETY: as in `conntrack::touch`; copied at once.
    let to = unsafe { &*found.entry }.translate(key);
    let Some(plan) = plan(ctx, pkt, &to) else {
        return NOT_SENT;
    };
    let (e, _) = conntrack::touch(found, key, pkt.tcp_flags);
    verdict::action(send(ctx, pkt, &to, &plan, e.svc_id, false)) as i64
}

/// Translates `pkt` to `to` (the service address it was sent to kept in an
/// option), puts it in Geneve and sends it along `plan`; counted in
/// `svc_id`'s statistics (a `new_flow`'s first packet or not).
#[inline(always)]
fn send(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    to: &CtKey,
    plan: &Plan,
    svc_id: u32,
    new_flow: bool,
) -> Verdict {
    let route = plan.route;
    let len = ctx.len();
    if nat::apply(ctx, pkt, to, route.ttl_dec(Hook::Ingress), &route).is_err() {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    if encap(ctx, &header(pkt, to, plan.src)).is_err() {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    stats::event(Event::DsrEncap, 1);
    stats::service(svc_id, len, new_flow, false, false);
    stats::count(if new_flow {
        Counter::NewFlow
    } else {
        Counter::CtOriginal
    });
    Verdict::Translated(forward::send(ctx, route))
}

/// The outer headers for `pkt` (service address and port: its destination
/// before translation) translated to `to`, from `src`.
#[inline(always)]
fn header(pkt: &Ipv4Packet, to: &CtKey, src: u32) -> Header {
    let inner = pkt.ip_len();
    let total = (inner + ENCAP_LEN as u16).to_be_bytes();
    let udp_len = (inner + (ENCAP_LEN - 20) as u16).to_be_bytes();
    // Entropy for the fabric's ECMP, in the ephemeral range.
    let sport = (0xc000 | (flow_hash(0, pkt.src, pkt.sport) & 0x3fff) as u16).to_be_bytes();
    let dport = GENEVE_PORT.to_be_bytes();
    let svc_port = pkt.dport.to_ne_bytes();
    let mut h: Header = [
        u32::from_ne_bytes([0x45, pkt.tos, total[0], total[1]]),
        u32::from_ne_bytes([0, 0, IP_DF[0], IP_DF[1]]),
        u32::from_ne_bytes([OUTER_TTL, IPPROTO_UDP, 0, 0]),
        src,
        to.dst_addr,
        u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]),
        // Checksum 0: none, as RFC 8926 allows over IPv4; the inner
        // packet's own checksums cover what matters.
        u32::from_ne_bytes([udp_len[0], udp_len[1], 0, 0]),
        geneve_word(),
        0,
        option_word(),
        pkt.dst,
        u32::from_ne_bytes([svc_port[0], svc_port[1], 0, 0]),
    ];
    let check = Sum::zero()
        .add(h[0])
        .add(h[1])
        .add(h[2])
        .add(h[3])
        .add(h[4])
        .checksum()
        .to_ne_bytes();
    h[2] = u32::from_ne_bytes([OUTER_TTL, IPPROTO_UDP, check[0], check[1]]);
    h
}

/// Grows the skb by the outer headers, after its Ethernet header, and
/// writes them. The inner packet stays where it is in memory, so a
/// checksum the device is still to compute (`CHECKSUM_PARTIAL`) keeps
/// pointing at it.
#[inline(always)]
fn encap(ctx: &TcContext, hdr: &Header) -> Result<(), ()> {
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    ctx.store(ETH_HLEN, hdr, 0).map_err(|_| ())
}

/// A `T` at `off`: from the linear data by a plain load, else copied.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    parse::read_linear(ctx, off).or_else(|| <TcContext as Packet>::load(ctx, off).ok())
}

/// The option of a Geneve packet from another node's [`send`]: the
/// service address and port the client used.
struct Carried {
    svc_addr: u32,
    svc_port: u16,
}

/// Geneve, from the UDP payload on: header and our option.
#[repr(C)]
#[derive(Clone, Copy)]
struct GeneveOpt {
    geneve: [u32; 2],
    option: [u32; 3],
}

/// What the outer headers of `pkt` (UDP to the Geneve port) carry, when
/// they are exactly what [`send`] writes and the inner packet is to the
/// outer destination: else None, and the packet is not DSR's.
#[inline(always)]
fn carried(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<Carried> {
    if pkt.l4_off != pkt.l3_off + 20 || (pkt.ip_len() as usize) < ENCAP_LEN + 20 {
        return None;
    }
    let g: GeneveOpt = read(ctx, pkt.l4_off + 8)?;
    if g.geneve[0] != geneve_word() || g.option[0] != option_word() {
        return None;
    }
    let inner_dst: u32 = read(ctx, pkt.l3_off + ENCAP_LEN + parse::ip::DADDR)?;
    if inner_dst != pkt.dst {
        return None;
    }
    let p = g.option[2].to_ne_bytes();
    Some(Carried {
        svc_addr: g.option[1],
        svc_port: u16::from_ne_bytes([p[0], p[1]]),
    })
}

/// Whether `pkt` may be a Geneve packet of [`send`]'s: UDP to its port.
#[inline(always)]
pub fn is_geneve(pkt: &Ipv4Packet) -> bool {
    pkt.proto == IPPROTO_UDP && pkt.dport == GENEVE_PORT.to_be()
}

/// tc ingress: a UDP packet to the Geneve port that another node's
/// [`send`] wrote, for a backend on this node, is taken out of Geneve, its
/// flow noted (replies from the service address) and delivered: its tc
/// action, counted. NOT_SENT for anything else, which goes on as any
/// packet. Lookups: the frontend (1, or 2 for a NodePort), 2 inserts (or,
/// for a flow already noted, 1 lookup), 1 FIB. A BPF subprogram (see
/// [`first`]).
#[inline(never)]
pub fn geneve(ctx: &TcContext) -> i64 {
    let Parsed::Packet(outer) = parse::parse_ipv4(ctx) else {
        return NOT_SENT;
    };
    match take(ctx, &outer) {
        Some(v) => verdict::action(v) as i64,
        None => NOT_SENT,
    }
}

#[inline(always)]
fn take(ctx: &TcContext, outer: &Ipv4Packet) -> Option<Verdict> {
    let c = carried(ctx, outer)?;
    let Some(svc) = service::lookup_carried(c.svc_addr, c.svc_port, outer_inner_proto(ctx, outer)?)
    else {
        return Some(Verdict::Drop(DropReason::DsrNoService));
    };
    if ctx
        .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return Some(Verdict::Drop(DropReason::RewriteFailed));
    }
    // From here on the packet is the inner one: whatever happens, it is
    // not seen in Geneve again.
    let Parsed::Packet(pkt) = parse::parse_ipv4(ctx) else {
        return Some(Verdict::Pass(Counter::PassMalformed));
    };
    let key = CtKey::new(pkt.src, c.svc_addr, pkt.sport, c.svc_port, pkt.proto);
    // Known already (a retransmitted SYN, a UDP flow's next datagram): its
    // entry refreshed, the packet delivered. An entry of an earlier flow
    // with the client's tuple (closed, and the new SYN reuses it; or to
    // another backend) gives way to the new one, as at the balancing node.
    if let Some(found) = conntrack::lookup(&key, pkt.tcp_flags) {
        // SAFETY: as in `conntrack::touch`; copied at once.
        let same = unsafe { &*found.entry }.translate(&key) == pkt.tuple();
        if same && !(pkt.is_syn() && conntrack::closed_original(found.entry)) {
            let (e, _) = conntrack::touch(found, &key, pkt.tcp_flags);
            stats::service(e.svc_id, ctx.len(), false, false, false);
            stats::count(Counter::CtOriginal);
            return Some(deliver(ctx, &pkt));
        }
        conntrack::remove_flow(&key, found);
    }
    let backend = Backend {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        flags: 0,
    };
    let snat = Snat {
        addr: 0,
        port_min: 0,
        port_max: 0,
        extra_flags: CT_F_DSR_DECAP,
        counted: false,
        start: 0,
    };
    if let Err(reason) = conntrack::create(&key, svc.svc_id, 0, &backend, pkt.tcp_flags, &snat) {
        return Some(Verdict::Drop(reason));
    }
    stats::event(Event::DsrDecap, 1);
    stats::service(svc.svc_id, ctx.len(), true, false, false);
    stats::count(Counter::NewFlow);
    Some(deliver(ctx, &pkt))
}

/// The inner packet's protocol, TCP or UDP (else None: not DSR's).
#[inline(always)]
fn outer_inner_proto(ctx: &TcContext, outer: &Ipv4Packet) -> Option<u8> {
    let proto: u8 = read(ctx, outer.l3_off + ENCAP_LEN + parse::ip::TTL + 1)?;
    (proto == IPPROTO_TCP || proto == IPPROTO_UDP).then_some(proto)
}

/// Sends a packet out of Geneve to its backend, as translated already.
#[inline(always)]
fn deliver(ctx: &TcContext, pkt: &Ipv4Packet) -> Verdict {
    match forward::onward(ctx, pkt) {
        Ok(action) => Verdict::Translated(action),
        Err(_) => Verdict::Drop(DropReason::RewriteFailed),
    }
}
