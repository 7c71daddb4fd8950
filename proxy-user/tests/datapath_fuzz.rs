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

#[test]
#[ignore = "needs root"]
fn generated_and_mutated_frames_pass_drop_or_translate_well_formed() {
    let seed: u64 = std::env::var("KPX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b70_7866_757a_7a31);
    let frames: usize = std::env::var("KPX_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let mut dp = datapath();
    cluster(&mut dp);
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
        for ((frame, egress), out) in batch.iter().zip(run_batch(&mut dp, &batch)) {
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
}
