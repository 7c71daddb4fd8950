//! IPv6's datapath in the kernel: BPF_PROG_TEST_RUN on crafted IPv6 frames
//! (addresses from 2001:2::/48), the IPv4 tests' counterparts plus what is
//! IPv6's own: extension headers, ICMPv6 REJECT, neighbour discovery,
//! malformed headers, and IPv4 and IPv6 side by side.

mod support;

use std::net::Ipv6Addr;

use etherparse::{Icmpv6Header, Icmpv6Type, IpNumber, Ipv6FlowLabel, Ipv6Header};
use proxy_common::{
    wire, Counter, DatapathConfig, DropReason, Event, Net6, CT_DIR_ORIGINAL, CT_DIR_REPLY,
    CT_F_REWRITE_DST, CT_F_REWRITE_SRC, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP, NODE_F_LOCAL,
    NODE_F_NODEPORT, SVC_F_EXTERNAL, SVC_F_NODEPORT,
};
use support::{v6::*, *};

const NODE6: &str = "2001:2:0:fe::1";
const OUTSIDE6: &str = "2001:2:0:9::2";

fn backends6() -> [Ipv6Addr; 3] {
    [B6_1, B6_2, B6_3].map(ip6)
}

/// TC_ACT_REDIRECT: a REJECT goes back out where the packet came in.
const REDIRECT: u32 = 7;

#[test]
#[ignore = "needs root"]
fn an_ipv6_syn_to_a_vip_is_dnated_to_a_backend_and_tracked_both_ways() {
    let mut dp = datapath();
    cluster6(&mut dp);

    let out = run(&mut dp, &Pkt6::new(CLIENT6, 40000, VIP6, 80, SYN).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let seen = inspect6(&out.bytes);
    assert_eq!((seen.src, seen.sport), (ip6(CLIENT6), 40000));
    assert!(
        backends6().contains(&seen.dst),
        "{} is no backend",
        seen.dst
    );
    assert_eq!(seen.dport, 8080);

    let ct = &dp.maps.v6.ct.any;
    let orig = ct
        .get(&ct_key6(CLIENT6, 40000, VIP6, 80, IPPROTO_TCP), 0)
        .expect("original entry");
    assert_eq!(orig.dir, CT_DIR_ORIGINAL);
    assert_eq!(orig.flags, CT_F_REWRITE_DST);
    assert_eq!(wire::to_addr6(orig.new_dst_addr), seen.dst);
    assert_eq!(wire::to_port(orig.new_dst_port), 8080);
    assert_eq!(orig.svc_id, 21);
    let reply_key = ct_key6(&seen.dst.to_string(), 8080, CLIENT6, 40000, IPPROTO_TCP);
    let reply = ct.get(&reply_key, 0).expect("reply entry");
    assert_eq!(reply.dir, CT_DIR_REPLY);
    assert_eq!(reply.flags, CT_F_REWRITE_SRC);
    assert_eq!(
        (
            wire::to_addr6(reply.new_src_addr),
            wire::to_port(reply.new_src_port)
        ),
        (ip6(VIP6), 80)
    );
    assert_eq!(reply.backend_id, orig.backend_id);
    assert!(
        dp.maps.ct_entries().is_empty(),
        "IPv4's tables hold IPv6's flow"
    );
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
}

#[test]
#[ignore = "needs root"]
fn ipv6_replies_come_from_the_vip_and_later_packets_stick_to_their_backend() {
    let mut dp = datapath();
    cluster6(&mut dp);

    let first = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 40001, VIP6, 80, SYN).build()).bytes);
    let out = run(&mut dp, &reply6(&first, SYN_ACK));
    assert_eq!(out.verdict, TC_ACT_OK);
    let back = inspect6(&out.bytes);
    assert_eq!((back.src, back.sport), (ip6(VIP6), 80));
    assert_eq!((back.dst, back.dport), (ip6(CLIENT6), 40001));
    // The first reply moved the connection to the established table.
    let established = dp.maps.v6.ct.tcp.keys().filter_map(|k| k.ok()).count();
    assert_eq!(established, 2, "both directions in the established table");
    for _ in 0..20 {
        let out = run(&mut dp, &Pkt6::new(CLIENT6, 40001, VIP6, 80, ACK).build());
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(
            inspect6(&out.bytes),
            first,
            "a later packet changed backend"
        );
    }
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
    assert_eq!(counter(&mut dp, Counter::CtOriginal), 20);
    assert_eq!(counter(&mut dp, Counter::CtReply), 1);
    assert_eq!(packets(&mut dp), 22, "every packet counted exactly once");
    let stats = dp.maps.service_stats(21).unwrap();
    assert_eq!((stats.new_flows, stats.packets), (1, 22));
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_udp_request_and_its_reply_are_translated_with_valid_checksums() {
    let mut dp = datapath();
    cluster6(&mut dp);

    let out = run(&mut dp, &Pkt6::new(CLIENT6, 33333, VIP6, 53, UDP).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let req = inspect6(&out.bytes);
    assert!(backends6().contains(&req.dst));
    assert_eq!(req.dport, 5353);
    let again = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 33333, VIP6, 53, UDP).build()).bytes);
    assert_eq!(again, req, "the flow's second datagram changed backend");
    let out = run(&mut dp, &reply6(&req, UDP));
    assert_eq!(out.verdict, TC_ACT_OK);
    let reply = inspect6(&out.bytes);
    assert_eq!(
        (reply.src, reply.sport, reply.dst, reply.dport),
        (ip6(VIP6), 53, ip6(CLIENT6), 33333)
    );
}

#[test]
#[ignore = "needs root"]
fn extension_headers_before_the_transport_header_are_skipped_and_kept() {
    let mut dp = datapath();
    cluster6(&mut dp);
    for l4 in [SYN, UDP] {
        let dport = if matches!(l4, L4::Udp { .. }) { 53 } else { 80 };
        let mut p = Pkt6::new(CLIENT6, 41000, VIP6, dport, l4);
        p.ext = vec![Ext::options(0, 1), Ext::options(60, 2)];
        let frame = p.build();
        let out = run(&mut dp, &frame);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.bytes.len(), frame.len(), "the headers stay");
        assert_eq!(
            &out.bytes[14 + 40..14 + 40 + 24],
            &frame[14 + 40..14 + 40 + 24],
            "the extension headers are untouched"
        );
        let seen = inspect6(&out.bytes);
        assert!(backends6().contains(&seen.dst));
        assert_eq!((seen.src, seen.sport), (ip6(CLIENT6), 41000));
        assert_eq!(seen.dport, if dport == 53 { 5353 } else { 8080 });
    }
    // A routing header done with (no segments left) is skipped too.
    let mut p = Pkt6::new(CLIENT6, 41001, VIP6, 80, SYN);
    p.ext = vec![Ext {
        kind: 43,
        body: vec![0, 0, 0, 0, 0, 0, 0],
    }];
    assert_eq!(run(&mut dp, &p.build()).verdict, TC_ACT_OK);
}

#[test]
#[ignore = "needs root"]
fn ipv6_fragments_to_a_vip_are_dropped_and_an_atomic_fragment_is_translated() {
    let mut dp = datapath();
    cluster6(&mut dp);
    for (offset, more) in [(0, true), (8, false), (8, true)] {
        let mut p = Pkt6::new(CLIENT6, 42000, VIP6, 53, UDP);
        p.ext = vec![Ext::fragment(offset, more)];
        let frame = p.build();
        let out = run(&mut dp, &frame);
        assert_eq!(
            out.verdict, TC_ACT_SHOT,
            "fragment {offset}/{more} to the VIP"
        );
        // The same fragment to an address no service has passes.
        p.dst = ip6("2001:2:0:77::1");
        let frame = p.build();
        let out = run(&mut dp, &frame);
        assert_eq!(out.verdict, TC_ACT_UNSPEC);
        assert_eq!(out.bytes, frame);
    }
    assert_eq!(drops(&mut dp, DropReason::FragmentToService), 3);
    assert_eq!(counter(&mut dp, Counter::PassFragment), 3);
    // An atomic fragment (offset 0, no more) is a whole packet (RFC 6946).
    let mut p = Pkt6::new(CLIENT6, 42001, VIP6, 53, UDP);
    p.ext = vec![Ext::fragment(0, false)];
    let out = run(&mut dp, &p.build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert!(backends6().contains(&inspect6(&out.bytes).dst));
}

#[test]
#[ignore = "needs root"]
fn malformed_ipv6_is_never_translated_and_never_reaches_a_vip() {
    let mut dp = datapath();
    cluster6(&mut dp);
    let good = Pkt6::new(CLIENT6, 43000, VIP6, 80, SYN).build();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Payload length beyond the frame.
    let mut f = good.clone();
    f[14 + 4..14 + 6].copy_from_slice(&500u16.to_be_bytes());
    cases.push(("payload length beyond the frame", f));
    // A TCP header cut short (payload length says 10 bytes).
    let mut f = good.clone();
    f[14 + 4..14 + 6].copy_from_slice(&10u16.to_be_bytes());
    cases.push(("short TCP header", f));
    // A hop-by-hop header claiming more than the packet holds.
    let mut p = Pkt6::new(CLIENT6, 43000, VIP6, 80, SYN);
    p.ext = vec![Ext::options(0, 1)];
    let mut f = p.build();
    f[14 + 40 + 1] = 40;
    cases.push(("extension header beyond the packet", f));
    // A chain longer than kpx follows.
    let mut p = Pkt6::new(CLIENT6, 43000, VIP6, 80, SYN);
    p.ext = (0..5).map(|_| Ext::options(60, 1)).collect();
    cases.push(("five extension headers", p.build()));
    // A routing header with segments left: the VIP is not the destination.
    let mut p = Pkt6::new(CLIENT6, 43000, VIP6, 80, SYN);
    p.ext = vec![Ext {
        kind: 43,
        body: vec![0, 0, 1, 0, 0, 0, 0],
    }];
    cases.push(("routing header with segments left", p.build()));
    for (what, frame) in &cases {
        let out = run(&mut dp, frame);
        assert_eq!(
            out.verdict, TC_ACT_SHOT,
            "{what}: to the VIP must be dropped"
        );
        assert_eq!(&out.bytes, frame, "{what}: changed");
    }
    assert_eq!(
        drops(&mut dp, DropReason::MalformedToService),
        cases.len() as u64
    );
    assert_eq!(counter(&mut dp, Counter::NewFlow), 0);
    // Towards an address no service has, the same frames pass untouched.
    for (what, frame) in &cases {
        let mut f = frame.clone();
        f[14 + 24..14 + 40].copy_from_slice(&ip6("2001:2:0:77::1").octets());
        let out = run(&mut dp, &f);
        assert_eq!(out.verdict, TC_ACT_UNSPEC, "{what}");
        assert_eq!(out.bytes, f, "{what}: changed");
    }
    assert_eq!(counter(&mut dp, Counter::PassMalformed), cases.len() as u64);
}

/// An ICMPv6 message of `icmp_type` from `src` to `dst`, checksummed.
fn icmp6_frame(src: &str, dst: &str, icmp_type: Icmpv6Type, body: &[u8]) -> Vec<u8> {
    let (s, d) = (ip6(src).octets(), ip6(dst).octets());
    let icmp = Icmpv6Header::with_checksum(icmp_type, s, d, body).expect("icmpv6");
    let iph = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: (icmp.header_len() + body.len()) as u16,
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: 255,
        source: s,
        destination: d,
    };
    let mut out = vec![
        0x33, 0x33, 0xff, 0, 0, 0x10, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd,
    ];
    iph.write(&mut out).expect("write ipv6");
    icmp.write(&mut out).expect("write icmpv6");
    out.extend_from_slice(body);
    out
}

#[test]
#[ignore = "needs root"]
fn neighbour_discovery_and_other_icmpv6_pass_untouched() {
    let mut dp = datapath();
    cluster6(&mut dp);
    // Neighbour solicitation for the VIP, router solicitation, echo.
    let mut ns = vec![0u8; 4];
    ns.extend_from_slice(&ip6(VIP6).octets());
    let frames = [
        icmp6_frame(
            CLIENT6,
            "ff02::1:ff00:10",
            Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
            &ns[4..],
        ),
        icmp6_frame(
            CLIENT6,
            "ff02::2",
            Icmpv6Type::Unknown {
                type_u8: 133,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
            &[],
        ),
        icmp6_frame(
            CLIENT6,
            VIP6,
            Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
            b"ping",
        ),
    ];
    for frame in &frames {
        let out = run(&mut dp, frame);
        assert_eq!(out.verdict, TC_ACT_UNSPEC);
        assert_eq!(&out.bytes, frame);
    }
    assert_eq!(
        counter(&mut dp, Counter::PassNotHandled),
        frames.len() as u64
    );
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_service_without_endpoints_answers_icmpv6_port_unreachable() {
    let mut dp = datapath();
    install_service(&mut dp, 24, VIP6, 80, IPPROTO_TCP, &[]);
    install_service(&mut dp, 25, VIP6, 53, IPPROTO_UDP, &[]);
    for (l4, port) in [(SYN, 80), (UDP, 53)] {
        let frame = Pkt6::new(CLIENT6, 44000, VIP6, port, l4).build();
        let out = run(&mut dp, &frame);
        assert_eq!(out.verdict, REDIRECT, "the answer goes back out");
        let icmp = inspect_icmp6(&out.bytes);
        assert_eq!((icmp.src, icmp.dst), (ip6(VIP6), ip6(CLIENT6)));
        assert!(
            matches!(
                icmp.icmp_type,
                Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port)
            ),
            "{:?}",
            icmp.icmp_type
        );
        // The quote is the packet as sent: its IPv6 header, then its
        // transport header's ports.
        assert_eq!(&icmp.quote[..40], &frame[14..14 + 40]);
        assert_eq!(&icmp.quote[40..44], &frame[14 + 40..14 + 44]);
        assert_eq!(&out.bytes[..6], &frame[6..12], "back to the sender's MAC");
    }
    assert_eq!(counter(&mut dp, Counter::Rejected), 2);
    assert!(dp.maps.v6.ct.any.keys().next().is_none(), "nothing tracked");
}

/// IPv6's node settings: masquerade to `NODE6`, the cluster CIDR
/// 2001:2:0:1::/64 (the backends'), masquerade ports 20000-20255.
fn node6(dp: &mut kpx::dataplane::maps::Datapath) {
    let mask = wire::addr6("ffff:ffff:ffff:ffff::".parse().unwrap());
    let net = Net6 {
        cluster_cidr: wire::addr6("2001:2:0:1::".parse().unwrap()),
        cluster_mask: mask,
        snat_addr: wire::addr6(ip6(NODE6)),
    };
    dp.maps.v6.config.set(0, net, 0).unwrap();
    let cfg = DatapathConfig {
        snat_port_min: 20000,
        snat_port_max: 20255,
        ..Default::default()
    };
    dp.maps.set_config(&cfg).unwrap();
    dp.maps
        .write(&kpx::dataplane::reconcile::Op::PutNodeAddr(
            ip6(NODE6).into(),
            NODE_F_LOCAL | NODE_F_NODEPORT,
        ))
        .unwrap();
}

#[test]
#[ignore = "needs root"]
fn ipv6_from_outside_the_cluster_is_masqueraded_and_its_replies_come_back() {
    let mut dp = datapath();
    cluster6(&mut dp);
    node6(&mut dp);
    let out = run(&mut dp, &Pkt6::new(OUTSIDE6, 45000, VIP6, 80, SYN).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let seen = inspect6(&out.bytes);
    assert_eq!(seen.src, ip6(NODE6), "masqueraded to the node's address");
    assert!((20000..=20255).contains(&seen.sport), "port {}", seen.sport);
    assert!(backends6().contains(&seen.dst));
    let orig = dp
        .maps
        .v6
        .ct
        .any
        .get(&ct_key6(OUTSIDE6, 45000, VIP6, 80, IPPROTO_TCP), 0)
        .unwrap();
    assert_ne!(orig.flags & CT_F_SNAT, 0);
    let back = inspect6(&run(&mut dp, &reply6(&seen, SYN_ACK)).bytes);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip6(VIP6), 80, ip6(OUTSIDE6), 45000)
    );
    assert_eq!(event(&mut dp, Event::Masqueraded), 1);
    // A pod's own address (in the cluster CIDR) keeps its source.
    let pod = "2001:2:0:1::77";
    let seen = inspect6(&run(&mut dp, &Pkt6::new(pod, 45001, VIP6, 80, SYN).build()).bytes);
    assert_eq!((seen.src, seen.sport), (ip6(pod), 45001));
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_nodeport_reaches_its_backends_masqueraded() {
    let mut dp = datapath();
    node6(&mut dp);
    install_service(
        &mut dp,
        26,
        "::",
        30080,
        IPPROTO_TCP,
        &[(21, B6_1, 8080), (22, B6_2, 8080)],
    );
    edit_frontend(&mut dp, ("::", 30080, IPPROTO_TCP), |v| {
        v.flags = SVC_F_EXTERNAL | SVC_F_NODEPORT;
    });

    let out = run(
        &mut dp,
        &Pkt6::new(OUTSIDE6, 46000, NODE6, 30080, SYN).build(),
    );
    assert_eq!(out.verdict, TC_ACT_OK);
    let seen = inspect6(&out.bytes);
    assert!([B6_1, B6_2].map(ip6).contains(&seen.dst));
    assert_eq!(seen.dport, 8080);
    assert_eq!(seen.src, ip6(NODE6), "the Cluster policy masquerades");
    let back = inspect6(&run(&mut dp, &reply6(&seen, SYN_ACK)).bytes);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip6(NODE6), 30080, ip6(OUTSIDE6), 46000)
    );
    // The same port on an address that serves no NodePorts is no service's.
    let other = Pkt6::new(OUTSIDE6, 46001, "2001:2:0:77::1", 30080, SYN).build();
    let out = run(&mut dp, &other);
    assert_eq!((out.verdict, out.bytes), (TC_ACT_UNSPEC, other));
}

#[test]
#[ignore = "needs root"]
fn the_nodes_own_ipv6_packets_are_translated_at_egress() {
    let mut dp = datapath();
    cluster6(&mut dp);
    node6(&mut dp);
    let out = run_egress(&mut dp, &Pkt6::new(NODE6, 47000, VIP6, 80, SYN).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let seen = inspect6(&out.bytes);
    assert_eq!((seen.src, seen.sport), (ip6(NODE6), 47000));
    assert!(backends6().contains(&seen.dst));
    let back = inspect6(&run(&mut dp, &reply6(&seen, SYN_ACK)).bytes);
    assert_eq!((back.src, back.sport), (ip6(VIP6), 80));
    assert_eq!(event(&mut dp, Event::FromNode), 1);
    // Another source's packet at egress is not the node's: untouched.
    let frame = Pkt6::new(CLIENT6, 47001, VIP6, 80, SYN).build();
    let out = run_egress(&mut dp, &frame);
    assert_eq!((out.verdict, out.bytes), (TC_ACT_UNSPEC, frame));
    // Nor is a packet the node forwards (received on an interface), even
    // from its own address, with or without extension headers before TCP.
    let mut pkt = Pkt6::new(NODE6, 47002, VIP6, 80, SYN);
    for ext in [None, Some(Ext::options(60, 1))] {
        pkt.ext.extend(ext);
        let frame = pkt.build();
        let out = run_egress_forwarded(&mut dp, &frame, 7);
        assert_eq!((out.verdict, out.bytes), (TC_ACT_UNSPEC, frame));
    }
    assert_eq!(event(&mut dp, Event::FromNode), 1);
}

#[test]
#[ignore = "needs root"]
fn ipv6_clientip_affinity_keeps_a_client_on_its_backend() {
    let mut dp = datapath();
    cluster6(&mut dp);
    edit_frontend(&mut dp, (VIP6, 80, IPPROTO_TCP), |v| {
        v.affinity_timeout = 300;
        v.affinity_id = 77;
    });
    let first = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 48000, VIP6, 80, SYN).build()).bytes);
    for sport in 48001..48020 {
        let seen = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, sport, VIP6, 80, SYN).build()).bytes);
        assert_eq!(seen.dst, first.dst, "the client changed backend");
    }
    assert_eq!(event(&mut dp, Event::AffinityNew), 1);
    assert_eq!(event(&mut dp, Event::AffinityHit), 19);
    // Another client is free to go elsewhere: its own record.
    run(
        &mut dp,
        &Pkt6::new("2001:2::3", 48000, VIP6, 80, SYN).build(),
    );
    assert_eq!(event(&mut dp, Event::AffinityNew), 2);
}

#[test]
#[ignore = "needs root"]
fn ipv4_and_ipv6_services_share_one_datapath_without_mixing() {
    let mut dp = datapath();
    cluster(&mut dp);
    cluster6(&mut dp);
    let v4 = inspect(&run(&mut dp, &Pkt::new(CLIENT, 49000, VIP, 80, SYN).build()).bytes);
    assert_eq!(v4.dport, 8080);
    let v6 = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 49000, VIP6, 80, SYN).build()).bytes);
    assert!(backends6().contains(&v6.dst));
    assert_eq!(
        dp.maps.ct_entries().len(),
        2,
        "IPv4's flow in IPv4's tables"
    );
    assert_eq!(
        dp.maps.v6.ct.any.keys().filter_map(|k| k.ok()).count(),
        2,
        "IPv6's in IPv6's"
    );
    // One port filter serves both: a port only IPv6 uses still reaches
    // IPv6's frontend, and IPv4 traffic to it finds no service.
    install_service(&mut dp, 27, VIP6, 8443, IPPROTO_TCP, &[(31, B6_1, 443)]);
    let seen = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 49001, VIP6, 8443, SYN).build()).bytes);
    assert_eq!(seen.dport, 443);
    let frame = Pkt::new(CLIENT, 49001, VIP, 8443, SYN).build();
    let out = run(&mut dp, &frame);
    assert_eq!((out.verdict, out.bytes), (TC_ACT_UNSPEC, frame));
}

/// An ICMPv6 error of `icmp_type` from `src` to `dst` quoting `quote`.
fn icmp6_error(src: &str, dst: &str, icmp_type: Icmpv6Type, quote: &[u8]) -> Vec<u8> {
    let mut f = icmp6_frame(src, dst, icmp_type, quote);
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f
}

#[test]
#[ignore = "needs root"]
fn icmpv6_errors_about_a_translated_flow_reach_the_client_as_about_the_vip() {
    let mut dp = datapath();
    cluster6(&mut dp);
    let syn = run(&mut dp, &Pkt6::new(CLIENT6, 50000, VIP6, 80, SYN).build());
    let seen = inspect6(&syn.bytes);
    let b = seen.dst.to_string();
    // The translated SYN, quoted whole (as the kernel quotes up to 1280
    // bytes), in a Packet Too Big from the backend and from a router on
    // the way.
    let quote = syn.bytes[14..].to_vec();
    for (from, outer_src) in [(b.as_str(), VIP6), ("2001:2:0:77::1", "2001:2:0:77::1")] {
        let ptb = icmp6_error(
            from,
            CLIENT6,
            Icmpv6Type::PacketTooBig { mtu: 1400 },
            &quote,
        );
        let out = run(&mut dp, &ptb);
        assert_eq!(out.verdict, TC_ACT_OK, "from {from}");
        let icmp = inspect_icmp6(&out.bytes);
        assert_eq!(icmp.src, ip6(outer_src), "the error's source, from {from}");
        assert_eq!(icmp.dst, ip6(CLIENT6));
        assert!(matches!(
            icmp.icmp_type,
            Icmpv6Type::PacketTooBig { mtu: 1400 }
        ));
        // The quote is the client's own packet, as it sent it: to the VIP,
        // its TCP checksum valid again.
        let mut as_sent = vec![0u8; 14];
        as_sent[12..14].copy_from_slice(&[0x86, 0xdd]);
        as_sent.extend_from_slice(&icmp.quote);
        let q = inspect6(&as_sent);
        assert_eq!(
            (q.src, q.sport, q.dst, q.dport),
            (ip6(CLIENT6), 50000, ip6(VIP6), 80)
        );
    }
    assert_eq!(counter(&mut dp, Counter::IcmpTranslated), 2);
    // An error about no flow of kpx's passes untouched.
    let other = Pkt6::new(CLIENT6, 50001, "2001:2:0:33::3", 80, SYN).build();
    let ptb = icmp6_error(
        "2001:2:0:77::1",
        CLIENT6,
        Icmpv6Type::PacketTooBig { mtu: 1400 },
        &other[14..],
    );
    let out = run(&mut dp, &ptb);
    assert_eq!((out.verdict, out.bytes), (TC_ACT_UNSPEC, ptb));
}

#[test]
#[ignore = "needs root"]
fn the_collector_ends_idle_ipv6_flows_and_flushes_stale_udp_ones() {
    use kpx::dataplane::conntrack::{collect, Timeouts};
    use proxy_common::{SCHED_LC, SVC_SCHED_SHIFT};
    use std::{collections::HashSet, net::IpAddr, time::Duration};

    let mut dp = datapath();
    cluster6(&mut dp);
    // Least connections: an established flow counts in its backend's
    // connections until the collector ends it.
    edit_frontend(&mut dp, (VIP6, 80, IPPROTO_TCP), |v| {
        v.flags |= SCHED_LC << SVC_SCHED_SHIFT;
    });
    let syn = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 51000, VIP6, 80, SYN).build()).bytes);
    assert_eq!(run(&mut dp, &reply6(&syn, SYN_ACK)).verdict, TC_ACT_OK);
    let udp = inspect6(&run(&mut dp, &Pkt6::new(CLIENT6, 51001, VIP6, 53, UDP).build()).bytes);
    let count = |dp: &kpx::dataplane::maps::Datapath| {
        let tcp = dp.maps.v6.ct.tcp.keys().filter_map(|k| k.ok()).count();
        let any = dp.maps.v6.ct.any.keys().filter_map(|k| k.ok()).count();
        (tcp, any)
    };
    assert_eq!(count(&dp), (2, 2));
    let active = |dp: &kpx::dataplane::maps::Datapath| -> i64 {
        dp.maps
            .conns
            .iter()
            .filter_map(|kv| kv.ok())
            .map(|(_, n)| n as i64)
            .sum()
    };
    assert_eq!(active(&dp), 1, "the established flow counts");
    let expirer = dp.expirer().expect("the expiry programs");
    // `kpx dump conntrack` shows IPv6's flows, endpoints bracketed.
    let rows = kpx::ops::dump::conntrack(&dp.maps).expect("dump");
    let client = format!("[{CLIENT6}]:51000");
    let vip = format!("[{VIP6}]:80");
    assert!(
        rows.iter()
            .any(|r| r.src == client && r.dst == vip && r.direction == "original"),
        "no row of the IPv6 connection: {:?}",
        rows.iter().map(|r| (&r.src, &r.dst)).collect::<Vec<_>>()
    );

    // Nothing is idle long enough with the default timeouts.
    let none = HashSet::new();
    let r = collect(&mut dp.maps, &Timeouts::default(), &none, Some(&expirer)).unwrap();
    assert_eq!((r.expired, r.stale_udp), (0, 0));
    assert_eq!(count(&dp), (2, 2));

    // The UDP flow's backend left its service: its entries go, at once.
    let stale = HashSet::from([(22, IpAddr::V6(udp.dst), 5353)]);
    let r = collect(&mut dp.maps, &Timeouts::default(), &stale, Some(&expirer)).unwrap();
    assert_eq!(r.stale_udp, 2);
    assert_eq!(count(&dp), (2, 0));

    // Idle past its timeout, the connection ends: taken off its backend's
    // count (through IPv6's expiry program), then removed.
    let zero = Timeouts {
        tcp_established: Duration::ZERO,
        ..Timeouts::default()
    };
    std::thread::sleep(Duration::from_millis(20));
    let r = collect(&mut dp.maps, &zero, &none, Some(&expirer)).unwrap();
    assert_eq!((r.expired, r.conns_ended), (2, 1));
    assert_eq!(count(&dp), (0, 0));
    assert_eq!(active(&dp), 0, "the ended flow no longer counts");
    assert!(
        r.ports.contains(&(80, proxy_common::PORT_F_FRONTEND)),
        "IPv6's flows' ports are reported for the port filter"
    );
}

// XDP: IPv6's flows set up and translated before an skb exists, as tc
// does; what XDP leaves to tc goes on untouched.

#[test]
#[ignore = "needs root"]
fn xdp_translates_ipv6_flows_as_tc_does_and_shares_their_conntrack() {
    let mut dp = datapath();
    cluster6(&mut dp);
    node6(&mut dp);
    let packets_before = packets(&mut dp);
    // The client's SYN: balanced and masqueraded as at tc (the client is
    // off-cluster); the empty namespace's FIB cannot forward it, so it
    // goes up the stack: marked as translated by XDP, or, where XDP
    // cannot mark it, translated by tc.
    let marks = dp.xdp_marks();
    let syn = Pkt6::new(OUTSIDE6, 45000, VIP6, 80, SYN).build();
    let seen = inspect6(&up_the_stack(&mut dp, &syn, None, 0));
    assert_eq!(seen.src, ip6(NODE6));
    assert!((20000..=20255).contains(&seen.sport), "{seen:?}");
    assert!(backends6().contains(&seen.dst));
    assert_eq!(seen.dport, 8080);
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
    assert_eq!(event(&mut dp, Event::XdpStack), u64::from(marks));
    // The backend's SYN-ACK, at tc on its pod's interface: the entries
    // written at the SYN translate it back.
    let back = inspect6(&run(&mut dp, &reply6(&seen, SYN_ACK)).bytes);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip6(VIP6), 80, ip6(OUTSIDE6), 45000)
    );
    // The client's next segment: XDP and tc give the same bytes (or XDP
    // leaves it to tc).
    let ack = Pkt6::new(OUTSIDE6, 45000, VIP6, 80, ACK).build();
    let at_xdp = up_the_stack(&mut dp, &ack, None, 0);
    let at_tc = run(&mut dp, &ack);
    assert_eq!(at_tc.verdict, TC_ACT_OK);
    assert_eq!(at_xdp, at_tc.bytes);
    assert_eq!(inspect6(&at_xdp), seen);
    // A reply arriving at XDP (a backend on another node answers through
    // this one) is translated back as well.
    let reply = reply6(&seen, ACK);
    let out = up_the_stack(&mut dp, &reply, None, 0);
    assert_eq!(out, run(&mut dp, &reply).bytes);
    // The service's statistics tell the hooks apart: 6 packets, 3 at XDP
    // where it marks (else none); every packet is counted once, by the
    // hook that translated it.
    let stats = dp.maps.service_stats(21).unwrap();
    assert_eq!(
        (stats.packets, stats.xdp_packets),
        (6, 3 * u64::from(marks))
    );
    assert_eq!(packets(&mut dp) - packets_before, 6);
}

#[test]
#[ignore = "needs root"]
fn xdp_leaves_what_it_does_not_translate_of_ipv6_untouched_to_tc() {
    let mut dp = datapath();
    cluster6(&mut dp);
    node6(&mut dp);
    // A service without endpoints: tc answers with the REJECT.
    install_service(&mut dp, 23, "2001:2:0:ff::11", 80, IPPROTO_TCP, &[]);
    let mut behind = Pkt6::new(OUTSIDE6, 45000, VIP6, 80, SYN);
    behind.ext = vec![Ext::options(0, 1)];
    let mut nd = vec![0u8; 14 + 40 + 24];
    nd[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    nd[14] = 0x60;
    nd[14 + 4..14 + 6].copy_from_slice(&24u16.to_be_bytes());
    nd[14 + 6] = 58; // ICMPv6
    nd[14 + 40] = 135; // neighbour solicitation
    let mut truncated = Pkt6::new(OUTSIDE6, 45000, VIP6, 80, SYN).build();
    truncated.truncate(14 + 40 + 10);
    let frames = [
        (
            "no endpoints",
            Pkt6::new(OUTSIDE6, 45000, "2001:2:0:ff::11", 80, SYN).build(),
        ),
        ("behind an extension header", behind.build()),
        ("neighbour discovery", nd),
        (
            "no service",
            Pkt6::new(OUTSIDE6, 45001, "2001:2:0:1::9", 22, SYN).build(),
        ),
        ("truncated", truncated),
    ];
    let before = packets(&mut dp);
    for (what, frame) in &frames {
        let out = run_xdp(&mut dp, frame);
        assert_eq!(out.verdict, XDP_PASS, "{what}");
        assert_eq!(out.out, *frame, "{what}: untouched, unmarked");
    }
    assert_eq!(packets(&mut dp), before, "tc counts these, not XDP");
    // And tc does its part: the REJECT, the packet behind its header.
    assert_eq!(run(&mut dp, &frames[0].1).verdict, REDIRECT);
    let out = run(&mut dp, &frames[1].1);
    assert!(backends6().contains(&inspect6(&out.bytes).dst));
}

#[test]
#[ignore = "needs root"]
fn xdp_sends_an_ipv6_flow_back_out_of_its_interface() {
    let mut dp = datapath();
    cluster6(&mut dp);
    node6(&mut dp);
    // The node: "ext" faces the outside client and, through a router on
    // it, the backends (on other nodes).
    let (_ns, file, ext) = xdp_node(
        "kpxxdp6",
        &[("ext", "02:00:00:00:00:aa", "2001:2:0:fe::1/64")],
        "2001:2:0:fe::fe",
        &["2001:2:0:1::/64", "2001:2:0:9::/64"],
    );
    // The first packet: bounced by XDP where it can mark frames, else
    // sent out of ext by tc.
    let marks = dp.xdp_marks();
    let syn = Pkt6::new(OUTSIDE6, 45100, VIP6, 80, SYN).build();
    let frame = first_sent_back(&mut dp, &syn, &file, ext);
    assert_eq!(frame[14 + 7], 63, "forwarded: hop limit down by one");
    let seen = inspect6(&frame);
    assert_eq!(seen.src, ip6(NODE6), "masqueraded to the node's address");
    assert!(backends6().contains(&seen.dst));
    // The backend's reply comes back in on ext: out again, to the client.
    let out = run_xdp_in(&mut dp, &reply6(&seen, SYN_ACK), Some(&file), ext);
    assert_eq!(out.verdict, XDP_TX);
    // The client's next segment: the established path, out again.
    let ack = Pkt6::new(OUTSIDE6, 45100, VIP6, 80, ACK).build();
    let out = run_xdp_in(&mut dp, &ack, Some(&file), ext);
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(inspect6(out.frame()), seen);
    assert_eq!(event(&mut dp, Event::XdpTx), 2 + u64::from(marks));
    let out = run_xdp_in(&mut dp, &reply6(&seen, ACK), Some(&file), ext);
    assert_eq!(out.verdict, XDP_TX);
    let back = inspect6(out.frame());
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip6(VIP6), 80, ip6(OUTSIDE6), 45100)
    );
}
