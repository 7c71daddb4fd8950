//! Shared by the in-kernel datapath tests: packet builders, checksum checks,
//! map seeding and the "needs the kernel" guard.
#![allow(dead_code)]

pub mod fam;
pub mod paths;
pub mod v6;

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use kpx::{
    control::model::FrontendKey,
    dataplane::maps::{Datapath, LoadOptions},
    dataplane::reconcile::{BackendAddr, Op},
};
use proxy_common::{wire, CtKey, ServiceValue, SlotKey, IPPROTO_TCP, IPPROTO_UDP};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: sent back out (the REJECT's ICMP reply).
pub const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1): untouched, on to the next program or the stack.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const XDP_DROP: u32 = 1;
/// On to the stack (and tc ingress).
pub const XDP_PASS: u32 = 2;
/// Back out of the interface the frame came in.
pub const XDP_TX: u32 = 3;

/// Loads a fresh datapath (its own maps), or explains why it cannot.
///
/// Root-only: the tests that call it are `#[ignore = "needs root"]`.
pub fn datapath() -> Datapath {
    armed(testbed::built(
        "the datapath",
        Datapath::load(&LoadOptions::default()),
    ))
}

/// `dp` with its reply filter as an agent keeps it once its programs are
/// attached: rebuilt from the (empty) conntrack tables, so every flow's
/// reply must find the bit the datapath set as it created the flow.
///
/// And with tc egress noted on loopback, the interface `test_run` runs
/// packets on (as the agent notes the interfaces it attached egress to):
/// a new flow there asks for nothing.
pub fn armed(mut dp: Datapath) -> Datapath {
    rebuild_replies(&dp);
    rebuild_replies(&dp);
    kpx::dataplane::egress::mark(&mut dp.maps, LOOPBACK, true).expect("noting egress on lo");
    dp
}

/// Loopback's ifindex: where `test_run` runs a packet.
pub const LOOPBACK: u32 = 1;

/// One rebuild of the reply filter, as each collection of the agent's does.
pub fn rebuild_replies(dp: &Datapath) {
    dp.maps
        .replies
        .rebuild(|| kpx::dataplane::conntrack::reply_bits(&dp.maps))
        .expect("rebuilding the reply filter");
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// A TCP/UDP packet description; `build` makes the Ethernet frame.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Raw IPv4 options (multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub ttl: u8,
}

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
        rst: bool,
    },
    /// `zero_csum`: send with checksum 0 ("no checksum").
    Udp { zero_csum: bool },
}

pub const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const SYN_ACK: L4 = L4::Tcp {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const FIN_ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};
pub const UDP: L4 = L4::Udp { zero_csum: false };

impl Pkt {
    pub fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Self {
        Self {
            src: ip(src),
            sport,
            dst: ip(dst),
            dport,
            l4,
            payload: b"kpx-test-payload".to_vec(),
            ip_options: Vec::new(),
            ttl: 64,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
        let (proto, l4) = match self.l4 {
            L4::Tcp { syn, ack, fin, rst } => {
                let mut th = TcpHeader::new(self.sport, self.dport, 1000, 64240);
                th.syn = syn;
                th.ack = ack;
                th.fin = fin;
                th.rst = rst;
                if ack {
                    th.acknowledgment_number = 1;
                }
                (IpNumber::TCP, Either::Tcp(th))
            }
            L4::Udp { .. } => (
                IpNumber::UDP,
                Either::Udp(UdpHeader {
                    source_port: self.sport,
                    destination_port: self.dport,
                    length: (8 + self.payload.len()) as u16,
                    checksum: 0,
                }),
            ),
        };
        let l4_len = match &l4 {
            Either::Tcp(th) => th.header_len() + self.payload.len(),
            Either::Udp(_) => 8 + self.payload.len(),
        };
        let mut iph = Ipv4Header::new(
            l4_len as u16,
            self.ttl,
            proto,
            self.src.octets(),
            self.dst.octets(),
        )
        .expect("ipv4 header");
        iph.options =
            etherparse::Ipv4Options::try_from(self.ip_options.as_slice()).expect("ip options");
        // Options lengthen the header; total_len must follow.
        iph.set_payload_len(l4_len).expect("ip payload length");
        iph.write(&mut out).expect("write ip");
        match l4 {
            Either::Tcp(mut th) => {
                th.checksum = th
                    .calc_checksum_ipv4(&iph, &self.payload)
                    .expect("tcp csum");
                th.write(&mut out).expect("write tcp");
            }
            Either::Udp(mut uh) => {
                if !matches!(self.l4, L4::Udp { zero_csum: true }) {
                    uh.checksum = uh
                        .calc_checksum_ipv4(&iph, &self.payload)
                        .expect("udp csum");
                }
                uh.write(&mut out).expect("write udp");
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

enum Either {
    Tcp(TcpHeader),
    Udp(UdpHeader),
}

/// What came out of the program.
#[derive(Debug)]
pub struct Out {
    pub verdict: u32,
    pub bytes: Vec<u8>,
}

pub fn run(dp: &mut Datapath, frame: &[u8]) -> Out {
    run_on(dp, frame, false)
}

/// Runs the tc egress program instead of the ingress one.
pub fn run_egress(dp: &mut Datapath, frame: &[u8]) -> Out {
    run_on(dp, frame, true)
}

/// Runs the tc egress program on `frame` as a packet the node forwards:
/// received on the interface `iif` (the skb's `ingress_ifindex`), not sent
/// by the node itself.
pub fn run_egress_forwarded(dp: &mut Datapath, frame: &[u8], iif: u32) -> Out {
    // A `struct __sk_buff` up to its `ifindex`: `ingress_ifindex` is at
    // byte 36, and all else zero, as `BPF_PROG_TEST_RUN` requires.
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&iif.to_ne_bytes());
    in_netns(empty_netns(), || run_ctx(dp, frame, true, Some(&ctx)))
}

/// Runs `f` on a thread of its own inside the network namespace `netns`
/// (an open `/proc/.../ns/net` or `/run/netns/...` file).
fn in_netns<T: Send>(netns: &std::fs::File, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this scoped thread only; `netns` is open.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            f()
        })
        .join()
        .expect("test_run thread")
    })
}

/// A network namespace of this test process with nothing in it (loopback
/// down, no routes, no forwarding): the FIB lookups of `test_run` there
/// always hand packets to the stack, whatever the machine's own routes.
fn empty_netns() -> &'static std::fs::File {
    static NS: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    NS.get_or_init(|| {
        std::thread::spawn(|| {
            // SAFETY: unshare on this short-lived thread only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            std::fs::File::open("/proc/thread-self/ns/net").expect("netns file")
        })
        .join()
        .expect("unshare thread")
    })
}

fn run_on(dp: &mut Datapath, frame: &[u8], egress: bool) -> Out {
    run_in(dp, frame, egress, empty_netns())
}

/// Runs the program on `frame` from inside the network namespace `netns`
/// (an open `/proc/.../ns/net` or `/run/netns/...` file).
pub fn run_in(dp: &mut Datapath, frame: &[u8], egress: bool, netns: &std::fs::File) -> Out {
    in_netns(netns, || run_here(dp, frame, egress))
}

/// Runs the program on each frame, all from one thread in the empty
/// namespace (a thread per run would dominate a long run).
pub fn run_batch(dp: &mut Datapath, frames: &[(Vec<u8>, bool)]) -> Vec<Out> {
    in_netns(empty_netns(), || {
        frames
            .iter()
            .map(|(f, egress)| run_here(dp, f, *egress))
            .collect()
    })
}

fn run_here(dp: &mut Datapath, frame: &[u8], egress: bool) -> Out {
    run_ctx(dp, frame, egress, None)
}

/// [`run_here`] with a `struct __sk_buff` for the context.
fn run_ctx(dp: &mut Datapath, frame: &[u8], egress: bool, ctx: Option<&[u8]>) -> Out {
    let mut buf = vec![0u8; frame.len() + 256];
    let prog = if egress { dp.egress() } else { dp.ingress() };
    let res = prog
        .expect("program")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut buf),
            ctx_in: ctx,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {frame:02x?}: {e}"));
    buf.truncate(res.data_size_out as usize);
    Out {
        verdict: res.return_value,
        bytes: buf,
    }
}

/// Runs the XDP program on `frame`, arriving on `ifindex` (0: the test
/// run's default, loopback) of the network namespace `netns` (None: an
/// empty one). What comes out starts at the frame's metadata: see
/// [`Xdp::frame`].
pub fn run_xdp_in(
    dp: &mut Datapath,
    frame: &[u8],
    netns: Option<&std::fs::File>,
    ifindex: u32,
) -> Xdp {
    let netns = netns.unwrap_or_else(|| empty_netns());
    in_netns(netns, || {
        let ctx = testbed::xdp::xdp_md(frame.len(), ifindex);
        let mut buf = vec![0u8; frame.len() + 256];
        let res = dp
            .xdp()
            .expect("the XDP program")
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut buf),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (XDP) of {frame:02x?}: {e}"));
        buf.truncate(res.data_size_out as usize);
        Xdp {
            verdict: res.return_value,
            out: buf,
            frame_len: frame.len(),
        }
    })
}

pub fn run_xdp(dp: &mut Datapath, frame: &[u8]) -> Xdp {
    run_xdp_in(dp, frame, None, 0)
}

/// What came out of the XDP program.
#[derive(Debug)]
pub struct Xdp {
    pub verdict: u32,
    /// The metadata, then the frame.
    pub out: Vec<u8>,
    frame_len: usize,
}

impl Xdp {
    /// Whether the frame carries kpx's "translated by XDP" metadata.
    pub fn marked(&self) -> bool {
        self.out.len() == self.frame_len + 4
            && self.out[..4] == proxy_common::XDP_META_TRANSLATED.to_ne_bytes()
    }

    /// The frame, after any metadata.
    pub fn frame(&self) -> &[u8] {
        &self.out[self.out.len() - self.frame_len..]
    }
}

/// A frame from outside that XDP translates for the stack (its next hop
/// not back out of its interface) where the kernel lets XDP mark frames
/// ([`Datapath::xdp_marks`]): passed marked, what XDP made of it; else
/// passed untouched, uncounted, and what tc ingress (in the same
/// namespace) made of it, which must pass it on too.
pub fn up_the_stack(
    dp: &mut Datapath,
    frame: &[u8],
    netns: Option<&std::fs::File>,
    ifindex: u32,
) -> Vec<u8> {
    let before = packets(dp);
    let out = run_xdp_in(dp, frame, netns, ifindex);
    assert_eq!(out.verdict, XDP_PASS);
    if dp.xdp_marks() {
        assert!(out.marked(), "a translated frame is marked for tc");
        return out.frame().to_vec();
    }
    assert_eq!(out.out, frame, "untouched, unmarked: tc's to translate");
    assert_eq!(packets(dp), before, "tc counts it, not XDP");
    let out = run_in(dp, frame, false, netns.unwrap_or_else(|| empty_netns()));
    assert!(
        [TC_ACT_OK, TC_ACT_REDIRECT].contains(&out.verdict),
        "tc sends it on: {}",
        out.verdict
    );
    out.bytes
}

/// The addresses and ports of an output frame, with its checksums verified
/// by recomputing them from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// UDP checksum field was 0.
    pub udp_csum_zero: bool,
}

pub fn inspect(frame: &[u8]) -> Seen {
    let (iph, rest) = Ipv4Header::from_slice(&frame[14..]).expect("output IPv4 header");
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "IPv4 header checksum is wrong"
    );
    let l4 = &rest[..(iph.total_len as usize - iph.header_len())];
    match iph.protocol {
        IpNumber::TCP => {
            let (th, payload) = TcpHeader::from_slice(l4).expect("output TCP header");
            assert_eq!(
                th.checksum,
                th.calc_checksum_ipv4(&iph, payload).expect("tcp csum"),
                "TCP checksum is wrong"
            );
            Seen {
                src: Ipv4Addr::from(iph.source),
                sport: th.source_port,
                dst: Ipv4Addr::from(iph.destination),
                dport: th.destination_port,
                udp_csum_zero: false,
            }
        }
        IpNumber::UDP => {
            let (uh, payload) = UdpHeader::from_slice(l4).expect("output UDP header");
            let payload = &payload[..uh.length as usize - 8];
            if uh.checksum != 0 {
                assert_eq!(
                    uh.checksum,
                    uh.calc_checksum_ipv4(&iph, payload).expect("udp csum"),
                    "UDP checksum is wrong"
                );
            }
            Seen {
                src: Ipv4Addr::from(iph.source),
                sport: uh.source_port,
                dst: Ipv4Addr::from(iph.destination),
                dport: uh.destination_port,
                udp_csum_zero: uh.checksum == 0,
            }
        }
        p => panic!("unexpected protocol {p:?}"),
    }
}

/// An ICMP error frame from `src` to `dst` quoting `quote` (an IP packet's
/// header and first bytes), with valid checksums.
pub fn icmp_error(src: &str, dst: &str, icmp_type: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let icmp = Icmpv4Header::with_checksum(icmp_type, quote);
    let iph = Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        IpNumber::ICMP,
        ip(src).octets(),
        ip(dst).octets(),
    )
    .expect("ipv4 header");
    let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    iph.write(&mut out).expect("write ip");
    icmp.write(&mut out).expect("write icmp");
    out.extend_from_slice(quote);
    out
}

/// An ICMP message read back, with its IP and ICMP checksums verified.
#[derive(Debug)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: Icmpv4Type,
    /// The quoted packet, exactly as carried.
    pub quote: Vec<u8>,
}

pub fn inspect_icmp(frame: &[u8]) -> IcmpSeen {
    let (iph, rest) = Ipv4Header::from_slice(&frame[14..]).expect("output IPv4 header");
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "IPv4 header checksum is wrong"
    );
    assert_eq!(iph.protocol, IpNumber::ICMP, "not ICMP");
    let body = &rest[..iph.total_len as usize - iph.header_len()];
    let (icmp, quote) = Icmpv4Header::from_slice(body).expect("ICMP header");
    let expect = Icmpv4Header::with_checksum(icmp.icmp_type.clone(), quote);
    assert_eq!(icmp.checksum, expect.checksum, "ICMP checksum is wrong");
    IcmpSeen {
        src: Ipv4Addr::from(iph.source),
        dst: Ipv4Addr::from(iph.destination),
        icmp_type: icmp.icmp_type,
        quote: quote.to_vec(),
    }
}

/// Installs a service frontend and its backends the way the agent lays them
/// out: slots (each holding its backend), then the service entry, then its
/// address. Either family: `vip` is an IPv4 or IPv6 address (the family's
/// unspecified one for a NodePort frontend).
pub fn install_service(
    dp: &mut Datapath,
    svc_id: u32,
    vip: &str,
    port: u16,
    proto: u8,
    backends: &[(u32, &str, u16)],
) {
    for (slot, &(id, addr, bport)) in backends.iter().enumerate() {
        let b = BackendAddr {
            addr: addr.parse().expect("test address"),
            port: bport,
            proto,
            local: false,
        };
        let key = SlotKey {
            svc_id,
            slot: slot as u32,
        };
        dp.maps.put_slot(key, id, &b).expect("writing a slot");
    }
    let key = frontend_key((vip, port, proto));
    let value = ServiceValue {
        svc_id,
        count: backends.len() as u32,
        ..ServiceValue::default()
    };
    dp.maps
        .put_frontend(&key, value)
        .expect("writing the frontend");
    if !key.addr.is_unspecified() {
        dp.maps
            .write(&Op::PutAddr(key.addr, 1))
            .expect("writing the frontend address");
    }
}

/// The frontend `vip:port/proto` of either family.
pub fn frontend_key((vip, port, proto): (&str, u16, u8)) -> FrontendKey {
    FrontendKey {
        addr: vip.parse().expect("test address"),
        port,
        proto,
    }
}

/// Rewrites the service entry of frontend `vip:port/proto` (either family;
/// it must exist) with `edit`, as the agent would write it.
pub fn edit_frontend(
    dp: &mut Datapath,
    key: (&str, u16, u8),
    edit: impl FnOnce(&mut ServiceValue),
) {
    let key = frontend_key(key);
    let mut v = dp.maps.frontend(&key).expect("the frontend to edit");
    edit(&mut v);
    dp.maps.put_frontend(&key, v).expect("writing the frontend");
}

pub fn event(dp: &mut Datapath, e: proxy_common::Event) -> u64 {
    dp.maps
        .events()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == e)
        .unwrap()
        .1
}

pub fn counter(dp: &mut Datapath, c: proxy_common::Counter) -> u64 {
    dp.maps
        .counters()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == c)
        .unwrap()
        .1
}

/// All verdict counters: every packet ends in exactly one, so this is the
/// number of packets the program saw (what `kpx dump stats` reports).
pub fn packets(dp: &mut Datapath) -> u64 {
    dp.maps.counters().unwrap().iter().map(|(_, n)| n).sum()
}

pub fn drops(dp: &mut Datapath, r: proxy_common::DropReason) -> u64 {
    dp.maps
        .drops()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == r)
        .unwrap()
        .1
}

// The standard scenario of the datapath tests.

pub const CLIENT: &str = "198.18.0.2";
pub const VIP: &str = "198.19.0.10";
pub const B1: &str = "198.18.1.1";
pub const B2: &str = "198.18.1.2";
pub const B3: &str = "198.18.1.3";

/// A TCP and a UDP frontend on the same VIP, three backends each.
pub fn cluster(dp: &mut Datapath) {
    install_service(
        dp,
        1,
        VIP,
        80,
        IPPROTO_TCP,
        &[(1, B1, 8080), (2, B2, 8080), (3, B3, 8080)],
    );
    install_service(
        dp,
        2,
        VIP,
        53,
        IPPROTO_UDP,
        &[(4, B1, 5353), (5, B2, 5353), (6, B3, 5353)],
    );
}

pub fn ct_key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> CtKey {
    CtKey::new(
        wire::addr(ip(src)),
        wire::addr(ip(dst)),
        wire::port(sport),
        wire::port(dport),
        proto,
    )
}

/// The backend's reply, with `l4`, to a packet the datapath translated to
/// `seen`.
pub fn reply(seen: &Seen, l4: L4) -> Vec<u8> {
    let (src, dst) = (seen.dst.to_string(), seen.src.to_string());
    Pkt::new(&src, seen.dport, &dst, seen.sport, l4).build()
}

/// Opens a TCP connection through the datapath as a real one opens: the
/// client's SYN, then the chosen backend's SYN-ACK (which moves the flow to
/// the established table). Returns the SYN as translated.
pub fn handshake(dp: &mut Datapath, syn: &Pkt) -> Seen {
    let out = run(dp, &syn.build());
    assert_eq!(out.verdict, TC_ACT_OK, "the SYN was not translated");
    let seen = inspect(&out.bytes);
    let answer = run(dp, &reply(&seen, SYN_ACK));
    assert_eq!(answer.verdict, TC_ACT_OK, "the SYN-ACK was not translated");
    seen
}

/// A Geneve frame as direct server return's sender writes it (built here
/// from the format, not by the datapath): `inner` in Geneve from `from` to
/// the inner destination, with the service address `svc`.
pub fn geneve_frame(from: &str, inner: &Pkt, svc: (&str, u16)) -> Vec<u8> {
    geneve_frame_of(from, &inner.build(), svc)
}

/// [`geneve_frame`] of a frame already built.
pub fn geneve_frame_of(from: &str, inner: &[u8], svc: (&str, u16)) -> Vec<u8> {
    let ip_len = inner.len() - 14;
    let mut opt = vec![0x03, 0, 0x08, 0, 0, 0, 0, 0, 0xff, 0x7b, 0x01, 0x02];
    opt.extend_from_slice(&ip(svc.0).octets());
    opt.extend_from_slice(&svc.1.to_be_bytes());
    opt.extend_from_slice(&[0, 0]);
    let udp = etherparse::UdpHeader {
        source_port: 0xc123,
        destination_port: proxy_common::dsr::GENEVE_PORT,
        length: (8 + opt.len() + ip_len) as u16,
        checksum: 0,
    };
    let mut iph = etherparse::Ipv4Header::new(
        udp.length,
        64,
        etherparse::IpNumber::UDP,
        ip(from).octets(),
        inner[14 + 16..14 + 20].try_into().unwrap(),
    )
    .unwrap();
    iph.dont_fragment = true;
    iph.header_checksum = iph.calc_header_checksum();
    let mut out = inner[..14].to_vec();
    iph.write(&mut out).unwrap();
    udp.write(&mut out).unwrap();
    out.extend_from_slice(&opt);
    out.extend_from_slice(&inner[14..]);
    out
}

/// A node's namespace for XDP's `XDP_TX` cases, forwarding on: `ifaces`
/// (name, MAC, address with its prefix length), each a veth whose peer is
/// up; `routes` through `router` (MAC 02::bb, a permanent neighbour on the
/// first interface). Returns it, its file for the runs, and the first
/// interface's index. IPv6 when the router's address is.
pub fn xdp_node(
    prefix: &str,
    ifaces: &[(&str, &str, &str)],
    router: &str,
    routes: &[&str],
) -> (testbed::Netns, std::fs::File, u32) {
    let v6 = router.contains(':');
    let ns = testbed::Netns::create(&format!("{prefix}{}", std::process::id())).unwrap();
    if v6 {
        ns.sysctl("net/ipv6/conf/all/forwarding", "1").unwrap();
    } else {
        ns.sysctl("net/ipv4/ip_forward", "1").unwrap();
    }
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    for &(dev, mac, addr) in ifaces {
        let peer = format!("{dev}1");
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer])
            .unwrap();
        ns.ip(&["link", "set", &peer, "up"]).unwrap();
        ns.ip(&["link", "set", dev, "address", mac]).unwrap();
        let mut add = vec!["addr", "add", addr, "dev", dev];
        if v6 {
            add.push("nodad");
        }
        ns.ip(&add).unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let first = ifaces[0].0;
    for net in routes {
        ns.ip(&["route", "add", net, "via", router]).unwrap();
    }
    ns.ip(&[
        "neigh",
        "add",
        router,
        "lladdr",
        "02:00:00:00:00:bb",
        "dev",
        first,
        "nud",
        "permanent",
    ])
    .unwrap();
    let ifindex = ns
        .enter(|| nix::net::if_::if_nametoindex(first))
        .unwrap()
        .unwrap();
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    (ns, file, ifindex)
}

/// A flow's first packet from outside, arriving on [`xdp_node`]'s first
/// interface `ext` with its next hop back out of it: bounced by XDP where
/// it can mark frames ([`Datapath::xdp_marks`]; which way a flow goes is
/// known only once it is set up), else passed untouched and sent out of
/// `ext` by tc: either way the same frame, from ext's MAC to the router's.
pub fn first_sent_back(
    dp: &mut Datapath,
    frame: &[u8],
    netns: &std::fs::File,
    ext: u32,
) -> Vec<u8> {
    let out = run_xdp_in(dp, frame, Some(netns), ext);
    if dp.xdp_marks() {
        return bounced(&out).to_vec();
    }
    assert_eq!((out.verdict, &out.out[..]), (XDP_PASS, frame), "untouched");
    let out = run_in(dp, frame, false, netns);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.bytes[0..6], &[2, 0, 0, 0, 0, 0xbb], "the router's MAC");
    assert_eq!(&out.bytes[6..12], &[2, 0, 0, 0, 0, 0xaa], "ext's MAC");
    out.bytes
}

/// The frame of an XDP run sent back out of [`xdp_node`]'s first
/// interface: `XDP_TX`, unmarked, from that interface's MAC (02::aa) to
/// the router's.
pub fn bounced(out: &Xdp) -> &[u8] {
    assert_eq!(out.verdict, XDP_TX, "back out of ext, towards the router");
    assert!(!out.marked());
    let frame = out.frame();
    assert_eq!(&frame[0..6], &[2, 0, 0, 0, 0, 0xbb], "the router's MAC");
    assert_eq!(&frame[6..12], &[2, 0, 0, 0, 0, 0xaa], "ext's MAC");
    frame
}
