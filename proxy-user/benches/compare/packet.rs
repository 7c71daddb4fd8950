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

use aya::programs::{tc::SchedClassifier, TestRun, TestRunOptions};
use kpx::datapath::Datapath;
use proxy_common::{
    wire, CtKey, CtValue, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_REWRITE_DST, CT_F_REWRITE_SRC,
    IPPROTO_TCP,
};
use serde::{Deserialize, Serialize};

use crate::support::{install_service, ip, Pkt, ACK, SYN, TC_ACT_REDIRECT};

const CLIENT: &str = "198.18.0.2";
const BACKEND: &str = "198.18.200.1";
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
    pub established_ns: f64,
    pub reply_ns: f64,
    /// First packet of a flow (service lookup, selection, two conntrack
    /// inserts), single-run median.
    pub first_packet_ns: f64,
    /// The empty program, single-run median.
    pub floor_single_ns: f64,
    /// An established packet redirected to its next hop, as on a real node
    /// (the FIB answers; after the flow's first packets the next hop comes
    /// from its entry), single-run median: `repeat` cannot measure it, the
    /// TTL it decrements would run out.
    #[serde(default)]
    pub established_fib_ns: f64,
    pub programmed_seconds: f64,
}

/// Routes and a neighbour in the (empty) measuring namespace so that the
/// FIB lookup of a translated packet succeeds: the backends' and clients'
/// subnets on an interface, forwarding on.
pub fn fib_routes(ns: &kpx::testbed::Netns) -> anyhow::Result<()> {
    // A veth pair inside the namespace (this kernel has no dummy device).
    ns.ip(&[
        "link", "add", "kpxfib", "type", "veth", "peer", "name", "kpxfib1",
    ])?;
    ns.ip(&["link", "set", "kpxfib1", "up"])?;
    ns.ip(&["link", "set", "kpxfib", "up"])?;
    for net in ["198.18.200.254/24", "198.18.0.254/24"] {
        ns.ip(&["addr", "add", net, "dev", "kpxfib"])?;
    }
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
    ns.sysctl("net/ipv4/ip_forward", "1")
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
    let mut dp = Datapath::load(&Default::default())?;
    let t = std::time::Instant::now();
    let last_vip = install(&mut dp, n);
    let programmed = t.elapsed().as_secs_f64();
    let tcp = Pkt::new(CLIENT, 40000, "198.18.3.3", 80, ACK).build();
    let floor = repeat_ns(dp.floor()?, &tcp, repeat)?;
    let no_service = repeat_ns(dp.ingress()?, &tcp, repeat)?;
    let unused = Pkt::new(CLIENT, 40000, "198.18.3.3", 9000, ACK).build();
    let no_frontend_port = repeat_ns(dp.ingress()?, &unused, repeat)?;
    let (established, reply) = ping_pong(&mut dp, &last_vip, repeat)?;
    let (first, floor_single) = single_runs(&mut dp, &last_vip, singles)?;
    routes()?;
    let established_fib = established_single(&mut dp, &last_vip, singles)?;
    Ok(PacketCost {
        services: n,
        floor_ns: floor,
        no_service_ns: no_service,
        no_frontend_port_ns: no_frontend_port,
        established_ns: established,
        reply_ns: reply,
        first_packet_ns: first,
        floor_single_ns: floor_single,
        established_fib_ns: established_fib,
        programmed_seconds: programmed,
    })
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
    let mut out = vec![0u8; frame.len() + 256];
    Ok(prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?)
}

/// The median over 9 batches of the kernel's mean per repetition: one
/// batch that meets an interrupt or the other vCPU's noise moves nothing.
fn repeat_ns(prog: &mut SchedClassifier, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    const BATCHES: u32 = 9;
    let each = (repeat / BATCHES).max(1);
    let mut ns = Vec::with_capacity(BATCHES as usize);
    for _ in 0..BATCHES {
        ns.push(test_run(prog, frame, each)?.duration.as_nanos());
    }
    Ok(median(ns))
}

fn entry(flags: u16, dir: u8, addr: &str, port: u16) -> CtValue {
    let (a, p) = (wire::addr(ip(addr)), wire::port(port));
    CtValue {
        new_src_addr: if flags == CT_F_REWRITE_SRC { a } else { 0 },
        new_dst_addr: if flags == CT_F_REWRITE_DST { a } else { 0 },
        new_src_port: if flags == CT_F_REWRITE_SRC { p } else { 0 },
        new_dst_port: if flags == CT_F_REWRITE_DST { p } else { 0 },
        flags,
        dir,
        ..Default::default()
    }
}

fn key(src: &str, sport: u16, dst: &str, dport: u16) -> CtKey {
    CtKey::new(
        wire::addr(ip(src)),
        wire::addr(ip(dst)),
        wire::port(sport),
        wire::port(dport),
        IPPROTO_TCP,
    )
}

/// Mean ns of an established original-direction packet and of a reply.
fn ping_pong(dp: &mut Datapath, vip: &str, repeat: u32) -> anyhow::Result<(f64, f64)> {
    let backend = BACKEND;
    let (dst, src) = (CT_F_REWRITE_DST, CT_F_REWRITE_SRC);
    for (k, v) in [
        (
            key(CLIENT, 45000, vip, 80),
            entry(dst, CT_DIR_ORIGINAL, backend, 8080),
        ),
        (
            key(CLIENT, 45000, backend, 8080),
            entry(dst, CT_DIR_ORIGINAL, vip, 80),
        ),
        (
            key(backend, 8080, CLIENT, 45000),
            entry(src, CT_DIR_REPLY, vip, 80),
        ),
        (
            key(vip, 80, CLIENT, 45000),
            entry(src, CT_DIR_REPLY, backend, 8080),
        ),
    ] {
        dp.maps.conntrack.insert(k, v, 0)?;
    }
    let prog = dp.ingress()?;
    let est = repeat_ns(prog, &Pkt::new(CLIENT, 45000, vip, 80, ACK).build(), repeat)?;
    let reply = repeat_ns(
        prog,
        &Pkt::new(backend, 8080, CLIENT, 45000, ACK).build(),
        repeat,
    )?;
    Ok((est, reply))
}

/// Medians of single runs: first packets (fresh flows), and the empty program.
fn single_runs(dp: &mut Datapath, vip: &str, runs: u32) -> anyhow::Result<(f64, f64)> {
    let mut first = Vec::with_capacity(runs as usize);
    let mut floor = Vec::with_capacity(runs as usize);
    for i in 0..runs {
        let src = format!("198.18.{}.{}", 100 + i / 65536, i % 65536 / 256);
        let sport = 1024 + (i % 256) as u16;
        let syn = Pkt::new(&src, sport, vip, 80, SYN).build();
        first.push(test_run(dp.ingress()?, &syn, 1)?.duration.as_nanos());
        floor.push(test_run(dp.floor()?, &syn, 1)?.duration.as_nanos());
    }
    Ok((median(first), median(floor)))
}

/// Median of single runs of an established packet (the ping-pong flow's
/// original direction, fresh each run) with its FIB lookup succeeding.
fn established_single(dp: &mut Datapath, vip: &str, runs: u32) -> anyhow::Result<f64> {
    let frame = Pkt::new(CLIENT, 45000, vip, 80, ACK).build();
    let mut ns = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let r = test_run(dp.ingress()?, &frame, 1)?;
        anyhow::ensure!(
            r.return_value == TC_ACT_REDIRECT,
            "the established packet was not redirected by the FIB (verdict {})",
            r.return_value as i32
        );
        ns.push(r.duration.as_nanos());
    }
    Ok(median(ns))
}

fn median(mut v: Vec<u128>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default() as f64
}
