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
//!
//! Both families, one set of functions generic over [`Carrier`]: an IPv6
//! flow goes in Geneve over IPv6 (80 bytes), its UDP checksum computed
//! from the headers alone (IPv6 has no zero checksum to fall back on).

use aya_ebpf::{bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, programs::TcContext};
use proxy_common::{
    dsr::{
        ENCAP_LEN, ENCAP_LEN6, GENEVE_PORT, OPT_CLASS, OPT_LEN_WORDS, OPT_LEN_WORDS6, OPT_TYPE,
        OPT_WORDS, OPT_WORDS6, PROTO_IPV4, PROTO_IPV6,
    },
    flow_hash, Address, Backend, Counter, CtKey, DropReason, Event, In6, CT_F_DSR_DECAP,
    CT_F_DSR_ENCAP, IPPROTO_TCP, IPPROTO_UDP, PROG_DSR,
};

use crate::{
    conntrack::{self, Snat},
    csum::Sum,
    family::Family,
    forward::{self, Hook, Route, Via},
    maps::{self, PROGS},
    nat,
    packet::Packet,
    parse::{self, IpPacket, Kind, Parsed, ETH_HLEN},
    service, stats,
    verdict::{self, Verdict},
};

const OUTER_TTL: u8 = 64;
/// Don't fragment: the route's MTU was checked with the outer headers.
const IP_DF: [u8; 2] = [0x40, 0x00];

/// Geneve's first word: version 0, options length, no flags, protocol.
#[inline(always)]
fn geneve_word(opt_len_words: u8, proto: u16) -> u32 {
    let p = proto.to_be_bytes();
    u32::from_ne_bytes([opt_len_words, 0, p[0], p[1]])
}

/// The option's first word: class, type, length of its data.
#[inline(always)]
fn option_word(words: u8) -> u32 {
    let c = OPT_CLASS.to_be_bytes();
    u32::from_ne_bytes([c[0], c[1], OPT_TYPE, words])
}

/// What differs between the families' direct server return: the outer
/// headers, written and read, and where a packet is parsed.
pub trait Carrier: Family {
    /// Bytes in front of the inner packet.
    const ENCAP_LEN: usize;
    /// The family's bit in a request's code ([`stash`]).
    const REQ_FAMILY: u32;
    /// DSR's steps ([`step!`]) are subprograms of their own (IPv6's: its
    /// addresses, FIB requests, entries and headers outgrow one frame), or
    /// inlined (IPv4's fit one, and pay no calls).
    const APART: bool;
    /// The outer headers as stored, in words (memory order).
    type Header: Copy;

    /// `f` of the packet parsed and its tuple (IPv4's on the stack, IPv6's
    /// in this CPU's scratch space); None when it is not a packet of the
    /// family.
    fn parsed<R>(ctx: &TcContext, f: impl FnOnce(&IpPacket<Self>, &CtKey<Self>) -> R) -> Option<R>;
    /// The backend a [`Request::First`] names: IPv4's is in the request,
    /// IPv6's (five words) in scratch space, where [`Family::hand_dsr_backend`]
    /// left it.
    fn backend(bits: u64) -> Option<Backend<Self>>;
    /// Whether `pkt` can be carried: an IPv6 packet with extension headers
    /// is not (the receiving side reads its fixed header's fields where
    /// they are without them, and the checksum is computed so).
    fn carriable(pkt: &IpPacket<Self>) -> bool;
    /// The outer headers for `pkt` (service address and port: its
    /// destination before translation), translated to `to` with its TTL
    /// or hop limit lowered by `ttl_dec`, from `src`.
    fn header(pkt: &IpPacket<Self>, to: &CtKey<Self>, src: Self, ttl_dec: u8) -> Self::Header;
    /// What the outer headers of `pkt` (UDP to the Geneve port) carry,
    /// when they are exactly what [`send`] writes and the inner packet is
    /// to the outer destination: else None, and the packet is not DSR's.
    fn carried(ctx: &TcContext, pkt: &IpPacket<Self>) -> Option<Carried<Self>>;
}

/// Declares a step of DSR's work: inlined for IPv4, a BPF subprogram of its
/// own for IPv6 ([`Carrier::APART`]; see [`first`]). Its arguments and
/// result are no `Option` or `Result`, whose BTF (a union with the tag
/// inside a member) the kernel refuses in a subprogram's signature.
macro_rules! step {
    ($(#[$doc:meta])* fn $name:ident<A: Carrier>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$doc])*
        #[inline(always)]
        fn $name<A: Carrier>($($arg: $ty),*) -> $ret {
            #[inline(never)]
            fn apart<A: Carrier>($($arg: $ty),*) -> $ret {
                inlined::<A>($($arg),*)
            }
            #[inline(always)]
            fn inlined<A: Carrier>($($arg: $ty),*) -> $ret $body
            if A::APART {
                apart::<A>($($arg),*)
            } else {
                inlined::<A>($($arg),*)
            }
        }
    };
}

/// Entropy for the fabric's ECMP, in the ephemeral range.
#[inline(always)]
fn entropy_port<A: Address>(pkt: &IpPacket<A>) -> [u8; 2] {
    (0xc000 | (flow_hash(0, pkt.src.word(), pkt.sport) & 0x3fff) as u16).to_be_bytes()
}

/// Geneve, from the UDP payload on: header and our option (`N` words:
/// header and data).
#[repr(C)]
#[derive(Clone, Copy)]
struct GeneveOpt<const N: usize> {
    geneve: [u32; 2],
    option: [u32; N],
}

impl Carrier for u32 {
    const ENCAP_LEN: usize = ENCAP_LEN;
    const REQ_FAMILY: u32 = 0;
    const APART: bool = false;
    type Header = [u32; ENCAP_LEN / 4];

    #[inline(always)]
    fn parsed<R>(ctx: &TcContext, f: impl FnOnce(&IpPacket<Self>, &CtKey<Self>) -> R) -> Option<R> {
        match parse::parse_ipv4(ctx) {
            Parsed::Packet(pkt) => Some(f(&pkt, &pkt.tuple())),
            _ => None,
        }
    }

    #[inline(always)]
    fn backend(bits: u64) -> Option<Backend<Self>> {
        Some(Backend::from_bits(bits))
    }

    #[inline(always)]
    fn carriable(_pkt: &IpPacket<Self>) -> bool {
        true
    }

    #[inline(always)]
    fn header(pkt: &IpPacket<Self>, to: &CtKey<Self>, src: Self, _ttl_dec: u8) -> Self::Header {
        let inner = pkt.ip_len();
        let total = (inner + ENCAP_LEN as u16).to_be_bytes();
        let udp_len = (inner + (ENCAP_LEN - 20) as u16).to_be_bytes();
        let sport = entropy_port(pkt);
        let dport = GENEVE_PORT.to_be_bytes();
        let svc_port = pkt.dport.to_ne_bytes();
        let mut h = [
            u32::from_ne_bytes([0x45, pkt.tos, total[0], total[1]]),
            u32::from_ne_bytes([0, 0, IP_DF[0], IP_DF[1]]),
            u32::from_ne_bytes([OUTER_TTL, IPPROTO_UDP, 0, 0]),
            src,
            to.dst_addr,
            u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]),
            // Checksum 0: none, as RFC 8926 allows over IPv4; the inner
            // packet's own checksums cover what matters.
            u32::from_ne_bytes([udp_len[0], udp_len[1], 0, 0]),
            geneve_word(OPT_LEN_WORDS, PROTO_IPV4),
            0,
            option_word(OPT_WORDS),
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

    #[inline(always)]
    fn carried(ctx: &TcContext, pkt: &IpPacket<Self>) -> Option<Carried<Self>> {
        if pkt.l4_off != pkt.l3_off + 20 || (pkt.ip_len() as usize) < ENCAP_LEN + 20 {
            return None;
        }
        let g: GeneveOpt<3> = read(ctx, pkt.l4_off + 8)?;
        if g.geneve[0] != geneve_word(OPT_LEN_WORDS, PROTO_IPV4)
            || g.option[0] != option_word(OPT_WORDS)
        {
            return None;
        }
        let inner = pkt.l3_off + ENCAP_LEN;
        let inner_dst: u32 = read(ctx, inner + parse::ip::DADDR)?;
        if inner_dst != pkt.dst {
            return None;
        }
        let proto: u8 = read(ctx, inner + parse::ip::TTL + 1)?;
        let p = g.option[2].to_ne_bytes();
        Carried::of(g.option[1], u16::from_ne_bytes([p[0], p[1]]), proto)
    }
}

impl Carrier for In6 {
    const ENCAP_LEN: usize = ENCAP_LEN6;
    const REQ_FAMILY: u32 = REQ_IPV6;
    const APART: bool = true;
    type Header = [u32; ENCAP_LEN6 / 4];

    #[inline(always)]
    fn parsed<R>(ctx: &TcContext, f: impl FnOnce(&IpPacket<Self>, &CtKey<Self>) -> R) -> Option<R> {
        let s = maps::scratch6()?;
        if !parse6(ctx, s) {
            return None;
        }
        Some(f(&s.pkt, &s.key))
    }

    #[inline(always)]
    fn backend(_bits: u64) -> Option<Backend<Self>> {
        maps::scratch6().map(|s| s.dsr_backend)
    }

    #[inline(always)]
    fn carriable(pkt: &IpPacket<Self>) -> bool {
        pkt.l4_off == pkt.l3_off + parse::ip6::HLEN
    }

    #[inline(always)]
    fn header(pkt: &IpPacket<Self>, to: &CtKey<Self>, src: Self, ttl_dec: u8) -> Self::Header {
        let inner = pkt.ip_len();
        // The outer payload: UDP, Geneve, the option, the inner packet.
        let udp_len = (inner + (ENCAP_LEN6 - 40) as u16).to_be_bytes();
        let sport = entropy_port(pkt);
        let dport = GENEVE_PORT.to_be_bytes();
        let svc_port = pkt.dport.to_ne_bytes();
        let first = (6u32 << 28).to_be() | pkt.flowinfo;
        let (d, v) = (to.dst_addr, pkt.dst);
        let mut h = [
            first,
            u32::from_ne_bytes([udp_len[0], udp_len[1], IPPROTO_UDP, OUTER_TTL]),
            src[0],
            src[1],
            src[2],
            src[3],
            d[0],
            d[1],
            d[2],
            d[3],
            u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]),
            u32::from_ne_bytes([udp_len[0], udp_len[1], 0, 0]),
            geneve_word(OPT_LEN_WORDS6, PROTO_IPV6),
            0,
            option_word(OPT_WORDS6),
            v[0],
            v[1],
            v[2],
            v[3],
            u32::from_ne_bytes([svc_port[0], svc_port[1], 0, 0]),
        ];
        // The UDP checksum covers the inner packet too. Its transport
        // bytes, checksum included, sum to the complement of its pseudo
        // header (once that checksum is final: the device or the stack
        // completes a partial one where it points, which the outer headers
        // do not move), so the inner addresses cancel out and what is left
        // is its header's first two words less the pseudo header's length
        // and protocol (RFC 7605's local checksum offload).
        let plen = (inner - parse::ip6::HLEN as u16).to_be_bytes();
        let inner_word2 =
            u32::from_ne_bytes([plen[0], plen[1], pkt.proto, pkt.ttl.wrapping_sub(ttl_dec)]);
        let mut sum = Sum::zero()
            // The pseudo header: addresses, length, next header.
            .add(u32::from_ne_bytes([0, 0, udp_len[0], udp_len[1]]))
            .add(u32::from_ne_bytes([0, 0, 0, IPPROTO_UDP]))
            .add(first)
            .add(inner_word2)
            .add(!u32::from_ne_bytes([0, 0, plen[0], plen[1]]))
            .add(!u32::from_ne_bytes([0, 0, 0, pkt.proto]));
        // Addresses, UDP header (checksum 0), Geneve and the option.
        let mut i = 2;
        while i < h.len() {
            sum = sum.add(h[i]);
            i += 1;
        }
        let check = match sum.checksum() {
            0 => 0xffff,
            c => c,
        }
        .to_ne_bytes();
        h[11] = u32::from_ne_bytes([udp_len[0], udp_len[1], check[0], check[1]]);
        h
    }

    #[inline(always)]
    fn carried(ctx: &TcContext, pkt: &IpPacket<Self>) -> Option<Carried<Self>> {
        // At constant offsets (the packet's lie in scratch space, where
        // the verifier knows no bound for them): UDP right after the fixed
        // header.
        const L4: usize = ETH_HLEN + parse::ip6::HLEN;
        if pkt.l3_off != ETH_HLEN
            || pkt.l4_off != L4
            || (pkt.ip_len() as usize) < ENCAP_LEN6 + parse::ip6::HLEN
        {
            return None;
        }
        let g: GeneveOpt<6> = read(ctx, L4 + 8)?;
        if g.geneve[0] != geneve_word(OPT_LEN_WORDS6, PROTO_IPV6)
            || g.option[0] != option_word(OPT_WORDS6)
        {
            return None;
        }
        let inner = ETH_HLEN + ENCAP_LEN6;
        // The fixed header's destination (after 24 bytes), next header (6).
        let inner_dst: In6 = read(ctx, inner + 24)?;
        if inner_dst != pkt.dst {
            return None;
        }
        let proto: u8 = read(ctx, inner + 6)?;
        let o = g.option;
        let p = o[5].to_ne_bytes();
        Carried::of(
            [o[1], o[2], o[3], o[4]],
            u16::from_ne_bytes([p[0], p[1]]),
            proto,
        )
    }
}

/// Parses an IPv6 packet and its tuple into scratch space: whether it is a
/// packet. A subprogram: the parse's copies (a header not in the linear
/// data) stay out of its callers' frames.
#[inline(never)]
fn parse6(ctx: &TcContext, s: &mut maps::Scratch6) -> bool {
    if parse::parse_ipv6(ctx, &mut s.pkt) != Kind::Packet {
        return false;
    }
    s.pkt.tuple_into(&mut s.key);
    true
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
        /// [`Family::hand_dsr_backend`].
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
/// A request about an IPv6 packet.
const REQ_IPV6: u32 = 0x10;

/// Leaves `req`, about a packet of family `A`, in the skb's control buffer
/// (tc programs' scratch space, five words), which a tail call keeps, for
/// [`crate::kpx_tc_dsr`]. Returns [`REQUESTED`].
#[inline(always)]
pub fn stash<A: Carrier>(ctx: &TcContext, req: Request) -> i64 {
    let words = match req {
        Request::Geneve => [REQ_GENEVE | A::REQ_FAMILY, 0, 0, 0, 0],
        Request::First {
            svc_id,
            backend_id,
            backend,
            counted,
        } => [
            REQ_FIRST | A::REQ_FAMILY | (counted as u32) << 8,
            svc_id,
            backend_id,
            backend as u32,
            (backend >> 32) as u32,
        ],
        Request::Again => [REQ_AGAIN | A::REQ_FAMILY, 0, 0, 0, 0],
    };
    // SAFETY: the context's own skb; `cb` is five words tc programs may
    // write.
    unsafe { (*ctx.skb.skb).cb = words };
    REQUESTED
}

/// The request [`stash`] left, without its family.
#[inline(always)]
fn request(ctx: &TcContext) -> u32 {
    // SAFETY: the context's own skb, read.
    unsafe { (*ctx.skb.skb).cb[0] }
}

/// Whether the request [`stash`] left is about an IPv6 packet.
#[inline(always)]
pub fn ipv6_request(ctx: &TcContext) -> bool {
    request(ctx) & REQ_IPV6 != 0
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
    let geneve = request(ctx) & 0xff & !REQ_IPV6 == REQ_GENEVE;
    verdict::action(if geneve {
        Verdict::Pass(Counter::PassNotHandled)
    } else {
        Verdict::Drop(DropReason::DsrUnavailable)
    })
}

/// [`stash`], then [`tail_call`]: IPv6's programs' hand-over (IPv4's entry
/// stashes deep in its path and calls at its top).
#[inline(always)]
pub fn hand_over<A: Carrier>(ctx: &TcContext, req: Request) -> i32 {
    stash::<A>(ctx, req);
    tail_call(ctx)
}

/// Runs the request [`stash`] left: the packet's tc action, or NOT_SENT.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i64 {
    // SAFETY: the context's own skb, read.
    let w = unsafe { (*ctx.skb.skb).cb };
    let backend = w[3] as u64 | (w[4] as u64) << 32;
    let counted = w[0] >> 8 != 0;
    match w[0] & 0xff {
        REQ_GENEVE => geneve::<u32>(ctx),
        REQ_FIRST => first::<u32>(ctx, w[1], w[2], backend, counted),
        REQ_AGAIN => again::<u32>(ctx),
        r if r == REQ_GENEVE | REQ_IPV6 => geneve::<In6>(ctx),
        r if r == REQ_FIRST | REQ_IPV6 => first::<In6>(ctx, w[1], w[2], backend, counted),
        r if r == REQ_AGAIN | REQ_IPV6 => again::<In6>(ctx),
        _ => NOT_SENT,
    }
}

/// A flow's way to its backend's node, decided before anything is written.
#[derive(Clone, Copy)]
struct Plan<A> {
    route: Route,
    /// The outer source: this node's address towards the backend.
    src: A,
}

impl<A: Family> Plan<A> {
    /// None yet: [`plan`] fills it in.
    const NONE: Self = Plan {
        route: Route::STACK,
        src: A::ZERO,
    };
}

step! {
/// How `pkt`, translated to `to`, reaches its backend in Geneve, into
/// `out`: false when it cannot (the FIB has no forwardable route for it,
/// the packet with the outer headers would not fit the route's MTU, this
/// node has no address towards it, an IPv6 packet has extension headers).
/// Two FIB lookups. A [`step!`]: it fills `out` rather than return an
/// `Option`.
fn plan<A: Carrier>(ctx: &TcContext, pkt: &IpPacket<A>, to: &CtKey<A>, out: &mut Plan<A>) -> bool {
    if !A::carriable(pkt) {
        return false;
    }
    let Some(len) = pkt.ip_len().checked_add(A::ENCAP_LEN as u16) else {
        return false;
    };
    let route = forward::route_sized(ctx, pkt, to, Hook::Ingress, len);
    if route.via == Via::Stack {
        return false;
    }
    let Some(src) = forward::masquerade_source(ctx, pkt, to.dst_addr) else {
        return false;
    };
    *out = Plan { route, src };
    true
}
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
/// stayed in the program that handed it over. For IPv6 its steps
/// ([`plan`], [`open`], [`rewrite`]) are subprograms of their own, called
/// one after the other: the FIB requests, the flow's new entries and the
/// outer headers each in a frame of its own, so IPv6's fit the stack.
#[inline(never)]
pub fn first<A: Carrier>(
    ctx: &TcContext,
    svc_id: u32,
    backend_id: u32,
    backend: u64,
    counted: bool,
) -> i64 {
    let Some(backend) = A::backend(backend) else {
        return NOT_SENT;
    };
    A::parsed(ctx, |pkt, key| {
        let to = CtKey::new(pkt.src, backend.addr, pkt.sport, backend.port, pkt.proto);
        let mut plan = Plan::NONE;
        if !self::plan(ctx, pkt, &to, &mut plan) {
            stats::event(Event::DsrFallback, 1);
            return NOT_SENT;
        }
        let opened = open(&Opening {
            key,
            to: &to,
            backend: &backend,
            svc_id,
            backend_id,
            tcp_flags: pkt.tcp_flags,
            counted,
        });
        if opened != OPENED {
            return opened;
        }
        verdict::action(send(ctx, pkt, &to, &plan, svc_id, true)) as i64
    })
    .unwrap_or(NOT_SENT)
}

/// A new flow [`open`] sets up.
struct Opening<'a, A> {
    key: &'a CtKey<A>,
    /// Its translation, to `backend`.
    to: &'a CtKey<A>,
    backend: &'a Backend<A>,
    svc_id: u32,
    backend_id: u32,
    tcp_flags: u8,
    counted: bool,
}

/// What [`open`] returns when the flow is to be sent.
const OPENED: i64 = 0x1003;

step! {
/// The entries of a new flow sent in Geneve: [`OPENED`] when they send it
/// to its backend (ours, or those of the same flow's first packet on
/// another CPU a moment earlier, which chose the same), else the tc action
/// of a counted drop: that one chose another backend (or no DSR), and this
/// duplicate is dropped rather than sent against the flow's entry. A
/// [`step!`].
fn open<A: Carrier>(o: &Opening<A>) -> i64 {
    let snat = Snat {
        addr: A::ZERO,
        port_min: 0,
        port_max: 0,
        extra_flags: CT_F_DSR_ENCAP,
        counted: o.counted,
        start: 0,
    };
    let reason = match conntrack::create(
        o.key,
        o.svc_id,
        o.backend_id,
        o.backend,
        o.tcp_flags,
        &snat,
    ) {
        Ok(e)
            if e.to.dst_addr == o.to.dst_addr
                && e.to.dst_port == o.to.dst_port
                && e.flags & CT_F_DSR_ENCAP != 0 =>
        {
            return OPENED;
        }
        Ok(_) => DropReason::CtInsertFailed,
        Err(reason) => reason,
    };
    verdict::action(Verdict::Drop(reason)) as i64
}
}

/// A packet of a flow [`first`] sent that goes in Geneve too (a SYN again,
/// a UDP datagram; [`conntrack::dsr_encapsulates`]): its entry refreshed
/// and the packet sent; its tc action, counted. NOT_SENT (nothing
/// written) when the route cannot carry it: the caller sends it as the
/// flow's other packets. Lookups: the flow's entry again (the path's
/// lookup stayed in the program that handed it over), 2 FIB.
#[inline(never)]
pub fn again<A: Carrier>(ctx: &TcContext) -> i64 {
    A::parsed(ctx, |pkt, key| again_of(ctx, pkt, key)).unwrap_or(NOT_SENT)
}

#[inline(always)]
fn again_of<A: Carrier>(ctx: &TcContext, pkt: &IpPacket<A>, key: &CtKey<A>) -> i64 {
    let Some(found) = conntrack::lookup(key, pkt.tcp_flags) else {
        return NOT_SENT;
    };
    // SAFETY: as in `conntrack::touch`; copied at once.
    let to = unsafe { &*found.entry }.translate(key);
    let mut plan = Plan::NONE;
    if !self::plan(ctx, pkt, &to, &mut plan) {
        return NOT_SENT;
    }
    let (e, _) = conntrack::touch(found, key, pkt.tcp_flags);
    verdict::action(send(ctx, pkt, &to, &plan, e.svc_id, false)) as i64
}

/// Translates `pkt` to `to` (the service address it was sent to kept in an
/// option), puts it in Geneve and sends it along `plan`; counted in
/// `svc_id`'s statistics (a `new_flow`'s first packet or not).
#[inline(always)]
fn send<A: Carrier>(
    ctx: &TcContext,
    pkt: &IpPacket<A>,
    to: &CtKey<A>,
    plan: &Plan<A>,
    svc_id: u32,
    new_flow: bool,
) -> Verdict {
    let len = ctx.len();
    if !rewrite(ctx, pkt, to, plan) {
        return Verdict::Drop(DropReason::RewriteFailed);
    }
    stats::event(Event::DsrEncap, 1);
    stats::service(svc_id, len, new_flow, false, false);
    stats::count(if new_flow {
        Counter::NewFlow
    } else {
        Counter::CtOriginal
    });
    Verdict::Translated(forward::send(ctx, plan.route))
}

step! {
/// [`send`]'s rewrite: translated, then put in Geneve. A [`step!`].
fn rewrite<A: Carrier>(ctx: &TcContext, pkt: &IpPacket<A>, to: &CtKey<A>, plan: &Plan<A>) -> bool {
    let ttl_dec = plan.route.ttl_dec(Hook::Ingress);
    nat::apply(ctx, pkt, to, ttl_dec, &plan.route).is_ok()
        && encap::<A>(ctx, &A::header(pkt, to, plan.src, ttl_dec)).is_ok()
}
}

/// Grows the skb by the outer headers, after its Ethernet header, and
/// writes them. The inner packet stays where it is in memory, so a
/// checksum the device is still to compute (`CHECKSUM_PARTIAL`) keeps
/// pointing at it.
#[inline(always)]
fn encap<A: Carrier>(ctx: &TcContext, hdr: &A::Header) -> Result<(), ()> {
    ctx.adjust_room(A::ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    ctx.store(ETH_HLEN, hdr, 0).map_err(|_| ())
}

/// A `T` at `off`: from the linear data by a plain load, else copied.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    parse::read_linear(ctx, off).or_else(|| <TcContext as Packet>::load(ctx, off).ok())
}

/// What a Geneve packet from another node's [`send`] carries: the service
/// address and port the client used, and the inner packet's protocol.
pub struct Carried<A> {
    svc_addr: A,
    svc_port: u16,
    proto: u8,
}

impl<A> Carried<A> {
    /// None unless the inner packet is TCP or UDP (else not DSR's).
    #[inline(always)]
    fn of(svc_addr: A, svc_port: u16, proto: u8) -> Option<Self> {
        (proto == IPPROTO_TCP || proto == IPPROTO_UDP).then_some(Self {
            svc_addr,
            svc_port,
            proto,
        })
    }
}

/// Whether `pkt` may be a Geneve packet of [`send`]'s: UDP to its port.
#[inline(always)]
pub fn is_geneve<A>(pkt: &IpPacket<A>) -> bool {
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
pub fn geneve<A: Carrier>(ctx: &TcContext) -> i64 {
    let taken = match A::parsed(ctx, |outer, _| take_out(ctx, outer)) {
        Some(Some(Ok(taken))) => taken,
        Some(Some(Err(v))) => return verdict::action(v) as i64,
        _ => return NOT_SENT,
    };
    // From here on the packet is the inner one: whatever happens, it is
    // not seen in Geneve again.
    A::parsed(ctx, |pkt, _| deliver_taken(ctx, pkt, &taken))
        .unwrap_or_else(|| verdict::action(Verdict::Pass(Counter::PassMalformed)) as i64)
}

/// A Geneve packet's service, and the inner packet's addresses: what
/// [`take_out`] read before removing the outer headers.
struct Taken<A> {
    svc_id: u32,
    svc_addr: A,
    svc_port: u16,
}

/// The outer headers of `outer` checked and removed: None (nothing
/// written) when it is not DSR's; a drop when its service is unknown here
/// or the headers could not be removed.
#[inline(always)]
fn take_out<A: Carrier>(ctx: &TcContext, outer: &IpPacket<A>) -> Option<Result<Taken<A>, Verdict>> {
    let c = A::carried(ctx, outer)?;
    let Some(svc) = service::lookup_carried(c.svc_addr, c.svc_port, c.proto) else {
        return Some(Err(Verdict::Drop(DropReason::DsrNoService)));
    };
    if ctx
        .adjust_room(-(A::ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return Some(Err(Verdict::Drop(DropReason::RewriteFailed)));
    }
    Some(Ok(Taken {
        svc_id: svc.svc_id,
        svc_addr: c.svc_addr,
        svc_port: c.svc_port,
    }))
}

step! {
/// The inner packet `pkt`, out of Geneve: its flow noted and the packet
/// delivered; its tc action, counted. A [`step!`].
fn deliver_taken<A: Carrier>(ctx: &TcContext, pkt: &IpPacket<A>, t: &Taken<A>) -> i64 {
    verdict::action(note_taken(ctx, pkt, t)) as i64
}
}

#[inline(always)]
fn note_taken<A: Carrier>(ctx: &TcContext, pkt: &IpPacket<A>, t: &Taken<A>) -> Verdict {
    let key = CtKey::new(pkt.src, t.svc_addr, pkt.sport, t.svc_port, pkt.proto);
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
            return deliver(ctx, pkt);
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
        addr: A::ZERO,
        port_min: 0,
        port_max: 0,
        extra_flags: CT_F_DSR_DECAP,
        counted: false,
        start: 0,
    };
    if let Err(reason) = conntrack::create(&key, t.svc_id, 0, &backend, pkt.tcp_flags, &snat) {
        return Verdict::Drop(reason);
    }
    stats::event(Event::DsrDecap, 1);
    stats::service(t.svc_id, ctx.len(), true, false, false);
    stats::count(Counter::NewFlow);
    deliver(ctx, pkt)
}

/// Sends a packet out of Geneve to its backend, as translated already.
#[inline(always)]
fn deliver<A: Family>(ctx: &TcContext, pkt: &IpPacket<A>) -> Verdict {
    match forward::onward(ctx, pkt) {
        Ok(action) => Verdict::Translated(action),
        Err(_) => Verdict::Drop(DropReason::RewriteFailed),
    }
}
