//! IPv6's side of the in-kernel datapath tests: packet builders and
//! checks, map seeding, the standard scenario. Addresses from 2001:2::/48
//! (RFC 5180).

use std::net::Ipv6Addr;

use etherparse::{
    Icmpv6Header, Icmpv6Type, IpNumber, Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
};
use kpx::dataplane::maps::Datapath;
use proxy_common::{wire, CtKey, In6, IPPROTO_TCP, IPPROTO_UDP};

use super::L4;

pub const CLIENT6: &str = "2001:2::2";
pub const VIP6: &str = "2001:2:0:ff::10";
pub const B6_1: &str = "2001:2:0:1::1";
pub const B6_2: &str = "2001:2:0:1::2";
pub const B6_3: &str = "2001:2:0:1::3";

pub fn ip6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

/// An IPv6 extension header before the transport header: its type
/// (hop-by-hop 0, routing 43, fragment 44, destination options 60) and
/// its bytes after the next-header byte (the length byte first, but for a
/// fragment header).
#[derive(Clone, Debug)]
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Ext {
    /// Options padding only (PadN), `words` 8-byte units long.
    pub fn options(kind: u8, words: u8) -> Self {
        let len = words as usize * 8;
        let mut body = vec![words - 1, 1, (len - 4) as u8];
        body.resize(len - 1, 0);
        Self { kind, body }
    }

    /// A fragment header: `offset` in 8-byte units, more fragments or not.
    pub fn fragment(offset: u16, more: bool) -> Self {
        let off = (offset << 3) | more as u16;
        let mut body = vec![0];
        body.extend_from_slice(&off.to_be_bytes());
        body.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        Self { kind: 44, body }
    }
}

/// A TCP/UDP packet over IPv6; `build` makes the Ethernet frame.
#[derive(Clone, Debug)]
pub struct Pkt6 {
    pub src: Ipv6Addr,
    pub sport: u16,
    pub dst: Ipv6Addr,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub ext: Vec<Ext>,
    pub hop_limit: u8,
}

impl Pkt6 {
    pub fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Self {
        Self {
            src: ip6(src),
            sport,
            dst: ip6(dst),
            dport,
            l4,
            payload: b"kpx-test-payload".to_vec(),
            ext: Vec::new(),
            hop_limit: 64,
        }
    }

    /// The transport header and payload, checksummed.
    fn transport(&self) -> (IpNumber, Vec<u8>) {
        let mut out = Vec::new();
        let (src, dst) = (self.src.octets(), self.dst.octets());
        let proto = match self.l4 {
            L4::Tcp { syn, ack, fin, rst } => {
                let mut th = TcpHeader::new(self.sport, self.dport, 1000, 64240);
                th.syn = syn;
                th.ack = ack;
                th.fin = fin;
                th.rst = rst;
                if ack {
                    th.acknowledgment_number = 1;
                }
                th.checksum = th
                    .calc_checksum_ipv6_raw(src, dst, &self.payload)
                    .expect("tcp csum");
                th.write(&mut out).expect("write tcp");
                IpNumber::TCP
            }
            L4::Udp { .. } => {
                let mut uh = UdpHeader {
                    source_port: self.sport,
                    destination_port: self.dport,
                    length: (8 + self.payload.len()) as u16,
                    checksum: 0,
                };
                uh.checksum = uh
                    .calc_checksum_ipv6_raw(src, dst, &self.payload)
                    .expect("udp csum");
                uh.write(&mut out).expect("write udp");
                IpNumber::UDP
            }
        };
        out.extend_from_slice(&self.payload);
        (proto, out)
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, transport) = self.transport();
        let mut chain = Vec::new();
        let mut kinds: Vec<u8> = self.ext.iter().map(|e| e.kind).collect();
        kinds.push(proto.0);
        for (i, e) in self.ext.iter().enumerate() {
            chain.push(kinds[i + 1]);
            chain.extend_from_slice(&e.body);
        }
        let iph = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::try_new(0x12345).expect("flow label"),
            payload_length: (chain.len() + transport.len()) as u16,
            next_header: IpNumber(kinds[0]),
            hop_limit: self.hop_limit,
            source: self.src.octets(),
            destination: self.dst.octets(),
        };
        let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
        iph.write(&mut out).expect("write ipv6");
        out.extend_from_slice(&chain);
        out.extend_from_slice(&transport);
        out
    }
}

/// The addresses and ports of an IPv6 output frame, its transport
/// checksum verified by recomputing it, and its hop limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen6 {
    pub src: Ipv6Addr,
    pub sport: u16,
    pub dst: Ipv6Addr,
    pub dport: u16,
    pub hop_limit: u8,
}

/// Skips `frame`'s IPv6 extension headers: the transport protocol and its
/// bytes (to the payload length's end).
fn transport_of(frame: &[u8]) -> (Ipv6Header, u8, &[u8]) {
    assert_eq!(&frame[12..14], &[0x86, 0xdd], "not IPv6");
    let (iph, rest) = Ipv6Header::from_slice(&frame[14..]).expect("output IPv6 header");
    let mut rest = &rest[..iph.payload_length as usize];
    let mut next = iph.next_header.0;
    while matches!(next, 0 | 43 | 44 | 60) {
        let len = if next == 44 {
            8
        } else {
            (rest[1] as usize + 1) * 8
        };
        next = rest[0];
        rest = &rest[len..];
    }
    (iph, next, rest)
}

pub fn inspect6(frame: &[u8]) -> Seen6 {
    let (iph, proto, l4) = transport_of(frame);
    let (src, dst) = (iph.source, iph.destination);
    let (sport, dport) = match proto {
        6 => {
            let (th, payload) = TcpHeader::from_slice(l4).expect("output TCP header");
            assert_eq!(
                th.checksum,
                th.calc_checksum_ipv6_raw(src, dst, payload)
                    .expect("tcp csum"),
                "TCP checksum is wrong"
            );
            (th.source_port, th.destination_port)
        }
        17 => {
            let (uh, payload) = UdpHeader::from_slice(l4).expect("output UDP header");
            assert_eq!(
                uh.checksum,
                uh.calc_checksum_ipv6_raw(src, dst, payload)
                    .expect("udp csum"),
                "UDP checksum is wrong"
            );
            (uh.source_port, uh.destination_port)
        }
        p => panic!("unexpected protocol {p}"),
    };
    Seen6 {
        src: Ipv6Addr::from(src),
        sport,
        dst: Ipv6Addr::from(dst),
        dport,
        hop_limit: iph.hop_limit,
    }
}

/// An ICMPv6 message read back, its checksum verified.
#[derive(Debug)]
pub struct Icmp6Seen {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub icmp_type: Icmpv6Type,
    pub quote: Vec<u8>,
}

pub fn inspect_icmp6(frame: &[u8]) -> Icmp6Seen {
    let (iph, proto, rest) = transport_of(frame);
    assert_eq!(proto, 58, "not ICMPv6");
    let (icmp, quote) = Icmpv6Header::from_slice(rest).expect("ICMPv6 header");
    let want = Icmpv6Header::with_checksum(icmp.icmp_type, iph.source, iph.destination, quote)
        .expect("icmpv6 checksum");
    assert_eq!(icmp.checksum, want.checksum, "ICMPv6 checksum is wrong");
    Icmp6Seen {
        src: Ipv6Addr::from(iph.source),
        dst: Ipv6Addr::from(iph.destination),
        icmp_type: icmp.icmp_type,
        quote: quote.to_vec(),
    }
}

pub fn ct_key6(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> CtKey<In6> {
    CtKey::new(
        wire::addr6(ip6(src)),
        wire::addr6(ip6(dst)),
        wire::port(sport),
        wire::port(dport),
        proto,
    )
}

/// IPv6's standard scenario: a TCP and a UDP frontend on one VIP, three
/// backends each (ids 11.., service ids 21, 22).
pub fn cluster6(dp: &mut Datapath) {
    super::install_service(
        dp,
        21,
        VIP6,
        80,
        IPPROTO_TCP,
        &[(11, B6_1, 8080), (12, B6_2, 8080), (13, B6_3, 8080)],
    );
    super::install_service(
        dp,
        22,
        VIP6,
        53,
        IPPROTO_UDP,
        &[(14, B6_1, 5353), (15, B6_2, 5353), (16, B6_3, 5353)],
    );
}

/// The backend's reply, with `l4`, to a packet translated to `seen`.
pub fn reply6(seen: &Seen6, l4: L4) -> Vec<u8> {
    let (src, dst) = (seen.dst.to_string(), seen.src.to_string());
    Pkt6::new(&src, seen.dport, &dst, seen.sport, l4).build()
}

/// A Geneve frame over IPv6 as direct server return's sender writes it
/// (built here from the format, not by the datapath): `inner` in Geneve
/// from `from` to the inner destination, with the service address `svc`;
/// its UDP checksum computed over the whole datagram.
pub fn geneve_frame6(from: &str, inner: &Pkt6, svc: (&str, u16)) -> Vec<u8> {
    geneve_frame6_of(from, &inner.build(), svc)
}

/// [`geneve_frame6`] of a frame already built.
pub fn geneve_frame6_of(from: &str, inner: &[u8], svc: (&str, u16)) -> Vec<u8> {
    let mut payload = vec![0x06, 0, 0x86, 0xdd, 0, 0, 0, 0, 0xff, 0x7b, 0x01, 0x05];
    payload.extend_from_slice(&ip6(svc.0).octets());
    payload.extend_from_slice(&svc.1.to_be_bytes());
    payload.extend_from_slice(&[0, 0]);
    payload.extend_from_slice(&inner[14..]);
    let iph = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: (8 + payload.len()) as u16,
        next_header: IpNumber::UDP,
        hop_limit: 64,
        source: ip6(from).octets(),
        destination: inner[14 + 24..14 + 40].try_into().unwrap(),
    };
    let mut udp = UdpHeader {
        source_port: 0xc123,
        destination_port: proxy_common::dsr::GENEVE_PORT,
        length: (8 + payload.len()) as u16,
        checksum: 0,
    };
    udp.checksum = udp.calc_checksum_ipv6(&iph, &payload).unwrap();
    let mut out = inner[..14].to_vec();
    iph.write(&mut out).unwrap();
    udp.write(&mut out).unwrap();
    out.extend_from_slice(&payload);
    out
}
