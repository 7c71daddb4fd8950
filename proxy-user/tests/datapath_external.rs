//! In-kernel (`BPF_PROG_TEST_RUN`) cases for traffic from outside the node
//! and masquerade: NodePorts, traffic policies, source ranges, the
//! datapath's own SNAT with its conntrack entries, the node's own flows at
//! egress, and FIB forwarding. Each case checks the bytes that come out and
//! what the program wrote to its maps. Masquerade ports, traffic policies,
//! source ranges and who is masqueraded run on IPv4 and on IPv6.

mod support;

use kpx::dataplane::{
    maps::Datapath,
    reconcile::{BackendAddr, Op},
};
use kpx::{control::cidr::Cidr, dataplane::maps::range_key, dataplane::node::PortRange};
use proxy_common::{
    Counter, CtValue, DropReason, Event, ServiceValue, SlotKey, CT_F_DSR_ENCAP, CT_F_FROM_NODE,
    CT_F_REWRITE_DST, CT_F_REWRITE_SRC, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP, LOCAL_SLOTS,
    NODE_F_LOCAL, NODE_F_NODEPORT, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODEPORT,
    SVC_F_SOURCE_RANGES,
};
use support::{
    fam::{self, Fam, V4, V6},
    v6::*,
    *,
};
use testbed::Netns;

/// This node: its fabric address (serves NodePorts) and a pod-side gateway.
const NODE: &str = "198.18.128.1";
const OUTSIDE: &str = "198.18.200.7";
const POD: &str = "198.18.2.9";
const LB: &str = "198.19.2.30";

/// The standard scenario plus node settings: cluster CIDR 198.18.0.0/17,
/// masquerade to NODE on ports 20000-20255.
fn node(dp: &mut kpx::dataplane::maps::Datapath, masquerade_all: bool) {
    cluster(dp);
    let cfg = kpx::dataplane::node::datapath_config(
        &["198.18.0.0/17".parse().unwrap()],
        &[ip(NODE).into()],
        &PortRange(20000..=20255),
        masquerade_all,
    );
    dp.maps.set_config(&cfg.v4).unwrap();
    // Written as the agent writes them: each marked in the address filter.
    for op in [
        Op::PutNodeAddr(ip(NODE).into(), NODE_F_LOCAL | NODE_F_NODEPORT),
        Op::PutNodeAddr(ip("198.18.0.1").into(), NODE_F_LOCAL),
    ] {
        dp.maps.write(&op).unwrap();
    }
}

/// Adds frontend `addr:port` (either family; the unspecified address for
/// a NodePort) for service id `svc_id` (its slots already in place), with
/// `flags` and a local table of `local` backend ids.
fn frontend(
    dp: &mut Datapath,
    key: (&str, u16, u8),
    svc_id: u32,
    count: u32,
    flags: u32,
    local: &[u32],
) {
    if !local.is_empty() {
        // The same backends as in their cluster-wide slots.
        let state = dp.maps.read_state().unwrap();
        for (i, id) in local.iter().enumerate() {
            let b = *state.backends.get(id).expect("a backend of the service");
            let slot = SlotKey {
                svc_id,
                slot: LOCAL_SLOTS + i as u32,
            };
            dp.maps.put_slot(slot, *id, &b).unwrap();
        }
    }
    let value = ServiceValue {
        svc_id,
        count,
        flags,
        local_count: local.len() as u32,
        ..ServiceValue::default()
    };
    dp.maps.put_frontend(&frontend_key(key), value).unwrap();
}

/// The node of [`node`] with NodePort 30080/TCP (service 1, Cluster
/// policy, its three backends).
fn nodeport_30080() -> kpx::dataplane::maps::Datapath {
    let mut dp = datapath();
    node(&mut dp, false);
    frontend(
        &mut dp,
        ("0.0.0.0", 30080, IPPROTO_TCP),
        1,
        3,
        SVC_F_EXTERNAL | SVC_F_NODEPORT,
        &[],
    );
    dp
}

/// The node of [`node`] with LB IP `LB`:80/TCP (service 1) admitting
/// 198.18.200.0/24 only.
fn lb_admitting_198_18_200() -> kpx::dataplane::maps::Datapath {
    let mut dp = datapath();
    node(&mut dp, false);
    frontend(
        &mut dp,
        (LB, 80, IPPROTO_TCP),
        1,
        3,
        SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES,
        &[],
    );
    let r: Cidr = "198.18.200.0/24".parse().unwrap();
    dp.maps.src_ranges.insert(&range_key(1, &r), 1, 0).unwrap();
    dp
}

/// The backend's SYN-ACK to the masqueraded SYN `seen` (OUTSIDE:40000 to
/// NodePort 30080), at tc: translated back to the client, from the node.
fn syn_ack_reaches_the_client(dp: &mut kpx::dataplane::maps::Datapath, seen: &Seen) {
    let backend = seen.dst.to_string();
    let out = run(
        dp,
        &Pkt::new(&backend, 8080, NODE, seen.sport, SYN_ACK).build(),
    );
    assert_eq!(out.verdict, TC_ACT_OK);
    let back = inspect(&out.bytes);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(NODE), 30080, ip(OUTSIDE), 40000)
    );
}

fn ct(dp: &kpx::dataplane::maps::Datapath, key: proxy_common::CtKey) -> CtValue {
    dp.maps
        .ct_get(&key)
        .unwrap_or_else(|| panic!("no conntrack entry {key:?}"))
        .1
}

/// The destination filter passes a packet whose destination's address
/// bit and tuple's reply bit are clear, on that read alone: a NodePort's
/// packets get through only because the agent marks each of the node's
/// addresses in the address filter (as `MapSet::write` does for a node
/// address written by hand). With the bit cleared by hand, a SYN to the
/// NodePort passes untranslated, counted as no service's; set again, it
/// is served.
#[test]
#[ignore = "needs root"]
fn a_nodes_address_must_be_in_the_address_filter_for_its_nodeports() {
    let mut dp = nodeport_30080();
    let bit = proxy_common::addr_bit(proxy_common::wire::addr(ip(NODE)));
    let word = dp.maps.port_word(bit.word).unwrap();
    assert_ne!(word & bit.mask, 0, "writing the node address marks it");
    let syn = Pkt::new(OUTSIDE, 40000, NODE, 30080, SYN).build();
    dp.maps.set_port_word(bit.word, word & !bit.mask).unwrap();
    let out = run(&mut dp, &syn);
    assert_eq!(out.verdict, TC_ACT_UNSPEC);
    assert_eq!(out.bytes, syn, "translated without the node address's bit");
    assert_eq!(counter(&mut dp, Counter::PassNoService), 1);
    dp.maps.set_port_word(bit.word, word).unwrap();
    let out = run(&mut dp, &syn);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_ne!(inspect(&out.bytes).dst, ip(NODE), "DNAT to a backend");
}

#[test]
#[ignore = "needs root"]
fn a_nodeport_with_cluster_policy_is_translated_and_masqueraded_with_its_reply_entry() {
    let mut dp = nodeport_30080();
    let out = run(&mut dp, &Pkt::new(OUTSIDE, 40000, NODE, 30080, SYN).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let seen = inspect(&out.bytes);
    // The FIB of the empty namespace cannot say: the configured node IP.
    assert_eq!(seen.src, ip(NODE));
    assert!((20000..=20255).contains(&seen.sport), "{seen:?}");
    assert!([ip(B1), ip(B2), ip(B3)].contains(&seen.dst));
    assert_eq!(seen.dport, 8080);
    let original = ct(&dp, ct_key(OUTSIDE, 40000, NODE, 30080, IPPROTO_TCP));
    assert_eq!(
        original.flags & (CT_F_REWRITE_SRC | CT_F_REWRITE_DST | CT_F_SNAT),
        CT_F_REWRITE_SRC | CT_F_REWRITE_DST | CT_F_SNAT
    );
    // The reply (backend → node:port) is translated back to the client.
    let backend = seen.dst.to_string();
    let reply = ct(&dp, ct_key(&backend, 8080, NODE, seen.sport, IPPROTO_TCP));
    assert_eq!(reply.flags & CT_F_SNAT, CT_F_SNAT);
    syn_ack_reaches_the_client(&mut dp, &seen);
    assert_eq!(event(&mut dp, Event::Masqueraded), 1);
    // A NodePort on an address of the node that does not serve them, or
    // on no address of this node, is not ours.
    for dst in ["198.18.0.1", "198.18.128.2"] {
        let out = run(&mut dp, &Pkt::new(OUTSIDE, 40001, dst, 30080, SYN).build());
        assert_eq!(out.verdict, TC_ACT_UNSPEC, "{dst}");
    }
}

#[test]
#[ignore = "needs root"]
fn the_nodes_own_flows_are_translated_at_egress_and_translated_packets_skipped() {
    let mut dp = datapath();
    node(&mut dp, false);
    let out = run_egress(&mut dp, &Pkt::new(NODE, 45000, VIP, 80, SYN).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let seen = inspect(&out.bytes);
    assert_eq!(seen.dport, 8080);
    // The node's address is outside the cluster CIDR, so masqueraded; the
    // packet already carries the masquerade address, so it stays as is.
    assert_eq!((seen.src, seen.sport), (ip(NODE), 45000));
    let e = ct(&dp, ct_key(NODE, 45000, VIP, 80, IPPROTO_TCP));
    assert_eq!(e.flags & CT_F_FROM_NODE, CT_F_FROM_NODE);
    assert_eq!(event(&mut dp, Event::FromNode), 1);
    // A packet from elsewhere leaving through the interface is not ours.
    let out = run_egress(&mut dp, &Pkt::new(POD, 45000, VIP, 80, SYN).build());
    assert_eq!(out.verdict, TC_ACT_UNSPEC);
    // Nor is one the node forwards, whatever its source: it came in on an
    // interface (kube-proxy's OUTPUT chain never sees it; tc ingress had
    // it). Passed untouched, no flow tracked.
    let frame = Pkt::new(NODE, 45001, VIP, 80, SYN).build();
    let out = run_egress_forwarded(&mut dp, &frame, 7);
    assert_eq!(out.verdict, TC_ACT_UNSPEC);
    assert_eq!(out.bytes, frame);
    assert!(dp
        .maps
        .ct_get(&ct_key(NODE, 45001, VIP, 80, IPPROTO_TCP))
        .is_none());
    assert_eq!(event(&mut dp, Event::FromNode), 1);
}

/// A namespace whose FIB forwards to the backends B1..B3 out of `out0`
/// (198.18.1.254/24, MAC 02::aa; the backends' MAC 02::bb, resolved), and
/// its file for [`run_in`]. The namespace goes with the `Netns`.
fn fib_netns(prefix: &str) -> (Netns, std::fs::File) {
    let ns = Netns::create(&format!("{prefix}{}", std::process::id())).unwrap();
    ns.sysctl("net/ipv4/ip_forward", "1").unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&[
        "link", "add", "out0", "type", "veth", "peer", "name", "out1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "out1", "up"]).unwrap();
    ns.ip(&["link", "set", "out0", "address", "02:00:00:00:00:aa"])
        .unwrap();
    ns.ip(&["addr", "add", "198.18.1.254/24", "dev", "out0"])
        .unwrap();
    ns.ip(&["link", "set", "out0", "up"]).unwrap();
    for b in [B1, B2, B3] {
        ns.ip(&[
            "neigh",
            "add",
            b,
            "lladdr",
            "02:00:00:00:00:bb",
            "dev",
            "out0",
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    (ns, file)
}

#[test]
#[ignore = "needs root"]
fn translated_packets_go_straight_to_the_fib_next_hop() {
    let mut dp = datapath();
    node(&mut dp, false);
    let (_ns, file) = fib_netns("kpxfib");
    let frame = Pkt::new(POD, 1000, VIP, 80, SYN).build();
    let out = run_in(&mut dp, &frame, false, &file);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "redirected to out0");
    assert_eq!(&out.bytes[0..6], &[2, 0, 0, 0, 0, 0xbb], "next hop's MAC");
    assert_eq!(&out.bytes[6..12], &[2, 0, 0, 0, 0, 0xaa], "out0's MAC");
    // Forwarded: the TTL went down by one, the checksum still right.
    assert_eq!(out.bytes[14 + 8], 63);
    let seen = inspect(&out.bytes);
    assert_eq!((seen.src, seen.dport), (ip(POD), 8080));
    assert_eq!(event(&mut dp, Event::FibRedirect), 1);
    // With a masquerade, the source is the one the route picks (out0's
    // address), as MASQUERADE does.
    let frame = Pkt::new(OUTSIDE, 1000, VIP, 80, SYN).build();
    let out = run_in(&mut dp, &frame, false, &file);
    assert_eq!(inspect(&out.bytes).src, ip("198.18.1.254"));
    // TTL 1: the stack must send the time-exceeded, not us.
    let mut frame = Pkt::new(POD, 1001, VIP, 80, SYN).build();
    frame[14 + 8] = 1;
    let sum = {
        frame[14 + 10] = 0;
        frame[14 + 11] = 0;
        let h = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..]).unwrap();
        h.to_header().calc_header_checksum()
    };
    frame[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    let out = run_in(&mut dp, &frame, false, &file);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.bytes[14 + 8], 1);
}

// XDP: the same path, before an skb exists.

#[test]
#[ignore = "needs root"]
fn xdp_translates_north_south_flows_as_tc_does_and_shares_their_conntrack() {
    let mut dp = nodeport_30080();
    let packets_before = packets(&mut dp);
    // The client's SYN: balanced and masqueraded as at tc. The empty
    // namespace's FIB cannot forward it, so it goes up the stack: marked as
    // translated by XDP, or, where XDP cannot mark it, translated by tc.
    let marks = dp.xdp_marks();
    let syn = Pkt::new(OUTSIDE, 40000, NODE, 30080, SYN).build();
    let seen = inspect(&up_the_stack(&mut dp, &syn, None, 0));
    assert_eq!(seen.src, ip(NODE));
    assert!((20000..=20255).contains(&seen.sport), "{seen:?}");
    assert!([ip(B1), ip(B2), ip(B3)].contains(&seen.dst));
    assert_eq!(seen.dport, 8080);
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
    assert_eq!(event(&mut dp, Event::XdpStack), u64::from(marks));
    // The backend's SYN-ACK, at tc on its pod's interface: the entries
    // written at the SYN translate it back.
    syn_ack_reaches_the_client(&mut dp, &seen);
    // The client's next segment: XDP and tc give the same bytes (or XDP
    // leaves it to tc).
    let ack = Pkt::new(OUTSIDE, 40000, NODE, 30080, ACK).build();
    let at_xdp = up_the_stack(&mut dp, &ack, None, 0);
    let at_tc = run(&mut dp, &ack);
    assert_eq!(at_tc.verdict, TC_ACT_OK);
    assert_eq!(at_xdp, at_tc.bytes);
    assert_eq!(inspect(&at_xdp), seen);
    // The service's statistics tell the hooks apart: 4 packets, 2 at XDP
    // where it marks (else none).
    let stats = dp.maps.service_stats(1).unwrap();
    assert_eq!(
        (stats.packets, stats.xdp_packets),
        (4, 2 * u64::from(marks))
    );
    // A UDP datagram with no checksum keeps none; one with a checksum gets
    // it updated (`inspect` recomputes both).
    frontend(
        &mut dp,
        ("0.0.0.0", 30053, IPPROTO_UDP),
        2,
        3,
        SVC_F_EXTERNAL | SVC_F_NODEPORT,
        &[],
    );
    for zero_csum in [true, false] {
        let mut p = Pkt::new(OUTSIDE, 40001, NODE, 30053, L4::Udp { zero_csum });
        p.sport += zero_csum as u16;
        let seen = inspect(&up_the_stack(&mut dp, &p.build(), None, 0));
        assert_eq!(seen.udp_csum_zero, zero_csum);
        assert_eq!(seen.dport, 5353);
    }
    // Every packet XDP handled is counted once, as tc counts its own; one
    // it left untouched, by tc alone.
    assert_eq!(packets(&mut dp) - packets_before, 6);
}

#[test]
#[ignore = "needs root"]
fn xdp_leaves_what_it_does_not_translate_untouched_to_tc() {
    let mut dp = datapath();
    node(&mut dp, false);
    // An LB IP without endpoints: tc answers with the REJECT.
    install_service(&mut dp, 3, LB, 81, IPPROTO_TCP, &[]);
    let mut fragment = Pkt::new(OUTSIDE, 40000, VIP, 80, SYN).build();
    fragment[14 + 6] = 0x20; // more fragments
    let mut truncated = Pkt::new(OUTSIDE, 40000, VIP, 80, SYN).build();
    truncated.truncate(14 + 20 + 10);
    let mut arp = Pkt::new(OUTSIDE, 40000, VIP, 80, SYN).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut options = Pkt::new(OUTSIDE, 40000, "198.18.0.1", 22, SYN);
    options.ip_options = vec![1, 1, 1, 0];
    let frames = [
        (
            "no service",
            Pkt::new(OUTSIDE, 40000, "198.18.0.1", 22, SYN).build(),
        ),
        ("no service, IP options", options.build()),
        (
            "no endpoints",
            Pkt::new(OUTSIDE, 40000, LB, 81, SYN).build(),
        ),
        ("fragment", fragment),
        ("truncated", truncated),
        ("not IPv4", arp),
        ("an Ethernet header alone", vec![0u8; 14]),
    ];
    let packets_before = packets(&mut dp);
    for (what, frame) in &frames {
        let out = run_xdp(&mut dp, frame);
        assert_eq!(out.verdict, XDP_PASS, "{what}");
        assert_eq!(out.out, *frame, "{what}: untouched, unmarked");
    }
    assert_eq!(packets(&mut dp), packets_before, "tc counts these, not XDP");
    // And tc still does its part: the REJECT.
    let out = run(&mut dp, &frames[2].1);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
}

#[test]
#[ignore = "needs root"]
fn xdp_drops_what_tc_drops_counted_once() {
    let mut dp = lb_admitting_198_18_200();
    let denied = Pkt::new("198.18.201.7", 40000, LB, 80, SYN).build();
    assert_eq!(run_xdp(&mut dp, &denied).verdict, XDP_DROP);
    assert_eq!(drops(&mut dp, DropReason::SourceRange), 1);
    // Mid-stream TCP nobody tracks, to a service of the random scheduler.
    let stray = Pkt::new(OUTSIDE, 40001, LB, 80, ACK).build();
    assert_eq!(run_xdp(&mut dp, &stray).verdict, XDP_DROP);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 1);
    assert_eq!(counter(&mut dp, Counter::Dropped), 2);
}

#[test]
#[ignore = "needs root"]
fn xdp_sends_a_flow_back_out_of_its_interface_and_hands_the_rest_to_tc() {
    let mut dp = nodeport_30080();
    // The node: "ext" faces the outside client and, through a router on
    // it, the backends (on other nodes); "pod" holds a local pod.
    let (_ns, file, ext) = xdp_node(
        "kpxxdp",
        &[
            ("ext", "02:00:00:00:00:aa", "198.18.128.1/24"),
            ("pod", "02:00:00:00:00:cc", "198.18.3.254/24"),
        ],
        "198.18.128.254",
        &["198.18.1.0/24", "198.18.200.0/24"],
    );
    let marks = dp.xdp_marks();
    // The flow's first packet: bounced by XDP where it can mark frames,
    // else sent out of ext by tc.
    let syn = Pkt::new(OUTSIDE, 40000, NODE, 30080, SYN).build();
    let frame = first_sent_back(&mut dp, &syn, &file, ext);
    assert_eq!(frame[14 + 8], 63, "forwarded: TTL down by one");
    let seen = inspect(&frame);
    assert_eq!(seen.src, ip(NODE), "masqueraded to ext's address");
    assert_eq!(seen.dport, 8080);
    assert_eq!(event(&mut dp, Event::XdpTx), u64::from(marks));
    // The backend's reply comes back in on ext: out again, to the client.
    let reply = Pkt::new(&seen.dst.to_string(), 8080, NODE, seen.sport, SYN_ACK).build();
    let out = run_xdp_in(&mut dp, &reply, Some(&file), ext);
    assert_eq!(out.verdict, XDP_TX);
    let back = inspect(out.frame());
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(NODE), 30080, ip(OUTSIDE), 40000)
    );
    // The client's next segment, whoever set the flow up: bounced by XDP.
    let ack = Pkt::new(OUTSIDE, 40000, NODE, 30080, ACK).build();
    let out = run_xdp_in(&mut dp, &ack, Some(&file), ext);
    assert_eq!(inspect(bounced(&out)), seen);
    assert_eq!(event(&mut dp, Event::XdpTx), 2 + u64::from(marks));
    // A backend behind another interface (a local pod): translated, and
    // handed up marked, for tc ingress to redirect it; where XDP cannot
    // mark it, left untouched to tc, first packet and next.
    install_service(
        &mut dp,
        4,
        "198.19.4.4",
        80,
        IPPROTO_TCP,
        &[(9, "198.18.3.7", 8080)],
    );
    let frame = Pkt::new(OUTSIDE, 40002, "198.19.4.4", 80, SYN).build();
    let out = run_xdp_in(&mut dp, &frame, Some(&file), ext);
    assert_eq!(out.verdict, XDP_PASS);
    if marks {
        assert!(out.marked());
        let seen = inspect(out.frame());
        assert_eq!((seen.dst, seen.dport), (ip("198.18.3.7"), 8080));
        assert_eq!(out.frame()[14 + 8], 64, "the stack (or tc) forwards it");
        assert_eq!(event(&mut dp, Event::XdpStack), 1);
        return;
    }
    assert_eq!(out.out, frame, "untouched");
    let out = run_in(&mut dp, &frame, false, &file);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "tc sends it to the pod");
    let seen = inspect(&out.bytes);
    assert_eq!((seen.dst, seen.dport), (ip("198.18.3.7"), 8080));
    // The flow's next packet (the SYN again: nothing has answered it).
    let out = run_xdp_in(&mut dp, &frame, Some(&file), ext);
    assert_eq!((out.verdict, &out.out), (XDP_PASS, &frame), "untouched");
    assert_eq!(
        run_in(&mut dp, &frame, false, &file).verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(event(&mut dp, Event::XdpStack), 0);
}

// Direct server return (`--nodeport-mode=dsr|hybrid`), on both families:
// the node of [`family_node`] balances, another with the same services
// receives.

/// [`family_node`] with NodePorts 30080/TCP and 30053/UDP (the standard
/// scenario's services) and direct server return for `flags`
/// (`CFG_F_DSR_*`; none: a node that only receives), for the family's
/// flows (IPv6's: `--dsr-ipv6` too).
fn dsr_node_of<F: Node>(flags: u32) -> Datapath {
    let family = if flags != 0 && F::NAME == "IPv6" {
        proxy_common::CFG_F_DSR_IPV6
    } else {
        0
    };
    dsr_settings::<F>(flags | family)
}

/// [`dsr_node_of`] with the settings' flags exactly `flags`.
fn dsr_settings<F: Node>(flags: u32) -> Datapath {
    let mut dp = family_node::<F>(false);
    for (port, proto, svc) in [
        (30080, IPPROTO_TCP, F::TCP_SVC),
        (30053, IPPROTO_UDP, F::TCP_SVC + 1),
    ] {
        frontend(
            &mut dp,
            (F::ANY, port, proto),
            svc,
            3,
            SVC_F_EXTERNAL | SVC_F_NODEPORT,
            &[],
        );
    }
    let mut cfg = dp.maps.config.get(&0, 0).unwrap();
    cfg.flags |= flags;
    dp.maps.set_config(&cfg).unwrap();
    dp
}

/// A namespace whose FIB reaches IPv6's backends (2001:2:0:1::/64) through
/// a router out of `out0` (2001:2:0:fe::1/64, MAC 02::aa; the router's MAC
/// 02::bb), and its file for [`run_in`].
fn fib_netns6(prefix: &str) -> (Netns, std::fs::File) {
    let (ns, file, _) = support::xdp_node(
        prefix,
        &[("out0", "02:00:00:00:00:aa", "2001:2:0:fe::1/64")],
        "2001:2:0:fe::ff",
        &["2001:2:0:1::/64"],
    );
    (ns, file)
}

/// A frame direct server return sent, taken apart: the outer addresses,
/// the service address the option carries, and the inner packet as a
/// frame. [`Node::sent`] checks the outer headers field by field against
/// the format (`proxy_common::dsr`).
struct Sent {
    outer_src: std::net::IpAddr,
    outer_dst: std::net::IpAddr,
    svc: (std::net::IpAddr, u16),
    inner: Vec<u8>,
}

/// [`Node::sent`] for IPv4.
fn geneve(frame: &[u8]) -> Sent {
    use proxy_common::dsr::{ENCAP_LEN, GENEVE_PORT};
    let (iph, rest) = etherparse::Ipv4Header::from_slice(&frame[14..]).expect("outer IPv4");
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "outer checksum"
    );
    assert_eq!(iph.protocol, etherparse::IpNumber::UDP);
    assert!(iph.dont_fragment && iph.time_to_live == 64);
    assert_eq!(iph.total_len as usize, frame.len() - 14);
    let (udp, rest) = etherparse::UdpHeader::from_slice(rest).expect("outer UDP");
    assert_eq!(udp.destination_port, GENEVE_PORT);
    assert!(
        udp.source_port >= 0xc000,
        "an ephemeral port: {}",
        udp.source_port
    );
    assert_eq!(udp.length as usize, frame.len() - 14 - 20);
    assert_eq!(udp.checksum, 0);
    // Version 0, 3 words of options, no flags, IPv4, VNI 0; the option:
    // class 0xff7b, type 1, 2 words.
    assert_eq!(&rest[..8], &[0x03, 0, 0x08, 0, 0, 0, 0, 0]);
    assert_eq!(&rest[8..12], &[0xff, 0x7b, 0x01, 0x02]);
    let svc = (
        std::net::Ipv4Addr::new(rest[12], rest[13], rest[14], rest[15]),
        u16::from_be_bytes([rest[16], rest[17]]),
    );
    assert_eq!(&rest[18..20], &[0, 0]);
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(&frame[14 + ENCAP_LEN..]);
    Sent {
        outer_src: std::net::Ipv4Addr::from(iph.source).into(),
        outer_dst: std::net::Ipv4Addr::from(iph.destination).into(),
        svc: (svc.0.into(), svc.1),
        inner,
    }
}

/// [`Node::sent`] for IPv6: its UDP checksum verified over the whole
/// datagram too.
fn geneve6(frame: &[u8]) -> Sent {
    use proxy_common::dsr::{ENCAP_LEN6, GENEVE_PORT};
    let (iph, rest) = etherparse::Ipv6Header::from_slice(&frame[14..]).expect("outer IPv6");
    assert_eq!(iph.next_header, etherparse::IpNumber::UDP);
    assert_eq!(iph.hop_limit, 64);
    assert_eq!(iph.payload_length as usize, frame.len() - 14 - 40);
    let inner_ip = &frame[14 + ENCAP_LEN6..];
    assert_eq!(
        (iph.traffic_class, iph.flow_label),
        (
            (u32::from_be_bytes(inner_ip[..4].try_into().unwrap()) >> 20) as u8,
            etherparse::Ipv6FlowLabel::try_new(
                u32::from_be_bytes(inner_ip[..4].try_into().unwrap()) & 0xf_ffff
            )
            .unwrap()
        ),
        "the inner packet's class and label"
    );
    let (udp, payload) = etherparse::UdpHeader::from_slice(rest).expect("outer UDP");
    assert_eq!(udp.destination_port, GENEVE_PORT);
    assert!(udp.source_port >= 0xc000, "{}", udp.source_port);
    assert_eq!(udp.length as usize, frame.len() - 14 - 40);
    assert_ne!(udp.checksum, 0, "IPv6 has no zero UDP checksum");
    assert_eq!(
        udp.checksum,
        udp.calc_checksum_ipv6(&iph, payload).unwrap(),
        "the outer UDP checksum, over the inner packet too"
    );
    // Version 0, 6 words of options, no flags, IPv6, VNI 0; the option:
    // class 0xff7b, type 1, 5 words.
    assert_eq!(&payload[..8], &[0x06, 0, 0x86, 0xdd, 0, 0, 0, 0]);
    assert_eq!(&payload[8..12], &[0xff, 0x7b, 0x01, 0x05]);
    let addr: [u8; 16] = payload[12..28].try_into().unwrap();
    let svc = (
        std::net::Ipv6Addr::from(addr).into(),
        u16::from_be_bytes([payload[28], payload[29]]),
    );
    assert_eq!(&payload[30..32], &[0, 0]);
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(inner_ip);
    Sent {
        outer_src: std::net::Ipv6Addr::from(iph.source).into(),
        outer_dst: std::net::Ipv6Addr::from(iph.destination).into(),
        svc,
        inner,
    }
}

fn dsr_sends_a_flows_syns_to_the_backends_node_in_geneve_and_the_rest_plain<F: Node>() {
    let mut dp = dsr_node_of::<F>(proxy_common::CFG_F_DSR_TCP);
    let (_ns, file) = F::fib_netns("kpxdsr");
    let syn = F::frame(F::OUTSIDE, 40000, F::NODE, 30080, SYN);
    let out = run_in(&mut dp, &syn, false, &file);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "forwarded to out0");
    assert_eq!(
        &out.bytes[0..12],
        &[2, 0, 0, 0, 0, 0xbb, 2, 0, 0, 0, 0, 0xaa]
    );
    let g = F::sent(&out.bytes);
    // The client's address is kept: the flow is not masqueraded.
    let seen = F::flow(&g.inner);
    assert!(
        is::<F>(seen.src, F::OUTSIDE) && seen.sport == 40000 && seen.dport == 8080,
        "{seen:?}"
    );
    assert!(F::BACKENDS.iter().any(|b| is::<F>(seen.dst, b)));
    assert_eq!(
        g.inner[14 + F::HOP],
        63,
        "the inner packet was forwarded once"
    );
    // Outer: from the address the route to the backend picks, to the
    // backend (the fabric routes it as the flow's other packets).
    assert!(is::<F>(g.outer_src, F::OUT0) && g.outer_dst == seen.dst);
    assert!(
        is::<F>(g.svc.0, F::NODE) && g.svc.1 == 30080,
        "the address the client used: {:?}",
        g.svc
    );
    let key = fam::key::<F>(F::OUTSIDE, 40000, F::NODE, 30080, IPPROTO_TCP);
    let (_, original) = fam::ct_get::<F>(&dp, &key).expect("the flow");
    assert_eq!(
        original.flags & (CT_F_SNAT | CT_F_DSR_ENCAP),
        CT_F_DSR_ENCAP
    );
    assert_eq!(event(&mut dp, Event::DsrEncap), 1);
    assert_eq!(event(&mut dp, Event::Masqueraded), 0);
    // The client's retransmitted SYN goes the same way, to the same backend.
    let out = run_in(&mut dp, &syn, false, &file);
    assert_eq!(F::sent(&out.bytes).outer_dst, seen.dst);
    assert_eq!(event(&mut dp, Event::DsrEncap), 2);
    // Its ACK (the SYN-ACK never passed here) establishes the flow and
    // goes plain, translated as the flow's packets are.
    let ack = F::frame(F::OUTSIDE, 40000, F::NODE, 30080, ACK);
    for _ in 0..2 {
        let out = run_in(&mut dp, &ack, false, &file);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let plain = F::flow(&out.bytes);
        assert!(
            is::<F>(plain.src, F::OUTSIDE) && plain.dst == seen.dst && plain.dport == 8080,
            "{plain:?}"
        );
    }
    let (table, _) = fam::ct_get::<F>(&dp, &key).expect("the flow");
    assert_eq!(table, kpx::dataplane::maps::CtTable::Tcp, "established");
    assert_eq!(event(&mut dp, Event::DsrEncap), 2);
    // hybrid: UDP is masqueraded, as without DSR; pods keep the
    // reference's masquerade (DSR is for outside clients).
    for (src, dport, l4) in [(F::OUTSIDE, 30053, UDP), (F::POD, 30080, SYN)] {
        let frame = F::frame(src, 5001, F::NODE, dport, l4);
        let seen = F::flow(&run_in(&mut dp, &frame, false, &file).bytes);
        assert!(is::<F>(seen.src, F::OUT0), "masqueraded: {seen:?}");
    }
    assert_eq!(event(&mut dp, Event::DsrEncap), 2);
}

fn dsr_carries_udp_datagrams_that_fit_and_masquerades_a_flow_whose_first_does_not<F: Node>() {
    use proxy_common::{CFG_F_DSR_TCP, CFG_F_DSR_UDP};
    let mut dp = dsr_node_of::<F>(CFG_F_DSR_TCP | CFG_F_DSR_UDP);
    let (_ns, file) = F::fib_netns("kpxdsru");
    let dgram = F::frame(F::OUTSIDE, 5000, F::NODE, 30053, UDP);
    for n in 1..=3 {
        let g = F::sent(&run_in(&mut dp, &dgram, false, &file).bytes);
        let seen = F::flow(&g.inner);
        assert!(
            is::<F>(seen.src, F::OUTSIDE) && seen.dport == 5353,
            "{seen:?}"
        );
        assert!(is::<F>(g.svc.0, F::NODE) && g.svc.1 == 30053);
        assert_eq!(event(&mut dp, Event::DsrEncap), n, "every datagram");
    }
    // A first datagram that would not fit out0's MTU with the outer
    // headers: its flow is masqueraded, as without DSR, and counted.
    let big = |sport| {
        let payload = vec![7; 1500 - 2 * F::HLEN - 8];
        F::frame_with(F::OUTSIDE, sport, F::NODE, 30053, UDP, &payload)
    };
    let out = run_in(&mut dp, &big(5001), false, &file);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let seen = F::flow(&out.bytes);
    assert!(is::<F>(seen.src, F::OUT0), "masqueraded: {seen:?}");
    assert!((20000..=20255).contains(&seen.sport));
    assert_eq!(event(&mut dp, Event::DsrFallback), 1);
    // A DSR flow's datagram that does not fit goes plain: its flow is
    // known at the backend's node.
    let seen = F::flow(&run_in(&mut dp, &big(5000), false, &file).bytes);
    assert!(
        is::<F>(seen.src, F::OUTSIDE) && seen.dport == 5353,
        "{seen:?}"
    );
    assert_eq!(event(&mut dp, Event::DsrEncap), 3);
}

fn xdp_leaves_a_dsr_flows_first_packet_to_tc_untouched<F: Node>() {
    let mut dp = dsr_node_of::<F>(proxy_common::CFG_F_DSR_TCP);
    let syn = F::frame(F::OUTSIDE, 40000, F::NODE, 30080, SYN);
    let out = run_xdp(&mut dp, &syn);
    assert_eq!(out.verdict, XDP_PASS);
    assert!(!out.marked());
    assert_eq!(out.frame(), &syn[..], "untouched");
    let key = fam::key::<F>(F::OUTSIDE, 40000, F::NODE, 30080, IPPROTO_TCP);
    assert!(!fam::tracked::<F>(&dp, &key));
}

fn dsr_geneve_is_taken_out_at_the_backends_node_whose_replies_leave_from_the_service<F: Node>() {
    // Node A balances; its Geneve packet is node B's input.
    let mut a = dsr_node_of::<F>(proxy_common::CFG_F_DSR_TCP);
    let (_ns, file) = F::fib_netns("kpxdsrb");
    let syn = F::frame(F::OUTSIDE, 40000, F::NODE, 30080, SYN);
    let sent = run_in(&mut a, &syn, false, &file).bytes;
    let g = F::sent(&sent);
    let backend = F::flow(&g.inner);
    // Node B needs no DSR setting to receive.
    let mut b = dsr_node_of::<F>(0);
    let out = run(&mut b, &sent);
    // The empty namespace's FIB cannot say: up the stack, out of Geneve.
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.bytes.len(), g.inner.len(), "the outer headers gone");
    assert_eq!(F::flow(&out.bytes), backend, "the packet node A translated");
    assert_eq!(event(&mut b, Event::DsrDecap), 1);
    let key = fam::key::<F>(F::OUTSIDE, 40000, F::NODE, 30080, IPPROTO_TCP);
    let (_, original) = fam::ct_get::<F>(&b, &key).expect("the flow");
    assert_eq!(
        original.flags & proxy_common::CT_F_DSR_DECAP,
        proxy_common::CT_F_DSR_DECAP
    );
    // The backend's SYN-ACK, at its interface: from the service address,
    // straight to the client.
    let out = run(&mut b, &fam::answer::<F>(&backend, SYN_ACK));
    assert_eq!(out.verdict, TC_ACT_OK);
    let back = F::flow(&out.bytes);
    assert!(
        is::<F>(back.src, F::NODE)
            && back.sport == 30080
            && is::<F>(back.dst, F::OUTSIDE)
            && back.dport == 40000,
        "{back:?}"
    );
    // The retransmitted SYN, in Geneve again: delivered, the flow kept.
    let out = run(&mut b, &sent);
    assert_eq!(F::flow(&out.bytes), backend);
    assert_eq!(event(&mut b, Event::DsrDecap), 1);
    // Not DSR's: left as they are. Offsets in the outer UDP payload:
    // Geneve (8), the option's header (4), the service address, its port.
    let udp = 14 + F::HLEN + 8;
    let mut other_class = sent.clone();
    other_class[udp + 8] = 0x01;
    let mut other_length = sent.clone();
    other_length[udp + 11] ^= 0x07; // the other family's option: 2 ↔ 5 words
    let mut other_dst = sent.clone();
    // the inner destination's last byte, not the outer one's
    other_dst[14 + F::ENCAP + F::DST + F::ADDR_LEN - 1] ^= 1;
    let backend_addr = backend.dst.to_string();
    let truncated = F::frame_with(
        F::OUTSIDE,
        40000,
        &backend_addr,
        6081,
        UDP,
        &sent[udp..udp + 12],
    );
    for (what, frame) in [
        ("another option class", &other_class),
        ("another option length", &other_length),
        ("inner and outer destinations differ", &other_dst),
        ("shorter than the headers", &truncated),
    ] {
        let out = run(&mut b, frame);
        assert_eq!(out.verdict, TC_ACT_UNSPEC, "{what}");
        assert_eq!(&out.bytes, frame, "{what}");
    }
    // A service node B does not serve: dropped, counted.
    let mut unknown = sent.clone();
    unknown[udp + 12 + F::ADDR_LEN + 1] ^= 1; // the carried port: 30081
    let out = run(&mut b, &unknown);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut b, DropReason::DsrNoService), 1);
}

fn dsr_keeps_the_client_address_to_a_local_backend_without_geneve<F: Node>() {
    let mut dp = dsr_node_of::<F>(proxy_common::CFG_F_DSR_TCP);
    // Another service: one backend, on this node.
    let b1 = BackendAddr {
        addr: F::BACKENDS[0].parse().unwrap(),
        port: 8080,
        proto: IPPROTO_TCP,
        local: true,
    };
    let svc = F::TCP_SVC + 2;
    dp.maps
        .put_slot(
            SlotKey {
                svc_id: svc,
                slot: 0,
            },
            9,
            &b1,
        )
        .unwrap();
    frontend(
        &mut dp,
        (F::ANY, 30081, IPPROTO_TCP),
        svc,
        1,
        SVC_F_EXTERNAL | SVC_F_NODEPORT,
        &[],
    );
    let (_ns, file) = F::fib_netns("kpxdsrl");
    let syn = F::frame(F::OUTSIDE, 40000, F::NODE, 30081, SYN);
    let seen = F::flow(&run_in(&mut dp, &syn, false, &file).bytes);
    assert!(
        is::<F>(seen.src, F::OUTSIDE) && is::<F>(seen.dst, F::BACKENDS[0]),
        "plain, client kept: {seen:?}"
    );
    assert_eq!(event(&mut dp, Event::DsrEncap), 0);
    // Its reply comes back through this node: translated as any.
    let back = F::flow(&run(&mut dp, &fam::answer::<F>(&seen, SYN_ACK)).bytes);
    assert!(
        is::<F>(back.src, F::NODE) && back.sport == 30081 && is::<F>(back.dst, F::OUTSIDE),
        "{back:?}"
    );
}

fn dsr_at_the_backends_node_a_new_flow_on_an_old_tuple_replaces_it<F: Node>() {
    let mut b = dsr_node_of::<F>(0);
    let [_, b2, b3] = F::BACKENDS;
    // The balancing node, which names itself as the service address.
    let other = F::OTHER_NODE;
    let geneve = |backend: &str, l4, svc| {
        let inner = F::frame(F::OUTSIDE, 40000, backend, 8080, l4);
        F::geneve(other, &inner, (other, svc))
    };
    let out = run(&mut b, &geneve(b2, SYN, 30080));
    assert!(is::<F>(F::flow(&out.bytes).dst, b2));
    let syn_ack = F::frame(b2, 8080, F::OUTSIDE, 40000, SYN_ACK);
    assert!(is::<F>(F::flow(&run(&mut b, &syn_ack).bytes).src, other));
    // The client closes, and opens again from the same port; the other
    // node picks b3 this time. b3's replies must leave from the service.
    run(&mut b, &F::frame(b2, 8080, F::OUTSIDE, 40000, FIN_ACK));
    let out = run(&mut b, &geneve(b3, SYN, 30080));
    assert!(is::<F>(F::flow(&out.bytes).dst, b3));
    let syn_ack = F::frame(b3, 8080, F::OUTSIDE, 40000, SYN_ACK);
    let back = F::flow(&run(&mut b, &syn_ack).bytes);
    assert!(is::<F>(back.src, other) && back.sport == 30080, "{back:?}");
    assert_eq!(event(&mut b, Event::DsrDecap), 2);
    // A UDP flow whose backend changed (the other node's entry expired,
    // the client's port reused): the new backend wins at once.
    for backend in [F::BACKENDS[0], b2] {
        let inner = F::frame(F::OUTSIDE, 5000, backend, 5353, UDP);
        run(&mut b, &F::geneve(other, &inner, (other, 30053)));
        let answer = F::frame(backend, 5353, F::OUTSIDE, 5000, UDP);
        let back = F::flow(&run(&mut b, &answer).bytes);
        assert!(
            is::<F>(back.src, other) && back.sport == 30053,
            "{backend}: {back:?}"
        );
    }
}

/// Without `--dsr-ipv6` (a cluster some of whose nodes run a kpx that
/// cannot take IPv6 Geneve out), IPv6's flows are masqueraded while IPv4's
/// go by direct server return; any node takes IPv6 Geneve out.
#[test]
#[ignore = "needs root"]
fn ipv6_flows_go_by_dsr_only_with_its_own_flag() {
    use proxy_common::{CFG_F_DSR_TCP, CFG_F_DSR_UDP};
    let mut dp = dsr_settings::<V6>(CFG_F_DSR_TCP | CFG_F_DSR_UDP);
    let (_ns, file) = fib_netns6("kpxdsr6f");
    for (sport, dport, l4) in [(40000, 30080, SYN), (5000, 30053, UDP)] {
        let frame = V6::frame(<V6 as Node>::OUTSIDE, sport, <V6 as Node>::NODE, dport, l4);
        let seen = V6::flow(&run_in(&mut dp, &frame, false, &file).bytes);
        assert!(
            is::<V6>(seen.src, <V6 as Node>::OUT0),
            "masqueraded: {seen:?}"
        );
    }
    assert_eq!(event(&mut dp, Event::DsrEncap), 0);
    assert_eq!(event(&mut dp, Event::DsrFallback), 0);
    // IPv4's, on the same settings, go by DSR.
    let mut dp4 = dsr_settings::<V4>(CFG_F_DSR_TCP | CFG_F_DSR_UDP);
    let (_ns4, file4) = fib_netns("kpxdsr4f");
    let syn = V4::frame(OUTSIDE, 40000, NODE, 30080, SYN);
    V4::sent(&run_in(&mut dp4, &syn, false, &file4).bytes);
    assert_eq!(event(&mut dp4, Event::DsrEncap), 1);
}

#[test]
#[ignore = "needs root"]
fn dsr_does_not_carry_ipv6_extension_headers_and_masquerades_their_flow() {
    let mut dp = dsr_node_of::<V6>(proxy_common::CFG_F_DSR_TCP);
    let (_ns, file) = fib_netns6("kpxdsr6x");
    let (outside, node) = (<V6 as Node>::OUTSIDE, <V6 as Node>::NODE);
    let mut opts = Pkt6::new(outside, 40001, node, 30080, SYN);
    opts.ext.push(Ext::options(60, 1));
    let out = run_in(&mut dp, &opts.build(), false, &file);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let seen = inspect6(&out.bytes);
    assert_eq!(seen.src, ip6(<V6 as Node>::OUT0), "masqueraded");
    assert_eq!(event(&mut dp, Event::DsrFallback), 1);
    assert_eq!(event(&mut dp, Event::DsrEncap), 0);
}

// Masquerade ports, traffic policies, source ranges and who is
// masqueraded, on both families: the node of [`node`] and its IPv6 twin
// ([`Node`]).

crate::both_families!(
    dsr_sends_a_flows_syns_to_the_backends_node_in_geneve_and_the_rest_plain,
    dsr_carries_udp_datagrams_that_fit_and_masquerades_a_flow_whose_first_does_not,
    xdp_leaves_a_dsr_flows_first_packet_to_tc_untouched,
    dsr_geneve_is_taken_out_at_the_backends_node_whose_replies_leave_from_the_service,
    dsr_keeps_the_client_address_to_a_local_backend_without_geneve,
    dsr_at_the_backends_node_a_new_flow_on_an_old_tuple_replaces_it,
    masquerade_ports_never_collide_and_run_out_into_a_counted_drop,
    local_policy_keeps_the_source_uses_local_endpoints_and_drops_without_them,
    source_ranges_admit_by_longest_prefix_and_drop_the_rest,
    cluster_ips_masquerade_outsiders_hairpin_and_everything_with_masquerade_all,
);

/// A family's node of the tests: its addresses and its cluster CIDR.
trait Node: Fam {
    /// The unspecified address: NodePort frontends'.
    const ANY: &'static str;
    /// The node's address (serves NodePorts, masquerade source), outside
    /// the cluster CIDR.
    const NODE: &'static str;
    const CLUSTER_CIDR: &'static str;
    /// A pod (in the cluster CIDR) and a client off the cluster.
    const POD: &'static str;
    const OUTSIDE: &'static str;
    /// A LoadBalancer IP, the range it admits, and a client outside it.
    const LB: &'static str;
    const ADMITTED: &'static str;
    const REFUSED: &'static str;
    /// Another node, which balances flows to this one's backends with
    /// direct server return.
    const OTHER_NODE: &'static str;
    /// [`Node::fib_netns`]' own address (out0's): a masquerade's source
    /// towards the backends, the outer source of direct server return.
    const OUT0: &'static str;
    /// The IP header's length (no options or extension headers), an
    /// address's, the destination's offset and the TTL's (hop limit's) in
    /// it, and direct server return's outer headers' length.
    const HLEN: usize;
    const ADDR_LEN: usize;
    const DST: usize;
    const HOP: usize;
    const ENCAP: usize;

    /// [`Fam::frame`] with `payload`.
    fn frame_with(src: &str, sport: u16, dst: &str, dport: u16, l4: L4, payload: &[u8]) -> Vec<u8>;
    /// A frame direct server return sent, its outer headers checked and
    /// taken apart.
    fn sent(frame: &[u8]) -> Sent;

    /// A namespace whose FIB reaches the family's backends, and its file
    /// for [`run_in`].
    fn fib_netns(prefix: &str) -> (Netns, std::fs::File);
    /// `inner` (a frame) in Geneve from `from`, as direct server return's
    /// sender writes it, naming the service address `svc`.
    fn geneve(from: &str, inner: &[u8], svc: (&str, u16)) -> Vec<u8>;
}

impl Node for V4 {
    const ANY: &'static str = "0.0.0.0";
    const NODE: &'static str = NODE;
    const CLUSTER_CIDR: &'static str = "198.18.0.0/17";
    const POD: &'static str = POD;
    const OUTSIDE: &'static str = OUTSIDE;
    const LB: &'static str = LB;
    const ADMITTED: &'static str = "198.18.200.0/24";
    const REFUSED: &'static str = "198.18.201.7";
    const OTHER_NODE: &'static str = "198.18.128.9";
    const OUT0: &'static str = "198.18.1.254";
    const HLEN: usize = 20;
    const ADDR_LEN: usize = 4;
    const DST: usize = 16;
    const HOP: usize = 8;
    const ENCAP: usize = proxy_common::dsr::ENCAP_LEN;

    fn frame_with(src: &str, sport: u16, dst: &str, dport: u16, l4: L4, payload: &[u8]) -> Vec<u8> {
        let mut p = Pkt::new(src, sport, dst, dport, l4);
        p.payload = payload.to_vec();
        p.build()
    }
    fn sent(frame: &[u8]) -> Sent {
        geneve(frame)
    }

    fn fib_netns(prefix: &str) -> (Netns, std::fs::File) {
        fib_netns(prefix)
    }
    fn geneve(from: &str, inner: &[u8], svc: (&str, u16)) -> Vec<u8> {
        support::geneve_frame_of(from, inner, svc)
    }
}

impl Node for V6 {
    const ANY: &'static str = "::";
    const NODE: &'static str = "2001:2:0:80::1";
    const CLUSTER_CIDR: &'static str = "2001:2::/57";
    const POD: &'static str = "2001:2:0:2::9";
    const OUTSIDE: &'static str = "2001:2:0:c8::7";
    const LB: &'static str = "2001:2:0:fe::30";
    const ADMITTED: &'static str = "2001:2:0:c8::/64";
    const REFUSED: &'static str = "2001:2:0:c9::7";
    const OTHER_NODE: &'static str = "2001:2:0:80::9";
    const OUT0: &'static str = "2001:2:0:fe::1";
    const HLEN: usize = 40;
    const ADDR_LEN: usize = 16;
    const DST: usize = 24;
    const HOP: usize = 7;
    const ENCAP: usize = proxy_common::dsr::ENCAP_LEN6;

    fn frame_with(src: &str, sport: u16, dst: &str, dport: u16, l4: L4, payload: &[u8]) -> Vec<u8> {
        let mut p = Pkt6::new(src, sport, dst, dport, l4);
        p.payload = payload.to_vec();
        p.build()
    }
    fn sent(frame: &[u8]) -> Sent {
        geneve6(frame)
    }

    fn fib_netns(prefix: &str) -> (Netns, std::fs::File) {
        fib_netns6(prefix)
    }
    fn geneve(from: &str, inner: &[u8], svc: (&str, u16)) -> Vec<u8> {
        support::v6::geneve_frame6_of(from, inner, svc)
    }
}

/// The family's standard scenario on a node: cluster CIDR, masquerade to
/// `NODE` on ports 20000-20255, `NODE` serving NodePorts (the agent's own
/// `datapath_config` and writes).
fn family_node<F: Node>(masquerade_all: bool) -> Datapath {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    let cfg = kpx::dataplane::node::datapath_config(
        &[F::CLUSTER_CIDR.parse().unwrap()],
        &[F::NODE.parse().unwrap()],
        &PortRange(20000..=20255),
        masquerade_all,
    );
    let node = F::NODE.parse().unwrap();
    for op in [
        Op::SetConfig(cfg),
        Op::PutNodeAddr(node, NODE_F_LOCAL | NODE_F_NODEPORT),
    ] {
        dp.maps.write(&op).unwrap();
    }
    dp
}

/// What the datapath made of a SYN or datagram that it passed.
fn pass<F: Node>(dp: &mut Datapath, frame: &[u8]) -> fam::Flow {
    let out = run(dp, frame);
    assert_eq!(out.verdict, TC_ACT_OK, "{}", F::NAME);
    F::flow(&out.bytes)
}

fn is<F: Node>(a: std::net::IpAddr, s: &str) -> bool {
    a == s.parse::<std::net::IpAddr>().unwrap()
}

fn masquerade_ports_never_collide_and_run_out_into_a_counted_drop<F: Node>() {
    let mut dp = family_node::<F>(false);
    // One backend and two masquerade ports.
    let mut cfg = dp.maps.config.get(&0, 0).unwrap();
    cfg.snat_port_min = 20000;
    cfg.snat_port_max = 20001;
    dp.maps.set_config(&cfg).unwrap();
    let udp_svc = F::TCP_SVC + 1;
    frontend(
        &mut dp,
        (F::ANY, 30080, IPPROTO_UDP),
        udp_svc,
        1,
        SVC_F_EXTERNAL,
        &[],
    );
    let to_nodeport = |sport| F::frame(F::OUTSIDE, sport, F::NODE, 30080, UDP);
    let mut ports = Vec::new();
    for sport in [1000, 1001] {
        let seen = pass::<F>(&mut dp, &to_nodeport(sport));
        assert!(is::<F>(seen.src, F::NODE), "{seen:?}");
        ports.push(seen.sport);
    }
    ports.sort();
    assert_eq!(ports, [20000, 20001], "two flows, two distinct ports");
    let out = run(&mut dp, &to_nodeport(1002));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::SnatExhausted), 1);
    // The failed flow left nothing behind.
    let key = fam::key::<F>(F::OUTSIDE, 1002, F::NODE, 30080, IPPROTO_UDP);
    assert!(!fam::tracked::<F>(&dp, &key));
}

fn local_policy_keeps_the_source_uses_local_endpoints_and_drops_without_them<F: Node>() {
    let mut dp = family_node::<F>(false);
    let [_, b2_id, b3_id] = F::TCP_IDS;
    let [_, b2, b3] = F::BACKENDS;
    let svc = (F::TCP_SVC, 3);
    // LB IP with externalTrafficPolicy Local: local table = the second
    // backend.
    let lb = (F::LB, 80, IPPROTO_TCP);
    frontend(
        &mut dp,
        lb,
        svc.0,
        svc.1,
        SVC_F_EXTERNAL | SVC_F_LOCAL,
        &[b2_id],
    );
    let seen = pass::<F>(&mut dp, &F::frame(F::OUTSIDE, 40000, F::LB, 80, SYN));
    assert!(
        is::<F>(seen.src, F::OUTSIDE) && seen.sport == 40000,
        "{seen:?}"
    );
    assert!(is::<F>(seen.dst, b2), "{seen:?}");
    // A pod is short-circuited to all endpoints, its address kept.
    let mut reached = std::collections::BTreeSet::new();
    for sport in 1000..1060 {
        let seen = pass::<F>(&mut dp, &F::frame(F::POD, sport, F::LB, 80, SYN));
        assert!(is::<F>(seen.src, F::POD), "{seen:?}");
        reached.insert(seen.dst);
    }
    assert_eq!(reached.len(), 3, "pods use the cluster-wide table");
    // No local endpoint: outside clients are dropped, counted.
    let lb81 = (F::LB, 81, IPPROTO_TCP);
    frontend(
        &mut dp,
        lb81,
        svc.0,
        svc.1,
        SVC_F_EXTERNAL | SVC_F_LOCAL,
        &[],
    );
    let out = run(&mut dp, &F::frame(F::OUTSIDE, 40001, F::LB, 81, SYN));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::NoLocalEndpoint), 1);
    // internalTrafficPolicy Local on a cluster IP: local table, and a drop
    // (not a reject) when it is empty but the service has endpoints.
    let vip = (F::VIP, 80, IPPROTO_TCP);
    frontend(&mut dp, vip, svc.0, svc.1, SVC_F_LOCAL, &[b3_id]);
    let seen = pass::<F>(&mut dp, &F::frame(F::POD, 2000, F::VIP, 80, SYN));
    assert!(is::<F>(seen.dst, b3), "{seen:?}");
    frontend(&mut dp, vip, svc.0, svc.1, SVC_F_LOCAL, &[]);
    let out = run(&mut dp, &F::frame(F::POD, 2001, F::VIP, 80, SYN));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::NoLocalEndpoint), 2);
}

fn source_ranges_admit_by_longest_prefix_and_drop_the_rest<F: Node>() {
    let mut dp = family_node::<F>(false);
    let lb = (F::LB, 80, IPPROTO_TCP);
    let flags = SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES;
    frontend(&mut dp, lb, F::TCP_SVC, 3, flags, &[]);
    let range = |svc, r: &str| Op::PutRange(svc, r.parse().unwrap());
    dp.maps.write(&range(F::TCP_SVC, F::ADMITTED)).unwrap();
    // Another frontend's "everyone" must not leak into this one.
    let everyone = if F::NAME == "IPv4" {
        "0.0.0.0/0"
    } else {
        "::/0"
    };
    dp.maps.write(&range(F::TCP_SVC + 7, everyone)).unwrap();
    pass::<F>(&mut dp, &F::frame(F::OUTSIDE, 40000, F::LB, 80, SYN));
    let out = run(&mut dp, &F::frame(F::REFUSED, 40000, F::LB, 80, SYN));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::SourceRange), 1);
}

fn cluster_ips_masquerade_outsiders_hairpin_and_everything_with_masquerade_all<F: Node>() {
    let mut dp = family_node::<F>(false);
    let to_vip = |src, sport| F::frame(src, sport, F::VIP, 80, SYN);
    let seen = pass::<F>(&mut dp, &to_vip(F::POD, 1000));
    assert!(is::<F>(seen.src, F::POD), "pods keep their address");
    let seen = pass::<F>(&mut dp, &to_vip(F::OUTSIDE, 1000));
    assert!(is::<F>(seen.src, F::NODE), "off-cluster is masqueraded");
    // Hairpin: a backend reaching the service until it picks itself.
    let b1 = F::BACKENDS[0];
    let mut hairpins = 0;
    for sport in 2000..2100 {
        let seen = pass::<F>(&mut dp, &to_vip(b1, sport));
        if is::<F>(seen.dst, b1) {
            assert!(is::<F>(seen.src, F::NODE), "hairpin must be masqueraded");
            hairpins += 1;
        } else {
            assert!(is::<F>(seen.src, b1), "{seen:?}");
        }
    }
    assert!(hairpins > 0);
    let mut dp = family_node::<F>(true);
    let seen = pass::<F>(&mut dp, &to_vip(F::POD, 1000));
    assert!(is::<F>(seen.src, F::NODE), "masquerade-all");
}
