//! Parse: Ethernet → IPv4 or IPv6 (its extension headers skipped) → TCP/UDP
//! ports, with every offset computed here once.
//!
//! Headers are read with direct packet access, every read bounds-checked
//! against the linear data (`ptr_at`), so a truncated packet is malformed,
//! never an out-of-bounds read.

use proxy_common::{CtKey, In6, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::packet::Packet;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

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

/// IPv6 header fields kpx reads and writes, from the IP header.
pub mod ip6 {
    pub const HLEN: usize = 40;
    pub const HOP_LIMIT: usize = 7;
    /// Extension headers skipped on the way to the transport header.
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTS: u8 = 60;
    /// At most this many extension headers are skipped; a longer chain is
    /// malformed as far as kpx is concerned (passed, or dropped towards a
    /// service address).
    pub const MAX_EXT: usize = 4;
}

/// The fixed IPv6 header, fields raw (network byte order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr: In6,
    pub daddr: In6,
}

/// A parsed IPv4 packet.
pub type Ipv4Packet = IpPacket<u32>;

/// A parsed IP packet whose addresses and ports the datapath may rewrite:
/// IPv4 (`A` = `u32`) or IPv6 (`In6`). `repr(C)`: IPv6's lies in a pinned
/// map (`KPX_SCRATCH6`), shared by programs of different builds.
#[repr(C)]
pub struct IpPacket<A> {
    pub l3_off: usize,
    pub l4_off: usize,
    /// End of the IP datagram (`l3_off + tot_len`); padding may follow.
    pub end: usize,
    /// IPv6's traffic class and flow label as they lie in the header's
    /// first word (0 for IPv4). Before the addresses: IPv6's then lie at
    /// offsets 4 past a multiple of 8, where no load or store of them can
    /// be merged into 8-byte ones (see [`crate::maps::Scratch6`]).
    pub flowinfo: u32,
    /// Addresses and ports raw, in network byte order.
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// TTL, or IPv6's hop limit.
    pub ttl: u8,
    pub tos: u8,
    /// The IPv4 header checksum as it was read (0 for IPv6).
    pub ip_check: u16,
}

impl<A: Copy> IpPacket<A> {
    #[inline(always)]
    pub fn tuple(&self) -> CtKey<A> {
        CtKey::for_lookup(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// [`IpPacket::tuple`] written into `key` where it lies.
    #[inline(always)]
    pub fn tuple_into(&self, key: &mut CtKey<A>) {
        key.set_for_lookup(self.src, self.dst, self.sport, self.dport, self.proto);
    }

    /// A TCP segment that may open a connection: SYN, without ACK, RST or
    /// FIN (false for UDP, whose flags are 0).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }

    /// The IP datagram's length (IPv4's `tot_len`; IPv6's header, its
    /// extension headers and payload).
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

/// What [`parse_ipv4`] found (IPv6's parse writes its packet in place
/// and says what it found with a [`Kind`]).
pub enum Parsed {
    /// Not IPv4 nor IPv6 (ARP, VLAN-tagged, ...): not ours.
    NotHandled,
    /// An IPv6 packet: for IPv6's own program.
    OtherFamily,
    /// Lengths or header fields are inconsistent or truncated. `dst` is the
    /// destination when it could be read, else 0.
    Malformed { dst: u32 },
    /// A fragment: only the first carries ports, so none can be translated alone.
    Fragment { dst: u32 },
    /// A well-formed, unfragmented packet. `sport`/`dport` are 0 unless
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

/// The packet [`crate::family::sort4`] found plain, from the IPv4 header
/// it read and checked (no options, the total length inside the packet,
/// TCP or UDP). What is left to check is the transport header's own
/// length; None if it is wrong or beyond the linear data (the whole parse
/// then decides).
#[inline(always)]
pub fn plain4<P: Packet>(ctx: &P, iph: &Ipv4Hdr) -> Option<Ipv4Packet> {
    let mut pkt = packet4(iph, 20);
    let l4_len = u16::from_be(iph.tot_len) as usize - 20;
    match transport(&Direct(ctx), &mut pkt, l4_len) {
        Ok(Kind::Packet) => Some(pkt),
        _ => None,
    }
}

/// The packet of IPv4 header `iph` (`ihl` bytes) after the Ethernet
/// header, its transport header not read yet.
#[inline(always)]
fn packet4(iph: &Ipv4Hdr, ihl: usize) -> Ipv4Packet {
    Ipv4Packet {
        l3_off: ETH_HLEN,
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + u16::from_be(iph.tot_len) as usize,
        flowinfo: 0,
        src: iph.saddr,
        dst: iph.daddr,
        sport: 0,
        dport: 0,
        proto: iph.proto,
        tcp_flags: 0,
        ttl: iph.ttl,
        tos: iph.tos,
        ip_check: iph.check,
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
    let eth_proto = u16::from_be(eth_proto);
    if eth_proto != ETH_P_IP {
        return Ok(if eth_proto == ETH_P_IPV6 {
            Parsed::OtherFamily
        } else {
            Parsed::NotHandled
        });
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
        tot_len,
        frag_off,
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
    let l4_len = tot_len - ihl;
    let mut pkt = packet4(&iph, ihl);
    Ok(match transport(b, &mut pkt, l4_len)? {
        Kind::Packet => Parsed::Packet(pkt),
        _ => Parsed::Malformed { dst },
    })
}

/// What a parse found, its packet written in place ([`parse_ipv6`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not IPv6 (IPv4 included), or a protocol kpx does not see past.
    NotHandled,
    /// As [`Parsed::Malformed`]: the destination is the packet's `dst`
    /// when it could be read, else zero.
    Malformed,
    /// As [`Parsed::Fragment`], the destination in `dst`.
    Fragment,
    /// As [`Parsed::Packet`].
    Packet,
}

/// The TCP or UDP header of `pkt` (`l4_len` bytes of transport header and
/// payload): its ports and flags, checked, written into `pkt`.
#[inline(always)]
fn transport<B: Bytes, A: Copy>(
    b: &B,
    pkt: &mut IpPacket<A>,
    l4_len: usize,
) -> Result<Kind, Short> {
    let l4_off = pkt.l4_off;
    match pkt.proto {
        IPPROTO_TCP => {
            if l4_len < l4::TCP_MIN_LEN {
                return Ok(Kind::Malformed);
            }
            // sport, dport, seq, ack, data offset, flags.
            let th = match b.get::<[u8; 14]>(l4_off) {
                Ok(th) => th,
                Err(Short::End) => return Ok(Kind::Malformed),
                Err(e) => return Err(e),
            };
            let doff = ((th[12] >> 4) as usize) * 4;
            if doff < l4::TCP_MIN_LEN || doff > l4_len {
                return Ok(Kind::Malformed);
            }
            pkt.sport = u16::from_ne_bytes([th[0], th[1]]);
            pkt.dport = u16::from_ne_bytes([th[2], th[3]]);
            pkt.tcp_flags = th[l4::TCP_FLAGS];
        }
        IPPROTO_UDP => {
            if l4_len < l4::UDP_LEN {
                return Ok(Kind::Malformed);
            }
            // sport, dport, length, checksum.
            let uh = match b.get::<[u16; 4]>(l4_off) {
                Ok(uh) => uh,
                Err(Short::End) => return Ok(Kind::Malformed),
                Err(e) => return Err(e),
            };
            let ulen = u16::from_be(uh[2]) as usize;
            if ulen < l4::UDP_LEN || ulen > l4_len {
                return Ok(Kind::Malformed);
            }
            pkt.sport = uh[0];
            pkt.dport = uh[1];
        }
        _ => {}
    }
    Ok(Kind::Packet)
}

/// As [`parse_ipv4`], for IPv6, the packet written into `out` as it is
/// parsed (IPv6's addresses held in registers through the parse were
/// spilled, and the path's stack is short): the extension headers
/// (hop-by-hop, routing, destination options, fragment) skipped to the
/// transport header, at most [`ip6::MAX_EXT`] of them. A fragment (offset
/// or more-fragments set) is a [`Kind::Fragment`]; an atomic fragment
/// (neither) an ordinary packet (RFC 6946). A routing header with segments
/// left names another final destination than the one in the header:
/// malformed for kpx, which would otherwise translate by an address the
/// packet is not for.
#[inline(always)]
pub fn parse_ipv6<P: Packet>(ctx: &P, out: &mut IpPacket<In6>) -> Kind {
    parse6::<P, false>(ctx, out)
}

/// [`parse_ipv6`] for a packet tc ingress's (and XDP's) entry sorted as
/// plain ([`crate::family::sort6`] checked its version, that TCP or UDP
/// follows the fixed header and that its payload lies inside the packet):
/// no Ethernet type to check again, no extension header to look for.
#[inline(always)]
pub fn parse_plain6<P: Packet>(ctx: &P, out: &mut IpPacket<In6>) -> Kind {
    parse6::<P, true>(ctx, out)
}

#[inline(always)]
fn parse6<P: Packet, const PLAIN: bool>(ctx: &P, out: &mut IpPacket<In6>) -> Kind {
    match parse6_from::<_, PLAIN>(&Direct(ctx), ctx.len() as usize, out) {
        Err(Short::NonLinear) => parse6_from::<_, PLAIN>(&Copied(ctx), ctx.len() as usize, out)
            .unwrap_or(Kind::NotHandled),
        Ok(k) => k,
        Err(Short::End) => Kind::NotHandled,
    }
}

#[inline(always)]
fn parse6_from<B: Bytes, const PLAIN: bool>(
    b: &B,
    len: usize,
    out: &mut IpPacket<In6>,
) -> Result<Kind, Short> {
    if !PLAIN {
        out.dst = [0; 4];
        let eth_proto = match b.get::<u16>(12) {
            Ok(p) => p,
            Err(Short::End) => return Ok(Kind::NotHandled),
            Err(e) => return Err(e),
        };
        if u16::from_be(eth_proto) != ETH_P_IPV6 {
            return Ok(Kind::NotHandled);
        }
    }
    let l3_off = ETH_HLEN;
    let h = match b.get::<Ipv6Hdr>(l3_off) {
        Ok(h) => h,
        Err(Short::End) => return Ok(Kind::Malformed),
        Err(e) => return Err(e),
    };
    out.dst = h.daddr;
    let end = l3_off + ip6::HLEN + u16::from_be(h.payload_len) as usize;
    // (A jumbogram's payload length is 0: its TCP or UDP header is then
    // short, malformed here.) The end is checked again for a plain one:
    // the bound the transport header's length is taken from.
    if (!PLAIN && u32::from_be(h.vtc_flow) >> 28 != 6) || end > len {
        return Ok(Kind::Malformed);
    }
    out.src = h.saddr;
    out.l3_off = l3_off;
    out.end = end;
    out.ttl = h.hop_limit;
    out.tos = (u32::from_be(h.vtc_flow) >> 20) as u8;
    out.ip_check = 0;
    out.flowinfo = h.vtc_flow & 0x0fff_ffffu32.to_be();
    out.sport = 0;
    out.dport = 0;
    out.tcp_flags = 0;
    let mut next = h.next_hdr;
    let mut off = l3_off + ip6::HLEN;
    // (A plain packet has no extension header to skip.)
    if !PLAIN {
        for _ in 0..ip6::MAX_EXT {
            match next {
                ip6::HOP_BY_HOP | ip6::ROUTING | ip6::DEST_OPTS | ip6::FRAGMENT => {}
                _ => break,
            }
            // Next header, length, then 6 bytes: a routing header's type and
            // segments left; a fragment header's offset and flags.
            let ext = match b.get::<[u8; 8]>(off) {
                Ok(e) => e,
                Err(Short::End) => return Ok(Kind::Malformed),
                Err(e) => return Err(e),
            };
            let ext_len = if next == ip6::FRAGMENT {
                let frag = u16::from_be_bytes([ext[2], ext[3]]);
                // Offset (13 bits) or M: a real fragment.
                if frag & 0xfff9 != 0 {
                    return Ok(Kind::Fragment);
                }
                8
            } else {
                if next == ip6::ROUTING && ext[3] != 0 {
                    return Ok(Kind::Malformed);
                }
                (ext[1] as usize + 1) * 8
            };
            next = ext[0];
            off += ext_len;
            if off > end {
                return Ok(Kind::Malformed);
            }
        }
        if matches!(
            next,
            ip6::HOP_BY_HOP | ip6::ROUTING | ip6::DEST_OPTS | ip6::FRAGMENT
        ) {
            // A chain longer than kpx follows.
            return Ok(Kind::Malformed);
        }
    }
    out.proto = next;
    out.l4_off = off;
    transport(b, out, end - off)
}
