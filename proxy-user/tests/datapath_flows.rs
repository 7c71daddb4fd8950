//! Flow semantics in the kernel (BPF_PROG_TEST_RUN): REJECT for services
//! without endpoints, invalid TCP, closing flows, ClientIP affinity, ICMP
//! errors about translated flows. The generated and translated ICMP bytes
//! are checked field by field, checksums recomputed from scratch. Invalid
//! TCP, closing flows and affinity shared by entry points run on IPv4 and
//! on IPv6 (`support::fam`); IPv6's REJECT, affinity and ICMPv6 errors are
//! in `datapath_v6.rs`.

mod support;

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use kpx::dataplane::maps::Datapath;
use proxy_common::{
    wire, AffinityKey, Counter, DropReason, Event, SlotKey, CT_F_CLOSING, IPPROTO_TCP, IPPROTO_UDP,
};
use support::{
    fam::{self, Fam, V4, V6},
    *,
};

const OTHER_CLIENT: &str = "198.18.0.3";
const ROUTER: &str = "198.18.0.1";
const EMPTY_VIP: &str = "198.19.0.30";

/// Affinity id of the service port the tests' frontends belong to.
const AFFINITY_ID: u32 = 7;

fn set_affinity(dp: &mut Datapath, vip: &str, port: u16, proto: u8, timeout: u32) {
    edit_frontend(dp, (vip, port, proto), |v| {
        v.affinity_timeout = timeout;
        v.affinity_id = AFFINITY_ID;
    });
}

#[test]
#[ignore = "needs root"]
fn syn_or_datagram_to_a_service_without_endpoints_gets_port_unreachable() {
    let mut dp = datapath();
    install_service(&mut dp, 3, EMPTY_VIP, 80, IPPROTO_TCP, &[]);
    install_service(&mut dp, 4, EMPTY_VIP, 53, IPPROTO_UDP, &[]);
    let mut with_options = Pkt::new(CLIENT, 44002, EMPTY_VIP, 80, SYN);
    with_options.ip_options = vec![1, 1, 1, 0];
    let cases = [
        Pkt::new(CLIENT, 44000, EMPTY_VIP, 80, SYN),
        Pkt::new(CLIENT, 44001, EMPTY_VIP, 53, UDP),
        with_options,
    ];
    for pkt in &cases {
        let frame = pkt.build();
        let out = run(&mut dp, &frame);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{pkt:?}");
        assert_eq!(&out.bytes[..6], &frame[6..12], "destination MAC = sender");
        assert_eq!(&out.bytes[6..12], &frame[..6], "source MAC = receiver");
        let icmp = inspect_icmp(&out.bytes);
        assert_eq!((icmp.src, icmp.dst), (ip(EMPTY_VIP), ip(CLIENT)));
        assert_eq!(
            icmp.icmp_type,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
        );
        // The quote: the offending IP header (with options) and 8 bytes of
        // UDP, or the whole TCP header.
        let ihl = (frame[14] & 0x0f) as usize * 4;
        let l4 = if matches!(pkt.l4, L4::Tcp { .. }) {
            20
        } else {
            8
        };
        assert_eq!(icmp.quote, &frame[14..14 + ihl + l4]);
        assert_eq!(out.bytes.len(), 14 + 20 + 8 + ihl + l4);
    }
    assert_eq!(counter(&mut dp, Counter::Rejected), 3);
    assert_eq!(counter(&mut dp, Counter::Dropped), 0);
    assert_eq!(dp.maps.ct_entries().len(), 0, "a reject tracks nothing");

    // Mid-stream TCP is not answered (the reference drops it as INVALID).
    let out = run(
        &mut dp,
        &Pkt::new(CLIENT, 44003, EMPTY_VIP, 80, ACK).build(),
    );
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 1);
}

crate::both_families!(
    tcp_to_a_service_that_is_not_a_syn_and_not_tracked_is_dropped_as_invalid,
    fin_marks_the_flow_closing_and_a_new_syn_on_its_tuple_starts_a_new_flow,
    affinity_is_shared_by_the_entry_points_of_one_service_port,
    without_affinity_no_record_is_kept,
);

fn tcp_to_a_service_that_is_not_a_syn_and_not_tracked_is_dropped_as_invalid<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    let rst = L4::Tcp {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };
    for (i, l4) in [ACK, SYN_ACK, FIN_ACK, rst].into_iter().enumerate() {
        let out = run(
            &mut dp,
            &F::frame(F::CLIENT, 45000 + i as u16, F::VIP, 80, l4),
        );
        assert_eq!(out.verdict, TC_ACT_SHOT, "{l4:?}");
    }
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 4);
    assert_eq!(fam::entries::<F>(&dp).len(), 0);
    // UDP has no such notion: a datagram always starts a flow.
    let out = run(&mut dp, &F::frame(F::CLIENT, 45010, F::VIP, 53, UDP));
    assert_eq!(out.verdict, TC_ACT_OK);
}

fn fin_marks_the_flow_closing_and_a_new_syn_on_its_tuple_starts_a_new_flow<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    let to_vip = |l4| F::frame(F::CLIENT, 46000, F::VIP, 80, l4);
    let orig = fam::key::<F>(F::CLIENT, 46000, F::VIP, 80, IPPROTO_TCP);
    let first = fam::open::<F>(&mut dp, F::CLIENT, 46000);
    // A retransmitted SYN of a live flow stays on it.
    let again = run(&mut dp, &to_vip(SYN));
    assert_eq!(F::flow(&again.bytes), first);
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
    // Two entries, then the same two in the established table.
    assert_eq!(event(&mut dp, Event::CtInserted), 4);

    let out = run(&mut dp, &to_vip(FIN_ACK));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(F::flow(&out.bytes), first);
    let reply = fam::key::<F>(&first.dst.to_string(), 8080, F::CLIENT, 46000, IPPROTO_TCP);
    for key in [orig, reply] {
        let (_, e) = fam::ct_get::<F>(&dp, &key).expect("entry");
        assert_ne!(e.flags & CT_F_CLOSING, 0, "{key:?} not closing");
    }

    let out = run(&mut dp, &to_vip(SYN));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(counter(&mut dp, Counter::NewFlow), 2);
    assert_eq!(event(&mut dp, Event::CtRemoved), 4);
    assert_eq!(event(&mut dp, Event::CtInserted), 6);
    let (_, e) = fam::ct_get::<F>(&dp, &orig).expect("new entry");
    assert_eq!(e.flags & CT_F_CLOSING, 0, "the new flow is not closing");
    assert_eq!(fam::entries::<F>(&dp).len(), 2);
}

#[test]
#[ignore = "needs root"]
fn client_ip_affinity_keeps_a_client_on_one_backend_until_it_leaves_or_expires() {
    let mut dp = datapath();
    cluster(&mut dp);
    set_affinity(&mut dp, VIP, 80, IPPROTO_TCP, 100);
    let connect = |dp: &mut Datapath, client: &str, sport: u16| {
        let out = run(dp, &Pkt::new(client, sport, VIP, 80, SYN).build());
        assert_eq!(out.verdict, TC_ACT_OK);
        inspect(&out.bytes).dst
    };
    let chosen = connect(&mut dp, CLIENT, 47000);
    for sport in 47001..47030 {
        assert_eq!(connect(&mut dp, CLIENT, sport), chosen, "port {sport}");
    }
    assert_eq!(event(&mut dp, Event::AffinityNew), 1);
    assert_eq!(event(&mut dp, Event::AffinityHit), 29);
    // Another client has its own record.
    connect(&mut dp, OTHER_CLIENT, 47000);
    assert_eq!(event(&mut dp, Event::AffinityNew), 2);

    // The chosen backend leaves: its slot now holds another backend.
    let akey = AffinityKey::new(AFFINITY_ID, wire::addr(ip(CLIENT)), 0);
    let rec = dp.maps.affinity.get(&akey, 0).expect("affinity record");
    let replacement = if rec.backend_id == 1 { 2 } else { 1 };
    let replacement = dp
        .maps
        .slots
        .iter()
        .filter_map(|kv| kv.ok())
        .find_map(|(k, s)| (k.svc_id == 1 && s.backend_id == replacement).then_some(s))
        .expect("the other backend's slot");
    dp.maps
        .slots
        .insert(
            SlotKey {
                svc_id: 1,
                slot: rec.slot,
            },
            replacement,
            0,
        )
        .unwrap();
    let now_at = connect(&mut dp, CLIENT, 47100);
    assert_ne!(now_at, chosen, "a removed backend must release its clients");
    assert_eq!(event(&mut dp, Event::AffinityNew), 3);
    for sport in 47101..47110 {
        assert_eq!(connect(&mut dp, CLIENT, sport), now_at);
    }

    // Idle longer than the timeout: the record no longer binds.
    let mut rec = dp.maps.affinity.get(&akey, 0).unwrap();
    rec.last_used_ns = 1;
    dp.maps.affinity.insert(akey, rec, 0).unwrap();
    connect(&mut dp, CLIENT, 47200);
    assert_eq!(event(&mut dp, Event::AffinityNew), 4);
    assert!(dp.maps.affinity.get(&akey, 0).unwrap().last_used_ns > 1);
}

fn affinity_is_shared_by_the_entry_points_of_one_service_port<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    // Another entry point (an external IP) of the same service port.
    let ext = F::vip(0xa0);
    let [b1, b2, b3] = F::BACKENDS;
    let [i1, i2, i3] = F::TCP_IDS;
    let backends = [(i1, b1, 8080), (i2, b2, 8080), (i3, b3, 8080)];
    install_service(&mut dp, 9, &ext, 80, IPPROTO_TCP, &backends);
    for vip in [F::VIP, &ext] {
        edit_frontend(&mut dp, (vip, 80, IPPROTO_TCP), |v| {
            v.affinity_timeout = 100;
            v.affinity_id = AFFINITY_ID;
        });
    }
    let chosen = fam::connect_to::<F>(&mut dp, F::CLIENT, 49000, F::VIP);
    for sport in 49001..49020 {
        let got = fam::connect_to::<F>(&mut dp, F::CLIENT, sport, &ext);
        assert_eq!(got, chosen, "port {sport}");
    }
    assert_eq!(event(&mut dp, Event::AffinityNew), 1);
    assert_eq!(event(&mut dp, Event::AffinityHit), 19);
}

fn without_affinity_no_record_is_kept<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    fam::connect_to::<F>(&mut dp, F::CLIENT, 48000, F::VIP);
    assert_eq!(F::affinity_records(&dp), 0);
}

/// Translates the first packet of a flow; returns (client frame, what the backend got).
fn flow(dp: &mut Datapath, pkt: Pkt) -> (Vec<u8>, Vec<u8>) {
    let frame = pkt.build();
    let out = run(dp, &frame);
    assert_eq!(out.verdict, TC_ACT_OK);
    (frame, out.bytes)
}

#[test]
#[ignore = "needs root"]
fn fragmentation_needed_about_a_translated_flow_reaches_the_client_about_the_vip() {
    let mut dp = datapath();
    cluster(&mut dp);
    let (sent, at_backend) = flow(&mut dp, Pkt::new(CLIENT, 49000, VIP, 80, SYN));
    let backend = inspect(&at_backend).dst;
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1200,
        });
    // The node itself (a router on the way) quotes the whole packet, TCP
    // checksum included, as Linux does: sent on egress towards the client.
    let err = icmp_error(ROUTER, CLIENT, frag_needed.clone(), &at_backend[14..]);
    let out = run_egress(&mut dp, &err);
    assert_eq!(out.verdict, TC_ACT_OK);
    let icmp = inspect_icmp(&out.bytes);
    assert_eq!((icmp.src, icmp.dst), (ip(ROUTER), ip(CLIENT)));
    assert_eq!(icmp.icmp_type, frag_needed);
    assert_eq!(
        icmp.quote,
        &sent[14..],
        "the quote must be the packet the client sent, byte for byte"
    );

    // From the backend itself (ingress): the error comes from the VIP.
    let err = icmp_error(
        &backend.to_string(),
        CLIENT,
        frag_needed,
        &at_backend[14..42],
    );
    let out = run(&mut dp, &err);
    assert_eq!(out.verdict, TC_ACT_OK);
    let icmp = inspect_icmp(&out.bytes);
    assert_eq!((icmp.src, icmp.dst), (ip(VIP), ip(CLIENT)));
    assert_eq!(icmp.quote, &sent[14..42]);
    assert_eq!(counter(&mut dp, Counter::IcmpTranslated), 2);
}

#[test]
#[ignore = "needs root"]
fn port_unreachable_from_a_udp_backend_is_translated_with_its_quoted_checksum() {
    let mut dp = datapath();
    cluster(&mut dp);
    let (sent, at_backend) = flow(&mut dp, Pkt::new(CLIENT, 49100, VIP, 53, UDP));
    let backend = inspect(&at_backend).dst;
    let unreach = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    // IP header and 8 bytes: the UDP header, checksum included.
    let err = icmp_error(&backend.to_string(), CLIENT, unreach, &at_backend[14..42]);
    let out = run(&mut dp, &err);
    assert_eq!(out.verdict, TC_ACT_OK);
    let icmp = inspect_icmp(&out.bytes);
    assert_eq!((icmp.src, icmp.dst), (ip(VIP), ip(CLIENT)));
    assert_eq!(icmp.quote, &sent[14..42]);
}

#[test]
#[ignore = "needs root"]
fn icmp_errors_about_unknown_flows_and_other_icmp_pass_untouched() {
    let mut dp = datapath();
    cluster(&mut dp);
    let stranger = Pkt::new(CLIENT, 49200, "198.18.9.9", 80, SYN).build();
    let unreach = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let err = icmp_error(ROUTER, CLIENT, unreach, &stranger[14..42]);
    for out in [run(&mut dp, &err), run_egress(&mut dp, &err)] {
        assert_eq!(out.verdict, TC_ACT_UNSPEC);
        assert_eq!(out.bytes, err);
    }
    let echo = icmp_error(
        CLIENT,
        VIP,
        Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
        b"ping",
    );
    assert_eq!(run(&mut dp, &echo).verdict, TC_ACT_UNSPEC);
    // A truncated quote is not trusted.
    let (_, at_backend) = flow(&mut dp, Pkt::new(CLIENT, 49201, VIP, 80, SYN));
    let short = icmp_error(ROUTER, CLIENT, unreach_port(), &at_backend[14..36]);
    assert_eq!(run(&mut dp, &short).verdict, TC_ACT_UNSPEC);
    assert_eq!(counter(&mut dp, Counter::IcmpTranslated), 0);
    // Egress leaves ordinary traffic alone and counts nothing.
    let tcp = Pkt::new(CLIENT, 49202, VIP, 80, SYN).build();
    let out = run_egress(&mut dp, &tcp);
    assert_eq!((out.verdict, out.bytes), (TC_ACT_UNSPEC, tcp));
}

fn unreach_port() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}
