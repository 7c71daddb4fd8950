//! Service lookup: one hash lookup on (destination address, port, protocol);
//! for a packet to one of this node's NodePort addresses that matches no
//! frontend, one more lookup, of the NodePort frontend (the reference's
//! `KUBE-NODEPORTS`, reached last from `KUBE-SERVICES`). Both are skipped
//! for a port no frontend uses, which one array read (`PORTS`, inlined by
//! the verifier: no hash, no helper call) tells, and the first for an
//! address no frontend uses, which a second read of it tells (the address
//! filter): most traffic that is not for a service pays nothing here. The
//! same filter tells which packets can be of a tracked flow at all
//! ([`Ports::may_be_tracked`]), with the reply filter's help for packets
//! from a backend's port.

use proxy_common::{
    dest_block, port_shift, port_word, CtKey, DatapathConfig, PortBit, ServiceKey, ServiceValue,
    DEST_ADDRS, NODE_F_LOCAL, NODE_F_NODEPORT, PORT_BITS, PORT_F_BACKEND, PORT_F_FRONTEND,
    PORT_F_NODEPORT,
};

use crate::{
    conntrack,
    family::Family,
    maps::{CONFIG, DESTS, PORTS},
};

/// `PORT_F_*` bits of port `port` (network order).
#[inline(always)]
fn port_bits(port: u16) -> u64 {
    let port = u16::from_be(port);
    PORTS.get_ptr(port_word(port)).map_or(0, |w| {
        // SAFETY: array element pointer, valid for the program run.
        (unsafe { *w } >> port_shift(port)) & ((1 << PORT_BITS) - 1)
    })
}

/// Whether a backend listens on port `port` (network order): its port
/// filter bit.
#[inline(always)]
pub fn is_backend_port(port: u16) -> bool {
    port_bits(port) & PORT_F_BACKEND != 0
}

/// Whether the address filter's bit `bit` (of block `bit.word` of the
/// destination filter, [`proxy_common::dest_block`]) is set.
#[inline(always)]
fn bit_set(bit: PortBit) -> bool {
    DESTS.get_ptr(bit.word).is_some_and(|b| {
        // SAFETY: array element pointer, valid for the program run; the
        // agent stores the word whole.
        (unsafe { core::ptr::read_volatile(&raw const (*b)[DEST_ADDRS]) }) & bit.mask != 0
    })
}

/// What the port filter says of a TCP/UDP packet's destination: one array
/// read, no hash; a second (the address filter, [`proxy_common::addr_bit`])
/// for a frontend's port.
#[derive(Clone, Copy)]
pub struct Ports {
    /// `PORT_F_FRONTEND` / `PORT_F_NODEPORT` of the destination port,
    /// `PORT_F_FRONTEND` only if the destination address may be a
    /// frontend's too.
    dst: u64,
}

impl Ports {
    #[inline(always)]
    pub fn of<A: Family>(dst: A, dst_port: u16) -> Self {
        Self::of_read(dst_port, || Some(dst))
    }

    /// [`Ports::of`], the destination address read only for a frontend's
    /// port (`None`: not known, taken as maybe a frontend's).
    #[inline(always)]
    pub fn of_read<A: Family>(dst_port: u16, dst: impl FnOnce() -> Option<A>) -> Self {
        Self::of_addr(dst_port, || dst().is_none_or(|a| bit_set(dest_block(a))))
    }

    /// [`Ports::of_read`], `addr()` telling whether the destination's
    /// address-filter bit is set (asked only for a frontend's port).
    #[inline(always)]
    pub fn of_addr(dst_port: u16, addr: impl FnOnce() -> bool) -> Self {
        let mut kinds = dst_kinds(dst_port);
        // A pod's packet to a pod on a frontend's port (80, 443: most
        // services' target port is their port) or a socket-balanced flow's:
        // no frontend's address, no tracked flow's original direction.
        if kinds & PORT_F_FRONTEND != 0 && !addr() {
            kinds &= !PORT_F_FRONTEND;
        }
        Self { dst: kinds }
    }

    /// Whether a packet from `src_port` (its tuple `key()`, None: not
    /// known) can be of a tracked flow: only one to a frontend's port (a
    /// flow's original direction is keyed by its frontend) or, from a
    /// backend's port, one whose tuple is in the reply filter
    /// ([`conntrack::may_be_reply`]: a reply is keyed from its backend);
    /// every other packet skips the conntrack lookup. The source port is
    /// read only for a packet to no frontend's port, the tuple hashed only
    /// for one from a backend's.
    #[inline(always)]
    pub fn may_be_tracked<A: Family>(
        self,
        src_port: u16,
        key: impl FnOnce() -> Option<CtKey<A>>,
    ) -> bool {
        self.may_be_tracked_if(src_port, || {
            key().is_none_or(|k| conntrack::may_be_reply(&k))
        })
    }

    /// [`Ports::may_be_tracked`], `reply()` telling whether the packet may
    /// be a tracked flow's reply (asked only from a backend's port).
    #[inline(always)]
    pub fn may_be_tracked_if(self, src_port: u16, reply: impl FnOnce() -> bool) -> bool {
        self.dst != 0 || (port_bits(src_port) & PORT_F_BACKEND != 0 && reply())
    }
}

#[inline(always)]
fn get<A: Family>(addr: A, port: u16, proto: u8) -> Option<&'static ServiceValue> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // Read in place, not copied: the agent replaces an entry (a new
    // element; NO_PREALLOC frees the old one only after this RCU read
    // section), it never writes one in place, so this one stays as it was.
    A::services().get_ptr(key).map(|v| {
        // SAFETY: a valid map value pointer, alive and unchanged for this
        // RCU read section (above).
        unsafe { &*v }
    })
}

/// The frontend a packet to `addr:port` is for. Lookups: the port filter;
/// 1 for a cluster, external or LoadBalancer IP on a port some such
/// frontend uses; for a NodePort's port, 1 more (`NODE_ADDRS`), and 1 more
/// (the NodePort frontend) when `addr` serves NodePorts.
#[inline(always)]
pub fn lookup<A: Family>(
    ports: Ports,
    addr: A,
    port: u16,
    proto: u8,
) -> Option<&'static ServiceValue> {
    find(ports.dst, addr, port, proto, || {
        node_flags(addr) & NODE_F_NODEPORT != 0
    })
}

/// The frontend a direct-server-return packet from another node names
/// (`addr:port`, the address the client used there): a cluster, external or
/// LoadBalancer IP's own, else the NodePort frontend of `port` (`addr` was
/// the other node's). Lookups: the port filter, then 1 or 2.
#[inline(always)]
pub fn lookup_carried<A: Family>(addr: A, port: u16, proto: u8) -> Option<&'static ServiceValue> {
    find(dst_kinds(port), addr, port, proto, || true)
}

/// A socket call's frontend: [`lookup`] of its destination.
#[inline(always)]
pub fn lookup_dst<A: Family>(addr: A, port: u16, proto: u8) -> Option<&'static ServiceValue> {
    lookup(Ports::of(addr, port), addr, port, proto)
}

/// `PORT_F_FRONTEND` / `PORT_F_NODEPORT` of destination port `port`.
#[inline(always)]
fn dst_kinds(port: u16) -> u64 {
    port_bits(port) & (PORT_F_FRONTEND | PORT_F_NODEPORT)
}

/// `addr:port`'s own frontend, else the NodePort frontend of `port` when
/// `nodeport()` (asked only for a NodePort's port).
#[inline(always)]
fn find<A: Family>(
    kinds: u64,
    addr: A,
    port: u16,
    proto: u8,
    nodeport: impl Fn() -> bool,
) -> Option<&'static ServiceValue> {
    if kinds & PORT_F_FRONTEND != 0 {
        if let Some(v) = get(addr, port, proto) {
            return Some(v);
        }
    }
    if kinds & PORT_F_NODEPORT != 0 && nodeport() {
        return get(A::ZERO, port, proto);
    }
    None
}

/// `NODE_F_*` bits of `addr`: 0 for an address that is not this node's.
#[inline(always)]
pub fn node_flags<A: Family>(addr: A) -> u32 {
    A::node_addrs().get_ptr(addr).map_or(0, |v| {
        // SAFETY: as in `get`.
        unsafe { *v }
    })
}

/// Whether `addr` is an address of this node.
#[inline(always)]
pub fn is_node_addr<A: Family>(addr: A) -> bool {
    node_flags(addr) & NODE_F_LOCAL != 0
}

/// Whether `addr` is a frontend address of any service.
#[inline(always)]
pub fn is_service_addr<A: Family>(addr: A) -> bool {
    addr != A::ZERO && A::service_addrs().get_ptr(addr).is_some()
}

/// The node-wide settings (all zero before the agent writes them: no
/// cluster CIDR, no masquerade), read where they lie: a field is loaded
/// where it is used, not copied with the rest and held across the path.
#[inline(always)]
pub fn config() -> Config {
    // SAFETY: array element pointer, valid for the program run.
    Config(CONFIG.get_ptr(0).map(|c| unsafe { &*c }))
}

/// The node-wide settings ([`config`]).
#[derive(Clone, Copy)]
pub struct Config(Option<&'static DatapathConfig>);

impl Config {
    #[inline(always)]
    pub fn flags(&self) -> u32 {
        self.0.map_or(0, |c| c.flags)
    }

    /// Masquerade ports, host byte order, inclusive.
    #[inline(always)]
    pub fn snat_ports(&self) -> (u16, u16) {
        self.0
            .map_or((0, 0), |c| (c.snat_port_min, c.snat_port_max))
    }

    #[inline(always)]
    pub fn host_netns_cookie(&self) -> u64 {
        self.0.map_or(0, |c| c.host_netns_cookie)
    }

    /// The settings themselves (None before the map has its element).
    #[inline(always)]
    pub fn get(&self) -> Option<&'static DatapathConfig> {
        self.0
    }
}

/// As [`lookup`], without the NodePort fallback: the port filter, then 1
/// lookup.
#[inline(always)]
pub fn lookup_exact<A: Family>(
    ports: Ports,
    addr: A,
    port: u16,
    proto: u8,
) -> Option<&'static ServiceValue> {
    if ports.dst & PORT_F_FRONTEND == 0 {
        return None;
    }
    get(addr, port, proto)
}
