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
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use testbed::{Cluster, Netns};

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
                    r.node_ns
                        .map_or(String::new(), |ns| format!("; the node's share {ns:.0} ns a packet"))
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
            "neigh", "replace", WIRE_IP, "lladdr", &mac(WIRE_MAC), "dev", "x0", "nud", "permanent",
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
                &["--xdp=native", "--xdp-interfaces=x0", "--min-sync-period=0s"],
            )?;
            wait_log(&bed.cluster, "XDP (native) on x0")?;
        }
        Forwarder::KpxTc | Forwarder::IptablesNft | Forwarder::Nftables => {
            // A veth receives XDP frames (the generator's) only in NAPI
            // mode: GRO on turns it on without an XDP program.
            bed.cluster.node.enter(|| set_gro("x0", true))??;
            match f {
                Forwarder::KpxTc => bed.cluster.start_agent(kpx, &["--xdp=off"])?,
                Forwarder::IptablesNft => bed.cluster.load_reference(testbed::Proxy::Iptables, kpx)?,
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
        bed.wire.enter(|| send(&gen, bed.wire_if, &frame, burst))??;
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
            WIRE_IP.parse::<std::net::Ipv4Addr>().map(|a| a.octets()).unwrap_or_default(),
            NODE_IP.parse::<std::net::Ipv4Addr>().map(|a| a.octets()).unwrap_or_default(),
            64,
        )
        .udp(40000, NODEPORT);
    // Writing into a Vec cannot fail.
    let _ = builder.write(&mut f, &payload);
    f
}

const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;

/// One BPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | (src << 4)) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// A two-instruction XDP program (`r0 = action; exit`).
fn raw_xdp(action: i32) -> Result<OwnedFd> {
    load_xdp(&[insn(0xb7, 0, 0, 0, action), insn(0x95, 0, 0, 0, 0)])
}

/// The generator's program: writes `head` over the frame's start, then
/// `XDP_TX`. Live-frames mode recycles its pages without restoring them,
/// and the node translates the frames it gets in place (a veth hands the
/// page itself over): each send must put the original headers back.
fn generator(head: &[u8]) -> Result<OwnedFd> {
    let mut p = vec![
        insn(0x61, 2, 1, 0, 0), // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0), // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0), // r4 = r2
        insn(0x07, 4, 0, 0, head.len() as i32), // r4 += len
    ];
    let mut stores = Vec::new();
    let mut off = 0;
    while off + 4 <= head.len() {
        let w = i32::from_ne_bytes([head[off], head[off + 1], head[off + 2], head[off + 3]]);
        stores.push(insn(0x62, 2, 0, off as i16, w)); // *(u32 *)(r2 + off) = w
        off += 4;
    }
    while off < head.len() {
        stores.push(insn(0x72, 2, 0, off as i16, i32::from(head[off]))); // *(u8 *)
        off += 1;
    }
    // if r4 > r3 goto drop (past the stores and the XDP_TX exit)
    p.push(insn(0x2d, 4, 3, stores.len() as i16 + 2, 0));
    p.extend(stores);
    p.extend([
        insn(0xb7, 0, 0, 0, XDP_TX),
        insn(0x95, 0, 0, 0, 0),
        insn(0xb7, 0, 0, 0, XDP_DROP),
        insn(0x95, 0, 0, 0, 0),
    ]);
    load_xdp(&p)
}

/// Loads raw XDP instructions: no object file for the bed's own tools.
fn load_xdp(insns: &[u64]) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    let license = c"GPL";
    #[repr(C)]
    #[derive(Default)]
    struct Load {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut attr = Load {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    attr.prog_name[..7].copy_from_slice(b"kpx_gen");
    // SAFETY: PROG_LOAD's bpf_attr, its pointers naming `insns` and
    // `license`, alive for the call.
    let fd = unsafe { kpx::dataplane::sys::bpf(BPF_PROG_LOAD, &mut attr)? };
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `prog` to `ifindex` of the calling thread's namespace in native
/// mode (a bpf link: detached when the returned descriptor closes).
fn attach_native(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    let mut attr: [u32; 4] = [prog.as_raw_fd() as u32, ifindex, BPF_XDP, XDP_FLAGS_DRV_MODE];
    // SAFETY: LINK_CREATE's bpf_attr: descriptors and numbers only.
    let fd = unsafe { kpx::dataplane::sys::bpf(BPF_LINK_CREATE, &mut attr) }
        .context("native XDP on a veth")?;
    // SAFETY: as in `raw_xdp`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `ethtool -K <name> gro on|off`, in the calling thread's namespace.
fn set_gro(name: &str, on: bool) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    let mut value: [u32; 2] = [ETHTOOL_SGRO, on as u32];
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
    // SAFETY: a datagram socket for the ioctl, owned here.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor just opened, closed when this drops.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: SIOCETHTOOL with an ifreq naming `value` (an ethtool_value),
    // both alive for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) } != 0 {
        bail!("GRO on {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `frame` out of `ifindex` `count` times: a live-frames test run of
/// the `XDP_TX` program `gen`, in the calling thread's namespace.
fn send(gen: &OwnedFd, ifindex: u32, frame: &[u8], count: u32) -> Result<()> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut attr = TestRun {
        prog_fd: gen.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: count,
        ctx_size_in: std::mem::size_of_val(&md) as u32,
        ctx_in: md.as_ptr() as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    // SAFETY: PROG_TEST_RUN's bpf_attr; its pointers name `frame` and `md`,
    // of the sizes given, alive for the call; no output buffers.
    unsafe { kpx::dataplane::sys::bpf(BPF_PROG_TEST_RUN, &mut attr) }
        .context("live-frames test run")?;
    Ok(())
}
