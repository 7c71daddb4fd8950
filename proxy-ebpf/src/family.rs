//! The two address families. A packet's path (parse → conntrack → service
//! → policy → select → NAT → forward) is one set of functions generic over
//! [`Family`], instantiated for IPv4 (`u32` addresses) and IPv6 ([`In6`]);
//! what differs between them is here: each family's maps and settings, its
//! address arithmetic, and the steps that write its header (the rewrite,
//! the FIB request, the REJECT).

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{HashMap, LpmTrie, LruHashMap},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    dsr::GENEVE_PORT, Address, AffinityKey, AffinityValue, Backend, Counter, CtKey, CtTuple,
    CtValue, DatapathConfig, In6, Net, ServiceKey, ServiceValue, Slot, SlotKey, SrcRange,
    IPPROTO_TCP, IPPROTO_UDP, PROG_INGRESS6,
};

use crate::{
    csum::Sum,
    forward::{Hook, Route},
    maps,
    nat::{self, RewriteFailed},
    packet::Packet,
    parse::{IpPacket, Ipv4Packet},
    service::Config,
    verdict::{self, Verdict},
};

/// What tc ingress's path returns for an IPv6 packet: its entry hands it
/// to IPv6's program ([`tail_call`]).
pub const IPV6: i64 = 0x1002;

/// Hands the packet to IPv6's program at `index` of `KPX_PROGS`: does not
/// return, unless an agent did not put it there (then the packet passes
/// untouched, counted as not handled).
#[inline(always)]
pub fn tail_call(ctx: &TcContext, index: u32) -> i32 {
    // SAFETY: a tail call into a classifier of this object, with this
    // context: on success control never comes back.
    unsafe { maps::PROGS.tail_call(ctx, index) };
    verdict::action(Verdict::Pass(Counter::PassNotHandled))
}

/// [`tail_call`] at XDP, into `KPX_XDP_PROGS`: an absent program passes
/// the frame on to tc ingress, untouched.
#[inline(always)]
pub fn tail_call_xdp(ctx: &XdpContext, index: u32) -> u32 {
    // SAFETY: a tail call into an XDP program of this object, with this
    // context: on success control never comes back.
    unsafe { maps::XDP_PROGS.tail_call(ctx, index) };
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// What is left to do with an IPv6 packet its entry did not finish.
#[derive(Clone, Copy)]
pub enum Rest {
    /// Plain TCP or UDP of no flow, parsed in scratch space: its frontend.
    Frontend,
    /// The whole path (ICMPv6, extension headers, a packet parsing found
    /// wrong).
    Path,
}

/// `cb[0]` of a packet tc ingress's entry hands over with [`Rest::Frontend`]
/// (`cb[1]`: its length). An older build's entry, whose packets a newer
/// `kpx_tc_ingress6` may meet during an upgrade, never writes it; chance
/// leftovers would have to match both words.
const FRONTEND_LEFT: u32 = 0x6b70_7836;

/// Hands the packet to `kpx_tc_ingress6` with what is left to do, in the
/// skb's control buffer (tc programs' scratch space, which a tail call
/// keeps). The one tail call into IPv6's program from tc ingress's entry:
/// a call site whose index is a constant is jumped to directly by the
/// JIT, one reached with two (were each `Rest` its own program) through
/// an indirect, retpolined jump, which cost a packet of no flow ~10 ns.
#[inline(always)]
pub fn hand_over6(ctx: &TcContext, rest: Rest) -> i32 {
    let marker = match rest {
        Rest::Frontend => FRONTEND_LEFT,
        Rest::Path => 0,
    };
    // SAFETY: the context's own skb; `cb` is five words tc programs may
    // write.
    unsafe {
        (*ctx.skb.skb).cb[0] = marker;
        (*ctx.skb.skb).cb[1] = ctx.len();
        (*ctx.skb.skb).cb[2] = 0;
    }
    tail_call(ctx, PROG_INGRESS6)
}

/// Whether [`hand_over6`] left this packet with [`Rest::Frontend`]; the
/// marker is cleared.
#[inline(always)]
pub fn handed_frontend(ctx: &TcContext) -> bool {
    // SAFETY: the context's own skb, its control buffer read and written.
    unsafe {
        let cb = &mut (*ctx.skb.skb).cb;
        let left = cb[0] == FRONTEND_LEFT && cb[1] == ctx.len();
        cb[0] = 0;
        left
    }
}

/// `cb[2]` of an IPv6 packet whose direct server return's request could not
/// be served (`cb[1]`: its length): `kpx_tc_ingress6` and `kpx_tc_new6`
/// take its path again without DSR. [`hand_over6`] clears it.
const DSR_DECLINED: u32 = 0x6b70_7844;

/// Hands an IPv6 packet whose direct server return's request could not be
/// served back to `kpx_tc_ingress6`, its whole path without DSR (IPv4's is
/// run in DSR's program; IPv6's needs the stacks of its own programs).
#[inline(always)]
pub fn decline_dsr6(ctx: &TcContext) -> i32 {
    // SAFETY: the context's own skb; `cb` is five words tc programs may
    // write.
    unsafe {
        (*ctx.skb.skb).cb[0] = 0;
        (*ctx.skb.skb).cb[1] = ctx.len();
        (*ctx.skb.skb).cb[2] = DSR_DECLINED;
    }
    tail_call(ctx, PROG_INGRESS6)
}

/// Whether [`decline_dsr6`] handed this packet over: its path goes on
/// without direct server return.
#[inline(always)]
pub fn dsr_declined(ctx: &TcContext) -> bool {
    // SAFETY: the context's own skb, its control buffer read.
    let cb = unsafe { &(*ctx.skb.skb).cb };
    cb[2] == DSR_DECLINED && cb[1] == ctx.len()
}

/// Whether a packet's transport protocol is TCP or UDP: IPv4's protocol
/// field, or IPv6's next header after the fixed one (an extension header
/// is not). The Ethernet type and that one byte are read, nothing else:
/// what is passed on this answer is passed unread.
#[inline(always)]
pub fn plain_transport(ctx: &TcContext) -> bool {
    use crate::parse::{read_linear, ETH_P_IP, ETH_P_IPV6};
    // The Ethernet type, then IPv4's protocol (at 23) or IPv6's next
    // header (at 20).
    let at = match read_linear::<_, u16>(ctx, 12) {
        Some(t) if t == ETH_P_IP.to_be() => 23,
        Some(t) if t == ETH_P_IPV6.to_be() => 20,
        _ => return false,
    };
    read_linear::<_, u8>(ctx, at).is_some_and(|p| p == IPPROTO_TCP || p == IPPROTO_UDP)
}

/// What tc ingress's entry does with an IPv6 packet ([`sort6`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Entry6 {
    /// Plain TCP or UDP that no service or tracked flow can concern:
    /// passed at once.
    Untracked,
    /// Plain TCP or UDP that may be a flow's or a service's: the entry
    /// looks for its flow itself (an established packet pays no tail call).
    Plain,
    /// Anything else (ICMPv6, extension headers, other protocols, bad
    /// lengths): handed to IPv6's program.
    Other,
}

/// Sorts an IPv6 packet at tc ingress's entry (and at XDP). Plain TCP or UDP (the
/// transport header right after the fixed one, the lengths consistent) to
/// no frontend (its port, or on such a port its address) and from no
/// backend's (or from one, with a tuple the reply filter has not) is
/// [`Entry6::Untracked`]: the most common IPv6 traffic, a pod's to a pod,
/// pays no tail call and no conntrack lookup (on a frontend's port too,
/// unless its address may be a frontend's). The destination filter's read
/// ([`crate::conntrack::Dest`]: most packets end there), then the port and
/// reply filters' (arrays, inlined), and nothing else.
#[inline(always)]
pub fn sort6<P: Packet>(ctx: &P) -> Entry6 {
    use crate::parse::{ip6, read_linear, ETH_HLEN};
    // Version/class/label, payload length, next header (the hop limit).
    let Some(head) = read_linear::<_, [u16; 4]>(ctx, ETH_HLEN) else {
        return Entry6::Other;
    };
    let plen = u16::from_be(head[2]) as u32;
    let next = head[3].to_ne_bytes()[0];
    let min = match next {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Entry6::Other,
    };
    if head[0].to_ne_bytes()[0] >> 4 != 6
        || plen < min
        || ETH_HLEN as u32 + ip6::HLEN as u32 + plen > ctx.len()
    {
        return Entry6::Other;
    }
    let Some(ports) = read_linear::<_, [u16; 2]>(ctx, ETH_HLEN + ip6::HLEN) else {
        return Entry6::Other;
    };
    // Maybe direct server return's Geneve, for a backend here: its own
    // path, whatever the filters say.
    if ports[1] == GENEVE_PORT.to_be() && next == IPPROTO_UDP {
        return Entry6::Other;
    }
    // The addresses, after the fixed header's first 8 bytes.
    let Some(addrs) = read_linear::<_, [In6; 2]>(ctx, ETH_HLEN + 8) else {
        return Entry6::Other;
    };
    let key = CtKey::new(addrs[0], addrs[1], ports[0], ports[1], next);
    // One cache line, the destination's: most traffic ends here.
    let dest = crate::conntrack::Dest::of(&key);
    if dest.passes() {
        return Entry6::Untracked;
    }
    if crate::service::Ports::of_addr(ports[1], || dest.addr)
        .may_be_tracked_if(ports[0], || dest.may_be_reply())
    {
        Entry6::Plain
    } else {
        Entry6::Untracked
    }
}

/// What tc ingress's and XDP's entries do with an IPv4 packet ([`sort4`]).
pub enum Entry4 {
    /// Plain TCP or UDP that no service or tracked flow can concern:
    /// passed at once.
    Untracked,
    /// Plain TCP or UDP that may be a flow's or a service's: parsed from
    /// the headers the sort read, with what the filters said of its
    /// destination; it goes on to its flow or frontend (the filters not
    /// asked again).
    Plain(Ipv4Packet, crate::service::Ports),
    /// IPv6: its own entry.
    Ipv6,
    /// Anything else (ICMP, options, fragments, bad lengths, Geneve,
    /// headers beyond the linear data): the whole path.
    Other,
}

/// Sorts an IPv4 packet at tc ingress's entry (and at XDP's), as [`sort6`]
/// sorts IPv6's. Plain TCP or UDP (no options, not a fragment, the lengths
/// and the transport header consistent) to no frontend (its port, or on such a port its address)
/// and from no backend's port (or from one, with a tuple the reply filter
/// has not) is [`Entry4::Untracked`]: a pod's packet to a pod, a
/// socket-balanced flow's. It costs one read of its headers and the
/// filters' reads (arrays, inlined: the destination filter's block, where
/// most packets end, then the port and reply filters' words; in place, a
/// cache line of filter data costs more than the instructions around it),
/// in a few dozen instructions at the
/// program's start: in place, on a real connection's hops, fetching the
/// whole path's code from across the program cost more than its work.
#[inline(always)]
pub fn sort4<P: Packet>(ctx: &P) -> Entry4 {
    use crate::parse::{read_linear, Ipv4Hdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET};
    let Some(eth_proto) = read_linear::<_, u16>(ctx, 12) else {
        return Entry4::Other;
    };
    if eth_proto != ETH_P_IP.to_be() {
        return if eth_proto == ETH_P_IPV6.to_be() {
            Entry4::Ipv6
        } else {
            Entry4::Other
        };
    }
    let Some(iph) = read_linear::<_, Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Entry4::Other;
    };
    let min = match iph.proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Entry4::Other,
    };
    let tot_len = u16::from_be(iph.tot_len) as u32;
    if iph.version_ihl != 0x45
        || u16::from_be(iph.frag_off) & (IP_MF | IP_OFFSET) != 0
        || tot_len < 20 + min
        || ETH_HLEN as u32 + tot_len > ctx.len()
    {
        return Entry4::Other;
    }
    // Maybe direct server return's Geneve, for a backend here: its own
    // path, whatever the filters say (its destination port, read alone).
    if iph.proto == IPPROTO_UDP
        && read_linear::<_, u16>(ctx, ETH_HLEN + 22) == Some(GENEVE_PORT.to_be())
    {
        return Entry4::Other;
    }
    // The transport header checked too (its length, TCP's data offset), so
    // that a malformed packet is the whole path's to count, whatever its
    // destination.
    let Some(pkt) = crate::parse::plain4(ctx, &iph) else {
        return Entry4::Other;
    };
    // One cache line, the destination's: most traffic ends here.
    let dest = crate::conntrack::Dest::of(&pkt.tuple());
    if dest.passes() {
        return Entry4::Untracked;
    }
    let ports = crate::service::Ports::of_addr(pkt.dport, || dest.addr);
    if ports.may_be_tracked_if(pkt.sport, || dest.may_be_reply()) {
        Entry4::Plain(pkt, ports)
    } else {
        Entry4::Untracked
    }
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A family's node-wide addresses, read where they lie (IPv4's in the
/// settings' copy, IPv6's in `CONFIG6`): never copied, so IPv6's twelve
/// words are loaded only where used, not held (spilled) across the path.
#[derive(Clone, Copy)]
pub struct NetRef<'a, A>(Option<&'a Net<A>>);

impl<A: Family> NetRef<'_, A> {
    /// Whether the cluster CIDR is known: without it, the reference's
    /// local-traffic detector says nothing (no source is a pod, none
    /// off-cluster).
    #[inline(always)]
    pub fn known(&self) -> bool {
        self.0.is_some_and(|n| n.cluster_mask != A::ZERO)
    }

    /// Whether `src` is a pod's address (in the known cluster CIDR).
    #[inline(always)]
    pub fn is_pod(&self, src: A) -> bool {
        self.0.is_some_and(|n| {
            n.cluster_mask != A::ZERO && A::masked_eq(src, n.cluster_mask, n.cluster_cidr)
        })
    }

    /// An address standing for any pod: the cluster CIDR's (zero when
    /// unknown).
    #[inline(always)]
    pub fn cluster_addr(&self) -> A {
        self.0.map_or(A::ZERO, |n| n.cluster_cidr)
    }

    /// Masqueraded flows' default source (zero: no masquerade).
    #[inline(always)]
    pub fn snat_addr(&self) -> A {
        self.0.map_or(A::ZERO, |n| n.snat_addr)
    }
}

pub trait Family: Address {
    /// Bits of an address: the source-range trie's prefix lengths.
    const BITS: u32;
    /// The settings' flag that lets this family's flows go by direct
    /// server return, beside `CFG_F_DSR_TCP` / `CFG_F_DSR_UDP` (0: none
    /// needed).
    const DSR_FLAG: u32;

    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue>;
    fn service_addrs() -> &'static HashMap<Self, u32>;
    fn slots() -> &'static HashMap<SlotKey, Slot<Self>>;
    fn ct_tcp() -> &'static HashMap<CtTuple<Self>, CtValue<Self>>;
    fn ct_any() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue>;
    fn node_addrs() -> &'static HashMap<Self, u32>;
    fn src_ranges() -> &'static LpmTrie<SrcRange<Self>, u32>;

    /// This family's node-wide addresses (IPv4's are in `cfg` already).
    fn net(cfg: &Config) -> NetRef<'static, Self>;
    /// `addr & mask == net`.
    fn masked_eq(addr: Self, mask: Self, net: Self) -> bool;
    /// `sum` with the address `old` replaced by `new` in the summed data.
    fn sum_replace(sum: Sum, old: Self, new: Self) -> Sum;

    /// Rewrites `pkt` to carry `to` ([`nat::apply`]).
    fn rewrite<P: Packet>(
        ctx: &P,
        pkt: &IpPacket<Self>,
        to: &CtKey<Self>,
        ttl_dec: u8,
        route: &Route,
    ) -> Result<(), RewriteFailed>;
    /// Fills a FIB request's family and destination.
    fn fib_request(p: &mut bpf_fib_lookup, dst: Self);
    /// Adds a forwarded packet's source and type of service (traffic
    /// class and flow label) to a FIB request.
    fn fib_flow(p: &mut bpf_fib_lookup, pkt: &IpPacket<Self>, src: Self);
    /// The source address a FIB answer with `BPF_FIB_LOOKUP_SRC` holds.
    fn fib_source(p: &bpf_fib_lookup) -> Self;
    /// Answers `pkt` with the reference's REJECT ([`crate::icmp`]).
    fn reject(ctx: &TcContext, pkt: &IpPacket<Self>, hook: Hook) -> Result<i32, ()>;
    /// A first packet goes on in a program of its own
    /// ([`Family::hand_over`]):
    /// IPv6's, whose path with its new flow's outgrew one stack.
    const NEW_FLOW_APART: bool;
    /// The address filter was asked before this family's program was
    /// handed the packet (IPv6: by tc ingress's entry, [`untracked6`], for
    /// plain TCP/UDP on a frontend's port), so its path does not ask again:
    /// it takes every address as maybe a frontend's, which only costs the
    /// lookups the filter would have saved where the entry did not ask
    /// (extension headers, egress).
    const FILTERED_AHEAD: bool;
    /// Leaves a first packet's frontend in this CPU's scratch space for
    /// `kpx_tc_new6`; the entry tail-calls it on the verdict.
    fn hand_over(svc: &ServiceValue, recovered: bool) -> Verdict;
    /// Hands a new flow's backend to direct server return's program: IPv4's
    /// as the request's word; IPv6's (five words) written to this CPU's
    /// scratch space, 0 returned. `dsr::Carrier::backend` takes it back.
    fn hand_dsr_backend(b: &Backend<Self>) -> u64;
}

impl Family for u32 {
    const BITS: u32 = 32;
    const DSR_FLAG: u32 = 0;
    const NEW_FLOW_APART: bool = false;
    const FILTERED_AHEAD: bool = false;

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue> {
        &maps::SERVICES
    }
    #[inline(always)]
    fn service_addrs() -> &'static HashMap<Self, u32> {
        &maps::SERVICE_ADDRS
    }
    #[inline(always)]
    fn slots() -> &'static HashMap<SlotKey, Slot<Self>> {
        &maps::SLOTS
    }
    #[inline(always)]
    fn ct_tcp() -> &'static HashMap<CtTuple<Self>, CtValue<Self>> {
        &maps::CT_TCP
    }
    #[inline(always)]
    fn ct_any() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>> {
        &maps::CT_ANY
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue> {
        &maps::AFFINITY
    }
    #[inline(always)]
    fn node_addrs() -> &'static HashMap<Self, u32> {
        &maps::NODE_ADDRS
    }
    #[inline(always)]
    fn src_ranges() -> &'static LpmTrie<SrcRange<Self>, u32> {
        &maps::SRC_RANGES
    }

    #[inline(always)]
    fn net(cfg: &Config) -> NetRef<'static, Self> {
        NetRef(cfg.get().map(DatapathConfig::net))
    }

    #[inline(always)]
    fn masked_eq(addr: Self, mask: Self, net: Self) -> bool {
        addr & mask == net
    }

    #[inline(always)]
    fn sum_replace(sum: Sum, old: Self, new: Self) -> Sum {
        sum.replace(old, new)
    }

    #[inline(always)]
    fn rewrite<P: Packet>(
        ctx: &P,
        pkt: &IpPacket<Self>,
        to: &CtKey<Self>,
        ttl_dec: u8,
        route: &Route,
    ) -> Result<(), RewriteFailed> {
        nat::apply4(ctx, pkt, to, ttl_dec, route)
    }

    #[inline(always)]
    fn fib_request(p: &mut bpf_fib_lookup, dst: Self) {
        p.family = AF_INET;
        p.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn fib_flow(p: &mut bpf_fib_lookup, pkt: &IpPacket<Self>, src: Self) {
        p.__bindgen_anon_2.tos = pkt.tos;
        p.__bindgen_anon_3.ipv4_src = src;
    }

    #[inline(always)]
    fn fib_source(p: &bpf_fib_lookup) -> Self {
        // SAFETY: the union member an IPv4 answer writes.
        unsafe { p.__bindgen_anon_3.ipv4_src }
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, pkt: &IpPacket<Self>, hook: Hook) -> Result<i32, ()> {
        crate::icmp::reject(ctx, pkt, hook)
    }

    #[inline(always)]
    fn hand_dsr_backend(b: &Backend<Self>) -> u64 {
        b.to_bits()
    }

    #[inline(always)]
    fn hand_over(_svc: &ServiceValue, _recovered: bool) -> Verdict {
        // Never: IPv4's first packets stay in their program.
        Verdict::Pass(Counter::PassNotHandled)
    }
}

impl Family for In6 {
    const BITS: u32 = 128;
    const DSR_FLAG: u32 = proxy_common::CFG_F_DSR_IPV6;
    const NEW_FLOW_APART: bool = true;
    const FILTERED_AHEAD: bool = true;

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue> {
        &maps::SERVICES6
    }
    #[inline(always)]
    fn service_addrs() -> &'static HashMap<Self, u32> {
        &maps::SERVICE_ADDRS6
    }
    #[inline(always)]
    fn slots() -> &'static HashMap<SlotKey, Slot<Self>> {
        &maps::SLOTS6
    }
    #[inline(always)]
    fn ct_tcp() -> &'static HashMap<CtTuple<Self>, CtValue<Self>> {
        &maps::CT6_TCP
    }
    #[inline(always)]
    fn ct_any() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>> {
        &maps::CT6_ANY
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue> {
        &maps::AFFINITY6
    }
    #[inline(always)]
    fn node_addrs() -> &'static HashMap<Self, u32> {
        &maps::NODE_ADDRS6
    }
    #[inline(always)]
    fn src_ranges() -> &'static LpmTrie<SrcRange<Self>, u32> {
        &maps::SRC_RANGES6
    }

    #[inline(always)]
    fn net(_cfg: &Config) -> NetRef<'static, Self> {
        // SAFETY: array element pointer, valid for the program run.
        NetRef(maps::CONFIG6.get_ptr(0).map(|c| unsafe { &*c }))
    }

    #[inline(always)]
    fn masked_eq(addr: Self, mask: Self, net: Self) -> bool {
        (addr[0] & mask[0]) == net[0]
            && (addr[1] & mask[1]) == net[1]
            && (addr[2] & mask[2]) == net[2]
            && (addr[3] & mask[3]) == net[3]
    }

    #[inline(always)]
    fn sum_replace(sum: Sum, old: Self, new: Self) -> Sum {
        sum.replace(old[0], new[0])
            .replace(old[1], new[1])
            .replace(old[2], new[2])
            .replace(old[3], new[3])
    }

    #[inline(always)]
    fn rewrite<P: Packet>(
        ctx: &P,
        pkt: &IpPacket<Self>,
        to: &CtKey<Self>,
        ttl_dec: u8,
        route: &Route,
    ) -> Result<(), RewriteFailed> {
        nat::apply6(ctx, pkt, to, ttl_dec, route)
    }

    #[inline(always)]
    fn fib_request(p: &mut bpf_fib_lookup, dst: Self) {
        p.family = AF_INET6;
        p.__bindgen_anon_4.ipv6_dst = dst;
    }

    #[inline(always)]
    fn fib_flow(p: &mut bpf_fib_lookup, pkt: &IpPacket<Self>, src: Self) {
        p.__bindgen_anon_2.flowinfo = pkt.flowinfo;
        p.__bindgen_anon_3.ipv6_src = src;
    }

    #[inline(always)]
    fn fib_source(p: &bpf_fib_lookup) -> Self {
        // SAFETY: the union member an IPv6 answer writes.
        unsafe { p.__bindgen_anon_3.ipv6_src }
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, pkt: &IpPacket<Self>, hook: Hook) -> Result<i32, ()> {
        crate::icmp::reject6(ctx, pkt, hook)
    }

    #[inline(always)]
    fn hand_dsr_backend(b: &Backend<Self>) -> u64 {
        if let Some(s) = maps::scratch6() {
            s.dsr_backend = *b;
        }
        0
    }

    #[inline(always)]
    fn hand_over(svc: &ServiceValue, recovered: bool) -> Verdict {
        let Some(s) = maps::scratch6() else {
            return Verdict::Pass(Counter::PassNotHandled);
        };
        s.svc = *svc;
        s.recovered = recovered;
        Verdict::NewFlow
    }
}
