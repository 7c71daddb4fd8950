//! The datapath's paths, each a packet on a populated table, run through
//! the real eBPF object in `pathlen`'s counting interpreter: BPF
//! instructions executed and helper calls per packet, exact and repeatable.
//! `tests/pathlen.rs` holds each path to a budget; `cargo xtask bench
//! --packet` prints the same counts next to the nanoseconds.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context as _, Result};
use etherparse::Icmpv4Type;
use pathlen::{Fib, Run, Skb, Vm};
use proxy_common::{
    addr_bit, map_names, prog_names, wire, Backend, DatapathConfig, Net6, PortBit, ServiceKey,
    ServiceValue, Slot, SlotKey, ADDR_WORD0, CFG_F_DSR_UDP, IPPROTO_TCP, IPPROTO_UDP,
    MARK_TRANSLATED, NODEPORT_ADDR, NODE_F_LOCAL, NODE_F_NODEPORT, PROG_DSR, PROG_EGRESS6,
    PROG_INGRESS6, PROG_NEW6, PROG_NEW6_NODE, SCHED_LC, SCHED_MH, SCHED_RR, SVC_F_EXTERNAL,
    SVC_F_NODEPORT, SVC_SCHED_SHIFT, XDP_PROG_NEW6, XDP_PROG_SERVICE6,
};

use super::{
    geneve_frame, icmp_error, ip, Pkt, ACK, SYN, SYN_ACK, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    TC_ACT_UNSPEC, UDP,
};

const CLIENT: &str = "198.18.0.2";
/// A client outside the cluster CIDR (198.18.0.0/17): masqueraded.
const OUTSIDE: &str = "198.18.128.5";
const NODE: &str = "198.18.0.1";
const VIP: &str = "198.19.0.10";
const AFFINITY_VIP: &str = "198.19.0.11";
const EMPTY_VIP: &str = "198.19.0.12";
const RR_VIP: &str = "198.19.0.13";
const MAGLEV_VIP: &str = "198.19.0.14";
const LC_VIP: &str = "198.19.0.15";
const NODE_PORT: u16 = 30080;
const DSR_NODE_PORT: u16 = 30053;
/// Another node, which sends this one direct server return's Geneve.
const OTHER_NODE: &str = "198.18.0.7";
const BACKENDS: u32 = 10;

// IPv6's table: a ClusterIP service with 10 backends and one without
// endpoints; the cluster CIDR 2001:2::/56, the node 2001:2::1.
const CLIENT6: &str = "2001:2::2";
/// Outside the cluster CIDR: masqueraded.
const OUTSIDE6: &str = "2001:2:0:900::5";
const NODE6: &str = "2001:2::1";
const VIP6: &str = "2001:2:0:ff::10";
const EMPTY_VIP6: &str = "2001:2:0:ff::12";
/// Another node, which sends this one direct server return's Geneve.
const OTHER_NODE6: &str = "2001:2::7";

/// One path: a packet, the hook, what the FIB answers, and the verdict the
/// path must end in (so a count is never of a path the packet did not take).
pub struct Path {
    pub name: &'static str,
    pub egress: bool,
    /// Through the XDP program (received on `ingress_ifindex`), not tc
    /// ingress.
    pub xdp: bool,
    /// Sent a conntrack refresh interval after the path before: its flow's
    /// entry is refreshed, and the FIB asked again (its answer may have
    /// changed, as here from no route to a next hop).
    pub later: bool,
    pub fib: Fib,
    pub mark: u32,
    /// The interface a forwarded packet came in on (0: the node sent it).
    pub ingress_ifindex: u32,
    pub frame: Vec<u8>,
    pub verdict: u32,
}

/// The next hop's MAC address the FIB answers with.
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];

/// The interface the FIB's next hop is out of, and XDP's paths' packets
/// come in on.
const EXTERNAL_IF: u32 = 2;

const FORWARD: Fib = Fib::Forward {
    ifindex: EXTERNAL_IF,
    src: [198, 18, 0, 1],
    src6: [0x20, 0x01, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01],
    smac: [0x02, 0, 0, 0, 0, 0x10],
    dmac: NEXT_HOP_MAC,
};

/// Loads the datapath object into a VM with kpx's standard table: a
/// ClusterIP service with 10 backends, a NodePort for it, a service with
/// ClientIP affinity, one without endpoints, this node's address, the
/// cluster CIDR and masquerade settings.
pub fn vm() -> Result<Vm> {
    let mut vm = Vm::load(kpx::dataplane::maps::OBJECT)?;
    service(&mut vm, 0, (VIP, 80, IPPROTO_TCP), 0, BACKENDS, 0)?;
    service(
        &mut vm,
        1,
        ("0.0.0.0", NODE_PORT, IPPROTO_TCP),
        SVC_F_EXTERNAL | SVC_F_NODEPORT,
        BACKENDS,
        0,
    )?;
    service(
        &mut vm,
        2,
        (AFFINITY_VIP, 80, IPPROTO_TCP),
        0,
        BACKENDS,
        10_800,
    )?;
    service(&mut vm, 3, (EMPTY_VIP, 80, IPPROTO_TCP), 0, 0, 0)?;
    service(
        &mut vm,
        4,
        (RR_VIP, 80, IPPROTO_TCP),
        SCHED_RR << SVC_SCHED_SHIFT,
        BACKENDS,
        0,
    )?;
    service(
        &mut vm,
        5,
        (MAGLEV_VIP, 80, IPPROTO_TCP),
        SCHED_MH << SVC_SCHED_SHIFT,
        BACKENDS,
        0,
    )?;
    service(
        &mut vm,
        6,
        (LC_VIP, 80, IPPROTO_TCP),
        SCHED_LC << SVC_SCHED_SHIFT,
        BACKENDS,
        0,
    )?;
    // DNS on the service address too: TCP to its port 53 is for no
    // frontend, but its address's and its port's filter bits are set.
    service(&mut vm, 8, (VIP, 53, IPPROTO_UDP), 0, 1, 0)?;
    // A UDP NodePort, served with direct server return (TCP is not: the
    // TCP NodePort's path stays the masqueraded one).
    service(
        &mut vm,
        7,
        ("0.0.0.0", DSR_NODE_PORT, IPPROTO_UDP),
        SVC_F_EXTERNAL | SVC_F_NODEPORT,
        BACKENDS,
        0,
    )?;
    // Some connections open on its backends, as on a busy node.
    for slot in 0..BACKENDS {
        vm.map_insert(
            map_names::CONNS,
            &(600 + slot).to_ne_bytes(),
            &u64::from(slot % 3).to_ne_bytes(),
        )?;
    }
    let node = wire::addr(ip(NODE));
    mark(&mut vm, Some(addr_bit(node)))?;
    vm.map_insert(
        map_names::NODE_ADDRS,
        &node.to_ne_bytes(),
        &(NODE_F_LOCAL | NODE_F_NODEPORT).to_ne_bytes(),
    )?;
    let cfg = DatapathConfig {
        cluster_cidr: wire::addr(ip("198.18.0.0")),
        cluster_mask: wire::addr(Ipv4Addr::new(255, 255, 128, 0)),
        snat_addr: node,
        snat_port_min: 1024,
        snat_port_max: 29999,
        flags: CFG_F_DSR_UDP | proxy_common::CFG_F_DSR_IPV6,
        _pad: 0,
        host_netns_cookie: 0,
    };
    vm.map_insert(map_names::CONFIG, &0u32.to_ne_bytes(), bytes(&cfg))?;
    // tc egress on the interfaces flows come in on (tc's packets on
    // loopback's, as in `BPF_PROG_TEST_RUN`; XDP's on theirs), as the agent
    // notes it: a new flow there asks for nothing.
    let mut egress = std::collections::BTreeMap::<u32, u64>::new();
    for ifindex in [Skb::default().ifindex, EXTERNAL_IF, POD_IF] {
        let bit = proxy_common::egress_bit(ifindex).expect("a small ifindex");
        *egress.entry(bit.word).or_default() |= bit.mask;
    }
    for (word, bits) in egress {
        vm.map_insert(map_names::EGRESS, &word.to_ne_bytes(), &bits.to_ne_bytes())?;
    }
    vm.set_tail(map_names::PROGS, PROG_DSR, prog_names::TC_DSR)?;
    service6(&mut vm, 20, (VIP6, 80, IPPROTO_TCP), BACKENDS, 0)?;
    service6(&mut vm, 21, (EMPTY_VIP6, 80, IPPROTO_TCP), 0, 0)?;
    service6(&mut vm, 22, (VIP6, 53, IPPROTO_UDP), 1, 0)?;
    // IPv6's UDP NodePort with direct server return, as IPv4's.
    service6(
        &mut vm,
        23,
        ("::", DSR_NODE_PORT, IPPROTO_UDP),
        BACKENDS,
        SVC_F_EXTERNAL | SVC_F_NODEPORT,
    )?;
    let node6 = wire::addr6(NODE6.parse()?);
    mark(&mut vm, Some(addr_bit(node6)))?;
    vm.map_insert(
        map_names::NODE_ADDRS6,
        bytes(&node6),
        &(NODE_F_LOCAL | NODE_F_NODEPORT).to_ne_bytes(),
    )?;
    let net = Net6 {
        cluster_cidr: wire::addr6("2001:2::".parse()?),
        cluster_mask: wire::addr6("ffff:ffff:ffff:ff00::".parse()?),
        snat_addr: node6,
    };
    vm.map_insert(map_names::CONFIG6, &0u32.to_ne_bytes(), bytes(&net))?;
    for (index, prog) in [
        (PROG_INGRESS6, prog_names::TC_INGRESS6),
        (PROG_EGRESS6, prog_names::TC_EGRESS6),
        (PROG_NEW6, prog_names::TC_NEW6),
        (PROG_NEW6_NODE, prog_names::TC_NEW6_NODE),
    ] {
        vm.set_tail(map_names::PROGS, index, prog)?;
    }
    for (index, prog) in [
        (XDP_PROG_SERVICE6, prog_names::XDP_SERVICE6),
        (XDP_PROG_NEW6, prog_names::XDP_NEW6),
    ] {
        vm.set_tail(map_names::XDP_PROGS, index, prog)?;
    }
    Ok(vm)
}

/// An IPv6 frontend with `backends` backends (2001:2:0:<svc_id>::<n>,
/// port 8080) and `flags` (`SVC_F_*`), laid out as the agent lays them out
/// (a NodePort's address is `::`).
fn service6(
    vm: &mut Vm,
    svc_id: u32,
    (addr, port, proto): (&str, u16, u8),
    backends: u32,
    flags: u32,
) -> Result<()> {
    for slot in 0..backends {
        let b = Backend {
            addr: wire::addr6(Ipv6Addr::new(
                0x2001,
                2,
                0,
                svc_id as u16,
                0,
                0,
                0,
                1 + slot as u16,
            )),
            port: wire::port(8080),
            proto,
            flags: 0,
        };
        let s = Slot {
            backend_id: svc_id * 100 + slot,
            backend: b,
        };
        vm.map_insert(
            map_names::SLOTS6,
            bytes(&SlotKey { svc_id, slot }),
            bytes(&s),
        )?;
    }
    let key = ServiceKey {
        addr: wire::addr6(addr.parse()?),
        port: wire::port(port),
        proto,
        _pad: 0,
    };
    let value = ServiceValue {
        svc_id,
        count: backends,
        affinity_id: svc_id,
        flags,
        ..Default::default()
    };
    vm.map_insert(map_names::SERVICES6, bytes(&key), bytes(&value))?;
    if flags & SVC_F_NODEPORT != 0 {
        // Its port's bits are IPv4's NodePort's already.
        return Ok(());
    }
    vm.map_insert(
        map_names::SERVICE_ADDRS6,
        bytes(&key.addr),
        &1u32.to_ne_bytes(),
    )?;
    // Port 80's and 8080's bits are IPv4's services' already: the filter
    // serves both families. The address's bit is its own.
    mark(vm, key.addr_bit())
}

/// Sets `bit` of the port and address filter, as the agent does: a
/// port's in `KPX_PORTS`, an address's in its destination block's first
/// word (`KPX_DESTS`).
fn mark(vm: &mut Vm, bit: Option<PortBit>) -> Result<()> {
    let Some(bit) = bit else { return Ok(()) };
    let (map, key) = match bit.word.checked_sub(ADDR_WORD0) {
        Some(block) => (map_names::DESTS, block),
        None => (map_names::PORTS, bit.word),
    };
    let mut value = match vm.map_get(map, &key.to_ne_bytes())? {
        Some(v) => v,
        None => vec![0; if key == bit.word { 8 } else { 32 }],
    };
    let word = u64::from_ne_bytes(value[..8].try_into()?) | bit.mask;
    value[..8].copy_from_slice(&word.to_ne_bytes());
    vm.map_insert(map, &key.to_ne_bytes(), &value)
}

fn service(
    vm: &mut Vm,
    svc_id: u32,
    (addr, port, proto): (&str, u16, u8),
    flags: u32,
    backends: u32,
    affinity_timeout: u32,
) -> Result<()> {
    for slot in 0..backends {
        let id = svc_id * 100 + slot;
        let b = Backend {
            addr: wire::addr(Ipv4Addr::new(198, 18, 1 + svc_id as u8, 1 + slot as u8)),
            port: wire::port(8080),
            proto,
            flags: 0,
        };
        vm.map_insert(
            map_names::SLOTS,
            bytes(&SlotKey { svc_id, slot }),
            bytes(&Slot {
                backend_id: id,
                backend: b,
            }),
        )?;
    }
    let key = ServiceKey {
        addr: if addr == "0.0.0.0" {
            NODEPORT_ADDR
        } else {
            wire::addr(ip(addr))
        },
        port: wire::port(port),
        proto,
        _pad: 0,
    };
    let value = ServiceValue {
        svc_id,
        count: backends,
        flags,
        affinity_timeout,
        local_count: 0,
        affinity_id: svc_id,
    };
    vm.map_insert(map_names::SERVICES, bytes(&key), bytes(&value))?;
    // Its bits in the port filter (its own, its backends'), as the agent
    // sets them.
    let backend_port: Backend = Backend {
        port: wire::port(8080),
        ..Default::default()
    };
    for bit in [
        Some(key.port_bit()),
        Some(backend_port.port_bit()),
        key.addr_bit(),
    ] {
        mark(vm, bit)?;
    }
    if key.addr != NODEPORT_ADDR {
        vm.map_insert(
            map_names::SERVICE_ADDRS,
            &key.addr.to_ne_bytes(),
            &1u32.to_ne_bytes(),
        )?;
    }
    Ok(())
}

fn bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: aya::Pod types are plain old data with explicit padding
    // fields: every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, l4: super::L4) -> Vec<u8> {
    Pkt::new(src, sport, dst, dport, l4).build()
}

fn path(name: &'static str, frame: Vec<u8>, fib: Fib, verdict: u32) -> Path {
    Path {
        name,
        egress: false,
        xdp: false,
        later: false,
        fib,
        mark: 0,
        ingress_ifindex: 0,
        frame,
        verdict,
    }
}

/// The interface the egress paths' forwarded packets came in on.
const POD_IF: u32 = 3;

/// XDP's verdicts.
const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// A path through the XDP program, the packet received on the FIB's
/// interface.
fn xdp_path(name: &'static str, frame: Vec<u8>, verdict: u32) -> Path {
    Path {
        xdp: true,
        ingress_ifindex: EXTERNAL_IF,
        ..path(name, frame, FORWARD, verdict)
    }
}

/// Every path, in the order the table prints them. The established and
/// reply paths use the flow the "first packet" path opens, so run them in
/// this order on one VM (as [`run_all`] does).
pub fn paths(backend: Ipv4Addr) -> Vec<Path> {
    let b = backend.to_string();
    let mut arp = tcp(CLIENT, 1, CLIENT, 1, ACK);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut fragment = tcp(CLIENT, 40001, VIP, 80, ACK);
    fragment[14 + 6] |= 0x20; // more fragments
                              // What the backend's port unreachable quotes: the client's packet as
                              // the backend saw it.
    let quoted = tcp(CLIENT, 45000, &b, 8080, ACK);
    let icmp = icmp_error(
        &b,
        CLIENT,
        Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
        &quoted[14..14 + 28],
    );
    vec![
        path("not IPv4", arp, FORWARD, TC_ACT_UNSPEC),
        path(
            "no service",
            tcp(CLIENT, 40000, "198.18.3.3", 80, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        // Port 53's filter bit and the service address's are set (as for
        // an address whose bit another one's hash set), no frontend is
        // TCP port 53 there: conntrack and the services are asked.
        path(
            "no service, a frontend's port and address",
            tcp(CLIENT, 40000, VIP, 53, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "no service, port no frontend uses",
            tcp(CLIENT, 40000, "198.18.3.3", 9000, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "no service, to the node",
            tcp(CLIENT, 40000, NODE, 22, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        // A backend's packet to a client that reached it directly (a pod's,
        // a socket-balanced flow's): its port is a backend's, its tuple no
        // flow's reply (the reply filter's bit clear).
        path(
            "no service, from a backend's port",
            tcp(&b, 8080, CLIENT, 41000, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "first packet",
            tcp(CLIENT, 45000, VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        // The backend's SYN-ACK moves the connection to the established
        // table (the FIB says "the stack", so nothing is cached yet).
        path(
            "first reply: connection established",
            tcp(&b, 8080, CLIENT, 45000, SYN_ACK),
            Fib::NoRoute,
            TC_ACT_OK,
        ),
        // Nothing cached: the FIB is asked and says "the stack", which the
        // flow entry keeps...
        path(
            "established, FIB to the stack",
            tcp(CLIENT, 45000, VIP, 80, ACK),
            Fib::NoRoute,
            TC_ACT_OK,
        ),
        // ...for the flow's next packets, until its refresh.
        path(
            "established, to the stack (cached)",
            tcp(CLIENT, 45000, VIP, 80, ACK),
            Fib::NoRoute,
            TC_ACT_OK,
        ),
        // A second later the FIB is asked again (it has a route now) and
        // its next hop cached in the flow entry...
        Path {
            later: true,
            ..path(
                "established, next hop looked up",
                tcp(CLIENT, 45000, VIP, 80, ACK),
                FORWARD,
                TC_ACT_REDIRECT,
            )
        },
        // ...which every later packet uses: the common case.
        path(
            "established",
            tcp(CLIENT, 45000, VIP, 80, ACK),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        // The reply direction kept "the stack" from its SYN-ACK: a second
        // later, the FIB's next hop.
        Path {
            later: true,
            ..path(
                "reply, next hop looked up",
                tcp(&b, 8080, CLIENT, 45000, ACK),
                FORWARD,
                TC_ACT_REDIRECT,
            )
        },
        path(
            "reply",
            tcp(&b, 8080, CLIENT, 45000, ACK),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path("ICMP error about a flow", icmp, FORWARD, TC_ACT_OK),
        path(
            "first packet, masqueraded",
            tcp(OUTSIDE, 45001, VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "first packet, NodePort",
            tcp(OUTSIDE, 45002, NODE, NODE_PORT, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "first packet, ClientIP affinity",
            tcp(CLIENT, 45003, AFFINITY_VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "first packet, round robin",
            tcp(CLIENT, 45005, RR_VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "first packet, Maglev",
            tcp(CLIENT, 45006, MAGLEV_VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "first packet, least connections",
            tcp(CLIENT, 45008, LC_VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        // A flow whose entries were lost, taken up by its next segment.
        path(
            "lost flow taken up (Maglev)",
            tcp(CLIENT, 45007, MAGLEV_VIP, 80, ACK),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "no endpoints: REJECT",
            tcp(CLIENT, 45004, EMPTY_VIP, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path("fragment to a service", fragment, FORWARD, TC_ACT_SHOT),
        // Direct server return (UDP here): the first datagram balanced and
        // sent in Geneve to the backend's node, the next the same way; and
        // at a backend's node, another node's Geneve taken out.
        path(
            "DSR: first packet, in Geneve",
            Pkt::new(OUTSIDE, 45010, NODE, DSR_NODE_PORT, UDP).build(),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "DSR: a datagram in Geneve again",
            Pkt::new(OUTSIDE, 45010, NODE, DSR_NODE_PORT, UDP).build(),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "DSR: Geneve received, to a backend here",
            geneve_frame(
                OTHER_NODE,
                &Pkt::new(OUTSIDE, 45011, "198.18.2.1", 8080, SYN),
                (OTHER_NODE, NODE_PORT),
            ),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        Path {
            egress: true,
            ingress_ifindex: POD_IF,
            ..path(
                "egress: a pod's packet",
                tcp(CLIENT, 40000, "198.18.3.3", 80, ACK),
                FORWARD,
                TC_ACT_UNSPEC,
            )
        },
        Path {
            egress: true,
            ..path(
                "egress: the node's own, no service",
                tcp(NODE, 40000, "198.18.3.3", 80, ACK),
                FORWARD,
                TC_ACT_UNSPEC,
            )
        },
        Path {
            egress: true,
            mark: MARK_TRANSLATED,
            ..path(
                "egress: already translated",
                tcp(CLIENT, 45000, &b, 8080, ACK),
                FORWARD,
                TC_ACT_UNSPEC,
            )
        },
        // XDP on the interface the flow's next hop is out of (a NodePort's
        // backend or client on another node), the flow's entries as tc
        // left them: translated and sent back out.
        xdp_path(
            "XDP: no service",
            tcp(CLIENT, 40000, "198.18.3.3", 80, ACK),
            XDP_PASS,
        ),
        // (The flow's original direction was last refreshed a second
        // before the reply's "next hop looked up": its next hop asked
        // again, then cached.)
        xdp_path(
            "XDP: established, next hop looked up",
            tcp(CLIENT, 45000, VIP, 80, ACK),
            XDP_TX,
        ),
        xdp_path("XDP: established", tcp(CLIENT, 45000, VIP, 80, ACK), XDP_TX),
        xdp_path("XDP: reply", tcp(&b, 8080, CLIENT, 45000, ACK), XDP_TX),
        // Received on another interface than its next hop's: translated,
        // marked so in the frame's metadata and handed up, for tc to
        // forward.
        Path {
            ingress_ifindex: POD_IF,
            ..xdp_path(
                "XDP: established, handed to tc",
                tcp(CLIENT, 45000, VIP, 80, ACK),
                XDP_PASS,
            )
        },
        xdp_path(
            "XDP: first packet",
            tcp(CLIENT, 45020, VIP, 80, SYN),
            XDP_TX,
        ),
    ]
}

fn tcp6(src: &str, sport: u16, dst: &str, dport: u16, l4: super::L4) -> Vec<u8> {
    super::v6::Pkt6::new(src, sport, dst, dport, l4).build()
}

/// IPv6's paths, in the order the table prints them (after IPv4's, on the
/// same VM): its programs tail-called from IPv4's entries.
pub fn paths6(backend: Ipv6Addr) -> Vec<Path> {
    let b = backend.to_string();
    // A Packet Too Big from the backend about the client's packet, as the
    // backend saw it (the kernel quotes it whole).
    let quoted = tcp6(CLIENT6, 45000, &b, 8080, ACK);
    let icmp = etherparse::Icmpv6Header::with_checksum(
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 },
        backend.octets(),
        CLIENT6.parse::<Ipv6Addr>().expect("address").octets(),
        &quoted[14..],
    )
    .expect("icmpv6");
    let mut icmp6 = quoted[..14].to_vec();
    let ip6 = etherparse::Ipv6Header {
        traffic_class: 0,
        flow_label: etherparse::Ipv6FlowLabel::ZERO,
        payload_length: (8 + quoted.len() - 14) as u16,
        next_header: etherparse::IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: backend.octets(),
        destination: CLIENT6.parse::<Ipv6Addr>().expect("address").octets(),
    };
    ip6.write(&mut icmp6).expect("ipv6 header");
    icmp.write(&mut icmp6).expect("icmpv6 header");
    icmp6.extend_from_slice(&quoted[14..]);
    let mut fragment = super::v6::Pkt6::new(CLIENT6, 40001, VIP6, 80, ACK);
    fragment.ext = vec![super::v6::Ext::fragment(0, true)];
    vec![
        path(
            "IPv6: no service",
            tcp6(CLIENT6, 40000, "2001:2:0:33::3", 80, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "IPv6: no service, a frontend's port and address",
            tcp6(CLIENT6, 40000, VIP6, 53, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "IPv6: no service, port no frontend uses",
            tcp6(CLIENT6, 40000, "2001:2:0:33::3", 9000, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "IPv6: no service, from a backend's port",
            tcp6(&b, 8080, CLIENT6, 41000, ACK),
            FORWARD,
            TC_ACT_UNSPEC,
        ),
        path(
            "IPv6: first packet",
            tcp6(CLIENT6, 45000, VIP6, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "IPv6: first reply: connection established",
            tcp6(&b, 8080, CLIENT6, 45000, SYN_ACK),
            Fib::NoRoute,
            TC_ACT_OK,
        ),
        path(
            "IPv6: established, FIB to the stack",
            tcp6(CLIENT6, 45000, VIP6, 80, ACK),
            Fib::NoRoute,
            TC_ACT_OK,
        ),
        path(
            "IPv6: established, to the stack (cached)",
            tcp6(CLIENT6, 45000, VIP6, 80, ACK),
            Fib::NoRoute,
            TC_ACT_OK,
        ),
        Path {
            later: true,
            ..path(
                "IPv6: established, next hop looked up",
                tcp6(CLIENT6, 45000, VIP6, 80, ACK),
                FORWARD,
                TC_ACT_REDIRECT,
            )
        },
        path(
            "IPv6: established",
            tcp6(CLIENT6, 45000, VIP6, 80, ACK),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        Path {
            later: true,
            ..path(
                "IPv6: reply, next hop looked up",
                tcp6(&b, 8080, CLIENT6, 45000, ACK),
                FORWARD,
                TC_ACT_REDIRECT,
            )
        },
        path(
            "IPv6: reply",
            tcp6(&b, 8080, CLIENT6, 45000, ACK),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path("IPv6: ICMP error about a flow", icmp6, FORWARD, TC_ACT_OK),
        path(
            "IPv6: first packet, masqueraded",
            tcp6(OUTSIDE6, 45001, VIP6, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "IPv6: no endpoints: REJECT",
            tcp6(CLIENT6, 45002, EMPTY_VIP6, 80, SYN),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "IPv6: fragment to a service",
            fragment.build(),
            FORWARD,
            TC_ACT_SHOT,
        ),
        // Direct server return, as IPv4's: Geneve over IPv6.
        path(
            "IPv6: DSR: first packet, in Geneve",
            tcp6(OUTSIDE6, 45010, NODE6, DSR_NODE_PORT, UDP),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "IPv6: DSR: a datagram in Geneve again",
            tcp6(OUTSIDE6, 45010, NODE6, DSR_NODE_PORT, UDP),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        path(
            "IPv6: DSR: Geneve received, to a backend here",
            super::v6::geneve_frame6(
                OTHER_NODE6,
                &super::v6::Pkt6::new(OUTSIDE6, 45011, &b, 8080, UDP),
                (OTHER_NODE6, DSR_NODE_PORT),
            ),
            FORWARD,
            TC_ACT_REDIRECT,
        ),
        Path {
            egress: true,
            ingress_ifindex: POD_IF,
            ..path(
                "IPv6: egress: a pod's packet",
                tcp6(CLIENT6, 40000, "2001:2:0:33::3", 80, ACK),
                FORWARD,
                TC_ACT_UNSPEC,
            )
        },
        Path {
            egress: true,
            ..path(
                "IPv6: egress: the node's own, no service",
                tcp6(NODE6, 40000, "2001:2:0:33::3", 80, ACK),
                FORWARD,
                TC_ACT_UNSPEC,
            )
        },
        xdp_path(
            "IPv6: XDP: no service",
            tcp6(CLIENT6, 40000, "2001:2:0:33::3", 80, ACK),
            XDP_PASS,
        ),
        xdp_path(
            "IPv6: XDP: established, next hop looked up",
            tcp6(CLIENT6, 45000, VIP6, 80, ACK),
            XDP_TX,
        ),
        xdp_path(
            "IPv6: XDP: established",
            tcp6(CLIENT6, 45000, VIP6, 80, ACK),
            XDP_TX,
        ),
        xdp_path(
            "IPv6: XDP: reply",
            tcp6(&b, 8080, CLIENT6, 45000, ACK),
            XDP_TX,
        ),
        xdp_path(
            "IPv6: XDP: first packet",
            tcp6(CLIENT6, 45020, VIP6, 80, SYN),
            XDP_TX,
        ),
    ]
}

/// Runs one path; fails if the packet ended anywhere but its path's verdict.
pub fn run(vm: &mut Vm, p: &Path) -> Result<Run> {
    vm.fib = p.fib;
    if p.later {
        vm.advance_clock(proxy_common::CT_REFRESH_NS);
    }
    let prog = if p.egress {
        prog_names::TC_EGRESS
    } else {
        prog_names::TC_INGRESS
    };
    let skb = Skb {
        mark: p.mark,
        ingress_ifindex: p.ingress_ifindex,
        ..Skb::default()
    };
    let r = if p.xdp {
        vm.run_xdp(prog_names::XDP, &p.frame, p.ingress_ifindex)?
    } else {
        vm.run(prog, &p.frame, skb)?
    };
    ensure!(
        r.verdict as u32 == p.verdict,
        "path {:?} ended in verdict {}, not {} (helpers {:?})",
        p.name,
        r.verdict,
        p.verdict as i32,
        r.by_helper
    );
    Ok(r)
}

/// Every path on a fresh VM, in order: (path, run).
pub fn run_all() -> Result<Vec<(&'static str, Run)>> {
    let mut vm = vm()?;
    // The backend the first packet will pick: open the flow once on a
    // scratch VM with the same seed.
    let backend = {
        let mut probe = self::vm()?;
        let first = paths(Ipv4Addr::UNSPECIFIED)
            .into_iter()
            .find(|p| p.name == "first packet")
            .context("no first-packet path")?;
        let r = run(&mut probe, &first)?;
        super::inspect(&r.packet).dst
    };
    // IPv6's, after IPv4's paths (which draw from the same random
    // sequence) on a scratch VM.
    let backend6 = {
        let mut probe = self::vm()?;
        for p in paths(backend) {
            run(&mut probe, &p)?;
        }
        let first = paths6(Ipv6Addr::UNSPECIFIED)
            .into_iter()
            .find(|p| p.name == "IPv6: first packet")
            .context("no IPv6 first-packet path")?;
        let r = run(&mut probe, &first)?;
        super::v6::inspect6(&r.packet).dst
    };
    let mut out = Vec::new();
    for p in paths(backend).into_iter().chain(paths6(backend6)) {
        let r = run(&mut vm, &p)?;
        out.push((p.name, r));
    }
    Ok(out)
}
