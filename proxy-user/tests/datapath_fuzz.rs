//! In-kernel fuzz: generated and mutated frames (every header field,
//! lengths, IP options, fragments, ICMP errors quoting other packets)
//! through `BPF_PROG_TEST_RUN` of the ingress and egress programs, on a
//! populated service table. Every output is the input unchanged, a drop, or
//! a translation into a well-formed frame: valid IPv4 and L4 (or ICMP)
//! checksums, consistent lengths, and addresses kpx may write (the VIP, a
//! backend, the node, or the flow's own). Seeded and repeatable:
//! `KPX_FUZZ_SEED` and `KPX_FUZZ_FRAMES` replay or lengthen a run; the seed
//! is printed on failure.

mod support;

use std::net::Ipv4Addr;

use etherparse::{Icmpv4Type, IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use support::*;

/// xorshift64*: small, seedable, enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

const ADDRS: [&str; 7] = [CLIENT, VIP, B1, B2, B3, "198.18.0.1", "198.18.9.9"];
const PORTS: [u16; 6] = [80, 53, 8080, 5353, 40000, 1];

/// A well-formed frame of a kind kpx handles, before any mutation.
fn base(rng: &mut Rng) -> Vec<u8> {
    let (src, dst) = (*rng.pick(&ADDRS), *rng.pick(&ADDRS));
    let (sport, dport) = (*rng.pick(&PORTS), *rng.pick(&PORTS));
    let l4 = *rng.pick(&[SYN, ACK, SYN_ACK, FIN_ACK, UDP, L4::Udp { zero_csum: true }]);
    let mut p = Pkt::new(src, sport, dst, dport, l4);
    p.ttl = rng.below(3) as u8 * 63 + 1;
    if rng.below(8) == 0 {
        // IP options (NOPs and an end), which make the header longer.
        p.ip_options = vec![1; 4 * (1 + rng.below(3) as usize)];
    }
    let frame = p.build();
    if rng.below(6) == 0 {
        // An ICMP error quoting this packet, sent the other way.
        let kind = rng
            .pick(&[
                Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
                Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1200,
                    },
                ),
                Icmpv4Type::TimeExceeded(
                    etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
                ),
            ])
            .clone();
        let quote_len = (28 + rng.below(24) as usize).min(frame.len() - 14);
        return icmp_error(dst, src, kind, &frame[14..14 + quote_len]);
    }
    frame
}

/// Mutates header bytes, lengths and flags, or the frame's length.
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.below(4) {
        match rng.below(8) {
            // Any byte of the Ethernet, IP and L4 headers.
            0 | 1 => {
                let i = rng.below(f.len().min(14 + 60 + 20) as u64) as usize;
                f[i] = rng.next() as u8;
            }
            // A field kpx reads: version/IHL, total length, flags and
            // fragment offset, protocol, TCP data offset and flags.
            2 => {
                let i = *rng.pick(&[14, 16, 17, 20, 21, 23, 14 + 20 + 12, 14 + 20 + 13]);
                if i < f.len() {
                    f[i] = rng.next() as u8;
                }
            }
            // Truncated anywhere past 54 bytes: test_run refuses a frame
            // shorter than its EtherType's L3 header (IPv6: 40 bytes), and
            // Ethernet pads real frames to 60 anyway. Shorter IP lengths
            // come from the total-length mutations.
            3 => {
                let n = 54 + rng.below(f.len().saturating_sub(54) as u64 + 1) as usize;
                f.truncate(n);
            }
            // Trailing garbage (a frame longer than its IP length).
            4 => f.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            // A fragment: more-fragments, or an offset.
            5 if f.len() > 21 => f[20] |= if rng.below(2) == 0 { 0x20 } else { 0x01 },
            // Not IPv4 (ARP, IPv6, VLAN).
            6 if f.len() > 13 => {
                let t = *rng.pick(&[[0x08, 0x06], [0x86, 0xdd], [0x81, 0x00]]);
                f[12..14].copy_from_slice(&t);
            }
            _ => {}
        }
    }
    f
}

/// The checksums of an IPv4 frame: (IPv4 header valid, L4 or ICMP valid);
/// None where the frame does not parse that far.
fn checksums(frame: &[u8]) -> (Option<bool>, Option<bool>) {
    let Some(Ok((iph, rest))) = frame.get(14..).map(Ipv4Header::from_slice) else {
        return (None, None);
    };
    let ip_ok = Some(iph.header_checksum == iph.calc_header_checksum());
    let Some(body) = (iph.total_len as usize)
        .checked_sub(iph.header_len())
        .and_then(|n| rest.get(..n))
    else {
        return (ip_ok, None);
    };
    if iph.is_fragmenting_payload() {
        return (ip_ok, None);
    }
    let l4 = match iph.protocol {
        IpNumber::TCP => TcpHeader::from_slice(body)
            .ok()
            .map(|(th, p)| th.calc_checksum_ipv4(&iph, p).ok() == Some(th.checksum)),
        IpNumber::UDP => UdpHeader::from_slice(body).ok().map(|(uh, p)| {
            let p = &p[..(uh.length as usize).saturating_sub(8).min(p.len())];
            uh.checksum == 0 || uh.calc_checksum_ipv4(&iph, p).ok() == Some(uh.checksum)
        }),
        IpNumber::ICMP => etherparse::Icmpv4Header::from_slice(body)
            .ok()
            .map(|(icmp, q)| {
                icmp.checksum
                    == etherparse::Icmpv4Header::with_checksum(icmp.icmp_type.clone(), q).checksum
            }),
        _ => None,
    };
    (ip_ok, l4)
}

/// Why a translated frame is not well formed, if it is not. Checksums are
/// updated incrementally, as netfilter's NAT does: a valid one stays valid
/// and a corrupted one stays corrupted (kpx must not launder a damaged
/// packet into a valid one); a reply kpx generates (REJECT) is always
/// valid.
fn malformed(input: &[u8], out: &[u8]) -> Option<String> {
    // What kpx may write: the service's and the node's addresses, or an
    // address the packet already carried.
    let mut known: Vec<Ipv4Addr> = ADDRS.iter().map(|a| ip(a)).collect();
    if let Ok((i, _)) = Ipv4Header::from_slice(&input[14..]) {
        known.extend([Ipv4Addr::from(i.source), Ipv4Addr::from(i.destination)]);
    }
    if out.len() < 14 + 20 || out[12..14] != [0x08, 0x00] {
        return Some("translated into something that is not IPv4".into());
    }
    let iph = match Ipv4Header::from_slice(&out[14..]) {
        Ok((iph, _)) => iph,
        Err(e) => return Some(format!("IPv4 header: {e}")),
    };
    for a in [iph.source, iph.destination] {
        if !known.contains(&Ipv4Addr::from(a)) {
            return Some(format!("address {} kpx never writes", Ipv4Addr::from(a)));
        }
    }
    if (iph.total_len as usize) > out.len() - 14 {
        return Some("IPv4 total length beyond the frame".into());
    }
    let (ip_in, l4_in) = checksums(input);
    let (ip_out, l4_out) = checksums(out);
    let generated = iph.protocol == IpNumber::ICMP && ip_in.is_some() && {
        let (i, _) = Ipv4Header::from_slice(&input[14..]).ok()?;
        i.protocol != IpNumber::ICMP
    };
    if ip_out != Some(true) && (generated || ip_in == Some(true)) {
        return Some("IPv4 header checksum".into());
    }
    match (generated, l4_in, l4_out) {
        (true, _, Some(true)) => None,
        (true, _, _) => Some("the generated ICMP error's checksum".into()),
        (false, Some(a), Some(b)) if a != b => Some(format!(
            "L4 checksum {} by the translation",
            if a { "broken" } else { "laundered" }
        )),
        (false, Some(_), None) => Some("translated L4 header no longer parses".into()),
        _ => None,
    }
}

/// Runs `KPX_FUZZ_FRAMES` frames (100,000 by default) made by `base`,
/// three in four mutated by `mutate`, through the ingress or egress program
/// of `dp`; every output must be the input, a drop, or a translation
/// `malformed` finds nothing wrong with. Returns (unchanged, dropped,
/// translated).
fn fuzz(
    default_seed: u64,
    dp: &mut kpx::dataplane::maps::Datapath,
    base: fn(&mut Rng) -> Vec<u8>,
    mutate: fn(&mut Rng, Vec<u8>) -> Vec<u8>,
    malformed: fn(&[u8], &[u8]) -> Option<String>,
) -> (u64, u64, u64) {
    let seed: u64 = std::env::var("KPX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed);
    let frames: usize = std::env::var("KPX_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let mut rng = Rng(seed | 1);
    let (mut passed, mut dropped, mut translated) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for chunk in 0..frames.div_ceil(1000) {
        let batch: Vec<(Vec<u8>, bool)> = (0..1000.min(frames - chunk * 1000))
            .map(|_| {
                let f = base(&mut rng);
                let f = if rng.below(4) == 0 {
                    f
                } else {
                    mutate(&mut rng, f)
                };
                (f, rng.below(4) == 0)
            })
            .collect();
        for ((frame, egress), out) in batch.iter().zip(run_batch(dp, &batch)) {
            if out.verdict == TC_ACT_SHOT {
                dropped += 1;
            } else if out.bytes == *frame {
                passed += 1;
            } else if let Some(why) = malformed(frame, &out.bytes) {
                failures.push(format!(
                    "{why} (egress {egress}, verdict {})\n  in  {frame:02x?}\n  out {:02x?}",
                    out.verdict, out.bytes
                ));
            } else {
                translated += 1;
            }
        }
        assert!(
            failures.is_empty(),
            "seed {seed}: {} malformed outputs, first:\n{}",
            failures.len(),
            failures[0]
        );
    }
    eprintln!(
        "fuzz, seed {seed}: {frames} frames: {passed} unchanged, {dropped} dropped, {translated} translated, 0 malformed"
    );
    assert!(
        translated > 0 && dropped > 0 && passed > 0,
        "the fuzz must reach every outcome"
    );
    (passed, dropped, translated)
}

#[test]
#[ignore = "needs root"]
fn generated_and_mutated_frames_pass_drop_or_translate_well_formed() {
    let mut dp = datapath();
    cluster(&mut dp);
    fuzz(0x6b70_7866_757a_7a31, &mut dp, base, mutate, malformed);
}

// IPv6: the same, for IPv6's programs.

use std::net::Ipv6Addr;

use etherparse::{Icmpv6Header, Icmpv6Type, Ipv6Header};
use support::v6::*;

const EMPTY_VIP6: &str = "2001:2:0:ff::12";
const ADDRS6: [&str; 8] = [
    CLIENT6,
    VIP6,
    B6_1,
    B6_2,
    B6_3,
    EMPTY_VIP6,
    "2001:2:0:fe::1",
    "2001:2:0:9::9",
];

/// A well-formed IPv6 frame of a kind kpx handles: TCP or UDP, maybe
/// behind extension headers, or an ICMPv6 error quoting one.
fn base6(rng: &mut Rng) -> Vec<u8> {
    let (src, dst) = (*rng.pick(&ADDRS6), *rng.pick(&ADDRS6));
    let (sport, dport) = (*rng.pick(&PORTS), *rng.pick(&PORTS));
    let l4 = *rng.pick(&[SYN, ACK, SYN_ACK, FIN_ACK, UDP]);
    let mut p = Pkt6::new(src, sport, dst, dport, l4);
    p.hop_limit = rng.below(3) as u8 * 63 + 1;
    for _ in 0..rng.below(3) {
        p.ext.push(match rng.below(4) {
            0 => Ext::options(0, 1 + rng.below(2) as u8),
            1 => Ext::options(60, 1),
            2 => Ext::fragment(rng.below(2) as u16 * 8, rng.below(2) == 0),
            _ => Ext {
                kind: 43,
                body: vec![0, 0, rng.below(2) as u8, 0, 0, 0, 0],
            },
        });
    }
    let frame = p.build();
    if rng.below(6) == 0 {
        let kind = *rng.pick(&[
            Icmpv6Type::PacketTooBig { mtu: 1280 },
            Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port),
            Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded),
        ]);
        let quote_len = (48 + rng.below(40) as usize).min(frame.len() - 14);
        return icmp6_error_frame(dst, src, kind, &frame[14..14 + quote_len]);
    }
    frame
}

fn icmp6_error_frame(src: &str, dst: &str, kind: Icmpv6Type, quote: &[u8]) -> Vec<u8> {
    let (s, d) = (ip6(src).octets(), ip6(dst).octets());
    let icmp = Icmpv6Header::with_checksum(kind, s, d, quote).expect("icmpv6");
    let iph = Ipv6Header {
        traffic_class: 0,
        flow_label: etherparse::Ipv6FlowLabel::ZERO,
        payload_length: (icmp.header_len() + quote.len()) as u16,
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: s,
        destination: d,
    };
    let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    iph.write(&mut out).expect("ipv6");
    icmp.write(&mut out).expect("icmpv6");
    out.extend_from_slice(quote);
    out
}

/// Mutates IPv6 header bytes, lengths, extension headers, or the frame's
/// length.
fn mutate6(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.below(4) {
        match rng.below(7) {
            0 | 1 => {
                let i = rng.below(f.len().min(14 + 40 + 24 + 20) as u64) as usize;
                f[i] = rng.next() as u8;
            }
            // Fields kpx reads: version, payload length, next header, the
            // first extension header's next header and length, TCP flags.
            2 => {
                let i = *rng.pick(&[14, 18, 19, 20, 54, 55, 54 + 13]);
                if i < f.len() {
                    f[i] = rng.next() as u8;
                }
            }
            3 => {
                let n = 54 + rng.below(f.len().saturating_sub(54) as u64 + 1) as usize;
                f.truncate(n);
            }
            4 => f.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            5 if f.len() > 13 => {
                let t = *rng.pick(&[[0x08, 0x00], [0x08, 0x06], [0x81, 0x00]]);
                f[12..14].copy_from_slice(&t);
            }
            _ => {}
        }
    }
    f
}

/// An IPv6 frame's transport: (protocol, its bytes) past the extension
/// headers, None where it does not parse that far.
fn transport6(frame: &[u8]) -> Option<(Ipv6Header, u8, &[u8])> {
    let (iph, rest) = Ipv6Header::from_slice(frame.get(14..)?).ok()?;
    let mut rest = rest.get(..iph.payload_length as usize)?;
    let mut next = iph.next_header.0;
    while matches!(next, 0 | 43 | 44 | 60) {
        let len = if next == 44 {
            8
        } else {
            (*rest.get(1)? as usize + 1) * 8
        };
        next = *rest.first()?;
        rest = rest.get(len..)?;
    }
    Some((iph, next, rest))
}

/// Whether an IPv6 frame's transport (or ICMPv6) checksum is valid; None
/// where it does not parse that far.
fn checksum6(frame: &[u8]) -> Option<bool> {
    let (iph, next, l4) = transport6(frame)?;
    let (s, d) = (iph.source, iph.destination);
    match next {
        6 => TcpHeader::from_slice(l4)
            .ok()
            .map(|(th, p)| th.calc_checksum_ipv6_raw(s, d, p).ok() == Some(th.checksum)),
        17 => UdpHeader::from_slice(l4).ok().map(|(uh, p)| {
            let p = &p[..(uh.length as usize).saturating_sub(8).min(p.len())];
            uh.calc_checksum_ipv6_raw(s, d, p).ok() == Some(uh.checksum)
        }),
        58 => Icmpv6Header::from_slice(l4).ok().map(|(icmp, q)| {
            Icmpv6Header::with_checksum(icmp.icmp_type, s, d, q)
                .map(|h| h.checksum == icmp.checksum)
                .unwrap_or(false)
        }),
        _ => None,
    }
}

/// Why a translated IPv6 frame is not well formed, if it is not (as
/// [`malformed`] for IPv4).
fn malformed6(input: &[u8], out: &[u8]) -> Option<String> {
    let mut known: Vec<Ipv6Addr> = ADDRS6.iter().map(|a| ip6(a)).collect();
    if let Ok((i, _)) = Ipv6Header::from_slice(&input[14..]) {
        known.extend([Ipv6Addr::from(i.source), Ipv6Addr::from(i.destination)]);
    }
    if out.len() < 14 + 40 || out[12..14] != [0x86, 0xdd] {
        return Some("translated into something that is not IPv6".into());
    }
    let iph = match Ipv6Header::from_slice(&out[14..]) {
        Ok((iph, _)) => iph,
        Err(e) => return Some(format!("IPv6 header: {e}")),
    };
    for a in [iph.source, iph.destination] {
        if !known.contains(&Ipv6Addr::from(a)) {
            return Some(format!("address {} kpx never writes", Ipv6Addr::from(a)));
        }
    }
    if 14 + 40 + iph.payload_length as usize > out.len() {
        return Some("IPv6 payload length beyond the frame".into());
    }
    let generated = transport6(out).is_some_and(|(_, n, _)| n == 58)
        && transport6(input).is_some_and(|(_, n, _)| n != 58);
    let (before, after) = (checksum6(input), checksum6(out));
    match (generated, before, after) {
        (true, _, Some(true)) => None,
        (true, _, _) => Some("the generated ICMPv6 error's checksum".into()),
        (false, Some(a), Some(b)) if a != b => Some(format!(
            "checksum {} by the translation",
            if a { "broken" } else { "laundered" }
        )),
        (false, Some(_), None) => Some("translated transport header no longer parses".into()),
        _ => None,
    }
}

#[test]
#[ignore = "needs root"]
fn generated_and_mutated_ipv6_frames_pass_drop_or_translate_well_formed() {
    let mut dp = datapath();
    cluster6(&mut dp);
    install_service(&mut dp, 23, EMPTY_VIP6, 80, proxy_common::IPPROTO_TCP, &[]);
    dp.maps
        .write(&kpx::dataplane::reconcile::Op::PutNodeAddr(
            ip6("2001:2:0:fe::1").into(),
            proxy_common::NODE_F_LOCAL,
        ))
        .unwrap();
    // A frame mutated into IPv4 is the IPv4 fuzz's business, but it must
    // come out well formed too.
    fuzz(
        0x6b70_7866_757a_7a36,
        &mut dp,
        base6,
        mutate6,
        |input, out| {
            if input[12..14] == [0x86, 0xdd] {
                malformed6(input, out)
            } else {
                malformed(input, out)
            }
        },
    );
}
