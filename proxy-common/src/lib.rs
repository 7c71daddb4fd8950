//! Map keys, values and constants shared by the eBPF datapath and the agent.
//!
//! This crate is the single source of truth for map layout. Every type is
//! `#[repr(C)]`, has explicit padding fields (so no uninitialised bytes ever
//! reach a map key) and stores addresses and ports in network byte order,
//! exactly as they appear on the wire: the datapath never byte-swaps.
//!
//! Long by design: every map layout lives here once, shared by the eBPF
//! program and the agent, each with its size and alignment assertions.
#![no_std]

/// IP protocol numbers the datapath understands.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv6 address as the datapath's keys hold it: its 16 bytes as on the
/// wire, in four words.
pub type In6 = [u32; 4];

/// The address type of a family's keys: `u32` (IPv4, the bytes as on the
/// wire) or [`In6`]. Every key and value that holds an address is generic
/// over it, IPv4 by default, so one layout serves both families.
pub trait Address:
    Copy + Default + PartialEq + Eq + core::hash::Hash + Ord + core::fmt::Debug + 'static
{
    /// The unspecified address: NodePort frontends' key, "none" in entries.
    const ZERO: Self;
    /// The address folded to one word, for [`flow_hash`].
    fn word(self) -> u32;
    /// The address mixed to one word whose high bits depend on all of
    /// it: the address filter's hash ([`addr_bit`]).
    fn mixed(self) -> u32;
    /// The address folded to 64 bits, for [`reply_bit`]'s hash.
    fn folded(self) -> u64;
}

/// Two 64-bit halves of an address mixed so that the result's high bits
/// depend on every input bit: each half's high word is folded down before
/// a multiply spreads it up (a multiply alone only carries a difference
/// upwards, and addresses differ in their high bytes as loaded: the last
/// byte of an address is the top byte of its word). Three multiplies, no
/// loop: the datapath computes it per packet.
#[inline(always)]
const fn mix(lo: u64, hi: u64) -> u32 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let x = (lo ^ (lo >> 32)).wrapping_mul(K1) ^ hi;
    ((x ^ (x >> 32)).wrapping_mul(K2) >> 32) as u32
}

impl Address for u32 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn word(self) -> u32 {
        self
    }
    #[inline(always)]
    fn mixed(self) -> u32 {
        mix(self as u64, 0)
    }
    #[inline(always)]
    fn folded(self) -> u64 {
        self as u64
    }
}

impl Address for In6 {
    const ZERO: Self = [0; 4];
    #[inline(always)]
    fn word(self) -> u32 {
        self[0] ^ self[1] ^ self[2] ^ self[3]
    }
    #[inline(always)]
    fn mixed(self) -> u32 {
        mix(
            self[0] as u64 | (self[1] as u64) << 32,
            self[2] as u64 | (self[3] as u64) << 32,
        )
    }
    #[inline(always)]
    fn folded(self) -> u64 {
        // Pods' addresses differ in their last 64 bits, a prefix's in its
        // first: both survive the fold.
        (self[0] ^ self[2]) as u64 | ((self[1] ^ self[3]) as u64) << 32
    }
}

/// Map names, as they appear in the object file and under the bpffs pin directory.
pub mod map_names {
    pub const SERVICES: &str = "KPX_SERVICES";
    pub const SERVICE_ADDRS: &str = "KPX_SVC_ADDRS";
    /// A frontend's backend table: each slot holds its backend whole
    /// ([`super::Slot`]), so selecting one is one lookup.
    pub const SLOTS: &str = "KPX_SLOTS";
    /// Established TCP flows: a plain hash, never evicted (see
    /// [`super::capacity::CT_TCP`]).
    pub const CT_TCP: &str = "KPX_CT_TCP";
    /// Every other flow (UDP, TCP handshakes): LRU.
    pub const CT_ANY: &str = "KPX_CT_ANY";
    /// The pinned maps' layout version ([`super::LAYOUT_VERSION`]).
    pub const LAYOUT: &str = "KPX_LAYOUT";
    pub const COUNTERS: &str = "KPX_COUNTERS";
    pub const DROPS: &str = "KPX_DROPS";
    pub const SERVICE_STATS: &str = "KPX_SVC_STATS";
    pub const SERVICE_NAMES: &str = "KPX_SVC_NAMES";
    pub const AFFINITY: &str = "KPX_AFFINITY";
    pub const EVENTS: &str = "KPX_EVENTS";
    pub const NODE_ADDRS: &str = "KPX_NODE_ADDRS";
    pub const SRC_RANGES: &str = "KPX_SRC_RANGES";
    pub const CONFIG: &str = "KPX_CONFIG";
    pub const PORTS: &str = "KPX_PORTS";
    /// The reply filter ([`super::reply_bit`]): which tuples may be a
    /// tracked flow's reply. Memory-mapped by the agent, which rebuilds it.
    pub const REPLIES: &str = "KPX_REPLIES";
    /// The destination filter ([`super::dest_block`]): the address
    /// filter's words, and the reply filter's bits again by destination.
    /// Memory-mapped by the agent.
    pub const DESTS: &str = "KPX_DESTS";
    /// Per-CPU round-robin positions, by service id.
    pub const RR: &str = "KPX_RR";
    /// Active connections per backend id, for the least-connection
    /// schedulers.
    pub const CONNS: &str = "KPX_CONNS";
    /// UDP sockets the socket-level load balancer gave a backend (and TCP
    /// ones `SOCKS_TCP` had no room for, or an older kpx connected): socket
    /// local storage (`BPF_MAP_TYPE_SK_STORAGE`), read from userspace
    /// through sock_diag.
    pub const SOCKS: &str = "KPX_SOCKS";
    /// The UDP ones again, by socket cookie: sock_diag reports socket
    /// storage with TCP sockets only, and the agent must find connected UDP
    /// sockets whose backend left.
    pub const SOCKS_UDP: &str = "KPX_SOCKS_UDP";
    /// TCP sockets the socket-level load balancer connected to a backend,
    /// by socket cookie (a hash table: one insert at `connect()`, one
    /// delete at release, where a socket's first local storage took two
    /// allocations under locks). Sockets connected while it was full, and
    /// an older kpx's, are in `SOCKS`.
    pub const SOCKS_TCP: &str = "KPX_SOCKS_TCP";
    /// The other services an unconnected UDP socket sends to (its storage
    /// holds the last one), both ways: by service address, its backend;
    /// by backend address, its service ([`super::SockPeerKey`]). LRU.
    pub const SOCK_PEERS: &str = "KPX_SOCK_PEERS";
    /// IPv6 sockets' (`AF_INET6`): the same with [`super::In6`] addresses.
    pub const SOCKS6: &str = "KPX_SOCKS6";
    pub const SOCKS_UDP6: &str = "KPX_SOCKS_UDP6";
    pub const SOCKS_TCP6: &str = "KPX_SOCKS_TCP6";
    pub const SOCK_PEERS6: &str = "KPX_SOCK_PEERS6";
    /// Programs tc ingress tail-calls (`PROG_*` indexes): kept pinned, so a
    /// restarting agent's attached programs still find theirs.
    pub const PROGS: &str = "KPX_PROGS";
    /// Programs XDP tail-calls (`XDP_PROG_*` indexes): an array of its own
    /// (a program array serves one program type), pinned as `PROGS` is.
    pub const XDP_PROGS: &str = "KPX_XDP_PROGS";
    /// IPv6's own maps: the same layouts with [`super::In6`] addresses.
    pub const SERVICES6: &str = "KPX_SERVICES6";
    pub const SERVICE_ADDRS6: &str = "KPX_SVC_ADDRS6";
    pub const SLOTS6: &str = "KPX_SLOTS6";
    pub const CT6_TCP: &str = "KPX_CT6_TCP";
    pub const CT6_ANY: &str = "KPX_CT6_ANY";
    pub const AFFINITY6: &str = "KPX_AFFINITY6";
    pub const NODE_ADDRS6: &str = "KPX_NODE_ADDRS6";
    pub const SRC_RANGES6: &str = "KPX_SRC_RANGES6";
    /// IPv6's node-wide addresses ([`super::Net6`]).
    pub const CONFIG6: &str = "KPX_CONFIG6";
    /// IPv6's path's per-CPU scratch space: the packet, its tuple and
    /// frontend, handed from one of its programs to the next by tail call.
    /// Pinned so that every program in `PROGS`, whichever agent loaded it,
    /// shares it.
    pub const SCRATCH6: &str = "KPX_SCRATCH6";
    /// Which interfaces have kpx's tc egress program, by ifindex: a bit
    /// each ([`super::egress_bit`]), written by the agent.
    pub const EGRESS: &str = "KPX_EGRESS";
    /// Interfaces a new flow arrived on without tc egress there, for the
    /// agent to attach it (keys: ifindexes). Written by the datapath.
    pub const EGRESS_WANTED: &str = "KPX_EGRESS_WANTED";
    pub const ALL: [&str; 42] = [
        LAYOUT,
        SERVICES,
        SERVICE_ADDRS,
        SLOTS,
        CT_TCP,
        CT_ANY,
        COUNTERS,
        DROPS,
        SERVICE_STATS,
        SERVICE_NAMES,
        AFFINITY,
        EVENTS,
        NODE_ADDRS,
        SRC_RANGES,
        CONFIG,
        PORTS,
        REPLIES,
        DESTS,
        RR,
        CONNS,
        SOCKS,
        SOCKS_UDP,
        SOCK_PEERS,
        PROGS,
        XDP_PROGS,
        SERVICES6,
        SERVICE_ADDRS6,
        SLOTS6,
        CT6_TCP,
        CT6_ANY,
        AFFINITY6,
        NODE_ADDRS6,
        SRC_RANGES6,
        CONFIG6,
        SCRATCH6,
        SOCKS6,
        SOCKS_UDP6,
        SOCK_PEERS6,
        SOCKS_TCP,
        SOCKS_TCP6,
        EGRESS,
        EGRESS_WANTED,
    ];
}

/// Index of [`prog_names::TC_DSR`] in [`map_names::PROGS`].
pub const PROG_DSR: u32 = 0;
/// Index of [`prog_names::TC_INGRESS6`]: tc ingress hands IPv6 packets there.
pub const PROG_INGRESS6: u32 = 1;
/// Index of [`prog_names::TC_EGRESS6`].
pub const PROG_EGRESS6: u32 = 2;
/// Index of [`prog_names::TC_NEW6`]: IPv6's first packets at ingress go
/// on there, at egress in [`prog_names::TC_NEW6_NODE`]'s.
pub const PROG_NEW6: u32 = 3;
pub const PROG_NEW6_NODE: u32 = 4;
/// Entries of [`map_names::PROGS`].
pub const PROGS: u32 = 5;
/// Index of [`prog_names::XDP_SERVICE6`] in [`map_names::XDP_PROGS`]: XDP
/// hands there an IPv6 packet it found no flow for.
pub const XDP_PROG_SERVICE6: u32 = 0;
/// Index of [`prog_names::XDP_NEW6`]: IPv6's first packets at XDP.
pub const XDP_PROG_NEW6: u32 = 1;
/// Entries of [`map_names::XDP_PROGS`].
pub const XDP_PROGS: u32 = 2;

/// Maps older layouts pinned that this one no longer has.
pub mod legacy_map_names {
    /// Layout 1's one conntrack table (LRU), every flow in it.
    pub const CONNTRACK: &str = "KPX_CT";
    /// Layouts 1 and 2: backend id → [`super::Backend`], which slots
    /// (then holding a bare backend id) pointed into.
    pub const BACKENDS: &str = "KPX_BACKENDS";
    pub const ALL: [&str; 2] = [CONNTRACK, BACKENDS];
}

/// The layout of the pinned maps, stored in [`map_names::LAYOUT`]. A kpx
/// meeting pinned maps of another layout migrates them or replaces them,
/// never shares them blindly. History:
/// 1. (unversioned: no `KPX_LAYOUT` map) one LRU conntrack table, `KPX_CT`;
/// 2. conntrack split into `KPX_CT_TCP` (established TCP, never evicted)
///    and `KPX_CT_ANY` (the rest, LRU); `KPX_LAYOUT` added;
/// 3. a slot holds its backend whole ([`Slot`]) instead of a backend id,
///    and `KPX_BACKENDS` is gone: a first packet's selection is one
///    lookup, not two, and a sync writes half as many entries;
/// 4. the established tables (`KPX_CT_TCP`, `KPX_CT6_TCP`) keyed by
///    [`CtTuple`], a [`CtKey`] without its protocol: a mixing round less
///    in every established packet's lookup.
pub const LAYOUT_VERSION: u32 = 4;

/// Program names in the object file.
pub mod prog_names {
    pub const TC_INGRESS: &str = "kpx_tc_ingress";
    pub const TC_EGRESS: &str = "kpx_tc_egress";
    /// An empty classifier: the benchmark's floor, never attached.
    pub const TC_FLOOR: &str = "kpx_tc_floor";
    /// The established table's lookup alone (the kernel's share of an
    /// established packet): the benchmark's, never attached.
    pub const TC_FLOOR_CT: &str = "kpx_tc_floor_ct";
    /// Never attached: the agent runs it (`BPF_PROG_TEST_RUN`) to end the
    /// established flows its collector expires, so that their backends'
    /// active-connection counts drop exactly once, as a FIN's would.
    pub const CONNS_EXPIRE: &str = "kpx_conns_expire";
    /// The same for IPv6's flows.
    pub const CONNS_EXPIRE6: &str = "kpx_conns_expire6";
    /// The socket-level load balancer's cgroup programs: `connect()`,
    /// `sendmsg()` (unconnected UDP), `recvmsg()` and `getpeername()`
    /// (the service address shown back), and the socket's release.
    pub const SOCK_CONNECT4: &str = "kpx_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "kpx_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "kpx_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "kpx_sock_getpeername4";
    /// The same for `AF_INET6` sockets.
    pub const SOCK_CONNECT6: &str = "kpx_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "kpx_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "kpx_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "kpx_sock_getpeername6";
    pub const SOCK_RELEASE: &str = "kpx_sock_release";
    /// XDP on the node's external interfaces: the tc ingress path for
    /// packets from outside, before an skb exists (`--xdp`).
    pub const XDP: &str = "kpx_xdp";
    /// An empty XDP program: the benchmark's floor, never attached.
    pub const XDP_FLOOR: &str = "kpx_xdp_floor";
    /// Direct server return's work, tail-called by tc ingress
    /// ([`super::PROG_DSR`]) for the packets that need it.
    pub const TC_DSR: &str = "kpx_tc_dsr";
    /// IPv6's tc programs, tail-called by [`TC_INGRESS`] and [`TC_EGRESS`]
    /// (never attached themselves).
    pub const TC_INGRESS6: &str = "kpx_tc_ingress6";
    pub const TC_EGRESS6: &str = "kpx_tc_egress6";
    /// IPv6's first packets, tail-called by each.
    pub const TC_NEW6: &str = "kpx_tc_new6";
    pub const TC_NEW6_NODE: &str = "kpx_tc_new6_node";
    /// XDP's: a plain IPv6 TCP/UDP packet XDP looked up no flow for (its
    /// frontend, from where XDP left it in scratch space), and a first
    /// packet, tail-called by [`XDP`].
    pub const XDP_SERVICE6: &str = "kpx_xdp_service6";
    pub const XDP_NEW6: &str = "kpx_xdp_new6";
}

/// Flows [`prog_names::CONNS_EXPIRE`] takes per run: their original
/// direction's [`CtKey`]s, one after another, after a 14-byte Ethernet
/// header (a tc program's input is a frame).
pub const EXPIRE_PER_RUN: usize = 64;

/// Default capacities. The agent may override them at load time
/// (`EbpfLoader::map_max_entries`); the eBPF side only uses them as defaults.
pub mod capacity {
    /// Service frontends: (address, port, protocol) entries.
    pub const SERVICES: u32 = 262_144;
    /// Distinct frontend addresses (VIPs), used to recognise fragments to a VIP.
    pub const SERVICE_ADDRS: u32 = 131_072;
    /// Backend slots over all services.
    pub const SLOTS: u32 = 1_048_576;
    /// Distinct backends (address, port, protocol): the active-connection
    /// counts' capacity.
    pub const BACKENDS: u32 = 524_288;
    /// Established TCP conntrack entries (two per flow: original and reply
    /// direction), so 262,144 concurrent connections by default. A plain
    /// hash: nothing is ever evicted; when full, new connections are refused
    /// (and counted) until flows end, as netfilter does.
    pub const CT_TCP: u32 = 524_288;
    /// Every other flow's entries: UDP, and TCP connections until their
    /// first reply. LRU: under pressure the least recently used go first,
    /// and they can never push out an established connection.
    pub const CT_ANY: u32 = 262_144;
    /// ClientIP session-affinity records (client address, service).
    pub const AFFINITY: u32 = 131_072;
    /// Per-service statistics slots; service ids are below this.
    pub const SERVICE_STATS: u32 = 65_536;
    /// Addresses of this node.
    pub const NODE_ADDRS: u32 = 1_024;
    /// Words of the egress bitmap: a bit for each ifindex below 2^20
    /// ([`super::egress_bit`]); an interface beyond gets tc egress at once.
    pub const EGRESS_WORDS: u32 = 1 << 14;
    /// Interfaces that can be asking for tc egress at the same time.
    pub const EGRESS_WANTED: u32 = 256;
    /// `loadBalancerSourceRanges` entries over all service frontends.
    pub const SRC_RANGES: u32 = 65_536;
    /// Words of the port filter: 4 bits for each of 65,536 ports (the
    /// address filter's follow them in its numbering, [`super::ADDR_WORD0`],
    /// but live in `KPX_DESTS`).
    pub const PORT_WORDS: u32 = super::ADDR_WORD0;
    /// Blocks of the destination filter ([`super::dest_block`]): one per
    /// word of the address filter.
    pub const DEST_BLOCKS: u32 = super::ADDR_WORDS;
    /// Elements of the reply filter: one word of each of its two copies.
    pub const REPLY_WORDS: u32 = (1 << super::REPLY_HASH_BITS) / 64;
    /// UDP sockets with a backend from the socket-level load balancer.
    /// Entries leave with their socket; LRU beyond that.
    pub const SOCKS_UDP: u32 = 65_536;
    /// TCP sockets with a backend from the socket-level load balancer, per
    /// family. Not preallocated (memory as sockets come); beyond it, a
    /// socket's entry goes to its socket storage instead.
    pub const SOCKS_TCP: u32 = 1_048_576;
    /// Services (and their backends) unconnected UDP sockets send to
    /// beside their last one, two entries each. LRU.
    pub const SOCK_PEERS: u32 = 65_536;
}

/// The port filter (`KPX_PORTS`): which ports frontends and backends use,
/// so that a packet no service or tracked flow can concern costs no hash
/// lookup. Port `p` (host order) has four bits in word `p / 16`, shifted
/// left by `port_shift(p)`:
/// - [`PORT_F_FRONTEND`]: a cluster, external or LoadBalancer IP frontend
///   uses it (any protocol); [`PORT_F_NODEPORT`]: a NodePort does. Only a
///   packet to such a port is looked up as a service's, or as a tracked
///   flow's original direction (whose key is the frontend's).
/// - [`PORT_F_BACKEND`]: a backend listens on it. Only a packet from such a
///   port can be a tracked flow's reply (whose key starts with the
///   backend's address and port).
///
/// The agent sets a port's bits before anything that could use them is
/// written, and clears them only once a walk of the conntrack tables that
/// began after their last user went has found no flow on the port: so a
/// packet of any tracked flow always meets its port's bit.
pub const PORT_F_FRONTEND: u64 = 1 << 0;
pub const PORT_F_NODEPORT: u64 = 1 << 1;
pub const PORT_F_BACKEND: u64 = 1 << 2;
/// Bits per port in a filter word.
pub const PORT_BITS: u32 = 4;

/// The filter word of port `port` (host byte order).
#[inline(always)]
pub const fn port_word(port: u16) -> u32 {
    port as u32 / (64 / PORT_BITS)
}

/// The shift of port `port`'s bits in its word.
#[inline(always)]
pub const fn port_shift(port: u16) -> u32 {
    (port as u32 % (64 / PORT_BITS)) * PORT_BITS
}

/// Port `port`'s (host order) filter bit of kind `kind` (`PORT_F_*`).
#[inline(always)]
pub const fn port_bit(port: u16, kind: u64) -> PortBit {
    PortBit {
        word: port_word(port),
        mask: kind << port_shift(port),
    }
}

/// The address filter, numbered after the port filter's words (its word
/// `ADDR_WORD0 + i` is the first word of the destination filter's block
/// `i`, [`dest_block`]): one
/// bit for each of 2^[`ADDR_HASH_BITS`] hashes of an address, set for
/// every cluster, external and LoadBalancer IP a frontend uses (and held,
/// as a port's bit is, while a flow to a removed one lives). A packet to
/// a frontend's port whose destination's bit is clear is for no such
/// frontend, and no tracked flow's original direction: a pod's packet to
/// a pod on a popular port (80, 443, 53: every service's own) and a
/// socket-balanced flow's pay one more array read instead of two hash
/// misses (conntrack, services). An address whose bit another one set
/// (one in 20 at 50,000 service addresses) is looked up as before.
/// This node's addresses (`NODE_ADDRS`) are in it too: their NodePorts
/// are frontends, which the destination filter ([`dest_block`]) must not
/// pass; the port filter's NodePort bit alone is not asked there.
pub const ADDR_HASH_BITS: u32 = 20;
/// The first word of the address filter.
pub const ADDR_WORD0: u32 = 65_536 * PORT_BITS / 64;
/// Words of the address filter.
pub const ADDR_WORDS: u32 = (1 << ADDR_HASH_BITS) / 64;

/// Address `a`'s bit of the address filter ([`ADDR_HASH_BITS`]).
#[inline(always)]
pub fn addr_bit<A: Address>(a: A) -> PortBit {
    let h = a.mixed() >> (32 - ADDR_HASH_BITS);
    PortBit {
        word: ADDR_WORD0 + (h >> 6),
        mask: 1 << (h & 63),
    }
}

/// Interface `ifindex`'s bit of the egress bitmap (`KPX_EGRESS`): set
/// while kpx's tc egress program is attached there. `None` beyond the
/// bitmap ([`capacity::EGRESS_WORDS`] words): such an interface gets tc
/// egress when it is attached, without waiting for a flow.
#[inline(always)]
pub fn egress_bit(ifindex: u32) -> Option<PortBit> {
    let word = ifindex >> 6;
    (word < capacity::EGRESS_WORDS).then(|| PortBit {
        word,
        mask: 1 << (ifindex & 63),
    })
}

/// The reply filter (`KPX_REPLIES`): one bit for each of
/// 2^[`REPLY_HASH_BITS`] hashes of a tuple, set for the key of every
/// reply-direction conntrack entry. A packet from a backend's port whose
/// tuple's bit is clear is no tracked flow's reply, and skips the
/// conntrack lookup (two for a SYN-ACK): the packets of a pod serving on a
/// backend's port to clients that reached it directly (socket-balanced
/// flows, pod to pod) pay an array read instead of hash misses.
///
/// Two copies of the bits, interleaved (element `i` holds word `i` of each):
/// a tuple counts as set when either copy has it. The datapath sets a
/// reply entry's bit in both, with an atomic OR, right after inserting the
/// entry (and before the packet that created it is sent on, so before any
/// reply). The agent rebuilds one copy at a time: clears it, then reads
/// the conntrack tables and sets the bits of the reply entries it finds.
/// An entry inserted before the clear is found by the read; one inserted
/// after has its bit from the datapath: so the copy not being rebuilt
/// always holds every live entry's bit, and bits of flows gone leave
/// within two rebuilds. A filter the agent has not rebuilt yet is all set
/// (the agent fills it so at load): a flow created by an older datapath
/// that never set bits is found by the lookup as before.
pub const REPLY_HASH_BITS: u32 = 20;

/// The reply filter's bit of tuple `k`: `word` is the element, `mask` the
/// bit in each of its two words.
#[inline(always)]
pub fn reply_bit<A: Address>(k: &CtKey<A>) -> PortBit {
    reply_bits(k)[0]
}

/// Tuple `k`'s bits of the reply filter ([`reply_bit`]) and of the
/// destination filter (its `word` the block of `k`'s destination, its
/// mask in each of the block's two reply words), from one hash: the same
/// mask, in the element of the tuple's hash and in the block of its
/// destination.
#[inline(always)]
pub fn reply_bits<A: Address>(k: &CtKey<A>) -> [PortBit; 2] {
    let addrs = k.src_addr.folded() ^ k.dst_addr.folded().rotate_left(32);
    let ports = k.src_port as u64 | (k.dst_port as u64) << 16 | (k.proto as u64) << 32;
    let h = mix(addrs, ports) >> (32 - REPLY_HASH_BITS);
    let mask = 1 << (h & 63);
    [
        PortBit { word: h >> 6, mask },
        PortBit {
            word: dest_block(k.dst_addr).word,
            mask,
        },
    ]
}

/// The destination filter (`KPX_DESTS`): what a packet's destination
/// address alone tells, in one cache line, so that traffic no service or
/// tracked flow can concern (a pod's to a pod, a socket-balanced flow's)
/// is known so from one read, keyed by its destination: no port filter
/// word, no reply filter element. Block `i` is four words:
/// - [`DEST_ADDRS`]: word `ADDR_WORD0 + i` of the address filter
///   ([`addr_bit`]: frontends' addresses, and this node's, whose NodePorts
///   are frontends too), which the agent's port filter writes;
/// - [`DEST_REPLIES`] and the next: the reply filter's bits again, two
///   copies kept as `KPX_REPLIES`'s are, but each tuple's in the block of
///   its destination ([`reply_bits`]);
/// - a word unused (a block is 32 bytes: two to a cache line, none across
///   one).
///
/// A plain TCP/UDP packet whose destination's address bit and tuple's
/// reply bit are both clear is for no frontend and no tracked flow's reply:
/// passed. Any other packet takes the port filter's path as before.
pub const DEST_ADDRS: usize = 0;
/// The first of a destination block's two reply words ([`DEST_ADDRS`]).
pub const DEST_REPLIES: usize = 1;

/// The destination filter's block of address `a` and `a`'s bit in its
/// [`DEST_ADDRS`] word: `word` is the block.
#[inline(always)]
pub fn dest_block<A: Address>(a: A) -> PortBit {
    let b = addr_bit(a);
    PortBit {
        word: b.word - ADDR_WORD0,
        mask: b.mask,
    }
}

/// A bit of the port filter: its word and the mask within it (also of the
/// reply filter, [`reply_bit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBit {
    pub word: u32,
    pub mask: u64,
}

impl<A: Address> ServiceKey<A> {
    /// The port-filter bit this frontend sets: [`PORT_F_NODEPORT`] for a
    /// NodePort, [`PORT_F_FRONTEND`] for any other frontend.
    pub fn port_bit(&self) -> PortBit {
        let kind = if self.addr == A::ZERO {
            PORT_F_NODEPORT
        } else {
            PORT_F_FRONTEND
        };
        port_bit(u16::from_be(self.port), kind)
    }

    /// The address-filter bit this frontend sets ([`addr_bit`]): none for
    /// a NodePort.
    pub fn addr_bit(&self) -> Option<PortBit> {
        (self.addr != A::ZERO).then(|| addr_bit(self.addr))
    }
}

/// Key of the service map: one frontend of a service.
///
/// ClusterIPs, LoadBalancer ingress IPs and external IPs are frontends keyed
/// by (address, port, protocol): one hash lookup per packet. NodePorts are
/// keyed with address [`NODEPORT_ADDR`], looked up only for packets to an
/// address of this node that serves NodePorts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A = u32> {
    /// The address, as on the wire.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The address of NodePort frontends in [`ServiceKey`].
pub const NODEPORT_ADDR: u32 = 0;

/// Value of the service map.
///
/// A frontend has up to two backend tables, as the reference has a cluster
/// (`KUBE-SVC-*`) and a local (`KUBE-SVL-*`) chain per service port:
/// the cluster-wide endpoints in slots `0..count`, and with [`SVC_F_LOCAL`]
/// the endpoints on this node in slots `LOCAL_SLOTS + (0..local_count)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Stable id of this frontend; indexes `SLOTS` and `SERVICE_STATS`.
    pub svc_id: u32,
    /// Cluster-wide backend slots in use (`0..count`). 0: the service has no
    /// endpoint at all, and new flows are rejected.
    pub count: u32,
    /// `SVC_F_*` flags.
    pub flags: u32,
    /// Session affinity timeout in seconds; 0 when affinity is off.
    pub affinity_timeout: u32,
    /// Node-local backend slots in use, with [`SVC_F_LOCAL`].
    pub local_count: u32,
    /// Keys ClientIP affinity: the same for every frontend of one service
    /// port (cluster IP, NodePort, external and LB IPs), so a client keeps
    /// its backend whichever entry point it uses, as the reference's
    /// `recent` lists (one per endpoint chain of the service port) do.
    pub affinity_id: u32,
}

/// First slot number of a frontend's node-local table.
pub const LOCAL_SLOTS: u32 = 1 << 31;

/// A NodePort, LoadBalancer ingress IP or external IP: the reference's
/// `KUBE-EXT-*` chain (masquerade, or the Local policy's special cases).
pub const SVC_F_EXTERNAL: u32 = 1 << 0;
/// The frontend's traffic policy is Local (internalTrafficPolicy for a
/// cluster IP, externalTrafficPolicy for an external frontend).
pub const SVC_F_LOCAL: u32 = 1 << 1;
/// A LoadBalancer IP with `loadBalancerSourceRanges`: sources are checked
/// against `SRC_RANGES` (the reference's `KUBE-FW-*`).
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 2;
/// A NodePort frontend (informational, for `kpx dump`).
pub const SVC_F_NODEPORT: u32 = 1 << 3;
/// The hashing schedulers (`sh`, `dh`, `mh`) hash the port too: IPVS's
/// `sh-port` / `mh-port` (its scheduler flag 2).
pub const SVC_F_HASH_PORT: u32 = 1 << 4;

/// The frontend's scheduler: bits 8..12 of [`ServiceValue::flags`], one of
/// the `SCHED_*` values. 0 is random, so entries written before schedulers
/// existed keep their meaning.
pub const SVC_SCHED_SHIFT: u32 = 8;
pub const SVC_SCHED_MASK: u32 = 0xf << SVC_SCHED_SHIFT;
/// A uniformly random slot: iptables mode's `statistic --mode random`.
pub const SCHED_RANDOM: u32 = 0;
/// Round robin over the slots (one per backend), per CPU ([`map_names::RR`]).
pub const SCHED_RR: u32 = 1;
/// Source hashing: the client's address (and port, with
/// [`SVC_F_HASH_PORT`]) picks a slot of a Maglev table.
pub const SCHED_SH: u32 = 2;
/// Destination hashing: the frontend address the client used (and port).
pub const SCHED_DH: u32 = 3;
/// Maglev hashing of the client's address (and port): as `sh`, kept apart
/// for IPVS's names and `kpx dump`.
pub const SCHED_MH: u32 = 4;
/// Least connections: of two random backends, the one with fewer active
/// (established, not closing) connections, [`map_names::CONNS`]. IPVS's
/// `wlc`, `sed`, `nq` and `twos` order equally weighted backends the same
/// way; they keep their own codes so `kpx dump` shows the name asked for.
pub const SCHED_LC: u32 = 5;
pub const SCHED_WLC: u32 = 6;
pub const SCHED_SED: u32 = 7;
pub const SCHED_NQ: u32 = 8;
pub const SCHED_TWOS: u32 = 9;

/// The `SCHED_*` of a service entry's flags.
#[inline(always)]
pub const fn scheduler(flags: u32) -> u32 {
    (flags & SVC_SCHED_MASK) >> SVC_SCHED_SHIFT
}

/// Whether a scheduler picks by active connections (and its flows are
/// counted in [`map_names::CONNS`]).
#[inline(always)]
pub const fn least_conns(sched: u32) -> bool {
    // Their codes are consecutive: one comparison.
    sched.wrapping_sub(SCHED_LC) <= SCHED_TWOS - SCHED_LC
}

/// Whether a scheduler picks by a hash of the flow: its tables are Maglev
/// tables, and a TCP flow whose conntrack entries were lost finds its
/// backend again from any packet.
#[inline(always)]
pub const fn hashing(sched: u32) -> bool {
    matches!(sched, SCHED_SH | SCHED_DH | SCHED_MH)
}

/// The hash the hashing schedulers pick a slot with: `addr` and `port` as
/// on the wire, `seed` the frontend's [`ServiceValue::affinity_id`] (so two
/// services do not send one client to the same slot number). A fixed
/// function (murmur3's finaliser), not a keyed one: every node must pick the
/// same slot for the same client, whichever node the client's packets
/// reach.
#[inline(always)]
pub const fn flow_hash(seed: u32, addr: u32, port: u16) -> u32 {
    fmix32(fmix32(seed ^ addr) ^ port as u32)
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Value bits of the node-address map.
pub const NODE_F_LOCAL: u32 = 1 << 0;
/// The address serves NodePorts (`--nodeport-addresses`).
pub const NODE_F_NODEPORT: u32 = 1 << 1;

/// Data of a source-range LPM key: a frontend and a client address. The
/// prefix length covers all 32 bits of `svc_id` plus the range's prefix, so
/// one lookup answers "is this client in one of this frontend's ranges",
/// whatever the number of services or ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange<A = u32> {
    /// Big-endian, so that the trie's byte-wise prefix starts with it.
    pub svc_id_be: u32,
    /// The address, as on the wire.
    pub addr: A,
}

/// Node-wide datapath settings (one element of `KPX_CONFIG`), written by the
/// agent before it attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// The cluster CIDR (network byte order) and its mask; mask 0 when
    /// unknown (then, as in the reference, no source counts as off-cluster).
    pub cluster_cidr: u32,
    pub cluster_mask: u32,
    /// Source address of masqueraded flows (the node IP); 0 disables masquerade.
    pub snat_addr: u32,
    /// Masquerade source ports, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CFG_F_*` flags.
    pub flags: u32,
    pub _pad: u32,
    /// The node's own network namespace (`SO_NETNS_COOKIE` of the agent's):
    /// its sockets are the node's, the others are pods'.
    pub host_netns_cookie: u64,
}

/// A family's node-wide addresses: the first fields of [`DatapathConfig`]
/// for IPv4 ([`DatapathConfig::net`]), the one element of `KPX_CONFIG6`
/// ([`Net6`]) for IPv6, whose flags and ports are IPv4's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Net<A = u32> {
    /// The cluster CIDR and its mask (mask zero when unknown).
    pub cluster_cidr: A,
    pub cluster_mask: A,
    /// Source address of masqueraded flows; zero disables masquerade.
    pub snat_addr: A,
}

pub type Net6 = Net<In6>;

impl DatapathConfig {
    /// IPv4's node-wide addresses, in place.
    #[inline(always)]
    pub fn net(&self) -> &Net {
        // SAFETY: both types are repr(C) and `DatapathConfig` starts with
        // `Net`'s three u32 fields in its order (checked below), so its
        // first 12 bytes are a valid `Net`, borrowed for as long as `self`.
        unsafe { &*(self as *const Self).cast::<Net>() }
    }
}

const _: () = {
    assert!(core::mem::offset_of!(DatapathConfig, cluster_cidr) == 0);
    assert!(core::mem::offset_of!(DatapathConfig, cluster_mask) == 4);
    assert!(core::mem::offset_of!(DatapathConfig, snat_addr) == 8);
    assert!(core::mem::offset_of!(Net, snat_addr) == 8);
};

/// `--masquerade-all`: masquerade all traffic to cluster IPs.
pub const CFG_F_MASQUERADE_ALL: u32 = 1 << 0;
/// `--fib-forwarding=false`: translated packets arriving on an interface
/// are handed to the stack's routing rather than redirected to the FIB's
/// next hop (the node's own packets are still re-routed at egress).
pub const CFG_F_STACK_FORWARDING: u32 = 1 << 1;
/// `--socket-lb=host-only`: the socket-level load balancer translates the
/// node's own sockets only; pods' traffic is translated per packet at tc,
/// so a service mesh in the pod sees the service address.
pub const CFG_F_SOCK_HOST_ONLY: u32 = 1 << 2;
/// `--nodeport-mode=dsr|hybrid`: new TCP flows from outside the cluster to
/// a NodePort, LoadBalancer IP or externalIP with the Cluster policy keep
/// the client's address (no masquerade): a flow to a backend on another
/// node has its first packet carried there in Geneve with the service
/// address as an option ([`dsr`]), and that node answers the client
/// directly, from the service address.
pub const CFG_F_DSR_TCP: u32 = 1 << 3;
/// `--nodeport-mode=dsr`: the same for UDP.
pub const CFG_F_DSR_UDP: u32 = 1 << 4;
/// `--dsr-ipv6`: the DSR flags serve IPv6 flows too (without it, IPv6's
/// are masqueraded). Every node takes IPv6 Geneve out whatever its
/// settings; this bit lets a node send it, once every node can.
pub const CFG_F_DSR_IPV6: u32 = 1 << 5;

/// Direct server return's wire format: a flow's first packet, already
/// translated to its backend, inside Geneve (RFC 8926) over UDP to the
/// backend's address, with one option that names the service address the
/// client used. The backend's node takes the packet out, notes the flow
/// (its replies leave from the service address) and delivers it.
///
/// ```text
/// outer IPv4 (20)  node → backend, protocol UDP, DF
/// UDP (8)          source port: a hash of the flow; destination 6081; checksum 0
/// Geneve (8)       version 0, options 12 bytes, protocol 0x0800, VNI 0
/// option (12)      class 0xFF7B (experimental), type 0x01, length 2 words:
///                  service address (4), service port (2), 0 (2)
/// inner IPv4       client → backend, as a tc-translated packet
/// ```
///
/// An IPv6 flow goes over IPv6 (its backend's address is the outer
/// destination, as IPv4's), the option naming its IPv6 service address:
///
/// ```text
/// outer IPv6 (40)  node → backend, next header UDP, hop limit 64, the
///                  inner packet's traffic class and flow label
/// UDP (8)          as above, but its checksum computed (IPv6 has no
///                  header checksum), from the headers alone (RFC 7605's
///                  local checksum offload: the inner packet's own
///                  checksum makes its bytes sum to a known value)
/// Geneve (8)       version 0, options 24 bytes, protocol 0x86DD, VNI 0
/// option (24)      class 0xFF7B, type 0x01, length 5 words: service
///                  address (16), service port (2), 0 (2)
/// inner IPv6       client → backend (no extension headers)
/// ```
pub mod dsr {
    /// Bytes in front of the inner IPv4 packet.
    pub const ENCAP_LEN: usize = 48;
    /// Bytes in front of the inner IPv6 packet.
    pub const ENCAP_LEN6: usize = 80;
    /// Geneve's IANA port.
    pub const GENEVE_PORT: u16 = 6081;
    /// An option class of the experimental range (0xFF00..=0xFFFF).
    pub const OPT_CLASS: u16 = 0xff7b;
    pub const OPT_TYPE: u8 = 0x01;
    /// The option's data, in 4-byte words.
    pub const OPT_WORDS: u8 = 2;
    /// Geneve's option-length field: the option header and its data.
    pub const OPT_LEN_WORDS: u8 = 1 + OPT_WORDS;
    /// Geneve's protocol type for an IPv4 payload.
    pub const PROTO_IPV4: u16 = 0x0800;
    /// The IPv6 option's data, in 4-byte words.
    pub const OPT_WORDS6: u8 = 5;
    /// Geneve's option-length field for the IPv6 option.
    pub const OPT_LEN_WORDS6: u8 = 1 + OPT_WORDS6;
    /// Geneve's protocol type for an IPv6 payload.
    pub const PROTO_IPV6: u16 = 0x86dd;
    const _: () = assert!(ENCAP_LEN == 20 + 8 + 8 + 4 * OPT_LEN_WORDS as usize);
    const _: () = assert!(ENCAP_LEN6 == 40 + 8 + 8 + 4 * OPT_LEN_WORDS6 as usize);
}
/// `skb->mark` bit on packets kpx translated: its egress program leaves them
/// alone (they may cross a second kpx interface after a redirect).
pub const MARK_TRANSLATED: u32 = 0x0020_0000;

/// XDP metadata (four bytes in front of the frame, native byte order) on a
/// frame the XDP program translated and handed to the stack: tc ingress
/// only forwards it, so nothing is translated twice.
pub const XDP_META_TRANSLATED: u32 = 0x6b70_7801;

/// Key of the backend-slot map: slot `slot` of service `svc_id`.
///
/// Selecting a backend is `SLOTS[(svc_id, random % count)]`: O(1) whatever the
/// number of backends. Uniform random over slots is iptables' `statistic
/// --mode random` chain; a Maglev table is the same map with more slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// A backend: where a flow is sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend<A = u32> {
    /// The address, as on the wire.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
}

impl<A> Backend<A> {
    /// The port-filter bit this backend sets ([`PORT_F_BACKEND`]).
    pub const fn port_bit(&self) -> PortBit {
        port_bit(u16::from_be(self.port), PORT_F_BACKEND)
    }
}

impl Backend {
    /// The backend as one word (to pass it in a register).
    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        self.addr as u64
            | (self.port as u64) << 32
            | (self.proto as u64) << 48
            | (self.flags as u64) << 56
    }

    #[inline(always)]
    pub const fn from_bits(b: u64) -> Self {
        Self {
            addr: b as u32,
            port: (b >> 32) as u16,
            proto: (b >> 48) as u8,
            flags: (b >> 56) as u8,
        }
    }
}

/// The backend runs on this node (its EndpointSlice's `nodeName`): with
/// direct server return its replies come back through this node's own
/// interfaces, so a flow to it is not encapsulated ([`CFG_F_DSR_TCP`]).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// Value of the slot map: the backend in slot `(svc_id, slot)`, whole, with
/// the id that names it to conntrack, affinity and the connection counts.
/// Selection reads the backend from the slot itself: no second lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Slot<A = u32> {
    pub backend_id: u32,
    pub backend: Backend<A>,
}

/// Key of the conntrack map: a packet's 5-tuple as seen on the wire.
///
/// Both directions of a translated flow have an entry: the original tuple
/// (client → VIP) and the reply tuple (backend → client). Each entry says how
/// to rewrite a packet carrying exactly that tuple, so one lookup serves both
/// directions. The two tuples can never collide: a reply's source is a
/// backend, never a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A = u32> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// Padding, zero. Two fields rather than `[u8; 3]`: the eBPF backend
    /// turns a 3-byte array fill into a call to a byte-wise `memset`.
    pub _pad0: u8,
    pub _pad1: u16,
}

impl<A: Copy> CtKey<A> {
    /// A tuple, fields in network byte order, padding zeroed.
    #[inline(always)]
    pub const fn new(src_addr: A, dst_addr: A, src_port: u16, dst_port: u16, proto: u8) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// [`CtKey::new`] for a key about to be looked up: the ports, and the
    /// protocol with the padding, written as whole 32-bit words. A key is
    /// read back at once by word (the map's hash, a copy), and a word read
    /// over a store of its halves or bytes cannot take its value from the
    /// CPU's store buffer: a store-forwarding stall, several ns per packet
    /// on x86 (`perf` found it at the first reads of `htab_map_hash`, and of
    /// IPv6's key copied from scratch space). Not for keys built and kept
    /// in registers: a key written this way lives in memory.
    #[inline(always)]
    pub fn for_lookup(src_addr: A, dst_addr: A, src_port: u16, dst_port: u16, proto: u8) -> Self {
        let mut key = core::mem::MaybeUninit::<Self>::uninit();
        // SAFETY: a writable key; `write_words` writes every byte.
        unsafe {
            Self::write_words(
                key.as_mut_ptr(),
                src_addr,
                dst_addr,
                src_port,
                dst_port,
                proto,
            );
            key.assume_init()
        }
    }

    /// [`CtKey::for_lookup`] written over `self` where it lies (IPv6's
    /// key in scratch space), with no copy through the stack.
    #[inline(always)]
    pub fn set_for_lookup(
        &mut self,
        src_addr: A,
        dst_addr: A,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) {
        // SAFETY: `self` is a valid, writable key.
        unsafe { Self::write_words(self, src_addr, dst_addr, src_port, dst_port, proto) }
    }

    /// Writes every byte of the key at `k`, the ports and the protocol with
    /// its padding as two words.
    ///
    /// # Safety
    /// `k` is valid for writes of a `CtKey<A>`.
    #[inline(always)]
    unsafe fn write_words(
        k: *mut Self,
        src_addr: A,
        dst_addr: A,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) {
        const { assert!(core::mem::align_of::<Self>() >= 4) };
        let (s, d) = (src_port.to_ne_bytes(), dst_port.to_ne_bytes());
        // SAFETY: the caller's `k`; each word over the fields it covers
        // exactly (the ports; the protocol and both paddings), at 4-aligned
        // offsets (the assertion above, and the layout checks below: no
        // implicit padding).
        unsafe {
            core::ptr::addr_of_mut!((*k).src_addr).write(src_addr);
            core::ptr::addr_of_mut!((*k).dst_addr).write(dst_addr);
            core::ptr::addr_of_mut!((*k).src_port)
                .cast::<u32>()
                .write(u32::from_ne_bytes([s[0], s[1], d[0], d[1]]));
            core::ptr::addr_of_mut!((*k).proto)
                .cast::<u32>()
                .write(u32::from_ne_bytes([proto, 0, 0, 0]));
        }
    }

    /// The key's addresses and ports, where they lie: the established
    /// table's key ([`CtTuple`]), a lookup of which hashes the key's first
    /// 12 (IPv6: 36) bytes, no copy made.
    #[inline(always)]
    pub fn tuple(&self) -> &CtTuple<A> {
        // SAFETY: `CtTuple<A>` is `CtKey<A>`'s first four fields, the same
        // types in the same order, both `repr(C)`: a prefix of this key,
        // at its alignment (checked below).
        unsafe { &*(self as *const Self).cast::<CtTuple<A>>() }
    }

    /// The tuple of a packet travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }
}

/// Key of the established table (`map_names::CT_TCP`, `CT6_TCP`): a
/// [`CtKey`] without its protocol and padding, every entry there being
/// TCP. The kernel hashes a key whole (`jhash2`, three words a round):
/// 12 bytes hash in its final step alone, 16 take a round more (IPv6: 36
/// bytes two rounds, 40 three), about 4 ns of every established packet.
/// A lookup passes the prefix of the [`CtKey`] the path built
/// ([`CtKey::tuple`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtTuple<A = u32> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
}

impl<A: Copy> CtTuple<A> {
    /// The conntrack key of this tuple (a TCP flow's).
    #[inline(always)]
    pub const fn key(&self) -> CtKey<A> {
        CtKey::new(
            self.src_addr,
            self.dst_addr,
            self.src_port,
            self.dst_port,
            IPPROTO_TCP,
        )
    }
}

/// Value of the conntrack map: the rewrite for packets carrying the key's tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue<A = u32> {
    /// New source (with `CT_F_REWRITE_SRC`), network byte order.
    pub new_src_addr: A,
    /// New destination (with `CT_F_REWRITE_DST`), network byte order.
    pub new_dst_addr: A,
    pub new_src_port: u16,
    pub new_dst_port: u16,
    /// `CT_F_*` flags.
    pub flags: u16,
    /// `CT_DIR_*`.
    pub dir: u8,
    /// Union of the TCP flags seen in this direction (0 for UDP).
    pub tcp_flags: u8,
    pub backend_id: u32,
    /// The next hop of this direction's packets, as the FIB last said
    /// (ingress only): its interface (0: none cached), the destination then
    /// source MAC (`next_macs`, 12 bytes as they go on the wire, in words)
    /// and `next_len`. Looked up again when `last_seen_ns` is refreshed, so
    /// a route or neighbour change is followed within `CT_REFRESH_NS`.
    /// (The next-hop fields are spread between the others so that no 16
    /// zero bytes of a new entry lie side by side: LLVM would make those a
    /// call to the BPF target's byte-wise `memset`.)
    pub next_ifindex: u32,
    /// CLOCK_MONOTONIC (`bpf_ktime_get_coarse_ns()`, tick resolution) when
    /// the flow was created.
    pub created_ns: u64,
    pub next_macs: [u32; 3],
    pub svc_id: u32,
    /// Last packet in this direction, refreshed at most every `CT_REFRESH_NS`.
    pub last_seen_ns: u64,
    /// The IP length of the packet whose FIB lookup cached the next hop,
    /// which passed the route's MTU check: only packets no longer than it
    /// use the cache, a longer one asks the FIB (and is sent to the stack,
    /// which answers "fragmentation needed", when it does not fit).
    pub next_len: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

impl<A: Copy> CtValue<A> {
    /// The tuple a packet carrying `key` has once this entry's rewrite is applied.
    #[inline(always)]
    pub fn translate(&self, key: &CtKey<A>) -> CtKey<A> {
        let mut t = *key;
        if self.flags & CT_F_REWRITE_SRC != 0 {
            t.src_addr = self.new_src_addr;
            t.src_port = self.new_src_port;
        }
        if self.flags & CT_F_REWRITE_DST != 0 {
            t.dst_addr = self.new_dst_addr;
            t.dst_port = self.new_dst_port;
        }
        t
    }

    /// The key of the other direction's entry of the flow this entry (at
    /// `key`) belongs to: the translated tuple, reversed.
    #[inline(always)]
    pub fn partner(&self, key: &CtKey<A>) -> CtKey<A> {
        self.translate(key).reversed()
    }
}

pub const CT_F_REWRITE_SRC: u16 = 1 << 0;
pub const CT_F_REWRITE_DST: u16 = 1 << 1;
/// Set on the reply entry by the first reply packet: the flow is answered
/// (TCP past SYN, UDP a "stream"), which selects the longer timeout.
pub const CT_F_SEEN_REPLY: u16 = 1 << 2;
/// Set on both entries by a FIN or RST: the flow is closing and expires
/// after the short closing timeout; a new SYN on its tuple starts a new flow.
pub const CT_F_CLOSING: u16 = 1 << 3;
/// The flow is masqueraded: its original entry also rewrites the source, its
/// reply entry also the destination.
pub const CT_F_SNAT: u16 = 1 << 4;
/// The flow was started by the node itself (seen at tc egress).
pub const CT_F_FROM_NODE: u16 = 1 << 5;
/// Set on the original entry of a TCP handshake whose SYN-ACK found
/// `CT_TCP` full: the backend's SYN-ACKs are dropped until the client's
/// retransmitted SYN clears it (so only a live client takes room that
/// frees up), and none reaches the client untranslated meanwhile.
pub const CT_F_REFUSED: u16 = 1 << 6;
/// The flow counts in its backend's active connections
/// ([`map_names::CONNS`]: a least-connection scheduler's service): +1 when
/// it is established (moved to `CT_TCP`), -1 when its original entry is
/// marked [`CT_F_CLOSING`] (a FIN or RST, or the agent expiring it), which
/// an atomic bit operation makes happen exactly once.
pub const CT_F_COUNTED: u16 = 1 << 7;
/// A direct-server-return flow this node balanced to a backend on another
/// node: the client's SYNs (UDP: every datagram that fits) go there in
/// Geneve ([`dsr`]), the rest translated as usual. Its replies never come
/// back here, so the client's first ACK establishes it.
pub const CT_F_DSR_ENCAP: u16 = 1 << 8;
/// A direct-server-return flow to a backend on this node, noted from the
/// Geneve option another node sent: the reply entry rewrites the
/// backend's replies' source to the service address, and they go straight
/// to the client.
pub const CT_F_DSR_DECAP: u16 = 1 << 9;

pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// `last_seen_ns` is rewritten at most this often, so established flows do not
/// write a shared cache line on every packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// TCP flag bits as in the header's 13th byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Service names (`namespace/name:port`) by `svc_id`, NUL-padded: written by
/// the agent for `kpx dump`, never read by the datapath.
pub const SERVICE_NAME_LEN: usize = 192;
pub type ServiceName = [u8; SERVICE_NAME_LEN];

/// Per-service statistics (per CPU), indexed by `svc_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets of this service's flows, both directions.
    pub packets: u64,
    pub bytes: u64,
    /// Flows created (backend selections).
    pub new_flows: u64,
    /// Of `packets` and `bytes`, those in the reply direction (backend to
    /// client): ipvsadm's OutPkts / OutBytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Of `packets`, those translated at XDP (the rest at tc).
    pub xdp_packets: u64,
    /// Connections (and unconnected UDP sends) the socket-level load
    /// balancer sent to a backend: their packets never reach the
    /// per-packet path, so these are flows, not packets.
    pub socket_flows: u64,
}

/// Key of the ClientIP session-affinity map: a client of one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey<A = u32> {
    /// [`ServiceValue::affinity_id`].
    pub affinity_id: u32,
    /// Client address, as on the wire (0 for a socket's client).
    pub client_addr: A,
    /// A client seen at `connect()`, before it has an address: its network
    /// namespace's cookie (a pod: one client address), low then high word
    /// (two words, not a `u64`: an IPv6 key would need padding before
    /// one). 0 for a packet's.
    pub netns_lo: u32,
    pub netns_hi: u32,
}

impl<A> AffinityKey<A> {
    #[inline(always)]
    pub const fn new(affinity_id: u32, client_addr: A, netns_cookie: u64) -> Self {
        Self {
            affinity_id,
            client_addr,
            netns_lo: netns_cookie as u32,
            netns_hi: (netns_cookie >> 32) as u32,
        }
    }

    /// The network namespace cookie.
    pub const fn netns_cookie(&self) -> u64 {
        self.netns_lo as u64 | (self.netns_hi as u64) << 32
    }
}

/// A socket the socket-level load balancer connected (or sends) to a
/// backend: the socket's value in [`map_names::SOCKS_TCP`] (TCP, by
/// cookie) or [`map_names::SOCKS`] (socket storage: UDP).
/// Read back by `recvmsg()` / `getpeername()` to show the service address,
/// by `sendmsg()` to keep an unconnected socket on its backend, and by the
/// socket's release to take it off its backend's connection count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockValue<A = u32> {
    /// The service frontend the socket asked for (network byte order).
    pub svc_addr: A,
    pub svc_port: u16,
    pub proto: u8,
    /// `SOCK_F_*`.
    pub flags: u8,
    /// The backend it was given.
    pub backend_addr: A,
    pub backend_port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    /// The backend's slot in the service's table: `sendmsg()` keeps the
    /// backend while the slot still holds it.
    pub slot: u32,
    pub _pad2: u32,
}

/// Key of [`map_names::SOCK_PEERS`]: a socket (its cookie) and one of the
/// addresses it exchanges datagrams with (network byte order), a service's
/// (its value names the backend) or a backend's (its value names the
/// service, for `recvmsg()`). The cookie is two words (low first: IPv4's
/// key keeps the bytes of a `u64` cookie), so IPv6's key has no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPeerKey<A = u32> {
    pub cookie: [u32; 2],
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl<A> SockPeerKey<A> {
    #[inline(always)]
    pub const fn new(cookie: u64, addr: A, port: u16, proto: u8) -> Self {
        Self {
            cookie: [cookie as u32, (cookie >> 32) as u32],
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// The socket counts in its backend's active connections (`CONNS`): a TCP
/// socket of a least-connection service.
pub const SOCK_F_COUNTED: u8 = 1 << 0;
/// Connected by `connect()` (TCP, or connected UDP); else unconnected UDP
/// steered per `sendmsg()`.
pub const SOCK_F_CONNECTED: u8 = 1 << 1;

/// Where a client's new flows go while its affinity lasts.
///
/// The datapath trusts the record only while `SLOTS[(svc_id, slot)]` still
/// holds `backend_id` and `slot < count`: a backend leaving the service
/// releases its clients without the agent touching this map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub slot: u32,
    /// `bpf_ktime_get_ns()` of the client's last new flow to the service.
    pub last_used_ns: u64,
}

/// Global datapath counters (per CPU), indexed by the enum's value.
///
/// Every packet ends in exactly one of them, so their sum is the number of
/// packets seen (derived in userspace: no extra counter on the hot path).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4, or an IPv4 protocol the datapath does not translate: untouched.
    PassNotHandled = 0,
    /// IPv4 TCP/UDP to no service and of no tracked flow: untouched.
    PassNoService = 1,
    /// Malformed (truncated, bad IHL or length): untouched, never translated.
    PassMalformed = 2,
    /// Fragment not addressed to a service address: untouched.
    PassFragment = 3,
    /// New flow to a service: backend selected, conntrack entries written.
    NewFlow = 4,
    /// Packet of a tracked flow, original direction, translated.
    CtOriginal = 5,
    /// Packet of a tracked flow, reply direction, translated.
    CtReply = 6,
    /// Packet dropped (see the drop-reason map).
    Dropped = 7,
    /// TCP SYN or UDP datagram to a service without endpoints, answered with
    /// ICMP port unreachable (the reference's REJECT).
    Rejected = 8,
    /// ICMP error about a translated flow, translated back (outer and inner).
    IcmpTranslated = 9,
}

impl Counter {
    pub const ALL: [Counter; 10] = [
        Counter::PassNotHandled,
        Counter::PassNoService,
        Counter::PassMalformed,
        Counter::PassFragment,
        Counter::NewFlow,
        Counter::CtOriginal,
        Counter::CtReply,
        Counter::Dropped,
        Counter::Rejected,
        Counter::IcmpTranslated,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Rejected => "rejected",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::PassNotHandled => "pass_not_handled",
            Counter::PassNoService => "pass_no_service",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassFragment => "pass_fragment",
            Counter::NewFlow => "new_flow",
            Counter::CtOriginal => "ct_original",
            Counter::CtReply => "ct_reply",
            Counter::Dropped => "dropped",
        }
    }
}

/// Why a packet was dropped (per-CPU counters, indexed by the enum's value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The service has no eligible backend.
    NoBackend = 0,
    /// A slot or backend entry the service points at is missing (the agent is
    /// mid-update or the maps were edited by hand).
    BackendMissing = 1,
    /// The conntrack map refused the new flow's entries.
    CtInsertFailed = 2,
    /// A packet rewrite or checksum helper failed.
    RewriteFailed = 3,
    /// An IP fragment addressed to a service address: its ports are unknown,
    /// so it cannot be translated consistently with its flow.
    FragmentToService = 4,
    /// A malformed packet addressed to a service address.
    MalformedToService = 5,
    /// TCP to a service that is neither a SYN nor part of a tracked flow (the
    /// reference's `ctstate INVALID -j DROP`).
    InvalidTcp = 6,
    /// A LoadBalancer IP's client outside its `loadBalancerSourceRanges`
    /// (the reference's `KUBE-FW-*` falling through to the drop).
    SourceRange = 7,
    /// A Local traffic policy and no endpoint on this node (the reference's
    /// "has no local endpoints" DROP).
    NoLocalEndpoint = 8,
    /// No free masquerade port towards the chosen backend.
    SnatExhausted = 9,
    /// A new TCP connection's first reply while the established-flow table
    /// is full: the connection is refused (its handshake does not complete)
    /// rather than an established one evicted, as netfilter refuses new
    /// flows when its table is full. The client's retransmission tries again.
    CtFull = 10,
    /// A direct-server-return packet from another node naming a service
    /// this node does not serve (the nodes' Services disagree for a
    /// moment, or the packet is forged): not delivered.
    DsrNoService = 11,
    /// A packet direct server return had to handle while its program was
    /// not in `KPX_PROGS` (never, with an agent that loaded it).
    DsrUnavailable = 12,
    /// A new flow's first packet to a backend on this node's own address
    /// (a hostNetwork endpoint here) from an interface whose tc egress
    /// program the agent is still attaching: its replies would leave
    /// untranslated. The agent attaches it within milliseconds; the
    /// client's retransmission goes through.
    EgressPending = 13,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::NoBackend,
        DropReason::BackendMissing,
        DropReason::CtInsertFailed,
        DropReason::RewriteFailed,
        DropReason::FragmentToService,
        DropReason::MalformedToService,
        DropReason::InvalidTcp,
        DropReason::SourceRange,
        DropReason::NoLocalEndpoint,
        DropReason::SnatExhausted,
        DropReason::CtFull,
        DropReason::DsrNoService,
        DropReason::DsrUnavailable,
        DropReason::EgressPending,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::BackendMissing => "backend_missing",
            DropReason::CtInsertFailed => "ct_insert_failed",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::FragmentToService => "fragment_to_service",
            DropReason::MalformedToService => "malformed_to_service",
            DropReason::InvalidTcp => "invalid_tcp",
            DropReason::SourceRange => "source_range",
            DropReason::NoLocalEndpoint => "no_local_endpoint",
            DropReason::SnatExhausted => "snat_exhausted",
            DropReason::CtFull => "ct_full",
            DropReason::DsrNoService => "dsr_no_service",
            DropReason::DsrUnavailable => "dsr_unavailable",
            DropReason::EgressPending => "egress_pending",
        }
    }
}

/// Conntrack and affinity events (per-CPU counters, indexed by the enum's
/// value). Not verdicts: a packet may cause none or several. `Gc*` and
/// `SockDestroyed` are written by the agent (its running totals), the
/// others by the datapath.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Conntrack entries inserted by the datapath.
    CtInserted = 0,
    /// Conntrack entries the datapath removed (a closed flow's tuple reused
    /// by a new SYN, a reply-tuple collision, a failed flow set-up).
    CtRemoved = 1,
    /// Expired conntrack entries removed by the agent's garbage collector.
    GcExpired = 2,
    /// UDP conntrack entries removed because their backend left the service
    /// (the reference's `conntrack -D`).
    GcStaleUdp = 3,
    /// New flows sent to a client's affinity backend.
    AffinityHit = 4,
    /// New flows that (re)started a client's affinity.
    AffinityNew = 5,
    /// New flows masqueraded (the reference's 0x4000 mark).
    Masqueraded = 6,
    /// Translated packets sent straight to their next hop (`bpf_fib_lookup`
    /// and a redirect), bypassing the stack's forwarding.
    FibRedirect = 7,
    /// Translated packets handed to the stack (local delivery, or the FIB
    /// had no answer: the stack forwards them as before).
    FibStack = 8,
    /// New flows started by the node itself (seen at tc egress).
    FromNode = 9,
    /// TCP connections moved to the established-flow table at their first
    /// reply (each also counts 2 `CtInserted` and 2 `CtRemoved`).
    CtEstablished = 10,
    /// Mid-stream TCP packets of a flow kpx has no entry for (lost with a
    /// conntrack table that could not be carried, removed by hand) that a
    /// hashing scheduler sent to the backend the flow had: the flow goes
    /// on. Under the other schedulers such packets are `invalid_tcp` drops.
    FlowRecovered = 11,
    /// `connect()` calls to a service connected straight to a backend by
    /// the socket-level load balancer (no per-packet translation after).
    SockConnect = 12,
    /// Unconnected UDP `sendmsg()` calls to a service sent to a backend.
    SockSendmsg = 13,
    /// `connect()` / `sendmsg()` to a service without endpoints, refused
    /// with ECONNREFUSED before any packet left (the reference's REJECT).
    SockRefused = 14,
    /// `connect()` / `sendmsg()` to a service left to the tc datapath: the
    /// reference masquerades or drops that flow, which a socket cannot.
    SockToTc = 15,
    /// Unconnected UDP sockets whose backend left the service, sent to a
    /// new one at their next `sendmsg()`.
    SockRebalanced = 16,
    /// `recvmsg()` / `getpeername()` answers shown as from the service.
    SockRevNat = 17,
    /// Connected UDP sockets closed by the agent because their backend left
    /// the service (the reference flushes such flows' conntrack entries),
    /// so the client's next socket picks a serving one. Written by the
    /// agent.
    SockDestroyed = 18,
    /// Packets the XDP program translated and sent back out of the
    /// interface they came in (`XDP_TX`): no skb was ever built for them.
    XdpTx = 19,
    /// Packets the XDP program translated and handed to the stack, for tc
    /// ingress to forward (a local backend, a next hop elsewhere).
    XdpStack = 20,
    /// First packets of direct-server-return flows sent to a backend on
    /// another node in Geneve, the service address as an option.
    DsrEncap = 21,
    /// Such packets received for a backend on this node: taken out of
    /// Geneve, their flow noted, delivered.
    DsrDecap = 22,
    /// New flows that direct server return would have carried but that
    /// were masqueraded instead (the encapsulated packet would not fit
    /// the route's MTU, or its route is not one the datapath forwards).
    DsrFallback = 23,
}

impl Event {
    pub const ALL: [Event; 24] = [
        Event::CtInserted,
        Event::CtRemoved,
        Event::GcExpired,
        Event::GcStaleUdp,
        Event::AffinityHit,
        Event::AffinityNew,
        Event::Masqueraded,
        Event::FibRedirect,
        Event::FibStack,
        Event::FromNode,
        Event::CtEstablished,
        Event::FlowRecovered,
        Event::SockConnect,
        Event::SockSendmsg,
        Event::SockRefused,
        Event::SockToTc,
        Event::SockRebalanced,
        Event::SockRevNat,
        Event::SockDestroyed,
        Event::XdpTx,
        Event::XdpStack,
        Event::DsrEncap,
        Event::DsrDecap,
        Event::DsrFallback,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Event::CtInserted => "ct_inserted",
            Event::CtRemoved => "ct_removed",
            Event::GcExpired => "gc_expired",
            Event::GcStaleUdp => "gc_stale_udp",
            Event::AffinityHit => "affinity_hit",
            Event::AffinityNew => "affinity_new",
            Event::Masqueraded => "masqueraded",
            Event::FibRedirect => "fib_redirect",
            Event::FibStack => "fib_stack",
            Event::FromNode => "from_node",
            Event::CtEstablished => "ct_established",
            Event::FlowRecovered => "flow_recovered",
            Event::SockConnect => "sock_connect",
            Event::SockSendmsg => "sock_sendmsg",
            Event::SockRefused => "sock_refused",
            Event::SockToTc => "sock_to_tc",
            Event::SockRebalanced => "sock_rebalanced",
            Event::SockRevNat => "sock_revnat",
            Event::SockDestroyed => "sock_destroyed",
            Event::XdpTx => "xdp_tx",
            Event::XdpStack => "xdp_stack",
            Event::DsrEncap => "dsr_encap",
            Event::DsrDecap => "dsr_decap",
            Event::DsrFallback => "dsr_fallback",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers and explicit
    // padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Slot {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtTuple {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockPeerKey {}
    unsafe impl aya::Pod for SrcRange {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for SockValue {}
    unsafe impl aya::Pod for ServiceKey<In6> {}
    unsafe impl aya::Pod for Backend<In6> {}
    unsafe impl aya::Pod for Slot<In6> {}
    unsafe impl aya::Pod for CtKey<In6> {}
    unsafe impl aya::Pod for CtTuple<In6> {}
    unsafe impl aya::Pod for CtValue<In6> {}
    unsafe impl aya::Pod for AffinityKey<In6> {}
    unsafe impl aya::Pod for SrcRange<In6> {}
    unsafe impl aya::Pod for Net6 {}
    unsafe impl aya::Pod for SockValue<In6> {}
    unsafe impl aya::Pod for SockPeerKey<In6> {}
    unsafe impl aya::Pod for Net {}
}

/// Layout checks: a change here is a change of the pinned maps' ABI.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 8);
    assert!(core::mem::size_of::<ServiceValue>() == 24);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<Slot>() == 12);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtTuple>() == 12);
    assert!(core::mem::align_of::<CtTuple>() == core::mem::align_of::<CtKey>());
    assert!(core::mem::size_of::<CtValue>() == 64);
    assert!(core::mem::size_of::<ServiceStats>() == 56);
    assert!(core::mem::size_of::<AffinityKey>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<SrcRange>() == 8);
    assert!(core::mem::size_of::<DatapathConfig>() == 32);
    assert!(core::mem::size_of::<SockValue>() == 32);
    assert!(core::mem::size_of::<SockPeerKey>() == 16);
    // IPv6's: the same fields, no implicit padding either.
    assert!(core::mem::size_of::<ServiceKey<In6>>() == 20);
    assert!(core::mem::size_of::<Backend<In6>>() == 20);
    assert!(core::mem::size_of::<Slot<In6>>() == 24);
    assert!(core::mem::size_of::<CtKey<In6>>() == 40);
    assert!(core::mem::size_of::<CtTuple<In6>>() == 36);
    assert!(core::mem::align_of::<CtTuple<In6>>() == core::mem::align_of::<CtKey<In6>>());
    assert!(core::mem::size_of::<CtValue<In6>>() == 88);
    assert!(core::mem::size_of::<AffinityKey<In6>>() == 28);
    assert!(core::mem::size_of::<SrcRange<In6>>() == 20);
    assert!(core::mem::size_of::<Net6>() == 48);
    assert!(core::mem::size_of::<SockValue<In6>>() == 56);
    assert!(core::mem::size_of::<SockPeerKey<In6>>() == 28);
};

/// Conversions between host values and the wire-order fields of map entries.
#[cfg(feature = "user")]
pub mod wire {
    use core::net::{Ipv4Addr, Ipv6Addr};

    /// An address as the datapath stores it (the packet's bytes in memory order).
    pub const fn addr(a: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(a.octets())
    }
    pub const fn to_addr(a: u32) -> Ipv4Addr {
        let b = a.to_ne_bytes();
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    /// An IPv6 address as the datapath stores it.
    pub const fn addr6(a: Ipv6Addr) -> super::In6 {
        let o = a.octets();
        [
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ]
    }
    pub const fn to_addr6(a: super::In6) -> Ipv6Addr {
        let [w0, w1, w2, w3] = [
            a[0].to_ne_bytes(),
            a[1].to_ne_bytes(),
            a[2].to_ne_bytes(),
            a[3].to_ne_bytes(),
        ];
        Ipv6Addr::from_octets([
            w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3],
            w3[0], w3[1], w3[2], w3[3],
        ])
    }
    /// A port as the datapath stores it (network byte order).
    pub const fn port(p: u16) -> u16 {
        p.to_be()
    }
    pub const fn to_port(p: u16) -> u16 {
        u16::from_be(p)
    }
}

#[cfg(test)]
mod names {
    use super::*;

    /// Verdict, drop and event names are unique together: the agent's
    /// metrics mirror keys its running totals by name alone.
    #[test]
    fn counter_names_are_unique_across_kinds() {
        let all = Counter::ALL
            .iter()
            .map(|c| c.name())
            .chain(DropReason::ALL.iter().map(|r| r.name()))
            .chain(Event::ALL.iter().map(|e| e.name()));
        for (i, a) in all.clone().enumerate() {
            assert!(all.clone().skip(i + 1).all(|b| a != b), "{a} twice");
        }
    }
}
