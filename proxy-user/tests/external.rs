//! Traffic from outside the node, end to end: two node namespaces, each
//! running the real `kpx agent`, pods on both, and clients outside the
//! cluster on the same fabric. Each case checks the source address the
//! backend sees against kube-proxy's iptables rules, that replies come back,
//! and that dropped cases time out while their drop counter grows.
//!
//! What the reference does, case by case (pkg/proxy/iptables/proxier.go):
//! - NodePort, externalIP, LB IP with `externalTrafficPolicy: Cluster`:
//!   `KUBE-EXT` marks for masquerade; `MASQUERADE` picks the address of the
//!   interface towards the backend (the node IP across nodes, the pod-side
//!   gateway for a local pod);
//! - `externalTrafficPolicy: Local`: the client's address is kept; a node
//!   without local endpoints drops; pods are short-circuited to all
//!   endpoints, keeping their address;
//! - a cluster IP from outside the cluster CIDR is masqueraded, from a pod
//!   it is not; a pod reaching itself (hairpin) is masqueraded;
//! - `loadBalancerSourceRanges`: other sources are dropped (`KUBE-FW`);
//! - the node's own connections keep the node's address.

mod bed;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
    time::Duration,
};

use bed::{event_count, KPX, T};
use kpx::dataplane::maps::MapSet;
use proxy_common::{DropReason, Event};
use testbed::{service_manifest, tcp_who, udp_who, wait_for, Cluster, Ep, MultiNode, GATEWAY};

const A1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const A2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const B1: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 100);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 101);

/// ClusterIP, NodePort 30080, externalIP and LB IP; endpoints a1 (node 1)
/// and b1 (node 2); externalTrafficPolicy Cluster.
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const WEB_EXT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const WEB_LB: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 10);
/// LoadBalancer with externalTrafficPolicy Local; its only endpoint is b1.
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const LOCAL_LB: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 20);
/// LoadBalancer with source ranges admitting only CLIENT; endpoint a2.
const FW_LB: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 30);
/// ClusterIP whose only endpoint is a1 (for hairpin).
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 40);

/// The Service and EndpointSlice of `name`, endpoints ready.
fn service(name: &str, spec: &str, status: &str, eps: &[Ep]) -> String {
    service_manifest(name, spec, status, "", eps)
}

fn manifests() -> String {
    let a1 = || Ep::ready(A1, "node-1");
    let a2 = Ep::ready(A2, "node-1");
    let b1 = || Ep::ready(B1, "node-2");
    let ports = |tcp_np: u16, udp_np: u16| {
        format!(
            "  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {tcp_np}}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {udp_np}}}"
        )
    };
    let lb = |ip: Ipv4Addr| format!("status:\n  loadBalancer:\n    ingress:\n    - {{ip: {ip}}}");
    [
        service(
            "web",
            &format!(
                "  type: LoadBalancer\n  clusterIP: {WEB_VIP}\n  externalIPs: [{WEB_EXT}]\n{}",
                ports(30080, 30053)
            ),
            &lb(WEB_LB),
            &[a1(), b1()],
        ),
        service(
            "local",
            &format!(
                "  type: LoadBalancer\n  clusterIP: {LOCAL_VIP}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30999\n{}",
                ports(30081, 30054)
            ),
            &lb(LOCAL_LB),
            &[b1()],
        ),
        service(
            "fw",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 198.19.0.30\n  loadBalancerSourceRanges: [{CLIENT}/32]\n{}",
                ports(30082, 30055)
            ),
            &lb(FW_LB),
            &[a2],
        ),
        service(
            "self",
            &format!(
                "  clusterIP: {SELF_VIP}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}\n  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}"
            ),
            "",
            &[a1()],
        ),
    ]
    .join("---\n")
}

/// Frontends per node: web 2 ports × (cluster IP, NodePort, external IP,
/// LB IP) = 8, local 6, fw 6, self 2.
const FRONTENDS: usize = 22;

fn bed() -> MultiNode {
    bed_with(&[], false)
}

/// The bed, its agents started with `extra` flags; `wire`: like a wire for
/// native XDP on the nodes' veths: the fabric side of each is in NAPI mode
/// (and so takes the frames XDP bounces), and every sender finishes its
/// checksums (XDP sees frames, not the skb saying a checksum is partial).
fn bed_with(extra: &[&str], wire: bool) -> MultiNode {
    let mut bed = testbed::built(
        "the two-node bed",
        MultiNode::new(&[&[("a1", A1), ("a2", A2)], &[("b1", B1)]]),
    );
    bed.add_client(CLIENT).unwrap();
    bed.add_client(STRANGER).unwrap();
    if wire {
        // The fabric's ports, in plugging order: the nodes', then the
        // clients'. An XDP program that passes everything puts a veth in
        // NAPI mode, in which it takes the frames its peer's XDP sends.
        for port in ["fp0", "fp1"] {
            let ifindex = bed
                .fabric
                .netns
                .enter(|| nix::net::if_::if_nametoindex(port))
                .unwrap()
                .unwrap();
            let prog = testbed::xdp::raw_xdp(testbed::xdp::XDP_PASS).unwrap();
            let link = bed
                .fabric
                .netns
                .enter(|| testbed::xdp::attach_native(&prog, ifindex))
                .unwrap()
                .unwrap();
            bed.held.extend([prog, link]);
        }
        for c in &bed.clients {
            c.set_tx_checksum("eth0", false).unwrap();
        }
        for n in &bed.nodes {
            n.node.set_tx_checksum("eth0", false).unwrap();
            for (i, p) in n.pods.iter().enumerate() {
                p.netns.set_tx_checksum("eth0", false).unwrap();
                n.node.set_tx_checksum(&format!("kpxh{i}"), false).unwrap();
            }
        }
    }
    bed.write_manifest("all.yaml", &manifests()).unwrap();
    for n in &mut bed.nodes {
        for p in n.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>() {
            n.serve(&p, 8080, 5353).unwrap();
        }
        n.start_agent(Path::new(KPX), extra).unwrap();
    }
    for n in &bed.nodes {
        synced(n);
    }
    bed
}

fn synced(n: &Cluster) {
    synced_to(n, FRONTENDS);
}

/// Waits until `n`'s maps serve `frontends` frontends (both families).
fn synced_to(n: &Cluster, frontends: usize) {
    let ok = wait_for(Duration::from_secs(20), || {
        let maps = MapSet::open_pinned(&n.bpffs()).ok()?;
        let st = maps.serving().ok()?;
        (st.services.len() == frontends && maps.node_addrs.keys().count() > 0).then_some(())
    });
    assert!(
        ok.is_some(),
        "{} did not sync; log:\n{}",
        n.node_name,
        n.agent_log()
    );
}

fn drops(n: &Cluster, reason: DropReason) -> u64 {
    let maps = MapSet::open_pinned(&n.bpffs()).unwrap();
    maps.drops()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, v)| v)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Connects until every backend of `expect` answered; checks each saw the
/// client as `seen_as(identity)` and that the reply came from `to`.
fn reaches<E: Into<IpAddr> + Copy>(
    bed: &MultiNode,
    client: &testbed::Netns,
    to: impl Into<SocketAddr>,
    expect: &[(&str, E)],
) {
    let to: SocketAddr = to.into();
    let mut missing: Vec<&str> = expect.iter().map(|(n, _)| *n).collect();
    for attempt in 0..60 {
        let (seen, local) = tcp_who(client, to, T).unwrap_or_else(|e| {
            panic!(
                "TCP to {to} (attempt {attempt}) failed: {e:#}\nnode-1:\n{}\nnode-2:\n{}",
                bed.nodes[0].agent_log(),
                bed.nodes[1].agent_log()
            )
        });
        let Some((_, want)) = expect.iter().find(|(n, _)| *n == seen.identity) else {
            panic!("TCP to {to}: unexpected backend {seen:?}");
        };
        assert_eq!(
            seen.client.ip(),
            (*want).into(),
            "TCP to {to}: {} saw the client as {} (client is {local})",
            seen.identity,
            seen.client
        );
        missing.retain(|n| *n != seen.identity);
        if missing.is_empty() {
            break;
        }
    }
    assert!(missing.is_empty(), "TCP to {to}: never reached {missing:?}");
    // UDP: one datagram, answered from the address asked.
    let udp_to = SocketAddr::new(to.ip(), udp_port(to.port()));
    let (seen, from) = udp_who(client, udp_to, T).unwrap_or_else(|e| panic!("UDP to {to}: {e:#}"));
    assert_eq!(from, udp_to);
    let want = expect
        .iter()
        .find(|(n, _)| *n == seen.identity)
        .unwrap_or_else(|| panic!("UDP to {to}: unexpected backend {seen:?}"));
    assert_eq!(seen.client.ip(), want.1.into(), "UDP {seen:?}");
}

/// The UDP port beside a TCP frontend port in these manifests.
fn udp_port(tcp: u16) -> u16 {
    match tcp {
        80 => 53,
        p => p - 27, // 30080 → 30053, 30081 → 30054, ...
    }
}

/// A connection that must not be answered: times out, and `reason` grows
/// on `node`.
fn dropped(client: &testbed::Netns, to: SocketAddrV4, node: &Cluster, reason: DropReason) {
    let before = drops(node, reason);
    let err = tcp_who(client, to, Duration::from_millis(700))
        .expect_err("a dropped connection was answered");
    let timed_out = err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        })
    });
    assert!(timed_out, "{to}: expected a timeout (a drop), got {err:#}");
    assert!(
        drops(node, reason) > before,
        "{to}: the {} drop counter on {} did not grow",
        reason.name(),
        node.node_name
    );
}

#[test]
#[ignore = "needs root"]
fn nodeport_external_and_lb_ips_with_cluster_policy_masquerade_like_the_reference() {
    let bed = bed();
    let client = &bed.clients[0];
    let n1 = MultiNode::node_ip(1);
    let n2 = MultiNode::node_ip(2);
    // Through node 1: a1 is local (MASQUERADE picks the pod-side gateway),
    // b1 is across the fabric (node 1's address).
    let via_n1 = [("a1", GATEWAY), ("b1", n1)];
    reaches(&bed, client, at(n1, 30080), &via_n1);
    reaches(&bed, client, at(WEB_EXT, 80), &via_n1);
    reaches(&bed, client, at(WEB_LB, 80), &via_n1);
    // Through node 2, as node 2 masquerades.
    reaches(&bed, client, at(n2, 30080), &[("a1", n2), ("b1", GATEWAY)]);
    assert!(event_count(&bed.nodes[0], Event::Masqueraded) > 0);
    assert!(
        event_count(&bed.nodes[0], Event::FibRedirect) > 0,
        "FIB forwarding unused"
    );
    // XDP's default (auto) leaves a veth to tc: its XDP_TX would need the
    // peer to run XDP or GRO.
    let log = bed.nodes[0].agent_log();
    assert!(log.contains("XDP: eth0 is a veth"), "{log}");
    assert_eq!(event_count(&bed.nodes[0], Event::XdpTx), 0);
    // A NodePort on an address that is not this node's is not served here.
    let maps = MapSet::open_pinned(&bed.nodes[0].bpffs()).unwrap();
    assert!(maps
        .node_addrs
        .get(&proxy_common::wire::addr(n2), 0)
        .is_err());
}

#[test]
#[ignore = "needs root"]
fn local_policy_keeps_the_client_address_and_drops_without_local_endpoints() {
    let bed = bed();
    let client = &bed.clients[0];
    // Node 2 has the endpoint: the backend sees the client itself.
    reaches(
        &bed,
        client,
        at(MultiNode::node_ip(2), 30081),
        &[("b1", CLIENT)],
    );
    // Node 1 has none: the LB IP (routed to node 1) and its NodePort drop.
    dropped(
        client,
        at(LOCAL_LB, 80),
        &bed.nodes[0],
        DropReason::NoLocalEndpoint,
    );
    dropped(
        client,
        at(MultiNode::node_ip(1), 30081),
        &bed.nodes[0],
        DropReason::NoLocalEndpoint,
    );
    // A pod on node 1 reaching the LB IP is short-circuited to the service,
    // keeping its address.
    let a1 = &bed.pod("a1").netns;
    reaches(&bed, a1, at(LOCAL_LB, 80), &[("b1", A1)]);
    // The node itself reaching the LB IP: the cluster-wide endpoints, from
    // the node's address.
    reaches(
        &bed,
        &bed.nodes[0].node,
        at(LOCAL_LB, 80),
        &[("b1", MultiNode::node_ip(1))],
    );
    assert!(event_count(&bed.nodes[0], Event::FromNode) > 0);
}

#[test]
#[ignore = "needs root"]
fn source_ranges_admit_only_their_clients() {
    let bed = bed();
    reaches(&bed, &bed.clients[0], at(FW_LB, 80), &[("a2", GATEWAY)]);
    dropped(
        &bed.clients[1],
        at(FW_LB, 80),
        &bed.nodes[0],
        DropReason::SourceRange,
    );
    // NodePorts are not subject to source ranges (as in the reference).
    reaches(
        &bed,
        &bed.clients[1],
        at(MultiNode::node_ip(1), 30082),
        &[("a2", GATEWAY)],
    );
}

#[test]
#[ignore = "needs root"]
fn cluster_ips_masquerade_outsiders_and_hairpin_but_not_pods() {
    let bed = bed();
    let n1 = MultiNode::node_ip(1);
    // From outside the cluster CIDR (the client routes service addresses to
    // node 1): masqueraded.
    reaches(
        &bed,
        &bed.clients[0],
        at(WEB_VIP, 80),
        &[("a1", GATEWAY), ("b1", n1)],
    );
    // From a pod: its own address, on this node and across the fabric.
    let a2 = &bed.pod("a2").netns;
    reaches(&bed, a2, at(WEB_VIP, 80), &[("a1", A2), ("b1", A2)]);
    // A pod reaching itself through its service: masqueraded, or its reply
    // would never leave it.
    let a1 = &bed.pod("a1").netns;
    reaches(&bed, a1, at(SELF_VIP, 80), &[("a1", GATEWAY)]);
    // The node itself reaching a cluster IP keeps its address.
    reaches(
        &bed,
        &bed.nodes[0].node,
        at(WEB_VIP, 80),
        &[("a1", GATEWAY), ("b1", n1)],
    );
}

#[test]
#[ignore = "needs root"]
fn dump_shows_external_frontends_and_masquerade_entries() {
    let bed = bed();
    let _ = tcp_who(&bed.clients[0], at(MultiNode::node_ip(1), 30080), T).unwrap();
    let dump = |what: &str| {
        String::from_utf8_lossy(&bed::kpx_dump(&bed.nodes[0].bpffs(), &[what])).into_owned()
    };
    let services = dump("services");
    let line = |frontend: &str| {
        services
            .lines()
            .find(|l| l.starts_with("TCP") && l.contains(&format!(" {frontend} ")))
            .unwrap_or_else(|| panic!("no TCP {frontend} in\n{services}"))
            .to_string()
    };
    assert!(line("*:30080").ends_with("nodeport"));
    assert!(line("*:30081").ends_with("nodeport local"));
    assert!(line(&format!("{WEB_EXT}:80")).ends_with("external"));
    assert!(line(&format!("{LOCAL_LB}:80")).ends_with("external local"));
    assert!(
        line(&format!("{FW_LB}:80")).ends_with(&format!("external source-ranges [{CLIENT}/32]"))
    );
    assert!(line(&format!("{WEB_VIP}:80")).ends_with("cluster-ip"));
    let ct = dump("conntrack");
    assert!(ct.contains("masq"), "no masqueraded flow in\n{ct}");
}

/// Traffic from outside with XDP on the nodes' fabric interfaces (the
/// default selection: the interfaces holding the node addresses that serve
/// NodePorts): the same answers as tc alone, a cross-node backend's packets
/// bounced back out of the fabric interface by XDP, a local one's handed up
/// to tc; what XDP leaves to tc still happens.
fn xdp_answers_as_tc_does(bed: &MultiNode, mode: &str) {
    let (n1, n2) = (&bed.nodes[0], &bed.nodes[1]);
    for n in [n1, n2] {
        let log = n.agent_log();
        assert!(
            log.contains(&format!("XDP ({mode}) on eth0")),
            "XDP not attached:\n{log}"
        );
    }
    let client = &bed.clients[0];
    let ip1 = MultiNode::node_ip(1);
    let (tx, up) = (
        event_count(n1, Event::XdpTx),
        event_count(n1, Event::XdpStack),
    );
    reaches(bed, client, at(ip1, 30080), &[("a1", GATEWAY), ("b1", ip1)]);
    reaches(bed, client, at(WEB_LB, 80), &[("a1", GATEWAY), ("b1", ip1)]);
    reaches(
        bed,
        client,
        at(MultiNode::node_ip(2), 30080),
        &[("a1", MultiNode::node_ip(2)), ("b1", GATEWAY)],
    );
    assert!(event_count(n1, Event::XdpTx) > tx, "nothing bounced by XDP");
    // Where the kernel lets XDP mark no frame, the local backend's packets
    // are tc's alone.
    let handed_up = event_count(n1, Event::XdpStack) - up;
    if kpx::dataplane::maps::xdp_marks_supported() {
        assert!(handed_up > 0, "nothing handed up");
    } else {
        assert_eq!(handed_up, 0, "handed up unmarked");
    }
    assert!(event_count(n2, Event::XdpTx) > 0);
    // The Local policy's drop (at XDP), a cluster IP from outside, and a
    // source range.
    dropped(client, at(LOCAL_LB, 80), n1, DropReason::NoLocalEndpoint);
    reaches(
        bed,
        client,
        at(WEB_VIP, 80),
        &[("a1", GATEWAY), ("b1", ip1)],
    );
    reaches(bed, &bed.clients[1], at(ip1, 30082), &[("a2", GATEWAY)]);
    dropped(&bed.clients[1], at(FW_LB, 80), n1, DropReason::SourceRange);
}

/// Generic XDP: a veth runs it without anything on its peer.
#[test]
#[ignore = "needs root"]
fn xdp_serves_traffic_from_outside_with_the_same_answers_as_tc() {
    let bed = bed_with(&["--xdp=generic"], false);
    xdp_answers_as_tc_does(&bed, "generic");
    let ip1 = MultiNode::node_ip(1);
    // Restarted, the agent takes its pinned XDP link over.
    let mut bed = bed;
    bed.nodes[0].agent.as_mut().expect("agent").stop().unwrap();
    bed.nodes[0]
        .start_agent(Path::new(KPX), &["--xdp=generic"])
        .unwrap();
    let took_over = wait_for(Duration::from_secs(20), || {
        let log = bed.nodes[0].agent_log();
        log.contains("; took over the pinned link)").then_some(())
    });
    assert!(took_over.is_some(), "{}", bed.nodes[0].agent_log());
    reaches(
        &bed,
        &bed.clients[0],
        at(ip1, 30080),
        &[("a1", GATEWAY), ("b1", ip1)],
    );
    // Off: the link goes, and tc alone serves.
    bed.nodes[0].agent.as_mut().expect("agent").stop().unwrap();
    bed.nodes[0]
        .start_agent(Path::new(KPX), &["--xdp=off"])
        .unwrap();
    let detached = wait_for(Duration::from_secs(20), || {
        let log = bed.nodes[0].agent_log();
        log.contains("XDP: detached").then_some(())
    });
    assert!(detached.is_some(), "{}", bed.nodes[0].agent_log());
    let tx = event_count(&bed.nodes[0], Event::XdpTx);
    reaches(
        &bed,
        &bed.clients[0],
        at(ip1, 30080),
        &[("a1", GATEWAY), ("b1", ip1)],
    );
    assert_eq!(event_count(&bed.nodes[0], Event::XdpTx), tx);
}

/// Native XDP, in the veth driver, on a fabric made wire-like (see
/// [`bed_with`]: what `--xdp=auto` cannot see on a veth, and why it leaves
/// one to tc).
#[test]
#[ignore = "needs root"]
fn native_xdp_on_a_veth_whose_peer_takes_its_frames_answers_as_tc_does() {
    let bed = bed_with(&["--xdp=native"], true);
    xdp_answers_as_tc_does(&bed, "native");
}

/// `--nodeport-mode=dsr`: the flows a node balances to a backend on
/// another node keep the client's address, and that node answers the
/// client itself, from the service address: the balancing node never sees
/// a reply.
#[test]
#[ignore = "needs root"]
fn dsr_keeps_the_client_address_and_answers_from_the_backends_node() {
    let bed = bed_with(&["--nodeport-mode=dsr"], false);
    let (n1, n2) = (&bed.nodes[0], &bed.nodes[1]);
    let client = &bed.clients[0];
    let ip1 = MultiNode::node_ip(1);
    for n in [n1, n2] {
        let log = n.agent_log();
        assert!(log.contains("NodePort mode: dsr"), "{log}");
    }
    // Both backends see the client itself, through node 1's NodePort, LB
    // IP and external IP alike; the replies come from the address asked
    // (the TCP connection is made, the UDP answer's source is checked).
    let both = [("a1", CLIENT), ("b1", CLIENT)];
    reaches(&bed, client, at(ip1, 30080), &both);
    reaches(&bed, client, at(WEB_LB, 80), &both);
    reaches(&bed, client, at(WEB_EXT, 80), &both);
    assert!(
        event_count(n1, Event::DsrEncap) > 0,
        "nothing sent in Geneve"
    );
    assert!(event_count(n2, Event::DsrDecap) > 0, "nothing received");
    assert_eq!(event_count(n1, Event::Masqueraded), 0);
    split_flows(n1, n2, proxy_common::wire::addr(CLIENT));
    // kpx dump shows which is which.
    let ct = String::from_utf8_lossy(&bed::kpx_dump(&n1.bpffs(), &["conntrack"])).into_owned();
    assert!(ct.contains("dnat+dsr "), "{ct}");
    let ct = String::from_utf8_lossy(&bed::kpx_dump(&n2.bpffs(), &["conntrack"])).into_owned();
    assert!(ct.contains("dnat+dsr-backend"), "{ct}");
    // What DSR does not apply to keeps the reference's answers: the Local
    // policy, a cluster IP from outside (masqueraded), a source range.
    reaches(
        &bed,
        client,
        at(MultiNode::node_ip(2), 30081),
        &[("b1", CLIENT)],
    );
    reaches(
        &bed,
        client,
        at(WEB_VIP, 80),
        &[("a1", GATEWAY), ("b1", ip1)],
    );
    dropped(&bed.clients[1], at(FW_LB, 80), n1, DropReason::SourceRange);
}

/// `web6`: an IPv6 Service (NodePorts 30090/TCP and 30063/UDP), endpoints
/// a1 (node 1) and b1 (node 2) at their IPv6 addresses.
fn web6() -> String {
    service_manifest(
        "web6",
        "  type: NodePort\n  clusterIP: 2001:2:0:ff::10\n  clusterIPs: ['2001:2:0:ff::10']\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30063}",
        "",
        "",
        &[],
    ) + &testbed::slice6_on_nodes(
        "web6",
        8080,
        5353,
        &[(A1_6, Some("node-1")), (B1_6, Some("node-2"))],
    )
}

const A1_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x10);
const A2_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x11);
const B1_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 0x10);

/// `--nodeport-mode=dsr` on IPv6: node 1 sends a flow to b1 in Geneve over
/// IPv6, b1 sees the client itself and node 2 answers the client from
/// node 1's address; every flow to the NodePort keeps the client's address.
#[test]
#[ignore = "needs root"]
fn dsr_keeps_the_client_address_over_ipv6_too() {
    let mut bed = testbed::built(
        "the two-node dual-stack bed",
        MultiNode::new(&[&[("a1", A1), ("a2", A2)], &[("b1", B1)]]),
    );
    bed.add_client(CLIENT).unwrap();
    bed.add_ipv6(&[&[("a1", A1_6), ("a2", A2_6)], &[("b1", B1_6)]])
        .unwrap();
    bed.write_manifest("all.yaml", &format!("{}---\n{}", manifests(), web6()))
        .unwrap();
    for n in &mut bed.nodes {
        for p in n.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>() {
            n.serve(&p, 8080, 5353).unwrap();
        }
        n.start_agent(Path::new(KPX), &["--nodeport-mode=dsr", "--dsr-ipv6=true"])
            .unwrap();
    }
    for n in &bed.nodes {
        // web6: 2 ports × (cluster IP, NodePort) more.
        synced_to(n, FRONTENDS + 4);
    }
    let (n1, n2) = (&bed.nodes[0], &bed.nodes[1]);
    let client = &bed.clients[0];
    let (client6, ip1) = (MultiNode::client_ip6(0), MultiNode::node_ip6(1));
    let nodeport = SocketAddrV6::new(ip1, 30090, 0, 0);
    let up = wait_for(Duration::from_secs(20), || {
        tcp_who(client, nodeport, Duration::from_millis(500)).ok()
    });
    assert!(up.is_some(), "{}", n1.agent_log());
    reaches(&bed, client, nodeport, &[("a1", client6), ("b1", client6)]);
    assert!(
        event_count(n1, Event::DsrEncap) > 0,
        "nothing sent in Geneve"
    );
    assert!(event_count(n2, Event::DsrDecap) > 0, "nothing received");
    assert_eq!(event_count(n1, Event::Masqueraded), 0);
    split_flows(n1, n2, proxy_common::wire::addr6(client6));
    // kpx dump shows which is which, with the client's IPv6 address.
    for (n, mark) in [(n1, "dnat+dsr "), (n2, "dnat+dsr-backend")] {
        let ct = bed::kpx_dump(&n.bpffs(), &["conntrack"]);
        let ct = String::from_utf8_lossy(&ct);
        assert!(
            ct.lines()
                .any(|l| l.contains(mark) && l.contains(&format!("[{client6}]"))),
            "{ct}"
        );
    }
}

/// Direct server return's flows of family `A` in the two nodes' conntrack:
/// node 1 sent flows from `client` to node 2 (original entries marked
/// `CT_F_DSR_ENCAP`) and never saw a reply of theirs; node 2 received them
/// (`CT_F_DSR_DECAP`) and its entries of them have seen their replies.
fn split_flows<A: kpx::dataplane::conntrack::CtFamily>(n1: &Cluster, n2: &Cluster, client: A) {
    let flows = |n: &Cluster, flag: u16| {
        let maps = MapSet::open_pinned(&n.bpffs()).unwrap();
        let entries: Vec<_> = kpx::dataplane::maps::CtTable::ALL
            .into_iter()
            .flat_map(|t| A::read(&maps, t).unwrap())
            .collect();
        entries
            .iter()
            .filter(|(_, v)| v.flags & flag != 0 && v.dir == proxy_common::CT_DIR_ORIGINAL)
            .map(|(k, v)| {
                let reply = entries
                    .iter()
                    .find(|(rk, _)| *rk == v.partner(k))
                    .map(|(_, r)| r.flags & proxy_common::CT_F_SEEN_REPLY != 0);
                (k.src_addr, reply)
            })
            .collect::<Vec<_>>()
    };
    let sent = flows(n1, proxy_common::CT_F_DSR_ENCAP);
    assert!(!sent.is_empty());
    for (src, replied) in &sent {
        assert_eq!(*src, client);
        assert_eq!(*replied, Some(false), "node 1 saw a reply: {sent:?}");
    }
    let received = flows(n2, proxy_common::CT_F_DSR_DECAP);
    assert!(
        !received.is_empty() && received.iter().all(|(_, r)| *r == Some(true)),
        "node 2 did not translate the replies: {received:?}"
    );
}

/// DSR with XDP (generic) on the fabric interfaces: XDP leaves the packets
/// that go in Geneve to tc and sends a DSR flow's other packets back out
/// itself; the answers are the same.
#[test]
#[ignore = "needs root"]
fn dsr_with_xdp_keeps_the_client_address_too() {
    let bed = bed_with(&["--nodeport-mode=dsr", "--xdp=generic"], false);
    let (n1, n2) = (&bed.nodes[0], &bed.nodes[1]);
    let both = [("a1", CLIENT), ("b1", CLIENT)];
    reaches(
        &bed,
        &bed.clients[0],
        at(MultiNode::node_ip(1), 30080),
        &both,
    );
    assert!(event_count(n1, Event::DsrEncap) > 0);
    assert!(
        event_count(n1, Event::XdpTx) > 0,
        "XDP sent nothing back out"
    );
    assert!(event_count(n2, Event::DsrDecap) > 0);
    assert_eq!(event_count(n1, Event::Masqueraded), 0);
}
