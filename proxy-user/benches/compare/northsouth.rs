//! North-south forwarding rate: UDP packets from outside the node to a
//! NodePort whose backend is on another node, so every packet comes in on
//! the node's external interface and leaves by it again (translated,
//! masqueraded), as on a node serving external traffic.
//!
//! The bed: the node namespace (`x0`, 198.18.128.1) joined by a veth pair to
//! a "wire" namespace (`g0`, 198.18.128.100) that is both the traffic
//! generator and the next hop towards the backend (198.18.130.10).
//!
//! The generator: `BPF_PROG_TEST_RUN` of a two-instruction XDP program
//! returning `XDP_TX`, in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//! as xdp-trafficgen does): the kernel transmits the frame out of `g0`
//! once per repetition, with no socket, skb or copy on the sending side,
//! so the node's side is what costs. The sink: an `XDP_DROP` program on
//! `g0` (native, which also gives `g0` the NAPI a veth needs to receive
//! XDP frames); `g0`'s receive counter is the forwarded count.
//!
//! Generator, node and sink share one CPU (a veth hands frames to its
//! peer's NAPI on the sending CPU), so the chain's rate is reported beside
//! the node's own per-packet share: the chain's time per packet minus that
//! of a "reflector" (an `XDP_TX` program on `x0`, bouncing every frame
//! back untouched: the generator's and sink's share).

use std::{
    os::fd::OwnedFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use testbed::{
    xdp::{attach_native, generator, raw_xdp, XDP_DROP, XDP_TX},
    Cluster, Netns,
};

const NODE_IP: &str = "198.18.128.1";
const WIRE_IP: &str = "198.18.128.100";
const BACKEND: &str = "198.18.130.10";
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0x80, 1];
const WIRE_MAC: [u8; 6] = [2, 0, 0, 0, 0x80, 0x64];
const NODEPORT: u16 = 30080;

/// How the node forwards in one measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forwarder {
    /// An `XDP_TX` program on `x0`: every frame bounced back untouched.
    Reflector,
    IptablesNft,
    Nftables,
    /// kpx with `--xdp=off`: tc alone.
    KpxTc,
    /// kpx with `--xdp=native` on `x0`.
    KpxXdp,
}

impl Forwarder {
    pub fn label(self) -> &'static str {
        match self {
            Self::Reflector => "reflector (XDP_TX, no translation)",
            Self::IptablesNft => "iptables (nft)",
            Self::Nftables => "nftables",
            Self::KpxTc => "kpx tc",
            Self::KpxXdp => "kpx XDP (native)",
        }
    }
}

/// One forwarder's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NsRate {
    pub forwarder: Forwarder,
    /// Frames the generator sent, and the ones that came back.
    pub sent: u64,
    pub forwarded: u64,
    /// Forwarded frames per second of the whole chain.
    pub chain_pps: f64,
    /// The node's own share, ns per packet (the chain's time per packet
    /// minus the reflector's), and the rate that share alone allows.
    pub node_ns: Option<f64>,
}

/// Every forwarder in turn, each in a fresh bed; None for one that could
/// not run here (said on stdout).
pub fn measure(kpx: &Path, seconds: f64, say: &dyn Fn(String)) -> Result<Vec<NsRate>> {
    let mut out: Vec<NsRate> = Vec::new();
    for f in [
        Forwarder::Reflector,
        Forwarder::IptablesNft,
        Forwarder::Nftables,
        Forwarder::KpxTc,
        Forwarder::KpxXdp,
    ] {
        say(format!("north-south: {}", f.label()));
        match one(kpx, f, seconds) {
            Ok(mut r) => {
                if let Some(base) = out.iter().find(|r| r.forwarder == Forwarder::Reflector) {
                    r.node_ns = Some(1e9 / r.chain_pps - 1e9 / base.chain_pps);
                }
                say(format!(
                    "north-south: {}: {:.0} packets/s through the chain ({} of {} came back){}",
                    f.label(),
                    r.chain_pps,
                    r.forwarded,
                    r.sent,
                    r.node_ns.map_or(String::new(), |ns| format!(
                        "; the node's share {ns:.0} ns a packet"
                    ))
                ));
                out.push(r);
            }
            Err(e) => say(format!("north-south: {}: not measured: {e:#}", f.label())),
        }
    }
    Ok(out)
}

/// The bed: the node (a testbed cluster without pods) and the wire.
struct Bed {
    cluster: Cluster,
    wire: Netns,
    wire_if: u32,
    /// The sink's program and link, and whatever `x0` runs: held open.
    _held: Vec<OwnedFd>,
}

impl Bed {
    fn new() -> Result<Self> {
        let mut cluster = Cluster::new(&[])?;
        cluster.node_ip = NODE_IP.parse()?;
        cluster.interfaces = "x0".into();
        let wire = Netns::create(&format!("{}-wire", cluster.id))?;
        let node = &cluster.node;
        node.ip(&[
            "link", "add", "x0", "type", "veth", "peer", "name", "g0", "netns", &wire.name,
        ])?;
        node.ip(&["link", "set", "x0", "address", &mac(NODE_MAC)])?;
        wire.ip(&["link", "set", "g0", "address", &mac(WIRE_MAC)])?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "x0"])?;
        wire.ip(&["addr", "add", &format!("{WIRE_IP}/24"), "dev", "g0"])?;
        node.ip(&["link", "set", "x0", "up"])?;
        wire.ip(&["link", "set", "g0", "up"])?;
        // Static neighbours: the sink drops everything, ARP included.
        node.ip(&[
            "neigh",
            "replace",
            WIRE_IP,
            "lladdr",
            &mac(WIRE_MAC),
            "dev",
            "x0",
            "nud",
            "permanent",
        ])?;
        node.ip(&["route", "add", "198.18.130.0/24", "via", WIRE_IP])?;
        for (k, v) in [
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/conf/x0/send_redirects", "0"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/x0/rp_filter", "0"),
        ] {
            node.sysctl(k, v)?;
        }
        let manifest = testbed::service_manifest(
            "ns",
            &format!(
                "  type: NodePort\n  clusterIP: 198.19.0.10\n  ports:\n  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {NODEPORT}}}"
            ),
            "",
            "",
            &[testbed::Ep::ready(BACKEND.parse()?, "node-2")],
        );
        cluster.write_manifest("ns.yaml", &manifest)?;
        let wire_if = wire.enter(|| nix::net::if_::if_nametoindex("g0"))??;
        let sink = raw_xdp(XDP_DROP)?;
        let link = wire.enter(|| attach_native(&sink, wire_if))??;
        Ok(Self {
            cluster,
            wire,
            wire_if,
            _held: vec![sink, link],
        })
    }

    fn node_if(&self) -> Result<u32> {
        Ok(self
            .cluster
            .node
            .enter(|| nix::net::if_::if_nametoindex("x0"))??)
    }

    /// Frames that came back to the wire.
    fn received(&self) -> Result<u64> {
        self.wire.enter(|| -> Result<u64> {
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
            let line = dev
                .lines()
                .find(|l| l.trim_start().starts_with("g0:"))
                .context("g0 missing from /proc/net/dev")?;
            let (_, counters) = line.split_once(':').context("odd /proc/net/dev")?;
            Ok(counters
                .split_whitespace()
                .nth(1)
                .context("no rx packets")?
                .parse()?)
        })?
    }
}

fn one(kpx: &Path, f: Forwarder, seconds: f64) -> Result<NsRate> {
    let mut bed = Bed::new()?;
    let x0 = bed.node_if()?;
    match f {
        Forwarder::Reflector => {
            let prog = raw_xdp(XDP_TX)?;
            let link = bed.cluster.node.enter(|| attach_native(&prog, x0))??;
            bed._held.extend([prog, link]);
        }
        Forwarder::KpxXdp => {
            bed.cluster.start_agent(
                kpx,
                &[
                    "--xdp=native",
                    "--xdp-interfaces=x0",
                    "--min-sync-period=0s",
                ],
            )?;
            wait_log(&bed.cluster, "XDP (native) on x0")?;
        }
        Forwarder::KpxTc | Forwarder::IptablesNft | Forwarder::Nftables => {
            // A veth receives XDP frames (the generator's) only in NAPI
            // mode: GRO on turns it on without an XDP program.
            bed.cluster.node.set_gro("x0", true)?;
            match f {
                Forwarder::KpxTc => bed.cluster.start_agent(kpx, &["--xdp=off"])?,
                Forwarder::IptablesNft => {
                    bed.cluster.load_reference(testbed::Proxy::Iptables, kpx)?
                }
                _ => bed.cluster.load_reference(testbed::Proxy::Nftables, kpx)?,
            }
        }
    }
    if matches!(f, Forwarder::KpxTc | Forwarder::KpxXdp) {
        wait_log(&bed.cluster, " synced ")?;
    }
    let frame = udp_frame();
    // Ethernet, IPv4 and UDP headers: what the node rewrites.
    let gen = generator(&frame[..42])?;
    // Warm up: the flow's first packet, neighbours, conntrack.
    let before = bed.received()?;
    bed.wire.enter(|| send(&gen, bed.wire_if, &frame, 64))??;
    std::thread::sleep(Duration::from_millis(100));
    if bed.received()? == before {
        bail!("nothing came back from the node");
    }
    let (mut sent, mut elapsed) = (0u64, Duration::ZERO);
    let start = bed.received()?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < seconds {
        let burst = 262_144;
        let t = Instant::now();
        bed.wire
            .enter(|| send(&gen, bed.wire_if, &frame, burst))??;
        elapsed += t.elapsed();
        sent += u64::from(burst);
    }
    // Frames still queued in the node arrive within moments.
    std::thread::sleep(Duration::from_millis(50));
    let forwarded = bed.received()? - start;
    Ok(NsRate {
        forwarder: f,
        sent,
        forwarded,
        chain_pps: forwarded as f64 / elapsed.as_secs_f64(),
        node_ns: None,
    })
}

fn wait_log(c: &Cluster, what: &str) -> Result<()> {
    let t0 = Instant::now();
    while !c.agent_log().contains(what) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("no {what:?} in the agent's log:\n{}", c.agent_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// The generator's frame: UDP from the wire to the NodePort, 64 bytes.
fn udp_frame() -> Vec<u8> {
    let payload = [0u8; 18];
    let mut f = Vec::with_capacity(64);
    let builder = etherparse::PacketBuilder::ethernet2(WIRE_MAC, NODE_MAC)
        .ipv4(
            WIRE_IP
                .parse::<std::net::Ipv4Addr>()
                .map(|a| a.octets())
                .unwrap_or_default(),
            NODE_IP
                .parse::<std::net::Ipv4Addr>()
                .map(|a| a.octets())
                .unwrap_or_default(),
            64,
        )
        .udp(40000, NODEPORT);
    // Writing into a Vec cannot fail.
    let _ = builder.write(&mut f, &payload);
    f
}

/// Sends `frame` out of `ifindex` `count` times: a live-frames test run of
/// the generator program `gen`, in the calling thread's namespace.
fn send(gen: &OwnedFd, ifindex: u32, frame: &[u8], count: u32) -> Result<()> {
    use kpx::dataplane::sys;
    use std::os::fd::AsFd as _;
    let ctx = testbed::xdp::xdp_md(frame.len(), ifindex);
    sys::test_run_with(
        gen.as_fd(),
        frame,
        Some(&ctx),
        count,
        sys::BPF_F_TEST_XDP_LIVE_FRAMES,
    )
    .context("live-frames test run")?;
    Ok(())
}
