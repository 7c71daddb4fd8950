//! kpx's datapath cost per packet in the kernel, from BPF_PROG_TEST_RUN,
//! with N services of 10 endpoints in the maps.
//!
//! `repeat` re-runs the program on the *same* skb, so after one translation
//! the packet would no longer be addressed to the service. Established and
//! reply packets are therefore measured with a ping-pong pair of conntrack
//! entries (A rewrites to B's tuple, B rewrites back to A's): every
//! iteration is a real conntrack hit with a rewrite and checksum update.
//! A first packet cannot repeat at all, so it is the median of single runs,
//! each a fresh flow, next to the empty program's single-run median (the
//! harness's own overhead in that method).

use aya::programs::{tc::SchedClassifier, TestRun, TestRunOptions, Xdp};
use kpx::dataplane::maps::{CtTable, Datapath};
use proxy_common::{
    addr_bit, port_bit, wire, Address, CtValue, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_REWRITE_DST,
    CT_F_REWRITE_SRC, IPPROTO_TCP, PORT_F_BACKEND, PORT_F_FRONTEND, SCHED_LC, SCHED_MH,
    SCHED_RANDOM, SCHED_RR, SVC_SCHED_MASK, SVC_SCHED_SHIFT,
};
use serde::{Deserialize, Serialize};

use crate::support::{
    ct_key, edit_frontend, install_service, ip,
    v6::{ct_key6, ip6, Pkt6},
    Pkt, ACK, SYN, TC_ACT_REDIRECT, UDP,
};

const CLIENT: &str = "198.18.0.2";
const BACKEND: &str = "198.18.200.1";
const CLIENT6: &str = "2001:2::2";
const BACKEND6: &str = "2001:2:0:200::1";
const ENDPOINTS: u32 = 10;

/// Nanoseconds per packet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PacketCost {
    pub services: u32,
    /// The empty tc program, `repeat` mean: the floor.
    pub floor_ns: f64,
    /// TCP to no service, on a port a frontend uses (passed untouched).
    pub no_service_ns: f64,
    /// TCP to no service, on a port no frontend uses.
    #[serde(default)]
    pub no_frontend_port_ns: f64,
    /// To no service, at a frontend's address on a frontend's port (UDP to
    /// the last service's TCP port): both filters let it through, conntrack
    /// and the services are asked (as for an address whose filter bit
    /// another one set). Before the address filter, `no_service_ns` was
    /// this path.
    #[serde(default)]
    pub frontend_addr_ns: f64,
    /// TCP from a backend's port to a client that reached the backend
    /// directly (a pod's, a socket-balanced flow's): no flow's reply, which
    /// the reply filter tells (before it, a conntrack miss).
    #[serde(default)]
    pub from_backend_ns: f64,
    /// tc egress on a forwarded pod packet, IPv4 and IPv6 (`repeat`).
    #[serde(default)]
    pub egress_forwarded_ns: Option<(f64, f64)>,
    /// The established table's lookup of the established frame's tuple
    /// and nothing else (`kpx_tc_floor_ct`), IPv4 (a 12-byte key) and IPv6
    /// (36 bytes), `repeat`, taken in turn with the figures above: the
    /// kernel's share of an established packet, which no program can save.
    #[serde(default)]
    pub ct_lookup_ns: Option<(f64, f64)>,
    pub established_ns: f64,
    pub reply_ns: f64,
    /// First packet of a flow (service lookup, selection, two conntrack
    /// inserts), single-run median.
    pub first_packet_ns: f64,
    /// The empty program, single-run median.
    pub floor_single_ns: f64,
    /// An established packet redirected to its next hop, as on a real node
    /// (the FIB answers; after the flow's first packets the next hop comes
    /// from its entry). `repeat` in batches of 200 with TTL 255, so the TTL
    /// it decrements never runs out. (Before `reply_fib_ns` existed: a
    /// single-run median with the FIB asked every time.)
    #[serde(default)]
    pub established_fib_ns: f64,
    /// The same for a reply.
    #[serde(default)]
    pub reply_fib_ns: f64,
    /// A first packet redirected to its next hop (FIB answering),
    /// single-run median; `first_packet_ns` has the FIB without a route.
    #[serde(default)]
    pub first_packet_fib_ns: f64,
    /// First packets under each scheduler (random; rr; mh, as sh and dh;
    /// lc, as wlc, sed, nq and twos), single-run medians, FIB redirecting,
    /// one service each, taken in turn.
    #[serde(default)]
    pub first_packet_by_scheduler: Vec<(String, f64)>,
    /// Building the Maglev table of a service of 1,000 backends (131,071
    /// slots), median of 20, milliseconds.
    #[serde(default)]
    pub maglev_1000_ms: f64,
    /// The XDP program on the same packets, arriving on the interface the
    /// FIB sends them back out of (a NodePort's backend or client on
    /// another node): `XDP_TX`.
    #[serde(default)]
    pub xdp: Option<XdpCost>,
    /// The same paths for IPv6 (issue 20), on the same datapath with as
    /// many IPv6 services.
    #[serde(default)]
    pub ipv6: Option<Ipv6Cost>,
    pub programmed_seconds: f64,
}

/// IPv6's figures: the fields of [`PacketCost`] of the same names, for an
/// IPv6 packet (the floor is the same empty program's).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ipv6Cost {
    pub no_service_ns: f64,
    pub no_frontend_port_ns: f64,
    #[serde(default)]
    pub frontend_addr_ns: f64,
    #[serde(default)]
    pub from_backend_ns: f64,
    pub established_ns: f64,
    pub reply_ns: f64,
    pub first_packet_ns: f64,
    pub established_fib_ns: f64,
    pub reply_fib_ns: f64,
    pub first_packet_fib_ns: f64,
    /// The empty program's single-run median on IPv6's first packets.
    pub floor_single_ns: f64,
}

/// Nanoseconds per packet of the XDP program (the FIB answering, the
/// packet arriving on the interface of its next hop).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct XdpCost {
    /// The empty XDP program: `repeat` / single-run medians.
    pub floor_ns: f64,
    pub floor_single_ns: f64,
    /// TCP to no service on a frontend's port: passed to tc untouched.
    pub no_service_ns: f64,
    /// An established packet and a reply, translated and sent back out
    /// (`XDP_TX`), `repeat` in batches of 200 (TTL 255).
    pub established_ns: f64,
    pub reply_ns: f64,
    /// A first packet, balanced, translated and sent back out; or, where
    /// the kernel lets XDP mark no frame (`first_to_tc`), passed untouched
    /// to tc, which sets every flow up there.
    pub first_packet_ns: f64,
    #[serde(default)]
    pub first_to_tc: bool,
    /// The same three for IPv6 (0: not measured, an older report).
    #[serde(default)]
    pub established6_ns: f64,
    #[serde(default)]
    pub reply6_ns: f64,
    #[serde(default)]
    pub first_packet6_ns: f64,
}

/// Routes and a neighbour in the (empty) measuring namespace so that the
/// FIB lookup of a translated packet succeeds: the backends' and clients'
/// subnets on an interface, forwarding on.
pub fn fib_routes(ns: &testbed::Netns) -> anyhow::Result<()> {
    // A veth pair inside the namespace (this kernel has no dummy device).
    ns.ip(&[
        "link", "add", "kpxfib", "type", "veth", "peer", "name", "kpxfib1",
    ])?;
    ns.ip(&["link", "set", "kpxfib1", "up"])?;
    ns.ip(&["link", "set", "kpxfib", "up"])?;
    for net in ["198.18.200.254/24", "198.18.0.254/24"] {
        ns.ip(&["addr", "add", net, "dev", "kpxfib"])?;
    }
    for net in ["2001:2:0:200::fe/64", "2001:2::fe/64"] {
        ns.ip(&["-6", "addr", "add", net, "dev", "kpxfib", "nodad"])?;
    }
    for (addr, mac) in [
        (BACKEND6, "02:00:00:00:00:01"),
        (CLIENT6, "02:00:00:00:00:02"),
    ] {
        ns.ip(&[
            "-6",
            "neigh",
            "add",
            addr,
            "lladdr",
            mac,
            "dev",
            "kpxfib",
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&[
        "-6",
        "route",
        "add",
        "2001:2::/48",
        "via",
        BACKEND6,
        "dev",
        "kpxfib",
    ])?;
    ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
    for (addr, mac) in [
        (BACKEND, "02:00:00:00:00:01"),
        (CLIENT, "02:00:00:00:00:02"),
    ] {
        ns.ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            mac,
            "dev",
            "kpxfib",
            "nud",
            "permanent",
        ])?;
    }
    // Every address of the test range (VIPs, backends, clients) through
    // that neighbour: the range only, no default route.
    ns.ip(&[
        "route",
        "add",
        "198.18.0.0/15",
        "via",
        BACKEND,
        "dev",
        "kpxfib",
    ])?;
    ns.sysctl("net/ipv4/ip_forward", "1")
}

/// The datapath as it is measured: IPv6's tables at their full size, as
/// IPv4's (the same conditions), and the reply filter as an agent keeps it
/// once its programs are attached (full until then): rebuilt twice from
/// the tables, empty here; and tc egress noted on loopback, where
/// `test_run` runs packets, as on an interface a flow came in on before.
fn measured_datapath() -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load(&kpx::dataplane::maps::LoadOptions {
        ipv6: true,
        ..Default::default()
    })?;
    rebuild_replies(&dp)?;
    rebuild_replies(&dp)?;
    kpx::dataplane::egress::mark(&mut dp.maps, 1, true)?;
    Ok(dp)
}

/// `routes` is called after the `repeat` figures (whose FIB lookups must
/// fail, or the ping-pong packet's TTL would run out) and before the FIB
/// figure: it makes the namespace's FIB answer (see [`fib_routes`]).
pub fn measure(
    n: u32,
    quick: bool,
    routes: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<PacketCost> {
    let (repeat, singles) = if quick {
        (20_000, 2_000)
    } else {
        (200_000, 20_000)
    };
    let mut dp = measured_datapath()?;
    let t = std::time::Instant::now();
    let last_vip = install(&mut dp, n);
    let programmed = t.elapsed().as_secs_f64();
    let last_vip6 = install6(&mut dp, n);
    let egress = egress_forwarded(&mut dp, repeat)?;
    // Every repeated path of both families, and the empty program, in one
    // call whose batches take turns: IPv6's figures and their IPv4
    // counterparts (and the floor both are above) see the same stretch
    // of the machine, so their ratio does not carry the drift between
    // two blocks measured seconds apart.
    open_ping_pong(&mut dp, &last_vip)?;
    let [est6, rep6] = ping_pong6(&mut dp, &last_vip6)?;
    let (v4, v6) = ("198.18.3.3", "2001:2:0:33::3");
    let ingress = |frame| (Prog::Ingress, frame);
    let frames = [
        (Prog::Floor, Pkt::new(CLIENT, 40000, v4, 80, ACK).build()),
        ingress(Pkt::new(CLIENT, 40000, v4, 80, ACK).build()),
        ingress(Pkt::new(CLIENT, 40000, v4, 9000, ACK).build()),
        ingress(Pkt::new(BACKEND, 8080, CLIENT, 41000, ACK).build()),
        // UDP to a TCP frontend's address and port: no service.
        ingress(Pkt::new(CLIENT, 40000, &last_vip, 80, UDP).build()),
        ingress(Pkt::new(CLIENT, 45000, &last_vip, 80, ACK).build()),
        ingress(Pkt::new(BACKEND, 8080, CLIENT, 45000, ACK).build()),
        ingress(Pkt6::new(CLIENT6, 40000, v6, 80, ACK).build()),
        ingress(Pkt6::new(CLIENT6, 40000, v6, 9000, ACK).build()),
        ingress(Pkt6::new(BACKEND6, 8080, CLIENT6, 41000, ACK).build()),
        ingress(Pkt6::new(CLIENT6, 40000, &last_vip6, 80, UDP).build()),
        ingress(est6.clone()),
        ingress(rep6),
        // The established table's lookup alone, for each family's
        // established frame (the kernel's share; see `ct_lookup_ns`).
        (
            Prog::FloorCt,
            Pkt::new(CLIENT, 45000, &last_vip, 80, ACK).build(),
        ),
        (Prog::FloorCt, est6),
    ];
    for (prog, frame) in &frames[frames.len() - 2..] {
        let hit = run_prog(&mut dp, *prog, frame, 1)?.return_value;
        anyhow::ensure!(hit == 0, "the lookup-alone program missed its flow ({hit})");
    }
    let ns = in_turns(&mut dp, &frames, repeat)?;
    let [floor, no_service, no_frontend_port, from_backend, frontend_addr, established, reply, ..] =
        ns;
    let [.., no_service6, no_frontend_port6, from_backend6, frontend_addr6, established6, reply6, _, _] =
        ns;
    let [.., ct_lookup, ct_lookup6] = ns;
    let firsts = first_packets(&mut dp, (&last_vip, &last_vip6), singles, (100, 0x100))?;
    routes()?;
    // Fresh entries: the unrouted phase cached "the stack" in them.
    open_ping_pong(&mut dp, &last_vip)?;
    let [est6, rep6] = ping_pong6(&mut dp, &last_vip6)?;
    let [est, rep] = ping_pong_frames(&last_vip);
    let [established_fib, reply_fib, established6_fib, reply6_fib] =
        redirected_ns(dp.ingress()?, &[est, rep, est6, rep6], repeat)?;
    let firsts_fib = first_packets(&mut dp, (&last_vip, &last_vip6), singles, (110, 0x110))?;
    let v6 = Ipv6Cost {
        no_service_ns: no_service6,
        no_frontend_port_ns: no_frontend_port6,
        frontend_addr_ns: frontend_addr6,
        from_backend_ns: from_backend6,
        established_ns: established6,
        reply_ns: reply6,
        first_packet_ns: firsts.v6,
        established_fib_ns: established6_fib,
        reply_fib_ns: reply6_fib,
        first_packet_fib_ns: firsts_fib.v6,
        floor_single_ns: firsts.floor6,
    };
    let (first, floor_single, first_fib) = (firsts.v4, firsts.floor4, firsts_fib.v4);
    let xdp = xdp_costs(&mut dp, &last_vip, &last_vip6, repeat, singles)?;
    // Schedulers last, so the figures above are taken as they always were:
    // four more services, one per scheduler, their first packets taken in
    // turn so that each sees the same machine and the same table.
    let by_scheduler = scheduler_runs(&mut dp, n, singles)?;
    Ok(PacketCost {
        services: n,
        floor_ns: floor,
        no_service_ns: no_service,
        no_frontend_port_ns: no_frontend_port,
        frontend_addr_ns: frontend_addr,
        from_backend_ns: from_backend,
        egress_forwarded_ns: Some(egress),
        ct_lookup_ns: Some((ct_lookup, ct_lookup6)),
        established_ns: established,
        reply_ns: reply,
        first_packet_ns: first,
        floor_single_ns: floor_single,
        established_fib_ns: established_fib,
        reply_fib_ns: reply_fib,
        first_packet_fib_ns: first_fib,
        first_packet_by_scheduler: by_scheduler,
        maglev_1000_ms: maglev_build_ms(1_000),
        xdp: Some(xdp),
        ipv6: Some(v6),
        programmed_seconds: programmed,
    })
}

/// The median time of 20 builds of a Maglev table for `n` backends.
fn maglev_build_ms(n: u32) -> f64 {
    use kpx::dataplane::reconcile::{maglev, BackendAddr};
    let backends: Vec<(BackendAddr, u32)> = (0..n)
        .map(|i| {
            let addr = std::net::Ipv4Addr::from(0xc612_0000 + i);
            let b = BackendAddr {
                addr: addr.into(),
                port: 8080,
                proto: IPPROTO_TCP,
                local: false,
            };
            (b, i)
        })
        .collect();
    let mut ns: Vec<u128> = (0..20)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(maglev::table(&backends));
            t.elapsed().as_nanos()
        })
        .collect();
    ns.sort_unstable();
    ns[ns.len() / 2] as f64 / 1e6
}

/// Single-run medians of first packets to one service per scheduler
/// (ids `n..`, VIPs 198.19.255.x, 10 backends each), the schedulers in turn.
fn scheduler_runs(dp: &mut Datapath, n: u32, runs: u32) -> anyhow::Result<Vec<(String, f64)>> {
    let schedulers = [
        ("random", SCHED_RANDOM),
        ("rr", SCHED_RR),
        ("mh", SCHED_MH),
        ("lc", SCHED_LC),
    ];
    let mut vips = Vec::new();
    for (k, (_, sched)) in schedulers.iter().enumerate() {
        let s = n + k as u32;
        let vip = format!("198.19.255.{}", k + 1);
        let backends: Vec<(u32, String)> = (0..ENDPOINTS)
            .map(|e| {
                (
                    s * ENDPOINTS + e,
                    format!("198.18.250.{}", 10 * k as u32 + e + 1),
                )
            })
            .collect();
        let list: Vec<(u32, &str, u16)> = backends
            .iter()
            .map(|(id, a)| (*id, a.as_str(), 8080))
            .collect();
        install_service(dp, s, &vip, 80, IPPROTO_TCP, &list);
        schedule(dp, &vip, *sched);
        // Least connections reads counters that exist, as on a busy node.
        for (id, _) in &backends {
            dp.maps.conns.insert(*id, u64::from(id % 4), 0)?;
        }
        vips.push(vip);
    }
    let mut ns: Vec<Vec<u128>> = vec![Vec::with_capacity(runs as usize); schedulers.len()];
    for i in 0..runs {
        let src = format!("198.18.{}.{}", 200 + i / 65536, i % 65536 / 256);
        let sport = 1024 + (i % 256) as u16;
        // Each round starts with the next scheduler: the first run of a
        // round is dearer (measured: ~25%), and every one takes that place
        // as often.
        for j in 0..vips.len() {
            let k = (i as usize + j) % vips.len();
            let syn = Pkt::new(&src, sport, &vips[k], 80, SYN).build();
            ns[k].push(test_run(dp.ingress()?, &syn, 1)?.duration.as_nanos());
        }
    }
    Ok(schedulers
        .iter()
        .zip(ns)
        .map(|((name, _), v)| (name.to_string(), median(v)))
        .collect())
}

/// Sets the scheduler of `vip:80/tcp`.
fn schedule(dp: &mut Datapath, vip: &str, sched: u32) {
    edit_frontend(dp, (vip, 80, IPPROTO_TCP), |v| {
        v.flags = (v.flags & !SVC_SCHED_MASK) | (sched << SVC_SCHED_SHIFT);
    });
}

/// `n` TCP services on port 80, 10 endpoints each; returns the last VIP.
fn install(dp: &mut Datapath, n: u32) -> String {
    let mut vip = String::new();
    for s in 0..n {
        vip = format!("198.19.{}.{}", s / 256, s % 256);
        let addrs: Vec<(u32, String)> = (0..ENDPOINTS)
            .map(|e| {
                let id = s * ENDPOINTS + e;
                (
                    id,
                    format!("198.18.{}.{}", 16 + id / 65536 % 64, id % 65536 / 256),
                )
            })
            .collect();
        let backends: Vec<(u32, &str, u16)> = addrs
            .iter()
            .map(|(id, a)| (*id, a.as_str(), 8080))
            .collect();
        install_service(dp, s, &vip, 80, IPPROTO_TCP, &backends);
    }
    vip
}

fn test_run(
    prog: &mut SchedClassifier,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    test_run_ctx(prog, frame, None, repeat)
}

/// [`test_run`] with a `struct __sk_buff` for the context.
fn test_run_ctx(
    prog: &mut SchedClassifier,
    frame: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    let mut out = vec![0u8; frame.len() + 256];
    Ok(prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx,
        repeat,
        ..Default::default()
    })?)
}

/// Which of the measured object's tc programs a frame goes through.
#[derive(Clone, Copy)]
enum Prog {
    /// The empty program: the floor the figures are above.
    Floor,
    /// The established table's lookup alone (`kpx_tc_floor_ct`).
    FloorCt,
    Ingress,
    /// tc egress, on a packet the node forwards (its `ingress_ifindex`
    /// set).
    EgressForwarded,
}

/// A `struct __sk_buff` up to its `ifindex`, `ingress_ifindex` (byte 36)
/// set, all else zero as `BPF_PROG_TEST_RUN` requires: a packet received
/// on an interface.
fn forwarded_ctx() -> [u8; 44] {
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&3u32.to_ne_bytes());
    ctx
}

/// The medians over 25 batches of the kernel's mean per repetition (a
/// few batches that meet an interrupt or the other vCPU's noise move
/// nothing), for several frames at once, their batches in turns (one of
/// each frame's, then the next round): every median is taken over the
/// same stretch of time, so figures compared with each other (a family's
/// with the other's, each with the floor) share the machine's drift
/// rather than each meeting its own.
fn in_turns<const N: usize>(
    dp: &mut Datapath,
    frames: &[(Prog, Vec<u8>); N],
    repeat: u32,
) -> anyhow::Result<[f64; N]> {
    const BATCHES: u32 = 25;
    let each = (repeat / BATCHES).max(1);
    let mut ns: [Vec<u128>; N] = std::array::from_fn(|_| Vec::with_capacity(BATCHES as usize));
    for _ in 0..BATCHES {
        for ((prog, frame), ns) in frames.iter().zip(ns.iter_mut()) {
            ns.push(run_prog(dp, *prog, frame, each)?.duration.as_nanos());
        }
    }
    Ok(ns.map(median))
}

/// `frame` through `prog`, `repeat` times.
fn run_prog(
    dp: &mut Datapath,
    prog: Prog,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    let forwarded = forwarded_ctx();
    let (prog, ctx) = match prog {
        Prog::Floor => (dp.floor()?, None),
        Prog::FloorCt => (dp.floor_ct()?, None),
        Prog::Ingress => (dp.ingress()?, None),
        Prog::EgressForwarded => (dp.egress()?, Some(&forwarded[..])),
    };
    test_run_ctx(prog, frame, ctx, repeat)
}

/// tc egress on a pod's packet the node forwards (received on an
/// interface: the skb's `ingress_ifindex` set), IPv4 and IPv6, `repeat`
/// medians: what every packet between two pods pays on its way out.
fn egress_forwarded(dp: &mut Datapath, repeat: u32) -> anyhow::Result<(f64, f64)> {
    let [v4, v6] = in_turns(
        dp,
        &[
            (
                Prog::EgressForwarded,
                Pkt::new(CLIENT, 40000, "198.18.3.3", 80, ACK).build(),
            ),
            (
                Prog::EgressForwarded,
                Pkt6::new(CLIENT6, 40000, "2001:2:0:33::3", 80, ACK).build(),
            ),
        ],
        repeat,
    )?;
    Ok((v4, v6))
}

/// An entry of the ping-pong flow, either family: rewriting the source
/// or the destination (`flags`) to `a:port`.
fn entry_at<A: Address>(flags: u16, dir: u8, a: A, port: u16) -> CtValue<A> {
    let p = wire::port(port);
    CtValue {
        new_src_addr: if flags == CT_F_REWRITE_SRC {
            a
        } else {
            A::ZERO
        },
        new_dst_addr: if flags == CT_F_REWRITE_DST {
            a
        } else {
            A::ZERO
        },
        new_src_port: if flags == CT_F_REWRITE_SRC { p } else { 0 },
        new_dst_port: if flags == CT_F_REWRITE_DST { p } else { 0 },
        flags,
        dir,
        ..Default::default()
    }
}

fn entry(flags: u16, dir: u8, addr: &str, port: u16) -> CtValue {
    entry_at(flags, dir, wire::addr(ip(addr)), port)
}

/// The ping-pong flow's entries, written fresh (no next hop cached).
fn open_ping_pong(dp: &mut Datapath, vip: &str) -> anyhow::Result<()> {
    let backend = BACKEND;
    let (dst, src) = (CT_F_REWRITE_DST, CT_F_REWRITE_SRC);
    for (k, v) in [
        (
            ct_key(CLIENT, 45000, vip, 80, IPPROTO_TCP),
            entry(dst, CT_DIR_ORIGINAL, backend, 8080),
        ),
        (
            ct_key(CLIENT, 45000, backend, 8080, IPPROTO_TCP),
            entry(dst, CT_DIR_ORIGINAL, vip, 80),
        ),
        (
            ct_key(backend, 8080, CLIENT, 45000, IPPROTO_TCP),
            entry(src, CT_DIR_REPLY, vip, 80),
        ),
        (
            ct_key(vip, 80, CLIENT, 45000, IPPROTO_TCP),
            entry(src, CT_DIR_REPLY, backend, 8080),
        ),
    ] {
        // An established connection: where the datapath moves it at its
        // first reply.
        dp.maps.ct.insert(CtTable::Tcp, &k, &v)?;
    }
    // The repeated packet is translated back and forth, so each direction
    // also arrives as its own translation (to the backend's port 8080, from
    // the service's port 80): the port filter must send those to conntrack
    // too, as on a node where some frontend uses 8080 and some backend 80,
    // and the backend's address is some frontend's (the address filter).
    for bit in [
        port_bit(8080, PORT_F_FRONTEND),
        port_bit(80, PORT_F_BACKEND),
        addr_bit(wire::addr(ip(backend))),
    ] {
        dp.maps.mark_port(bit)?;
    }
    // The agent's next collection reads the entries' reply bits.
    rebuild_replies(dp)
}

/// One rebuild of the reply filter from the tables, as each of the agent's
/// collections does.
fn rebuild_replies(dp: &Datapath) -> anyhow::Result<()> {
    dp.maps
        .replies
        .rebuild(|| kpx::dataplane::conntrack::reply_bits(&dp.maps))
}

/// The paths `--hot` runs (as `--packet`'s columns: a tracked flow's
/// packet to the service and its backend's reply, FIB → stack; a pod's
/// packet to a pod on a frontend's port; a backend's answer to a client
/// that dialled it directly; each for IPv6 with a `6`; and `xdp-` the
/// tracked flow's packets through XDP, sent back out, `XDP_TX`).
pub const HOT_PATHS: [&str; 14] = [
    "established",
    "reply",
    "no-service",
    "from-backend",
    "frontend-addr",
    "established6",
    "reply6",
    "no-service6",
    "from-backend6",
    "frontend-addr6",
    "xdp-established",
    "xdp-reply",
    "xdp-established6",
    "xdp-reply6",
];

/// `--hot PATH`: one path's packet through tc ingress over and over for
/// `seconds`, as `--packet` sets it up (one service per family): the mean
/// ns per packet above the empty program, second by second, and their
/// median. Steadier than `--packet --quick`'s short batches for comparing
/// two builds, and a target for `perf record -a` beside it (the programs'
/// JIT'd bodies and the kernel helpers they call show as symbols).
pub fn hot(path: &str, seconds: f64, say: &dyn Fn(String)) -> anyhow::Result<f64> {
    let mut dp = measured_datapath()?;
    let vip = install(&mut dp, 1);
    let vip6 = install6(&mut dp, 1);
    if path.ends_with('6') {
        // IPv6's figures are taken with IPv4's ping-pong flow open, whose
        // port marks IPv6's relies on (as in `--packet`).
        open_ping_pong(&mut dp, &vip)?;
    }
    let frame = match path {
        "established" | "reply" => {
            open_ping_pong(&mut dp, &vip)?;
            if path == "reply" {
                Pkt::new(BACKEND, 8080, CLIENT, 45000, ACK).build()
            } else {
                Pkt::new(CLIENT, 45000, &vip, 80, ACK).build()
            }
        }
        "no-service" => Pkt::new(CLIENT, 40000, "198.18.3.3", 80, ACK).build(),
        "from-backend" => Pkt::new(BACKEND, 8080, CLIENT, 41000, ACK).build(),
        // UDP to a TCP frontend's address and port: no service.
        "frontend-addr" => Pkt::new(CLIENT, 40000, &vip, 80, UDP).build(),
        "frontend-addr6" => Pkt6::new(CLIENT6, 40000, &vip6, 80, UDP).build(),
        "established6" | "reply6" => {
            let [est, rep] = ping_pong6(&mut dp, &vip6)?;
            if path == "reply6" {
                rep
            } else {
                est
            }
        }
        "no-service6" => Pkt6::new(CLIENT6, 40000, "2001:2:0:33::3", 80, ACK).build(),
        "from-backend6" => Pkt6::new(BACKEND6, 8080, CLIENT6, 41000, ACK).build(),
        "xdp-established" | "xdp-reply" | "xdp-established6" | "xdp-reply6" => {
            let [est, rep] = if path.ends_with('6') {
                ping_pong6(&mut dp, &vip6)?
            } else {
                open_ping_pong(&mut dp, &vip)?;
                ping_pong_frames(&vip)
            };
            let frame = if path.starts_with("xdp-reply") {
                rep
            } else {
                est
            };
            return hot_xdp(&mut dp, path, frame, seconds, say);
        }
        other => {
            anyhow::bail!("--hot: no path {other:?} (known: {})", HOT_PATHS.join(", "))
        }
    };
    second_by_second(path, seconds, say, &mut |floor| {
        let prog = if floor { dp.floor()? } else { dp.ingress()? };
        Ok(test_run(prog, &frame, HOT_REPEAT)?.duration.as_nanos())
    })
}

/// `--hot`'s runs: about 50 ms each, so a second holds enough of them for
/// a median.
const HOT_REPEAT: u32 = 500_000;

/// `--hot`'s loop: `run(false)` (ns of [`HOT_REPEAT`] runs of the path)
/// over and over for `seconds`, each second's median less one
/// `run(true)` (the empty program's) said, and the median of those
/// returned.
fn second_by_second(
    path: &str,
    seconds: f64,
    say: &dyn Fn(String),
    run: &mut dyn FnMut(bool) -> anyhow::Result<u128>,
) -> anyhow::Result<f64> {
    let mut per_second = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let second = std::time::Instant::now();
        let mut ns = Vec::new();
        while second.elapsed().as_secs_f64() < 1.0 {
            ns.push(run(false)?);
        }
        let floor = run(true)?;
        let above = median(ns) - floor as f64;
        say(format!(
            "{path}: {above:.1} ns above the empty program ({floor} ns)"
        ));
        per_second.push((above * 10.0) as u128);
    }
    Ok(median(per_second) / 10.0)
}

/// [`hot`] through XDP: `frame` over and over, each run checked to be sent
/// back out (the caller's namespace has [`fib_routes`]), against the empty
/// XDP program.
fn hot_xdp(
    dp: &mut Datapath,
    path: &str,
    frame: Vec<u8>,
    seconds: f64,
    say: &dyn Fn(String),
) -> anyhow::Result<f64> {
    const XDP_TX: u32 = 3;
    let ifindex = nix::net::if_::if_nametoindex("kpxfib")?;
    let r = xdp_run(dp.xdp()?, &frame, ifindex, 1)?;
    anyhow::ensure!(
        r.return_value == XDP_TX,
        "{path}: XDP did not send the packet back out (verdict {})",
        r.return_value
    );
    second_by_second(path, seconds, say, &mut |floor| {
        let prog = if floor { dp.xdp_floor()? } else { dp.xdp()? };
        Ok(xdp_run(prog, &frame, ifindex, HOT_REPEAT)?
            .duration
            .as_nanos())
    })
}

/// First packets' single-run medians, both families' in turns (fresh
/// flows from clients 198.18.`base.0`.0 and 2001:2:0:`base.1`::/64 on),
/// and the empty program's on each family's.
struct FirstPackets {
    v4: f64,
    floor4: f64,
    v6: f64,
    floor6: f64,
}

fn first_packets(
    dp: &mut Datapath,
    (vip, vip6): (&str, &str),
    runs: u32,
    base: (u32, u32),
) -> anyhow::Result<FirstPackets> {
    let mut ns: [Vec<u128>; 4] = std::array::from_fn(|_| Vec::with_capacity(runs as usize));
    for i in 0..runs {
        let sport = 1024 + (i % 256) as u16;
        let src = format!("198.18.{}.{}", base.0 + i / 65536, i % 65536 / 256);
        let syn = Pkt::new(&src, sport, vip, 80, SYN).build();
        let src6 = format!("2001:2:0:{:x}::{:x}", base.1, i / 256 + 1);
        let syn6 = Pkt6::new(&src6, sport, vip6, 80, SYN).build();
        ns[0].push(test_run(dp.ingress()?, &syn, 1)?.duration.as_nanos());
        ns[1].push(test_run(dp.floor()?, &syn, 1)?.duration.as_nanos());
        ns[2].push(test_run(dp.ingress()?, &syn6, 1)?.duration.as_nanos());
        ns[3].push(test_run(dp.floor()?, &syn6, 1)?.duration.as_nanos());
    }
    let [v4, floor4, v6, floor6] = ns.map(median);
    Ok(FirstPackets {
        v4,
        floor4,
        v6,
        floor6,
    })
}

/// The ping-pong pairs' `frames` (established, reply; of either family),
/// each checked redirected once (the first repetition caches its entry's
/// next hop), then their medians of batches of 200 repetitions, the
/// frames' batches in turns (as [`in_turns`]).
fn redirected_ns<const N: usize>(
    prog: &mut SchedClassifier,
    frames: &[Vec<u8>; N],
    repeat: u32,
) -> anyhow::Result<[f64; N]> {
    for frame in frames {
        let r = test_run(prog, frame, 1)?;
        anyhow::ensure!(
            r.return_value == TC_ACT_REDIRECT,
            "the established packet was not redirected by the FIB (verdict {})",
            r.return_value as i32
        );
    }
    let batches = (repeat / 200).max(25);
    let mut ns: [Vec<u128>; N] = std::array::from_fn(|_| Vec::with_capacity(batches as usize));
    for _ in 0..batches {
        for (frame, ns) in frames.iter().zip(ns.iter_mut()) {
            ns.push(test_run(prog, frame, 200)?.duration.as_nanos());
        }
    }
    Ok(ns.map(median))
}

/// One XDP test run of `frame` arriving on `ifindex`, `repeat` times (the
/// kernel's duration is the mean of one).
fn xdp_run(
    prog: &mut Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    let ctx = testbed::xdp::xdp_md(frame.len(), ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    Ok(prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    })?)
}

/// The XDP program's figures, once the namespace's FIB answers: packets
/// arrive on the interface the routes lead out of, so a translated one is
/// bounced back out (`XDP_TX`), as a NodePort's packets to a backend on
/// another node are. The ping-pong flow of [`ping_pong`] for established
/// packets and replies, fresh flows for first packets.
fn xdp_costs(
    dp: &mut Datapath,
    vip: &str,
    vip6: &str,
    repeat: u32,
    singles: u32,
) -> anyhow::Result<XdpCost> {
    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;
    let ifindex = nix::net::if_::if_nametoindex("kpxfib")?;
    let batches = (repeat / 200).max(25);
    let batched = |prog: &mut Xdp, frame: &[u8]| -> anyhow::Result<f64> {
        let mut ns = Vec::with_capacity(batches as usize);
        for _ in 0..batches {
            ns.push(xdp_run(prog, frame, ifindex, 200)?.duration.as_nanos());
        }
        Ok(median(ns))
    };
    let tcp = Pkt::new(CLIENT, 40000, "198.18.3.3", 80, ACK).build();
    let floor = batched(dp.xdp_floor()?, &tcp)?;
    let r = xdp_run(dp.xdp()?, &tcp, ifindex, 1)?;
    anyhow::ensure!(
        r.return_value == XDP_PASS,
        "XDP did not pass a packet to no service"
    );
    let no_service = batched(dp.xdp()?, &tcp)?;
    // An established packet and a reply, each checked to be sent back out.
    let bounced = |dp: &mut Datapath, frames: [Vec<u8>; 2]| -> anyhow::Result<[f64; 2]> {
        let mut ns = [0.0; 2];
        for (i, frame) in frames.into_iter().enumerate() {
            let r = xdp_run(dp.xdp()?, &frame, ifindex, 1)?;
            anyhow::ensure!(
                r.return_value == XDP_TX,
                "XDP did not send an established packet back out (verdict {})",
                r.return_value
            );
            ns[i] = batched(dp.xdp()?, &frame)?;
        }
        Ok(ns)
    };
    let flows = bounced(dp, ping_pong_frames(vip))?;
    let frames6 = ping_pong6(dp, vip6)?;
    let flows6 = bounced(dp, frames6)?;
    // Without XDP metadata, a first packet is tc's: XDP passes it on.
    let first_to_tc = !dp.xdp_marks();
    let first_verdict = if first_to_tc { XDP_PASS } else { XDP_TX };
    let mut first = Vec::with_capacity(singles as usize);
    let mut first6 = Vec::with_capacity(singles as usize);
    let mut floor_single = Vec::with_capacity(singles as usize);
    for i in 0..singles {
        let src = format!("198.18.{}.{}", 120 + i / 65536, i % 65536 / 256);
        let sport = 1024 + (i % 256) as u16;
        let syn = Pkt::new(&src, sport, vip, 80, SYN).build();
        let r = xdp_run(dp.xdp()?, &syn, ifindex, 1)?;
        anyhow::ensure!(
            r.return_value == first_verdict,
            "XDP gave a first packet verdict {} (not {first_verdict})",
            r.return_value
        );
        first.push(r.duration.as_nanos());
        floor_single.push(
            xdp_run(dp.xdp_floor()?, &syn, ifindex, 1)?
                .duration
                .as_nanos(),
        );
        let src6 = format!("2001:2:0:120::{:x}", i / 256 + 1);
        let syn6 = Pkt6::new(&src6, sport, vip6, 80, SYN).build();
        let r = xdp_run(dp.xdp()?, &syn6, ifindex, 1)?;
        anyhow::ensure!(
            r.return_value == first_verdict,
            "XDP gave an IPv6 first packet verdict {} (not {first_verdict})",
            r.return_value
        );
        first6.push(r.duration.as_nanos());
    }
    Ok(XdpCost {
        floor_ns: floor,
        floor_single_ns: median(floor_single),
        no_service_ns: no_service,
        established_ns: flows[0],
        reply_ns: flows[1],
        first_packet_ns: median(first),
        first_to_tc,
        established6_ns: flows6[0],
        reply6_ns: flows6[1],
        first_packet6_ns: median(first6),
    })
}

/// The ping-pong flow's established packet and reply (see [`ping_pong`]),
/// TTL 255: a forwarded packet's decrement runs out only after 254
/// repetitions.
fn ping_pong_frames(vip: &str) -> [Vec<u8>; 2] {
    [
        Pkt::new(CLIENT, 45000, vip, 80, ACK),
        Pkt::new(BACKEND, 8080, CLIENT, 45000, ACK),
    ]
    .map(|mut p| {
        p.ttl = 255;
        p.build()
    })
}

/// `n` IPv6 TCP services on port 80, 10 endpoints each (service ids after
/// IPv4's); returns the last VIP.
fn install6(dp: &mut Datapath, n: u32) -> String {
    let mut vip = String::new();
    for s in 0..n {
        vip = format!("2001:2:0:ff::{:x}", s);
        let addrs: Vec<(u32, String)> = (0..ENDPOINTS)
            .map(|e| {
                let id = (n + s) * ENDPOINTS + e;
                // Two groups: ids pass 0xffff from 6,554 services on.
                (id, format!("2001:2:0:10::{:x}:{:x}", id >> 16, id & 0xffff))
            })
            .collect();
        let backends: Vec<(u32, &str, u16)> = addrs
            .iter()
            .map(|(id, a)| (*id, a.as_str(), 8080))
            .collect();
        install_service(dp, n + s, &vip, 80, IPPROTO_TCP, &backends);
    }
    vip
}

/// IPv6's ping-pong flow (see [`ping_pong`]), and its two packets with hop
/// limit 255.
fn ping_pong6(dp: &mut Datapath, vip: &str) -> anyhow::Result<[Vec<u8>; 2]> {
    let (dst, src) = (CT_F_REWRITE_DST, CT_F_REWRITE_SRC);
    let entry6 = |flags, dir, addr: &str, port| entry_at(flags, dir, wire::addr6(ip6(addr)), port);
    for (k, v) in [
        (
            ct_key6(CLIENT6, 45000, vip, 80, IPPROTO_TCP),
            entry6(dst, CT_DIR_ORIGINAL, BACKEND6, 8080),
        ),
        (
            ct_key6(CLIENT6, 45000, BACKEND6, 8080, IPPROTO_TCP),
            entry6(dst, CT_DIR_ORIGINAL, vip, 80),
        ),
        (
            ct_key6(BACKEND6, 8080, CLIENT6, 45000, IPPROTO_TCP),
            entry6(src, CT_DIR_REPLY, vip, 80),
        ),
        (
            ct_key6(vip, 80, CLIENT6, 45000, IPPROTO_TCP),
            entry6(src, CT_DIR_REPLY, BACKEND6, 8080),
        ),
    ] {
        dp.maps.v6.ct.insert(CtTable::Tcp, &k, &v)?;
    }
    // (Ports 8080 and 80 are marked both ways by IPv4's ping-pong flow.)
    dp.maps.mark_port(addr_bit(wire::addr6(ip6(BACKEND6))))?;
    rebuild_replies(dp)?;
    Ok([
        Pkt6::new(CLIENT6, 45000, vip, 80, ACK),
        Pkt6::new(BACKEND6, 8080, CLIENT6, 45000, ACK),
    ]
    .map(|mut p| {
        p.hop_limit = 255;
        p.build()
    }))
}

fn median(mut v: Vec<u128>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default() as f64
}
