//! The datapath's maps. Layouts and names come from `proxy_common`.
//!
//! Control-plane maps (services, slots) are `BPF_F_NO_PREALLOC`:
//! their elements are freed through RCU, so a lookup racing with the agent's
//! update reads either the old or the new value, never a recycled element.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use proxy_common::{
    capacity, AffinityKey, AffinityValue, Counter, CtKey, CtTuple, CtValue, DatapathConfig,
    DropReason, Event, In6, Net6, ServiceKey, ServiceName, ServiceStats, ServiceValue, Slot,
    SlotKey, SockPeerKey, SockValue, SrcRange,
};

#[map(name = "KPX_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, BPF_F_NO_PREALLOC);

/// Every address that is a frontend of some service, with a reference count.
#[map(name = "KPX_SVC_ADDRS")]
pub static SERVICE_ADDRS: HashMap<u32, u32> =
    HashMap::with_max_entries(capacity::SERVICE_ADDRS, BPF_F_NO_PREALLOC);

/// Each frontend's backend tables, a slot holding its backend whole.
#[map(name = "KPX_SLOTS")]
pub static SLOTS: HashMap<SlotKey, Slot> =
    HashMap::with_max_entries(capacity::SLOTS, BPF_F_NO_PREALLOC);

/// Established TCP flows, both directions. A plain (preallocated) hash:
/// nothing can push an entry out; the agent's collector ends flows by
/// state, and a full table refuses new connections (`DropReason::CtFull`).
/// Keyed by a flow's tuple without its protocol (`CtTuple`): all TCP.
#[map(name = "KPX_CT_TCP")]
pub static CT_TCP: HashMap<CtTuple, CtValue> = HashMap::with_max_entries(capacity::CT_TCP, 0);

/// Every other flow, both directions: UDP, and TCP until its first reply
/// (then moved to `CT_TCP`). LRU: under pressure the least recently used
/// go first rather than new flows failing. Per-CPU LRU lists (as Cilium's
/// conntrack maps): a new flow's insert takes a free element from its own
/// CPU's list, with no lock shared between CPUs.
#[map(name = "KPX_CT_ANY")]
pub static CT_ANY: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(capacity::CT_ANY, BPF_F_NO_COMMON_LRU);

/// The pinned maps' layout version (`proxy_common::LAYOUT_VERSION`),
/// written by the agent; the datapath never reads it.
#[map(name = "KPX_LAYOUT")]
pub static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "KPX_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// ClientIP session affinity. LRU: a forgotten client merely picks anew.
#[map(name = "KPX_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

#[map(name = "KPX_EVENTS")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Event::COUNT, 0);

#[map(name = "KPX_DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

#[map(name = "KPX_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(capacity::SERVICE_STATS, 0);

/// Names for `kpx dump`; the datapath never reads it.
#[map(name = "KPX_SVC_NAMES")]
pub static SERVICE_NAMES: HashMap<u32, ServiceName> =
    HashMap::with_max_entries(capacity::SERVICE_STATS, BPF_F_NO_PREALLOC);

/// This node's addresses, with `NODE_F_*` bits: which serve NodePorts, and
/// which sources are the node itself.
#[map(name = "KPX_NODE_ADDRS")]
pub static NODE_ADDRS: HashMap<u32, u32> =
    HashMap::with_max_entries(capacity::NODE_ADDRS, BPF_F_NO_PREALLOC);

/// `loadBalancerSourceRanges`, keyed by (frontend, client prefix).
#[map(name = "KPX_SRC_RANGES")]
pub static SRC_RANGES: LpmTrie<SrcRange, u32> =
    LpmTrie::with_max_entries(capacity::SRC_RANGES, BPF_F_NO_PREALLOC);

/// Which ports frontends and backends use (`proxy_common::port_word`): a
/// packet to any other port is not for a service, known without a hash
/// lookup. (The address filter's words are `DESTS`'s.)
#[map(name = "KPX_PORTS")]
pub static PORTS: Array<u64> = Array::with_max_entries(capacity::PORT_WORDS, 0);

/// Which tuples may be a tracked flow's reply (`proxy_common::reply_bit`),
/// two copies interleaved: memory-mapped, so that the agent clears one
/// copy with atomic stores while the datapath sets bits with atomic ORs.
#[map(name = "KPX_REPLIES")]
pub static REPLIES: Array<[u64; 2]> =
    Array::with_max_entries(capacity::REPLY_WORDS, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// The destination filter (`proxy_common::dest_block`): per hashed
/// destination address, its address-filter word and its tuples' reply
/// bits, in one cache line: memory-mapped, as `REPLIES` is.
#[map(name = "KPX_DESTS")]
pub static DESTS: Array<[u64; 4]> =
    Array::with_max_entries(capacity::DEST_BLOCKS, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// Which interfaces have kpx's tc egress program (`proxy_common::egress_bit`),
/// written by the agent: read on a new flow's path (an array: inlined).
#[map(name = "KPX_EGRESS")]
pub static EGRESS: Array<u64> = Array::with_max_entries(capacity::EGRESS_WORDS, 0);

/// Interfaces a new flow arrived on without tc egress: the agent attaches
/// it there, and removes the key.
#[map(name = "KPX_EGRESS_WANTED")]
pub static EGRESS_WANTED: HashMap<u32, u32> = HashMap::with_max_entries(capacity::EGRESS_WANTED, 0);

/// Round robin's next position per service id, per CPU: each CPU walks a
/// frontend's slots in order, so no counter is shared between CPUs.
#[map(name = "KPX_RR")]
pub static RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(capacity::SERVICE_STATS, 0);

/// Active connections per backend id (`conns`): written by the datapath
/// only, with atomic adds. Removed by the agent with its backend.
#[map(name = "KPX_CONNS")]
pub static CONNS: HashMap<u32, u64> =
    HashMap::with_max_entries(capacity::BACKENDS, BPF_F_NO_PREALLOC);

/// Node-wide settings: one element.
#[map(name = "KPX_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// UDP sockets the socket-level load balancer gave a backend (`sock`), and
/// TCP ones connected while `SOCKS_TCP` was full or by an older kpx:
/// socket local storage, found from the socket itself (a `recvmsg()` or
/// release of a socket without an entry costs one pointer test), and freed
/// with the socket.
#[btf_map(name = "KPX_SOCKS")]
pub static SOCKS: SkStorage<SockValue> = SkStorage::new();

/// The UDP sockets of `SOCKS` again, by socket cookie, for the agent: it
/// finds there the connected ones whose backend left. Written when a UDP
/// socket's entry is, removed at its release. LRU: a socket whose release
/// was missed cannot fill it.
#[map(name = "KPX_SOCKS_UDP")]
pub static SOCKS_UDP: LruHashMap<u64, SockValue> =
    LruHashMap::with_max_entries(capacity::SOCKS_UDP, 0);

/// TCP sockets the socket-level load balancer connected, by socket
/// cookie (`sock`): one insert at `connect()`, one delete at release (for
/// a socket connected to a backend's port). A socket's first local
/// storage allocates twice under locks, about three times an insert here.
/// Not preallocated; when full, a socket's entry goes to `SOCKS`.
#[map(name = "KPX_SOCKS_TCP")]
pub static SOCKS_TCP: HashMap<u64, SockValue> =
    HashMap::with_max_entries(capacity::SOCKS_TCP, BPF_F_NO_PREALLOC);

/// An unconnected UDP socket's other services, both ways
/// (`proxy_common::SockPeerKey`).
#[map(name = "KPX_SOCK_PEERS")]
pub static SOCK_PEERS: LruHashMap<SockPeerKey, SockValue> =
    LruHashMap::with_max_entries(capacity::SOCK_PEERS, 0);

/// Programs tc ingress and egress tail-call: direct server return's
/// (`proxy_common::PROG_DSR`), IPv6's (`PROG_INGRESS6`, `PROG_EGRESS6`),
/// filled by the agent at load.
#[map(name = "KPX_PROGS")]
pub static PROGS: ProgramArray = ProgramArray::with_max_entries(proxy_common::PROGS, 0);

/// Programs XDP tail-calls (`proxy_common::XDP_PROG_SERVICE6`,
/// `XDP_PROG_NEW6`), filled by the agent when it loads XDP's.
#[map(name = "KPX_XDP_PROGS")]
pub static XDP_PROGS: ProgramArray = ProgramArray::with_max_entries(proxy_common::XDP_PROGS, 0);

// IPv6: the maps above that hold addresses, with IPv6 ones (same layouts,
// `In6` addresses; same capacities, which the agent shrinks when the node
// serves no IPv6). The rest (port filter, statistics, names, round robin,
// connection counts, settings' flags) serve both families: service and
// backend ids are one space.

#[map(name = "KPX_SERVICES6")]
pub static SERVICES6: HashMap<ServiceKey<In6>, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "KPX_SVC_ADDRS6")]
pub static SERVICE_ADDRS6: HashMap<In6, u32> =
    HashMap::with_max_entries(capacity::SERVICE_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "KPX_SLOTS6")]
pub static SLOTS6: HashMap<SlotKey, Slot<In6>> =
    HashMap::with_max_entries(capacity::SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "KPX_CT6_TCP")]
pub static CT6_TCP: HashMap<CtTuple<In6>, CtValue<In6>> =
    HashMap::with_max_entries(capacity::CT_TCP, 0);

#[map(name = "KPX_CT6_ANY")]
pub static CT6_ANY: LruHashMap<CtKey<In6>, CtValue<In6>> =
    LruHashMap::with_max_entries(capacity::CT_ANY, BPF_F_NO_COMMON_LRU);

#[map(name = "KPX_AFFINITY6")]
pub static AFFINITY6: LruHashMap<AffinityKey<In6>, AffinityValue> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

#[map(name = "KPX_NODE_ADDRS6")]
pub static NODE_ADDRS6: HashMap<In6, u32> =
    HashMap::with_max_entries(capacity::NODE_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "KPX_SRC_RANGES6")]
pub static SRC_RANGES6: LpmTrie<SrcRange<In6>, u32> =
    LpmTrie::with_max_entries(capacity::SRC_RANGES, BPF_F_NO_PREALLOC);

/// The socket-level load balancer's `AF_INET6` sockets: the three maps
/// above with IPv6 addresses.
#[btf_map(name = "KPX_SOCKS6")]
pub static SOCKS6: SkStorage<SockValue<In6>> = SkStorage::new();

#[map(name = "KPX_SOCKS_UDP6")]
pub static SOCKS_UDP6: LruHashMap<u64, SockValue<In6>> =
    LruHashMap::with_max_entries(capacity::SOCKS_UDP, 0);

#[map(name = "KPX_SOCKS_TCP6")]
pub static SOCKS_TCP6: HashMap<u64, SockValue<In6>> =
    HashMap::with_max_entries(capacity::SOCKS_TCP, BPF_F_NO_PREALLOC);

#[map(name = "KPX_SOCK_PEERS6")]
pub static SOCK_PEERS6: LruHashMap<SockPeerKey<In6>, SockValue<In6>> =
    LruHashMap::with_max_entries(capacity::SOCK_PEERS, 0);

/// IPv6's cluster CIDR and masquerade address: one element.
#[map(name = "KPX_CONFIG6")]
pub static CONFIG6: Array<Net6> = Array::with_max_entries(1, 0);

/// IPv6's path's state (`main::scratch6`), one per CPU. `repr(C)`: pinned,
/// and shared by the programs of every agent's build in `PROGS`.
///
/// Its addresses lie 4 bytes past a multiple of 8 (the packet's, through
/// [`crate::parse::IpPacket`]'s order; the key's, after `_key_off`): the
/// code writes an address as four 4-byte words, and where it could prove
/// 8-byte alignment the compiler read two of them as one 8-byte word, which
/// cannot be served from the CPU's store buffer (a store-forwarding stall:
/// 5 ns a packet in `perf`, at the key's first reads).
///
/// A change of its layout must change its size (the `_key_off` word did: 328 →
/// 336 bytes; `dsr_backend`, 336 → 360), so an upgrade replaces the pinned map rather than share it
/// with programs that read it otherwise: while `PROGS` is refilled, an old
/// entry's first packet handed to this build's `kpx_tc_new6` finds the new
/// map's zeroes (no backends) and is dropped, a SYN its client resends.
#[repr(C)]
pub struct Scratch6 {
    pub pkt: crate::parse::IpPacket<In6>,
    _key_off: u32,
    pub key: CtKey<In6>,
    /// A first packet's frontend, handed to `kpx_tc_new6`, and whether it
    /// takes up a flow whose entries were lost.
    pub svc: ServiceValue,
    pub recovered: bool,
    /// A translated packet's headers, as stored (`nat::apply6`).
    pub frame: crate::nat::Frame6,
    /// What a REJECT quotes of the packet (`icmp::reject6`).
    pub quote: [u32; crate::icmp::QUOTE6_MAX / 4],
    /// The backend of a new flow handed to direct server return's program
    /// (`dsr::first`): five words, too many for the control buffer beside
    /// the request.
    pub dsr_backend: proxy_common::Backend<In6>,
}

// The addresses' offsets, as said above.
const _: () = {
    use core::mem::offset_of;
    let pkt = offset_of!(Scratch6, pkt);
    assert!((pkt + offset_of!(crate::parse::IpPacket<In6>, src)) % 8 == 4);
    assert!((pkt + offset_of!(crate::parse::IpPacket<In6>, dst)) % 8 == 4);
    assert!(offset_of!(Scratch6, key) % 8 == 4);
};

/// This CPU's scratch space for IPv6's path (an array's element, no hash
/// lookup): the packet, its tuple, a first packet's frontend, the
/// rewritten headers and a REJECT's quote live there, not on the stack,
/// where IPv6's addresses held across the path's helper calls outgrew the
/// verifier's 512 bytes. Kept across a tail call (the same run, the same
/// CPU).
#[inline(always)]
pub fn scratch6() -> Option<&'static mut Scratch6> {
    // SAFETY: this CPU's element, valid for the program run; nothing else
    // on this CPU uses it while the program runs.
    SCRATCH6.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

#[map(name = "KPX_SCRATCH6")]
pub static SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);
