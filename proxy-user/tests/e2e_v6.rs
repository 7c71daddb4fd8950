//! End to end on IPv6 and dual-stack: the real `kpx agent` on a bed whose
//! pods have IPv6 addresses too (2001:2::/48, RFC 5180), a dual-stack
//! Service answering on both families at once, IPv6 masquerade as
//! kube-proxy's ip6tables rules decide it, REJECT as ICMPv6, and path MTU
//! discovery through an IPv6 VIP.

mod bed;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    path::Path,
    time::Duration,
};

use bed::*;
use proxy_common::{Counter, Event};
use testbed::{
    probe::{self, Answer, Cgroup, Session},
    slice6_yaml, tcp_ask_many, tcp_who, udp_ask_many, udp_connected_who, wait_for, Cluster, Held,
    GATEWAY6,
};

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x10);

fn v6(vip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(vip, port, 0, 0))
}

/// The pods' IPv6 addresses: 2001:2:0:2::2 for the client, 2001:2:0:1::N
/// for web-N.
fn backends6() -> [(&'static str, Ipv6Addr); 4] {
    [
        ("client", Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2)),
        ("web-1", Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1)),
        ("web-2", Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2)),
        ("web-3", Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 3)),
    ]
}

/// The standard bed made dual-stack, its web pods serving on both
/// families.
fn dual_bed() -> Cluster {
    let mut c = cluster(&backends());
    c.add_ipv6(&backends6()).unwrap();
    for (name, _) in backends().iter().filter(|(n, _)| n.starts_with("web")) {
        c.serve(name, 8080, 5353).unwrap();
    }
    c
}

/// `web` on both families (IPv4 primary) served by `endpoints`, with
/// `spec_extra` lines in its spec (e.g. a type and nodePorts).
fn dual_web(c: &Cluster, endpoints: &[&str], spec_extra: &str) -> String {
    let v4 = web(c, endpoints);
    let ips6: Vec<Ipv6Addr> = endpoints
        .iter()
        .map(|n| c.pod(n).ip6.expect("a dual-stack pod"))
        .collect();
    v4.replace(
        &format!("  clusterIP: {VIP}\n"),
        &format!(
            "  clusterIP: {VIP}\n  clusterIPs: [{VIP}, '{VIP6}']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n{spec_extra}"
        ),
    ) + &slice6_yaml("web", 8080, 5353, &ips6)
}

/// The dual-stack bed with `web` on both families served by `endpoints`,
/// the agent running and synced (TCP and UDP on each family).
fn running_dual(endpoints: &[&str]) -> Cluster {
    let mut c = dual_bed();
    c.write_manifest("web.yaml", &dual_web(&c, endpoints, ""))
        .unwrap();
    c.start_agent(Path::new(KPX), &[]).unwrap();
    let n = endpoints.len() as u32;
    wait_synced(&c, 4, &[n; 4]);
    c
}

#[test]
#[ignore = "needs root"]
fn a_dual_stack_service_answers_on_both_families_at_once() {
    let c = running_dual(&["web-1", "web-2", "web-3"]);
    let client = c.pod("client").netns.shared();

    // Both families at once, from one client: each spreads over the three
    // pods on its own family.
    let (t4, t6) = std::thread::scope(|s| {
        let four = s.spawn(|| tcp_ask_many(&client, SocketAddrV4::new(VIP, 80), 150, T));
        let six = s.spawn(|| tcp_ask_many(&client, v6(VIP6, 80), 150, T));
        (four.join().unwrap(), six.join().unwrap())
    });
    for (family, ids) in [("IPv4", t4), ("IPv6", t6)] {
        let ids = ids.unwrap_or_else(|e| panic!("TCP over {family}: {e:#}\n{}", c.agent_log()));
        let spread = spread(&ids);
        assert_eq!(spread.len(), 3, "{family}: {spread:?}");
        assert!(spread.values().all(|&n| n >= 20), "{family}: {spread:?}");
    }
    let answers = udp_ask_many(&client, v6(VIP6, 53), 60, T)
        .unwrap_or_else(|e| panic!("UDP over IPv6: {e:#}\n{}", c.agent_log()));
    assert!(
        answers.iter().all(|a| a.from == v6(VIP6, 53)),
        "reply not from the VIP"
    );
    let ids: Vec<String> = answers.into_iter().map(|a| a.identity).collect();
    assert_eq!(spread(&ids).len(), 3);

    // `kpx dump services`: the IPv6 frontends and backends, in JSON and
    // in the table.
    let out = kpx_dump(&c.bpffs(), &["services", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let http6 = rows
        .iter()
        .find(|r| r["protocol"] == "TCP" && r["vip"] == VIP6.to_string())
        .unwrap_or_else(|| panic!("no IPv6 TCP frontend in {rows:?}"));
    assert_eq!(http6["frontend"], format!("[{VIP6}]:80"));
    assert_eq!(http6["name"], "default/web:http");
    assert_eq!(http6["new_flows"], 150);
    let mut got: Vec<String> = http6["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("[{}]:{}", b["addr"].as_str().unwrap(), b["port"]))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "[2001:2:0:1::1]:8080",
            "[2001:2:0:1::2]:8080",
            "[2001:2:0:1::3]:8080"
        ]
    );
    let table = String::from_utf8(kpx_dump(&c.bpffs(), &["services"])).unwrap();
    assert!(table.contains(&format!("[{VIP6}]:53")), "{table}");
    assert!(table.contains("[2001:2:0:1::3]:5353"), "{table}");
    // ipvsadm's view lists the IPv6 virtual service with its real servers
    // and their connections (IPv6's conntrack tables are counted).
    let ipvs = String::from_utf8(kpx_dump(&c.bpffs(), &["services", "--ipvsadm"])).unwrap();
    assert!(ipvs.contains(&format!("TCP  [{VIP6}]:80 random")), "{ipvs}");
    let conns6: u64 = ipvs
        .lines()
        .filter(|l| l.contains("-> [2001:2:0:1::") && l.contains(":8080"))
        // Active and inactive (the 150 were closed) connections.
        .flat_map(|l| {
            l.split_whitespace()
                .skip(4)
                .filter_map(|n| n.parse::<u64>().ok())
        })
        .sum();
    assert_eq!(conns6, 150, "{ipvs}");
}

/// XDP (generic) on the client pod's interface: its IPv6 flows to the
/// VIP are set up and translated at XDP and handed up marked as
/// translated (the backends are behind other interfaces), for tc ingress
/// to forward: the same answers as tc alone, both families at once.
#[test]
#[ignore = "needs root"]
fn xdp_sets_up_and_translates_ipv6_flows_and_tc_forwards_them() {
    let mut c = dual_bed();
    c.write_manifest("web.yaml", &dual_web(&c, &["web-1", "web-2", "web-3"], ""))
        .unwrap();
    let pod = c.pod("client");
    let (client, host_if) = (pod.netns.shared(), pod.host_if.clone());
    // XDP sees frames: the sender finishes its checksums (a veth's frames
    // from a local stack carry partial ones, which only the skb says).
    client.set_tx_checksum("eth0", false).unwrap();
    c.start_agent(
        Path::new(KPX),
        &["--xdp=generic", &format!("--xdp-interfaces={host_if}")],
    )
    .unwrap();
    wait_synced(&c, 4, &[3; 4]);
    let log = c.agent_log();
    assert!(
        log.contains(&format!("XDP (generic) on {host_if}")),
        "XDP not attached:\n{log}"
    );
    let sent = |c: &Cluster| event_count(c, Event::FibRedirect) + event_count(c, Event::FibStack);
    let (up, sent_before) = (event_count(&c, Event::XdpStack), sent(&c));
    let ids = tcp_ask_many(&client, v6(VIP6, 80), 60, T)
        .unwrap_or_else(|e| panic!("TCP over IPv6 through XDP: {e:#}\n{}", c.agent_log()));
    let spread = spread(&ids);
    assert_eq!(spread.len(), 3, "{spread:?}");
    let answers = udp_ask_many(&client, v6(VIP6, 53), 30, T)
        .unwrap_or_else(|e| panic!("UDP over IPv6 through XDP: {e:#}\n{}", c.agent_log()));
    assert!(
        answers.iter().all(|a| a.from == v6(VIP6, 53)),
        "reply not from the VIP"
    );
    // Every request (60 connections of at least three packets, 30
    // datagrams) was translated at XDP and forwarded by tc. Where the
    // kernel lets XDP mark no frame, every one (bound for a pod here) went
    // to tc untouched, and the agent said why.
    let handed_up = event_count(&c, Event::XdpStack) - up;
    let marks = kpx::dataplane::maps::xdp_marks_supported();
    if marks {
        assert!(handed_up >= 60 * 3 + 30, "{handed_up} handed up by XDP");
    } else {
        assert_eq!(handed_up, 0);
        assert!(
            log.contains("refuses XDP programs bpf_xdp_adjust_meta"),
            "{log}"
        );
    }
    let stats = kpx_dump(&c.bpffs(), &["services", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&stats).unwrap();
    let rows = rows.as_array().unwrap();
    let http6 = rows
        .iter()
        .find(|r| r["protocol"] == "TCP" && r["vip"] == VIP6.to_string())
        .unwrap_or_else(|| panic!("no IPv6 TCP frontend in {rows:?}"));
    assert_eq!(http6["new_flows"], 60, "{http6}");
    if !marks {
        assert_eq!(http6["xdp_packets"], 0, "{http6}");
    }
    // tc sent on (FIB, redirect) what it translated itself (the replies)
    // and every packet XDP handed up.
    let at_tc: u64 = rows
        .iter()
        .map(|r| r["packets"].as_u64().unwrap() - r["xdp_packets"].as_u64().unwrap())
        .sum();
    let sent_by_tc = sent(&c) - sent_before;
    assert!(
        sent_by_tc >= at_tc + handed_up,
        "tc sent {sent_by_tc}: {at_tc} of its own, {handed_up} from XDP"
    );
    // IPv4 beside it, through the same XDP program.
    let ids = tcp_ask_many(&client, SocketAddrV4::new(VIP, 80), 30, T)
        .unwrap_or_else(|e| panic!("TCP over IPv4 through XDP: {e:#}\n{}", c.agent_log()));
    assert_eq!(ids.len(), 30);
}

#[test]
#[ignore = "needs root"]
fn ipv6_traffic_is_masqueraded_where_ip6tables_would_and_refused_without_endpoints() {
    let mut c = dual_bed();
    let yaml = dual_web(&c, &["web-1"], "")
        .replace("type: ClusterIP", "type: NodePort")
        .replace(
            "{name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}",
        );
    // And a dual-stack Service without endpoints on either family.
    let empty = dual_web(&c, &[], "")
        // The Service, its slices and their labels.
        .replace("name: web", "name: empty")
        .replace("service-name: web", "service-name: empty")
        .replace(&VIP.to_string(), "198.19.0.11")
        .replace(&VIP6.to_string(), "2001:2:0:ff::11");
    c.write_manifest("web.yaml", &yaml).unwrap();
    c.write_manifest("empty.yaml", &empty).unwrap();
    c.start_agent(Path::new(KPX), &[]).unwrap();
    // web: TCP, UDP and the TCP NodePort per family; empty: TCP and UDP.
    wait_synced(&c, 10, &[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
    let client = &c.pod("client").netns;
    let client6 = c.pod("client").ip6.unwrap();

    // To the cluster IP from a pod: the backend sees the pod (no
    // masquerade, as KUBE-SVC-* marks only off-cluster sources).
    let (seen, _) =
        tcp_who(client, v6(VIP6, 80), T).unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent_log()));
    assert_eq!(seen.identity, "web-1");
    assert_eq!(seen.client.ip(), IpAddr::V6(client6));

    // To the node's IPv6 address on the NodePort: masqueraded to the
    // node's IPv6 address (KUBE-EXT-* marks every Cluster-policy flow).
    let (seen, _) = tcp_who(client, v6(GATEWAY6, 30080), T)
        .unwrap_or_else(|e| panic!("NodePort over IPv6: {e:#}\n{}", c.agent_log()));
    assert_eq!(seen.identity, "web-1");
    assert_eq!(seen.client.ip(), IpAddr::V6(GATEWAY6));

    // No endpoints: TCP and UDP refused at once (ICMPv6 port unreachable).
    let empty6 = "2001:2:0:ff::11".parse::<Ipv6Addr>().unwrap();
    let before = counter_count(&c, Counter::Rejected);
    let t0 = std::time::Instant::now();
    let tcp = client
        .enter(move || TcpStream::connect_timeout(&v6(empty6, 80), T).map(|_| ()))
        .unwrap()
        .map_err(|e| e.kind());
    // The client's kernel may take the first ICMPv6 error while connect()
    // still holds the socket (counted as LockDroppedIcmps) and be refused
    // at the SYN's retransmission: said, not timed here.
    eprintln!(
        "connect() to the empty IPv6 service refused after {:?}",
        t0.elapsed()
    );
    assert_eq!(tcp, Err(ErrorKind::ConnectionRefused), "{}", c.agent_log());
    let udp = udp_connected_who(client, v6(empty6, 53), T);
    assert_eq!(outcome(udp), "refused");
    // One per rejected packet: the UDP datagram and the SYN (sent again
    // if its first error came while the socket was locked).
    let rejected = counter_count(&c, Counter::Rejected) - before;
    assert!((2..=3).contains(&rejected), "{rejected}");
}

#[test]
#[ignore = "needs root"]
fn path_mtu_discovery_works_through_an_ipv6_vip() {
    let c = running_dual(&["web-1"]);
    // IPv6's minimum MTU on the node's link to the backend: only a Packet
    // Too Big, translated back to the VIP, can teach the client, as IPv6
    // routers never fragment.
    pmtu_through(&c, v6(VIP6, 80), 1280);
}

/// What a client saw: who answered and from where it saw the client, or
/// how the attempt failed.
fn outcome(r: anyhow::Result<(testbed::Seen, SocketAddr)>) -> String {
    match r {
        Ok((seen, _)) => format!("{} saw {}", seen.identity, seen.client.ip()),
        Err(e) => match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
            Some(ErrorKind::ConnectionRefused) => "refused".into(),
            Some(ErrorKind::TimedOut | ErrorKind::WouldBlock) => "no answer".into(),
            _ => format!("error: {e:#}"),
        },
    }
}

/// The IPv6 scenarios of the differential comparison: a dual-stack
/// NodePort Service with an IPv6 external IP, IPv6 LoadBalancers whose
/// source ranges admit and refuse the client, and a Service without
/// endpoints.
fn v6_manifests(c: &Cluster) -> Vec<(&'static str, String)> {
    let np = dual_web(c, &["web-1"], "  externalIPs: ['2001:2:0:9::1']\n")
        .replace("type: ClusterIP", "type: NodePort")
        .replace(
            "{name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}",
        );
    let lb = |name: &str, vip: &str, lb_ip: &str, range: &str, pod: &str| {
        let ip6 = c.pod(pod).ip6.expect("a dual-stack pod");
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: '{vip}'
  ipFamilies: [IPv6]
  loadBalancerSourceRanges: ['{range}']
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 0}}
status:
  loadBalancer:
    ingress:
    - {{ip: '{lb_ip}'}}
"
        )
        .replace(", nodePort: 0", "")
            + &slice6_yaml(name, 8080, 5353, &[ip6])
    };
    let empty = dual_web(c, &[], "")
        .replace("name: web", "name: empty")
        .replace("service-name: web", "service-name: empty")
        .replace(&VIP.to_string(), "198.19.0.11")
        .replace(&VIP6.to_string(), "2001:2:0:ff::11");
    vec![
        ("web.yaml", np),
        (
            "lb-ok.yaml",
            lb(
                "lb-ok",
                "2001:2:0:ff::12",
                "2001:2:0:9::2",
                "2001:2:0:2::/64",
                "web-2",
            ),
        ),
        (
            "lb-no.yaml",
            lb(
                "lb-no",
                "2001:2:0:ff::13",
                "2001:2:0:9::3",
                "2001:2:0:7::/64",
                "web-3",
            ),
        ),
        ("empty.yaml", empty),
    ]
}

/// Runs the IPv6 probes on a fresh dual-stack bed whose service traffic
/// `proxy` translates: (probe, outcome) in order.
fn v6_side(proxy: testbed::Proxy) -> Vec<(String, String)> {
    let mut c = dual_bed();
    for (file, yaml) in v6_manifests(&c) {
        c.write_manifest(file, &yaml).unwrap();
    }
    match proxy {
        testbed::Proxy::Kpx => {
            c.start_agent(Path::new(KPX), &[]).unwrap();
            // web: TCP, UDP and the TCP NodePort per family, and the IPv6
            // external IP's TCP and UDP; lb-*: cluster IP and LB IP; empty:
            // TCP and UDP per family.
            let mut counts = vec![1; 12];
            counts.extend([0; 4]);
            wait_synced(&c, 16, &counts);
        }
        _ => c.load_reference(proxy, Path::new(KPX)).unwrap(),
    }
    let client = &c.pod("client").netns;
    let sa6 = |ip: &str, port| v6(ip.parse().unwrap(), port);
    let probes: Vec<(&str, SocketAddr, bool)> = vec![
        ("TCP to the IPv6 cluster IP", v6(VIP6, 80), true),
        ("UDP to the IPv6 cluster IP", v6(VIP6, 53), false),
        (
            "TCP to the IPv4 cluster IP",
            SocketAddr::V4(SocketAddrV4::new(VIP, 80)),
            true,
        ),
        ("TCP to the node's IPv6 NodePort", v6(GATEWAY6, 30080), true),
        (
            "TCP to the IPv6 external IP",
            sa6("2001:2:0:9::1", 80),
            true,
        ),
        (
            "TCP to an LB IP admitting the client",
            sa6("2001:2:0:9::2", 80),
            true,
        ),
        (
            "TCP to an LB IP refusing the client",
            sa6("2001:2:0:9::3", 80),
            true,
        ),
        (
            "TCP to a Service without endpoints",
            sa6("2001:2:0:ff::11", 80),
            true,
        ),
        (
            "UDP to a Service without endpoints",
            sa6("2001:2:0:ff::11", 53),
            false,
        ),
    ];
    probes
        .into_iter()
        .map(|(what, to, tcp)| {
            let r = if tcp {
                tcp_who(client, to, T)
            } else {
                udp_connected_who(client, to, T)
            };
            (what.to_string(), outcome(r))
        })
        .collect()
}

#[test]
#[ignore = "needs root"]
fn kpx_reaches_ip6tables_and_nftables_verdicts_on_ipv6() {
    let kpx = v6_side(testbed::Proxy::Kpx);
    // What the probes must see, whoever proxies: kube-proxy's verdicts.
    let client6 = backends6()[0].1;
    let want = [
        format!("web-1 saw {client6}"),
        format!("web-1 saw {client6}"),
        "web-1 saw 198.18.2.2".to_string(),
        format!("web-1 saw {GATEWAY6}"),
        format!("web-1 saw {GATEWAY6}"),
        format!("web-2 saw {GATEWAY6}"),
        "no answer".to_string(),
        "refused".to_string(),
        "refused".to_string(),
    ];
    let got: Vec<&str> = kpx.iter().map(|(_, o)| o.as_str()).collect();
    assert_eq!(got, want, "kpx: {kpx:#?}");
    for proxy in [testbed::Proxy::Iptables, testbed::Proxy::Nftables] {
        let reference = v6_side(proxy);
        for ((what, theirs), (_, ours)) in reference.iter().zip(&kpx) {
            assert_eq!(ours, theirs, "{what}: kpx vs {}", proxy.name());
        }
    }
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_only_node_serves_ipv6_services_from_the_api() {
    use testbed::apiserver::{ApiServer, Kind};
    let mut c = dual_bed();
    // The agent knows nothing of IPv4: its node IP is the Node object's.
    c.ipv6_only = true;
    let api = ApiServer::start_with(c.binder("127.0.0.1:6443".parse().unwrap())).unwrap();
    api.apply_yaml(&format!(
        "apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status:
  addresses: [{{type: InternalIP, address: '{GATEWAY6}'}}]
"
    ))
    .unwrap();
    let ips6: Vec<Ipv6Addr> = ["web-1", "web-2"]
        .iter()
        .map(|n| c.pod(n).ip6.unwrap())
        .collect();
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: '{VIP6}'
  clusterIPs: ['{VIP6}']
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
"
    ) + &slice6_yaml("web", 8080, 5353, &ips6);
    api.apply_all(&svc).unwrap();
    c.start_agent_kube(Path::new(KPX), &api, &[]).unwrap();
    wait_synced(&c, 3, &[2, 2, 2]);
    assert!(
        c.agent_log()
            .contains(&format!("IPv6 masquerade to {GATEWAY6}")),
        "{}",
        c.agent_log()
    );
    let client = &c.pod("client").netns;
    let ids = tcp_ask_many(client, v6(VIP6, 80), 60, T)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent_log()));
    assert_eq!(spread(&ids).len(), 2);
    // The Node object's IPv6 address serves the NodePort, masqueraded to
    // it.
    let (seen, _) = tcp_who(client, v6(GATEWAY6, 30080), T)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent_log()));
    assert_eq!(seen.client.ip(), IpAddr::V6(GATEWAY6));
    // An endpoint leaves through the API: the maps follow.
    api.apply_all(&slice6_yaml("web", 8080, 5353, &ips6[1..]))
        .unwrap();
    wait_synced(&c, 3, &[1, 1, 1]);
    let ids = tcp_ask_many(client, v6(VIP6, 80), 10, T).unwrap();
    assert!(ids.iter().all(|i| i == "web-2"), "{ids:?}");
    // And the Service itself.
    assert!(api.delete(Kind::Service, "default", "web"));
    wait_synced(&c, 0, &[]);
}

/// Drill: kube-proxy (iptables and ip6tables) serving a dual-stack Service
/// with 25 live connections on each family; kpx started with
/// `--cleanup-kube-proxy` carries both families' flows from netfilter and
/// removes the rules, and no connection breaks or moves.
#[test]
#[ignore = "needs root"]
fn taking_over_both_families_from_kube_proxy_breaks_no_connection() {
    let mut c = dual_bed();
    c.write_manifest("web.yaml", &dual_web(&c, &["web-1", "web-2", "web-3"], ""))
        .unwrap();
    c.load_reference(testbed::Proxy::Iptables, Path::new(KPX))
        .unwrap();
    let client = c.pod("client").netns.shared();
    let client = &client;
    let mut long4 = Held::open(client, SocketAddrV4::new(VIP, 80), 25, T).unwrap();
    let mut long6 = Held::open(client, v6(VIP6, 80), 25, T).unwrap();
    assert!(long6.backends().len() > 1, "{:?}", long6.backends());

    c.start_agent(Path::new(KPX), &["--cleanup-kube-proxy"])
        .unwrap();
    wait_synced(&c, 4, &[3, 3, 3, 3]);
    let cleaned = wait_for(Duration::from_secs(10), || {
        c.agent_log()
            .contains("ip6tables-nft: removed")
            .then_some(())
    });
    assert!(cleaned.is_some(), "{}", c.agent_log());
    let log = c.agent_log();
    none_broken(&mut long4, "IPv4", &log);
    none_broken(&mut long6, "IPv6", &log);
    assert!(
        log.contains("takeover from netfilter: 50 service flows carried"),
        "{log}"
    );
    // IPv6's carried flows are in IPv6's tables.
    let conntrack = String::from_utf8(kpx_dump(&c.bpffs(), &["conntrack"])).unwrap();
    assert!(conntrack.contains(&format!("[{VIP6}]:80")), "{conntrack}");
    tcp_ask_many(client, v6(VIP6, 80), 10, T).unwrap();
}

/// Drill: the way back on both families: 25 connections each through kpx,
/// the agent gone, kube-proxy's rules loaded, `kpx cleanup` hands kpx's
/// flows to netfilter (IPv6's with IPv6's NAT), and none breaks.
#[test]
#[ignore = "needs root"]
fn going_back_to_kube_proxy_on_both_families_breaks_no_connection() {
    let mut c = running_dual(&["web-1", "web-2", "web-3"]);
    let client = c.pod("client").netns.shared();
    let client = &client;
    let mut long4 = Held::open(client, SocketAddrV4::new(VIP, 80), 25, T).unwrap();
    let mut long6 = Held::open(client, v6(VIP6, 80), 25, T).unwrap();
    c.agent.as_mut().unwrap().kill().unwrap();
    c.load_reference(testbed::Proxy::Iptables, Path::new(KPX))
        .unwrap();
    let said = kpx_cleanup(&c);
    assert!(
        said.contains("kpx's flows handed to netfilter: 50 service flows carried"),
        "{said}"
    );
    none_broken(&mut long4, "IPv4", &said);
    none_broken(&mut long6, "IPv6", &said);
    let ids = tcp_ask_many(client, v6(VIP6, 80), 30, T).unwrap();
    assert_eq!(spread(&ids).len(), 3, "{ids:?}");
}

// Socket-level load balancing for `AF_INET6` sockets (`connect6`,
// `sendmsg6`, `recvmsg6`, `getpeername6`), on a cgroup the test creates;
// clients are `kpx-probe` processes in it.

/// The dual-stack bed with `web` on both families served by `web_eps`
/// and the manifests `extra` makes, the agent's socket programs on a new
/// cgroup (`flags` added), synced as `synced` says (frontends, their
/// endpoints).
fn socket_dual(
    web_eps: &[&str],
    extra: impl Fn(&Cluster) -> Vec<(&'static str, String)>,
    flags: &[&str],
    synced: (usize, &[u32]),
) -> (Cluster, Cgroup) {
    let cg = Cgroup::create("socklb6").unwrap();
    let mut c = dual_bed();
    c.write_manifest("web.yaml", &dual_web(&c, web_eps, ""))
        .unwrap();
    for (name, yaml) in extra(&c) {
        c.write_manifest(name, &yaml).unwrap();
    }
    let mut args = vec!["--socket-lb-cgroup", cg.path.to_str().unwrap()];
    args.extend_from_slice(flags);
    c.start_agent(Path::new(KPX), &args).unwrap();
    wait_synced(&c, synced.0, synced.1);
    wait_attached(&c);
    (c, cg)
}

/// A dual-stack Service `name` like `web`, at `vip`/`vip6`, served by
/// `endpoints`.
fn other_dual(c: &Cluster, name: &str, vip: &str, vip6: &str, endpoints: &[&str]) -> String {
    dual_web(c, endpoints, "")
        .replace("name: web", &format!("name: {name}"))
        .replace("service-name: web", &format!("service-name: {name}"))
        .replace(&VIP.to_string(), vip)
        .replace(&VIP6.to_string(), vip6)
}

#[test]
#[ignore = "needs root"]
fn ipv6_sockets_connect_straight_to_backends_and_see_the_service() {
    let (c, cg) = socket_dual(&["web-1", "web-2", "web-3"], |_| vec![], &[], (4, &[3; 4]));
    let client = c.pod("client").netns.shared();
    let client6 = c.pod("client").ip6.unwrap();
    let vip = v6(VIP6, 80).to_string();
    let new_flows = counter_count(&c, Counter::NewFlow);

    // TCP: spread, getpeername() the service, the backend sees the pod.
    let got = answers(&probe::run(&client, Some(&cg), &["tcp", &vip, "60"]).unwrap());
    let ids: Vec<String> = got.iter().map(|a| a.identity.clone()).collect();
    assert_eq!(spread(&ids).len(), 3, "{ids:?}");
    for a in &got {
        assert_eq!(a.peer, vip, "{a:?}");
        assert!(a.client.starts_with(&format!("[{client6}]:")), "{a:?}");
    }
    // IPv4 on the same Service from the same cgroup: connect4's.
    let vip4 = SocketAddrV4::new(VIP, 80).to_string();
    let got4 = answers(&probe::run(&client, Some(&cg), &["tcp", &vip4, "10"]).unwrap());
    assert!(got4.iter().all(|a| a.peer == vip4), "{got4:?}");
    assert_eq!(event_count(&c, Event::SockConnect), 70);
    // Translated at connect(): tc saw no packet to the service.
    assert_eq!(counter_count(&c, Counter::NewFlow), new_flows);

    // UDP, unconnected: one backend per socket, answers from the service.
    let dns = v6(VIP6, 53).to_string();
    let got = answers(&probe::run(&client, Some(&cg), &["udp", &dns, "20"]).unwrap());
    assert_eq!(identities(&got).len(), 1, "{got:?}");
    assert!(got.iter().all(|a| a.peer == dns), "{got:?}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let a = answers(&probe::run(&client, Some(&cg), &["udp", &dns, "1"]).unwrap());
        seen.insert(a[0].identity.clone());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Connected UDP: the peer is the service.
    let got = answers(&probe::run(&client, Some(&cg), &["udp-connected", &dns, "3"]).unwrap());
    assert!(got.iter().all(|a| a.peer == dns), "{got:?}");
    assert_eq!(counter_count(&c, Counter::NewFlow), new_flows);

    // A dual-stack (`AF_INET6`) socket reaching the IPv4 cluster IP
    // through its IPv4-mapped address, as Java's do: balanced at the
    // socket with IPv4's maps, shown back mapped.
    let mapped = format!("[::ffff:{VIP}]:80");
    let got = answers(&probe::run(&client, Some(&cg), &["tcp", &mapped, "20"]).unwrap());
    assert_eq!(identities(&got).len(), 3, "{got:?}");
    for a in &got {
        assert_eq!(a.peer, mapped, "{a:?}");
        assert!(a.client.starts_with("198.18.2.2:"), "{a:?}");
    }
    let mapped_dns = format!("[::ffff:{VIP}]:53");
    let got = answers(&probe::run(&client, Some(&cg), &["udp", &mapped_dns, "5"]).unwrap());
    assert_eq!(identities(&got).len(), 1, "{got:?}");
    assert!(got.iter().all(|a| a.peer == mapped_dns), "{got:?}");
    // 70 above, the connected UDP socket's, these 20.
    assert_eq!(event_count(&c, Event::SockConnect), 91);
    assert_eq!(counter_count(&c, Counter::NewFlow), new_flows);

    // Held TCP sockets: `kpx dump sockets` lists them with the IPv6
    // frontend and backend.
    let mut held: Vec<Session> = (0..3)
        .map(|_| Session::start(&client, Some(&cg), &["tcp", &vip]).unwrap())
        .collect();
    for s in &mut held {
        Answer::parse(&s.ask().unwrap()).unwrap();
    }
    let socks = String::from_utf8(kpx_dump(&c.bpffs(), &["sockets"])).unwrap();
    let tcp6: Vec<&str> = socks
        .lines()
        .filter(|l| l.contains(&vip) && l.contains("TCP") && l.contains("[2001:2:0:1::"))
        .collect();
    assert_eq!(tcp6.len(), 3, "{socks}");
    let json = kpx_dump(&c.bpffs(), &["backends", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
    let v6_sockets: u64 = rows
        .iter()
        .filter(|r| r["addr"].as_str().is_some_and(|a| a.contains(':')))
        .map(|r| r["sockets"].as_u64().unwrap())
        .sum();
    // Only the held ones: the probes' UDP sockets left at their release,
    // the dual-stack one's IPv4 entry (from `sendmsg4`) too.
    assert_eq!(v6_sockets, 3, "{rows:?}");
    let v4_sockets: u64 = rows
        .iter()
        .filter(|r| r["addr"].as_str().is_some_and(|a| !a.contains(':')))
        .map(|r| r["sockets"].as_u64().unwrap())
        .sum();
    assert_eq!(v4_sockets, 0, "{rows:?}");
}

fn identities(got: &[Answer]) -> std::collections::BTreeMap<String, usize> {
    spread(&got.iter().map(|a| a.identity.clone()).collect::<Vec<_>>())
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_service_without_endpoints_refuses_at_connect_and_the_node_is_served() {
    let empty = |c: &Cluster| {
        let yaml = other_dual(c, "empty", "198.19.0.11", "2001:2:0:ff::11", &[]);
        vec![("empty.yaml", yaml)]
    };
    let three = ["web-1", "web-2", "web-3"];
    let (c, cg) = socket_dual(&three, empty, &[], (8, &[0, 0, 0, 0, 3, 3, 3, 3]));
    let client = c.pod("client").netns.shared();

    // Refused at connect(), before any packet leaves: no ICMPv6 wait.
    let before = counter_count(&c, Counter::Rejected);
    let lines = probe::run(&client, Some(&cg), &["tcp", "[2001:2:0:ff::11]:80", "5"]).unwrap();
    for l in &lines {
        assert!(l.starts_with("err ECONNREFUSED"), "{l}");
        let us: u64 = l.rsplit("us=").next().unwrap().parse().unwrap();
        assert!(us < 10_000, "refused after {us} µs: {l}");
    }
    let lines = probe::run(&client, Some(&cg), &["udp", "[2001:2:0:ff::11]:53", "2"]).unwrap();
    assert!(
        lines.iter().all(|l| l.starts_with("err ECONNREFUSED")),
        "{lines:?}"
    );
    assert_eq!(event_count(&c, Event::SockRefused), 7);
    assert_eq!(counter_count(&c, Counter::Rejected), before);

    // A host process (the node's namespace, the test's cgroup): served at
    // connect(), seen by the backend as one of the node's addresses.
    let vip = v6(VIP6, 80).to_string();
    let got = answers(&probe::run(&c.node, Some(&cg), &["tcp", &vip, "10"]).unwrap());
    assert!(got.iter().all(|a| a.peer == vip), "{got:?}");
    assert!(
        got.iter()
            .all(|a| a.client.starts_with(&format!("[{GATEWAY6}]:"))),
        "{got:?}"
    );
    assert_eq!(event_count(&c, Event::SockConnect), 10);
}

#[test]
#[ignore = "needs root"]
fn ipv6_udp_sockets_move_on_when_their_backend_leaves_and_tcp_stays() {
    let (c, cg) = socket_dual(&["web-1", "web-2", "web-3"], |_| vec![], &[], (4, &[3; 4]));
    let client = c.pod("client").netns.shared();
    let dns = v6(VIP6, 53).to_string();
    let http = v6(VIP6, 80).to_string();
    // A resolver on a fixed port (unconnected), a connected UDP socket and
    // a TCP connection, all on IPv6.
    let mut udp = Session::start(&client, Some(&cg), &["udp", &dns, "5300"]).unwrap();
    let mut stuck = Session::start(&client, Some(&cg), &["udp-connected", &dns]).unwrap();
    let first = Answer::parse(&udp.ask().unwrap()).unwrap();
    let connected = Answer::parse(&stuck.ask().unwrap()).unwrap();
    assert_eq!(connected.peer, dns);
    // The UDP sockets' backends leave; a TCP connection held to one of
    // them must stay.
    let leaving = [first.identity.clone(), connected.identity.clone()];
    // A connected dual-stack socket on the IPv4 side (IPv4-mapped), to a
    // leaving backend: closed as well.
    let mapped_dns = format!("[::ffff:{VIP}]:53");
    let mut mapped = (0..30)
        .find_map(|_| {
            let mut s =
                Session::start(&client, Some(&cg), &["udp-connected", &mapped_dns]).unwrap();
            let a = Answer::parse(&s.ask().unwrap()).unwrap();
            assert_eq!(a.peer, mapped_dns);
            leaving.contains(&a.identity).then_some(s)
        })
        .expect("no mapped socket reached a leaving backend in 30 tries");
    let (mut tcp, held) = (0..30)
        .find_map(|_| {
            let mut s = Session::start(&client, Some(&cg), &["tcp", &http]).unwrap();
            let a = Answer::parse(&s.ask().unwrap()).unwrap();
            leaving.contains(&a.identity).then_some((s, a))
        })
        .expect("no TCP connection reached a leaving backend in 30 tries");
    let keep: Vec<&str> = ["web-1", "web-2", "web-3"]
        .into_iter()
        .filter(|n| !leaving.iter().any(|l| l == n))
        .collect();
    c.write_manifest("web.yaml", &dual_web(&c, &keep, ""))
        .unwrap();
    let n = keep.len() as u32;
    wait_synced(&c, 4, &[n; 4]);

    // The unconnected socket's next datagram goes to a serving backend,
    // from the same port, and still shows the service.
    let next = Answer::parse(&udp.ask().unwrap()).unwrap();
    assert!(keep.contains(&next.identity.as_str()), "{next:?}");
    assert_eq!(next.client, first.client, "the client port changed");
    assert_eq!(next.peer, dns);
    assert_eq!(event_count(&c, Event::SockRebalanced), 1);
    // The connected one is closed by the agent (sock_diag on AF_INET6):
    // the application hears of it.
    wait_event(&c, Event::SockDestroyed, 2, Duration::from_secs(20));
    for s in [&mut stuck, &mut mapped] {
        let after = s.ask().unwrap();
        assert!(after.starts_with("err "), "{after}");
    }
    // kube-proxy keeps live TCP connections to a removed, running backend.
    let again = Answer::parse(&tcp.ask().unwrap()).unwrap();
    assert_eq!(again.identity, held.identity);
}

#[test]
#[ignore = "needs root"]
fn an_unconnected_ipv6_socket_keeps_a_backend_per_service_and_answers_from_each() {
    let dns2 = |c: &Cluster| {
        let yaml = other_dual(c, "dns2", "198.19.0.21", "2001:2:0:ff::21", &["web-3"]);
        vec![("dns2.yaml", yaml)]
    };
    let two = ["web-1", "web-2"];
    let (c, cg) = socket_dual(&two, dns2, &[], (8, &[1, 1, 1, 1, 2, 2, 2, 2]));
    let (dns, dns2) = (v6(VIP6, 53).to_string(), "[2001:2:0:ff::21]:53".to_string());
    let client = &c.pod("client").netns;
    let mut s = Session::start(client, Some(&cg), &["udp", &dns, "5301"]).unwrap();
    resolver_keeps_a_backend_per_service(&mut s, &dns, &dns2);
    assert_eq!(event_count(&c, Event::SockRebalanced), 0);
    assert_eq!(event_count(&c, Event::SockConnect), 0);
    assert!(event_count(&c, Event::SockSendmsg) >= 30);
}
