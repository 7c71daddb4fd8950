//! Parse: Ethernet → IPv4 → TCP/UDP ports, with every offset computed here once.
//!
//! Headers are read with `bpf_skb_load_bytes` rather than direct packet
//! access: it sees non-linear skbs too, and bounds are the helper's job, so a
//! truncated packet is an `Err`, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use proxy_common::{CtKey, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

/// IPv4 header fields kpx reads, at fixed offsets from the IP header.
pub mod ip {
    pub const CSUM: usize = 10;
    pub const SADDR: usize = 12;
    pub const DADDR: usize = 16;
}

/// Offsets inside the TCP or UDP header.
pub mod l4 {
    pub const SPORT: usize = 0;
    pub const DPORT: usize = 2;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CSUM: usize = 16;
    pub const UDP_CSUM: usize = 6;
    pub const TCP_MIN_LEN: usize = 20;
    pub const UDP_LEN: usize = 8;
}

/// The fixed part of an IPv4 header, fields raw (network byte order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

/// A parsed IPv4 packet whose addresses and ports the datapath may rewrite.
pub struct Ipv4Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    /// End of the IP datagram (`l3_off + tot_len`); padding may follow.
    pub end: usize,
    /// Addresses and ports raw, in network byte order.
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
}

impl Ipv4Packet {
    pub fn tuple(&self) -> CtKey {
        CtKey {
            src_addr: self.src,
            dst_addr: self.dst,
            src_port: self.sport,
            dst_port: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// Offset of the L4 checksum field.
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == IPPROTO_TCP {
                l4::TCP_CSUM
            } else {
                l4::UDP_CSUM
            }
    }
}

pub enum Parsed {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): not ours.
    NotHandled,
    /// IPv4, but lengths or header fields are inconsistent or truncated.
    /// `dst` is the destination when it could be read, else 0.
    Malformed { dst: u32 },
    /// A fragment: only the first carries ports, so none can be translated alone.
    Fragment { dst: u32 },
    /// A well-formed, unfragmented IPv4 packet. `sport`/`dport` are 0 unless
    /// the protocol is TCP or UDP.
    Packet(Ipv4Packet),
}

#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Parsed {
    let Ok(eth_proto) = ctx.load::<u16>(12) else {
        return Parsed::NotHandled;
    };
    if u16::from_be(eth_proto) != ETH_P_IP {
        return Parsed::NotHandled;
    }
    let l3_off = ETH_HLEN;
    let Ok(iph) = ctx.load::<Ipv4Hdr>(l3_off) else {
        // Shorter than an IPv4 header.
        return Parsed::Malformed { dst: 0 };
    };
    let dst = iph.daddr;
    let ihl = ((iph.version_ihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(iph.tot_len) as usize;
    let wire_len = ctx.len() as usize;
    if iph.version_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || l3_off + tot_len > wire_len {
        return Parsed::Malformed { dst };
    }
    if u16::from_be(iph.frag_off) & (IP_MF | IP_OFFSET) != 0 {
        return Parsed::Fragment { dst };
    }
    let l4_off = l3_off + ihl;
    let l4_len = tot_len - ihl;
    let mut pkt = Ipv4Packet {
        l3_off,
        l4_off,
        end: l3_off + tot_len,
        src: iph.saddr,
        dst,
        sport: 0,
        dport: 0,
        proto: iph.proto,
        tcp_flags: 0,
    };
    match iph.proto {
        IPPROTO_TCP => {
            if l4_len < l4::TCP_MIN_LEN {
                return Parsed::Malformed { dst };
            }
            // sport, dport, seq, ack, data offset, flags.
            let Ok(th) = ctx.load::<[u8; 14]>(l4_off) else {
                return Parsed::Malformed { dst };
            };
            let doff = ((th[12] >> 4) as usize) * 4;
            if doff < l4::TCP_MIN_LEN || doff > l4_len {
                return Parsed::Malformed { dst };
            }
            pkt.sport = u16::from_ne_bytes([th[0], th[1]]);
            pkt.dport = u16::from_ne_bytes([th[2], th[3]]);
            pkt.tcp_flags = th[l4::TCP_FLAGS];
        }
        IPPROTO_UDP => {
            if l4_len < l4::UDP_LEN {
                return Parsed::Malformed { dst };
            }
            // sport, dport, length, checksum.
            let Ok(uh) = ctx.load::<[u16; 4]>(l4_off) else {
                return Parsed::Malformed { dst };
            };
            let ulen = u16::from_be(uh[2]) as usize;
            if ulen < l4::UDP_LEN || ulen > l4_len {
                return Parsed::Malformed { dst };
            }
            pkt.sport = uh[0];
            pkt.dport = uh[1];
        }
        _ => {}
    }
    Parsed::Packet(pkt)
}
