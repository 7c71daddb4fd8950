//! Parse: Ethernet → IPv4 → TCP/UDP ports, with every offset computed here once.
//!
//! Headers are read with direct packet access, every read bounds-checked
//! against the linear data (`ptr_at`), so a truncated packet is malformed,
//! never an out-of-bounds read.

use proxy_common::{CtKey, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::packet::Packet;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;

/// IPv4 header fields kpx reads, at fixed offsets from the IP header.
pub mod ip {
    /// TTL, protocol, checksum, source, destination: the part a translation
    /// rewrites, written back as one block.
    pub const TTL: usize = 8;
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
    pub ttl: u8,
    pub tos: u8,
    /// The IPv4 header checksum as it was read.
    pub ip_check: u16,
}

impl Ipv4Packet {
    #[inline(always)]
    pub fn tuple(&self) -> CtKey {
        CtKey::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// A TCP segment that may open a connection: SYN, without ACK, RST or
    /// FIN (false for UDP, whose flags are 0).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }

    /// The IP datagram's length (`tot_len`).
    #[inline(always)]
    pub fn ip_len(&self) -> u16 {
        (self.end - self.l3_off) as u16
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

/// A bounds-checked pointer to a `T` at `off` of the linear data.
#[inline(always)]
fn ptr_at<P: Packet, T>(ctx: &P, off: usize) -> Option<*const T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Reads a `T` at `off` of the linear data; None beyond it.
#[inline(always)]
pub fn read_linear<P: Packet, T: Copy>(ctx: &P, off: usize) -> Option<T> {
    Direct(ctx).get::<T>(off).ok()
}

/// Why a header could not be read.
enum Short {
    /// The packet ends first.
    End,
    /// The bytes are there, beyond the skb's linear part.
    NonLinear,
}

/// Where the parse reads headers from.
trait Bytes {
    fn get<T: Copy>(&self, off: usize) -> Result<T, Short>;
}

/// The linear data, by plain loads.
struct Direct<'a, P>(&'a P);

impl<P: Packet> Bytes for Direct<'_, P> {
    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> Result<T, Short> {
        match ptr_at::<P, T>(self.0, off) {
            // SAFETY: `ptr_at` checked that the `T` lies inside the linear
            // data. A header may sit at a 2-byte boundary (x86's
            // NET_IP_ALIGN is 0); packet loads of any alignment are fine for
            // the verifier (no strict alignment on these architectures) and
            // the JIT, where `read_unaligned` would make the BPF backend
            // split every field into byte loads.
            Some(p) => Ok(unsafe { core::ptr::read(p) }),
            None if off + core::mem::size_of::<T>() <= self.0.len() as usize => {
                Err(Short::NonLinear)
            }
            None => Err(Short::End),
        }
    }
}

/// Anywhere in the packet, copied (`bpf_skb_load_bytes` at tc).
struct Copied<'a, P>(&'a P);

impl<P: Packet> Bytes for Copied<'_, P> {
    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> Result<T, Short> {
        self.0.load::<T>(off).map_err(|_| Short::End)
    }
}

/// Parses with direct packet access: plain loads instead of a
/// `bpf_skb_load_bytes` call per header; a packet whose headers reach
/// beyond the linear part (rare: the stack and drivers put them there) is
/// parsed again with copies. Only reads, and never `bpf_skb_pull_data`:
/// kpx writes packets through helpers, because a program that writes
/// packet memory directly (or pulls it) makes the kernel un-clone the skbs
/// it touches, and TCP's transmissions are clones, which would tax traffic
/// that is not for a service. An XDP frame is all linear.
#[inline(always)]
pub fn parse_ipv4<P: Packet>(ctx: &P) -> Parsed {
    match parse_from(&Direct(ctx), ctx.len() as usize) {
        Err(Short::NonLinear) => match parse_from(&Copied(ctx), ctx.len() as usize) {
            Ok(p) => p,
            Err(_) => Parsed::NotHandled,
        },
        Ok(p) => p,
        Err(Short::End) => Parsed::NotHandled,
    }
}

/// Short headers are malformed (`Ok`); `Err` only when a header lies
/// beyond the linear part, for the caller to read again with copies.
#[inline(always)]
fn parse_from<B: Bytes>(b: &B, len: usize) -> Result<Parsed, Short> {
    let eth_proto = match b.get::<u16>(12) {
        Ok(p) => p,
        Err(Short::End) => return Ok(Parsed::NotHandled),
        Err(e) => return Err(e),
    };
    if u16::from_be(eth_proto) != ETH_P_IP {
        return Ok(Parsed::NotHandled);
    }
    let l3_off = ETH_HLEN;
    let iph = match b.get::<Ipv4Hdr>(l3_off) {
        Ok(h) => h,
        // Shorter than an IPv4 header.
        Err(Short::End) => return Ok(Parsed::Malformed { dst: 0 }),
        Err(e) => return Err(e),
    };
    let Ipv4Hdr {
        version_ihl,
        tos,
        tot_len,
        frag_off,
        ttl,
        proto,
        check: ip_check,
        saddr: src,
        daddr: dst,
        ..
    } = iph;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(tot_len) as usize;
    if version_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || l3_off + tot_len > len {
        return Ok(Parsed::Malformed { dst });
    }
    if u16::from_be(frag_off) & (IP_MF | IP_OFFSET) != 0 {
        return Ok(Parsed::Fragment { dst });
    }
    let l4_off = l3_off + ihl;
    let l4_len = tot_len - ihl;
    let mut pkt = Ipv4Packet {
        l3_off,
        l4_off,
        end: l3_off + tot_len,
        src,
        dst,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        ttl,
        tos,
        ip_check,
    };
    match proto {
        IPPROTO_TCP => {
            if l4_len < l4::TCP_MIN_LEN {
                return Ok(Parsed::Malformed { dst });
            }
            // sport, dport, seq, ack, data offset, flags.
            let th = match b.get::<[u8; 14]>(l4_off) {
                Ok(th) => th,
                Err(Short::End) => return Ok(Parsed::Malformed { dst }),
                Err(e) => return Err(e),
            };
            let doff = ((th[12] >> 4) as usize) * 4;
            if doff < l4::TCP_MIN_LEN || doff > l4_len {
                return Ok(Parsed::Malformed { dst });
            }
            pkt.sport = u16::from_ne_bytes([th[0], th[1]]);
            pkt.dport = u16::from_ne_bytes([th[2], th[3]]);
            pkt.tcp_flags = th[l4::TCP_FLAGS];
        }
        IPPROTO_UDP => {
            if l4_len < l4::UDP_LEN {
                return Ok(Parsed::Malformed { dst });
            }
            // sport, dport, length, checksum.
            let uh = match b.get::<[u16; 4]>(l4_off) {
                Ok(uh) => uh,
                Err(Short::End) => return Ok(Parsed::Malformed { dst }),
                Err(e) => return Err(e),
            };
            let ulen = u16::from_be(uh[2]) as usize;
            if ulen < l4::UDP_LEN || ulen > l4_len {
                return Ok(Parsed::Malformed { dst });
            }
            pkt.sport = uh[0];
            pkt.dport = uh[1];
        }
        _ => {}
    }
    Ok(Parsed::Packet(pkt))
}
